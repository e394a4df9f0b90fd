"""Generate ``dvc.yaml`` from the Snakemake workflow, so the DAG has one source of truth.

Every job of the ``all`` DAG, and of the ``b2`` branch (seed 000; its own Snakemake target) when the
parameters have a ``b2`` section, becomes one DVC stage with
- ``cmd``: the rule's shell command, formatted by Snakemake itself, with the inline ``--params`` JSON
  replaced by ``@params.yaml:<keys>`` (so ``dvc repro`` reads the current params) and threads left to
  the stage (``0`` = all cores);
- ``deps``: the job's inputs plus the ``src/clipbackdoor`` modules the stage's code imports;
- ``params``: exactly the dotted keys the rule passes in ``params.cfg``;
- ``outs``: the job's outputs, all DVC-cached (results/ tables and figures too: committing them to git
  would make a fresh clone's Snakemake see them as up to date and skip the whole pipeline).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import yaml

HEADER = ("# GENERATED from the Snakemake rules by `python -m clipbackdoor dvc-yaml` -- do not edit.\n"
          "# tests/test_dvc_yaml.py fails when this file is stale.\n")
PACKAGE = "clipbackdoor"
SKIP_MODULES = {"cli", "__main__", "dvcgen"}


def _workflow_jobs(root: Path, configfiles: list[Path] | None = None):
    """Every job of the DAG, built through the Snakemake API with its output silenced. When the workflow load
    refuses the parameters (rules/common.smk prints one line and exits 2), that line becomes our UserError."""
    from clipbackdoor.errors import UserError

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            return _build_jobs(root, configfiles)
        except SystemExit:
            lines = [line for line in err.getvalue().splitlines() if "error:" in line or "fix:" in line]
            problem = lines[0].split("error:", 1)[-1].strip() if lines else "the workflow load failed"
            fix = lines[1].split("fix:", 1)[-1].strip() if len(lines) > 1 else None
            raise UserError(problem, fix=fix) from None


def _build_jobs(root: Path, configfiles: list[Path] | None):
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings, ResourceSettings,
                                          StorageSettings, WorkflowSettings)

    from clipbackdoor.config import load_yaml

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        wapi = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=configfiles or []),
            storage_settings=StorageSettings(),
            workflow_settings=WorkflowSettings(),
            snakefile=root / "Snakefile",
            workdir=root,
        )
        params = load_yaml(Path(configfiles[-1] if configfiles else root / "params.yaml"))
        targets = {"all", "b2"} if "b2" in params else {"all"}
        dapi = wapi.dag(dag_settings=DAGSettings(targets=targets, forceall=True))
        workflow = dapi.workflow_api._workflow
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        workflow._build_dag()
        return sorted(workflow.dag.jobs, key=lambda j: (j.rule.name, str(j.output)))


def _module_imports(path: Path, func: str | None = None) -> set[str]:
    """clipbackdoor modules imported by a module (or by one function of it)."""
    tree = ast.parse(path.read_text())
    if func is not None:
        tree = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == func)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE + "."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(PACKAGE + ".")}
    return found


def stage_modules(root: Path, subcommand: str) -> list[str]:
    """Transitive closure of the package modules a CLI subcommand runs (module-level imports)."""
    src = root / "src" / PACKAGE
    todo = _module_imports(src / "cli.py", "cmd_" + subcommand.replace("-", "_"))
    seen: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod in seen or mod in SKIP_MODULES:
            continue
        seen.add(mod)
        path = src / f"{mod}.py"
        if path.exists():
            todo |= _module_imports(path)
        elif (src / mod).is_dir():  # a sub-package (e.g. attacks/): every module in it
            for sub in sorted((src / mod).glob("*.py")):
                todo |= _module_imports(sub)
    files = [f"src/{PACKAGE}/{m}.py" if (src / f"{m}.py").exists() else f"src/{PACKAGE}/{m}"
             for m in sorted(seen) if (src / f"{m}.py").exists() or (src / m).is_dir()]
    if "models" in seen:  # the model registry reads these configs
        files.append(f"src/{PACKAGE}/model_configs")
    return files


def _stage_name(job) -> str:
    values = [str(v) for v in job.wildcards_dict.values()]
    return "_".join([job.rule.name, *values])


def job_to_stage(job, root: Path) -> tuple[str, dict]:
    params = dict(job.params.items())
    keys = sorted(json.loads(params["cfg"])) if "cfg" in params else []
    params["cfg"] = "@params.yaml:" + ",".join(keys)
    cmd = job.format_wildcards(job.rule.shellcmd, params=SimpleNamespace(**params), threads=0)
    cmd = " ".join(cmd.split())
    subcommand = shlex.split(cmd)[3]  # python -m clipbackdoor <subcommand>
    deps = sorted({str(f) for f in job.input} | set(stage_modules(root, subcommand)))
    outs = [str(f) for f in job.output]
    stage = {"cmd": cmd, "deps": deps}
    if keys:
        stage["params"] = keys
    stage["outs"] = outs
    return _stage_name(job), stage


def render_dvc_yaml(root: Path) -> str:
    stages, plots = {}, []
    for job in _workflow_jobs(root):
        if job.rule.name in ("all", "b2") or not job.rule.shellcmd:
            continue
        name, stage = job_to_stage(job, root)
        stages[name] = stage
        plots += [str(f) for f in job.output if str(f).startswith("results/figures/")]
    doc = {"stages": stages, "metrics": ["results/metrics/summary.json"], "plots": sorted(plots)}
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)


def write_dvc_yaml(root: Path) -> Path:
    from clipbackdoor.io import write_text

    path = root / "dvc.yaml"
    write_text(path, render_dvc_yaml(root))
    return path


def check_dvc_yaml(root: Path) -> str | None:
    """None if dvc.yaml matches the rules, else a short description of the first difference."""
    path = root / "dvc.yaml"
    if not path.exists():
        return "dvc.yaml missing"
    want, have = render_dvc_yaml(root), path.read_text()
    if want == have:
        return None
    import difflib

    diff = list(difflib.unified_diff(have.splitlines(), want.splitlines(), "dvc.yaml", "from rules", n=0, lineterm=""))
    return "; ".join(diff[2:6])
