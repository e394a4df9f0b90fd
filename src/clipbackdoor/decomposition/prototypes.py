"""Stage ``prototypes``: the seeded clean-validation / test split of the evaluation set and, for every
layer, the mean of each head's and each MLP's term over the clean-validation images (seed 001, Sec. 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clipbackdoor.config import Params
from clipbackdoor.decomposition.cache import iter_decomposition, read_meta
from clipbackdoor.io import load_safetensors, save_safetensors


def head_similarity(heads: np.ndarray, protos: np.ndarray, rule: str) -> np.ndarray:
    """heads [N, k, H, d], prototypes [k, H, d] -> similarity [N, k, H] (dot or cosine)."""
    dot = np.einsum("nkhd,khd->nkh", heads, protos)
    if rule == "dot":
        return dot
    denom = np.linalg.norm(heads, axis=-1) * np.linalg.norm(protos, axis=-1)[None]
    return dot / np.maximum(denom, 1e-12)


SPLITS = ("seeded", "official")


def split_indices(n: int, val_fraction: float, seed: int, procedure: str = "seeded") -> tuple[np.ndarray, np.ndarray]:
    """(validation, test) indices. ``seeded``: a numpy permutation from ``seed``, the first round(val_fraction n)
    for validation. ``official``: the official code's procedure -- ``random.seed(seed)``, ``random.shuffle`` of
    range(n), the first int(val_fraction n) -- which draws different images from the same seed."""
    if procedure == "official":
        import random

        perm = list(range(n))
        random.Random(seed).shuffle(perm)  # = random.seed(seed); random.shuffle(perm), without the global state
        perm, n_val = np.asarray(perm), int(val_fraction * n)
    elif procedure == "seeded":
        perm, n_val = np.random.default_rng(seed).permutation(n), int(round(val_fraction * n))
    else:
        raise ValueError(f"unknown split procedure {procedure!r} (one of {SPLITS})")
    return np.sort(perm[:n_val]), np.sort(perm[n_val:])


class RunningSum:
    """Sum over rows fed chunk by chunk, added in row order in float32: bit-identical to ``x.sum(axis=0)`` over
    the whole array (numpy reduces a leading axis row after row), so a streamed mean equals the in-memory one."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.count = 0

    def add(self, rows: np.ndarray) -> None:
        # (for [N, d] and wider; a 1-D sum is pairwise in numpy, so not row by row)
        assert rows.ndim >= 2, "RunningSum matches numpy's row-order sum for arrays of two or more dimensions"
        if not len(rows):
            return
        stacked = rows if self.total is None else np.concatenate([self.total[None], rows])
        self.total = np.add.reduce(stacked, axis=0)
        self.count += len(rows)

    def mean(self) -> np.ndarray:
        return self.total / np.float32(self.count)


def build_prototypes(clean_decomp_path: str | Path, out_path: str | Path, val_fraction: float, seed: int,
                     split: str = "seeded") -> dict:
    """Two streaming passes over the clean-validation rows (memory O(row group)): the running means, then each
    validation head term's similarity to its prototype."""
    source_meta = read_meta(clean_decomp_path)  # refuses a missing or foreign file in one line
    n = int(pq.ParquetFile(clean_decomp_path).metadata.num_rows)
    val, test = split_indices(n, val_fraction, seed, split)
    sums = {name: RunningSum() for name in ("heads", "mlps", "embed", "bias")}
    for _, chunk in iter_decomposition(clean_decomp_path, rows=val):
        for name, acc in sums.items():
            acc.add(getattr(chunk, name))
    heads = sums["heads"].mean()  # [L, H, d]
    # [N_val, L, H] similarity of each clean-validation head term to its prototype, per rule: what a per-head
    # calibrated threshold (defend.threshold: clean_quantile) is taken from
    val_sims = {"cosine": [], "dot": []}
    for _, chunk in iter_decomposition(clean_decomp_path, rows=val, with_mlps=False):
        for rule, out in val_sims.items():
            out.append(head_similarity(chunk.heads, heads, rule).astype(np.float32))
    arrays = {"heads": heads, "mlps": sums["mlps"].mean(),  # [L, d]
              "embed": sums["embed"].mean(), "bias": sums["bias"].mean(),
              "val_index": val.astype(np.int64), "test_index": test.astype(np.int64),
              "val_cosine": np.concatenate(val_sims["cosine"]), "val_dot": np.concatenate(val_sims["dot"])}
    meta = {"val_fraction": str(val_fraction), "split_seed": str(seed), "split": split, "source": str(clean_decomp_path),
            "checkpoint_sha256": source_meta.get("checkpoint_sha256", ""), "n_val": str(len(val)),
            "n_test": str(len(test))}
    save_safetensors(out_path, arrays, meta)
    return {"n_val": len(val), "n_test": len(test)}


def load_prototypes(path: str | Path) -> dict:
    return load_safetensors(path, "np", made_by="the prototypes stage")


def prototypes_stage(args, p: Params) -> None:
    """CLI stage ``prototypes``."""
    cfg = p.prototypes
    print(build_prototypes(args.decomp, args.out, cfg.val_fraction, cfg.split_seed, cfg.split))
