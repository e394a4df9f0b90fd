"""SIG (Barni et al. 2019; CleanCLIP's code): a horizontal sinusoid ``delta * sin(2*pi*f*j/W)`` added to
every row and channel, ``delta = 60/255``, ``f = 6``."""

from __future__ import annotations

import math

import torch

from clipbackdoor.attacks.base import Trigger, to_float, to_uint8


class SIG(Trigger):
    kind = "global"

    def __init__(self, cfg: dict, image_size: int, seed: int):
        super().__init__(cfg, image_size, seed)
        j = torch.arange(image_size, dtype=torch.float32)
        signal = float(cfg["delta"]) * torch.sin(2 * math.pi * float(cfg["frequency"]) * j / image_size)
        self.signal = signal.view(1, 1, 1, image_size)  # broadcast over batch, channels, rows

    def apply(self, images, rng):
        return to_uint8(to_float(images) + self.signal), [{} for _ in range(len(images))]
