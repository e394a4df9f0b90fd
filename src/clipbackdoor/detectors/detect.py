"""Stage ``detect``: STRIP, SCALE-UP and TeCo scores -- and those of any detector an extension registers
(:func:`clipbackdoor.detectors.scores.registry`) -- on the same clean / triggered test images as Decomp-Det.

Images: a seeded subsample of ``n_images`` from the prototypes' test split (the images Decomp-Det scores), each
clean and triggered; STRIP superimposes images of the clean-validation split (the defender's held-out clean
data). The classifier is the model's zero-shot head over the evaluation classes. Output: Parquet in the defend
stage's schema (defense = detector, variant = its setting, pred = -1: detectors give scores, not labels), so
the metrics code computes AUROC for them exactly as for Decomp-Det.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from clipbackdoor.attacks import make_trigger, parse_run, trigger_eval_images
from clipbackdoor.config import DetectConfig, Params
from clipbackdoor.decomposition.stage import load_class_embeddings
from clipbackdoor.defenses.predictions import PREDICTIONS_SCHEMA
from clipbackdoor.detectors.scores import registry
from clipbackdoor.io import write_parquet
from clipbackdoor.logs import progress
from clipbackdoor.models.artifact import load_artifact, normalize
from clipbackdoor.decomposition.prototypes import load_prototypes
from clipbackdoor.runtime import pick_device
from clipbackdoor.data.shards import load_rows


def zero_shot_proba(loaded, class_emb: torch.Tensor):
    device = next(loaded.model.parameters()).device
    scale = loaded.model.logit_scale.exp()
    class_emb = class_emb.to(device)

    def proba(x: torch.Tensor) -> torch.Tensor:  # float [B, 3, H, W] in [0, 1] (CPU) -> [B, C] (CPU)
        emb = F.normalize(loaded.model.encode_image(normalize(x.to(device), loaded.mean, loaded.std)), dim=-1)
        return (scale * emb @ class_emb.T).softmax(-1).cpu()

    return proba


@torch.no_grad()
def run_detect(model_dir: str | Path, eval_dir: str | Path, prototypes_path: str | Path, classes_path: str | Path,
               out_path: str | Path, trigger: str, attack_cfg: dict, trigger_seed: int, cfg: DetectConfig,
               target: int, asset_path=None, target_name: str = "") -> int:
    loaded = load_artifact(model_dir, pick_device(gpu=True))  # the rule holds a GPU when there is one
    emb, _ = load_class_embeddings(classes_path)
    proba = zero_shot_proba(loaded, torch.from_numpy(np.asarray(emb)).float())
    protos = load_prototypes(prototypes_path)
    test = np.asarray(protos["test_index"])
    rng = np.random.default_rng([cfg.seed, 5])
    index = np.sort(rng.choice(test, size=min(cfg.n_images, len(test)), replace=False))
    # only the scored images and STRIP's clean pool are decoded (memory O(n_images + pool), not O(split))
    val = np.asarray(protos["val_index"])
    rows_needed = np.union1d(index, val)
    split = load_rows(eval_dir, rows_needed, loaded.image_size)
    at = {int(i): j for j, i in enumerate(rows_needed)}
    pick = lambda idx: split["images"][[at[int(i)] for i in idx]]  # noqa: E731
    clean = pick(index)
    device = next(loaded.model.parameters()).device
    trig = make_trigger(parse_run(trigger)[0], attack_cfg, loaded.image_size, trigger_seed, asset_path).to(device)
    triggered = trigger_eval_images(trig, clean.to(device), index, trigger_seed).cpu()  # triggered on the device
    images = {"clean": clean.float() / 255, "triggered": triggered.float() / 255}
    pool = pick(val)  # uint8: strip_scores converts the partners it draws
    labels = split["labels"][[at[int(i)] for i in index]]
    rows: dict[str, list] = {name: [] for name in PREDICTIONS_SCHEMA.names}
    chosen = [d for name, d in registry().items() if name in cfg.detectors]  # the registry's order
    jobs = [(split_name, d) for split_name in images for d in chosen]
    for split_name, detector in progress(jobs, f"detect {len(index)} images x 2 splits"):
        settings = (cfg.extensions or {}).get(detector.name, {})
        for variant, s in detector.scores(proba, images[split_name], pool, cfg, settings):
            _add_rows(rows, detector.name, f"{variant},n_images={len(index)}", split_name, index, labels, s)
    meta = {"target": str(target), "target_name": target_name, "trigger": trigger, "n_images": str(len(index)),
            "checkpoint_sha256": loaded.checkpoint_sha256 or ""}
    table = pa.Table.from_pydict(rows, schema=PREDICTIONS_SCHEMA).replace_schema_metadata(meta)
    write_parquet(out_path, table)
    return table.num_rows


def _add_rows(rows: dict[str, list], detector: str, variant: str, split_name: str, index: np.ndarray,
              labels, scores) -> None:
    """One detector setting's scores [N] on one split, as output rows (pred = -1: scores, no decision)."""
    n = len(scores)
    if n != len(index):
        raise ValueError(f"detector {detector} returned {n} scores for {len(index)} images")
    rows["defense"] += [detector] * n
    rows["variant"] += [variant] * n
    rows["split"] += [split_name] * n
    rows["index"] += index.tolist()
    rows["label"] += labels.tolist()
    rows["pred"] += [-1] * n
    rows["score"] += np.asarray(scores, dtype=np.float32).tolist()


def detect_stage(args, p: Params) -> None:
    """CLI stage ``detect``."""
    from clipbackdoor.models.zeroshot import check_target
    from clipbackdoor.config import stage_target
    from clipbackdoor.pipeline.runs import parse_run

    attack, seed = parse_run(args.trigger)
    target = check_target(stage_target(p), load_class_embeddings(args.classes)[1])
    n = run_detect(args.model, args.eval_dir, args.prototypes, args.classes, args.out, args.trigger, p.attacks[attack],
                   seed, p.detect, target, args.asset, stage_target(p))
    print(f"{n} score rows")
