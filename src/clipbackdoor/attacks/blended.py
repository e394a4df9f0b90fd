"""Blended (Chen et al. 2017): ``alpha * pattern + (1 - alpha) * image`` over the whole image.

The pattern is ``rand(3, H, W)`` drawn once per run from the seed (the CleanCLIP choice), or a smooth
seeded pattern (``pattern: smooth``) standing in for an image such as Hello Kitty."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clipbackdoor.attacks.base import Trigger, to_float, to_uint8


class Blended(Trigger):
    kind = "global"

    def __init__(self, cfg: dict, image_size: int, seed: int):
        super().__init__(cfg, image_size, seed)
        rng = np.random.default_rng([seed, 11])
        if cfg["pattern"] == "noise":
            pattern = torch.from_numpy(rng.random((3, image_size, image_size)).astype(np.float32))
        else:
            coarse = torch.from_numpy(rng.random((1, 3, 4, 4)).astype(np.float32))
            pattern = F.interpolate(coarse, size=(image_size, image_size), mode="bicubic", align_corners=False)[0]
        self.pattern = pattern.clamp(0, 1)  # [3, H, W]
        self.alpha = float(cfg["alpha"])

    def apply(self, images, rng):
        x = to_float(images)
        return to_uint8(self.alpha * self.pattern + (1 - self.alpha) * x), [{} for _ in range(len(x))]
