"""A toy attack: a solid square of one grey level in the top-left corner (a BadNet with a flat patch)."""

import torch

from clipbackdoor.attacks.base import Trigger
from clipbackdoor.extensions import Attack


class CornerSquare(Trigger):
    kind = "local"  # a patch: Decomp-Rep's automatic mode repairs heads

    def apply(self, images, rng):
        out = images.clone()
        size = self.cfg["size"]
        out[:, :, :size, :size] = torch.tensor(self.cfg["level"], dtype=torch.uint8)
        return out, [{"size": size} for _ in range(len(images))]


ATTACK = Attack(
    name="toy_corner",
    trigger=CornerSquare,
    title="Toy corner",
    schema={"type": "object", "additionalProperties": False, "required": ["size", "level"],
            "properties": {"size": {"type": "integer", "minimum": 1},
                           "level": {"type": "integer", "minimum": 0, "maximum": 255}}},
)
