"""Decomposition: per-head / per-MLP terms of the image representation, their Parquet cache, prototypes."""
