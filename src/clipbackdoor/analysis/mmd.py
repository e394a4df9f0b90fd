"""Stage ``mmd``: maximum mean discrepancy between clean and triggered representations, per component.

Seed 001 (Figure 3 and Figure 8 d) measures how far a backdoor moves each component's output distribution.
Components: the summed direct term of each layer's heads (``L{l}_heads``), each layer's MLP term
(``L{l}_mlp``), and every head of every layer (``L{l}H{h}``: the layer x head map of ``head_map``), read from
the decomposition cache of the prototypes' test images. Statistic: unbiased MMD^2 with a Gaussian (RBF) kernel ``exp(-|x-y|^2 / (2 s^2))``,
the bandwidth ``s`` by the median heuristic (median pairwise distance of the pooled sample), per component;
both are written next to every value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from clipbackdoor.config import Params
from clipbackdoor.decomposition.cache import read_decomposition
from clipbackdoor.io import atomic_path


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    return np.maximum(d, 0.0)


def median_bandwidth(x: np.ndarray, y: np.ndarray) -> float:
    z = np.concatenate([x, y]).astype(np.float64)
    d = np.sqrt(_sq_dists(z, z)[np.triu_indices(len(z), k=1)])
    med = float(np.median(d))
    return med if med > 0 else 1.0


def rbf_mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> tuple[float, float]:
    """x [n, d], y [m, d] -> (unbiased MMD^2, bandwidth). ~0 for samples of one distribution."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    s = bandwidth or median_bandwidth(x, y)
    k = lambda a, b: np.exp(-_sq_dists(a, b) / (2 * s * s))  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    term_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(term_x + term_y - 2 * kxy.mean()), s


def component_mmd(clean_path: str | Path, triggered_path: str | Path, index: np.ndarray, max_images: int,
                  seed: int) -> pd.DataFrame:
    """One row per component: component, kind (heads | mlp | head), layer, head, mmd2, kernel, bandwidth."""
    rng = np.random.default_rng([seed, 8])
    rows_read = np.sort(rng.choice(index, size=min(max_images, len(index)), replace=False))
    # only the subsample is kept in memory (memory O(max_images)), read a chunk at a time
    clean, trig = read_decomposition(clean_path, rows=rows_read), read_decomposition(triggered_path, rows=rows_read)
    idx = np.arange(len(rows_read))
    n_layers, n_heads = clean.heads.shape[1:3]
    rows = []

    def add(name, kind, layer, head, a, b):
        mmd2, s = rbf_mmd2(a, b)
        rows.append({"component": name, "kind": kind, "layer": layer, "head": head, "mmd2": mmd2,
                     "kernel": "rbf", "bandwidth": s, "n_images": len(rows_read)})

    for l in range(n_layers):
        add(f"L{l}_heads", "heads", l, -1, clean.heads[idx, l].sum(1), trig.heads[idx, l].sum(1))
        add(f"L{l}_mlp", "mlp", l, -1, clean.mlps[idx, l], trig.mlps[idx, l])
    for l in range(n_layers):
        for h in range(n_heads):
            add(f"L{l}H{h}", "head", l, h, clean.heads[idx, l, h], trig.heads[idx, l, h])
    return pd.DataFrame(rows)


def run_mmd(clean_path, triggered_path, prototypes_path, out_csv: str | Path, max_images: int, seed: int) -> int:
    from clipbackdoor.decomposition.prototypes import load_prototypes

    test_index = np.asarray(load_prototypes(prototypes_path)["test_index"])
    df = component_mmd(clean_path, triggered_path, test_index, max_images, seed)
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return len(df)


def mmd_stage(args, p: Params) -> None:
    """CLI stage ``mmd``."""
    a = p.analysis
    print(f"{run_mmd(args.clean, args.triggered, args.prototypes, args.out, a.mmd_images, a.seed)} components")
