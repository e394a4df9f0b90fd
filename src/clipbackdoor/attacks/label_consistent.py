"""Label-Consistent (Turner et al. 2019), the variant of seed 001's code base: only pairs whose caption
already names the target class are poisoned, their captions are KEPT, and the BadNet patch is added to the
image. Optionally (``adv_eps > 0``) the selected images are first replaced by their adversarially perturbed
versions from the ``lc_adversarial`` stage (PGD against the clean model, making their content hard to fit, so
the model must rely on the trigger, as in the original attack). At evaluation the trigger is the patch alone.
"""

from __future__ import annotations

import torch

from clipbackdoor.attacks.badnet import BadNet
from clipbackdoor.errors import UserError


class LabelConsistent(BadNet):
    kind = "local"
    keeps_caption = True  # poison only target-class pairs and leave their captions unchanged

    def __init__(self, cfg: dict, image_size: int, seed: int, asset_path=None):
        super().__init__(cfg, image_size, seed)
        self.asset_path = asset_path

    @classmethod
    def poison_asset(cls, cfg: dict) -> str | None:
        return "lc_adversarial" if float(cfg.get("adv_eps", 0)) > 0 else None

    def prepare_poison(self, images, keys):
        if self.poison_asset(self.cfg) is None:
            return images
        from clipbackdoor.attacks.lc_adversarial import load_hard_images

        if self.asset_path is None:
            raise UserError("label_consistent: adv_eps > 0 needs the perturbed images of the `lc_adversarial` stage",
                            fix="run it first (Snakemake/DVC do this when adv_eps > 0) and pass --asset")
        hard = load_hard_images(self.asset_path)
        missing = [k for k in keys if k not in hard]
        if missing:
            raise UserError(f"label_consistent: {len(missing)} selected pairs (e.g. {missing[0]!r}) have no perturbed "
                            f"image in {self.asset_path}", fix="rerun the `lc_adversarial` stage on this data")
        return torch.stack([hard[k] for k in keys]) if keys else images
