"""Stage ``abd_finetune``: ABD's defense fine-tune of the poisoned model and the arms of seed 002's ablations.

The poisoned model is fine-tuned with the plain CLIP loss on the defender's clean pairs, whose images carry the
universal adversarial perturbation of ``abd_generator`` (a seeded ``adv_fraction`` of them; seed: all) and
whose captions are EDA-augmented (one seeded copy per caption), according to the arm:

=================  =========================  ============  ===========================
arm (repair name)  images                     captions      seed 002
=================  =========================  ============  ===========================
finetune_clean     clean                      clean         Table II "FT"
abd_eda_only       clean                      EDA           Table II "T_eda"
abd_img_only       adversarial (UAP + L_bd)   clean         Table II "I_adv" = Table III "UAP(L_bd)"
abd                adversarial (UAP + L_bd)   EDA           Tables I/II "ABD"
uap                adversarial (plain UAP)    clean         Table III "UAP"
=================  =========================  ============  ===========================

Every arm writes ``data/models/<run>.<arm>``, decomposed, defended and scored like any other model (so the
``abd+decomp_rep`` rows exist). Reference: bs 64, lr 3e-6, 10 epochs on 250K CC3M pairs (configs/paper.yaml).
"""

from __future__ import annotations

from pathlib import Path

from clipbackdoor.defenses.abd import PerturbedImages, load_perturbations
from clipbackdoor.config import AbdFinetuneConfig, Params
from clipbackdoor.defenses.eda import eda_captions, synonym_source
from clipbackdoor.runtime import pick_device
from clipbackdoor.training.train import load_training_pairs, save_trained, train_clip

# arm -> (perturbation variant or None, EDA captions?)
ARMS = {"finetune_clean": (None, False), "abd_eda_only": (None, True), "abd_img_only": ("uap_lbd", False),
        "abd": ("uap_lbd", True), "uap": ("uap", False)}


def run_abd_finetune(model_dir: str | Path, clean_dir: str | Path, out_dir: str | Path, arm: str, cfg: AbdFinetuneConfig,
                     seed: int, perturbations: str | Path | None = None, ckpt_dir: str | Path | None = None) -> dict:
    variant, use_eda = ARMS[arm]
    device = pick_device(gpu=True)
    loaded, split, tokens = load_training_pairs(model_dir, clean_dir, device, cfg.n_pairs)
    images = split["images"]
    if variant is not None:
        if perturbations is None:
            raise ValueError(f"arm {arm!r} needs the abd_generator's perturbations")
        delta = load_perturbations(perturbations)[f"{cfg.perturbation}.{variant}"]
        images = PerturbedImages(images, delta, cfg.perturbation, cfg.location, seed, cfg.adv_fraction)  # lazy
    example = split["captions"][0]
    if use_eda:
        augmented = eda_captions(split["captions"], seed, cfg.eda_alpha, synonym_source(cfg.synonyms))
        tokens, example = loaded.tokenizer(augmented), augmented[0]
    history = train_clip(loaded, images, tokens, cfg.optim, seed, ckpt_dir=ckpt_dir, ckpt_every=cfg.optim.ckpt_every,
                         fp_extra=["abd_finetune", arm, loaded.checkpoint_sha256, repr(cfg)], desc=f"abd:{arm}")
    return save_trained(loaded, out_dir, history, len(tokens), f"abd_finetune:{arm}", model_dir, seed,
                        provenance_extra={"perturbation": f"{cfg.perturbation}.{variant}" if variant else None},
                        caption_example=example)


def abd_finetune_stage(args, p: Params) -> None:
    """CLI stage ``abd-finetune`` (one arm)."""
    import json

    from clipbackdoor.pipeline.runs import parse_run

    _, seed = parse_run(args.run)
    print(json.dumps(run_abd_finetune(args.model, args.clean_dir, args.out, args.arm, AbdFinetuneConfig.from_abd(p.abd),
                                      seed, args.perturbations, args.ckpt_dir)))
