"""Stage ``roclip``: RoCLIP (Yang et al. 2023) as a training-time defense: the backdoor fine-tune on the
poisoned pairs, but every ``k_epochs``-th epoch each image is paired not with its own caption but with its
nearest neighbour, by the current model's image-text cosine, in a text memory bank: ``bank_size`` captions of
the training set, drawn afresh (seeded) for every such epoch. A poisoned image's target caption then has to
win against the whole bank to be learned. The other epochs train normally. The model is written as
``data/models/<run>.roclip`` and scored like every other model (seed 002 compares it with CleanCLIP and ABD).

Resume: the nearest neighbours are computed with the model at the first step of a replacement epoch; a run
resumed in the middle of one recomputes them with the resumed weights (bit-identical resume therefore needs
``ckpt_every`` to be a multiple of the steps per epoch).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from clipbackdoor.config import Params, RoCLIPConfig
from clipbackdoor.models.artifact import LoadedModel, normalize
from clipbackdoor.runtime import pick_device
from clipbackdoor.training.train import clip_loss_fn, load_training_pairs, save_trained, train_clip


def nearest_in_bank(image_emb: torch.Tensor, bank_emb: torch.Tensor) -> torch.Tensor:
    """Unit image embeddings [N, d], unit bank text embeddings [M, d] -> index of each image's nearest bank
    caption [N] (cosine)."""
    return (image_emb @ bank_emb.T).argmax(dim=-1)


class RoCLIPLoss:
    """CLIP loss whose caption tokens are replaced by memory-bank nearest neighbours every k-th epoch."""

    def __init__(self, images: torch.Tensor, tokens: torch.Tensor, cfg: RoCLIPConfig, seed: int):
        self.images, self.tokens, self.cfg, self.seed = images, tokens, cfg, seed
        self.steps_per_epoch = max(1, len(images) // cfg.optim.batch_size)
        self.clip = clip_loss_fn()
        self.replaced: torch.Tensor | None = None  # [N, ctx] tokens of this replacement epoch
        self.epoch_of_table = -1
        self.n_replacements = 0

    def replacement_epoch(self, epoch: int) -> bool:
        return (epoch + 1) % self.cfg.k_epochs == 0

    def begin_step(self, loaded: LoadedModel, step: int) -> None:
        epoch = step // self.steps_per_epoch
        if not self.replacement_epoch(epoch):
            self.replaced = None
        elif self.epoch_of_table != epoch:
            self.replaced = self.neighbour_tokens(loaded, epoch)
            self.epoch_of_table = epoch
            self.n_replacements += 1

    @torch.no_grad()
    def neighbour_tokens(self, loaded: LoadedModel, epoch: int) -> torch.Tensor:
        model = loaded.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 7)
        bank = torch.randperm(len(self.tokens), generator=gen)[: self.cfg.bank_size]
        text = torch.cat([F.normalize(model.encode_text(self.tokens[bank[i:i + 512]].to(device)), dim=-1)
                          for i in range(0, len(bank), 512)])
        nearest = []
        for i in range(0, len(self.images), 512):
            x = normalize(self.images[i:i + 512].to(device), loaded.mean, loaded.std)
            nearest.append(bank[nearest_in_bank(F.normalize(model.encode_image(x), dim=-1), text).cpu()])
        model.train(was_training)
        return self.tokens[torch.cat(nearest)]

    def __call__(self, loaded, images, tokens, idx):
        if self.replaced is not None:
            tokens = self.replaced[idx].to(tokens.device)
        return self.clip(loaded, images, tokens, idx)


def run_roclip(model_dir: str | Path, poisoned_dir: str | Path, out_dir: str | Path, cfg: RoCLIPConfig, seed: int,
               ckpt_dir: str | Path | None = None, stage: str = "roclip") -> dict:
    device = pick_device(gpu=True)
    loaded, split, tokens = load_training_pairs(model_dir, poisoned_dir, device)
    loss = RoCLIPLoss(split["images"], tokens, cfg, seed)
    history = train_clip(loaded, split["images"], tokens, cfg.optim, seed, ckpt_dir=ckpt_dir,
                         ckpt_every=cfg.optim.ckpt_every, loss_fn=loss,
                         fp_extra=[stage, loaded.checkpoint_sha256, repr(cfg)], desc=stage)
    return save_trained(loaded, out_dir, history, len(tokens), stage, model_dir, seed,
                        replacement_epochs=loss.n_replacements)


def roclip_stage(args, p: Params) -> None:
    """CLI stage ``roclip``: the clean model trained on RUN's poisoned pairs with RoCLIP."""
    import json

    from clipbackdoor.pipeline.runs import parse_run

    _, seed = parse_run(args.run)
    print(json.dumps(run_roclip(args.model, args.train, args.out, p.roclip, seed, args.ckpt_dir, f"roclip-{args.run}")))
