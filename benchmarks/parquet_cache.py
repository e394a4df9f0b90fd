"""Parquet decomposition cache: size vs raw fp16, write/read throughput, last-layer partial read.

    python benchmarks/parquet_cache.py [--images 10000]

Prints a table and writes benchmarks/results/parquet_cache.json. Shapes: the tiny model (6 layers x 8 heads,
d=128) and ViT-B-32 (12 x 12, d=512).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clipbackdoor.decomposition.cache import read_decomposition, write_decomposition
from clipbackdoor.decomposition.decompose import Decomposition


def synthetic(n, layers, heads, dim):
    g = torch.Generator().manual_seed(0)
    return Decomposition(embed=torch.randn(n, dim, generator=g), heads=torch.randn(n, layers, heads, dim, generator=g),
                         mlps=torch.randn(n, layers, dim, generator=g), bias=torch.randn(n, dim, generator=g),
                         embedding=torch.randn(n, dim, generator=g), norm=torch.rand(n, generator=g))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000, help="images for the tiny shape")
    ap.add_argument("--images-b32", type=int, default=2_000, help="images for the ViT-B-32 shape (1.6 MB each)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "parquet_cache.json"))
    args = ap.parse_args()
    rows = []
    for name, layers, heads, dim, n in (("tiny", 6, 8, 128, args.images), ("ViT-B-32", 12, 12, 512, args.images_b32)):
        d = synthetic(n, layers, heads, dim)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "d.parquet"
            t0 = time.perf_counter()
            write_decomposition(path, [f"eval-{i:07d}" for i in range(n)], np.zeros(n), False, d, {"model": name})
            t_write = time.perf_counter() - t0
            t0 = time.perf_counter()
            read_decomposition(path)
            t_read = time.perf_counter() - t0
            t0 = time.perf_counter()
            read_decomposition(path, layers=[-1], with_mlps=False)
            t_last = time.perf_counter() - t0
            size = path.stat().st_size
        raw = (layers * heads + layers + 3) * dim * 2 * n  # fp16 bytes of every component vector
        rows.append({"shape": name, "images": n, "bytes_per_image": size / n, "raw_fp16_bytes_per_image": raw / n,
                     "size_vs_raw": size / raw, "write_img_per_s": n / t_write, "read_img_per_s": n / t_read,
                     "last_layer_heads_seconds": t_last})
    print(f"{'shape':10} {'images':>7} {'B/img':>9} {'raw B/img':>10} {'ratio':>6} {'write/s':>9} {'read/s':>9} {'last-layer s':>13}")
    for r in rows:
        print(f"{r['shape']:10} {r['images']:7d} {r['bytes_per_image']:9.0f} {r['raw_fp16_bytes_per_image']:10.0f} "
              f"{r['size_vs_raw']:6.3f} {r['write_img_per_s']:9.0f} {r['read_img_per_s']:9.0f} {r['last_layer_heads_seconds']:13.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
