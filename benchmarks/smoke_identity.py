"""Behaviour unchanged across a refactor: the smoke profile's results, byte for byte, at two git revisions.

    python benchmarks/smoke_identity.py REV [REV ...] [--out benchmarks/results/smoke_identity.json]

For each revision (a commit, a branch, or ``WORKTREE`` for the working tree as it is, uncommitted files included)
the script exports that revision's files into a fresh folder, runs ``snakemake tables`` on configs/smoke.yaml
there with that revision's own package first on the import path (the editable install points at this checkout),
and hashes every results file the smoke profile's ``tables`` target needs: ``results/smoke/metrics/summary.*``,
``headline.json`` and ``results/smoke/tables/*`` (figures are left out: matplotlib's PNG bytes are not part of the
contract). It prints one row per file with the digest at each revision and whether they agree, writes JSON, and
exits 1 when any file differs or is missing at one revision.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "results/smoke"
COMPARED = ("metrics/summary.csv", "metrics/summary.md", "metrics/headline.json", "tables")
WORKTREE = "WORKTREE"


def export(rev: str, dest: Path) -> str:
    """The files of ``rev`` (or of the working tree: tracked + untracked, not ignored) in ``dest``; returns the
    revision's commit (or ``WORKTREE``)."""
    dest.mkdir(parents=True)
    if rev == WORKTREE:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split("\n")
        for f in filter(None, files):
            if (ROOT / f).is_file():
                (dest / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, dest / f)
        return WORKTREE
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return commit


def digests(results: Path) -> dict[str, str]:
    out = {}
    for name in COMPARED:
        path = results / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.exists():
                out[f.relative_to(results).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run_smoke(repo: Path, cores: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = time.time()
    proc = subprocess.run(["snakemake", "tables", "--cores", str(cores), "--configfile", "configs/smoke.yaml"],
                          cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"smoke run failed in {repo} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.time() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("revs", nargs="+", help=f"git revisions to compare ({WORKTREE}: the working tree)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/smoke_identity.json")
    args = ap.parse_args(argv)
    base = args.keep or Path(tempfile.mkdtemp(prefix="smoke-identity-"))
    runs = []
    for i, rev in enumerate(args.revs):
        repo = base / f"rev{i}"
        commit = export(rev, repo)
        seconds = run_smoke(repo, args.cores)
        runs.append({"rev": rev, "commit": commit, "seconds": round(seconds, 1),
                     "files": digests(repo / RESULTS)})
        print(f"{rev} ({commit[:10]}): smoke `snakemake tables` in {seconds:.0f} s", flush=True)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    names = sorted(set().union(*(r["files"] for r in runs)))
    rows, same = [], True
    print(f"\n| file | {' | '.join(r['commit'][:10] for r in runs)} | identical |\n|---|{'---|' * len(runs)}---|")
    for name in names:
        values = [r["files"].get(name) for r in runs]
        equal = None not in values and len(set(values)) == 1
        same &= equal
        rows.append({"file": name, "sha256": values, "identical": equal})
        print(f"| {name} | {' | '.join((v or 'missing')[:12] for v in values)} | {'yes' if equal else 'NO'} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": [{k: r[k] for k in ("rev", "commit", "seconds")} for r in runs],
                                    "files": rows, "identical": same}, indent=1) + "\n")
    print(f"\n{'identical' if same else 'DIFFERENT'}: {len(names)} files; JSON in {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
