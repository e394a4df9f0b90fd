"""The stage registry is the one declaration of every stage: the CLI is built from it, every rule's command agrees
with it (arguments, --params, --threads, GPU), and dvc.yaml's code dependencies come from its functions' modules."""

import inspect
import re

import pytest

from clipbackdoor.pipeline.dvcgen import rule_blocks, stage_modules
from clipbackdoor.pipeline.registry import BY_NAME, STAGES
from conftest import ROOT

COMMON = {"--log", "--params", "--threads"}


def rule_commands() -> dict[str, tuple[str, str]]:
    """{rule: (the stage its shell runs, the rule's text)}."""
    out = {}
    for rule, text in rule_blocks(ROOT).items():
        m = re.search(r"python -m clipbackdoor ([\w-]+)", text)
        if m:
            out[rule] = (m.group(1), text)
    return out


def shell_flags(text: str) -> set[str]:
    shell = text[text.index("shell:"):]
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", shell))


def test_every_stage_is_declared_once_and_loads_a_typed_function():
    assert len(BY_NAME) == len(STAGES) > 35
    for stage in STAGES:
        fn = stage.load()
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params] == ["args", "p"], stage.name
        # a stage that reads --params is given the typed view, never a raw dict
        assert (params[1].annotation in ("Params", "None")) and (params[1].annotation == "Params") == stage.params, \
            stage.name


@pytest.mark.parametrize("rule", sorted(rule_commands()))
def test_each_rule_calls_its_stage_as_the_registry_declares(rule):
    name, text = rule_commands()[rule]
    stage = BY_NAME[name]
    assert stage.pipeline, f"rule {rule} runs {name}, a command people run"
    flags = shell_flags(text)
    declared = {a.flag for a in stage.args}
    assert flags - COMMON <= declared, f"rule {rule} passes undeclared {flags - COMMON - declared}"
    required = {a.flag for a in stage.args if a.flag.startswith("--") and (
        a.required if a.required is not None else a.role in ("input", "output"))}
    assert required <= flags, f"rule {rule} does not pass {required - flags}"
    assert ("--params" in flags) == stage.params and ("--threads" in flags) == stage.threads, rule
    gpu = re.search(r"\n\s+gpu=", text) is not None
    assert gpu == stage.gpu, f"rule {rule}: resources gpu {gpu}, registry {stage.gpu}"


def test_every_pipeline_stage_has_a_rule():
    called = {name for name, _ in rule_commands().values()}
    assert {s.name for s in STAGES if s.pipeline} == called


def test_code_dependencies_are_the_stage_modules_closure():
    defend = stage_modules(ROOT, "defend")
    assert "src/clipbackdoor/defenses/defend.py" in defend and "src/clipbackdoor/extensions.py" in defend
    assert "src/clipbackdoor/config.py" in defend and "src/clipbackdoor/runtime.py" in defend
    assert not any(f.startswith("src/clipbackdoor/pipeline/cli") for f in defend)
    # the rate sweep's scoring does not depend on the plotting code; its table stage does
    assert "src/clipbackdoor/analysis/figures.py" not in stage_modules(ROOT, "backdoor-eval")
    assert "src/clipbackdoor/analysis/figures.py" in stage_modules(ROOT, "rate-sweep")
    # a model stage reads the project's model configs
    assert "src/clipbackdoor/models/configs" in stage_modules(ROOT, "finetune")
