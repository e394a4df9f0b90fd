"""WaNet (Nguyen & Tran 2021): a smooth, fixed warping field. A k x k grid of uniform noise in [-1, 1],
normalised by its mean absolute value, is upsampled (bicubic) to the image size and scaled by ``s / H``; the
triggered image is the input resampled at ``identity + field`` (``grid_sample``). The noise is drawn once
per run from the seed, so the same warp is used for poisoning and for evaluation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clipbackdoor.attacks.base import Trigger, to_float, to_uint8


class WaNet(Trigger):
    kind = "global"

    def __init__(self, cfg: dict, image_size: int, seed: int):
        super().__init__(cfg, image_size, seed)
        k, s = int(cfg["k"]), float(cfg["s"])
        noise = torch.from_numpy(np.random.default_rng([seed, 13]).uniform(-1, 1, (1, 2, k, k)).astype(np.float32))
        noise = noise / noise.abs().mean()
        field = F.interpolate(noise, size=(image_size, image_size), mode="bicubic", align_corners=True)
        field = field.permute(0, 2, 3, 1)  # [1, H, W, 2]
        lin = torch.linspace(-1, 1, image_size)
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        identity = torch.stack([xx, yy], dim=-1)[None]  # [1, H, W, 2] (x, y) as grid_sample expects
        self.grid = (identity + s * field / image_size).clamp(-1, 1)

    def apply(self, images, rng):
        x = to_float(images)
        warped = F.grid_sample(x, self.grid.expand(len(x), -1, -1, -1), mode="bilinear", align_corners=True)
        return to_uint8(warped), [{} for _ in range(len(x))]
