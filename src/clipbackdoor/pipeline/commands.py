"""The commands people run around the pipeline (not stages: no rule calls them): ``validate``, ``dvc-yaml``,
``lock`` and ``pull-decomp``. (``report`` and ``report-screenshot`` live with the report, in analysis/.)"""

from __future__ import annotations

from pathlib import Path

from clipbackdoor.errors import UserError


def validate_command(args, p: None) -> None:
    from clipbackdoor.analysis.rate_sweep import check_sweep_attacks
    from clipbackdoor.config import load_params, load_yaml

    params = load_params(args.file)
    check_sweep_attacks(load_yaml(args.file), args.file)
    print(f"{args.file}: valid ({params.profile} profile)")


def dvc_yaml_command(args, p: None) -> None:
    from clipbackdoor.pipeline.dvcgen import check_dvc_yaml, write_dvc_yaml

    if args.check:
        stale = check_dvc_yaml(Path(args.root))
        if stale:
            raise UserError(f"dvc.yaml is stale: {stale}", fix="run `python -m clipbackdoor dvc-yaml`")
        print("dvc.yaml is up to date")
    else:
        print(f"wrote {write_dvc_yaml(Path(args.root))}")


def lock_command(args, p: None) -> None:
    from clipbackdoor.pipeline.dvcgen import lock

    done, todo, stale = lock(Path(args.root))
    print(f"dvc.lock: {len(done)} stage(s) recorded" + (f"; {len(todo)} not run yet or out of date for params.yaml "
                                                        f"(e.g. {todo[0]})" if todo else "")
          + (f"; {len(stale)} left out because their code (src/clipbackdoor) changed after they ran (e.g. "
             f"{stale[0]}: rerun with `snakemake --forcerun RULE` or `dvc repro`)" if stale else "")
          + ("; every stage is current" if not todo and not stale else ""))


def pull_decomp_command(args, p: None) -> None:
    from clipbackdoor.pipeline.dvcgen import pull_for_defenses

    targets = pull_for_defenses(Path(args.root))
    print(f"pulled {len(targets) - 1} stages' outputs (decompositions, class embeddings, prototypes, detector scores) "
          f"and data/models/clean/metrics.json; next: make defenses")
