"""Stage ``summarize``: the results table (CSV for machines, Markdown for people) and its printing.

Columns: attack, defense, variant, seed, asr, asr_all, cacc, auroc (fractions in [0, 1]; empty where not
applicable). The clean (un-backdoored) model appears as ``attack=clean``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from clipbackdoor.runs import parse_run
from clipbackdoor.io import atomic_path, read_json, read_parquet, write_json, write_text

COLUMNS = ["attack", "defense", "variant", "seed", "eval_set", "target", "asr", "asr_all", "cacc", "auroc", "tpr", "fpr"]


# one model, two names in seed 002: ABD's image-only arm is Table III's "UAP (L_bd)"
REPAIR_ALIASES = {"abd_img_only": ("uap_lbd",)}


def defend_rows(entries: list[dict]) -> list[dict]:
    """entries: {model, trigger, eval_set, path}; the clean model's rows become attack=clean; a repaired
    model RUN.METHOD (e.g. badnet-s0.cleanclip) gives defense METHOD and METHOD+DEFENSE (e.g.
    cleanclip+decomp_rep, paper Table 1 lower half)."""

    from clipbackdoor.metrics import setting_rows

    rows = []
    for e in entries:
        arrow = read_parquet(e["path"], made_by="the `defend` or `detect` stage")
        table, meta = arrow.to_pandas(), arrow.schema.metadata
        target = int(meta[b"target"])
        target_name = meta.get(b"target_name", b"").decode()  # the class the run was backdoored towards
        attack, seed = parse_run(e["trigger"])
        for r in setting_rows(table, target):
            if e["model"] == "clean":
                if r["defense"] != "none":
                    continue
                r = {**r, "attack": "clean", "variant": f"trigger={attack}"}
            else:
                repair = e["model"].partition(".")[2]
                for name in (repair, *REPAIR_ALIASES.get(repair, ())):
                    d = r["defense"] if not name else name if r["defense"] == "none" else f"{name}+{r['defense']}"
                    rows.append({**r, "defense": d, "attack": attack, "seed": seed, "eval_set": e["eval_set"],
                                 "target": target_name})
                continue
            rows.append({**r, "seed": seed, "eval_set": e["eval_set"], "target": target_name})
    return rows


def clean_model_rows(model_dir: Path, seed: int) -> list[dict]:
    metrics = read_json(Path(model_dir) / "metrics.json", "the stage that wrote this model")
    rows = []
    for key, value in sorted(metrics.items()):
        if key.startswith("zeroshot_top1/"):
            rows.append({"attack": "clean", "defense": "none", "variant": "-", "seed": seed,
                         "eval_set": key.split("/", 1)[1], "cacc": value})
    return rows


MAIN_DEFENSES = ("none", "decomp_rep", "decomp_rep_heads", "decomp_rep_mlp", "decomp_det", "decomp_det_score",
                 "ablate_all_heads", "ablate_all_mlps", "cleanclip", "cleanclip+decomp_rep", "strip", "scaleup", "teco")


def main_table(df: pd.DataFrame) -> pd.DataFrame:
    """The rows a person reads first: clean model, undefended and defended attacked models, mean over seeds."""
    keep = df[df.defense.isin(MAIN_DEFENSES)]
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
        a = df[df.attack == attack].groupby(["defense", "variant"])[["asr", "cacc"]].mean()
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
        det = df[(df.attack == attack) & (df.defense == "decomp_det")]
        if len(det) and det.auroc.notna().any():
            notes.append(f"{attack}: Decomp-Det AUROC {det.auroc.mean():.3f} (`{det.variant.iloc[0]}`; TPR "
                         f"{det.tpr.mean():.2f} at FPR {det.fpr.mean():.2f} for the hard decision).")
        cc = df[(df.attack == attack) & (df.defense == "cleanclip")]
        if len(cc):
            drop = a.loc[("none", "-"), "cacc"] - cc.cacc.mean()
            notes.append(f"{attack}: CleanCLIP ASR {base:.2f} -> {cc.asr.mean():.2f} at a CACC drop of {drop:.3f}"
                         + (" (within 0.03)." if drop <= 0.03 else " (MORE than 0.03)."))
        detectors = df[(df.attack == attack) & df.defense.isin(["strip", "scaleup", "teco"])]
        if len(detectors) and len(det) and det.auroc.notna().any():
            best = detectors.groupby(["defense", "variant"]).auroc.mean()
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
              json_path: Path, defend_entries: list[dict] | None = None) -> pd.DataFrame:
    rows = []
    for name, folder in models.items():
        if name == "clean":
            rows += clean_model_rows(folder, seed)
    rows += defend_rows(defend_entries or [])
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    notes = findings(df)
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.4f")
    text = (f"# clipbackdoor results ({profile} profile)\n\n"
            "ASR = triggered test images of non-target classes classified as the target (asr_all: over all "
            "triggered images); CACC = clean zero-shot top-1; AUROC: clean vs triggered detection.\n\n")
    text += "## Main table\n\n" + to_markdown(main_table(df))
    if notes:
        text += "\n## Findings (computed from the rows above)\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    write_text(md_path, text)
    write_json(json_path, metrics_tree(df))
    return df


def metrics_tree(df: pd.DataFrame) -> dict:
    """{eval_set: {attack: {defense/variant: {metric: value}}}} for `dvc metrics show`."""
    tree: dict = {}
    for row in df.to_dict("records"):
        leaf = {m: row[m] for m in ("asr", "asr_all", "cacc", "auroc") if not pd.isna(row[m])}
        name = row["defense"] if row["variant"] in ("-", None) else f"{row['defense']}/{row['variant']}"
        tree.setdefault(row["eval_set"], {}).setdefault(row["attack"], {}).setdefault(
            f"seed{row['seed']}", {})[name] = leaf
    return tree


def print_summary(files: list[str]) -> None:
    for f in files:
        path = Path(f)
        md = path.with_suffix(".md")
        print(md.read_text() if md.exists() else pd.read_csv(path).to_string(index=False))
