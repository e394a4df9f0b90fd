import subprocess
import sys

from clipbackdoor.runtime import claim_gpu, set_threads

CLAIM = ("import sys, time; from clipbackdoor.runtime import claim_gpu; import os;"
         "print(claim_gpu(sys.argv[1], n_gpus=2), os.environ.get('CUDA_VISIBLE_DEVICES'), flush=True);"
         "time.sleep(float(sys.argv[2]))")


def test_concurrent_gpu_jobs_get_different_devices(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM, str(tmp_path), "3"], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = sorted(p.communicate()[0].split()[0] for p in procs)
    assert outs == ["0", "1", "None"]  # two slots, the third job falls back to the CPU


def test_slot_is_released_when_the_job_exits(tmp_path):
    first = subprocess.run([sys.executable, "-c", CLAIM, str(tmp_path), "0"], capture_output=True, text=True)
    second = subprocess.run([sys.executable, "-c", CLAIM, str(tmp_path), "0"], capture_output=True, text=True)
    assert first.stdout.split()[:2] == ["0", "0"] and second.stdout.split()[:2] == ["0", "0"]


def test_no_gpu_means_cpu(tmp_path):
    assert claim_gpu(tmp_path, n_gpus=0) is None


def test_threads_never_exceed_cores():
    import os

    import torch

    assert set_threads(10_000) == (os.cpu_count() or 1) == torch.get_num_threads()
    assert set_threads(0) == (os.cpu_count() or 1)
    assert set_threads(1) == 1
