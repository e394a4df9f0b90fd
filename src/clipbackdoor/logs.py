"""What a stage's log says about its run: a header (stage, arguments, versions, git commit, host), progress as
timestamped lines when the log is a file (a terminal keeps tqdm's bar), and a closing line with the wall time.

Logs are for people reading ``data/logs/*.log`` (or grepping them): no carriage returns, one event a line."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator

PACKAGES = ("clipbackdoor", "torch", "open_clip_torch", "diffusers", "snakemake", "dvc")
PROGRESS_EVERY_S = 30.0  # a file log gets at most one progress line per this many seconds (plus first and last)


def stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _git_commit() -> str:
    """The commit of the code that runs (the package's checkout), with ``+dirty`` for uncommitted edits."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def _versions() -> str:
    out = []
    for name in PACKAGES:
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(out)


def header(command: str, argv: list[str]) -> str:
    """The first lines of a stage's log. ``argv`` holds the stage's parameters (``--params``) and files."""
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    device = "CPU-only run requested" if gpus == "" else f"CUDA_VISIBLE_DEVICES={gpus}" if gpus else "GPU claimed by the stage if any"
    return "\n".join([
        f"# clipbackdoor {command} started {stamp()} on {platform.node()} (pid {os.getpid()})",
        f"# code: git {_git_commit()}; python {platform.python_version()}; {_versions()}",
        f"# device: {device}",
        "# command: python -m clipbackdoor " + shlex.join(argv),
    ])


def footer(command: str, seconds: float, status: str = "done") -> str:
    return f"# clipbackdoor {command} {status} {stamp()} after {seconds:.1f} s"


class _LineProgress:
    """tqdm's interface where a stage uses it (iteration, ``set_postfix``), written as timestamped lines."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None, initial: int, every_s: float):
        self.iterable, self.desc, self.initial, self.every_s = iterable, desc, initial, every_s
        self.total = total if total is not None else (len(iterable) + initial if hasattr(iterable, "__len__") else None)
        self.postfix = ""

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def _line(self, done: int, start: float) -> None:
        rate = (done - self.initial) / max(time.monotonic() - start, 1e-9)
        of = f"/{self.total} ({100 * done / self.total:.0f} %)" if self.total else ""
        print(f"{stamp()} [{self.desc}] {done}{of} {rate:.2f} it/s {self.postfix}".rstrip(), file=sys.stderr,
              flush=True)

    def __iter__(self) -> Iterator:
        start = last = time.monotonic()
        done = printed = self.initial
        try:
            for item in self.iterable:
                try:
                    yield item
                except GeneratorExit:  # the consumer left the loop (a step limit) after this item
                    done += 1
                    raise
                done += 1
                now = time.monotonic()
                if done == self.initial + 1 or now - last >= self.every_s or done == self.total:
                    self._line(done, start)
                    printed, last = done, now
        finally:  # a loop left early (a step limit, an error) or of unknown length still reports where it stopped
            if done != printed:
                self._line(done, start)


def progress(iterable: Iterable, desc: str, total: int | None = None, initial: int = 0, disable: bool = False,
             every_s: float = PROGRESS_EVERY_S):
    """A progress bar on a terminal; timestamped lines (first, last, one per ``every_s``) in a log file."""
    if disable:  # (another DDP rank: rank 0 reports)
        return _Silent(iterable)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, initial=initial, mininterval=1, file=sys.stderr)
    return _LineProgress(iterable, desc, total, initial, every_s)


class _Silent:
    def __init__(self, iterable: Iterable):
        self.iterable = iterable

    def set_postfix(self, refresh: bool = False, **values) -> None:
        pass

    def __iter__(self) -> Iterator:
        return iter(self.iterable)
