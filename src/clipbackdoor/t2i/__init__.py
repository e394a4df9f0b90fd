"""Seed 000: the miniature text-to-image model, its B² backdoor, and the CLIP bias audit."""
