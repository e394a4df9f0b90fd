"""Stage ``issba_codec``: train ISSBA's StegaStamp-style encoder/decoder (``clipbackdoor.attacks.issba``) on the
fine-tuning images, then measure, on the evaluation images rounded to uint8 as a poisoned shard stores them,
how well the decoder reads back the attack's fixed secret (bit accuracy) and how visible the residual is
(PSNR). Writes both networks and the secret as safetensors, and a PNG of clean / encoded / residual images.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clipbackdoor.attacks.base import to_float, to_uint8
from clipbackdoor.attacks.issba import encode, evaluate_codec, secret_bits, train_codec
from clipbackdoor.config import Params
from clipbackdoor.io import save_figure, save_safetensors
from clipbackdoor.data.pairs import ShardPairs
from clipbackdoor.runtime import pick_device


def run_issba_codec(train_dir: str | Path, eval_dir: str | Path, out_path: str | Path, png_path: str | Path | None,
                    cfg: dict, image_size: int, seed: int) -> dict:
    # random access into the shards: training samples a batch per step, evaluation reads 256 images at a time
    train, ev = ShardPairs(train_dir, image_size), ShardPairs(eval_dir, image_size)
    encoder, decoder, history = train_codec(train, cfg, image_size, seed, pick_device(gpu=True))  # the rule's GPU
    encoder, decoder = encoder.cpu(), decoder.cpu()  # evaluated and saved on the host
    secret = secret_bits(int(cfg["bits"]), seed)
    metrics = {**evaluate_codec(encoder, decoder, ev, secret), "steps": history[-1]["step"],
               "train_bit_acc": history[-1]["bit_acc"]}
    tensors = {f"encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    tensors |= {f"decoder.{k}": v.contiguous() for k, v in decoder.state_dict().items()}
    tensors["secret"] = secret
    save_safetensors(out_path, tensors, {"config": json.dumps(cfg, sort_keys=True), "image_size": str(image_size),
                                         "seed": str(seed), "metrics": json.dumps(metrics),
                                         "history": json.dumps(history)})
    if png_path is not None:
        with torch.no_grad():
            x = to_float(ev[:6])
            stored = to_float(to_uint8(encode(encoder, x, secret.expand(len(x), -1))))
        save_codec_png(x, stored, metrics, png_path)
    return metrics


def save_codec_png(clean: torch.Tensor, encoded: torch.Tensor, metrics: dict, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(clean)
    fig, axes = plt.subplots(3, n, figsize=(n * 1.6, 5), squeeze=False)
    residual = (encoded - clean).abs()
    scale = float(residual.max().clamp_min(1e-6))
    for j in range(n):
        axes[0, j].imshow(clean[j].permute(1, 2, 0).numpy())
        axes[1, j].imshow(encoded[j].permute(1, 2, 0).numpy())
        axes[2, j].imshow((residual[j] / scale).permute(1, 2, 0).numpy())
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"ISSBA: clean / encoded / |residual| x{1 / scale:.0f} -- bit accuracy "
                 f"{metrics['bit_accuracy']:.3f}, PSNR {metrics['psnr_db']:.1f} dB", fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)


def issba_codec_stage(args, p: Params) -> None:
    """CLI stage ``issba-codec``."""
    import json

    from clipbackdoor.pipeline.runs import parse_run

    attack, seed = parse_run(args.run)
    print(json.dumps(run_issba_codec(args.finetune_dir, args.eval_dir, args.out, args.png, p.attacks[attack],
                                     p.data.image_size, seed)))
