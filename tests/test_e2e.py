"""End to end on the smoke profile: Snakemake, DVC, incremental reruns, push/pull (marked slow)."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import copy_repo

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}


def sh(cmd, cwd, check=True):
    proc = subprocess.run(cmd, cwd=cwd, shell=True, capture_output=True, text=True, env=ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def snakemake_jobs(out: str) -> set[str]:
    return set(re.findall(r"^(?:local)?rule (\w+):", out, flags=re.M)) - {"all"}


def dvc_stages(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@-]+)'", out))


def digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != ".snakemake_timestamp")
    for f in files if path.is_dir() else [path]:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        h.update(f.read_bytes())
    return h.hexdigest()


ALL = {"world", "pretrain", "poison", "finetune", "decompose", "class_embeddings", "prototypes", "defend",
       "summary", "figures", "cleanclip", "detect", "mmd", "textspan", "tables"}
AFTER_DEFEND = {"defend", "summary", "figures", "tables"}
DVC_ALL = ALL | {"t2i", "b2"}  # dvc.yaml also carries the B² branch (t2i_pretrain, t2i_backdoor, b2_audit)


def dvc_rules(out: str) -> set[str]:
    """DVC stage names -> the rule they come from (stage = rule + wildcard values)."""
    return {name.split("_")[0] if not name.startswith("class_embeddings") else "class_embeddings"
            for name in dvc_stages(out)}


def set_param(repo: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    repo = copy_repo(base / "repo")
    shutil.copy(repo / "configs" / "smoke.yaml", repo / "params.yaml")
    sh("python -m clipbackdoor dvc-yaml", repo)  # dvc.yaml of the smoke parameters (the committed one: defaults)
    sh("git init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm smoke", repo)
    return repo


def test_snakemake_runs_the_pipeline_and_reruns_only_what_changed(smoke_repo):
    out = sh("snakemake --cores 2", smoke_repo)
    assert snakemake_jobs(out) == ALL
    summary = (smoke_repo / "results/metrics/summary.csv").read_text()
    assert summary.startswith("attack,defense,variant,seed,eval_set,target,asr,asr_all,cacc,auroc")
    assert "clean,none,-,0,world" in summary and "badnet,decomp_rep," in summary
    assert (smoke_repo / "data/benchmarks/pretrain.tsv").exists() and (smoke_repo / "data/logs/world.log").exists()
    assert (smoke_repo / "results/figures/fig5_prototype_cosine.png").stat().st_size > 10_000
    assert "cleanclip+decomp_rep" in summary and "badnet,strip," in summary and "badnet,teco," in summary
    sh("snakemake --report report.html --cores 1", smoke_repo)  # tables, figures, TEXTSPAN in the HTML report
    html = (smoke_repo / "report.html").read_text(errors="replace")
    assert all(name in html for name in ("table1.md", "table5.md", "fig6_eps_sweep.png", "badnet-s0_world.md"))

    assert "Nothing to be done" in sh("snakemake -n --cores 2", smoke_repo)
    set_param(smoke_repo, "pretrain", "steps", 31)  # a pretraining edit: pretraining and what depends on it
    assert snakemake_jobs(sh("snakemake -n --cores 2", smoke_repo)) == ALL - {"world", "poison"}
    set_param(smoke_repo, "pretrain", "steps", 30)
    set_param(smoke_repo, "defend", "eps", 0.25)  # a defend edit: only defend and what reads it
    assert snakemake_jobs(sh("snakemake --cores 2", smoke_repo)) == AFTER_DEFEND


def test_dvc_repro_reproduces_snakemake_and_reruns_only_dependants(smoke_repo):
    snake_world = digest(smoke_repo / "data/datasets/train")
    snake_model = digest(smoke_repo / "data/models/clean/model.safetensors")
    out = sh("dvc repro", smoke_repo)
    assert dvc_rules(out) == DVC_ALL  # no dvc.lock yet: everything runs once
    assert digest(smoke_repo / "data/datasets/train") == snake_world  # byte-identical artifacts
    assert digest(smoke_repo / "data/models/clean/model.safetensors") == snake_model
    # both tools hash the same artifacts: Snakemake's marker file is in .dvcignore
    assert "up to date" in sh("dvc status", smoke_repo)
    sh("git add -A && git -c user.email=t@t -c user.name=t commit -qm lock", smoke_repo)

    assert dvc_stages(sh("dvc repro", smoke_repo)) == set()
    set_param(smoke_repo, "pretrain", "lr", 0.003)
    # (a real run: `dvc repro --dry` lists only the stage whose params changed, not its dependants)
    assert dvc_rules(sh("dvc repro", smoke_repo)) == DVC_ALL - {"world", "poison"}  # B² reads the clean CLIP
    set_param(smoke_repo, "defend", "eps", 0.2)
    assert dvc_rules(sh("dvc repro", smoke_repo)) == AFTER_DEFEND
    sh("git add -A && git -c user.email=t@t -c user.name=t commit -qm lr", smoke_repo)


def test_dvc_push_then_pull_into_a_fresh_clone(smoke_repo, tmp_path):
    sh("dvc push", smoke_repo)
    clone = smoke_repo.parent / "clone"
    sh(f"git clone -q {smoke_repo} {clone}", tmp_path)
    # the default remote is a folder next to the repository; the clone sits next to the original
    assert not (clone / "data/models/clean").exists()
    sh("dvc pull", clone)
    assert digest(clone / "data/models/clean/model.safetensors") == \
        digest(smoke_repo / "data/models/clean/model.safetensors")
    assert sh("dvc status", clone).strip().endswith("Data and pipelines are up to date.")
    # `dvc pull` sets fresh mtimes in arbitrary order: --touch records them without recomputing
    sh("snakemake --touch --cores 1", clone)
    assert "Nothing to be done" in sh("snakemake -n --cores 1", clone)


def test_missing_dvc_remote_is_a_clear_error(smoke_repo, tmp_path):
    clone = tmp_path / "clone"
    sh(f"git clone -q {smoke_repo} {clone}", tmp_path)
    sh("dvc remote modify local url /nonexistent/clipbackdoor-remote", clone)
    proc = subprocess.run("dvc pull", cwd=clone, shell=True, capture_output=True, text=True, env=ENV)
    assert proc.returncode != 0
    assert "missing" in (proc.stdout + proc.stderr).lower()


def test_every_attack_runs_end_to_end_on_the_smoke_profile(tmp_path):
    """One smoke-profile Snakemake run over all registered attacks (seed 0): the learned-trigger stages
    (badclip_patch, issba_codec) run first, and every attack reaches summary.csv with its defenses."""
    from clipbackdoor.attacks import REGISTRY

    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "configs" / "smoke.yaml").read_text())
    params["poison"]["attacks"] = list(REGISTRY)
    params["repair"]["methods"] = ["cleanclip", "roclip"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("snakemake all --cores 2", repo)
    assert {"badclip_patch", "issba_codec", "lc_adversarial"} <= snakemake_jobs(out)
    import pandas as pd

    summary = pd.read_csv(repo / "results/metrics/summary.csv")
    for attack in REGISTRY:
        rows = summary[summary.attack == attack]
        assert {"none", "decomp_rep", "decomp_rep_heads", "decomp_rep_mlp", "decomp_det", "cleanclip",
                "cleanclip+decomp_rep", "roclip", "roclip+decomp_rep", "strip", "scaleup", "teco"} <= set(rows.defense), attack
        assert (repo / f"results/attacks/{attack}-s0.png").exists(), attack
    assert (repo / "results/attacks/badclip-s0_patch.png").exists()
    assert (repo / "results/attacks/issba-s0_codec.png").exists()
    for i in range(1, 6):
        assert (repo / f"results/tables/table{i}.md").stat().st_size > 200
    assert (repo / "results/analysis/textspan/badclip-s0_world.md").exists()


def test_abd_study_runs_end_to_end_on_the_smoke_profile(tmp_path):
    """Seed 002's study on the smoke world: generator -> every ABD arm -> decompose/defend -> Tables I-III, Fig. 2."""
    import pandas as pd

    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "configs" / "smoke.yaml").read_text())
    params["poison"]["attacks"] = ["badnet", "blended"]
    params["repair"]["methods"] = ["cleanclip", "roclip", "abd", "abd_img_only", "abd_eda_only", "finetune_clean", "uap"]
    for section in ("detect", "analysis"):
        params.pop(section)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("snakemake all --cores 2", repo)
    assert {"abd_generator", "abd_finetune", "abd_similarity", "abd_tables"} <= snakemake_jobs(out)
    summary = pd.read_csv(repo / "results/metrics/summary.csv")
    for attack in ("badnet", "blended"):
        assert {"none", "cleanclip", "roclip", "abd", "abd+decomp_rep", "abd_img_only", "abd_eda_only",
                "finetune_clean", "uap", "uap_lbd"} <= set(summary[summary.attack == attack].defense), attack
    fig2 = (repo / "results/tables/abd_fig2.md").read_text()
    assert sum(line.startswith("| badnet-s0 |") or line.startswith("| blended-s0 |") for line in fig2.splitlines()) == 16
    table1 = (repo / "results/tables/abd_table1.md").read_text()
    assert "| Ours (ABD) |" in table1 and "## Claim check" in table1
    for name in ("abd_table2.md", "abd_table3.md"):
        assert "| Victim |" in (repo / "results/tables" / name).read_text()


def test_b2_branch_runs_as_its_own_target_on_the_smoke_profile(tmp_path):
    """`snakemake b2`: world -> clean CLIP -> t2i_pretrain -> t2i_backdoor -> b2_audit, outside `all`."""
    import pandas as pd

    repo = copy_repo(tmp_path / "repo")
    shutil.copy(repo / "configs" / "smoke.yaml", repo / "params.yaml")
    out = sh("snakemake b2 --cores 2", repo)
    assert {"t2i_pretrain", "t2i_backdoor", "b2_audit"} <= snakemake_jobs(out)
    assert not {"finetune", "poison", "summary"} & snakemake_jobs(out)  # the B² branch needs no attack run
    audit = pd.read_csv(repo / "results/metrics/b2.csv")
    assert set(audit.generator) == {"backdoored", "clean"} and audit.prompt.nunique() == 2
    assert {"seed (full vocab)", "discrete + contrast"} <= set(audit.audit)
    md = (repo / "results/tables/b2_audit.md").read_text()
    assert "## Position study" in md and "| discrete + contrast | backdoored |" in md
    metrics = json.loads((repo / "data/t2i/b2/metrics.json").read_text())
    assert {"bias_rate/both", "bias_rate/neither", "clean_generator/bias_rate/both"} <= set(metrics)
