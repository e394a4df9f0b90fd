"""Stage ``summarize``: the results table (CSV for machines, Markdown for people) and its printing.

Columns: attack, defense, variant, seed, asr, asr_all, cacc, auroc (fractions in [0, 1]; empty where not
applicable). The clean (un-backdoored) model appears as ``attack=clean``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from clipbackdoor.io import atomic_path, write_json, write_text

COLUMNS = ["attack", "defense", "variant", "seed", "eval_set", "asr", "asr_all", "cacc", "auroc"]


def clean_model_rows(model_dir: Path, seed: int) -> list[dict]:
    metrics = json.loads((Path(model_dir) / "metrics.json").read_text())
    rows = []
    for key, value in sorted(metrics.items()):
        if key.startswith("zeroshot_top1/"):
            rows.append({"attack": "clean", "defense": "none", "variant": "-", "seed": seed,
                         "eval_set": key.split("/", 1)[1], "cacc": value})
    return rows


def to_markdown(df: pd.DataFrame) -> str:
    shown = df.copy()
    for col in ("asr", "asr_all", "cacc", "auroc"):
        shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    lines = ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *lines]) + "\n"


def summarize(models: dict[str, Path], seed: int, profile: str, csv_path: Path, md_path: Path,
              json_path: Path, notes: list[str] | None = None) -> pd.DataFrame:
    rows = []
    for name, folder in models.items():
        if name == "clean":
            rows += clean_model_rows(folder, seed)
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.4f")
    text = f"# clipbackdoor results ({profile} profile, seed {seed})\n\n" + to_markdown(df)
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    write_text(md_path, text)
    write_json(json_path, metrics_tree(df))
    return df


def metrics_tree(df: pd.DataFrame) -> dict:
    """{eval_set: {attack: {defense/variant: {metric: value}}}} for `dvc metrics show`."""
    tree: dict = {}
    for row in df.to_dict("records"):
        leaf = {m: row[m] for m in ("asr", "asr_all", "cacc", "auroc") if not pd.isna(row[m])}
        name = row["defense"] if row["variant"] in ("-", None) else f"{row['defense']}/{row['variant']}"
        tree.setdefault(row["eval_set"], {}).setdefault(row["attack"], {})[name] = leaf
    return tree


def print_summary(files: list[str]) -> None:
    for f in files:
        path = Path(f)
        md = path.with_suffix(".md")
        print(md.read_text() if md.exists() else pd.read_csv(path).to_string(index=False))
