"""Stage ``prototypes``: the seeded clean-validation / test split of the evaluation set and, for every
layer, the mean of each head's and each MLP's term over the clean-validation images (seed 001, Sec. 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from clipbackdoor.decomp_cache import read_decomposition
from clipbackdoor.io import atomic_path


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation, test) indices: a seeded permutation, the first ``val_fraction`` for validation."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n))
    return np.sort(perm[:n_val]), np.sort(perm[n_val:])


def build_prototypes(clean_decomp_path: str | Path, out_path: str | Path, val_fraction: float, seed: int) -> dict:
    d = read_decomposition(clean_decomp_path)
    val, test = split_indices(len(d.keys), val_fraction, seed)
    arrays = {"heads": d.heads[val].mean(axis=0), "mlps": d.mlps[val].mean(axis=0),  # [L, H, d], [L, d]
              "embed": d.embed[val].mean(axis=0), "bias": d.bias[val].mean(axis=0),
              "val_index": val.astype(np.int64), "test_index": test.astype(np.int64)}
    meta = {"val_fraction": str(val_fraction), "split_seed": str(seed), "source": str(clean_decomp_path),
            "checkpoint_sha256": d.meta.get("checkpoint_sha256", ""), "n_val": str(len(val)), "n_test": str(len(test))}
    with atomic_path(out_path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=meta)
    return {"n_val": len(val), "n_test": len(test)}


def load_prototypes(path: str | Path) -> dict:
    return load_file(str(path))
