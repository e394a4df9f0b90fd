"""Stage ``cleanclip``: CleanCLIP (Bansal et al. 2023) repair of a backdoored CLIP on clean pairs.

Loss = ``crossmodal_weight`` * CLIP contrastive loss (image <-> caption)
     + ``inmodal_weight`` * in-modal self-supervised loss, the mean of two InfoNCE terms with the same logit
       scale: image vs its augmented view (torchvision AutoAugment, per image) and caption vs its EDA-augmented
       copy (``clipbackdoor.defenses.eda``, drawn once per caption from the seed, as CleanCLIP's dataset does).
Reference defaults: both weights 1, EDA alpha 0.1, AutoAugment; lr 1e-5, bs 64, 10 epochs on 100K clean CC3M
pairs (configs/paper.yaml). The embedded profile repairs on the world's clean fine-tuning pairs. The result is a
model artifact like any other, so decompose -> prototypes -> defend -> metrics run on it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from clipbackdoor.config import CleanCLIPConfig, Params
from clipbackdoor.defenses.eda import eda_captions, synonym_source
from clipbackdoor.models.artifact import LoadedModel, normalize
from clipbackdoor.runtime import pick_device
from clipbackdoor.training.train import LossFn, info_nce, load_training_pairs, save_trained, train_clip


def image_augmenter(kind: str):
    """uint8 [B, 3, H, W] -> uint8 [B, 3, H, W], an independent policy draw per image (global torch RNG,
    which train_clip seeds and checkpoints)."""
    if kind == "none":
        return lambda x: x
    from torchvision.transforms import v2

    policy = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    return lambda x: torch.stack([policy(xi) for xi in x])


def cleanclip_loss_fn(aug_tokens: torch.Tensor, cfg: CleanCLIPConfig) -> LossFn:
    """aug_tokens [N, ctx]: the EDA copy of every caption, indexed by the batch indices."""
    augment = image_augmenter(cfg.augment)

    def fn(loaded: LoadedModel, images: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        model = loaded.model
        both = torch.cat([images, augment(images.cpu()).to(images.device)])  # [2B, 3, H, W]
        img = F.normalize(model.encode_image(normalize(both, loaded.mean, loaded.std)), dim=-1)
        txt = F.normalize(model.encode_text(torch.cat([tokens, aug_tokens[idx].to(tokens.device)])), dim=-1)
        scale = model.logit_scale.exp()
        b = len(images)
        crossmodal = info_nce(img[:b], txt[:b], scale)
        inmodal = (info_nce(img[:b], img[b:], scale) + info_nce(txt[:b], txt[b:], scale)) / 2
        return cfg.crossmodal_weight * crossmodal + cfg.inmodal_weight * inmodal

    return fn


def run_cleanclip(model_dir: str | Path, clean_dir: str | Path, out_dir: str | Path, cfg: CleanCLIPConfig, seed: int,
                  ckpt_dir: str | Path | None = None, stage: str = "cleanclip") -> dict:
    device = pick_device(gpu=True)
    loaded, split, tokens = load_training_pairs(model_dir, clean_dir, device, cfg.n_pairs)
    augmented = eda_captions(split["captions"], seed, cfg.eda_alpha, synonym_source(cfg.synonyms))
    aug_tokens = loaded.tokenizer(augmented)
    history = train_clip(loaded, split["images"], tokens, cfg.optim, seed, ckpt_dir=ckpt_dir,
                         ckpt_every=cfg.optim.ckpt_every, loss_fn=cleanclip_loss_fn(aug_tokens, cfg),
                         fp_extra=[stage, loaded.checkpoint_sha256, repr(cfg)], desc=stage)
    return save_trained(loaded, out_dir, history, len(tokens), stage, model_dir, seed,
                        eda_example=[split["captions"][0], augmented[0]])


def cleanclip_stage(args, p: Params) -> None:
    """CLI stage ``cleanclip``: the backdoored model RUN repaired on the defender's clean pairs."""
    import json

    from clipbackdoor.pipeline.runs import parse_run

    _, seed = parse_run(args.run)
    print(json.dumps(run_cleanclip(args.model, args.clean_dir, args.out, p.cleanclip, seed, args.ckpt_dir,
                                   f"cleanclip-{args.run}")))
