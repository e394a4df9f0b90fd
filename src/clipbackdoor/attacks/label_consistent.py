"""Label-Consistent (Turner et al. 2019), the variant of seed 001's code base: only pairs whose caption
already names the target class are poisoned, their captions are KEPT, and the BadNet patch is added to the
image. The original attack also makes those images harder (adversarial perturbation or GAN interpolation)
so the model must rely on the trigger; that step is not implemented here (documented in the README)."""

from __future__ import annotations

from clipbackdoor.attacks.badnet import BadNet


class LabelConsistent(BadNet):
    kind = "local"
    keeps_caption = True  # poison only target-class pairs and leave their captions unchanged
