"""Expected compute cost of the paper profile per stage, from measured throughput scaled on paper.

Inputs: the ViT-B-32 decomposition throughput measured by ``decompose_throughput.py`` on this machine
(``benchmarks/results/decompose_throughput.json``), the job counts and sizes of ``configs/paper.yaml`` (read
from the Snakemake dry run), and two stated assumptions: a training step costs ``--train-factor`` x an
image-tower forward per pair (forward + backward of both towers), and a GPU is ``--gpu-speedup`` x this
2-core CPU on ViT-B-32 (no GPU here to measure it). Prints a table and writes JSON.

    python benchmarks/paper_cost.py [--gpu-speedup 150] [--train-factor 4]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "paper_cost.json"
# evaluation-set sizes (images) of the paper profile's ImageFolder roots
EVAL_IMAGES = {"imagenet": 50_000, "caltech101": 9_144, "pets": 7_349}


def job_counts() -> dict[str, int]:
    """Jobs of the paper profile's dry run (its TEXTSPAN pool, a user download, stood in by a temporary file)."""
    import tempfile

    params = yaml.safe_load((ROOT / "configs/paper.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "image_descriptions.txt"
        pool.write_text("An image of a dog\n")
        params["analysis"]["textspan_pool"] = str(pool)
        (Path(tmp) / "paper.yaml").write_text(yaml.safe_dump(params))
        proc = subprocess.run(["snakemake", "all", "-n", "--configfile", str(Path(tmp) / "paper.yaml"), "--cores",
                               "8"], cwd=ROOT, capture_output=True, text=True, check=True)
    table = proc.stdout.split("Job stats:")[1].split("\n\n")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu-speedup", type=float, default=150.0)
    ap.add_argument("--train-factor", type=float, default=4.0)
    args = ap.parse_args()

    measured = {r["model"]: r for r in json.loads((ROOT / "benchmarks/results/decompose_throughput.json").read_text())}
    vit = measured["ViT-B-32"]
    cpu_img_s = vit["decompose_img_per_s"]  # images/s, batch 32, 2 threads, 224 px
    params = yaml.safe_load((ROOT / "configs/paper.yaml").read_text())
    counts = job_counts()
    n_eval = sum(EVAL_IMAGES[n] for n in params["data"]["eval_sets"])
    runs = counts["finetune"]  # one backdoored model per (attack, evaluation-set target, seed)
    ft, cc = params["finetune"], params["cleanclip"]["optim"]
    stages = {
        # stage: images through the image tower (forward-equivalents)
        f"finetune ({runs} runs)": runs * ft["steps"] * ft["batch_size"] * args.train_factor,
        # CleanCLIP also encodes the augmented image: twice the image forwards of a plain step
        f"cleanclip ({counts.get('cleanclip', 0)} runs)": counts.get("cleanclip", 0) * cc["steps"] * cc["batch_size"]
        * args.train_factor * 2,
        "decompose": counts.get("decompose", 0) / len(EVAL_IMAGES) * n_eval,
        "clean_model (zero-shot eval)": n_eval,
    }
    rows = []
    for stage, images in stages.items():
        cpu_h = images / cpu_img_s / 3600
        rows.append({"stage": stage, "image_forwards": int(images), "cpu_2core_hours": round(cpu_h, 1),
                     "gpu_hours": round(cpu_h / args.gpu_speedup, 2)})
    total = {"stage": "total", "image_forwards": sum(r["image_forwards"] for r in rows),
             "cpu_2core_hours": round(sum(r["cpu_2core_hours"] for r in rows), 1),
             "gpu_hours": round(sum(r["gpu_hours"] for r in rows), 2)}
    rows.append(total)
    print(f"measured ViT-B-32 decomposition: {cpu_img_s:.1f} img/s on 2 CPU threads; assumed GPU speed-up "
          f"{args.gpu_speedup:g}x, training = {args.train_factor:g} forward-equivalents per pair")
    print(f"{'stage':32s} {'image fwd':>14s} {'CPU h (2 cores)':>16s} {'GPU h':>8s}")
    for r in rows:
        print(f"{r['stage']:32s} {r['image_forwards']:14,d} {r['cpu_2core_hours']:16.1f} {r['gpu_hours']:8.2f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"measured_cpu_img_per_s": cpu_img_s, "gpu_speedup_assumed": args.gpu_speedup,
                               "train_factor_assumed": args.train_factor, "job_counts": counts, "rows": rows},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
