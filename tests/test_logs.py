"""Stage logs: a header that says what ran where, progress as timestamped lines (no carriage returns), a footer."""

import re

from clipbackdoor.logs import header, progress
from conftest import run_cli

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_progress_in_a_file_log_is_timestamped_lines(capsys):
    bar = progress(range(5, 40), "finetune", total=40, initial=5, every_s=3600)
    seen = []
    for step in bar:
        seen.append(step)
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
    err = capsys.readouterr().err
    assert seen == list(range(5, 40)) and "\r" not in err
    lines = err.strip().splitlines()  # the first step and the last (nothing in between: every_s is an hour)
    assert len(lines) == 2
    assert re.fullmatch(STAMP + r" \[finetune\] 6/40 \(15 %\) [\d.]+ it/s loss=0.167", lines[0])
    assert re.fullmatch(STAMP + r" \[finetune\] 40/40 \(100 %\) [\d.]+ it/s loss=0.025", lines[1])


def test_a_loop_left_early_reports_where_it_stopped(capsys):
    for step in progress(range(100), "finetune", every_s=3600):
        if step == 9:
            break
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split("] ")[1].split(" ")[0] for line in lines] == ["1/100", "10/100"]


def test_a_failed_stage_log_ends_with_a_failed_footer(tmp_path):
    log = tmp_path / "prototypes.log"
    run_cli("prototypes", "--params", '{"prototypes.val_fraction":0.2,"prototypes.split_seed":0}', "--decomp",
            tmp_path / "missing.parquet", "--out", tmp_path / "p.safetensors", "--log", log, check=False)
    assert log.read_text().splitlines()[-1].startswith("# clipbackdoor prototypes failed ")


def test_other_ranks_stay_silent(capsys):
    assert list(progress(range(3), "x", disable=True)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_header_names_stage_code_and_command():
    text = header("prototypes", ["prototypes", "--params", '{"prototypes.val_fraction":0.2}'])
    assert text.startswith("# clipbackdoor prototypes started ")
    assert re.search(r"# code: git ([0-9a-f]{12}(\+dirty)?|unknown); python 3\.\d+\.\d+; clipbackdoor 0\.1\.0, torch ",
                     text)
    assert """# command: python -m clipbackdoor prototypes --params '{"prototypes.val_fraction":0.2}'""" in text


def test_a_stage_log_has_header_output_and_footer(tmp_path):
    log = tmp_path / "validate.log"
    run_cli("validate", "params.yaml", "--log", log)
    lines = log.read_text().splitlines()
    assert lines[0].startswith("# clipbackdoor validate started ") and lines[-1].startswith("# clipbackdoor validate done ")
    assert "params.yaml: valid (embedded profile)" in lines and re.search(r"after [\d.]+ s$", lines[-1])
    assert "\r" not in log.read_text()


def test_version():
    assert run_cli("--version").stdout.strip() == "clipbackdoor 0.1.0"
