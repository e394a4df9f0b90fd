"""How recording N stages in dvc.lock scales: DVC's `dvc commit --force A B ...` against `lock`'s one-pass commit.

`python -m clipbackdoor lock` used to call `dvc commit --force` with the stage names; DVC's command commits its
targets one at a time and, for each, parses dvc.yaml and dvc.lock and rewrites dvc.lock, so the time grows with
N x the files' size (N^2). `clipbackdoor.pipeline.dvcgen._dvc_commit` does DVC's own per-stage steps on one loaded
index and writes dvc.lock once.

The repository is synthetic but shaped like ours: N stages, each with DEPS code files as dependencies (our stages
list ~40 `src/clipbackdoor` modules) and one small output. Both ways start from the same state (no dvc.lock, an
empty cache) and must produce the same dvc.lock.

    python benchmarks/lock_scaling.py --stages 25 50 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

DEPS = 40


def make_repo(root: Path, n: int) -> list[str]:
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "src").mkdir()
    for j in range(DEPS):
        (root / "src" / f"m{j}.py").write_text(f"X = {j}\n")
    (root / "out").mkdir()
    stages = {}
    for i in range(n):
        (root / "out" / f"s{i}.txt").write_text(f"output {i}\n")
        stages[f"stage_{i:04d}"] = {"cmd": f"echo {i} > out/s{i}.txt",
                                    "deps": [f"src/m{j}.py" for j in range(DEPS)], "outs": [f"out/s{i}.txt"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return list(stages)


def reset(root: Path) -> None:
    (root / "dvc.lock").unlink(missing_ok=True)
    shutil.rmtree(root / ".dvc" / "cache", ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[25, 50, 100])
    ap.add_argument("--out", default="benchmarks/results/lock_scaling.json")
    args = ap.parse_args()
    from clipbackdoor.pipeline.dvcgen import _dvc_commit

    rows = []
    for n in args.stages:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            names = make_repo(root, n)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", *names], cwd=root, check=True)
            dvc_cli = time.perf_counter() - t0
            by_cli = (root / "dvc.lock").read_text()
            reset(root)
            t0 = time.perf_counter()
            _dvc_commit(root, names)
            one_pass = time.perf_counter() - t0
            same = yaml.safe_load((root / "dvc.lock").read_text()) == yaml.safe_load(by_cli)
        rows.append({"stages": n, "deps_per_stage": DEPS, "dvc_commit_cli_s": round(dvc_cli, 1),
                     "one_pass_s": round(one_pass, 1), "speedup": round(dvc_cli / one_pass, 1), "same_lock": same})
    print(f"{'stages':>6} {'dvc commit A B … (s)':>21} {'one pass (s)':>13} {'speed-up':>9} {'same dvc.lock':>14}")
    for r in rows:
        print(f"{r['stages']:>6} {r['dvc_commit_cli_s']:>21} {r['one_pass_s']:>13} {r['speedup']:>8}x "
              f"{str(r['same_lock']):>14}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/lock_scaling.py " +
                                          " ".join(sys.argv[1:]), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
