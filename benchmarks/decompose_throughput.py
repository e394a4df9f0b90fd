"""Decomposition throughput vs plain ``encode_image`` and vs a reference-style decomposition.

The reference style (clip_text_span ``prs_hook.py``) materialises every layer's per-(token, head) terms,
[batch, tokens, heads, width], and pushes each through the linearised ln_post and the projection before
summing over tokens. clipbackdoor projects only the CLS row of each head's output. All three run side by
side, same model, batch and threads; the reference's token-summed terms are checked against ours.

    python benchmarks/decompose_throughput.py [--threads 2] [--batch 32] [--repeats 5]

Prints a table and writes benchmarks/results/decompose_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import clipbackdoor  # noqa: F401  (torchvision compat)
from clipbackdoor.decomposition.decompose import decompose
from clipbackdoor.models.artifact import create


@torch.no_grad()
def reference_style(visual, images):
    """Per-(token, head) terms for every layer, each mapped to the joint space, then summed over tokens."""
    x = visual._embeds(images)
    per_layer, mlps = [], []
    for blk in visual.transformer.resblocks:
        attn = blk.attn
        b, t, w = x.shape
        nh = attn.num_heads
        hd = w // nh
        q, k, v = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, nh, hd).transpose(1, 2) for z in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, dim=-1)  # [B, H, T, T]
        w_o = attn.out_proj.weight.T.reshape(nh, hd, w)  # [H, hd, W]
        # [B, H, T(source), hd] weighted values at the CLS query -> [B, T, H, W] materialised
        contrib = torch.einsum("bhs,bhsd,hdw->bshw", weights[:, :, 0], v, w_o)
        contrib = contrib + attn.out_proj.bias / (t * nh)  # bias split over tokens x heads
        per_layer.append(contrib)
        out = F.linear((weights @ v).transpose(1, 2).reshape(b, t, w), attn.out_proj.weight, attn.out_proj.bias)
        x = x + out
        m = blk.mlp(blk.ln_2(x))
        mlps.append(m[:, 0])
        x = x + m
    z = x[:, 0]
    ln = visual.ln_post
    mu, sigma = z.mean(-1, keepdim=True), torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + ln.eps)
    n_layers = len(per_layer)
    k_terms = 2 * n_layers + 1
    heads = []
    for c in per_layer:  # [B, T, H, W] -> joint space [B, T, H, d], then sum over tokens
        t, nh = c.shape[1], c.shape[2]
        share = (t * nh * k_terms)
        mapped = (ln.weight * (c - mu[:, None, None] / share) / sigma[:, None, None] + ln.bias / share) @ visual.proj
        heads.append(mapped.sum(dim=1))
    return torch.stack(heads, dim=1)  # [B, L, H, d]


def timeit(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "decompose_throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, size in (("clipbackdoor-tiny-vit-p8", 32), ("ViT-B-32", 224)):
        torch.manual_seed(0)
        visual = create(name).model.visual.eval()
        x = torch.randn(args.batch, 3, size, size)
        ours = decompose(visual, x, normalize=False)
        ref = reference_style(visual, x)
        max_err = float(((ours.heads - ref).abs().max() / ours.heads.abs().max()))
        t_plain = timeit(lambda: visual(x), args.repeats)
        t_ours = timeit(lambda: decompose(visual, x), args.repeats)
        t_ref = timeit(lambda: reference_style(visual, x), args.repeats)
        rows.append({"model": name, "batch": args.batch, "threads": args.threads,
                     "plain_img_per_s": args.batch / t_plain, "decompose_img_per_s": args.batch / t_ours,
                     "reference_img_per_s": args.batch / t_ref, "decompose_vs_plain": t_plain / t_ours,
                     "reference_vs_plain": t_plain / t_ref, "decompose_vs_reference": t_ref / t_ours,
                     "max_rel_err_vs_reference": max_err})
    header = f"{'model':26} {'plain/s':>9} {'ours/s':>9} {'ref/s':>9} {'ours/plain':>10} {'ours/ref':>9} {'max err':>9}"
    print(header)
    for r in rows:
        print(f"{r['model']:26} {r['plain_img_per_s']:9.1f} {r['decompose_img_per_s']:9.1f} "
              f"{r['reference_img_per_s']:9.1f} {r['decompose_vs_plain']:10.2f} {r['decompose_vs_reference']:9.2f} "
              f"{r['max_rel_err_vs_reference']:9.1e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
