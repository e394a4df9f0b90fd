import os
import subprocess
import sys

from clipbackdoor.runtime import set_threads

import pytest

from clipbackdoor import runtime
from clipbackdoor.errors import UserError

CLAIM = ("import sys, time; from clipbackdoor.runtime import claim_gpu; from clipbackdoor.errors import UserError;"
         "import os\n"
         "try:\n    got = claim_gpu(sys.argv[1], n_gpus=2, wait_s=float(sys.argv[3]))\n"
         "except UserError as exc:\n    got = 'REFUSED'\n"
         "print(got, os.environ.get('CUDA_VISIBLE_DEVICES'), flush=True); time.sleep(float(sys.argv[2]))")


def _claim(tmp_path, hold_s, wait_s, env=None):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")} | (env or {})
    return subprocess.Popen([sys.executable, "-c", CLAIM, str(tmp_path), str(hold_s), str(wait_s)],
                            stdout=subprocess.PIPE, text=True, env=env)


@pytest.fixture
def fresh_claim(monkeypatch):
    """An unclaimed process state with no scheduler variables (each test sets what it needs)."""
    monkeypatch.setattr(runtime, "_CLAIMED", [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_concurrent_gpu_jobs_get_different_devices_and_a_third_is_refused(tmp_path):
    procs = [_claim(tmp_path, 3, 0) for _ in range(3)]
    outs = sorted(p.communicate()[0].split()[0] for p in procs)
    assert outs == ["0", "1", "REFUSED"]  # two slots; never a silent CPU fallback


def test_a_waiting_job_gets_the_slot_a_finished_job_releases(tmp_path):
    first = [_claim(tmp_path, 1.5, 0) for _ in range(2)]
    assert sorted(p.stdout.readline().split()[0] for p in first) == ["0", "1"]  # both slots held now
    waiting = _claim(tmp_path, 0, 20)
    assert waiting.communicate()[0].split()[0] in ("0", "1")  # it waited instead of refusing
    for p in first:
        p.communicate()


def test_slot_is_released_when_the_job_exits(tmp_path):
    for _ in range(2):
        out = _claim(tmp_path, 0, 0).communicate()[0].split()
        assert out[:2] == ["0", "0"]


def test_jobs_in_one_multi_gpu_allocation_spread_over_its_devices(tmp_path):
    env = {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "4,5"}  # salloc --gres=gpu:2, then a local snakemake
    procs = [_claim(tmp_path, 2, 0, env) for _ in range(2)]
    assert sorted(p.communicate()[0].split()[0] for p in procs) == ["4", "5"]


def test_a_data_parallel_job_claims_all_its_devices_or_none(tmp_path, fresh_claim):
    holder = _claim(tmp_path, 2, 0)  # holds device 0 of 2 for 2 s
    assert holder.stdout.readline().split()[0] == "0"
    with pytest.raises(UserError, match="2 of 2 GPU"):
        runtime.claim_gpu(tmp_path, n_gpus=2, wait_s=0, count=2)
    assert not runtime._HELD_LOCKS  # device 1 was given back while waiting, not hoarded
    holder.communicate()
    assert runtime.claim_gpu(tmp_path, n_gpus=2, wait_s=5, count=2) == "0,1"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    with pytest.raises(UserError, match="3 GPUs asked for, 2 visible"):
        runtime._CLAIMED.clear()
        runtime.claim_gpu(tmp_path, n_gpus=2, count=3)


def test_a_schedulers_assignment_is_respected(tmp_path, fresh_claim, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert runtime.claim_gpu(tmp_path, n_gpus=1) == "3"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3" and not list(tmp_path.iterdir())  # no lock, not overwritten


def test_visible_devices_limit_the_candidates(tmp_path, fresh_claim, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert runtime.claim_gpu(tmp_path, n_gpus=4) == "2"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2" and (tmp_path / "clipbackdoor-gpu-2.lock").exists()
    assert runtime.claim_gpu(tmp_path, n_gpus=4) == "2"  # a second call in the same process claims nothing more
    assert [p.name for p in tmp_path.iterdir()] == ["clipbackdoor-gpu-2.lock"]


def test_empty_visible_devices_means_cpu(tmp_path, fresh_claim, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert runtime.claim_gpu(tmp_path, n_gpus=2) is None


def test_unwritable_lock_dir_is_a_clear_error(tmp_path, fresh_claim):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError) as info:
        runtime.claim_gpu(tmp_path / "file" / "locks", n_gpus=1)
    assert "cannot write the GPU lock file" in info.value.problem and "CLIPBACKDOOR_LOCK_DIR" in info.value.fix


def test_a_claimed_gpu_without_cuda_torch_is_refused(tmp_path, fresh_claim, monkeypatch):
    monkeypatch.setenv("CLIPBACKDOOR_GPU_COUNT", "1")
    monkeypatch.setenv("CLIPBACKDOOR_LOCK_DIR", str(tmp_path))
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="cannot use CUDA"):
        runtime.pick_device(gpu=True)
    assert runtime.pick_device(gpu=False).type == "cpu"


def test_no_gpu_means_cpu(tmp_path, fresh_claim):
    assert runtime.claim_gpu(tmp_path, n_gpus=0) is None
    assert runtime.pick_device(gpu=True).type == "cpu" or runtime.visible_gpu_count() > 0


def test_threads_never_exceed_cores():
    import os

    import torch

    assert set_threads(10_000) == (os.cpu_count() or 1) == torch.get_num_threads()
    assert set_threads(0) == (os.cpu_count() or 1)
    assert set_threads(1) == 1
