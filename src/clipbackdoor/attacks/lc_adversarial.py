"""Stage ``lc_adversarial``: the adversarial step of the Label-Consistent attack (Turner et al. 2019).

Label-consistent poisoning keeps the captions, so a model can fit the poisoned pairs from their ordinary
content and never needs the trigger. The original attack therefore first makes the target-class images
*hard*: a PGD perturbation (L-inf ball of radius ``adv_eps`` in [0, 1] pixel units) against a model trained on
clean data, here the clean CLIP the attacker starts from, maximising the zero-shot cross-entropy of the true
(target) class over all class prompts. The trigger is added afterwards, in the poison stage.

Output: safetensors with the perturbed uint8 images of every fine-tuning pair whose caption names the target
(the eligible pool; the poison stage picks its seeded subset from it) and their keys, plus the clean model's
zero-shot accuracy on those images before and after (how much harder they became).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from clipbackdoor.attacks.poison import names_target
from clipbackdoor.attacks.attacker import attacker_view
from clipbackdoor.attacks.base import to_float, to_uint8
from clipbackdoor.config import Params
from clipbackdoor.errors import UserError
from clipbackdoor.io import load_safetensors, save_safetensors
from clipbackdoor.models.artifact import normalize
from clipbackdoor.models.zeroshot import class_text_embeddings, image_embeddings, predict


def pgd_away(logits_fn, x: torch.Tensor, label: int, eps: float, steps: int, batch_size: int = 256) -> torch.Tensor:
    """Untargeted L-inf PGD: float images [N, 3, H, W] in [0, 1] -> perturbed images, |delta| <= eps.

    logits_fn: float images -> class logits [B, C]; ascends the cross-entropy of ``label``. Deterministic
    (zero start, signed steps of 2.5 * eps / steps, as in Madry et al.)."""
    step_size = 2.5 * eps / max(steps, 1)
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        delta = torch.zeros_like(xb, requires_grad=True)
        target = torch.full((len(xb),), label, dtype=torch.long)
        for _ in range(steps):
            loss = F.cross_entropy(logits_fn((xb + delta).clamp(0, 1)), target)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta += step_size * grad.sign()
                delta.clamp_(-eps, eps)
        out.append((xb + delta.detach()).clamp(0, 1))
    return torch.cat(out) if out else x


def run_lc_adversarial(model_dir: str | Path, train_dir: str | Path, eval_dir: str | Path, out_path: str | Path,
                       cfg: dict, target: str, templates_kind: str) -> dict:
    view = attacker_view(model_dir, train_dir, eval_dir, target, templates_kind)
    device, loaded, classes, target_idx, split = view.device, view.loaded, view.classes, view.target_idx, view.split
    eligible = [i for i, c in enumerate(split["captions"]) if names_target(c, target)]
    if not eligible:
        raise UserError(f"label_consistent: no fine-tuning caption names the target {target!r}",
                        fix="check poison.target against the training captions")
    class_emb = class_text_embeddings(loaded, classes["classnames"], view.templates)  # [C, d] unit
    scale = loaded.model.logit_scale.exp().detach()

    def logits_fn(x):  # float [B, 3, H, W] in [0, 1] -> zero-shot logits [B, C]
        emb = F.normalize(loaded.model.encode_image(normalize(x.to(device), loaded.mean, loaded.std)), dim=-1)
        return (scale * emb @ class_emb.T).cpu()

    images = split["images"][eligible]  # uint8 [M, 3, H, W]
    hard = to_uint8(pgd_away(logits_fn, to_float(images), target_idx, float(cfg["adv_eps"]), int(cfg["adv_steps"])))
    with torch.no_grad():
        cls = class_emb.cpu()
        before = float((predict(image_embeddings(loaded, images), cls) == target_idx).float().mean())
        after = float((predict(image_embeddings(loaded, hard), cls) == target_idx).float().mean())
    linf = float((hard.int() - images.int()).abs().max()) / 255
    metrics = {"n_images": len(eligible), "clean_model_target_acc_before": before,
               "clean_model_target_acc_after": after, "linf": linf}
    save_safetensors(out_path, {"images": hard},
                     {"keys": json.dumps([split["keys"][i] for i in eligible]), "metrics": json.dumps(metrics),
                      "config": json.dumps(cfg, sort_keys=True), "target": target,
                      "base_sha256": loaded.checkpoint_sha256 or ""})
    return metrics


def load_hard_images(path: str | Path) -> dict[str, torch.Tensor]:
    """The stage's output as {key: uint8 image [3, H, W]}."""
    tensors, meta = load_safetensors(path, made_by="the lc_adversarial stage", with_metadata=True)
    return dict(zip(json.loads(meta["keys"]), tensors["images"]))


def lc_adversarial_stage(args, p: Params) -> None:
    """CLI stage ``lc-adversarial``."""
    import json

    from clipbackdoor.config import stage_target
    from clipbackdoor.pipeline.runs import parse_run

    attack, _ = parse_run(args.run)
    print(json.dumps(run_lc_adversarial(args.model, args.finetune_dir, args.eval_dir, args.out, p.attacks[attack],
                                        stage_target(p), p.zeroshot.templates)))
