"""End to end on the smoke profile: Snakemake, DVC, incremental reruns, push/pull (marked slow)."""

import hashlib
import json
import os
import re
import shutil
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


B2 = {"t2i_pretrain", "t2i_backdoor", "b2_audit"}  # smoke.yaml has a `b2` section: `all` holds the B² branch
ALL = {"world", "pretrain", "poison", "finetune", "decompose", "class_embeddings", "prototypes", "defend",
       "summary", "figures", "cleanclip", "detect", "mmd", "textspan", "tables", "head_map", "training_curves"} | B2 \
    | {"sweep_poison", "sweep_finetune", "backdoor_eval", "rate_sweep"}  # smoke.yaml's rate sweep (one new rate)
AFTER_DEFEND = {"defend", "summary", "figures", "tables", "head_map"}  # (the head map draws defend's flag rule)


def dvc_rules(out: str) -> set[str]:
    """DVC stage names -> the rule they come from (stage = rule + wildcard values)."""
    rules = set()
    for name in dvc_stages(out):
        rules.add(next((r for r in sorted(ALL, key=len, reverse=True) if name == r or name.startswith(r + "_")), name))
    return rules


def set_param(repo: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def commit(repo: Path, message: str) -> None:
    if not (repo / ".git").exists():
        sh("git init -q", repo)
    sh(f"git add -A && git -c user.email=t@t -c user.name=t commit -qm {message}", repo)


def lock_outs(repo: Path) -> dict[str, str]:
    """{output path: md5} of every stage in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    repo = copy_repo(base / "repo")
    shutil.copy(repo / "configs" / "smoke.yaml", repo / "params.yaml")
    sh("python -m clipbackdoor dvc-yaml", repo)  # dvc.yaml of the smoke parameters (the committed one: defaults)
    commit(repo, "smoke")
    return repo


def test_snakemake_runs_the_pipeline_and_reruns_only_what_changed(smoke_repo):
    out = sh("snakemake --cores 2", smoke_repo)
    assert snakemake_jobs(out) == ALL
    from clipbackdoor.analysis.report import read_summary

    summary = read_summary(smoke_repo / "results/smoke/metrics/summary.csv")
    assert list(summary.columns[:7]) == ["attack", "seed", "eval_set", "target", "repair", "defense", "variant"]
    methods = set(zip(summary.attack, summary.method))
    assert {("clean", "none"), ("badnet", "decomp_rep"), ("badnet", "cleanclip+decomp_rep"), ("badnet", "strip"),
            ("badnet", "teco")} <= methods
    rates = summary.dropna(subset=["asr"])  # every rate has its interval and its sample size
    assert (rates.asr_lo <= rates.asr).all() and (rates.asr <= rates.asr_hi).all() and (rates.n_asr > 0).all()
    assert (smoke_repo / "data/benchmarks/pretrain.tsv").exists() and (smoke_repo / "data/logs/world.log").exists()
    assert (smoke_repo / "results/smoke/figures/fig5_prototype_cosine.png").stat().st_size > 10_000
    sweep = pd.read_csv(smoke_repo / "results/smoke/metrics/rate_sweep.csv")  # the new rate and the run's own
    assert sweep.rate.tolist() == [0.02, 0.05] and sweep.n_poisoned.iloc[0] < sweep.n_poisoned.iloc[1]
    own = summary[(summary.attack == "badnet") & (summary.method == "none")].iloc[0]
    assert abs(sweep.asr.iloc[1] - own.asr) < 0.2  # all images vs the summary's test split: one model, close
    history = pd.read_csv(smoke_repo / "data/models/badnet-s0/history.csv")
    assert len(history) == yaml.safe_load((smoke_repo / "params.yaml").read_text())["finetune"]["steps"]
    assert "## Position study" in (smoke_repo / "results/smoke/tables/b2_audit.md").read_text()  # B², part of `all`
    sh("snakemake --report report.html --cores 1", smoke_repo)  # tables, figures, TEXTSPAN in the HTML report
    html = (smoke_repo / "report.html").read_text(errors="replace")
    assert all(name in html for name in ("table1.html", "table5.html", "fig6_eps_sweep.png", "badnet-s0_world.html",
                                         "roc_detectors.png", "summary.html", "badnet-s0.png", "preview.png",
                                         "head_map.png", "training_loss.png", "asr_vs_rate.png"))
    assert all(section in html for section in ("1. Attacks", "2. Core study", "3. Baselines and detectors"))
    from clipbackdoor.analysis.screenshot import find_browser, screenshot_report

    if find_browser():  # (no browser on the CI machine: `make html-report` where there is one)
        png = screenshot_report(smoke_repo / "report.html", smoke_repo / "report.png",
                                ["2. Core study", "Tables", "results/smoke/tables/table1.html"])
        assert png.stat().st_size > 20_000

    assert "Nothing to be done" in sh("snakemake -n --cores 2", smoke_repo)
    set_param(smoke_repo, "pretrain", "steps", 31)  # a pretraining edit: pretraining and what depends on it
    assert snakemake_jobs(sh("snakemake -n --cores 2", smoke_repo)) == ALL - {"world", "poison", "sweep_poison"}
    set_param(smoke_repo, "pretrain", "steps", 30)
    set_param(smoke_repo, "defend", "eps", 0.25)  # a defend edit: only defend and what reads it
    assert snakemake_jobs(sh("snakemake --cores 2", smoke_repo)) == AFTER_DEFEND


def test_lock_records_the_run_and_push_sends_every_output(smoke_repo):
    """No dvc.lock after a Snakemake run made `dvc status` list every stage and `dvc push` push nothing."""
    sh("python -m clipbackdoor dvc-yaml", smoke_repo)  # params.yaml was edited (defend.eps): same stages
    out = sh("python -m clipbackdoor lock", smoke_repo)
    assert "every stage is current" in out, out
    # dvc commit rewrote every output; their times are kept, so Snakemake still has nothing to do
    assert "Nothing to be done" in sh("snakemake -n --cores 2", smoke_repo)
    assert sh("dvc status", smoke_repo).strip().endswith("Data and pipelines are up to date.")
    outs = lock_outs(smoke_repo)
    stages = yaml.safe_load((smoke_repo / "dvc.yaml").read_text())["stages"]
    assert set(outs) == {o for st in stages.values() for o in st["outs"]}  # every stage recorded, B² included
    assert any(p.startswith("data/decomp/") for p in outs) and "results/smoke/metrics/b2.csv" in outs
    # Snakemake does not track the package's code, DVC does: a module edited after a stage ran keeps it out
    module = smoke_repo / "src/clipbackdoor/defenses/defend.py"
    before = module.stat()
    module.touch()
    out = sh("python -m clipbackdoor lock", smoke_repo)
    assert "left out because their code (src/clipbackdoor) changed after they ran (e.g. " in out, out
    os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert "every stage is current" in sh("python -m clipbackdoor lock", smoke_repo)
    push = sh("dvc push", smoke_repo)
    assert "Everything is up to date" not in push
    remote = smoke_repo.parent / "clipbackdoor-dvc-remote"  # the default remote: a folder next to the repository
    assert sum(1 for p in remote.rglob("*") if p.is_file()) >= len(outs)
    commit(smoke_repo, "lock")


def test_a_second_run_gives_byte_identical_artifacts(smoke_repo, tmp_path):
    """Two identical Snakemake runs in two copies: every output has the same hash (prototypes' safetensors
    metadata, the models' metrics.json included), so DVC sees one result, not two."""
    other = copy_repo(tmp_path / "repo")
    shutil.copy(smoke_repo / "params.yaml", other / "params.yaml")
    shutil.copy(smoke_repo / "dvc.yaml", other / "dvc.yaml")
    commit(other, "again")
    assert snakemake_jobs(sh("snakemake --cores 2", other)) == ALL
    assert "every stage is current" in sh("python -m clipbackdoor lock", other)
    mine, theirs = lock_outs(smoke_repo), lock_outs(other)
    assert mine.keys() == theirs.keys()
    differ = sorted(p for p in mine if mine[p] != theirs[p])
    assert not differ, f"not byte-identical across two runs: {differ[:5]}"


def test_fresh_clone_pulls_and_snakemake_plans_nothing(smoke_repo, tmp_path):
    clone = smoke_repo.parent / "clone"
    sh(f"git clone -q {smoke_repo} {clone}", tmp_path)
    assert not (clone / "data/models/clean").exists()
    sh("dvc pull", clone)
    assert digest(clone / "data/models/clean/model.safetensors") == \
        digest(smoke_repo / "data/models/clean/model.safetensors")
    assert sh("dvc status", clone).strip().endswith("Data and pipelines are up to date.")
    # `dvc pull` sets fresh mtimes in arbitrary order: --touch records them without recomputing
    sh("snakemake --touch --cores 1", clone)
    assert "Nothing to be done" in sh("snakemake -n --cores 1", clone)
    summary = "results/smoke/metrics/summary.csv"
    assert (clone / summary).read_bytes() == (smoke_repo / summary).read_bytes()


def test_decompositions_alone_let_a_colleague_run_the_defenses(smoke_repo, tmp_path):
    """`make pull-decomp` then `make defenses`: no model weights, no GPU; only defend and the results rerun."""
    clone = smoke_repo.parent / "colleague"
    sh(f"git clone -q {smoke_repo} {clone}", tmp_path)
    makefile = (clone / "Makefile").read_text()
    pull = [line.strip() for line in makefile.split("pull-decomp: setup\n")[1].split("\n\n")[0].splitlines()]
    for cmd in pull:
        sh(cmd, clone)
    assert list((clone / "data/decomp").rglob("*.parquet")) and not list(clone.rglob("model.safetensors"))
    defenses = makefile.split("defenses: setup\n")[1].splitlines()[0].strip().replace("$(CORES)", "2")
    out = sh(defenses, clone)
    assert snakemake_jobs(out) == {"defenses", "defend", "mmd", "summary", "tables", "figures", "head_map"}
    summary = "results/smoke/metrics/summary.csv"
    assert (clone / summary).read_bytes() == (smoke_repo / summary).read_bytes()


def test_a_flipped_byte_in_a_cached_decomposition_is_refused_by_its_reader(smoke_repo, tmp_path):
    decomp = smoke_repo / "data/decomp/badnet-s0/world/badnet-s0.parquet"
    copy = tmp_path / decomp.name
    shutil.copy2(decomp, copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the head columns' fp16 values
    copy.write_bytes(bytes(data))
    proc = subprocess.run(f"python -m clipbackdoor prototypes --params @params.yaml:prototypes --decomp {copy} "
                          f"--out {tmp_path / 'p.safetensors'}", cwd=smoke_repo, shell=True, capture_output=True,
                          text=True, env=ENV)
    assert proc.returncode == 2 and "changed after the file was written" in proc.stderr, proc.stderr
    assert not (tmp_path / "p.safetensors").exists()


def test_dvc_exp_run_reruns_exactly_what_a_key_reaches(smoke_repo):
    out = sh("dvc exp run -S defend.eps=0.3", smoke_repo)
    assert dvc_rules(out) == AFTER_DEFEND, sorted(dvc_stages(out))
    # a key that reshapes the stage graph is refused with the fix, never silently ignored
    proc = subprocess.run("dvc exp run -S 'poison.attacks=[badnet,blended]'", cwd=smoke_repo, shell=True,
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode != 0
    assert ("params.yaml's runs (badnet-s0, blended-s0) is not what dvc.yaml's stages were generated for (badnet-s0)"
            in proc.stdout + proc.stderr)
    assert dvc_rules(proc.stdout + proc.stderr) == {"summary"}  # the one stage listing the key, which refuses
    sh("git checkout -q params.yaml dvc.lock && dvc checkout -q", smoke_repo)  # (DVC removed summary's outputs)


def test_missing_dvc_remote_is_a_clear_error(smoke_repo, tmp_path):
    clone = tmp_path / "clone"
    sh(f"git clone -q {smoke_repo} {clone}", tmp_path)
    sh("dvc remote modify local url /nonexistent/clipbackdoor-remote", clone)
    proc = subprocess.run("dvc pull", cwd=clone, shell=True, capture_output=True, text=True, env=ENV)
    assert proc.returncode != 0
    assert "missing" in (proc.stdout + proc.stderr).lower()


def test_every_attack_runs_end_to_end_on_the_smoke_profile(tmp_path):
    """One smoke-profile Snakemake run over the registered attacks (seed 0) the smoke_repo tests do not run: the
    learned-trigger stages (badclip_patch, issba_codec, lc_adversarial) run first, and every attack reaches
    summary.csv with the decomposition defenses and the input detectors. (The model repairs do not depend on the
    attack: CleanCLIP runs in the smoke_repo tests, RoCLIP and the ABD arms in the ABD study below.)"""
    from clipbackdoor.attacks import REGISTRY

    attacks = [a for a in REGISTRY if a != "badnet"]  # badnet: the smoke_repo tests
    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "configs" / "smoke.yaml").read_text())
    params["poison"]["attacks"] = attacks
    params["repair"]["methods"] = []
    params.pop("b2"), params.pop("sweep")  # the B² branch and the rate sweep run in the smoke_repo tests
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("snakemake all --cores 2", repo)
    assert {"badclip_patch", "issba_codec", "lc_adversarial"} <= snakemake_jobs(out)

    from clipbackdoor.analysis.report import read_summary

    summary = read_summary(repo / "results/smoke/metrics/summary.csv")
    assert set(summary.attack) == {"clean", *attacks}
    for attack in attacks:
        rows = summary[summary.attack == attack]
        assert {"none", "decomp_rep", "decomp_rep_heads", "decomp_rep_mlp", "decomp_det", "strip", "scaleup",
                "teco"} <= set(rows.method), attack
        assert (repo / f"results/shared/attacks/{attack}-s0.png").exists(), attack
    assert (repo / "results/shared/attacks/badclip-s0_patch.png").exists()
    assert (repo / "results/shared/attacks/issba-s0_codec.png").exists()
    for i in range(1, 6):
        assert (repo / f"results/smoke/tables/table{i}.md").stat().st_size > 200
    assert (repo / "results/smoke/analysis/textspan/badclip-s0_world.md").exists()


def test_abd_study_runs_end_to_end_on_the_smoke_profile(tmp_path):
    """Seed 002's study on the smoke world: generator -> every ABD arm -> decompose/defend -> Tables I-III, Fig. 2."""

    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "configs" / "smoke.yaml").read_text())
    params["poison"]["attacks"] = ["blended"]  # (one attack: the arms do not depend on it; badnet runs above)
    params["repair"]["methods"] = ["cleanclip", "roclip", "abd", "abd_img_only", "abd_eda_only", "finetune_clean", "uap"]
    for section in ("detect", "analysis", "b2", "sweep"):
        params.pop(section)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("snakemake all --cores 2", repo)
    assert {"abd_generator", "abd_finetune", "abd_similarity", "abd_tables"} <= snakemake_jobs(out)
    from clipbackdoor.analysis.report import read_summary

    summary = read_summary(repo / "results/smoke/metrics/summary.csv")
    assert {"none", "cleanclip", "roclip", "abd", "abd+decomp_rep", "abd_img_only", "abd_eda_only",
            "finetune_clean", "uap", "uap_lbd"} <= set(summary[summary.attack == "blended"].method)
    fig2 = (repo / "results/smoke/tables/abd_fig2.md").read_text()
    assert sum(line.startswith("| blended-s0 |") for line in fig2.splitlines()) == 8
    table1 = (repo / "results/smoke/tables/abd_table1.md").read_text()
    assert "| Ours (ABD) |" in table1 and "## Claim check" in table1
    for name in ("abd_table2.md", "abd_table3.md"):
        assert "| Victim |" in (repo / "results/smoke/tables" / name).read_text()


def test_b2_branch_runs_as_its_own_target_on_the_smoke_profile(smoke_repo):
    """`snakemake b2`: world -> clean CLIP -> t2i_pretrain -> t2i_backdoor -> b2_audit, no attack run (its jobs
    ran inside `all` above; here the plan of the target alone, and the audit's content)."""

    out = sh("snakemake b2 -n --forceall --cores 2", smoke_repo)
    assert B2 | {"world", "pretrain"} <= snakemake_jobs(out)
    assert not {"finetune", "poison", "summary"} & snakemake_jobs(out)  # the B² branch needs no attack run
    repo = smoke_repo
    audit = pd.read_csv(repo / "results/smoke/metrics/b2.csv")
    assert set(audit.generator) == {"backdoored", "clean"} and audit.prompt.nunique() == 2
    assert {"seed (full vocab)", "discrete + contrast"} <= set(audit.audit)
    md = (repo / "results/smoke/tables/b2_audit.md").read_text()
    assert "## Position study" in md and "| discrete + contrast | backdoored |" in md
    metrics = json.loads((repo / "data/t2i/b2/metrics.json").read_text())
    assert {"bias_rate/both", "bias_rate/neither", "clean_generator/bias_rate/both"} <= set(metrics)
