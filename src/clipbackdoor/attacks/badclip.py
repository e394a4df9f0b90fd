"""BadCLIP (Liang et al. 2023): a patch optimised on the clean model, then used as a BadNet-style trigger.

The patch is optimised before poisoning (stage ``badclip_patch``) with dual-embedding guidance: patched
non-target images are pulled toward the target class's text embedding *and* toward the mean image
embedding of real target-class images (the second term makes the patch look like target-class visual
features, so the backdoor is learned as a natural feature). The patch is parameterised as
``sigmoid(logits)`` to stay in [0, 1], optimised with Adam under random crop / flip augmentation of the
patched images, and placed at a fixed location (the reference puts it in the middle). The trigger itself
pastes the stored patch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clipbackdoor.io import load_safetensors
from clipbackdoor.attacks.badnet import BadNet, paste, patch_origin
from clipbackdoor.attacks.base import Trigger, to_float
from clipbackdoor.errors import UserError
from clipbackdoor.logs import progress


class BadCLIP(Trigger):
    kind = "local"
    asset = "badclip_patch"  # the stage whose output this trigger needs

    def __init__(self, cfg: dict, image_size: int, seed: int, asset_path: str | Path | None = None):
        super().__init__(cfg, image_size, seed, asset_path)
        if asset_path is None or not Path(asset_path).exists():
            raise UserError(f"badclip: optimised patch {asset_path} not found",
                            fix="run the `badclip_patch` stage first (Snakemake/DVC do this for badclip runs)")
        self.pattern = load_safetensors(asset_path, made_by="the `badclip_patch` stage")["patch"].float()  # [3, p, p]
        if self.pattern.shape[-1] != int(cfg["patch_size"]):
            raise UserError(f"badclip: stored patch is {self.pattern.shape[-1]} px, attacks.badclip.patch_size is "
                            f"{cfg['patch_size']}", fix="rerun the `badclip_patch` stage")
        self.origin = patch_origin(cfg["location"], image_size, self.pattern.shape[-1])

    apply = BadNet.apply  # a fixed patch at a fixed place, like BadNet; only the patch is learned


def optimise_patch(encode, images: torch.Tensor, target_text: torch.Tensor, target_image: torch.Tensor,
                   cfg: dict, image_size: int, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """Optimise a patch on a frozen encoder.

    encode: float images in [0, 1] [B, 3, H, W] -> unit embeddings [B, d] (the clean image tower);
    images: uint8 non-target images [N, 3, H, W]; target_text / target_image: unit embeddings [d].
    Returns (patch [3, p, p] in [0, 1], history)."""
    from torchvision.transforms import v2

    gen = torch.Generator().manual_seed(seed)
    p = int(cfg["patch_size"])
    origin = patch_origin(cfg["location"], image_size, p)
    logits = torch.zeros(3, p, p).uniform_(-1, 1, generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=float(cfg["lr"]))
    augment = v2.Compose([v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True),
                          v2.RandomHorizontalFlip()])
    history = []
    for step in progress(range(int(cfg["steps"])), "badclip patch"):
        idx = torch.randint(len(images), (int(cfg["batch_size"]),), generator=gen)
        x = paste(to_float(images[idx]), torch.sigmoid(logits), origin)
        torch.manual_seed(seed * 100_003 + step)  # v2 transforms draw from the global generator
        emb = encode(torch.stack([augment(xi) for xi in x]))
        text_sim, image_sim = emb @ target_text, emb @ target_image
        loss = -(text_sim.mean() + float(cfg["image_weight"]) * image_sim.mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"step": step + 1, "loss": round(loss.item(), 6), "text_cos": round(text_sim.mean().item(), 6),
                        "image_cos": round(image_sim.mean().item(), 6)})
    return torch.sigmoid(logits).detach(), history


def target_image_embedding(embeddings: torch.Tensor) -> torch.Tensor:
    """Unit mean of unit image embeddings [N, d] -> [d]."""
    mean = torch.nn.functional.normalize(embeddings, dim=-1).mean(dim=0)
    return mean / mean.norm().clamp_min(1e-12)
