"""Process setup shared by every stage: threads, seeding, and picking a free GPU slot.

Snakemake's ``resources: gpu=1`` only *counts* GPUs; it does not say which one a job gets. Each GPU job
therefore claims a device itself with an exclusive, non-blocking ``flock`` on a per-device lock file and
exports ``CUDA_VISIBLE_DEVICES`` before CUDA initialises. The lock is released when the process exits,
so a killed job never leaks its slot. A scheduler's own assignment (SLURM) is respected; when every GPU is
taken the job waits, then refuses. On a machine without GPUs, jobs run on the CPU.
"""

from __future__ import annotations

import fcntl
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clipbackdoor.errors import UserError

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


_CLAIMED: list[str] = []  # the device this process claimed (claim once: a second call must not lock a second GPU)


def _candidates(n: int) -> list[str]:
    """GPU ids this process may use: those a user or scheduler listed in CUDA_VISIBLE_DEVICES, else 0..n-1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(n)]
    return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]


def claim_gpu(lock_dir: str | Path | None = None, n_gpus: int | None = None, wait_s: float | None = None,
              count: int = 1) -> str | None:
    """Claim ``count`` free GPUs for this process and point CUDA_VISIBLE_DEVICES at them. Returns their ids
    ("3", or "0,1" for a data-parallel fine-tune), or None when the machine has no GPU (the stage runs on the CPU).

    - Under a scheduler that assigned exactly the devices asked for (SLURM: ``SLURM_JOB_ID`` with
      CUDA_VISIBLE_DEVICES listing ``count`` ids), the assignment is used as is: no lock, nothing overwritten.
    - Otherwise one exclusive ``flock`` per device id among the visible ones (so jobs sharing one multi-GPU
      allocation still spread out); when too few are free, wait up to ``wait_s`` (default: env
      CLIPBACKDOOR_GPU_WAIT, 600 s) and then refuse -- never fall back to the CPU silently.
    """
    if _CLAIMED:
        return _CLAIMED[0]
    n = visible_gpu_count() if n_gpus is None else n_gpus
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    candidates = _candidates(n)
    if (listed is not None and not candidates) or n == 0:
        return None  # no GPU, or CUDA_VISIBLE_DEVICES="" (the user asked for the CPU)
    if os.environ.get("SLURM_JOB_ID") and listed is not None and len(candidates) == count:
        _CLAIMED.append(",".join(candidates))
        return _CLAIMED[0]
    if count > len(candidates):
        raise UserError(f"{count} GPUs asked for, {len(candidates)} visible ({','.join(candidates)})",
                        fix="lower finetune.devices, or run on a node with more GPUs")
    lock_dir = Path(lock_dir or os.environ.get("CLIPBACKDOOR_LOCK_DIR", tempfile.gettempdir()))
    wait_s = float(os.environ.get("CLIPBACKDOOR_GPU_WAIT", 600)) if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    while True:
        held = []
        for device in candidates:
            fh = _try_lock(lock_dir / f"clipbackdoor-gpu-{device}.lock")
            if fh is not None:
                held.append((device, fh))
                if len(held) == count:
                    break
        if len(held) == count:
            _HELD_LOCKS.extend(fh for _, fh in held)
            _CLAIMED.append(",".join(d for d, _ in held))
            os.environ["CUDA_VISIBLE_DEVICES"] = _CLAIMED[0]
            return _CLAIMED[0]
        for _, fh in held:  # not enough free: give back what was taken, so two waiting jobs cannot deadlock
            fh.close()
        if time.monotonic() >= deadline:
            raise UserError(f"{count} of {len(candidates)} GPU(s) ({','.join(candidates)}) are not free: other "
                            f"clipbackdoor jobs hold them (waited {wait_s:.0f} s)", fix="give snakemake --resources "
                            "gpu=N no larger than the GPUs this node has, or raise CLIPBACKDOOR_GPU_WAIT")
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


def _try_lock(path: Path):
    """An open file holding an exclusive lock on ``path``, or None when another process holds it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "w")
    except OSError as exc:
        raise UserError(f"cannot write the GPU lock file {path} ({type(exc).__name__}: {exc.strerror or exc})",
                        fix="set CLIPBACKDOOR_LOCK_DIR to a writable folder on this node") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def pick_device(gpu: bool) -> torch.device:
    """Device for a stage: the claimed GPU when the rule asked for one (``resources: gpu=1``) and the machine has
    one; the CPU on a machine without GPUs. A GPU machine whose torch cannot use CUDA is an error, not a silent
    CPU run."""
    if not gpu or claim_gpu() is None:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"a GPU was claimed (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}) but this "
                        f"torch {torch.__version__} cannot use CUDA", fix="install a CUDA build of torch==2.13.0 (see "
                        "docs/troubleshooting.md, Install), or run with CUDA_VISIBLE_DEVICES= to use the CPU on purpose")
    return torch.device("cuda", 0)


def autocast(device: torch.device | str, force: bool = False):
    """bf16 autocast on CUDA (training, decomposition, zero-shot, generation); a no-op on the CPU, where fp32
    results are the exact, byte-identical reference -- unless ``force`` (benchmarks/bf16_deviation.py measures
    bf16's effect on the decomposition with it). Set CLIPBACKDOOR_FP32=1 to keep fp32 on a GPU too."""
    import contextlib

    device = torch.device(device)
    if device.type == "cuda" and os.environ.get("CLIPBACKDOOR_FP32") != "1":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if force and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
