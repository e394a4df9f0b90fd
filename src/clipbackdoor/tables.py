"""Stage ``tables``: seed 001's Tables 1-5 as Markdown, from the results table only (plus the detect subsample
size), with the paper's rows and columns; values are this run's, in percent (AUROC as a fraction), mean over
seeds, for the attacks present in the profile. A cell is "-" where the run has no such row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from clipbackdoor.io import write_text

PAPER_ATTACK_NAMES = {"badnet": "BadNet", "badnet_random": "BadNet (random)", "blended": "Blended", "sig": "SIG",
                      "wanet": "WaNet", "label_consistent": "Label Consistent", "issba": "ISSBA", "badclip": "BadCLIP"}

TABLE1_ROWS = [("No Defense", "none"), ("+ Base-Decomp", "base_decomp"), ("+ Decomp-Rep", "decomp_rep"),
               ("CleanCLIP", "cleanclip"), ("+ Base-Decomp", "cleanclip+base_decomp"),
               ("+ Decomp-Rep", "cleanclip+decomp_rep")]
TABLE5_ROWS = [("w/o All AHs", "ablate_all_heads"), ("w/o All MLPs", "ablate_all_mlps"), ("w Abandon", "abandon"),
               ("w Random Prototypes", "random_prototypes"), ("Decomp-Rep", "decomp_rep")]
DETECTOR_ROWS = [("STRIP", "strip", None), ("SCALE-UP", "scaleup", None), ("TeCo (independent)", "teco", "independent"),
                 ("TeCo (compounding, public code)", "teco", "compounding"), ("Decomp-Det", "decomp_det", None)]


def _pct(v) -> str:
    return "-" if v is None or pd.isna(v) else f"{100 * v:.2f}"


def _cell(df: pd.DataFrame, attack: str, defense: str, metric: str, eval_set: str, variant: str | None = None):
    rows = df[(df.attack == attack) & (df.defense == defense) & (df.eval_set == eval_set)]
    if variant is not None:
        rows = rows[rows.variant.astype(str).str.startswith(variant)]
    vals = rows[metric].dropna()
    return float(vals.mean()) if len(vals) else None


def _target(df: pd.DataFrame, eval_set: str) -> str:
    """The class the attacked models scored on ``eval_set`` were backdoored towards ("?" for old summaries)."""
    names = df[(df.eval_set == eval_set) & (df.attack != "clean")].get("target", pd.Series(dtype=str)).dropna()
    return ", ".join(dict.fromkeys(names.astype(str))) or "?"


def eval_set_order(df: pd.DataFrame) -> list[str]:
    """The profile's evaluation sets in its own order: as the attacked models' rows list them (the clean model's
    rows come from metrics.json, whose keys are sorted)."""
    attacked = df[df.attack != "clean"].eval_set.dropna()
    return list(dict.fromkeys([*attacked, *df.eval_set.dropna()]))


def _on(df: pd.DataFrame, eval_set: str) -> str:
    return f"`{eval_set}` (target `{_target(df, eval_set)}`)"


def _attacks(df: pd.DataFrame) -> list[str]:
    present = [a for a in df.attack.unique() if a != "clean"]
    order = list(PAPER_ATTACK_NAMES)
    return sorted(present, key=lambda a: order.index(a) if a in order else len(order))


def _asr_cacc_table(df, rows, attacks, eval_set, title, note="") -> str:
    head = "| Methods | " + " | ".join(f"{PAPER_ATTACK_NAMES.get(a, a)} ASR | CACC" for a in attacks) + " |"
    rule = "|---|" + "---|---|" * len(attacks)
    lines = [f"# {title}\n", *([note, ""] if note else []), head, rule]
    for label, defense, *variant in rows:
        v = variant[0] if variant else None
        cells = [f"{_pct(_cell(df, a, defense, 'asr', eval_set, v))} | {_pct(_cell(df, a, defense, 'cacc', eval_set, v))}"
                 for a in attacks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table1(df, eval_set) -> str:
    return _asr_cacc_table(df, TABLE1_ROWS, _attacks(df), eval_set,
                           f"Table 1. ASR (down, %) and CACC (up, %) on {_on(df, eval_set)}",
                           "Base-Decomp: the decomposed representation unchanged; Decomp-Rep: repaired heads "
                           "(Algorithm 1); CleanCLIP rows: the CleanCLIP-repaired model, then the same.")


def table2(df, eval_set, subsample: str) -> str:
    attacks = _attacks(df)
    vals = {label: [_cell(df, a, d, "auroc", eval_set, v) for a in attacks] for label, d, v in DETECTOR_ROWS}
    best = [max((v[i] for v in vals.values() if v[i] is not None), default=None) for i in range(len(attacks))]
    head = "| Methods | " + " | ".join(PAPER_ATTACK_NAMES.get(a, a) for a in attacks) + " | Average |"
    lines = [f"# Table 2. AUROC (up) on {_on(df, eval_set)}\n",
             f"Input detectors score {subsample}; Decomp-Det scores every test image. Best per column in bold.", "",
             head, "|---|" + "---|" * (len(attacks) + 1)]
    for label, v in vals.items():
        cells = ["-" if x is None else (f"**{x:.3f}**" if x == best[i] else f"{x:.3f}") for i, x in enumerate(v)]
        present = [x for x in v if x is not None]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {np.mean(present):.3f} |" if present else
                     f"| {label} | " + " | ".join(cells) + " | - |")
    return "\n".join(lines) + "\n"


def table3(df, eval_set, fixed_variants: list[str]) -> str:
    attacks = [a for a in _attacks(df) if _kind(a) == "local"] or _attacks(df)
    rows = [("No Defense", "none"), ("+ Base-Decomp", "base_decomp"), ("+ Decomp-Rep", "decomp_rep")]
    rows += [(f"+ Fixed [{v.removeprefix('heads=').replace('-', ', ')}]", "fixed_heads", v) for v in fixed_variants]
    rows += [("+ Random AHs", "random_heads")]
    text = _asr_cacc_table(df, rows, attacks, eval_set,
                           f"Table 3. Fixed, random and reverse head ablation on {_on(df, eval_set)} (local triggers)",
                           "Fixed heads are 1-indexed in the last layer. Original Clean: the un-backdoored model; "
                           "Decomp-Reverse: clean images carrying the triggered images' selected heads.")
    clean = df[(df.attack == "clean") & (df.defense == "none") & (df.variant == "-") & (df.eval_set == eval_set)]
    cacc = _pct(clean.cacc.mean()) if len(clean) else "-"
    text += "| Original Clean | " + " | ".join(f"- | {cacc}" for _ in attacks) + " |\n"
    cells = [f"{_pct(_cell(df, a, 'decomp_reverse', 'asr', eval_set))} | {_pct(_cell(df, a, 'decomp_reverse', 'cacc', eval_set))}"
             for a in attacks]
    return text + "| + Decomp-Reverse | " + " | ".join(cells) + " |\n"


def table4(df, eval_sets: list[str]) -> str:
    attack = "badnet" if "badnet" in set(df.attack) else _attacks(df)[0]
    head = "| Methods | " + " | ".join(f"{e} (target {_target(df, e)}) ASR | CACC" for e in eval_sets) + " |"
    lines = [f"# Table 4. ASR (down, %) and CACC (up, %) of {PAPER_ATTACK_NAMES.get(attack, attack)} per evaluation set\n",
             "The paper's Caltech-101 and Oxford Pets columns are the profile's evaluation sets"
             + (" (this profile has one)." if len(eval_sets) == 1 else "."), "", head,
             "|---|" + "---|---|" * len(eval_sets)]
    for label, defense in TABLE1_ROWS:
        cells = [f"{_pct(_cell(df, attack, defense, 'asr', e))} | {_pct(_cell(df, attack, defense, 'cacc', e))}"
                 for e in eval_sets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table5(df, eval_set) -> str:
    return _asr_cacc_table(df, TABLE5_ROWS, _attacks(df), eval_set, f"Table 5. Ablation study on {_on(df, eval_set)}",
                           "w Abandon: selected heads set to zero; w Random Prototypes: replaced by random vectors.")


def _kind(attack: str) -> str:
    from clipbackdoor.attacks import REGISTRY

    return REGISTRY[attack].kind if attack in REGISTRY else "local"


def write_tables(summary_csv: str | Path, out_dir: str | Path, fixed_heads: list[list[int]]) -> list[Path]:
    df = pd.read_csv(summary_csv)
    eval_sets = eval_set_order(df)
    first = eval_sets[0]
    det = df[df.defense.isin(["strip", "scaleup", "teco"])]
    sizes = sorted({v.rpartition("n_images=")[2] for v in det.variant.astype(str) if "n_images=" in v})
    subsample = (f"a seeded subsample of {', '.join(sizes)} test images (each clean and triggered)" if sizes
                 else "no images (no detector configured)")
    fixed = [f"heads={'-'.join(map(str, h))}" for h in fixed_heads]
    out_dir = Path(out_dir)
    texts = {"table1.md": table1(df, first), "table2.md": table2(df, first, subsample),
             "table3.md": table3(df, first, fixed), "table4.md": table4(df, eval_sets), "table5.md": table5(df, first)}
    paths = []
    for name, text in texts.items():
        write_text(out_dir / name, text)
        paths.append(out_dir / name)
    return paths


# Seed 002 (ABD). Rows name summary.csv `defense` values; the model arms come from repair.methods.
ABD_TABLE1_ROWS = [("Victim", "none"), ("RoCLIP", "roclip"), ("CleanCLIP", "cleanclip"), ("Ours (ABD)", "abd"),
                   ("ABD + Decomp-Rep", "abd+decomp_rep")]
ABD_TABLE2_ROWS = [("Victim", "none"), ("FT", "finetune_clean"), ("I_adv", "abd_img_only"), ("T_eda", "abd_eda_only"),
                   ("I_adv + T_eda (ABD)", "abd")]
ABD_TABLE3_ROWS = [("Victim", "none"), ("UAP", "uap"), ("UAP (L_bd)", "uap_lbd")]
FIG2_COLUMNS = ["clean_img/own_caption", "triggered_img/target_caption", "adv_img/own_caption",
                "adv_img/target_caption", "adv_img/unrelated_caption", "adv_target_rate", "cos_adv_triggered"]


def abd_claims(df: pd.DataFrame, eval_set: str) -> str:
    """The seed's two claims, checked per attack on this run's numbers."""
    lines = []
    for a in _attacks(df):
        get = lambda d, m: _cell(df, a, d, m, eval_set)
        abd, cc, abd_c, cc_c = get("abd", "asr"), get("cleanclip", "asr"), get("abd", "cacc"), get("cleanclip", "cacc")
        uap, lbd = get("uap", "asr"), get("uap_lbd", "asr")
        name = PAPER_ATTACK_NAMES.get(a, a)
        if None not in (abd, cc, abd_c, cc_c):
            ok = abd < cc and cc_c - abd_c <= 0.02
            lines.append(f"- {name}: ABD ASR {_pct(abd)} vs CleanCLIP {_pct(cc)}, CACC {_pct(abd_c)} vs {_pct(cc_c)} "
                         f"-> ABD below CleanCLIP at a CACC drop <= 2 points: **{'yes' if ok else 'no'}**")
        if None not in (uap, lbd):
            lines.append(f"- {name}: ASR after fine-tuning on UAP {_pct(uap)} vs UAP (L_bd) {_pct(lbd)} -> L_bd "
                         f"improves over plain UAP: **{'yes' if lbd < uap else 'no'}**")
    return "\n".join(lines) + "\n" if lines else ""


def fig2_table(sim: pd.DataFrame) -> str:
    head = "| Run | Encoder | Perturbation | " + " | ".join(FIG2_COLUMNS) + " |"
    lines = ["# Seed 002 Fig. 2: image-caption similarity (100 x cos), poisoned vs clean encoder\n",
             "Pairs: (1) clean image / own caption, (2) triggered image / target caption, (3)-(5) adversarial image / "
             "own, target and unrelated captions; adv_target_rate = share of adversarial images classified as the "
             "target; cos_adv_triggered = mean cosine of an image's adversarial and triggered features.", "",
             head, "|---|---|---|" + "---|" * len(FIG2_COLUMNS)]
    for _, r in sim.iterrows():
        vals = [f"{r[c]:.2f}" for c in FIG2_COLUMNS]
        lines.append(f"| {r['run']} | {r['encoder']} | {r['perturbation']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def write_abd_tables(summary_csv: str | Path, similarity_csvs: list[str], out_dir: str | Path) -> list[Path]:
    df = pd.read_csv(summary_csv)
    first = eval_set_order(df)[0]
    claims = abd_claims(df, first)
    texts = {
        "abd_table1.md": _asr_cacc_table(df, ABD_TABLE1_ROWS, _attacks(df), first,
                                         f"Seed 002 Table I. ASR (down, %) and CACC (up, %) on `{first}`",
                                         "RoCLIP trains the clean model on the poisoned pairs (training-time defense); "
                                         "CleanCLIP and ABD fine-tune the victim on clean pairs.")
        + ("\n## Claim check\n\n" + claims if claims else ""),
        "abd_table2.md": _asr_cacc_table(df, ABD_TABLE2_ROWS, _attacks(df), first,
                                         f"Seed 002 Table II. Ablation of ABD's augmentations on `{first}`",
                                         "FT: clean images and captions; I_adv: adversarial images (UAP + L_bd); "
                                         "T_eda: EDA captions."),
        "abd_table3.md": _asr_cacc_table(df, ABD_TABLE3_ROWS, _attacks(df), first,
                                         f"Seed 002 Table III. UAP vs UAP + L_bd on `{first}`",
                                         "Fine-tuned on adversarial images (clean captions) from the generator "
                                         "without / with the backdoor loss; UAP (L_bd) is the I_adv arm."),
    }
    sim = [pd.read_csv(p) for p in similarity_csvs]
    if sim:
        texts["abd_fig2.md"] = fig2_table(pd.concat(sim, ignore_index=True))
    paths = []
    for name, text in texts.items():
        write_text(Path(out_dir) / name, text)
        paths.append(Path(out_dir) / name)
    return paths
