"""Stage ``badclip_patch``: optimise BadCLIP's trigger patch on the clean model (before poisoning).

Target text embedding: the zero-shot class embedding of the target (normalised mean over templates). Target
image embedding: the unit mean of the clean model's embeddings of fine-tuning images whose caption names the
target. The patch is optimised on the other fine-tuning images (``clipbackdoor.attacks.badclip``); the stage
then measures how far the patch alone already fools the clean model (zero-shot ASR on the evaluation set) and
writes the patch as safetensors plus a PNG.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipbackdoor.attacks.attacker import attacker_view
from clipbackdoor.attacks.badclip import optimise_patch, target_image_embedding
from clipbackdoor.attacks.badnet import paste, patch_origin
from clipbackdoor.attacks.base import to_float, to_uint8
from clipbackdoor.config import Params
from clipbackdoor.errors import UserError
from clipbackdoor.io import save_figure, save_safetensors
from clipbackdoor.analysis.metrics import attack_success
from clipbackdoor.models.artifact import normalize
from clipbackdoor.attacks.poison import names_target as caption_names_target
from clipbackdoor.data.shards import iter_batches
from clipbackdoor.models.zeroshot import class_text_embeddings, image_embeddings, predict


def run_badclip_patch(model_dir: str | Path, train_dir: str | Path, eval_dir: str | Path, out_path: str | Path,
                      png_path: str | Path | None, cfg: dict, target: str, templates_kind: str, seed: int) -> dict:
    view = attacker_view(model_dir, train_dir, eval_dir, target, templates_kind)
    device, loaded, classes, target_idx, templates, split = (view.device, view.loaded, view.classes, view.target_idx,
                                                             view.templates, view.split)
    names_target = torch.tensor([caption_names_target(c, target) for c in split["captions"]])
    if not names_target.any() or names_target.all():
        raise UserError(f"badclip: {int(names_target.sum())} of {len(names_target)} fine-tuning captions name "
                        f"the target {target!r}; the patch needs target images and other images",
                        fix="check poison.target against the training captions")
    text = class_text_embeddings(loaded, [target], templates)[0].cpu()  # [d]
    pairs = split["images"]  # ShardPairs: the images below are decoded a batch at a time
    image = target_image_embedding(image_embeddings(loaded, pairs.select(np.flatnonzero(names_target.numpy()))))

    def encode(x):  # float [B, 3, H, W] in [0, 1] -> unit embeddings [B, d]
        emb = loaded.model.encode_image(normalize(x.to(device), loaded.mean, loaded.std))
        return F.normalize(emb, dim=-1).cpu()

    patch, history = optimise_patch(encode, pairs.select(np.flatnonzero(~names_target.numpy())), text, image, cfg,
                                    loaded.image_size, seed)

    # how much the patch alone moves the *clean* model: zero-shot ASR on the patched evaluation images, a batch at
    # a time (the first batch's images are kept for the preview)
    origin = patch_origin(cfg["location"], loaded.image_size, patch.shape[-1])
    preds, labels, preview = [], [], None
    with torch.no_grad():
        class_emb = class_text_embeddings(loaded, classes["classnames"], templates).cpu()
        for batch in iter_batches(eval_dir, 256, loaded.image_size):
            patched = to_uint8(paste(to_float(batch["images"]), patch, origin))
            preds.append(predict(image_embeddings(loaded, patched), class_emb).numpy())
            labels.append(batch["labels"].numpy())
            if preview is None:
                preview = (batch["images"][:4], patched[:4])
    if not preds:
        raise UserError(f"{eval_dir}: the evaluation set holds no images", fix="rerun the stage that writes it")
    asr, _ = attack_success(np.concatenate(preds), np.concatenate(labels), target_idx)
    metrics = {"clean_model_asr": asr, "final_text_cos": history[-1]["text_cos"],
               "final_image_cos": history[-1]["image_cos"], "steps": len(history),
               "n_target_images": int(names_target.sum())}
    save_safetensors(out_path, {"patch": patch}, {"metrics": json.dumps(metrics), "config": json.dumps(cfg, sort_keys=True),
                                               "target": target, "seed": str(seed),
                                               "base_sha256": loaded.checkpoint_sha256 or ""})
    if png_path is not None:
        save_patch_png(patch, *preview, metrics, png_path)
    return metrics


def save_patch_png(patch: torch.Tensor, clean: torch.Tensor, patched: torch.Tensor, metrics: dict, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 5, figsize=(9, 4))
    axes[0, 0].imshow(patch.permute(1, 2, 0).numpy(), interpolation="nearest")
    axes[0, 0].set_title("optimised patch", fontsize=8)
    axes[1, 0].text(0.0, 0.5, f"clean-model ASR\n{metrics['clean_model_asr']:.2f}\ntext cos "
                    f"{metrics['final_text_cos']:.2f}", fontsize=8)
    for j in range(4):
        axes[0, j + 1].imshow(clean[j].permute(1, 2, 0).numpy())
        axes[1, j + 1].imshow(patched[j].permute(1, 2, 0).numpy())
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("BadCLIP: optimised patch; evaluation images clean (top) and patched (bottom)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)


def badclip_patch_stage(args, p: Params) -> None:
    """CLI stage ``badclip-patch``."""
    import json

    from clipbackdoor.config import stage_target
    from clipbackdoor.pipeline.runs import parse_run

    attack, seed = parse_run(args.run)
    print(json.dumps(run_badclip_patch(args.model, args.finetune_dir, args.eval_dir, args.out, args.png,
                                       p.attacks[attack], stage_target(p), p.zeroshot.templates, seed)))
