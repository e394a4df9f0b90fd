"""Stage ``summarize``: the results table (CSV for machines, Markdown for people) and its printing.

One row per (attack, seed, evaluation set, repair, defense, setting). Columns: ``attack`` (``clean``: the
un-backdoored model), ``seed``, ``eval_set``, ``target``; ``repair``: what was done to the model before evaluation
(``cleanclip``, ``roclip``, ABD's arms; ``-``: nothing); ``defense``: what ran on its representations or inputs
(``none``, ``decomp_rep``, ``strip``, ...); ``variant``: the setting as one string, and each of its parts again in
its own column (``rule``, ``eps``, ``layers``, ``zeta``, ``layer``, ``heads``, ``last``, ``n_images``, ``mode`` for a
bare word such as ``auto:mlp``, ...); metrics as fractions in [0, 1] (empty where not applicable) with 95 %
bootstrap intervals and sample counts (:mod:`clipbackdoor.analysis.metrics`). Tables and figures name a row by its
``method``: the defense, prefixed by the repair (``cleanclip+decomp_rep``; a repair alone is its name) --
:func:`read_summary` adds it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from clipbackdoor.config import Params
from clipbackdoor.errors import UserError
from clipbackdoor.io import atomic_path, read_json, read_parquet, write_json
from clipbackdoor.analysis.pages import write_page
from clipbackdoor.pipeline.runs import parse_run

KEYS = ["attack", "seed", "eval_set", "target", "repair", "defense", "variant"]
METRICS = ["asr", "asr_lo", "asr_hi", "asr_all", "cacc", "cacc_lo", "cacc_hi", "auroc", "auroc_lo", "auroc_hi", "tpr",
           "fpr", "n_clean", "n_triggered", "n_asr"]


def settings_of(variant: str) -> dict[str, str]:
    """"rule=cosine,eps=0.5,zeta=0" -> {rule: cosine, eps: 0.5, zeta: 0}; a bare word is the ``mode``."""
    out = {}
    for token in ("" if variant in ("-", None) or pd.isna(variant) else str(variant)).split(","):
        if token:
            key, sep, value = token.partition("=")
            out.update({key: value} if sep else {"mode": token})
    return out


def method_name(repair: str, defense: str) -> str:
    """The name tables and figures give a row: ``cleanclip`` (repair alone), ``cleanclip+decomp_rep``, ``strip``."""
    if repair in ("-", "", None) or pd.isna(repair):
        return defense
    return repair if defense == "none" else f"{repair}+{defense}"


def with_method(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(method=[method_name(r, d) for r, d in zip(df.repair, df.defense)])


def read_summary(path: str | Path) -> pd.DataFrame:
    """summary.csv with its ``method`` column (and the settings columns as text, as written)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found", fix="run the `summary` stage (snakemake or dvc repro)")
    df = pd.read_csv(path, dtype={"variant": str, "repair": str})
    missing = [c for c in ("repair", "defense", *KEYS) if c not in df.columns]
    if missing:
        raise UserError(f"{path}: no column(s) {', '.join(missing)} (written by an older version)",
                        fix="rerun the `summary` stage")
    return with_method(df)


# one model, two names in seed 002: ABD's image-only arm is Table III's "UAP (L_bd)"
REPAIR_ALIASES = {"abd_img_only": ("uap_lbd",)}


def defend_rows(entries: list[dict], seed: int = 0) -> list[dict]:
    """entries: {model, trigger, eval_set, path}; the clean model's rows become attack=clean; a repaired model
    RUN.METHOD (e.g. badnet-s0.cleanclip) gives repair METHOD on every row of its table (paper Table 1 lower
    half). ``seed``: the bootstrap intervals' seed."""

    from clipbackdoor.analysis.metrics import setting_rows

    rows = []
    for e in entries:
        arrow = read_parquet(e["path"], made_by="the `defend` or `detect` stage")
        table, meta = arrow.to_pandas(), arrow.schema.metadata
        target = int(meta[b"target"])
        target_name = meta.get(b"target_name", b"").decode()  # the class the run was backdoored towards
        attack, run_seed = parse_run(e["trigger"])
        key = f"{e['model']}|{e['trigger']}|{e['eval_set']}"
        if e["model"] == "clean":  # the clean model is a control: its undefended rows only (no wasted intervals)
            table = table[table.defense == "none"]
        for r in setting_rows(table, target, seed, key):
            if e["model"] == "clean":
                rows.append({**r, "attack": "clean", "repair": "-", "variant": f"trigger={attack}",
                             "seed": run_seed, "eval_set": e["eval_set"], "target": target_name})
                continue
            repair = e["model"].partition(".")[2]
            for name in (repair, *REPAIR_ALIASES.get(repair, ())):
                rows.append({**r, "repair": name or "-", "attack": attack, "seed": run_seed,
                             "eval_set": e["eval_set"], "target": target_name})
    return rows


def clean_model_rows(model_dir: Path, seed: int) -> list[dict]:
    metrics = read_json(Path(model_dir) / "metrics.json", "the stage that wrote this model")
    rows = []
    for key, value in sorted(metrics.items()):
        if key.startswith("zeroshot_top1/"):
            rows.append({"attack": "clean", "repair": "-", "defense": "none", "variant": "-", "seed": seed,
                         "eval_set": key.split("/", 1)[1], "cacc": value})
    return rows


def summary_frame(rows: list[dict]) -> pd.DataFrame:
    """The rows in summary.csv's column order: keys, each setting in its own column, metrics."""
    parsed = [settings_of(r.get("variant", "-")) for r in rows]
    settings = list(dict.fromkeys(k for p in parsed for k in p))
    clash = set(settings) & set(KEYS + METRICS)
    assert not clash, f"a setting named like a column: {clash}"
    rows = [{**r, **p} for r, p in zip(rows, parsed)]
    df = pd.DataFrame(rows).reindex(columns=KEYS + settings + METRICS)
    return df.astype({c: "Int64" for c in ("seed", "n_clean", "n_triggered", "n_asr")})  # counts stay integers


MAIN_DEFENSES = ("none", "decomp_rep", "decomp_rep_heads", "decomp_rep_mlp", "decomp_det", "decomp_det_score",
                 "ablate_all_heads", "ablate_all_mlps", "cleanclip", "cleanclip+decomp_rep", "strip", "scaleup", "teco")


def main_methods() -> tuple[str, ...]:
    """The main table's methods: the built-in ones, then every registered extension defense and detector."""
    from clipbackdoor.extensions import Defense, Detector, of_kind

    return MAIN_DEFENSES + tuple(of_kind(Defense)) + tuple(of_kind(Detector))


def input_detectors(methods) -> list[str]:
    """The methods among ``methods`` that are input-level detectors (scores, no decision), as declared."""
    from clipbackdoor.extensions import detection_kind

    return [m for m in dict.fromkeys(methods) if detection_kind(m) == "scores"]


def main_table(df: pd.DataFrame) -> pd.DataFrame:
    """The rows a person reads first: clean model, undefended and defended attacked models, mean over seeds."""
    keep = df[df.method.isin(main_methods())].drop(columns="defense").rename(columns={"method": "defense"})
    metrics = ["asr", "asr_all", "cacc", "auroc"]
    keep = keep.assign(target=keep.target.fillna("-"))  # the clean model's own rows have no target
    grouped = keep.groupby(["attack", "defense", "variant", "eval_set", "target"], sort=False)
    out = grouped[metrics].mean().reset_index()
    out.insert(3, "seeds", grouped["seed"].apply(lambda s: ",".join(map(str, sorted(set(s))))).to_numpy())
    return out


def findings(df: pd.DataFrame) -> list[str]:
    """Plain statements of where the miniature does or does not reproduce the paper's localisation finding
    (seed 001: patch triggers live in last-layer heads, global triggers in late MLPs)."""
    from clipbackdoor.attacks import REGISTRY

    notes = []
    for attack in [a for a in df.attack.unique() if a != "clean"]:
        a = df[df.attack == attack].groupby(["method", "variant"])[["asr", "cacc"]].mean()
        try:
            base = a.loc[("none", "-"), "asr"]
            heads, mlps = a.loc[("ablate_all_heads", "-"), "asr"], a.loc[("ablate_all_mlps", "-"), "asr"]
        except KeyError:
            continue
        if base < 0.5:
            notes.append(f"{attack}: undefended ASR is only {base:.2f}: the backdoor was not learned, so its "
                         "localisation cannot be assessed.")
            continue
        kind = REGISTRY[attack].kind if attack in REGISTRY else "local"
        expected = "heads" if kind == "local" else "MLPs"
        exp_asr, other_asr = (heads, mlps) if kind == "local" else (mlps, heads)
        ok = exp_asr <= 0.5 * base and exp_asr < other_asr
        notes.append(f"{attack} ({kind} trigger): the paper locates it in the {expected}. Here, undefended ASR "
                     f"{base:.2f}; mean-ablating all heads -> {heads:.2f}, all MLPs -> {mlps:.2f}: "
                     + ("REPRODUCED." if ok else "NOT reproduced in this miniature."))
        rep = a[a.index.get_level_values(0) == "decomp_rep"]
        if len(rep):
            (_, variant), row = next(iter(rep.iterrows()))
            cacc = a.loc[("none", "-"), "cacc"]
            notes.append(f"{attack}: Decomp-Rep (Algorithm 1, `{variant}`) lowers ASR {base:.2f} -> {row.asr:.2f} "
                         f"(cut {base - row.asr:.2f}) at a CACC change of {row.cacc - cacc:+.3f}.")
        det = df[(df.attack == attack) & (df.method == "decomp_det")]
        if len(det) and det.auroc.notna().any():
            notes.append(f"{attack}: Decomp-Det AUROC {det.auroc.mean():.3f} (`{det.variant.iloc[0]}`; TPR "
                         f"{det.tpr.mean():.2f} at FPR {det.fpr.mean():.2f} for the hard decision).")
        cc = df[(df.attack == attack) & (df.method == "cleanclip")]
        if len(cc):
            drop = a.loc[("none", "-"), "cacc"] - cc.cacc.mean()
            notes.append(f"{attack}: CleanCLIP ASR {base:.2f} -> {cc.asr.mean():.2f} at a CACC drop of {drop:.3f}"
                         + (" (within 0.03)." if drop <= 0.03 else " (MORE than 0.03)."))
        detectors = df[(df.attack == attack) & df.method.isin(input_detectors(df.method))]
        if len(detectors) and len(det) and det.auroc.notna().any():
            best = detectors.groupby(["method", "variant"]).auroc.mean()
            (name, variant), top = best.idxmax(), best.max()
            verdict = "at least" if det.auroc.mean() >= top else "BELOW"
            notes.append(f"{attack}: Decomp-Det AUROC {det.auroc.mean():.3f} is {verdict} the best input detector's "
                         f"({name} `{variant}`: {top:.3f}).")
        sep = a[a.index.get_level_values(0) == "ablate_heads_separate"]["asr"]
        if len(sep):
            layer = sep.idxmin()[1].removeprefix("layer=")
            last = str(len(sep) - 1)
            notes.append(f"{attack}: ablating a single layer's heads lowers ASR most at layer {layer} (ASR "
                         f"{sep.min():.2f}); the paper finds the last layer ({last}) "
                         + ("- consistent." if layer == last else "- not the case here."))
    return notes


def to_markdown(df: pd.DataFrame) -> str:
    shown = df.copy()
    for col in ("asr", "asr_all", "cacc", "auroc"):
        shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    lines = ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *lines]) + "\n"


def summarize(models: dict[str, Path], seed: int, profile: str, csv_path: Path, md_path: Path,
              headline_path: Path, defend_entries: list[dict] | None = None) -> pd.DataFrame:
    rows = []
    for name, folder in models.items():
        if name == "clean":
            rows += clean_model_rows(folder, seed)
    rows += defend_rows(defend_entries or [], seed)
    df = summary_frame(rows)
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.4f")
    df = with_method(df)
    notes = findings(df)
    text = (f"# clipbackdoor results ({profile} profile)\n\n"
            "ASR = triggered test images of non-target classes classified as the target (asr_all: over all "
            "triggered images); CACC = clean zero-shot top-1; AUROC: clean vs triggered detection.\n\n")
    text += "## Main table\n\n" + to_markdown(main_table(df))
    if notes:
        text += "\n## Findings (computed from the rows above)\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    write_page(md_path, text)
    write_json(headline_path, headline(df))
    return df


HEADLINE = {  # metric name in headline.json -> (method, summary column)
    "asr": ("none", "asr"), "cacc": ("none", "cacc"), "decomp_rep_asr": ("decomp_rep", "asr"),
    "decomp_rep_cacc": ("decomp_rep", "cacc"), "decomp_det_auroc": ("decomp_det", "auroc")}


def headline(df: pd.DataFrame) -> dict:
    """The numbers `dvc metrics show/diff` compares, ~5 per attack (mean over seeds):
    {eval_set: {"clean": {cacc}, attack: {asr, cacc, decomp_rep_asr, decomp_rep_cacc, decomp_det_auroc}}}.
    The full table is summary.csv."""
    tree: dict = {}
    for eval_set, rows in df.groupby("eval_set", sort=False):
        clean = rows[(rows.attack == "clean") & (rows.variant == "-")].cacc.dropna()
        tree[eval_set] = {"clean": {"cacc": round(float(clean.mean()), 4)}} if len(clean) else {}
        for attack in [a for a in rows.attack.unique() if a != "clean"]:
            mine = rows[rows.attack == attack]
            leaf = {}
            for name, (method, column) in HEADLINE.items():
                values = mine[mine.method == method][column].dropna()
                if len(values):
                    leaf[name] = round(float(values.mean()), 4)
            tree[eval_set][attack] = leaf
    return tree


def results_folders() -> list[str]:
    """The parameter files' results folders that hold a summary (results/NAME/metrics/summary.csv)."""
    from clipbackdoor.config import RESULTS_ROOT

    return sorted(p.parents[1].name for p in Path(RESULTS_ROOT).glob("*/metrics/summary.csv"))


def summary_files(results: str) -> list[Path]:
    """The summary of one parameter file's results folder (``results/<name>/``), refused with the folders that do
    have one when it does not exist."""
    from clipbackdoor.config import RESULTS_ROOT
    from clipbackdoor.errors import UserError

    path = Path(RESULTS_ROOT) / results / "metrics" / "summary.csv"
    if not path.exists():
        have = results_folders()
        raise UserError(f"{path}: no results for {results!r} yet" + (f" (results exist for: {', '.join(have)})"
                                                                    if have else ""),
                        fix="run the pipeline for that parameter file first (params.yaml: make run -> results/default; "
                            "--configfile configs/NAME.yaml -> results/NAME), or pass --results NAME")
    return [path]


def print_summary(files: list[str | Path]) -> None:
    for f in files:
        path = Path(f)
        md = path.with_suffix(".md")
        print(md.read_text() if md.exists() else pd.read_csv(path).to_string(index=False))


def summarize_stage(args, p: Params) -> None:
    """CLI stage ``summarize``: MODEL:TRIGGER:EVALSET=PARQUET tables -> summary.csv / .md, headline.json."""
    from clipbackdoor.pipeline.runs import name_paths

    entries = []
    for spec in args.defend or []:
        ids, _, path = spec.partition("=")
        model, trigger, eval_set = ids.split(":")
        entries.append({"model": model, "trigger": trigger, "eval_set": eval_set, "path": path})
    df = summarize(name_paths(args.models), p.seed, p.profile, Path(args.csv), Path(args.md), Path(args.headline),
                   entries)
    print(df.to_string(index=False))


def report_command(args, p: None) -> None:
    """CLI command ``report``: print a results folder's summary (and where the other folders' are)."""
    files = args.files or summary_files(args.results)
    print_summary(files)
    if not args.files:  # where this table and the other profiles' results live
        others = [f"results/{name}/" for name in results_folders() if name != args.results]
        print(f"\n(results/{args.results}/: tables/, figures/, metrics/, analysis/"
              + (f"; other parameter files' results: {', '.join(others)} -- report --results NAME" if others else "")
              + ")")
