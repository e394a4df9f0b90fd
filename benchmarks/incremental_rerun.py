"""Incremental reruns: full pipeline time vs the rerun after editing one `defend` parameter, through Snakemake
and through DVC, plus no-op `snakemake -n` and `dvc status` times.

    python benchmarks/incremental_rerun.py [--profile params.yaml] [--cores 2]

Works on a temporary copy of the repository (git-tracked files only). Prints a table and writes
benchmarks/results/incremental_rerun.json. Target: defend-edit rerun <= 10 % of the full run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: str, cwd: Path) -> float:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, shell=True, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def edit_defend_eps(repo: Path, delta: float) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["defend"]["eps"] = round(params["defend"]["eps"] + delta, 6)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="params.yaml")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "incremental_rerun.json"))
    args = ap.parse_args()
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        for f in files:
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
        shutil.copy(ROOT / args.profile, repo / "params.yaml")
        run("git init -q && git add -A && git -c user.email=b@b -c user.name=b commit -qm bench", repo)
        r = {"profile": args.profile, "cores": args.cores}
        r["snakemake_full_s"] = run(f"snakemake all --cores {args.cores}", repo)
        r["snakemake_noop_dry_run_s"] = run(f"snakemake -n --cores {args.cores}", repo)
        edit_defend_eps(repo, 0.05)
        r["snakemake_defend_edit_s"] = run(f"snakemake all --cores {args.cores}", repo)
        # a true full run for DVC too: without this, training stages resume from the final checkpoints the
        # Snakemake run left behind and "full" takes minutes less than it should
        shutil.rmtree(repo / "data" / "checkpoints", ignore_errors=True)
        r["dvc_full_s"] = run("dvc repro", repo)  # no dvc.lock yet: every stage runs once
        r["dvc_status_noop_s"] = run("dvc status", repo)
        edit_defend_eps(repo, 0.05)
        r["dvc_defend_edit_s"] = run("dvc repro", repo)
    r["snakemake_edit_fraction"] = r["snakemake_defend_edit_s"] / r["snakemake_full_s"]
    r["dvc_edit_fraction"] = r["dvc_defend_edit_s"] / r["dvc_full_s"]
    for k, v in r.items():
        print(f"{k:28} {v:.3f}" if isinstance(v, float) else f"{k:28} {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
