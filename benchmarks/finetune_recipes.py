"""Where does the backdoor live, by fine-tuning recipe? The experiment behind the embedded profile's
`finetune.layer_decay` (docs/core-study.md, "The miniature's fine-tuning recipe").

For each recipe: fine-tune the pipeline's clean model on a pipeline-poisoned set, decompose the clean and
triggered evaluation images, build prototypes, run the defenses, and report undefended ASR / CACC,
mean-ablation of all heads / all MLPs, Decomp-Rep (heads) and Decomp-Det AUROC. Needs `make run` first
(reads data/models/clean, data/poisoned/<run>, data/datasets/eval/world). ~2 min per recipe on 2 cores.

    python benchmarks/finetune_recipes.py [--run badnet-s0] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

import clipbackdoor  # noqa: F401  (torchvision compat before open_clip)
from clipbackdoor.attacks import REGISTRY, parse_run
from clipbackdoor.config import DefendConfig, OptimConfig, section
from clipbackdoor.decomposition.stage import load_class_embeddings, run_class_embeddings, run_decompose
from clipbackdoor.defenses.defend import run_defend
from clipbackdoor.training.finetune import finetune
from clipbackdoor.analysis.metrics import setting_rows
from clipbackdoor.models.zeroshot import check_target
from clipbackdoor.decomposition.prototypes import build_prototypes, load_prototypes
from clipbackdoor.runtime import set_threads

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {  # name: overrides of params.yaml's finetune section
    "lr 2e-4": {"lr": 2e-4, "layer_decay": 1.0},
    "lr 5e-5, 400 steps": {"lr": 5e-5, "steps": 400, "layer_decay": 1.0},
    "lr 1e-3": {"lr": 1e-3, "layer_decay": 1.0},
    "lr 2e-4, layer decay 0.5": {"lr": 2e-4, "layer_decay": 0.5},
    "lr 1e-3, layer decay 0.5 (default)": {"lr": 1e-3, "layer_decay": 0.5},
}
SHOWN = {("none", "-"): "undefended", ("ablate_all_heads", "-"): "all heads ablated",
         ("ablate_all_mlps", "-"): "all MLPs ablated"}


def evaluate(params: dict, run: str, ft: dict, work: Path) -> dict:
    attack, seed = parse_run(run)
    evalset = ROOT / "data/datasets/eval/world"
    start = time.perf_counter()
    finetune(ROOT / "data/models/clean", ROOT / "data/poisoned" / run, work / "model",
             section(OptimConfig, {**params["finetune"], **ft}), seed, None, 0, f"recipe-{run}")
    seconds = time.perf_counter() - start
    dec = params["decompose"]
    for trigger, out in (("none", "none"), (attack, "trig")):
        run_decompose(work / "model", evalset, work / f"{out}.parquet", trigger, params["attacks"], seed,
                      dec["centering"], dec["normalize"], dec["batch_size"])
    run_class_embeddings(work / "model", evalset, work / "classes.safetensors", params["zeroshot"]["templates"])
    build_prototypes(work / "none.parquet", work / "protos.safetensors", params["prototypes"]["val_fraction"],
                     params["prototypes"]["split_seed"], params["prototypes"].get("split", "seeded"))
    emb, names = load_class_embeddings(work / "classes.safetensors")
    target = check_target(params["poison"]["target"], names)
    cfg = section(DefendConfig, params["defend"])
    run_defend(work / "none.parquet", work / "trig.parquet", load_prototypes(work / "protos.safetensors"), emb, cfg,
               REGISTRY[attack].kind, work / "defend.parquet", target)
    rows = {(r["defense"], r["variant"]): r for r in setting_rows(pd.read_parquet(work / "defend.parquet"), target)}
    out = {"finetune_s": round(seconds, 1), "asr": rows[("none", "-")]["asr"], "cacc": rows[("none", "-")]["cacc"]}
    for key, label in SHOWN.items():
        out[f"asr {label}"] = rows[key]["asr"]
    rep = next(r for (d, _), r in rows.items() if d == "decomp_rep_heads")
    det = next(r for (d, _), r in rows.items() if d == "decomp_det")
    out.update({"asr Decomp-Rep heads": rep["asr"], "cacc Decomp-Rep heads": rep["cacc"],
                "auroc Decomp-Det": det["auroc"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="badnet-s0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/finetune_recipes.json"))
    args = ap.parse_args()
    set_threads(args.threads)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    results = {}
    for name, ft in RECIPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = evaluate(params, args.run, ft, Path(tmp))
        print(name, json.dumps({k: round(v, 3) for k, v in results[name].items()}), flush=True)
    table = pd.DataFrame(results).T
    print(f"\n{args.run}, defend = {dataclasses.asdict(section(DefendConfig, params['defend']))}")
    print(table.round(3).to_string())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"run": args.run, "recipes": RECIPES, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
