"""The paper profile's stage graph, run for real on the rehearsal inputs (marked slow; ~15 min on 2 cores).

configs/rehearsal.yaml = configs/paper.yaml with sizes, steps and paths shrunk (tests/test_config.py keeps it so);
its inputs are generated in their real on-disk formats by ``python -m clipbackdoor.pipeline.rehearsal``. Every rule of
``all`` (B² included: the profile has a ``b2`` section) runs through Snakemake; DVC then records the same outputs
(``python -m clipbackdoor lock``: its DAG and the Snakemake one agree) and reruns one stage of every rule through dvc.yaml's own commands, byte-identically."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import copy_repo

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
PROFILE = "configs/rehearsal.yaml"


def sh(cmd: str, cwd: Path, timeout: int = 1800) -> str:
    proc = subprocess.run(cmd, cwd=cwd, shell=True, capture_output=True, text=True, env=ENV, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd}: exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("rehearsal") / "repo")
    # One attack instead of the profile's two (badnet, blended): the same rules and code paths at 224 px with half
    # the jobs, so the CI fits its time (blended's chain differs only by the trigger, run in the smoke tests)
    profile = yaml.safe_load((repo / PROFILE).read_text())
    profile["poison"]["attacks"] = ["badnet"]
    (repo / PROFILE).write_text(yaml.safe_dump(profile, sort_keys=False))
    sh("python -m clipbackdoor.pipeline.rehearsal --out data/rehearsal", repo)
    sh(f"snakemake all --cores 2 --configfile {PROFILE}", repo)  # the profile's `b2` section puts B² in `all`
    return repo


def test_every_rule_of_the_paper_graph_completes(rehearsed):
    jobs = {p.stem for p in (rehearsed / "data" / "benchmarks").glob("*.tsv")}
    rules = {"cc3m", "eval_data", "clean_model", "poison", "finetune", "cleanclip", "decompose", "class_embeddings",
             "prototypes", "defend", "detect", "mmd", "textspan", "summary", "figures", "tables", "t2i_pretrain",
             "t2i_backdoor", "b2_audit"}
    assert {r for r in rules if any(j == r or j.startswith(r + "_") for j in jobs)} == rules
    out = sh(f"snakemake all b2 -n --cores 2 --configfile {PROFILE}", rehearsed)
    assert "Nothing to be done" in out


def test_each_eval_set_is_scored_on_the_model_backdoored_towards_its_target(rehearsed):
    df = pd.read_csv(rehearsed / "results" / "rehearsal" / "metrics" / "summary.csv")
    attacked = df[(df.attack != "clean") & (df.repair == "-") & (df.defense == "none")]
    got = dict(attacked.groupby("eval_set").target.agg(lambda t: ",".join(sorted(set(t)))))
    assert got == {"imagenet": "banana", "caltech101": "accordion", "pets": "Samoyed"}
    assert set(attacked.attack) == {"badnet"}
    models = {p.name for p in (rehearsed / "data" / "models").iterdir()}
    assert {f"badnet-{t}-s0" for t in ("banana", "accordion", "samoyed")} <= models
    table4 = (rehearsed / "results" / "rehearsal" / "tables" / "table4.md").read_text()
    assert "imagenet (target banana)" in table4 and "pets (target Samoyed)" in table4
    # the real loaders saw the real layouts: 8 synset folders -> open_clip names, the stray .mat file skipped
    clean = yaml.safe_load((rehearsed / "data" / "models" / "clean" / "metrics.json").read_text())
    assert set(clean) >= {"zeroshot_top1/imagenet", "zeroshot_top1/caltech101", "zeroshot_top1/pets"}


def test_stable_diffusion_branch_uses_its_auditor_and_writes_its_preview(rehearsed):
    assert (rehearsed / "results" / "shared" / "b2" / "t2i_samples.png").stat().st_size > 0
    b2 = pd.read_csv(rehearsed / "results" / "rehearsal" / "metrics" / "b2.csv")
    assert len(b2) > 0
    log = (rehearsed / "data" / "logs" / "b2_audit.log").read_text()
    assert "Traceback" not in log


def test_dvc_records_the_snakemake_run_and_reruns_any_stage_identically(rehearsed):
    repo = rehearsed
    sh(f"cp {PROFILE} params.yaml && python -m clipbackdoor dvc-yaml", repo)
    sh("git init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm rehearsal", repo)
    out = sh("python -m clipbackdoor lock", repo, timeout=900)  # records what Snakemake ran: DVC's DAG = Snakemake's
    assert "every stage is current" in out
    assert "Data and pipelines are up to date" in sh("dvc status", repo)
    stages = re.findall(r"^  (\S+):$", (repo / "dvc.yaml").read_text(), flags=re.M)
    # one stage per rule, through dvc.yaml's `--params @params.yaml:...` commands
    picked = {}
    for name in stages:
        picked.setdefault(re.sub(r"_(clean|badnet|blended|imagenet|caltech101|pets)\b.*$", "", name), name)
    cheap = [picked[r] for r in ("eval_data", "prototypes", "defend", "mmd", "summary", "tables", "figures")
             if r in picked]
    summary = repo / "results" / "rehearsal" / "metrics" / "summary.csv"
    before = sha(summary)
    for name in cheap:
        sh(f"dvc repro -f -s {name}", repo, timeout=600)
    assert sha(summary) == before  # byte-identical to the Snakemake run
    assert "Data and pipelines are up to date" in sh("dvc status", repo)
