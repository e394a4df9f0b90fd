"""Extensions registered from outside the package (tests/toy_extension: a package with an installed-distribution
record declaring four entry points in the ``clipbackdoor.extensions`` group): a toy attack, a repairing defense, a
detecting defense and an input-level detector reach the schema, the stages, the metrics and the tables with no edit
of clipbackdoor. The smoke profile end to end with them: tests/test_extensions_e2e.py (slow)."""

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from clipbackdoor import extensions
from clipbackdoor.config import DefendConfig, Params, build, validate_params
from clipbackdoor.errors import UserError
from conftest import ROOT, run_cli

TOY = Path(__file__).parent / "toy_extension"


def toy_params() -> dict:
    """The smoke profile with the four toy extensions configured."""
    params = yaml.safe_load((ROOT / "configs/smoke.yaml").read_text())
    params["poison"]["attacks"] = ["badnet", "toy_corner"]
    params["attacks"]["toy_corner"] = {"rate": 0.05, "size": 4, "level": 255}
    params["defend"]["extensions"] = {"toy_mlp": {"layers": 1}, "toy_flag": {"threshold": 1.0}}
    params["detect"]["detectors"] = ["strip", "toy_conf"]
    params["detect"]["extensions"] = {"toy_conf": {"temperature": 2.0}}
    return params


@pytest.fixture
def toy(monkeypatch):
    """The toy package installed: on the import path, as pip would leave it (its .dist-info holds the entry
    points). The registry is read afresh before and after."""
    import importlib

    monkeypatch.setattr(sys, "path", [str(TOY), *sys.path])  # (restored afterwards)
    importlib.invalidate_caches()
    extensions.registered.cache_clear()
    yield
    extensions.registered.cache_clear()
    for name in [m for m in sys.modules if m == "toyext" or m.startswith("toyext.")]:
        del sys.modules[name]


@pytest.fixture
def no_extensions():
    extensions.registered.cache_clear()
    yield
    extensions.registered.cache_clear()


def test_entry_points_register_each_extension_from_one_module(toy):
    from clipbackdoor.attacks import REGISTRY, make_trigger
    from clipbackdoor.detectors.scores import registry

    assert [e.name for e in extensions.registered()] == ["toy_conf", "toy_corner", "toy_flag", "toy_mlp"]
    assert REGISTRY["toy_corner"].__module__ == "toyext.corner_attack" and "badnet" in REGISTRY
    assert list(registry()) == ["strip", "scaleup", "teco", "toy_conf"]  # built-ins first, in the stage's order
    params = toy_params()
    validate_params(params)  # their blocks are part of the schema
    typed = build(Params, params)
    assert typed.defend.extensions == {"toy_mlp": {"layers": 1}, "toy_flag": {"threshold": 1.0}}
    trigger = make_trigger("toy_corner", params["attacks"]["toy_corner"], 32, 0)
    import torch

    out, _ = trigger.apply(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), np.random.default_rng(0))
    assert out[:, :, :4, :4].eq(255).all() and out[:, :, 4:].eq(0).all()
    assert extensions.detection_kind("toy_flag") == "decisions" and extensions.detection_kind("toy_conf") == "scores"
    assert extensions.detection_kind("toy_mlp") is None


@pytest.mark.parametrize("edit, culprit", [
    (lambda p: p["attacks"]["toy_corner"].update(size=0), "attacks.toy_corner.size = 0 is out of range"),
    (lambda p: p["attacks"]["toy_corner"].pop("rate"), "'rate' is a required property (under attacks.toy_corner)"),
    (lambda p: p["defend"]["extensions"]["toy_mlp"].pop("layers"), "(under defend.extensions.toy_mlp)"),
    (lambda p: p["defend"]["extensions"].update(toy_mpl={}), "unknown key(s) 'toy_mpl' under defend.extensions "
                                                             "(did you mean 'toy_mlp'?)"),
    (lambda p: p["detect"]["extensions"]["toy_conf"].update(temperature=0), "detect.extensions.toy_conf.temperature"),
])
def test_extension_blocks_are_checked_by_their_own_schema(toy, edit, culprit):
    params = toy_params()
    edit(params)
    with pytest.raises(UserError) as err:
        validate_params(params, "p.yaml")
    assert culprit in str(err.value)


def test_without_the_extension_its_names_are_refused(no_extensions):
    with pytest.raises(UserError, match=r"unknown key\(s\) 'toy_corner' under attacks"):
        validate_params(toy_params(), "p.yaml")
    cfg = DefendConfig("cosine", 0.5, 1, 1, 0, (), (), 0, extensions={"toy_mlp": {"layers": 1}})
    from clipbackdoor.defenses.defend import extension_defenses

    with pytest.raises(UserError, match="defend.extensions.toy_mlp: no such defense is registered"):
        extension_defenses(cfg)


def test_toy_defenses_run_on_cached_decompositions_and_the_detector_one_gets_an_auroc(toy, tmp_path):
    import dataclasses

    from test_defend import CFG, _cache, results

    r = results(_cache(tmp_path), dataclasses.replace(CFG, extensions={"toy_mlp": {"layers": 1},
                                                                       "toy_flag": {"threshold": 1.0}}))
    repair, flag = r[("toy_mlp", "last=1")], r[("toy_flag", "threshold=1")]
    # the planted backdoor lives in a head: replacing the last MLP changes nothing (ASR and CACC are scored)
    assert repair["asr"] == 1.0 and repair["cacc"] == 1.0 and "auroc" not in repair
    # the detecting defense declared itself a detector: AUROC (+ TPR / FPR of its flag), no ASR
    assert flag["auroc"] == 1.0 and flag["tpr"] == 1.0 and flag["fpr"] == 0.0 and "asr" not in flag
    assert r[("none", "-")]["asr"] == 1.0  # the built-in settings are unchanged around them


def test_a_detection_score_is_found_by_declaration_not_by_name(no_extensions):
    from clipbackdoor.analysis.metrics import setting_rows

    table = pd.DataFrame({"defense": ["decomp_det_lookalike"] * 4, "variant": "-",
                          "split": ["clean", "clean", "triggered", "triggered"], "index": [0, 1, 0, 1],
                          "label": [0, 1, 0, 1], "pred": [1, 1, 1, 1], "score": [0.1, 0.2, 0.8, 0.9]})
    row, = setting_rows(table, target=1)
    assert "auroc" not in row and row["asr"] == 1.0  # named like Decomp-Det, but nothing declares it a detector
    row, = setting_rows(table.assign(defense="decomp_det"), target=1)
    assert row["auroc"] == 1.0 and row["tpr"] == 1.0


def test_toy_attack_and_detector_through_the_detect_stage(toy, world_dirs, micro_model, tmp_path):
    from clipbackdoor.config import DetectConfig
    from clipbackdoor.decomposition.stage import run_class_embeddings, run_decompose
    from clipbackdoor.detectors.detect import run_detect
    from clipbackdoor.analysis.metrics import setting_rows
    from clipbackdoor.decomposition.prototypes import build_prototypes

    ev = world_dirs / "eval"
    run_decompose(micro_model, ev, tmp_path / "none.parquet", "none", {}, 0, "reference", True, 64)
    build_prototypes(tmp_path / "none.parquet", tmp_path / "p.safetensors", 0.2, 0)
    run_class_embeddings(micro_model, ev, tmp_path / "c.safetensors", "embedded")
    cfg = DetectConfig(detectors=("toy_conf", "scaleup"), n_images=6, strip_n=2, teco_variants=("independent",),
                       seed=0, extensions={"toy_conf": {"temperature": 2.0}})
    run_detect(micro_model, ev, tmp_path / "p.safetensors", tmp_path / "c.safetensors", tmp_path / "d.parquet",
               "toy_corner-s0", toy_params()["attacks"]["toy_corner"], 0, cfg, target=0)
    table = pd.read_parquet(tmp_path / "d.parquet")
    assert list(dict.fromkeys(table.defense)) == ["scaleup", "toy_conf"]  # the registry's order, not the list's
    assert set(table.variant[table.defense == "toy_conf"]) == {"temperature=2,n_images=6"}
    scores = table[table.defense == "toy_conf"].score
    assert ((scores > 0) & (scores <= 1)).all()
    rows = {r["defense"]: r for r in setting_rows(table, 0)}
    assert 0 <= rows["toy_conf"]["auroc"] <= 1 and "tpr" not in rows["toy_conf"]


def test_tables_and_the_main_table_list_the_extensions(toy, tmp_path):
    from clipbackdoor.analysis.report import main_table, with_method
    from clipbackdoor.analysis.tables import write_tables

    rows = [("none", "-", 0.9, 0.95, None), ("toy_mlp", "last=1", 0.5, 0.94, None),
            ("toy_flag", "threshold=1", None, None, 0.8), ("toy_conf", "temperature=2,n_images=8", None, None, 0.7),
            ("decomp_det", "rule=cosine", None, None, 0.99)]
    df = pd.DataFrame([{"attack": "toy_corner", "seed": 0, "eval_set": "world", "target": "red circle",
                        "repair": "-", "defense": d, "variant": v, "asr": a, "asr_all": a, "cacc": c, "auroc": u}
                       for d, v, a, c, u in rows])
    df.to_csv(tmp_path / "summary.csv", index=False)
    write_tables(tmp_path / "summary.csv", tmp_path, [])
    table1 = (tmp_path / "table1.md").read_text()
    assert "| Methods | Toy corner ASR (down) | Toy corner CACC (up) |" in table1  # the attack's title
    assert "| + Toy MLP repair | 50.00 | 94.00 |" in table1
    table2 = (tmp_path / "table2.md").read_text()
    assert "| Toy confidence | 70.00 | 70.00 |" in table2 and "| Toy distance flag | 80.00 | 80.00 |" in table2
    assert "8 test images" in table2  # the extension detector's subsample is stated like the built-ins'
    assert {"toy_mlp", "toy_flag", "toy_conf"} <= set(main_table(with_method(df)).defense)


def test_a_broken_or_misnamed_entry_point_is_one_line(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(TOY / "toyext", site / "toyext")
    info = site / "bad-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bad\nVersion: 0.1\n")
    env = {"PYTHONPATH": str(site)}
    for entry, message in [("toy_gone = toyext.missing:ATTACK", "entry point 'toy_gone' = 'toyext.missing:ATTACK' "
                            "(group clipbackdoor.extensions, package bad) does not load (ModuleNotFoundError"),
                           ("badnet = toyext.corner_attack:ATTACK", "names an extension 'toy_corner'"),
                           ("toy_corner = toyext.corner_attack:CornerSquare", "is a type, not a clipbackdoor")]:
        (info / "entry_points.txt").write_text(f"[clipbackdoor.extensions]\n{entry}\n")
        proc = run_cli("validate", ROOT / "configs/smoke.yaml", check=False, env=env)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 2  # the culprit, the fix
    # an extension with a built-in's name
    (site / "toyext" / "clash.py").write_text("from clipbackdoor.extensions import Detector\n"
                                              "DETECTOR = Detector('strip', lambda *a: [])\n")
    (info / "entry_points.txt").write_text("[clipbackdoor.extensions]\nstrip = toyext.clash:DETECTOR\n")
    proc = run_cli("validate", ROOT / "configs/smoke.yaml", check=False, env=env)
    assert proc.returncode == 2 and "extension detector 'strip'" in proc.stderr, proc.stderr


def test_the_toy_package_is_not_installed_in_the_project_environment():
    """The extensions are found only where the package is on the path: the other tests see the built-ins."""
    assert not any(str(TOY) == p for p in sys.path) and "toyext" not in os.environ.get("PYTHONPATH", "")


def test_the_built_in_defense_names_are_declared(toy, tmp_path):
    """An extension may not take a name the defend stage writes: the declared list holds every one it writes."""
    import dataclasses

    from test_defend import CFG, _cache, results

    written = {d for d, _ in results(_cache(tmp_path), dataclasses.replace(CFG, extensions={"toy_mlp": {"layers": 1}}))}
    assert written - {"toy_mlp"} == set(extensions.BUILTIN_DEFENSES)


@pytest.mark.parametrize("ext, message", [
    (extensions.Defense("cleanclip", lambda *a: iter(())), "extension defense 'cleanclip'"),
    (extensions.Defense("decomp_rep", lambda *a: iter(())), "extension defense 'decomp_rep'"),
    (extensions.Defense("teco", lambda *a: iter(())), "extension defense 'teco'"),
])
def test_an_extension_may_not_take_a_built_in_name(monkeypatch, ext, message):
    monkeypatch.setattr(extensions, "registered", lambda: (ext,))
    with pytest.raises(UserError, match=message):
        validate_params(yaml.safe_load((ROOT / "configs/smoke.yaml").read_text()))


def test_a_listed_detector_whose_settings_are_required_needs_its_block(monkeypatch):
    needy = extensions.Detector("needy", lambda *a: [], schema={
        "type": "object", "required": ["k"], "properties": {"k": {"type": "integer"}}})
    monkeypatch.setattr(extensions, "registered", lambda: (needy,))
    params = yaml.safe_load((ROOT / "configs/smoke.yaml").read_text())
    validate_params(params)  # not listed: nothing asked
    params["detect"]["detectors"] = ["strip", "needy"]
    with pytest.raises(UserError, match="detect.detectors lists 'needy' but detect.extensions.needy is missing"):
        validate_params(params, "p.yaml")
    params["detect"]["extensions"] = {"needy": {"k": 3}}
    validate_params(params)
