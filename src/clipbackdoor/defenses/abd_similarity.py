"""Stage ``abd_similarity``: seed 002's Fig. 2 — do the adversarial images imitate the backdoor?

On a seeded subsample of evaluation images, per encoder (the poisoned one, and the clean one as a control) and
per perturbation (``patch|bounded`` x ``uap|uap_lbd``), the mean image-caption similarity 100 * cos (CLIP's
logit scale, the seed's unit) of the five pairs of seed 002 Fig. 2:

1. clean image / its own caption          2. triggered image / target caption
3. adversarial image / its own caption    4. adversarial image / target caption
5. adversarial image / unrelated caption (mean over the classes that are neither its own nor the target)

Captions are the zero-shot class prompts of the evaluation set (the same embeddings the classifier uses).
Two more columns measure the imitation directly: the share of adversarial images the model classifies as the
target (``adv_target_rate``) and the mean cosine between an image's adversarial and triggered features
(``cos_adv_triggered``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from clipbackdoor.config import Params
from clipbackdoor.defenses.abd import KINDS, VARIANTS, adversarial_images, load_perturbations
from clipbackdoor.attacks import make_trigger, parse_run, trigger_eval_images
from clipbackdoor.decomposition.stage import load_class_embeddings
from clipbackdoor.io import atomic_path
from clipbackdoor.models.artifact import load_artifact
from clipbackdoor.runtime import pick_device
from clipbackdoor.data.shards import count_samples, load_rows
from clipbackdoor.models.zeroshot import image_embeddings

PAIRS = ["clean_img/own_caption", "triggered_img/target_caption", "adv_img/own_caption", "adv_img/target_caption",
         "adv_img/unrelated_caption"]


def similarity_row(clean: torch.Tensor, triggered: torch.Tensor, adv: torch.Tensor, labels: torch.Tensor,
                   class_emb: torch.Tensor, target: int) -> dict:
    """Unit image features [N, d] (clean, triggered, adversarial), labels [N], unit class features [C, d]."""
    sim = lambda x: 100 * x @ class_emb.T  # [N, C]
    s_clean, s_trig, s_adv = sim(clean), sim(triggered), sim(adv)
    rows = torch.arange(len(labels))
    unrelated = torch.ones_like(s_adv, dtype=torch.bool)
    unrelated[rows, labels] = False
    unrelated[:, target] = False
    values = [s_clean[rows, labels], s_trig[:, target], s_adv[rows, labels], s_adv[:, target],
              (s_adv * unrelated).sum(1) / unrelated.sum(1)]
    out = {pair: float(v.mean()) for pair, v in zip(PAIRS, values)}
    out["adv_target_rate"] = float((s_adv.argmax(1) == target).float().mean())
    out["cos_adv_triggered"] = float((adv * triggered).sum(1).mean())
    return out


@torch.no_grad()
def run_abd_similarity(models: dict[str, tuple[str, str]], eval_dir: str | Path, perturbations: str | Path,
                       out_csv: str | Path, trigger: str, attack_cfg: dict, trigger_seed: int, target: int,
                       location: str, n_images: int, seed: int, asset_path=None) -> pd.DataFrame:
    """``models``: encoder label -> (model dir, its class-embeddings file of this evaluation set)."""
    deltas = load_perturbations(perturbations)
    device = pick_device(gpu=True)  # the rule holds a GPU: both encoders run there
    loaded = {encoder: load_artifact(model_dir, device) for encoder, (model_dir, _) in models.items()}
    image_size = next(iter(loaded.values())).image_size  # the encoders of one study share the input size
    n_split = count_samples(eval_dir)
    index = np.sort(np.random.default_rng([seed, 31]).choice(n_split, size=min(n_images, n_split), replace=False))
    split = load_rows(eval_dir, index, image_size)  # only the images scored (memory O(n_images))
    images, labels = split["images"], split["labels"]
    trig = make_trigger(parse_run(trigger)[0], attack_cfg, image_size, trigger_seed, asset_path).to(device)
    triggered = trigger_eval_images(trig, images.to(device), index, trigger_seed).cpu()  # triggered on the device
    adversarial = {f"{kind}.{variant}": adversarial_images(images, deltas[f"{kind}.{variant}"], kind, location, seed)
                   for kind in KINDS for variant in VARIANTS}
    rows = []
    for encoder, (_, classes) in models.items():
        model = loaded[encoder]
        class_emb = F.normalize(torch.from_numpy(np.asarray(load_class_embeddings(classes)[0])).float(), dim=-1)
        clean_f, trig_f = image_embeddings(model, images), image_embeddings(model, triggered)
        for name, adv in adversarial.items():
            row = similarity_row(clean_f, trig_f, image_embeddings(model, adv), labels, class_emb, target)
            rows.append({"run": trigger, "encoder": encoder, "perturbation": name, "n_images": len(index), **row})
    df = pd.DataFrame(rows)
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False, float_format="%.4f")
    return df


def abd_similarity_stage(args, p: Params) -> None:
    """CLI stage ``abd-similarity``."""
    from clipbackdoor.models.zeroshot import check_target
    from clipbackdoor.config import stage_target
    from clipbackdoor.decomposition.stage import load_class_embeddings
    from clipbackdoor.pipeline.runs import parse_run

    attack, seed = parse_run(args.trigger)
    target = check_target(stage_target(p), load_class_embeddings(args.classes)[1])
    models = {"poisoned": (args.model, args.classes), "clean": (args.clean_model, args.clean_classes)}
    df = run_abd_similarity(models, args.eval_dir, args.perturbations, args.out, args.trigger, p.attacks[attack],
                            seed, target, p.abd.generator.location, p.abd.fig2_images, seed, args.asset)
    print(df.to_string(index=False))
