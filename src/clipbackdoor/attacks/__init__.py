"""Attack registry. An attack is one module defining a :class:`Trigger` subclass, plus one entry in ``BUILTIN``
here -- or, from outside the package, one :class:`clipbackdoor.extensions.Attack` registered by an entry point
(``REGISTRY`` holds both).

A trigger maps clean uint8 images [N, 3, H, W] to triggered ones and records, per image, the parameters it
used (patch position, ...), so the poison manifest says exactly what happened to each sample.
``kind`` is "local" (patch-like: the paper repairs attention heads) or "global" (whole-image: the paper
mean-ablates late MLPs); Decomp-Rep's automatic mode (Algorithm 1) follows it.
"""

from __future__ import annotations

from collections.abc import Mapping

from clipbackdoor.attacks.base import Trigger
from clipbackdoor.attacks.badclip import BadCLIP
from clipbackdoor.attacks.badnet import BadNet, BadNetRandom
from clipbackdoor.attacks.blended import Blended
from clipbackdoor.attacks.issba import ISSBA
from clipbackdoor.attacks.label_consistent import LabelConsistent
from clipbackdoor.attacks.sig import SIG
from clipbackdoor.attacks.wanet import WaNet
from clipbackdoor.pipeline.runs import parse_run, run_name, target_slug  # noqa: F401  (re-exported)

BUILTIN: dict[str, type[Trigger]] = {
    "badnet": BadNet,
    "badnet_random": BadNetRandom,
    "blended": Blended,
    "sig": SIG,
    "wanet": WaNet,
    "label_consistent": LabelConsistent,
    "badclip": BadCLIP,
    "issba": ISSBA,
}


class _Registry(Mapping):
    """{attack name: Trigger class}: the built-in attacks, then the extensions' (looked up on first use, so
    importing this package loads no outside code)."""

    def _all(self) -> dict[str, type[Trigger]]:
        from clipbackdoor.extensions import Attack, check_unique, of_kind

        check_unique(Attack, BUILTIN)
        return {**BUILTIN, **{name: ext.trigger for name, ext in of_kind(Attack).items()}}

    def __getitem__(self, name: str) -> type[Trigger]:
        return BUILTIN[name] if name in BUILTIN else self._all()[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


REGISTRY: Mapping[str, type[Trigger]] = _Registry()


def make_trigger(name: str, cfg: dict, image_size: int, seed: int, asset_path=None) -> Trigger:
    """``asset_path``: the output of the attack's own stage (e.g. BadCLIP's optimised patch), if it has one."""
    if name not in REGISTRY:
        from clipbackdoor.errors import UserError

        raise UserError(f"unknown attack {name!r}", fix=f"available: {', '.join(REGISTRY)}")
    if REGISTRY[name].asset is None and REGISTRY[name].poison_asset(cfg) is None:
        return REGISTRY[name](cfg, image_size, seed)
    return REGISTRY[name](cfg, image_size, seed, asset_path)


def trigger_eval_images(trigger: Trigger, images, index, seed: int):
    """The triggered copy of evaluation images uint8 [B, 3, H, W] found at split positions ``index`` [B]: the
    poisoning trigger, applied per batch. A trigger that draws per-image parameters draws image i's from its own
    stream ``[seed, 3, i]``, so a batch, a subset (the detectors' images) or the whole split give each image the
    same trigger."""
    import numpy as np

    if not trigger.uses_rng:
        return trigger.apply(images, np.random.default_rng([seed, 3]))[0]
    return trigger.apply_streams(images, [np.random.default_rng([seed, 3, int(i)]) for i in index])
