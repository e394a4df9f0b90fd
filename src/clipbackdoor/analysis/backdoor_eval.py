"""Stage ``backdoor_eval``: one model's zero-shot attack success and clean accuracy on every image of an
evaluation set, clean and with a run's trigger (the rate sweep's points; :mod:`clipbackdoor.analysis.rate_sweep`
collects them). Its own module so that its code dependencies hold no plotting code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clipbackdoor.config import Params
from clipbackdoor.io import write_json


@torch.no_grad()
def backdoor_eval(model_dir: str | Path, eval_dir: str | Path, attack: str, attack_cfg: dict, seed: int,
                  target_name: str, templates_kind: str, batch_size: int, out_json: str | Path, asset_path=None,
                  device: torch.device | str = "cpu") -> dict:
    """Counts of a model on one evaluation set: clean images classified correctly, triggered images of other
    classes classified as the target (ASR), and of all classes (ASR over all images). Memory O(batch)."""
    from clipbackdoor.attacks import make_trigger, trigger_eval_images
    from clipbackdoor.logs import progress
    from clipbackdoor.models.artifact import load_artifact
    from clipbackdoor.models.zeroshot import check_target
    from clipbackdoor.data.shards import count_samples, iter_batches
    from clipbackdoor.data.world import world_classes_json
    from clipbackdoor.models.zeroshot import class_text_embeddings, image_embeddings, predict, templates_for

    loaded = load_artifact(model_dir, device)
    classes = world_classes_json(eval_dir)
    target = check_target(target_name, classes["classnames"])
    class_emb = class_text_embeddings(loaded, classes["classnames"], templates_for(templates_kind, classes["templates"]))
    trigger = make_trigger(attack, attack_cfg, loaded.image_size, seed, asset_path).to(device)
    counts = {"n_clean": 0, "cacc_hits": 0, "n_asr": 0, "asr_hits": 0, "asr_all_hits": 0}
    total = -(-count_samples(eval_dir) // batch_size)
    for batch in progress(iter_batches(eval_dir, batch_size, loaded.image_size), "backdoor_eval", total=total):
        images = batch["images"].to(device)  # [B, 3, H, W] uint8
        labels = batch["labels"].numpy()  # [B]
        index = np.arange(batch["start"], batch["start"] + len(images))
        clean_pred = predict(image_embeddings(loaded, images, batch_size), class_emb).numpy()
        triggered = trigger_eval_images(trigger, images, index, seed)
        hit = predict(image_embeddings(loaded, triggered, batch_size), class_emb).numpy() == target
        counts["n_clean"] += len(labels)
        counts["cacc_hits"] += int((clean_pred == labels).sum())
        counts["n_asr"] += int((labels != target).sum())
        counts["asr_hits"] += int(hit[labels != target].sum())
        counts["asr_all_hits"] += int(hit.sum())
    out = {"model": Path(model_dir).name, "eval_set": Path(eval_dir).name, "attack": attack, "target": target_name,
           "checkpoint_sha256": loaded.checkpoint_sha256 or "", **counts}
    write_json(out_json, out)
    return out


def backdoor_eval_stage(args, p: Params) -> None:
    """CLI stage ``backdoor-eval`` (of the sweep section, only its batch size: a rate edit reruns no evaluation)."""
    import json

    from clipbackdoor.config import stage_target
    from clipbackdoor.pipeline.runs import parse_run
    from clipbackdoor.runtime import pick_device

    attack, seed = parse_run(args.trigger)
    out = backdoor_eval(args.model, args.eval_dir, attack, p.attacks[attack], seed, stage_target(p),
                        p.zeroshot.templates, p.sweep.batch_size, args.out, args.asset, pick_device(gpu=True))
    print(json.dumps(out, sort_keys=True))
