"""Wall time of the fast test suite (`make test`'s selection) one process vs pytest-xdist workers.

`make test` runs `pytest -n TEST_WORKERS --dist loadfile` (one worker per core, at most 4; a file's tests on one
worker, so a file's session fixtures are built once). Most of the suite is small torch jobs and CLI subprocesses
whose ~9 s of imports use one core, so a second worker fills the other. Each configuration runs the same selection
back to back on this machine, from the same checkout; the counts must agree (a test that only passes serially, or
only in parallel, shows up as a different count).

    python benchmarks/test_suite_time.py --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_suite(workers: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if workers > 1:
        cmd += ["-n", str(workers), "--dist", "loadfile"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", tail)}
    return {"workers": workers, "command": " ".join(cmd[1:]), "wall_s": round(wall, 1), "exit": proc.returncode,
            "passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0)
            + counts.get("errors", 0), "summary": tail}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (1 = no xdist)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "test_suite_time.json"))
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    rows = [run_suite(w) for w in args.workers]
    base = next((r["wall_s"] for r in rows if r["workers"] == 1), rows[0]["wall_s"])  # speed-up against one process
    print(f"{'workers':>7} {'wall (s)':>9} {'speed-up':>9} {'passed':>7} {'failed':>7}")
    for r in rows:
        print(f"{r['workers']:>7} {r['wall_s']:>9} {base / r['wall_s']:>8.2f}x {r['passed']:>7} {r['failed']:>7}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": "python benchmarks/test_suite_time.py " + " ".join(sys.argv[1:]), "commit": commit,
        "cores": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    if any(r["exit"] != 0 for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
