"""Process setup shared by every stage: threads, seeding, and picking a free GPU slot.

Snakemake's ``resources: gpu=1`` only *counts* GPUs; it does not say which one a job gets. Each GPU job
therefore claims a device itself with an exclusive, non-blocking ``flock`` on a per-device lock file and
exports ``CUDA_VISIBLE_DEVICES`` before CUDA initialises. The lock is released when the process exits,
so a killed job never leaks its slot. Without a GPU, jobs run on the CPU.
"""

from __future__ import annotations

import fcntl
import os
import random
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

_HELD_LOCKS: list = []  # open lock files; closed (released) at process exit


def set_threads(threads: int) -> int:
    """Use at most ``threads`` intra-op threads, never more than the machine has cores.

    Two torch jobs each spinning more threads than their share of cores slow each other down by an
    order of magnitude, so the rule's ``threads:`` is a hard cap. ``0`` means all cores."""
    cores = os.cpu_count() or 1
    n = cores if int(threads) <= 0 else max(1, min(int(threads), cores))
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def visible_gpu_count() -> int:
    """Number of GPUs on the machine, without initialising CUDA in this process."""
    env = os.environ.get("CLIPBACKDOOR_GPU_COUNT")
    if env is not None:
        return int(env)
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def claim_gpu(lock_dir: str | Path | None = None, n_gpus: int | None = None) -> int | None:
    """Claim the first free GPU slot; set CUDA_VISIBLE_DEVICES to it. Returns its index or None (CPU)."""
    n = visible_gpu_count() if n_gpus is None else n_gpus
    if n == 0:
        return None
    lock_dir = Path(lock_dir or os.environ.get("CLIPBACKDOOR_LOCK_DIR", tempfile.gettempdir()))
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index in range(n):
        fh = open(lock_dir / f"clipbackdoor-gpu-{index}.lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        _HELD_LOCKS.append(fh)
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
        return index
    return None


def pick_device(gpu: bool) -> torch.device:
    """Device for a stage: a claimed GPU slot when the rule asked for one and one is free, else CPU."""
    if gpu and claim_gpu() is not None and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")
