"""The trigger interface every attack implements."""

from __future__ import annotations

import numpy as np
import torch


class Trigger:
    """Adds a backdoor trigger to uint8 images. Deterministic given (config, seed, call order)."""

    kind: str = "local"  # "local" (patch-like) or "global" (whole-image perturbation)
    keeps_caption: bool = False  # label-consistent attacks poison target-class pairs and keep their captions
    asset: str | None = None  # the stage whose output (a learned trigger) this attack needs, if any
    uses_rng: bool = False  # draws per-image parameters from ``apply``'s generator (e.g. a random patch position)

    @classmethod
    def poison_asset(cls, cfg: dict) -> str | None:
        """The stage whose output poisoning needs (the trigger's asset, or a poisoning-only one)."""
        return cls.asset

    def __init__(self, cfg: dict, image_size: int, seed: int, asset_path=None):
        self.cfg = dict(cfg)
        self.image_size = image_size
        self.seed = seed
        self.asset_path = asset_path

    def apply(self, images: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, list[dict]]:
        """images uint8 [N, 3, H, W] -> (triggered uint8 [N, 3, H, W], per-image trigger parameters)."""
        raise NotImplementedError

    def apply_streams(self, images: torch.Tensor, rngs: list[np.random.Generator]) -> torch.Tensor:
        """images uint8 [N, 3, H, W], image i's parameters drawn from ``rngs[i]`` -> triggered uint8: equal to
        applying the trigger image by image, each with its own stream (a trigger that draws per-image parameters
        overrides this to apply the batch at once)."""
        if not len(images):
            return images
        return torch.cat([self.apply(images[i:i + 1], rng)[0] for i, rng in enumerate(rngs)])

    def to(self, device) -> "Trigger":
        """This trigger with its tensors and networks (pattern, warping grid, ISSBA's encoder) on ``device``, so
        evaluation batches are triggered where the model runs, not on the host. Returns self."""
        for name, value in vars(self).items():
            if torch.is_tensor(value) or isinstance(value, torch.nn.Module):
                setattr(self, name, value.to(device))
        return self

    def prepare_poison(self, images: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """Poisoning-time change to the selected images before the trigger (none by default)."""
        return images

    def describe(self) -> dict:
        """Run-level trigger parameters (recorded in the manifest metadata)."""
        return {"kind": self.kind, **self.cfg, **({"asset": str(self.asset_path)} if self.asset_path else {})}


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
