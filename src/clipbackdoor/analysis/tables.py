"""Stage ``tables``: seed 001's Tables 1-5 (and seed 002's, stage ``abd-tables``) from the results table only
(plus the detect subsample size), with the paper's rows and columns; values are this run's, every metric in
percent (ASR, CACC and AUROC alike), mean over seeds, for the attacks present in the profile. A cell is "-" where
the run has no such row. Each table is written three ways from one :class:`Table`: Markdown (people, the report),
CSV (plots, spreadsheets) and LaTeX (booktabs, for a paper: ``\\input{table1.tex}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from clipbackdoor.config import Params
from clipbackdoor.io import atomic_path, write_text
from clipbackdoor.analysis.pages import write_page
from clipbackdoor.analysis.report import input_detectors, read_summary

PAPER_ATTACK_NAMES = {"badnet": "BadNet", "badnet_random": "BadNet (random)", "blended": "Blended", "sig": "SIG",
                      "wanet": "WaNet", "label_consistent": "Label Consistent", "issba": "ISSBA", "badclip": "BadCLIP"}

TABLE1_ROWS = [("No Defense", "none"), ("+ Base-Decomp", "base_decomp"), ("+ Decomp-Rep", "decomp_rep"),
               ("CleanCLIP", "cleanclip"), ("+ Base-Decomp", "cleanclip+base_decomp"),
               ("+ Decomp-Rep", "cleanclip+decomp_rep")]
TABLE5_ROWS = [("w/o All AHs", "ablate_all_heads"), ("w/o All MLPs", "ablate_all_mlps"), ("w Abandon", "abandon"),
               ("w Random Prototypes (one draw x prototype std)", "random_prototypes"),
               ("w Random Prototypes (official: N(0, 1) per image and head)", "random_prototypes_official"),
               ("Decomp-Rep", "decomp_rep")]
DETECTOR_ROWS = [("STRIP", "strip", None), ("SCALE-UP", "scaleup", None), ("TeCo (independent)", "teco", "independent"),
                 ("TeCo (compounding, public code)", "teco", "compounding"), ("Decomp-Det", "decomp_det", None)]


FORMATS = ("md", "html", "csv", "tex")  # what every table is written as
ARROWS = {"ASR": "ASR (down)", "CACC": "CACC (up)", "AUROC": "AUROC (up)"}  # Markdown / CSV header words
TEX_ARROWS = {"ASR": r"ASR$\downarrow$", "CACC": r"CACC$\uparrow$", "AUROC": r"AUROC$\uparrow$"}


@dataclass
class Table:
    """One results table, rendered as Markdown, CSV and LaTeX. Columns: ``label_columns`` (row names), then for
    each of ``groups`` (attacks, evaluation sets; none for a flat table) every one of ``metrics``. A value is a
    number (shown with ``digits`` decimals) or None ("-"); ``bold_max`` marks each column's largest value."""

    title: str
    note: str
    groups: list[str]
    metrics: list[str]
    rows: list[tuple[tuple[str, ...], list[float | None]]]
    label_columns: list[str] = field(default_factory=lambda: ["Methods"])
    digits: int = 2
    bold_max: bool = False
    footer: str = ""  # Markdown only (e.g. a claim check under the table)
    keys: list[str] | None = None  # per row, its summary.csv method (CSV only: labels such as "+ Decomp-Rep" repeat)

    def headers(self, words: dict[str, str]) -> list[str]:
        if not self.groups:
            return [words.get(m, m) for m in self.metrics]
        if len(self.metrics) == 1:
            return list(self.groups)
        return [f"{g} {words.get(m, m)}" for g in self.groups for m in self.metrics]

    def _best(self) -> list[float | None]:
        n = len(self.rows[0][1]) if self.rows else 0
        return [max((v[i] for _, v in self.rows if v[i] is not None), default=None) for i in range(n)]

    def _fmt(self, v: float | None) -> str:
        return "-" if v is None or pd.isna(v) else f"{v:.{self.digits}f}"

    def markdown(self) -> str:
        best = self._best() if self.bold_max else []
        head = self.label_columns + self.headers(ARROWS)
        lines = [f"# {self.title}\n", *([self.note, ""] if self.note else []), "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        for labels, values in self.rows:
            cells = [f"**{self._fmt(v)}**" if best and v is not None and v == best[i] else self._fmt(v)
                     for i, v in enumerate(values)]
            lines.append("| " + " | ".join([*labels, *cells]) + " |")
        return "\n".join(lines) + "\n" + ("\n" + self.footer if self.footer else "")

    def frame(self) -> pd.DataFrame:
        cols = self.label_columns + self.headers(ARROWS)
        df = pd.DataFrame([[*labels, *values] for labels, values in self.rows], columns=cols)
        if self.keys is None:
            return df
        return df.assign(method=self.keys)[[*self.label_columns, "method", *cols[len(self.label_columns):]]]

    def latex(self) -> str:
        """A booktabs table: a caption, grouped headers (\\cmidrule under each group), bold maxima."""
        best = self._best() if self.bold_max else []
        k, per = len(self.label_columns), max(1, len(self.metrics))
        n_values = len(self.rows[0][1]) if self.rows else len(self.headers(TEX_ARROWS))
        out = ["% written by clipbackdoor (stage tables); needs \\usepackage{booktabs}", r"\begin{table}[t]",
               r"\centering", rf"\caption{{{_tex(self.title)}{('. ' + _tex(self.note)) if self.note else ''}}}",
               rf"\begin{{tabular}}{{{'l' * k}{'r' * n_values}}}", r"\toprule"]
        labels = " & ".join(_tex(c) for c in self.label_columns)
        if self.groups and per > 1:
            spans = [rf"\multicolumn{{{per}}}{{c}}{{{_tex(g)}}}" for g in self.groups]
            rules = [rf"\cmidrule(lr){{{k + 1 + i * per}-{k + (i + 1) * per}}}" for i in range(len(self.groups))]
            out += [" & " * k + " & ".join(spans) + r" \\", " ".join(rules),
                    labels + " & " + " & ".join(TEX_ARROWS.get(m, _tex(m)) for _ in self.groups for m in self.metrics)
                    + r" \\"]
        else:
            out.append(labels + " & " + " & ".join(TEX_ARROWS.get(h, _tex(h)) for h in
                                                   (self.groups if self.groups else self.metrics)) + r" \\")
        out.append(r"\midrule")
        for row_labels, values in self.rows:
            cells = [rf"\textbf{{{self._fmt(v)}}}" if best and v is not None and v == best[i] else self._fmt(v)
                     for i, v in enumerate(values)]
            out.append(" & ".join([*(_tex(x) for x in row_labels), *cells]) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        return "\n".join(out) + "\n"

    def write(self, out_dir: Path, stem: str) -> list[Path]:
        """{stem}.md (+ its .html twin), {stem}.csv, {stem}.tex under ``out_dir`` (each atomically)."""
        out_dir = Path(out_dir)
        write_page(out_dir / f"{stem}.md", self.markdown())
        with atomic_path(out_dir / f"{stem}.csv") as tmp:
            self.frame().to_csv(tmp, index=False, float_format=f"%.{self.digits}f")
        write_text(out_dir / f"{stem}.tex", self.latex())
        return [out_dir / f"{stem}.{ext}" for ext in FORMATS]


TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
               "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def _tex(text: str) -> str:
    """Plain text -> LaTeX: special characters escaped, Markdown backticks dropped."""
    return "".join(TEX_ESCAPES.get(c, c) for c in str(text).replace("`", ""))


def _pct(v) -> str:
    return "-" if v is None or pd.isna(v) else f"{100 * v:.2f}"


def _pct_value(v: float | None) -> float | None:
    return None if v is None or pd.isna(v) else 100 * v


def _cell(df: pd.DataFrame, attack: str, defense: str, metric: str, eval_set: str, variant: str | None = None):
    rows = df[(df.attack == attack) & (df.method == defense) & (df.eval_set == eval_set)]
    if variant is not None:  # the setting, or its first parts ("independent" of "independent,n_images=320")
        rows = rows.loc[np.array([v == variant or v.startswith(variant + ",") for v in rows.variant.astype(str)],
                                 dtype=bool)]
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


def _asr_cacc_table(df, rows, attacks, eval_set, title, note="") -> Table:
    values = []
    for label, method, *variant in rows:
        v = variant[0] if variant else None
        values.append(((label,), [_pct_value(_cell(df, a, method, m, eval_set, v)) for a in attacks
                                  for m in ("asr", "cacc")]))
    return Table(title, note, [attack_title(a) for a in attacks], ["ASR", "CACC"], values,
                 keys=[method if not variant else f"{method}/{variant[0]}" for _, method, *variant in rows])


def attack_title(attack: str) -> str:
    """An attack's column header: the paper's name, an extension's title, else the name."""
    from clipbackdoor.extensions import titles

    return PAPER_ATTACK_NAMES.get(attack) or titles().get(attack, attack)


def table1_rows() -> list[tuple[str, str]]:
    """Table 1's rows: the paper's, with every registered extension defense that repairs (not a detector) after
    Decomp-Rep on the undefended model."""
    from clipbackdoor.extensions import Defense, of_kind

    extra = [(f"+ {e.title or e.name}", e.name) for e in of_kind(Defense).values() if not e.detector]
    return TABLE1_ROWS[:3] + extra + TABLE1_ROWS[3:]


def detector_rows() -> list[tuple[str, str, str | None]]:
    """Table 2's rows: the paper's input detectors, every registered extension detector and detecting defense,
    then Decomp-Det."""
    from clipbackdoor.extensions import Defense, Detector, of_kind

    extra = [(e.title or e.name, e.name, None) for e in of_kind(Detector).values()]
    extra += [(e.title or e.name, e.name, None) for e in of_kind(Defense).values() if e.detector]
    return DETECTOR_ROWS[:-1] + extra + DETECTOR_ROWS[-1:]


def table1(df, eval_set) -> Table:
    return _asr_cacc_table(df, table1_rows(), _attacks(df), eval_set,
                           f"Table 1. ASR and CACC (%) on {_on(df, eval_set)}",
                           "Base-Decomp: the decomposed representation unchanged; Decomp-Rep: repaired heads "
                           "(Algorithm 1); CleanCLIP rows: the CleanCLIP-repaired model, then the same.")


def table2(df, eval_set, subsample: str) -> Table:
    attacks = _attacks(df)
    rows = []
    detectors = detector_rows()
    for label, method, variant in detectors:
        vals = [_pct_value(_cell(df, a, method, "auroc", eval_set, variant)) for a in attacks]
        present = [x for x in vals if x is not None]
        rows.append(((label,), [*vals, float(np.mean(present)) if present else None]))
    return Table(f"Table 2. AUROC (%) on {_on(df, eval_set)}",
                 f"Input detectors score {subsample}; Decomp-Det scores every test image. Best per column in bold.",
                 [attack_title(a) for a in attacks] + ["Average"], ["AUROC"], rows, bold_max=True,
                 keys=[m if v is None else f"{m}/{v}" for _, m, v in detectors])


def table3(df, eval_set, fixed_variants: list[str]) -> Table:
    attacks = [a for a in _attacks(df) if _kind(a) == "local"] or _attacks(df)
    rows = [("No Defense", "none"), ("+ Base-Decomp", "base_decomp"), ("+ Decomp-Rep", "decomp_rep")]
    rows += [(f"+ Fixed [{v.removeprefix('heads=').replace('-', ', ')}]", "fixed_heads", v) for v in fixed_variants]
    rows += [("+ Random AHs", "random_heads")]
    table = _asr_cacc_table(df, rows, attacks, eval_set,
                            f"Table 3. Fixed, random and reverse head ablation on {_on(df, eval_set)} (local triggers)",
                            "Heads are named L{layer}H{head}, both from 0. Original Clean: the un-backdoored model; "
                            "Decomp-Reverse: clean images carrying the triggered images' selected heads.")
    clean = df[(df.attack == "clean") & (df.method == "none") & (df.variant == "-") & (df.eval_set == eval_set)]
    cacc = _pct_value(clean.cacc.mean()) if len(clean) else None
    table.rows.append((("Original Clean",), [x for _ in attacks for x in (None, cacc)]))
    table.rows.append((("+ Decomp-Reverse",), [_pct_value(_cell(df, a, "decomp_reverse", m, eval_set))
                                               for a in attacks for m in ("asr", "cacc")]))
    table.keys += ["clean model", "decomp_reverse"]
    return table


def table4(df, eval_sets: list[str]) -> Table:
    attack = "badnet" if "badnet" in set(df.attack) else _attacks(df)[0]
    rows = [((label,), [_pct_value(_cell(df, attack, method, m, e)) for e in eval_sets for m in ("asr", "cacc")])
            for label, method in TABLE1_ROWS]
    return Table(f"Table 4. ASR and CACC (%) of {attack_title(attack)} per evaluation set",
                 "The paper's Caltech-101 and Oxford Pets columns are the profile's evaluation sets"
                 + (" (this profile has one)." if len(eval_sets) == 1 else "."),
                 [f"{e} (target {_target(df, e)})" for e in eval_sets], ["ASR", "CACC"], rows,
                 keys=[method for _, method in TABLE1_ROWS])


def table5(df, eval_set) -> Table:
    return _asr_cacc_table(df, TABLE5_ROWS, _attacks(df), eval_set, f"Table 5. Ablation study on {_on(df, eval_set)}",
                           "w Abandon: selected heads set to zero; w Random Prototypes: replaced by random vectors -- "
                           "one seeded draw per split scaled by each prototype's std, or, as the paper and the "
                           "official code do, a fresh standard normal vector per image and head.")


def _kind(attack: str) -> str:
    from clipbackdoor.attacks import REGISTRY

    return REGISTRY[attack].kind if attack in REGISTRY else "local"


def write_tables(summary_csv: str | Path, out_dir: str | Path, fixed_heads: list[list[str]]) -> list[Path]:
    df = read_summary(summary_csv)
    eval_sets = eval_set_order(df)
    first = eval_sets[0]
    det = df[df.method.isin(input_detectors(df.method))]
    sizes = sorted({v.rpartition("n_images=")[2] for v in det.variant.astype(str) if "n_images=" in v})
    subsample = (f"a seeded subsample of {', '.join(sizes)} test images (each clean and triggered)" if sizes
                 else "no images (no detector configured)")
    fixed = [f"heads={'-'.join(h)}" for h in fixed_heads]
    out_dir = Path(out_dir)
    tables = {"table1": table1(df, first), "table2": table2(df, first, subsample), "table3": table3(df, first, fixed),
              "table4": table4(df, eval_sets), "table5": table5(df, first)}
    return [path for stem, table in tables.items() for path in table.write(out_dir, stem)]


# Seed 002 (ABD). Rows name summary.csv methods (report.method_name); the model arms come from repair.methods.
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
        name = attack_title(a)
        if None not in (abd, cc, abd_c, cc_c):
            ok = abd < cc and cc_c - abd_c <= 0.02
            lines.append(f"- {name}: ABD ASR {_pct(abd)} vs CleanCLIP {_pct(cc)}, CACC {_pct(abd_c)} vs {_pct(cc_c)} "
                         f"-> ABD below CleanCLIP at a CACC drop <= 2 points: **{'yes' if ok else 'no'}**")
        if None not in (uap, lbd):
            lines.append(f"- {name}: ASR after fine-tuning on UAP {_pct(uap)} vs UAP (L_bd) {_pct(lbd)} -> L_bd "
                         f"improves over plain UAP: **{'yes' if lbd < uap else 'no'}**")
    return "\n".join(lines) + "\n" if lines else ""


def fig2_table(sim: pd.DataFrame) -> Table:
    rows = [((str(r["run"]), str(r["encoder"]), str(r["perturbation"])), [float(r[c]) for c in FIG2_COLUMNS])
            for _, r in sim.iterrows()]
    return Table("Seed 002 Fig. 2: image-caption similarity (100 x cos), poisoned vs clean encoder",
                 "Pairs: (1) clean image / own caption, (2) triggered image / target caption, (3)-(5) adversarial "
                 "image / own, target and unrelated captions; adv_target_rate = share of adversarial images classified "
                 "as the target; cos_adv_triggered = mean cosine of an image's adversarial and triggered features.",
                 [], FIG2_COLUMNS, rows, label_columns=["Run", "Encoder", "Perturbation"])


def write_abd_tables(summary_csv: str | Path, similarity_csvs: list[str], out_dir: str | Path) -> list[Path]:
    df = read_summary(summary_csv)
    first = eval_set_order(df)[0]
    claims = abd_claims(df, first)
    table1 = _asr_cacc_table(df, ABD_TABLE1_ROWS, _attacks(df), first,
                             f"Seed 002 Table I. ASR and CACC (%) on `{first}`",
                             "RoCLIP trains the clean model on the poisoned pairs (training-time defense); "
                             "CleanCLIP and ABD fine-tune the victim on clean pairs.")
    table1.footer = "## Claim check\n\n" + claims if claims else ""
    tables = {
        "abd_table1": table1,
        "abd_table2": _asr_cacc_table(df, ABD_TABLE2_ROWS, _attacks(df), first,
                                      f"Seed 002 Table II. Ablation of ABD's augmentations on `{first}`",
                                      "FT: clean images and captions; I_adv: adversarial images (UAP + L_bd); "
                                      "T_eda: EDA captions."),
        "abd_table3": _asr_cacc_table(df, ABD_TABLE3_ROWS, _attacks(df), first,
                                      f"Seed 002 Table III. UAP vs UAP + L_bd on `{first}`",
                                      "Fine-tuned on adversarial images (clean captions) from the generator "
                                      "without / with the backdoor loss; UAP (L_bd) is the I_adv arm."),
    }
    sim = [pd.read_csv(p) for p in similarity_csvs]
    if sim:
        tables["abd_fig2"] = fig2_table(pd.concat(sim, ignore_index=True))
    return [path for stem, table in tables.items() for path in table.write(Path(out_dir), stem)]


def tables_stage(args, p: Params) -> None:
    """CLI stage ``tables``: Tables 1-5 and Figures 1, 6, 8."""
    from clipbackdoor.analysis.figures import ablation_bars_figure, eps_sweep_figure, mmd_cacc_figure
    from clipbackdoor.pipeline.runs import name_paths

    for path in write_tables(args.summary, args.out_dir, [list(h) for h in p.defend.fixed_heads]):
        print(path)
    ablation_bars_figure(args.summary, args.fig1)
    eps_sweep_figure(args.summary, args.fig6)
    mmd_cacc_figure(args.summary, name_paths(args.mmd or []), args.fig8)


def abd_tables_stage(args, p: None) -> None:
    """CLI stage ``abd-tables``."""
    for path in write_abd_tables(args.summary, args.similarity, args.out_dir):
        print(path)
