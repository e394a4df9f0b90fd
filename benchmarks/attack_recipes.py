"""What it takes for the attacks the miniature does not learn by default (issue: random-position BadNet, WaNet,
Label-Consistent), and CleanCLIP's learning rate: poison -> fine-tune (or poisoned pretraining) -> zero-shot
ASR / CACC on the evaluation set, from a finished default run's artifacts (data/models/clean, data/datasets).

    python benchmarks/attack_recipes.py [--only NAME ...]      # results: benchmarks/results/attack_recipes.json

Each setting is a (attack overrides, fine-tune overrides) pair on top of params.yaml; `phase: pretrain` poisons
the pretraining split instead and trains from scratch with the pretrain settings; `cleanclip` settings repair
the default badnet-s0 model. Threads: 1 per setting (two settings side by side on 2 cores)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "badnet_random_ft200": ("badnet_random", {"rate": 0.05}, {}),
    "badnet_random_ft200_no_layer_decay": ("badnet_random", {"rate": 0.05}, {"layer_decay": 1.0}),
    "badnet_random_ft600": ("badnet_random", {"rate": 0.05}, {"steps": 600}),
    "badnet_random_poisoned_pretraining": ("badnet_random", {"rate": 0.05, "phase": "pretrain"}, {}),
    "wanet_s2": ("wanet", {"rate": 0.05, "s": 2.0}, {}),
    "lc_adv16": ("label_consistent", {"rate": 0.0235, "adv_eps": 0.0627, "adv_steps": 10}, {}),
    "lc_adv16_no_layer_decay_ft400": ("label_consistent", {"rate": 0.0235, "adv_eps": 0.0627, "adv_steps": 10},
                                      {"layer_decay": 1.0, "steps": 400}),
    "badclip_bottom_right": ("badclip", {"location": "bottom_right"}, {}),
    "cleanclip_lr1e-4": ("cleanclip", {}, {"lr": 1e-4, "layer_decay": 1.0}),
    "cleanclip_lr5e-4": ("cleanclip", {}, {"lr": 5e-4, "layer_decay": 1.0}),
    "cleanclip_lr1e-3": ("cleanclip", {}, {"lr": 1e-3, "layer_decay": 1.0}),
    "cleanclip_lr1e-3_50steps": ("cleanclip", {}, {"lr": 1e-3, "layer_decay": 1.0, "steps": 50, "warmup_steps": 5}),
    "cleanclip_lr1e-3_layer_decay_0.5": ("cleanclip", {}, {"lr": 1e-3, "layer_decay": 0.5}),
}


def evaluate(model_dir, attack, acfg, asset, P):
    from clipbackdoor.attacks import make_trigger, trigger_eval_images
    from clipbackdoor.models.artifact import load_artifact
    from clipbackdoor.data.shards import load_split
    from clipbackdoor.data.world import world_classes_json
    from clipbackdoor.models.zeroshot import class_text_embeddings, image_embeddings, predict, templates_for

    ev = ROOT / "data/datasets/eval/world"
    classes = world_classes_json(ev)
    loaded, split = load_artifact(model_dir), load_split(ev, 32)
    cls = class_text_embeddings(loaded, classes["classnames"], templates_for("embedded", classes["templates"])).cpu()
    target, y = classes["classnames"].index(P["poison"]["target"]), split["labels"]
    clean_pred = predict(image_embeddings(loaded, split["images"]), cls)
    trig = trigger_eval_images(make_trigger(attack, acfg, 32, 0, asset), split["images"],
                               np.arange(len(split["images"])), 0)
    trig_pred = predict(image_embeddings(loaded, trig), cls)
    other = y != target
    return float((clean_pred == y).float().mean()), float((trig_pred[other] == target).float().mean())


def run(name, work: Path, P) -> dict:
    from clipbackdoor.config import CleanCLIPConfig, ModelConfig, OptimConfig, ZeroShotConfig, section
    from clipbackdoor.attacks.poison import poison
    from clipbackdoor.data.world import world_classes_json

    attack, a_over, f_over = SETTINGS[name]
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    if attack == "cleanclip":
        from clipbackdoor.defenses.cleanclip import run_cleanclip

        cc = dict(P["cleanclip"])
        cc["optim"] = {**cc["optim"], **f_over}
        run_cleanclip(ROOT / "data/models/badnet-s0", ROOT / "data/datasets/train/finetune", out / "model",
                      section(CleanCLIPConfig, cc), 0)
        cacc, asr = evaluate(out / "model", "badnet", P["attacks"]["badnet"], None, P)
        return {"name": name, "defense": "cleanclip", "optim": cc["optim"], "cacc": cacc, "asr": asr,
                "seconds": time.time() - t}
    acfg = {**P["attacks"][attack], **a_over}
    phase = acfg.pop("phase", "finetune")
    classes = world_classes_json(ROOT / "data/datasets/eval/world")
    asset = None
    if attack == "label_consistent":
        from clipbackdoor.attacks.lc_adversarial import run_lc_adversarial

        asset = out / "hard.safetensors"
        run_lc_adversarial(ROOT / "data/models/clean", ROOT / "data/datasets/train/finetune",
                           ROOT / "data/datasets/eval/world", asset, acfg, P["poison"]["target"], "embedded")
    if attack == "badclip":
        from clipbackdoor.attacks.badclip_patch import run_badclip_patch

        asset = out / "patch.safetensors"
        run_badclip_patch(ROOT / "data/models/clean", ROOT / "data/datasets/train/finetune",
                          ROOT / "data/datasets/eval/world", asset, None, acfg, P["poison"]["target"], "embedded", 0)
    split = "pretrain" if phase == "pretrain" else "finetune"
    poison(ROOT / f"data/datasets/train/{split}", classes, out / "poisoned" / split, out / "manifest.parquet", attack,
           acfg, P["poison"]["target"], classes["templates"], 32, 0, None, asset)
    if phase == "pretrain":
        from clipbackdoor.training.pretrain import pretrain

        pretrain(out / "poisoned", {"world": ROOT / "data/datasets/eval/world"}, out / "model",
                 ModelConfig(P["model"]["name"], None), section(OptimConfig, P["pretrain"]),
                 section(ZeroShotConfig, P["zeroshot"]), seed=0)
    else:
        from clipbackdoor.training.finetune import finetune

        finetune(ROOT / "data/models/clean", out / "poisoned" / split, out / "model",
                 section(OptimConfig, {**P["finetune"], **f_over}), 0, None, 10**9, name)
    cacc, asr = evaluate(out / "model", attack, acfg, asset, P)
    return {"name": name, "attack": attack, "phase": phase, "attack_cfg": acfg, "finetune": f_over, "cacc": cacc,
            "asr": asr, "seconds": time.time() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--work", default="/tmp/clipbackdoor-attack-recipes")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import clipbackdoor  # noqa: F401
    from clipbackdoor.runtime import set_threads

    set_threads(args.threads)
    P = yaml.safe_load((ROOT / "params.yaml").read_text())
    out = ROOT / "benchmarks/results/attack_recipes.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in args.only:
        results[name] = run(name, Path(args.work), P)
        print(json.dumps(results[name]), flush=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'setting':45s} {'ASR':>6s} {'CACC':>6s}")
    for name, r in results.items():
        print(f"{name:45s} {r['asr']:6.3f} {r['cacc']:6.3f}", file=sys.stdout)


if __name__ == "__main__":
    main()
