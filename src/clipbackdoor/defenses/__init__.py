"""Defenses: on cached decompositions (Decomp-Rep, Decomp-Det, ablations) and model repairs (CleanCLIP, RoCLIP, ABD)."""
