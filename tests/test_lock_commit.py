"""`lock`'s one-pass DVC commit writes the dvc.lock DVC's own `dvc commit A B ...` writes, from any folder."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

spec = importlib.util.spec_from_file_location("lock_scaling", ROOT / "benchmarks" / "lock_scaling.py")
lock_scaling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock_scaling)


def test_one_pass_commit_equals_dvcs_own_and_runs_from_another_folder(tmp_path, monkeypatch):
    from clipbackdoor.errors import UserError
    from clipbackdoor.pipeline.dvcgen import _dvc_commit

    repo = tmp_path / "repo"
    repo.mkdir()
    names = lock_scaling.make_repo(repo, 3)
    subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", *names[:2]], cwd=repo, check=True)
    by_dvc = yaml.safe_load((repo / "dvc.lock").read_text())
    lock_scaling.reset(repo)
    monkeypatch.chdir(tmp_path)  # `lock --root repo` from the folder above
    _dvc_commit(repo.relative_to(tmp_path), names[:2])
    assert yaml.safe_load((repo / "dvc.lock").read_text()) == by_dvc and set(by_dvc["stages"]) == set(names[:2])
    assert (repo / ".dvc" / "cache").is_dir()
    (repo / "out" / "s2.txt").unlink()  # a stage whose output is gone: one line, the working folder kept
    with pytest.raises(UserError, match="dvc commit failed"):
        _dvc_commit(repo.relative_to(tmp_path), [names[2]])
    assert Path.cwd() == tmp_path  # (the commit ran inside the repository and came back)
