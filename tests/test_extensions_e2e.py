"""The toy extensions (tests/toy_extension, registered by entry points from outside the package) on the smoke
profile end to end: Snakemake poisons, fine-tunes, decomposes, defends and detects with them, and their rows reach
summary.csv, the printed report and the tables with no edit of clipbackdoor (marked slow: a few minutes)."""

import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import copy_repo
from test_extensions import TOY, toy_params

pytestmark = pytest.mark.slow


def test_toy_attack_defenses_and_detector_reach_the_summary_report_and_tables(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    params = toy_params()
    params["results"] = "toy"
    for optional in ("sweep", "b2", "analysis", "repair"):  # (not needed here: keeps the run short)
        params.pop(optional)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(TOY)}  # the toy package installed (its .dist-info declares the entry points)

    def sh(*cmd):
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    sh("snakemake", "summary", "tables", "--cores", "2")
    df = pd.read_csv(repo / "results/toy/metrics/summary.csv", dtype={"variant": str})
    assert {"badnet", "toy_corner"} <= set(df.attack)
    undefended = df[(df.attack == "toy_corner") & (df.defense == "none")]
    assert len(undefended) == 1 and undefended.asr.notna().all() and undefended.cacc.notna().all()
    for attack in ("badnet", "toy_corner"):
        mine = df[df.attack == attack].set_index("defense")
        assert pd.notna(mine.loc["toy_mlp", "asr"]) and pd.isna(mine.loc["toy_mlp", "auroc"])  # a repair
        assert pd.notna(mine.loc["toy_flag", "auroc"]) and pd.notna(mine.loc["toy_flag", "tpr"])  # declared detector
        assert pd.isna(mine.loc["toy_flag", "asr"])
        assert pd.notna(mine.loc["toy_conf", "auroc"]) and pd.isna(mine.loc["toy_conf", "tpr"])  # input detector
        assert mine.loc["toy_conf", "n_clean"] == params["detect"]["n_images"]
    report = sh(sys.executable, "-m", "clipbackdoor", "report", "--results", "toy")
    for name in ("toy_corner", "toy_mlp", "toy_flag", "toy_conf"):
        assert f"| {name} |" in report
    table1 = (repo / "results/toy/tables/table1.md").read_text()
    assert "Toy corner ASR (down)" in table1 and "| + Toy MLP repair |" in table1
    table2 = (repo / "results/toy/tables/table2.md").read_text()
    row = next(line for line in table2.splitlines() if line.startswith("| Toy confidence |"))
    assert "-" not in row.split("|")[2]  # a value for the first attack, not a dash
    assert "| Toy distance flag |" in table2
