"""Stage ``rate_sweep`` (with ``backdoor_eval``, :mod:`clipbackdoor.analysis.backdoor_eval`): attack success and
clean accuracy against the poisoning rate.

Per swept attack run (``sweep`` section) and rate, the project's own ``poison`` and ``finetune`` stages make one
more backdoored model under ``data/sweep/RUN/rRATE/`` (the rate the run was made with reuses
``data/models/RUN``: no second fine-tune of the same thing). ``backdoor_eval`` scores a model zero-shot on every
image of an evaluation set, clean and with the run's own trigger (the same per-image trigger streams as the
decomposition), a batch at a time; ``rate_sweep`` collects the points, with seeded bootstrap intervals, into a
CSV (the ASR-against-rate figure: figures.rate_sweep_figure). (The summary's rows score the prototypes' test split; the sweep scores every
evaluation image, so its point at the run's own rate can differ from the summary's ``none`` row by that sample.)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from clipbackdoor.config import Params
from clipbackdoor.io import atomic_path, read_json


def check_sweep_attacks(params: dict, source: str) -> None:
    """A swept attack's poisoning must need nothing tied to one rate: Label-Consistent's adversarial images exist
    only for the pairs its configured rate poisons (checked at workflow load and by ``validate``)."""
    from clipbackdoor.attacks import REGISTRY
    from clipbackdoor.errors import UserError

    for attack in (params.get("sweep") or {}).get("attacks", []):
        needs = REGISTRY[attack].poison_asset(params["attacks"][attack])
        if needs != REGISTRY[attack].asset:
            raise UserError(f"{source}: sweep.attacks lists {attack!r}, whose poisoning needs images made for its "
                            f"configured rate's pairs only (stage {needs})",
                            fix=f"drop {attack!r} from sweep.attacks (sweep a trigger-only attack such as badnet)")


def sweep_table(points: list[tuple[str, str, float, Path, Path]], seed: int) -> pd.DataFrame:
    """points: (run, evaluation set, rate, backdoor_eval JSON, the poisoned set's manifest) -> one row per point:
    ASR and CACC with 95 % bootstrap intervals (each row its own seeded stream), counts, poisoned pairs."""
    import pyarrow.parquet as pq

    from clipbackdoor.analysis.metrics import row_rng, with_intervals
    from clipbackdoor.pipeline.runs import parse_run

    rows = []
    for run, eval_set, rate, eval_json, manifest in points:
        c = read_json(eval_json, "the backdoor_eval stage")
        meta = pq.read_schema(manifest).metadata or {}
        attack, run_seed = parse_run(run)
        row = {"attack": attack, "run": run, "seed": run_seed, "eval_set": eval_set, "rate": rate,
               "n_poisoned": int(meta.get(b"n_poisoned", b"-1")),
               "asr": c["asr_hits"] / max(c["n_asr"], 1), "asr_all": c["asr_all_hits"] / max(c["n_clean"], 1),
               "cacc": c["cacc_hits"] / max(c["n_clean"], 1), "n_clean": c["n_clean"], "n_asr": c["n_asr"]}
        rows.append(with_intervals(row, row_rng(seed, f"sweep:{run}:{eval_set}:{rate:g}"),
                                   {"asr": (c["asr_hits"], c["n_asr"]), "cacc": (c["cacc_hits"], c["n_clean"])},
                                   None))
    columns = ["attack", "run", "seed", "eval_set", "rate", "n_poisoned", "asr", "asr_lo", "asr_hi", "asr_all",
               "cacc", "cacc_lo", "cacc_hi", "n_clean", "n_asr"]
    return (pd.DataFrame(rows, columns=columns).sort_values(["attack", "eval_set", "seed", "rate"], kind="stable")
            .reset_index(drop=True))


def rate_sweep(points: list[tuple[str, str, float, Path, Path]], seed: int, out_csv: str | Path) -> pd.DataFrame:
    """The sweep table, written as CSV (the figure: figures.rate_sweep_figure; kept out of this module so that
    backdoor_eval's code dependencies do not take in the plotting code)."""
    table = sweep_table(points, seed)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return table


def rate_sweep_stage(args, p: Params) -> None:
    """CLI stage ``rate-sweep``: RUN:EVALSET:RATE=EVAL_JSON,MANIFEST points -> the CSV and the figure."""
    from clipbackdoor.analysis.figures import rate_sweep_figure

    points = []
    for spec in args.points:
        key, _, paths = spec.partition("=")
        run, eval_set, rate = key.split(":")
        eval_json, manifest = paths.split(",")
        points.append((run, eval_set, float(rate), Path(eval_json), Path(manifest)))
    table = rate_sweep(points, p.seed, args.csv)
    rate_sweep_figure(table, args.png)
    print(table.to_string(index=False))
