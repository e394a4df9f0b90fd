"""Run names: one backdoored model per (attack, target, seed).

``ATTACK-sSEED`` (``badnet-s0``) in a profile with one target, ``ATTACK-TARGET-sSEED`` (``badnet-samoyed-s0``)
when the evaluation sets have different targets. A repaired model appends ``.METHOD`` (``badnet-s0.cleanclip``).
Kept free of heavy imports: the rules and the light stages (figures, report) parse run names too.
"""

from __future__ import annotations

import re
from pathlib import Path


def target_slug(target: str) -> str:
    """A target class name as it appears in run names: 'Samoyed' -> 'samoyed', 'golden retriever' ->
    'golden_retriever' (lower case letters, digits and underscores only)."""
    slug = re.sub(r"[^a-z0-9]+", "_", target.lower()).strip("_")
    return slug or "target"


def run_name(attack: str, seed: int, target: str | None = None) -> str:
    """The name of one backdoored model: ATTACK-sSEED, or ATTACK-TARGET-sSEED in a profile whose evaluation
    sets have different targets (seed 001 backdoors one model per evaluation set's target)."""
    return f"{attack}-s{seed}" if target is None else f"{attack}-{target_slug(target)}-s{seed}"


def parse_run(run: str) -> tuple[str, int]:
    """A run's name -> (attack, seed): 'badnet-s1' -> ('badnet', 1); 'badnet-samoyed-s0' -> ('badnet', 0)."""
    rest, _, seed = run.rpartition("-s")
    return rest.partition("-")[0], int(seed)


def run_evals(params: dict) -> dict[str, list[str]]:
    """{run: the evaluation sets it is scored on}: every attack once per seed and per distinct target; a run is
    scored on the sets whose target it was backdoored towards. The workflow's fan-out (rules/common.smk) and
    dvc.yaml's recorded stage graph both come from here."""
    from clipbackdoor.config import eval_targets

    targets = eval_targets(params)  # {eval set: target class}
    distinct = list(dict.fromkeys(targets.values()))
    return {run_name(a, s, None if len(distinct) == 1 else t): [e for e in targets if targets[e] == t]
            for a in params["poison"]["attacks"] for t in distinct for s in params["poison"]["seeds"]}


def rate_tag(rate: float) -> str:
    """A poisoning rate as it appears in paths (data/sweep/RUN/rRATE/): 0.01 -> '0.01', 1e-3 -> '0.001'."""
    return f"{float(rate):.6f}".rstrip("0").rstrip(".")


def sweep_points(params: dict) -> list[tuple[str, str, bool]]:
    """The poisoning-rate sweep (``sweep`` section): (run, rate tag, whether the run's own model is that point --
    the rate it was made with -- or the point needs a poisoned set and a fine-tune of its own), per swept run and
    rate, in the order of the runs and of sweep.rates."""
    sweep = params.get("sweep")
    if not sweep:
        return []
    points = []
    for run in run_evals(params):
        attack = parse_run(run)[0]
        if attack in sweep["attacks"]:
            own = rate_tag(params["attacks"][attack]["rate"])
            points += [(run, rate_tag(r), rate_tag(r) == own) for r in sweep["rates"]]
    return points


def name_paths(pairs: list[str]) -> dict[str, Path]:
    """NAME=PATH command-line arguments -> {name: path}."""
    return {name: Path(path) for name, _, path in (pair.partition("=") for pair in pairs)}


def run_decomps(specs: list[str]) -> list[tuple[str, Path, Path, Path]]:
    """RUN=CLEAN,TRIGGERED,PROTOTYPES arguments -> (run, clean decomposition, triggered decomposition, prototypes)."""
    out = []
    for spec in specs:
        run, _, paths = spec.partition("=")
        clean, trig, protos = paths.split(",")
        out.append((run, Path(clean), Path(trig), Path(protos)))
    return out
