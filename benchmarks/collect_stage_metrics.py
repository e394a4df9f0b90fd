"""Per-stage wall time, peak RSS, peak GPU memory and throughput of a finished Snakemake run, from Snakemake's
``benchmark:`` files and the stages' logs. Prints a table (grouped by rule) and writes JSON.

    python benchmarks/collect_stage_metrics.py [BENCH_DIR] [LOG_DIR] [OUT_JSON]

(defaults: data/benchmarks data/logs benchmarks/results/stage_metrics.json). benchmarks/gpu_check.sh runs it after
the rehearsal on CUDA; on the CPU it summarises `make rehearsal`.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def rule_names() -> list[str]:
    """Every rule of the workflow (rules/*.smk): the benchmark files' prefixes (bench_path("<rule>_{wildcards}"))."""
    from clipbackdoor.pipeline.dvcgen import rule_blocks

    return list(rule_blocks(ROOT))


COUNT = re.compile(r"^decomposed (\d+) images$")


def rule_of(name: str, rules: list[str] | None = None) -> str:
    return max((r for r in rules or rule_names() if name == r or name.startswith(r + "_")), key=len, default=name)


def collect(bench_dir: Path, log_dir: Path) -> list[dict]:
    jobs, rules = [], rule_names()
    for tsv in sorted(bench_dir.glob("*.tsv")):
        rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
        if not rows:
            continue
        job = {"job": tsv.stem, "rule": rule_of(tsv.stem, rules), "seconds": float(rows[-1]["s"]),
               "max_rss_mib": float(rows[-1]["max_rss"]) if rows[-1]["max_rss"] not in ("", "-") else None}
        log = log_dir / f"{tsv.stem}.log"
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith('{"stage"') and "gpu_peak_mib" in line:
                    info = json.loads(line)
                    job["gpu_peak_mib"], job["device"] = info["gpu_peak_mib"], info["device"]
                m = COUNT.match(line.strip())
                if m:
                    job["images"] = int(m.group(1))
                    job["images_per_s"] = round(job["images"] / job["seconds"], 2)
        jobs.append(job)
    return jobs


def main(argv: list[str]) -> int:
    bench_dir = Path(argv[0] if argv else "data/benchmarks")
    log_dir = Path(argv[1] if len(argv) > 1 else "data/logs")
    out = Path(argv[2] if len(argv) > 2 else "benchmarks/results/stage_metrics.json")
    jobs = collect(bench_dir, log_dir)
    if not jobs:
        sys.exit(f"collect_stage_metrics: no Snakemake benchmark files in {bench_dir}: run the workflow first")
    by_rule: dict[str, list[dict]] = defaultdict(list)
    for job in jobs:
        by_rule[job["rule"]].append(job)
    summary = []
    for rule, items in sorted(by_rule.items(), key=lambda kv: -sum(j["seconds"] for j in kv[1])):
        gpu = [j["gpu_peak_mib"] for j in items if "gpu_peak_mib" in j]
        ips = [j["images_per_s"] for j in items if "images_per_s" in j]
        summary.append({"rule": rule, "jobs": len(items), "total_s": round(sum(j["seconds"] for j in items), 1),
                        "max_s": round(max(j["seconds"] for j in items), 1),
                        "max_rss_mib": max((j["max_rss_mib"] or 0) for j in items),
                        "gpu_peak_mib": max(gpu) if gpu else None,
                        "images_per_s": round(sum(ips) / len(ips), 2) if ips else None})
    print(f"{'rule':18} {'jobs':>4} {'total s':>8} {'max s':>7} {'RSS MiB':>8} {'GPU MiB':>8} {'img/s':>7}")
    for s in summary:
        print(f"{s['rule']:18} {s['jobs']:>4} {s['total_s']:>8} {s['max_s']:>7} {s['max_rss_mib']:>8.0f} "
              f"{s['gpu_peak_mib'] if s['gpu_peak_mib'] is not None else '-':>8} "
              f"{s['images_per_s'] if s['images_per_s'] is not None else '-':>7}")
    print(f"{'all':18} {len(jobs):>4} {round(sum(j['seconds'] for j in jobs), 1):>8}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rules": summary, "jobs": jobs}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
