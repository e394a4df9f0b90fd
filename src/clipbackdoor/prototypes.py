"""Stage ``prototypes``: the seeded clean-validation / test split of the evaluation set and, for every
layer, the mean of each head's and each MLP's term over the clean-validation images (seed 001, Sec. 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipbackdoor.decomp_cache import read_decomposition
from clipbackdoor.io import load_safetensors, save_safetensors


def head_similarity(heads: np.ndarray, protos: np.ndarray, rule: str) -> np.ndarray:
    """heads [N, k, H, d], prototypes [k, H, d] -> similarity [N, k, H] (dot or cosine)."""
    dot = np.einsum("nkhd,khd->nkh", heads, protos)
    if rule == "dot":
        return dot
    denom = np.linalg.norm(heads, axis=-1) * np.linalg.norm(protos, axis=-1)[None]
    return dot / np.maximum(denom, 1e-12)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation, test) indices: a seeded permutation, the first ``val_fraction`` for validation."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n))
    return np.sort(perm[:n_val]), np.sort(perm[n_val:])


def build_prototypes(clean_decomp_path: str | Path, out_path: str | Path, val_fraction: float, seed: int) -> dict:
    d = read_decomposition(clean_decomp_path)
    val, test = split_indices(len(d.keys), val_fraction, seed)
    heads = d.heads[val].mean(axis=0)  # [L, H, d]
    arrays = {"heads": heads, "mlps": d.mlps[val].mean(axis=0),  # [L, d]
              "embed": d.embed[val].mean(axis=0), "bias": d.bias[val].mean(axis=0),
              "val_index": val.astype(np.int64), "test_index": test.astype(np.int64),
              # [N_val, L, H] similarity of each clean-validation head term to its prototype, per rule:
              # what a per-head calibrated threshold (defend.threshold: clean_quantile) is taken from
              "val_cosine": head_similarity(d.heads[val], heads, "cosine").astype(np.float32),
              "val_dot": head_similarity(d.heads[val], heads, "dot").astype(np.float32)}
    meta = {"val_fraction": str(val_fraction), "split_seed": str(seed), "source": str(clean_decomp_path),
            "checkpoint_sha256": d.meta.get("checkpoint_sha256", ""), "n_val": str(len(val)), "n_test": str(len(test))}
    save_safetensors(out_path, arrays, meta)
    return {"n_val": len(val), "n_test": len(test)}


def load_prototypes(path: str | Path) -> dict:
    return load_safetensors(path, "np", made_by="the prototypes stage")
