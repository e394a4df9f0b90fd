"""The poisoning-rate sweep: backdoor_eval's streamed counts, the sweep table, the DAG and its parameters."""

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT

ATTACK_CFG = {"rate": 0.25, "patch_size": 4, "location": "bottom_right", "pattern": "random"}


def test_backdoor_eval_counts_match_the_cached_decompositions(world_dirs, micro_model, tmp_path):
    """Streamed in batches that do not divide the set, with the run's trigger streams: the counts equal those of
    classifying the decomposition cache's embeddings (clean and triggered, same seed) with the class embeddings."""
    from clipbackdoor.decomposition.cache import read_decomposition
    from clipbackdoor.decomposition.stage import load_class_embeddings, run_class_embeddings, run_decompose
    from clipbackdoor.analysis.backdoor_eval import backdoor_eval
    from clipbackdoor.data.world import world_classes_json

    ev = world_dirs / "eval"
    target = world_classes_json(ev)["classnames"][1]
    out = backdoor_eval(micro_model, ev, "badnet", ATTACK_CFG, 3, target, "embedded", 16, tmp_path / "e.json")
    run_class_embeddings(micro_model, ev, tmp_path / "classes.safetensors", "embedded")
    class_emb, names = load_class_embeddings(tmp_path / "classes.safetensors")
    preds = {}
    for trigger in ("none", "badnet"):
        run_decompose(micro_model, ev, tmp_path / f"{trigger}.parquet", trigger, {"badnet": ATTACK_CFG}, 3,
                      "reference", True, 64)
        d = read_decomposition(tmp_path / f"{trigger}.parquet")
        preds[trigger] = (d.embedding / np.linalg.norm(d.embedding, axis=1, keepdims=True) @ class_emb.T).argmax(1)
    labels, t = d.labels, names.index(target)
    assert out["n_clean"] == len(labels) == 40 and out["n_asr"] == int((labels != t).sum())
    assert out["cacc_hits"] == int((preds["none"] == labels).sum())
    assert out["asr_hits"] == int((preds["badnet"][labels != t] == t).sum())
    assert out["asr_all_hits"] == int((preds["badnet"] == t).sum())
    assert out["asr_all_hits"] != out["cacc_hits"] or out["asr_hits"] > 0  # (counts of two different things)


def test_sweep_table_and_figure_from_two_poisoned_sets(world_dirs, micro_model, tmp_path):
    from clipbackdoor.attacks.poison import poison
    from clipbackdoor.analysis.figures import rate_sweep_figure
    from clipbackdoor.analysis.backdoor_eval import backdoor_eval
    from clipbackdoor.analysis.rate_sweep import rate_sweep
    from clipbackdoor.data.world import world_classes_json

    ev = world_dirs / "eval"
    classes = world_classes_json(ev)
    target = classes["classnames"][0]
    points = []
    for rate in (0.25, 0.5):
        cfg = {**ATTACK_CFG, "rate": rate}
        poison(world_dirs / "train" / "finetune", classes, tmp_path / f"p{rate}", tmp_path / f"m{rate}.parquet",
               "badnet", cfg, target, classes["templates"], 32, 0)
        backdoor_eval(micro_model, ev, "badnet", cfg, 0, target, "embedded", 64, tmp_path / f"e{rate}.json")
        points.append(("badnet-s0", "eval", rate, tmp_path / f"e{rate}.json", tmp_path / f"m{rate}.parquet"))
    table = rate_sweep(points[::-1], 0, tmp_path / "sweep.csv")
    rate_sweep_figure(table, tmp_path / "sweep.png")
    assert table.rate.tolist() == [0.25, 0.5] and table.n_poisoned.tolist() == [8, 16]  # of 32 fine-tuning pairs
    assert (table.asr_lo <= table.asr).all() and (table.asr <= table.asr_hi).all()
    assert (table.cacc_lo <= table.cacc).all() and (table.cacc <= table.cacc_hi).all()
    assert pd.read_csv(tmp_path / "sweep.csv").shape == (2, 15)
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    again = rate_sweep(points, 0, tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == (tmp_path / "sweep.csv").read_bytes()  # seeded per row
    assert again.equals(table)


def _sweep_params(**sweep):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sweep"] = {"attacks": ["badnet", "blended"], "rates": [0.01, 0.05], "batch_size": 256, **sweep}
    return params


def test_sweep_points_reuse_the_runs_own_rate():
    from clipbackdoor.pipeline.runs import sweep_points

    params = _sweep_params()
    assert params["attacks"]["badnet"]["rate"] == 0.05 and params["attacks"]["blended"]["rate"] == 0.04
    assert sweep_points(params) == [("badnet-s0", "0.01", False), ("badnet-s0", "0.05", True),
                                    ("blended-s0", "0.01", False), ("blended-s0", "0.05", False)]
    assert sweep_points(yaml.safe_load((ROOT / "params.yaml").read_text()) | {"sweep": None}) == []


@pytest.mark.parametrize("attacks, needle", [(["wanet"], "poison.attacks does not"),
                                             (["label_consistent"], "lc_adversarial")])
def test_sweep_of_an_attack_it_cannot_reuse_is_refused(attacks, needle, tmp_path):
    """By `validate` and at workflow load: one line naming the key, exit 2."""
    params = _sweep_params(attacks=attacks)
    if attacks == ["label_consistent"]:
        params["poison"]["attacks"].append("label_consistent")
        params["attacks"]["label_consistent"]["adv_eps"] = 0.03
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in ([sys.executable, "-m", "clipbackdoor", "validate", str(tmp_path / "bad.yaml")],
                [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(tmp_path / "bad.yaml")]):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and needle in proc.stderr and "sweep.attacks lists" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_sweep_dag_fine_tunes_only_the_new_rates(tmp_path):
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(_sweep_params(), sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall", "--cores", "2", "--configfile",
                           str(tmp_path / "sweep.yaml")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = proc.stdout
    assert len(re.findall(r"^rule sweep_finetune:", out, flags=re.M)) == 3
    assert "--rate 0.01" in out and "data/sweep/badnet-s0/r0.01/model" in out
    assert "data/sweep/badnet-s0/r0.05/model" not in out  # badnet's own rate: its run's model is the point
    assert "--model data/models/badnet-s0 --eval-dir data/datasets/eval/world --trigger badnet-s0" in out
    assert "results/sweep/metrics/rate_sweep.csv" in out and "results/sweep/figures/asr_vs_rate.png" in out


def test_poison_rate_override_is_checked():
    proc = subprocess.run([sys.executable, "-m", "clipbackdoor", "poison", "--params", "{}", "--run", "badnet-s0",
                           "--finetune-dir", "x", "--eval", "w=x", "--out", "o", "--manifest", "m", "--rate", "1.5"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "a poisoning rate is a fraction in (0, 1]" in proc.stderr


