"""Size every rule's ``mem_mb`` and ``runtime`` from measurements; writes configs/resources.yaml (what the rules
read, through ``mem_mb()`` and ``runtime()`` in rules/common.smk), prints a table and writes benchmarks/results/rule_resources.json.

    python benchmarks/rule_resources.py [--embedded RUN/data] [--rehearsal JSON] [--paper-memory JSON]

Three tables, one per scale (rules/common.smk picks one: ``embedded`` for ``data.source: embedded``,
``rehearsal`` for the project's narrow 224-px models, ``paper`` for an open_clip model):

- **embedded** / **rehearsal**: the largest peak RSS and wall time of each rule's jobs in a finished run (the
  Snakemake ``benchmark:`` files of ``make run``, read by collect_stage_metrics.py; the rehearsal's are in
  benchmarks/results/rehearsal_cpu_stages_e910d22.json). ``mem_mb`` = 1.5 x the peak, ``runtime`` = 3 x the wall time,
  at least 5 minutes.
- **paper**: memory is O(batch) (issue 16), so a rule's host memory at 500K pairs is its peak at a few hundred
  images with the paper's model and batch sizes: ``benchmarks/memory_scaling.py --model ViT-B-32-quickgelu
  --paper-batches --sizes 256 --label paper_vitb32`` measures it for the stages it runs, plus what the rules
  that keep O(rows) of something hold at the paper's sizes (``row_allowances``: detect, mmd, textspan, poison;
  x 1.5 in all). Stated
  allowances on top (not measurable here): 3 GiB of host memory for the CUDA context of a GPU rule, 512 MiB per
  DataLoader worker (4) for a training rule. Rules that memory_scaling.py does not run take the rehearsal peak
  x 1.5 plus those allowances (training rules at least fine-tuning's figure). ``runtime``: the GPU hours per job
  of benchmarks/paper_cost.py for fine-tuning, CleanCLIP, decomposition and the clean model (x 2); for the rules
  whose work grows with one size (``GROWS``: pairs, evaluation images, detector images, MMD subsample) the
  rehearsal wall time with its per-job part scaled by the two profiles' ratio (x 2); the rehearsal time (x 2) for
  rules whose work is the same at every scale; a day for the rest (not measured at paper scale); at least 30 min.

Every number written says where it came from (``source``); edit the inputs, never the YAML.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

CUDA_CONTEXT_MIB = 3072  # host memory of torch's CUDA context (allowance, not measured: no GPU here)
LOADER_MIB, LOADER_WORKERS = 512, 4  # per DataLoader worker (allowance), workers of an 8-core GPU job
TRAINING = {"finetune", "sweep_finetune", "cleanclip", "roclip", "abd_finetune", "pretrain", "t2i_pretrain", "t2i_backdoor"}
STABLE_DIFFUSION = {"t2i_pretrain", "t2i_backdoor", "b2_audit"}  # the rehearsal's tiny random UNet says nothing
CLIP_TRAINING = TRAINING - STABLE_DIFFUSION
# memory_scaling.py stage -> rule
MEASURED_STAGES = {"poison": "poison", "finetune": "finetune", "decompose_clean": "decompose",
                   "decompose_triggered": "decompose", "class_embeddings": "class_embeddings",
                   "prototypes": "prototypes", "defend": "defend", "mmd": "mmd", "detect": "detect",
                   "textspan": "textspan"}
# benchmarks/paper_cost.py rows -> rule (GPU hours of all jobs of the rule)
COST_ROWS = {"finetune": "finetune", "cleanclip": "cleanclip", "decompose": "decompose",
             "clean_model": "clean_model"}
# What a rule's per-job work grows with from the rehearsal to the paper profile (the ratio of the two
# profiles' values, read from configs/): pairs, evaluation images, detector images, MMD subsample. Rules that
# grow otherwise (steps, pools, models) and were not measured at paper scale get a day.
GROWS = {"cc3m": "pairs", "poison": "pairs", "eval_data": "eval", "prototypes": "eval", "defend": "eval",
         "detect": "detect", "mmd": "mmd", "textspan": "eval", "summary": "eval", "head_map": "eval",
         "sweep_poison": "pairs", "backdoor_eval": "eval"}
FIXED = {"tables", "figures", "abd_tables", "training_curves", "rate_sweep"}  # one row per job: the same work at every scale
EVAL_IMAGES = {"paper": 50_000, "rehearsal": 48}  # ImageNet-1K val; the rehearsal's 8 classes x 6 images
UNMEASURED_MIN = 1440
# Work a rule gained after its rehearsal measurement (rehearsal_cpu_stages_e910d22.json): a factor on its per-job
# time at paper scale. mmd: MMD^2 of every head of every layer, not only the last layer's -- ViT-B-32's components
# per job go from 12 heads + 12 head sums + 12 MLPs = 36 to 144 + 24 = 168.
WORK_SINCE_REHEARSAL = {"mmd": ((12 * 12 + 2 * 12) / (12 + 2 * 12), "x 4.67 for every head of every layer")}
SAME_STAGE = {"sweep_poison": "poison", "sweep_finetune": "finetune"}  # rule -> the stage it runs (paper sizing)
ALIKE = {"abd_tables": "tables", "head_map": "figures", "training_curves": "figures", "rate_sweep": "tables",
         "sweep_poison": "poison", "sweep_finetune": "finetune", "backdoor_eval": "class_embeddings"}  # a rule not in the rehearsal graph that does the same kind of work as one in it


def workflow_rules() -> dict[str, bool]:
    """Every rule that runs a job (has a shell:), and whether it declares a GPU, from rules/*.smk."""
    from clipbackdoor.pipeline.dvcgen import rule_blocks

    return {name: bool(re.search(r"^\s*gpu=", block, re.M))
            for name, block in rule_blocks(ROOT).items() if "shell:" in block}


def round_mem(mib: float) -> int:
    return int(math.ceil(mib / 256.0) * 256)


def per_rule(jobs: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for job in jobs:
        r = out.setdefault(job["rule"], {"rss": 0.0, "s": 0.0, "jobs": 0})
        r["rss"], r["s"], r["jobs"] = max(r["rss"], job["max_rss_mib"] or 0), max(r["s"], job["seconds"]), r["jobs"] + 1
    return out


def measured_table(measured: dict[str, dict], rules: dict[str, bool], what: str) -> dict[str, dict]:
    table = {}
    largest = max(measured.values(), key=lambda r: r["rss"])
    for rule in rules:
        r = measured.get(rule)
        if r is None:  # not in that profile's graph: the largest measured job's memory, half an hour
            table[rule] = {"mem_mb": round_mem(1.5 * largest["rss"]), "runtime": 30,
                           "source": f"not measured (not in {what}): its largest peak x 1.5, 30 min"}
        else:
            table[rule] = {"mem_mb": round_mem(1.5 * r["rss"]), "runtime": max(5, math.ceil(3 * r["s"] / 60)),
                           "source": f"{what}, {r['jobs']} job(s): peak {r['rss']:.0f} MiB, {r['s']:.1f} s"}
    return table


def work_ratios() -> dict[str, float]:
    from clipbackdoor.config import get_dotted, load_yaml

    paper, reh = load_yaml(ROOT / "configs" / "paper.yaml"), load_yaml(ROOT / "configs" / "rehearsal.yaml")
    ratio = lambda key: get_dotted(paper, key) / get_dotted(reh, key)  # noqa: E731
    return {"pairs": ratio("data.webdataset.n_pairs"), "eval": EVAL_IMAGES["paper"] / EVAL_IMAGES["rehearsal"],
            "detect": ratio("detect.n_images"), "mmd": ratio("analysis.mmd_images")}


def row_allowances() -> dict[str, tuple[float, str]]:
    """MiB a rule holds at the paper's sizes on top of its measured peak, where it keeps O(rows) of something that
    memory_scaling.py runs at reduced settings (detector images and STRIP's pool, MMD's and TEXTSPAN's
    decomposition rows, poison's per-pair index and its poisoned images; TEXTSPAN's moments, O(d^2) not O(rows)).
    ViT-B-32: 12 layers x 12 heads, d 512."""
    from clipbackdoor.config import get_dotted, load_yaml

    paper = load_yaml(ROOT / "configs" / "paper.yaml")
    g = lambda key: get_dotted(paper, key)  # noqa: E731
    mib, image = 2.0 ** 20, 3 * 224 * 224  # uint8 bytes of one image
    layers, heads, d = 12, 12, 512
    val = g("prototypes.val_fraction") * EVAL_IMAGES["paper"]
    scored = g("detect.n_images") + val
    term_row = (layers * heads + layers) * d * 4  # every head and MLP term of one image, float32
    test = (1 - g("prototypes.val_fraction")) * EVAL_IMAGES["paper"]
    poisoned = g("attacks.badnet.rate") * g("data.webdataset.n_pairs")
    return {
        "detect": (4 * scored * image / mib, f"{scored:.0f} decoded images (scored + STRIP pool) x 4 copies"),
        "mmd": (4 * g("analysis.mmd_images") * term_row / mib,
                f"2 x {g('analysis.mmd_images')} rows of every term, and their float64 stack"),
        # streamed into moments: two models' count/sum/Gram per component (float64), and the pool's embeddings
        "textspan": ((2 * (heads + layers) * d * d * 8 + 4 * 3498 * d * 8) / mib,
                     "2 models' per-component Gram matrices + 3,498 pool texts' working copies"),
        # one defend table in pandas (2 splits x test rows x ~60 settings, ~150 B a row) + bootstrap chunks
        "summary": ((2 * test * 60 * 150 + 4 * 100 * test * 8) / mib,
                    f"a defend table of 2 x {test:.0f} test rows x ~60 settings in pandas, and bootstrap draws"),
        "poison": ((1500 * g("data.webdataset.n_pairs") + 3 * poisoned * image) / mib,
                   f"~1.5 KB index + manifest per pair, {poisoned:.0f} poisoned images x 3"),
    }


def paper_table(rules: dict[str, bool], rehearsal: dict[str, dict], paper_mem: dict, cost: dict) -> dict[str, dict]:
    peaks: dict[str, float] = {}
    for stage, rule in MEASURED_STAGES.items():
        if stage in paper_mem["stages"]:
            peak = max(v["peak_rss_mib"] for k, v in paper_mem["stages"][stage].items() if k.isdigit())
            peaks[rule] = max(peaks.get(rule, 0.0), peak)
    jobs = cost.get("job_counts", {})
    gpu_hours = {}
    for row in cost["rows"]:
        name = row["stage"].split(" ")[0]
        if name in COST_ROWS:
            gpu_hours[COST_ROWS[name]] = row["gpu_hours"] / max(1, jobs.get(COST_ROWS[name], 1))
    if "finetune" in gpu_hours:  # a sweep point is one more fine-tune of the same recipe
        gpu_hours["sweep_finetune"] = gpu_hours["finetune"]
    startup = min(r["s"] for r in rehearsal.values())  # a stage's fixed cost: interpreter, imports, model load
    ratios, rows = work_ratios(), row_allowances()
    table = {}
    for rule, gpu in rules.items():
        extra = (CUDA_CONTEXT_MIB if gpu else 0) + (LOADER_MIB * LOADER_WORKERS if rule in TRAINING else 0)
        if rule in peaks:
            base, src = peaks[rule], f"ViT-B-32 at the paper's batch: peak {peaks[rule]:.0f} MiB"
        elif rule in CLIP_TRAINING and "finetune" in peaks:
            base = max(peaks["finetune"], rehearsal.get(rule, {}).get("rss", 0.0))
            src = f"as fine-tuning (the same model, a batch no larger): {base:.0f} MiB"
        elif rule in rehearsal and rule not in STABLE_DIFFUSION:
            base, src = rehearsal[rule]["rss"], f"rehearsal peak {rehearsal[rule]['rss']:.0f} MiB"
        else:
            base, src = max(peaks.values()), f"not measured: the largest ViT-B-32 peak, {max(peaks.values()):.0f} MiB"
        if rule in rows:
            base += rows[rule][0]
            src += f" + {rows[rule][0]:.0f} MiB for {rows[rule][1]}"
        mem = round_mem(1.5 * base + extra)
        if rule in gpu_hours:
            minutes, rsrc = 2 * 60 * gpu_hours[rule], f"paper_cost.py {gpu_hours[rule]:.3f} GPU h/job x 2"
        elif rule in rehearsal and (rule in GROWS or rule in FIXED):
            s, ratio = rehearsal[rule]["s"], ratios[GROWS[rule]] if rule in GROWS else 1.0
            more, why = WORK_SINCE_REHEARSAL.get(rule, (1.0, ""))
            minutes = 2 * (startup + (s - startup) * ratio * more) / 60
            rsrc = f"rehearsal {s:.1f} s, its per-job work x {ratio:g} ({GROWS.get(rule, 'fixed')})" \
                + (f" {why}" if why else "") + " x 2"
        else:
            minutes, rsrc = UNMEASURED_MIN, "not measured at paper scale: a day"
        table[rule] = {"mem_mb": mem, "runtime": max(30, math.ceil(minutes)),
                       "source": f"{src} x 1.5" + (f" + {extra} MiB allowance" if extra else "") + f"; {rsrc}"}
    for rule, like in SAME_STAGE.items():  # the same stage on other inputs: its sizing, allowances included
        if rule in table and like in table:
            table[rule] = {**table[like], "source": f"as {like} (the same stage): {table[like]['source']}"}
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embedded", default=str(ROOT / "data"), help="a finished `make run`'s data/ folder")
    # `make rehearsal` of commit e910d22 (collect_stage_metrics.py), while benchmarks shared the machine: its
    # times are upper bounds (about 2x the quiet run of benchmarks/results/rehearsal_cpu_stages.json)
    ap.add_argument("--rehearsal", default=str(ROOT / "benchmarks/results/rehearsal_cpu_stages_e910d22.json"))
    ap.add_argument("--embedded-run", default="`make run` of a51df98", help="what --embedded is (for the sources)")
    ap.add_argument("--rehearsal-run", default="`make rehearsal` of e910d22")
    ap.add_argument("--paper-memory", default=str(ROOT / "benchmarks/results/memory_scaling.json"))
    ap.add_argument("--paper-label", default="paper_vitb32")
    ap.add_argument("--cost", default=str(ROOT / "benchmarks/results/paper_cost.json"))
    ap.add_argument("--out", default=str(ROOT / "configs/resources.yaml"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/rule_resources.json"))
    args = ap.parse_args()
    import collect_stage_metrics

    rules = workflow_rules()
    embedded_jobs = collect_stage_metrics.collect(Path(args.embedded) / "benchmarks", Path(args.embedded) / "logs")
    if not embedded_jobs:
        sys.exit(f"rule_resources: no benchmark files under {args.embedded}/benchmarks: run `make run` first")
    rehearsal = per_rule(json.loads(Path(args.rehearsal).read_text())["jobs"])
    rehearsal.update({rule: rehearsal[like] for rule, like in ALIKE.items() if rule not in rehearsal})
    paper_mem = json.loads(Path(args.paper_memory).read_text())[args.paper_label]
    tables = {"embedded": measured_table(per_rule(embedded_jobs), rules, args.embedded_run),
              "rehearsal": measured_table(rehearsal, rules, args.rehearsal_run),
              "paper": paper_table(rules, rehearsal, paper_mem, json.loads(Path(args.cost).read_text()))}
    print(f"{'rule':16s} {'gpu':>3s} | {'embedded':>14s} | {'rehearsal':>14s} | {'paper':>15s}")
    for rule, gpu in rules.items():
        cells = [f"{tables[t][rule]['mem_mb']:6d} MB {tables[t][rule]['runtime']:4d} m" for t in tables]
        print(f"{rule:16s} {'yes' if gpu else '':>3s} | " + " | ".join(cells))
    header = ("# Per-rule mem_mb (MB) and runtime (minutes) for each scale, read by rules/common.smk (mem_mb(), runtime()).\n"
              "# Written by benchmarks/rule_resources.py from measurements (see its docstring; each entry's\n"
              "# `source` says which): do not edit by hand, rerun the script. Override one job at run time with\n"
              "# snakemake --set-resources RULE:mem_mb=N.\n")
    out = Path(args.out)
    out.write_text(header + yaml.safe_dump(tables, sort_keys=True, width=200))
    Path(args.json).write_text(json.dumps({"tables": tables, "date": time.strftime("%Y-%m-%d"),
                                           "command": " ".join(["python", *sys.argv])}, indent=1) + "\n")
    print(f"wrote {out} and {args.json}")


if __name__ == "__main__":
    main()
