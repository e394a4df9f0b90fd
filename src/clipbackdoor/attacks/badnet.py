"""BadNet (Gu et al. 2017) in two variants.

- ``badnet``: one fixed pattern pasted at one fixed position (BackdoorBox style). The pattern is a seeded
  random RGB patch (or a black/white checkerboard), the same for every image.
- ``badnet_random``: the CleanCLIP "random" patch: for every image a fresh ``image_mean + randn(3, p, p)``
  patch (per-channel mean of that image) at a uniformly random position.
"""

from __future__ import annotations

import numpy as np
import torch

from clipbackdoor.attacks.base import Trigger, to_float, to_uint8


def patch_origin(location: str, image_size: int, patch: int) -> tuple[int, int]:
    """Top-left (row, col) of a patch of side ``patch`` at a named location."""
    far = image_size - patch
    return {"bottom_right": (far, far), "top_left": (0, 0), "top_right": (0, far), "bottom_left": (far, 0),
            "center": (far // 2, far // 2)}[location]


def paste(x: torch.Tensor, patch: torch.Tensor, origin: tuple[int, int]) -> torch.Tensor:
    """float images [N, 3, H, W] with ``patch`` [3, p, p] pasted at ``origin``; differentiable in the patch."""
    p, (r, c), (h, w) = patch.shape[-1], origin, x.shape[-2:]
    pad = (c, w - c - p, r, h - r - p)
    canvas = torch.nn.functional.pad(patch, pad)  # [3, H, W]
    mask = torch.nn.functional.pad(torch.ones(1, p, p, dtype=x.dtype, device=x.device), pad)  # [1, H, W]
    return x * (1 - mask) + canvas * mask


class BadNet(Trigger):
    kind = "local"

    def __init__(self, cfg: dict, image_size: int, seed: int):
        super().__init__(cfg, image_size, seed)
        p = int(cfg["patch_size"])
        if cfg["pattern"] == "checkerboard":
            yy, xx = np.mgrid[0:p, 0:p]
            pattern = np.repeat(((yy + xx) % 2).astype(np.float32)[None], 3, axis=0)
        else:  # a seeded random colour patch, fixed for the run
            pattern = np.random.default_rng([seed, 7]).random((3, p, p)).astype(np.float32)
        self.pattern = torch.from_numpy(pattern)  # [3, p, p] in [0, 1]
        self.origin = patch_origin(cfg["location"], image_size, p)

    def apply(self, images, rng):
        r, c = self.origin
        return to_uint8(paste(to_float(images), self.pattern, self.origin)), [{"row": r, "col": c}] * len(images)


class BadNetRandom(Trigger):
    kind = "local"
    uses_rng = True

    def apply(self, images, rng):
        x = to_float(images).clone()
        p = int(self.cfg["patch_size"])
        n, _, h, w = x.shape
        rows = rng.integers(0, h - p + 1, size=n)
        cols = rng.integers(0, w - p + 1, size=n)
        noise = torch.from_numpy(rng.standard_normal((n, 3, p, p)).astype(np.float32)).to(x.device)
        mean = x.mean(dim=(2, 3), keepdim=True)  # [N, 3, 1, 1] per-image channel means
        for i in range(n):
            x[i, :, rows[i]:rows[i] + p, cols[i]:cols[i] + p] = mean[i] + noise[i]
        return to_uint8(x), [{"row": int(r), "col": int(c)} for r, c in zip(rows, cols)]
