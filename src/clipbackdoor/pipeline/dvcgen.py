"""Generate ``dvc.yaml`` from the Snakemake workflow, so the DAG has one source of truth.

Every job of the ``all`` DAG (which holds seed 000's B² branch exactly when the parameters have a ``b2``
section: ``dvc repro`` and ``snakemake all`` build the same artifacts) becomes one DVC stage with
- ``cmd``: the rule's shell command, formatted by Snakemake itself, with the inline ``--params`` JSON
  replaced by ``@params.yaml:<keys>`` (so ``dvc repro`` reads the current params) and threads left to
  the stage (``0`` = all cores);
- ``deps``: the job's inputs plus the ``src/clipbackdoor`` files the stage runs: the module of its function in
  the stage registry (:mod:`clipbackdoor.pipeline.registry`) and every package module that imports;
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
from functools import lru_cache, partial
from pathlib import Path
from types import SimpleNamespace

import yaml

HEADER = ("# GENERATED from the Snakemake rules by `python -m clipbackdoor dvc-yaml` -- do not edit.\n"
          "# tests/test_workflow.py fails when this file is stale.\n")
PACKAGE = "clipbackdoor"
SKIP_MODULES = {f"{PACKAGE}.pipeline.cli", f"{PACKAGE}.__main__", f"{PACKAGE}.pipeline.dvcgen"}


# The parameters the workflow reads while it builds the stage graph (rules/common.smk and the rules' input
# functions). The summary stage lists those a profile sets as its params, so `dvc exp run -S` of one reaches a
# stage; dvc.yaml's header records what they make of the graph (graph_shape), and a stage run through DVC
# refuses a params.yaml whose graph differs -- an edit that would add or remove stages, never one that does not.
SHAPE_KEYS = ("data.source", "data.eval_sets", "model.pretrained", "poison.attacks", "poison.seeds", "poison.target",
              "repair.methods", "detect.detectors", "analysis.textspan_pool", "attacks.label_consistent.adv_eps",
              "b2.backend", "b2.stable_diffusion.path", "b2.stable_diffusion.auditor_pretrained", "results")
# (sweep.attacks and sweep.rates shape the graph too, but only the rate sweep's stages: rate_sweep lists them)
SHAPE_PREFIX = "# stage graph of: "


def rule_blocks(root: Path) -> dict[str, str]:
    """{rule name: its text} of every ``rule NAME:`` in ``root``/rules/*.smk (the source, as written)."""
    import re

    blocks = {}
    for smk in sorted((Path(root) / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=\s*rule )", smk.read_text()):
            m = re.match(r"\s*rule (\w+):", block)
            if m:
                blocks[m.group(1)] = block
    return blocks


def _get(params: dict, key: str):
    node = params
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def shape_params(params: dict) -> list[str]:
    """The SHAPE_KEYS a profile sets (an attack's setting only when the attack runs)."""
    attacks = _get(params, "poison.attacks") or []
    return [k for k in SHAPE_KEYS if _get(params, k) is not None
            and not (k.startswith("attacks.") and k.split(".")[1] not in attacks)]


def _as_input(value):
    """A parameter that names a local file or folder is a rule input (its path shapes the graph); a tag such as
    `openai` is just a value the stage reads."""
    from clipbackdoor.config import names_local_path

    if value is None:
        return None
    return value if names_local_path(value) else "(a tag)"


def graph_shape(params: dict) -> dict:
    """What the parameters make of the stage graph: the sections present, the runs and the sets each is scored on
    (attacks x targets x seeds), the repairs, the inputs named by path, and the switches that add stages."""
    from clipbackdoor.pipeline.runs import run_evals, sweep_points

    attacks = _get(params, "poison.attacks") or []
    shape = {"sections": sorted(params), "data.source": _get(params, "data.source"),
             "eval_sets": list(_get(params, "data.eval_sets") or {}), "runs": run_evals(params),
             "repair.methods": _get(params, "repair.methods") or [],
             "detectors": bool(_get(params, "detect.detectors")),
             "model.pretrained": _as_input(_get(params, "model.pretrained")),
             "analysis.textspan_pool": _get(params, "analysis.textspan_pool"),
             "b2.backend": _get(params, "b2.backend"), "results": _get(params, "results"),
             # the rate sweep's points, and which of them reuse their run's model (no fine-tune of their own)
             "sweep": [list(p) for p in sweep_points(params)] or None}
    if _get(params, "data.source") != "embedded":  # Stable Diffusion's files are rule inputs only at real scale
        shape["b2.stable_diffusion.path"] = _as_input(_get(params, "b2.stable_diffusion.path"))
        shape["b2.stable_diffusion.auditor_pretrained"] = _as_input(_get(params, "b2.stable_diffusion.auditor_pretrained"))
    if "label_consistent" in attacks:  # its adversarial-images stage exists only with a perturbation budget
        shape["lc_adversarial"] = float(_get(params, "attacks.label_consistent.adv_eps") or 0) > 0
    return {k: v for k, v in shape.items() if v is not None}


def check_graph_shape(params: dict, dvc_yaml: Path) -> None:
    """Refuse parameters whose stage graph is not the one dvc.yaml was generated for (a `dvc exp run -S
    poison.attacks=...` or an edit of params.yaml that adds runs, sets or sections)."""
    from clipbackdoor.errors import UserError

    if not dvc_yaml.is_file():
        return
    with open(dvc_yaml, encoding="utf-8") as fh:
        line = next((ln for ln in (fh.readline() for _ in range(5)) if ln.startswith(SHAPE_PREFIX)), None)
    if line is None:
        return
    recorded, now = json.loads(line[len(SHAPE_PREFIX):]), json.loads(json.dumps(graph_shape(params)))
    if recorded != now:
        key = next(k for k in sorted(set(recorded) | set(now)) if recorded.get(k) != now.get(k))

        def describe(value) -> str:
            text = ", ".join(value) if isinstance(value, (dict, list)) and key in ("runs", "sections", "eval_sets") \
                else json.dumps(value)
            return (text if value is not None and text else "none")[:160]

        raise UserError(f"params.yaml's {key} ({describe(now.get(key))}) is not what dvc.yaml's stages were generated "
                        f"for ({describe(recorded.get(key))}): this edit changes which stages exist",
                        fix="run `python -m clipbackdoor dvc-yaml` (it regenerates the stages), then `dvc repro` "
                            "or `dvc exp run` again")


def _workflow_jobs(root: Path, configfiles: list[Path] | None = None, forceall: bool = True,
                   ignore_incomplete: bool = True):
    """Every job of the DAG, built through the Snakemake API with its output silenced, and the set of those
    that Snakemake would run now (all of them with ``forceall``). When the workflow load refuses the parameters
    (rules/common.smk prints one line and exits 2), that line becomes our UserError."""
    from clipbackdoor.errors import UserError

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            return _build_jobs(root, configfiles, forceall, ignore_incomplete)
        except SystemExit:
            lines = [line for line in err.getvalue().splitlines() if "error:" in line or "fix:" in line]
            problem = lines[0].split("error:", 1)[-1].strip() if lines else "the workflow load failed"
            fix = lines[1].split("fix:", 1)[-1].strip() if len(lines) > 1 else None
            raise UserError(problem, fix=fix) from None


def _build_jobs(root: Path, configfiles: list[Path] | None, forceall: bool, ignore_incomplete: bool):
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings, ResourceSettings,
                                          StorageSettings, WorkflowSettings)

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        wapi = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=configfiles or []),
            storage_settings=StorageSettings(),
            workflow_settings=WorkflowSettings(),
            snakefile=root / "Snakefile",
            workdir=root,
        )
        dapi = wapi.dag(dag_settings=DAGSettings(targets={"all"}, forceall=forceall))
        workflow = dapi.workflow_api._workflow
        workflow._prepare_dag(forceall=forceall, ignore_incomplete=ignore_incomplete, lock_warn_only=True, nolock=True)
        workflow._build_dag()
        jobs = sorted(workflow.dag.jobs, key=lambda j: (j.rule.name, str(j.output)))
        return jobs, set(workflow.dag.needrun_jobs(exclude_finished=False))


def _module_file(src: Path, module: str) -> Path | None:
    """src/clipbackdoor/a/b.py (or a/b/__init__.py) of the dotted module ``clipbackdoor.a.b``; None if neither."""
    parts = module.split(".")[1:]
    candidates = [src / Path(*parts).with_suffix(".py"), src / Path(*parts) / "__init__.py"] if parts else \
        [src / "__init__.py"]
    return next((path for path in candidates if path.is_file()), None)


@lru_cache(maxsize=None)
def _parsed(path: Path, mtime_ns: int) -> ast.Module:
    """A module's syntax tree, parsed once per version of the file (dvc.yaml asks for ~100 jobs' closures)."""
    return ast.parse(path.read_text())


def _tree(path: Path) -> ast.Module:
    return _parsed(path, path.stat().st_mtime_ns)


def _docstring_only(path: Path) -> bool:
    """A package ``__init__`` that only names the package: running it cannot change a result."""
    body = _tree(path).body
    return len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


def _module_imports(src: Path, path: Path) -> frozenset[str]:
    """Dotted clipbackdoor modules imported by a module, wherever the import sits (module level or inside a
    function: a lazy import runs when the stage does). ``from clipbackdoor.pkg import mod`` counts the sub-module
    ``mod`` when it is one."""
    return _imports(src, path, path.stat().st_mtime_ns)


@lru_cache(maxsize=None)
def _imports(src: Path, path: Path, mtime_ns: int) -> frozenset[str]:
    found = set()
    for node in ast.walk(_parsed(path, mtime_ns)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(src, f"{node.module}.{a.name}")}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
    return frozenset(found)


def module_closure(root: Path, modules: set[str]) -> list[str]:
    """The files of ``modules`` and of every package module they import, transitively, with the package
    ``__init__`` files Python runs on the way (importing clipbackdoor.attacks.base runs attacks/__init__.py)."""
    src = root / "src" / PACKAGE
    todo, seen = set(modules), set()
    while todo:
        mod = todo.pop()
        if mod in seen or mod in SKIP_MODULES:
            continue
        seen.add(mod)
        parts = mod.split(".")
        todo |= {".".join(parts[:i]) for i in range(1, len(parts))}  # the parent packages
        path = _module_file(src, mod)
        if path is not None:
            todo |= _module_imports(src, path)
    files = sorted(path.relative_to(root).as_posix() for path in map(partial(_module_file, src), seen)
                   if path is not None and not _docstring_only(path))
    if f"{PACKAGE}.models.artifact" in seen:  # the model registry reads these configs
        files.append(f"src/{PACKAGE}/models/configs")
    return files


def stage_modules(root: Path, subcommand: str) -> list[str]:
    """The package files a stage runs: the module of its registered function (:mod:`clipbackdoor.pipeline.registry`)
    and what every stage goes through (the typed parameters, the runtime), with everything they import."""
    from clipbackdoor.pipeline.registry import stage

    return module_closure(root, {stage(subcommand).module, f"{PACKAGE}.config", f"{PACKAGE}.runtime"})


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


def render_dvc_yaml(root: Path, jobs: list | None = None) -> str:
    from clipbackdoor.config import load_yaml, results_dir

    params = load_yaml(root / "params.yaml")
    results = results_dir([], params)  # dvc.yaml is params.yaml's pipeline: its results folder
    stages, plots = {}, []
    for job in _workflow_jobs(root)[0] if jobs is None else jobs:
        if job.rule.name in ("all", "b2") or not job.rule.shellcmd:
            continue
        name, stage = job_to_stage(job, root)
        stages[name] = stage
        plots += [str(f) for f in job.output if str(f).startswith(f"{results}/figures/")]
    doc = {"stages": stages, "metrics": [f"{results}/metrics/headline.json"], "plots": sorted(plots)}

    shape = json.dumps(graph_shape(params), sort_keys=True, separators=(",", ":"))
    return HEADER + SHAPE_PREFIX + shape + "\n" + yaml.safe_dump(doc, sort_keys=False, width=120)


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


def _newest_mtime(path: Path) -> float:
    """The newest modification time of a file, or of any file in a folder (bytecode caches aside: importing a
    module writes them)."""
    if path.is_dir():
        files = (f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
        return max((f.stat().st_mtime for f in files), default=path.stat().st_mtime)
    return path.stat().st_mtime


def lock(root: Path) -> tuple[list[str], list[str], list[str]]:
    """Record in dvc.lock exactly the stages whose Snakemake job is complete and current for params.yaml (its
    outputs exist and Snakemake would not rerun it), via `dvc commit`; then `dvc status` is clean for them and
    `dvc push` sends their outputs. Snakemake does not track the package's code, DVC does (a stage's deps list
    its modules): a stage whose modules changed after its outputs were written is left out, as is a job
    Snakemake marks incomplete. Returns (locked, still to run, stale because their code changed)."""
    from clipbackdoor.errors import UserError

    if not (root / ".dvc").is_dir():
        raise UserError(f"{root.resolve()}: not a DVC repository (no .dvc/)", fix="run this in a clone of the project")
    try:
        jobs, needrun = _workflow_jobs(root, forceall=False, ignore_incomplete=False)
    except UserError:
        raise
    except Exception as exc:  # Snakemake's IncompleteFilesException and kin: outputs of an interrupted job
        raise UserError(f"Snakemake cannot vouch for the outputs ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                        fix="finish the run first (snakemake --rerun-incomplete …), then lock") from None
    path = root / "dvc.yaml"
    if not path.exists() or path.read_text() != render_dvc_yaml(root, jobs):
        raise UserError("dvc.yaml does not match the Snakemake rules and params.yaml",
                        fix="run `python -m clipbackdoor dvc-yaml`, then this again (a run made with --configfile "
                            "PROFILE is recorded after `cp PROFILE params.yaml`)")
    done, todo, stale, outs = [], [], [], []
    for job in jobs:
        if job.rule.name in ("all", "b2") or not job.rule.shellcmd:
            continue
        name, stage = job_to_stage(job, root)
        if job in needrun or not all(Path(root, f).exists() for f in job.output):
            todo.append(name)
            continue
        oldest_out = min(_newest_mtime(Path(root, f)) for f in job.output)
        code = [d for d in stage["deps"] if d.startswith(f"src/{PACKAGE}/")]
        if max((_newest_mtime(root / d) for d in code), default=0) > oldest_out:
            stale.append(name)
        else:
            done.append(name)
            outs += [Path(root, f) for f in job.output]
    if done:
        with _kept_mtimes(outs):
            _dvc_commit(root, done)
    return done, todo, stale


@contextlib.contextmanager
def _kept_mtimes(paths: list[Path]):
    """`dvc commit` rewrites the files it caches (a copy or link from the cache), giving them the time of the
    commit: Snakemake would then see a stage's inputs as newer than its outputs and rerun it. The files' and
    folders' times are put back afterwards (DVC rehashes a file whose time changed: its content is the same)."""
    import os

    times = {}
    for path in paths:
        for p in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
            if p.exists() and not p.is_symlink():
                st = p.stat()
                times[p] = (st.st_atime_ns, st.st_mtime_ns)
    try:
        yield
    finally:
        for p in sorted(times, key=lambda q: len(q.parts), reverse=True):  # files before their folders
            if p.exists() and not p.is_symlink():
                os.utime(p, ns=times[p])


def _dvc_commit(root: Path, names: list[str]) -> None:
    """`dvc commit --force NAME...` in one pass. DVC's command commits its targets one at a time, each time
    parsing dvc.yaml and dvc.lock and rewriting dvc.lock: quadratic in the stage count (8 min for the rehearsal's
    130 stages, hours for the paper's graph). Here DVC's own steps for a target (Stage.save, Stage.commit, then
    the stage file's dump_stages, as dvc.repo.commit does) run for every stage of one loaded index, and dvc.lock
    is written once."""
    import os

    from dvc.exceptions import DvcException
    from dvc.repo import Repo, lock_repo

    from clipbackdoor.errors import UserError

    here = os.getcwd()
    os.chdir(root)  # DVC resolves stage and output paths against the current folder (as its CLI runs: in the repo)
    try:
        with Repo(".") as repo, lock_repo(repo):
            by_name = {stage.addressing: stage for stage in repo.index.stages}  # (dvc.yaml's stages: their name)
            by_file: dict[str, list] = {}
            for name in names:
                stage = by_name[name]
                stage.save()
                stage.commit(relink=True)
                by_file.setdefault(stage.dvcfile.path, []).append(stage)
            for stages in by_file.values():
                stages[0].dvcfile.dump_stages(stages, update_pipeline=False)
    except DvcException as exc:
        raise UserError(f"dvc commit failed: {str(exc).strip().splitlines()[-1][:300]}",
                        fix="see `dvc commit -v` for details") from None
    finally:
        os.chdir(here)


def _dvc(root: Path, args: list[str], fix: str) -> None:
    """Run a DVC command in ``root``; its last line of error output becomes our one-line error."""
    import subprocess
    import sys

    from clipbackdoor.errors import UserError

    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
        raise UserError(f"dvc {args[0]} failed: {lines[-1][:300]}", fix=fix)


# What the defenses need from a colleague's run, without any model weights: the cached decompositions and class
# embeddings (data/decomp), the prototypes, the input detectors' scores, and the clean model's metrics.json
DEFENSE_INPUT_RULES = ("decompose", "class_embeddings", "prototypes", "detect")


def pull_for_defenses(root: Path) -> list[str]:
    """`dvc pull` of the stages whose outputs the defenses read (DVC's --glob does not match stage names) and of
    the clean model's metrics.json alone (a file inside its directory output). Returns the pulled targets."""
    from clipbackdoor.errors import UserError

    if not (root / "dvc.yaml").is_file():
        raise UserError(f"{root.resolve()}: no dvc.yaml", fix="run this in a clone of the project")
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    targets = [name for name in stages if any(name.startswith(rule + "_") for rule in DEFENSE_INPUT_RULES)]
    if not targets:  # (a bare `dvc pull` would fetch everything, model weights included)
        raise UserError("dvc.yaml has no decomposition stages", fix="regenerate it: python -m clipbackdoor dvc-yaml")
    # two calls: given stage names and a file inside a directory output together, DVC (3.x) pulls only the file
    for batch in (targets, ["data/models/clean/metrics.json"]):
        _dvc(root, ["pull", *batch], fix="check the remote (`dvc remote list`) and that the run was pushed "
                                         "(`dvc push` after `make run`)")
    return [*targets, "data/models/clean/metrics.json"]
