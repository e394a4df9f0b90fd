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

    def _draw(self, rng, n: int, h: int, w: int):
        """(rows [n], cols [n], noise [n, 3, p, p]) from one stream, in this order."""
        p = int(self.cfg["patch_size"])
        rows = rng.integers(0, h - p + 1, size=n)
        cols = rng.integers(0, w - p + 1, size=n)
        return rows, cols, rng.standard_normal((n, 3, p, p)).astype(np.float32)

    def _paste(self, images, rows, cols, noise) -> torch.Tensor:
        """Each image's ``mean + noise`` patch at its own (row, col), all images at once (advanced indexing)."""
        x = to_float(images).clone()
        n, p = len(x), noise.shape[-1]
        mean = x.mean(dim=(2, 3), keepdim=True)  # [N, 3, 1, 1] per-image channel means
        r = torch.as_tensor(rows[:, None] + np.arange(p), device=x.device)  # [N, p] patch rows of each image
        c = torch.as_tensor(cols[:, None] + np.arange(p), device=x.device)  # [N, p]
        at = (torch.arange(n, device=x.device)[:, None, None, None], torch.arange(3, device=x.device)[None, :, None, None],
              r[:, None, :, None], c[:, None, None, :])
        x[at] = mean + torch.from_numpy(noise).to(x.device)
        return to_uint8(x)

    def apply(self, images, rng):
        rows, cols, noise = self._draw(rng, len(images), *images.shape[-2:])
        return self._paste(images, rows, cols, noise), [{"row": int(r), "col": int(c)} for r, c in zip(rows, cols)]

    def apply_streams(self, images, rngs):
        # image i's draws from its own stream, exactly as apply(images[i:i+1], rngs[i]) makes them; one paste
        draws = [self._draw(rng, 1, *images.shape[-2:]) for rng in rngs]
        if not draws:
            return images
        rows, cols, noise = (np.concatenate(parts) for parts in zip(*draws))
        return self._paste(images, rows, cols, noise)
