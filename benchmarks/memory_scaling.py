"""Peak RSS of the evaluation-side stages on 224-px data at N and 8N images (issue 16: memory O(batch)).

Builds, under a work folder, a 224-px labelled evaluation set of N and of 8N images (webdataset shards and
classes.json, as the ``eval_data`` stage writes them) and a model artifact of ``clipbackdoor-narrow-vit-b32`` (the
ViT-B/32 geometry at 224 px, six layers, random weights), then runs each stage as its own process through the
CLI (``python -m clipbackdoor <stage>``) and reads the process's peak RSS from ``wait4``. The target is
RSS(8N) / RSS(N) <= 1.25 for every stage: a stage that holds a whole split scales with it.

    python benchmarks/memory_scaling.py [--n 128] [--label after] [--src SRC] [--work DIR]

``--src`` runs the stages of another checkout (its ``src`` folder goes first on PYTHONPATH), so "before" and
"after" are measured by one script in one session: ``git worktree add /tmp/before <commit>`` then
``--src /tmp/before/src --label before``. Results are merged by label into
benchmarks/results/memory_scaling.json (the other labels' figures are kept beside the new ones).

Stages: poison (a fixed number of poisoned pairs at every N: its time and bytes written should not grow with N),
finetune (4 steps of batch 16: the data loading is what scales), CleanCLIP and RoCLIP (a few steps: the same),
BadCLIP's patch and ABD's generator (a few steps sampling from all pairs), decompose (clean and BadNet-triggered),
prototypes, defend, mmd, textspan, detect (STRIP and SCALE-UP on a fixed number of images; TeCo is left out: its corruptions
take ~0.9 s per 224-px image here, benchmarks/corruption_speed.py). ``--stages`` runs a subset (merged into the label's earlier figures).

Sizing the rules (``benchmarks/rule_resources.py``): ``--model ViT-B-32-quickgelu --paper-batches --sizes 256``
runs the same stages with the paper's model (its full geometry, random weights) at the paper profile's batch sizes
(fine-tuning 2 steps of its real batch, decomposition at its batch): memory being O(batch), their peaks are the
paper-scale host memory of those rules on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = "clipbackdoor-narrow-vit-b32"
IMAGE_SIZE = 224
N_CLASSES = 10
TRIGGER = "badnet-s0"


def eval_images(n: int, seed: int = 0):
    """n labelled 224-px images: a per-class colour field plus low-frequency noise (decoded, not trivial)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (N_CLASSES, 3))
    for i in range(n):
        label = i % N_CLASSES
        coarse = rng.integers(-60, 60, (8, 8, 3))
        field = np.kron(coarse, np.ones((28, 28, 1), dtype=np.int64))  # [224, 224, 3]
        img = np.clip(colours[label] + field + rng.integers(-20, 20, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255)
        yield f"eval-{i:07d}", img.astype(np.uint8), f"a photo of a class{label}.", {"cls": label}


def train_pairs(n: int, seed: int = 1):
    """n image-caption pairs of 224 px (the fine-tuning split's format: PNG shards, captions naming a class)."""
    for key, img, caption, _ in eval_images(n, seed):
        yield key.replace("eval", "finetune"), img, caption, {}


def build_inputs(work: Path, sizes: list[int], model: str = MODEL) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from clipbackdoor.io import write_json
    from clipbackdoor.models.artifact import create, save_artifact
    from clipbackdoor.data.shards import write_shards

    if not (work / "model" / "model.json").is_file():
        import torch

        torch.manual_seed(0)
        save_artifact(create(model), work / "model")
    (work / "descriptions.txt").write_text("".join(f"a photo with feature {i} of kind {i % 7}\n" for i in range(500)))
    for n in sizes:
        if not (work / f"train_{n}" / "finetune" / "index.json").is_file():
            write_shards(work / f"train_{n}" / "finetune", train_pairs(n), shard_size=512)
        folder = work / f"eval_{n}"
        if not (folder / "classes.json").is_file():
            write_shards(folder, eval_images(n), shard_size=256)
            write_json(folder / "classes.json", {"classnames": [f"class{c}" for c in range(N_CLASSES)],
                                                 "templates": ["a photo of a {}."]})


N_POISONED = 32  # poisoned pairs at every N: the poison stage's cost should not depend on N


def stage_params(n: int, work: Path, paper_batches: bool = False) -> dict[str, str]:
    """--params JSON per stage, from configs/paper.yaml (the real-scale values) with the benchmark's sizes."""
    sys.path.insert(0, str(ROOT / "src"))
    from clipbackdoor.config import get_dotted, load_yaml

    full = load_yaml(ROOT / "configs" / "paper.yaml")

    def pick(*keys, **override):
        flat = {k: get_dotted(full, k) for k in keys}
        flat.update({k.replace("__", "."): v for k, v in override.items()})
        return json.dumps(flat)

    badnet = {"rate": 0.01, "patch_size": 16, "location": "bottom_right", "pattern": "random"}
    detect = {**get_dotted(full, "detect"), "detectors": ["strip", "scaleup"], "n_images": 32, "strip_n": 4}
    finetune = {**get_dotted(full, "finetune"), "steps": 4, "batch_size": 16, "warmup_steps": 1, "ckpt_every": 0}
    decompose_batch = 32
    if paper_batches:  # the paper's own batch sizes (2 fine-tuning steps of its batch)
        finetune.update(steps=2, batch_size=get_dotted(full, "finetune.batch_size"))
        decompose_batch = get_dotted(full, "decompose.batch_size")
    cleanclip = {**get_dotted(full, "cleanclip"), "synonyms": "builtin", "n_pairs": n,
                 "optim": {**get_dotted(full, "cleanclip.optim"), "steps": 2, "batch_size": 16, "warmup_steps": 1,
                           "ckpt_every": 0}}
    roclip = {**get_dotted(full, "roclip"), "bank_size": 64,
              "optim": {**get_dotted(full, "roclip.optim"), "steps": 4, "batch_size": 16, "warmup_steps": 1,
                        "ckpt_every": 0}}
    badclip = {**get_dotted(full, "attacks.badclip"), "steps": 3, "batch_size": 16}
    generator = {**get_dotted(full, "abd.generator"), "steps": 3, "batch_size": 16}
    return {
        "cleanclip": pick("cleanclip", cleanclip=cleanclip),
        "roclip": pick("roclip", roclip=roclip),
        "badclip_patch": pick("attacks.badclip", "poison.target", "zeroshot.templates", attacks__badclip=badclip,
                              poison__target="class3", zeroshot__templates="embedded"),
        "abd_generator": pick("abd.generator", "abd.n_pairs", abd__generator=generator, abd__n_pairs=n),
        "poison": pick("attacks.badnet", "poison.target", "poison.caption_templates", "data.image_size",
                       attacks__badnet={**badnet, "rate": N_POISONED / n}, poison__target="class3",
                       poison__caption_templates="embedded", data__image_size=IMAGE_SIZE),
        "finetune": pick("finetune", finetune=finetune),
        "decompose": pick("decompose", "attacks.badnet", attacks__badnet=badnet,
                          decompose__batch_size=decompose_batch),
        "class_embeddings": pick("zeroshot.templates", zeroshot__templates="embedded"),
        "prototypes": pick("prototypes"),
        "defend": pick("defend", "poison.target", poison__target="class3"),
        "mmd": pick("analysis", analysis__mmd_images=64),
        # a pool file of 500 descriptions (the paper's 3,498 add O(texts x d), not O(rows))
        "textspan": pick("analysis", analysis__textspan_pool=str(work / "descriptions.txt")),
        "detect": pick("detect", "attacks.badnet", "poison.target", detect=detect, attacks__badnet=badnet,
                       poison__target="class3"),
    }


def commands(work: Path, n: int, params: dict[str, str]) -> list[tuple[str, list[str]]]:
    m, ev, out = work / "model", work / f"eval_{n}", work / f"out_{n}"
    clean, trig = out / "none.parquet", out / f"{TRIGGER}.parquet"
    protos, classes = out / "prototypes.safetensors", out / "classes.safetensors"
    cli = [sys.executable, "-m", "clipbackdoor"]
    return [
        ("poison", cli + ["poison", "--params", params["poison"], "--run", TRIGGER, "--finetune-dir",
                          str(work / f"train_{n}" / "finetune"), "--eval", f"bench={ev}", "--out",
                          str(out / "poisoned"), "--manifest", str(out / "manifest.parquet"), "--preview",
                          str(out / "poison.png")]),
        ("finetune", cli + ["finetune", "--params", params["finetune"], "--run", TRIGGER, "--model", str(m),
                            "--train", str(out / "poisoned"), "--out", str(out / "finetuned"), "--threads", "2"]),
        ("decompose_clean", cli + ["decompose", "--params", params["decompose"], "--model", str(m), "--eval-dir",
                                   str(ev), "--trigger", "none", "--out", str(clean), "--threads", "2"]),
        ("decompose_triggered", cli + ["decompose", "--params", params["decompose"], "--model", str(m),
                                       "--eval-dir", str(ev), "--trigger", TRIGGER, "--out", str(trig),
                                       "--threads", "2"]),
        ("class_embeddings", cli + ["class-embeddings", "--params", params["class_embeddings"], "--model", str(m),
                                    "--eval-dir", str(ev), "--out", str(classes), "--threads", "2"]),
        ("prototypes", cli + ["prototypes", "--params", params["prototypes"], "--decomp", str(clean), "--out",
                              str(protos)]),
        ("defend", cli + ["defend", "--params", params["defend"], "--clean", str(clean), "--triggered", str(trig),
                          "--trigger", TRIGGER, "--prototypes", str(protos), "--classes", str(classes), "--out",
                          str(out / "defend.parquet")]),
        ("mmd", cli + ["mmd", "--params", params["mmd"], "--clean", str(clean), "--triggered", str(trig),
                       "--prototypes", str(protos), "--out", str(out / "mmd.csv")]),
        ("textspan", cli + ["textspan", "--params", params["textspan"], "--clean-model", str(m), "--model", str(m),
                            "--clean-decomps", str(clean), str(trig), "--decomps", str(clean), str(trig),
                            "--prototypes", str(protos), "--csv", str(out / "textspan.csv"), "--md",
                            str(out / "textspan.md")]),
        ("cleanclip", cli + ["cleanclip", "--params", params["cleanclip"], "--run", TRIGGER, "--model", str(m),
                             "--clean-dir", str(work / f"train_{n}" / "finetune"), "--out", str(out / "cleanclip"),
                             "--threads", "2"]),
        ("roclip", cli + ["roclip", "--params", params["roclip"], "--run", TRIGGER, "--model", str(m), "--train",
                          str(out / "poisoned"), "--out", str(out / "roclip"), "--threads", "2"]),
        ("badclip_patch", cli + ["badclip-patch", "--params", params["badclip_patch"], "--run", "badclip-s0",
                                 "--model", str(m), "--finetune-dir", str(work / f"train_{n}" / "finetune"),
                                 "--eval-dir", str(ev), "--out", str(out / "patch.safetensors"), "--threads", "2"]),
        ("abd_generator", cli + ["abd-generator", "--params", params["abd_generator"], "--run", TRIGGER, "--model",
                                 str(m), "--normal", str(m), "--clean-dir", str(work / f"train_{n}" / "finetune"),
                                 "--out", str(out / "abd.safetensors"), "--threads", "2"]),
        ("detect", cli + ["detect", "--params", params["detect"], "--model", str(m), "--eval-dir", str(ev),
                          "--trigger", TRIGGER, "--prototypes", str(protos), "--classes", str(classes), "--out",
                          str(out / "detect.parquet"), "--threads", "2"]),
    ]


def run_measured(argv: list[str], env: dict) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one stage process (its own wait4 rusage, not the children's max)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[3]} failed (exit {proc.returncode}):\n{out.decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # Linux: ru_maxrss in KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128, help="N: the small evaluation set (the large one is 8N)")
    ap.add_argument("--label", default="after", help="name of this measurement in the JSON (before / after)")
    ap.add_argument("--src", default=str(ROOT / "src"), help="the src folder whose stages run")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "memory_scaling_work"),
                    help="where inputs and outputs go (reused between runs)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_scaling.json"))
    ap.add_argument("--stages", default="", help="comma-separated stage names to run (default: all)")
    ap.add_argument("--model", default=MODEL, help="the model architecture (random weights)")
    ap.add_argument("--sizes", default="", help="comma-separated N to run instead of N and 8N (no ratio)")
    ap.add_argument("--paper-batches", action="store_true", help="the paper profile's batch sizes")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # (the input-building subprocess)
    args = ap.parse_args()
    work = Path(args.work)
    sizes = [int(v) for v in args.sizes.split(",")] if args.sizes else [args.n, 8 * args.n]
    if args.prepare:  # builds the inputs and prints each size's stage parameters
        build_inputs(work, sizes, args.model)
        print(json.dumps({str(n): stage_params(n, work, args.paper_batches) for n in sizes}))
        return
    # Inputs and parameters come from a subprocess: this process forks the stages, and Linux carries a parent's
    # RSS high-water mark into a forked child's ru_maxrss (even across exec), so a parent that had imported torch
    # and built a model would floor every stage's peak at its own (that floor hid the small stages' figures).
    argv = [sys.executable, __file__, "--prepare", "--work", str(work), "--model", args.model,
            "--sizes", ",".join(map(str, sizes))] + (["--paper-batches"] if args.paper_batches else [])
    params = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    import resource

    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(this process: {floor:.0f} MiB peak, the floor of every figure below)")
    env = {**os.environ, "PYTHONPATH": str(Path(args.src).resolve()), "OMP_NUM_THREADS": "2"}
    only = set(filter(None, args.stages.split(",")))
    command = " ".join(["python", "benchmarks/memory_scaling.py", *sys.argv[1:]])
    rows: dict[str, dict] = {}
    for n in sizes:
        for name, argv in commands(work, n, params[str(n)]):
            if only and name not in only:
                continue
            rss, wall = run_measured(argv, env)
            rows.setdefault(name, {})[str(n)] = {"peak_rss_mib": round(rss, 1), "wall_s": round(wall, 2)}
            rows[name]["measured_by"] = f"{command} ({time.strftime('%Y-%m-%d')})"  # partial reruns keep theirs
            if name == "poison":  # what the stage wrote: a copy of every pair, or only the poisoned ones
                written = sum(f.stat().st_size for f in (work / f"out_{n}" / "poisoned").rglob("*") if f.is_file())
                rows[name][str(n)]["bytes_written"] = written
            print(f"  {name:20s} N={n:5d}  {rss:8.1f} MiB  {wall:6.1f} s", flush=True)
    small, large = str(sizes[0]), str(sizes[-1])
    if len(sizes) == 2:
        print(f"\n{args.label}: peak RSS at N={small} and 8N={large} images of 224 px (target ratio <= 1.25)")
        print(f"{'stage':20s} {'N MiB':>9s} {'8N MiB':>9s} {'ratio':>6s} {'N s':>7s} {'8N s':>7s}")
        for name, r in rows.items():
            r["ratio"] = round(r[large]["peak_rss_mib"] / r[small]["peak_rss_mib"], 3)
            print(f"{name:20s} {r[small]['peak_rss_mib']:9.1f} {r[large]['peak_rss_mib']:9.1f} {r['ratio']:6.2f} "
                  f"{r[small]['wall_s']:7.1f} {r[large]['wall_s']:7.1f}")
    else:
        print(f"\n{args.label}: peak RSS ({args.model}{', paper batch sizes' if args.paper_batches else ''})")
        for name, r in rows.items():
            print(f"{name:20s} " + "  ".join(f"N={n}: {r[str(n)]['peak_rss_mib']:8.1f} MiB {r[str(n)]['wall_s']:6.1f} s"
                                             for n in sizes if str(n) in r))
    if "poison" in rows and len(sizes) == 2:
        print(f"poison wrote {rows['poison'][small]['bytes_written']:,} B at N and "
              f"{rows['poison'][large]['bytes_written']:,} B at 8N ({N_POISONED} poisoned pairs each)")
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    if only and args.label in doc:  # a partial rerun updates its stages only
        rows = {**doc[args.label]["stages"], **rows}
    doc[args.label] = {"n": sizes, "image_size": IMAGE_SIZE, "model": args.model, "src": args.src,
                       "paper_batches": args.paper_batches, "parent_rss_mib": round(floor, 1),
                       "command": command,
                       "date": time.strftime("%Y-%m-%d"), "stages": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
