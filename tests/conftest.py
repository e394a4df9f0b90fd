import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the cores: torch
# threads spinning on a core another worker is using slow both by an order of magnitude (see
# runtime.set_threads). Set before torch is imported so the CLI subprocesses the tests start inherit it too.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

import clipbackdoor  # noqa: E402,F401  (applies the torchvision compat before anything imports it)
from clipbackdoor.config import WorldConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def small_world(**overrides) -> WorldConfig:
    base = dict(seed=3, n_pretrain=96, n_finetune=32, n_eval=40, shard_size=40,
                colours=("red", "green", "blue"), shapes=("circle", "square", "cross"), noise_std=0.03)
    base.update(overrides)
    return WorldConfig(**base)


@pytest.fixture(scope="session")
def world_dirs(tmp_path_factory):
    from clipbackdoor.data.world import build_world

    root = tmp_path_factory.mktemp("world")
    build_world(small_world(), 32, root / "train", root / "eval")
    return root


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory):
    """A randomly initialised micro CLIP saved as a model artifact (seeded)."""
    import torch

    from clipbackdoor.models.artifact import create, save_artifact

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("micro") / "clean"
    save_artifact(create("clipbackdoor-micro-vit-p8"), out)
    return out


def run_cli(*args, cwd=ROOT, check=True, env=None):
    proc = subprocess.run([sys.executable, "-m", "clipbackdoor", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def copy_repo(dest: Path) -> Path:
    """A working copy of the repository's tracked sources (no artifacts), as a fresh clone would be."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


@pytest.fixture(autouse=True)
def _no_gpu_claim_leaks(monkeypatch, tmp_path_factory):
    """A GPU claimed by an in-process stage stays claimed for the process (runtime._CLAIMED, its lock, and
    CUDA_VISIBLE_DEVICES): on a GPU machine a later test's subprocess would then wait for that device. Each test
    gets its own lock folder and a fresh claim state."""
    from clipbackdoor import runtime

    monkeypatch.setenv("CLIPBACKDOOR_LOCK_DIR", str(tmp_path_factory.mktemp("gpu-locks")))
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ["CUDA_VISIBLE_DEVICES"])  # restored afterwards
    else:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(runtime, "_CLAIMED", [])
    yield
    while runtime._HELD_LOCKS:
        runtime._HELD_LOCKS.pop().close()
