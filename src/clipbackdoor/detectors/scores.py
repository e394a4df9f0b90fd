"""Input-level backdoor detectors compared with Decomp-Det (seed 001, Table 2): STRIP, SCALE-UP, TeCo.

Each scores images with a classifier ``proba``: float images in [0, 1] [B, 3, H, W] -> class probabilities
[B, C] (for CLIP: zero-shot over the class prompts; the CLIP normalisation is applied inside, so pixel-space
operations such as scaling happen before it, "undone and redone" as SCALE-UP on CLIP requires).
Every score follows one convention: HIGHER = MORE SUSPICIOUS, so AUROC (clean = 0, triggered = 1) reads the
same for all detectors.

- STRIP (Gao et al. 2019): superimpose ``n`` held-out clean images (pixel sum, saturating, as cv2.addWeighted
  with weights 1 and 1 in the reference), score = minus the mean prediction entropy (a backdoor keeps the
  target whatever is superimposed: low entropy).
- SCALE-UP (Guo et al. 2023): pixel values scaled by h = 2..11 and clamped to [0, 1]; score = SPC, the share of
  scales whose prediction equals the unscaled one.
- TeCo (Liu et al. 2023): for each of the 15 ``imagecorruptions`` corruptions, the first severity 1..5 at which
  the prediction leaves the clean prediction (6 if never); score = standard deviation over corruptions.
  ``independent``: every severity corrupts the original image (the paper). ``compounding``: severity s corrupts
  the output of severity s-1, which is what both public implementations do by corrupting in place.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from clipbackdoor.extensions import Detector, check_unique, of_kind

ProbaFn = Callable[[torch.Tensor], torch.Tensor]
TECO_SEVERITIES = (1, 2, 3, 4, 5)
SCALEUP_SCALES = tuple(range(2, 12))


def _batched(proba: ProbaFn, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([proba(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else proba(x)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1)


@torch.no_grad()
def strip_scores(proba: ProbaFn, images: torch.Tensor, pool: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """images [N, 3, H, W] float in [0, 1], pool [M, 3, H, W] (float in [0, 1], or uint8: kept 4x smaller and
    converted n partners at a time) -> scores [N] (minus mean entropy)."""
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for x in images:
        partners = pool[torch.randint(len(pool), (n,), generator=gen)]
        partners = partners.float() / 255 if partners.dtype == torch.uint8 else partners
        blended = (x[None] + partners).clamp(0, 1)  # [n, 3, H, W]
        scores.append(-float(entropy(_batched(proba, blended)).mean()))
    return np.asarray(scores)


@torch.no_grad()
def scaleup_scores(proba: ProbaFn, images: torch.Tensor, scales=SCALEUP_SCALES) -> np.ndarray:
    """images [N, 3, H, W] float in [0, 1] -> SPC [N] in [0, 1]."""
    base = _batched(proba, images).argmax(-1)
    same = torch.stack([_batched(proba, (h * images).clamp(0, 1)).argmax(-1) == base for h in scales])  # [S, N]
    return same.float().mean(0).numpy()


def corrupt_batch(images_u8: np.ndarray, name: str, severity: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint8 [N, H, W, 3] through ``imagecorruptions``."""
    from clipbackdoor.compat import import_imagecorruptions

    ic = import_imagecorruptions()
    return np.stack([np.asarray(ic.corrupt(img, corruption_name=name, severity=severity), dtype=np.uint8)
                     .reshape(img.shape) for img in images_u8])


def corruption_names() -> list[str]:
    from clipbackdoor.compat import import_imagecorruptions

    return list(import_imagecorruptions().get_corruption_names("common"))


@torch.no_grad()
def teco_scores(proba: ProbaFn, images: torch.Tensor, compounding: bool, seed: int,
                names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """images [N, 3, H, W] float in [0, 1] -> (scores [N], first-flip severities [N, n_corruptions])."""
    names = names or corruption_names()
    u8 = (images.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)  # [N, H, W, 3]
    base = _batched(proba, images).argmax(-1).numpy()
    first = np.full((len(images), len(names)), len(TECO_SEVERITIES) + 1)
    for c, name in enumerate(names):
        np.random.seed(seed * 1000 + c)  # imagecorruptions draws its noise from NumPy's global generator
        current = u8
        for s in TECO_SEVERITIES:
            current = corrupt_batch(current if compounding else u8, name, s)
            x = torch.from_numpy(current).permute(0, 3, 1, 2).float() / 255
            flipped = _batched(proba, x).argmax(-1).numpy() != base
            first[:, c] = np.where(flipped & (first[:, c] > s), s, first[:, c])
    return first.std(axis=1), first


# The built-in detectors, in the detect stage's order; each reads its settings from the ``detect`` section.
BUILTIN = (
    Detector("strip", lambda proba, images, pool, detect, params: [
        (f"n={detect.strip_n}", strip_scores(proba, images, pool, detect.strip_n, detect.seed))], title="STRIP"),
    Detector("scaleup", lambda proba, images, pool, detect, params: [
        (f"scales={SCALEUP_SCALES[0]}..{SCALEUP_SCALES[-1]}", scaleup_scores(proba, images))], title="SCALE-UP"),
    Detector("teco", lambda proba, images, pool, detect, params: [
        (v, teco_scores(proba, images, v == "compounding", detect.seed)[0]) for v in detect.teco_variants],
        title="TeCo"),
)


def registry() -> dict[str, Detector]:
    """{name: detector}: the built-in ones, then the extensions' (:mod:`clipbackdoor.extensions`)."""
    builtin = {d.name: d for d in BUILTIN}
    check_unique(Detector, builtin)
    return {**builtin, **of_kind(Detector)}
