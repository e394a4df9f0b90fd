"""Data-parallel training across several devices (``finetune.devices``), through torchrun and DDP.

A stage asked for ``devices > 1`` re-launches itself under ``torch.distributed.run`` (torchrun) with one
process per device; each process joins the process group (NCCL on GPUs, gloo on CPU, so the same path is
tested on a laptop). The global batch is the one a single process would draw; every rank takes a
contiguous slice of it, features are all-gathered *with* gradients (open_clip's ``ClipLoss``) so every rank
computes the loss over the whole global batch, and DDP averages identical gradients: the run follows the
single-process loss curve up to floating-point reduction order. Only rank 0 writes checkpoints and
artifacts.
"""

from __future__ import annotations

import os
import sys
import uuid

import torch
import torch.distributed as dist

from clipbackdoor.errors import UserError

_LAUNCHED = "CLIPBACKDOOR_DDP_CHILD"


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def launch(devices: int, argv: list[str]) -> int | None:
    """Re-run ``python -m clipbackdoor <argv>`` as ``devices`` local torchrun workers; returns 0 or 1.

    Uses torchrun's launcher API in standalone mode (rendezvous on a free localhost port). Returns None when
    no launch is needed (one device, or already inside a worker)."""
    if devices <= 1 or os.environ.get(_LAUNCHED):
        return None
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=devices, run_id=f"clipbackdoor-{uuid.uuid4().hex}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    os.environ[_LAUNCHED] = "1"  # the workers inherit it and run the stage instead of launching again
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "clipbackdoor", *argv)
    except ChildFailedError:
        return 1
    finally:
        os.environ.pop(_LAUNCHED, None)
    return 0


def init_worker(devices: int) -> torch.device:
    """Join the process group of a torchrun worker; returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) != devices:
        raise UserError(f"finetune.devices = {devices} but this process is not one of {devices} torchrun workers",
                        fix="run the stage through `python -m clipbackdoor` (it launches torchrun itself)")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        if torch.cuda.device_count() < devices:
            raise UserError(f"finetune.devices = {devices} but only {torch.cuda.device_count()} GPU(s) are visible",
                            fix="lower finetune.devices or request more GPUs (resources: gpu)")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def without_log(argv: list[str]) -> list[str]:
    """The command line minus ``--log FILE``: relaunched workers inherit the already redirected output."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--log":
            skip = True
        elif not a.startswith("--log="):
            out.append(a)
    return out
