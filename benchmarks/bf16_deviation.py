"""How far bf16 autocast (what the stages use on CUDA) moves the decomposition from fp32, on the real ViT-B-32
architecture. Measured on the CPU with torch's bf16 autocast (the same bf16 rounding of every matmul input;
CUDA kernels accumulate differently, so treat the numbers as the order of magnitude): per-term relative error,
the embedding's cosine to fp32, and how many Decomp-Det head flags (dot rule, eps 0.0025 -- the paper's ImageNet
setting) flip. Weights: seeded random (no pretrained weights can be downloaded here) or --checkpoint FILE.

    python benchmarks/bf16_deviation.py [--images 32] [--model ViT-B-32] [--checkpoint FILE]

Prints a table and writes benchmarks/results/bf16_deviation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import clipbackdoor  # noqa: F401  (torchvision shim before open_clip)
from clipbackdoor.decomposition.stage import decompose_images
from clipbackdoor.models.artifact import create


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensor."""
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--checkpoint", default=None, help="an open_clip checkpoint file (default: seeded random weights)")
    p.add_argument("--out", default="benchmarks/results/bf16_deviation.json")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    loaded = create(a.model, pretrained=a.checkpoint)
    loaded.model.eval()
    rng = np.random.default_rng(0)
    size = loaded.image_size
    # smooth random images (a low-resolution pattern upsampled): closer to photos than i.i.d. pixel noise
    low = torch.from_numpy(rng.random((a.images, 3, size // 16, size // 16)).astype(np.float32))
    images = (torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear") * 255).round().to(torch.uint8)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = decompose_images(loaded, images, "reference", True, batch_size=16)
        t1 = time.perf_counter()
        bf = decompose_images(loaded, images, "reference", True, batch_size=16, bf16=True)
    t2 = time.perf_counter()
    last = ref.heads.shape[1] - 1
    proto = ref.heads[:, last].mean(0)  # [H, d] prototypes from the fp32 terms
    flags_ref = (ref.heads[:, last] * proto).sum(-1) <= 0.0025  # [N, H]
    flags_bf = (bf.heads[:, last] * proto).sum(-1) <= 0.0025
    cos = torch.nn.functional.cosine_similarity(bf.embedding, ref.embedding, dim=-1)
    result = {
        "model": a.model, "weights": a.checkpoint or "seeded random", "images": a.images,
        "heads_rel_err": rel(bf.heads, ref.heads), "mlps_rel_err": rel(bf.mlps, ref.mlps), "embed_term_rel_err": rel(bf.embed, ref.embed),
        "heads_max_abs_err": float((bf.heads - ref.heads).abs().max()),
        "heads_max_abs": float(ref.heads.abs().max()),
        "sum_of_terms_vs_embedding_fp32": float((ref.total() - ref.embedding).abs().max()),
        "sum_of_terms_vs_embedding_bf16": float((bf.total() - bf.embedding).abs().max()),
        "embed_cosine_min": float(cos.min()), "embed_cosine_mean": float(cos.mean()),
        "head_flag_flips": int((flags_ref != flags_bf).sum()), "head_flags": int(flags_ref.numel()),
        "fp32_s": round(t1 - t0, 2), "bf16_cpu_s": round(t2 - t1, 2),
        "command": "python benchmarks/bf16_deviation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    for k, v in result.items():
        print(f"{k:32} {v:.3g}" if isinstance(v, float) else f"{k:32} {v}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
