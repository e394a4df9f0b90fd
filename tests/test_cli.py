"""Stage CLIs: user errors give one line naming the culprit and the fix, exit 2, and leave nothing behind."""

import json

from conftest import run_cli

BADNET = {"rate": 0.25, "patch_size": 4, "location": "bottom_right", "pattern": "random"}


def _poison_args(world_dirs, tmp_path, target="red circle", rate=0.25):
    params = json.dumps({"attacks.badnet": {**BADNET, "rate": rate}, "poison.target": target,
                         "poison.caption_templates": "embedded", "data.image_size": 32})
    return ["poison", "--params", params, "--run", "badnet-s0", "--finetune-dir", world_dirs / "train" / "finetune",
            "--eval", f"world={world_dirs / 'eval'}", "--out", tmp_path / "p", "--manifest", tmp_path / "m.parquet"]


def test_poison_cli_runs(world_dirs, tmp_path):
    proc = run_cli(*_poison_args(world_dirs, tmp_path))
    assert "'n_poisoned': 8" in proc.stdout and (tmp_path / "m.parquet").exists()


def test_target_not_a_class(world_dirs, tmp_path):
    proc = run_cli(*_poison_args(world_dirs, tmp_path, target="banana"), check=False)
    assert proc.returncode == 2
    assert "poison.target = 'banana' is not a class" in proc.stderr and "fix:" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "p").exists() and not (tmp_path / "m.parquet").exists()


def test_rate_selecting_zero_samples(world_dirs, tmp_path):
    proc = run_cli(*_poison_args(world_dirs, tmp_path, rate=0.001), check=False)
    assert proc.returncode == 2 and "selects zero of 32 samples" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_out_of_range_stage_param_is_rejected_before_work(world_dirs, tmp_path):
    proc = run_cli(*_poison_args(world_dirs, tmp_path, rate=1.5), check=False)
    assert proc.returncode == 2 and "attacks.badnet.rate = 1.5 is out of range" in proc.stderr


def test_missing_model_artifact(world_dirs, tmp_path):
    proc = run_cli("decompose", "--params", '{"decompose": {"centering": "reference", "normalize": true, '
                   '"batch_size": 8}}', "--model", tmp_path / "nomodel", "--eval-dir", world_dirs / "eval",
                   "--trigger", "none", "--out", tmp_path / "d.parquet", check=False)
    assert proc.returncode == 2 and "not a model artifact" in proc.stderr and "dvc pull" in proc.stderr
    assert not (tmp_path / "d.parquet").exists()


def test_log_option_captures_output(world_dirs, tmp_path):
    run_cli(*_poison_args(world_dirs, tmp_path), "--log", tmp_path / "logs" / "poison.log")
    assert "n_poisoned" in (tmp_path / "logs" / "poison.log").read_text()


def test_every_subcommand_and_argument_has_a_description():
    import argparse

    from clipbackdoor.pipeline.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert len(subs.choices) > 30
    missing = [f"{name} {a.option_strings or a.dest}" for name, sp in subs.choices.items() for a in sp._actions
               if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, missing
    assert all(sp.description for sp in subs.choices.values())
    assert "written atomically" in " ".join(subs.choices["poison"].format_help().split())  # --out: the shared table
