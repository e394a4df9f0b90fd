"""Crash safety: a stage killed with SIGKILL leaves no output that could be taken for a finished one, and
its rerun completes -- for long stages, by resuming from the last checkpoint to the very same weights."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from clipbackdoor.errors import UserError
from clipbackdoor.models.artifact import load_artifact
from conftest import ROOT, run_cli

FT = {"steps": 120, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 5, "betas": [0.9, 0.98],
      "eps": 1e-6, "ckpt_every": 4}

WRITER = """
import sys, time
from clipbackdoor.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as fh:
        fh.write(b"PAR1" + b"x" * 100_000)
        fh.flush()
        print("half-written", flush=True)
        time.sleep(60)
"""


def test_sigkill_mid_write_leaves_no_file_under_the_final_name(tmp_path):
    target = tmp_path / "decomp" / "none.parquet"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "half-written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()  # only a hidden temporary sibling was being written
    leftovers = list(target.parent.iterdir())
    assert leftovers and all(p.name.startswith(".none.parquet.") and p.name.endswith(".tmp") for p in leftovers)
    from clipbackdoor.decomposition.cache import read_meta

    with pytest.raises(UserError, match="not found"):  # readers never pick up the temporary file
        read_meta(target)



def _finetune_args(world_dirs, micro_model, out):
    return ["finetune", "--params", json.dumps({"finetune": FT}), "--run", "badnet-s0", "--model", micro_model,
            "--train", world_dirs / "train" / "finetune", "--out", out / "model", "--ckpt-dir", out / "ckpt",
            "--threads", 1]


def _checkpoint_step(path) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return int(fh.metadata()["step"])
    except Exception:  # not there yet
        return 0


def test_finetune_killed_by_sigkill_resumes_to_identical_weights(world_dirs, micro_model, tmp_path):
    ref = tmp_path / "ref"
    run_cli(*_finetune_args(world_dirs, micro_model, ref))

    run = tmp_path / "killed"
    args = [sys.executable, "-m", "clipbackdoor", *map(str, _finetune_args(world_dirs, micro_model, run))]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 600  # generous: a loaded machine (CI beside other jobs) starts slowly
    while _checkpoint_step(run / "ckpt" / "last.safetensors") < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed: raise FT['steps']"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _checkpoint_step(run / "ckpt" / "last.safetensors")
    assert 8 <= killed_at < FT["steps"]
    with pytest.raises(UserError):  # no finished-looking model artifact was left behind
        load_artifact(run / "model")

    proc = run_cli(*_finetune_args(world_dirs, micro_model, run))
    assert f"resumed from {run / 'ckpt' / 'last.safetensors'} at step" in proc.stderr
    a, b = load_file(ref / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nothing_pulled_is_unpickled():
    """Artifacts from a remote are weights (safetensors), tables (Parquet/JSON) and YAML: no loader that can
    execute code may appear in the code base."""
    import re

    risky = [(re.compile(r"torch\.load\((?![^)]*weights_only=True)"), "torch.load without weights_only=True"),
             (re.compile(r"\bimport pickle\b|\bpickle\.load|\bdill\b|\bjoblib\.load"), "pickle"),
             (re.compile(r"yaml\.(?:load|unsafe_load|full_load)\("), "yaml.load (use yaml.safe_load)"),
             (re.compile(r"np\.load\([^)]*allow_pickle=True"), "np.load(allow_pickle=True)")]
    files = [*ROOT.glob("src/**/*.py"), *ROOT.glob("benchmarks/*.py"), ROOT / "Snakefile", *ROOT.glob("rules/*.smk")]
    found = [f"{f.relative_to(ROOT)}: {what}" for f in files for rx, what in risky if rx.search(f.read_text())]
    assert not found, found


def test_artifacts_get_the_modes_of_plain_files_not_private_temporaries(tmp_path, monkeypatch):
    """mkstemp / mkdtemp make 0600 / 0700 temporaries; a renamed artifact (a results table, a model folder) must be
    readable by whoever the user's umask (read at import) lets read a plain file -- a colleague, a container."""
    import clipbackdoor.io as io

    monkeypatch.setattr(io, "_UMASK", 0o022)
    io.write_json(tmp_path / "metrics.json", {"asr": 0.5})
    with io.atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights.bin").write_bytes(b"x")
    monkeypatch.setattr(io, "_UMASK", 0o027)
    io.write_json(tmp_path / "group.json", {})
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "group.json").stat().st_mode & 0o777 == 0o640
