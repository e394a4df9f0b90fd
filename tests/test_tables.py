"""Paper tables from a fixture summary: the paper's rows and columns, this run's values, '-' where missing."""

import pandas as pd

from clipbackdoor.analysis.report import summary_frame
from clipbackdoor.analysis.tables import write_tables


def fixture_summary(path):
    rows = [
        ("clean", "none", "-", None, 0.96, None),
        ("badnet", "none", "-", 0.97, 0.95, None),
        ("badnet", "base_decomp", "-", 0.96, 0.95, None),
        ("badnet", "decomp_rep", "auto:heads", 0.02, 0.94, None),
        ("badnet", "cleanclip", "-", 0.15, 0.93, None),
        ("badnet", "cleanclip+decomp_rep", "auto:heads", 0.01, 0.92, None),
        ("badnet", "decomp_det", "zeta=1", None, None, 0.99),
        ("badnet", "strip", "n=16,n_images=64", None, None, 0.78),
        ("badnet", "teco", "independent,n_images=64", None, None, 0.63),
        ("badnet", "teco", "compounding,n_images=64", None, None, 0.48),
        ("badnet", "fixed_heads", "heads=L5H0-L5H1-L5H2", 0.90, 0.94, None),
        ("badnet", "decomp_reverse", "x", 0.40, 0.80, None),
        ("badnet", "ablate_all_heads", "-", 0.20, 0.60, None),
        ("blended", "none", "-", 0.87, 0.97, None),
        ("blended", "ablate_all_mlps", "-", 0.10, 0.70, None),
        ("blended", "decomp_det", "zeta=1", None, None, 0.50),
        ("blended", "strip", "n=16,n_images=64", None, None, 0.60),
    ]
    def split(method):  # summary.csv keeps the model's repair and the defense apart
        repair, _, defense = method.rpartition("+")
        return (repair, defense) if repair else (method, "none") if method == "cleanclip" else ("-", method)

    df = summary_frame([{"attack": a, "repair": split(m)[0], "defense": split(m)[1], "variant": v, "seed": 0,
                         "eval_set": "world", "asr": asr, "cacc": cacc, "auroc": auroc}
                        for a, m, v, asr, cacc, auroc in rows])
    df.to_csv(path, index=False)


def lines_of(text, start):
    return [line for line in text.splitlines() if line.startswith(start)]


def test_tables_have_the_paper_rows_and_this_runs_values(tmp_path):
    fixture_summary(tmp_path / "s.csv")
    paths = write_tables(tmp_path / "s.csv", tmp_path / "tables", [["L5H0", "L5H1", "L5H2"]])
    assert [p.name for p in paths] == [f"table{i}.{ext}" for i in range(1, 6) for ext in ("md", "html", "csv", "tex")]
    t1 = (tmp_path / "tables" / "table1.md").read_text()
    assert lines_of(t1, "| Methods")[0] == ("| Methods | BadNet ASR (down) | BadNet CACC (up) | Blended ASR (down) | "
                                            "Blended CACC (up) |")
    assert [line.split(" | ")[0] for line in t1.splitlines() if line.startswith("| ") and "Methods" not in line] == [
        "| No Defense", "| + Base-Decomp", "| + Decomp-Rep", "| CleanCLIP", "| + Base-Decomp", "| + Decomp-Rep"]
    assert "| CleanCLIP | 15.00 | 93.00 | - | - |" in t1
    assert "| + Decomp-Rep | 2.00 | 94.00 | - | - |" in t1

    t2 = (tmp_path / "tables" / "table2.md").read_text()
    assert "| Decomp-Det | **99.00** | 50.00 | **74.50** |" in t2  # every table in %; best in bold; mean of attacks
    assert "| STRIP | 78.00 | **60.00** | 69.00 |" in t2
    assert "| SCALE-UP | - | - | - |" in t2
    assert "TeCo (compounding, public code) | 48.00 |" in t2 and "64 test images" in t2

    t3 = (tmp_path / "tables" / "table3.md").read_text()  # local triggers only
    assert "Blended" not in lines_of(t3, "| Methods")[0]
    assert "| + Fixed [L5H0, L5H1, L5H2] | 90.00 | 94.00 |" in t3
    assert "| Original Clean | - | 96.00 |" in t3 and "| + Decomp-Reverse | 40.00 | 80.00 |" in t3

    t5 = (tmp_path / "tables" / "table5.md").read_text()
    assert "| w/o All AHs | 20.00 | 60.00 | - | - |" in t5 and "| w/o All MLPs | - | - | 10.00 | 70.00 |" in t5
    assert "this profile has one" in (tmp_path / "tables" / "table4.md").read_text()

    # the same numbers as CSV (for plots) and LaTeX (booktabs, for a paper)
    csv = pd.read_csv(tmp_path / "tables" / "table1.csv")
    assert list(csv.columns) == ["Methods", "method", "BadNet ASR (down)", "BadNet CACC (up)", "Blended ASR (down)",
                                 "Blended CACC (up)"]
    # the paper's labels repeat ("+ Decomp-Rep" for the victim and for CleanCLIP): the summary's method tells them apart
    assert list(csv.method) == ["none", "base_decomp", "decomp_rep", "cleanclip", "cleanclip+base_decomp",
                                "cleanclip+decomp_rep"]
    assert csv.set_index("method").loc["cleanclip+decomp_rep", "BadNet ASR (down)"] == 1.0
    assert csv.set_index("Methods").loc["CleanCLIP", "BadNet ASR (down)"] == 15.0
    assert pd.isna(csv.set_index("Methods").loc["CleanCLIP", "Blended ASR (down)"])
    tex = (tmp_path / "tables" / "table1.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and tex.count(r"\cmidrule(lr)") == 2
    assert r"\multicolumn{2}{c}{BadNet} & \multicolumn{2}{c}{Blended} \\" in tex
    assert r"CleanCLIP & 15.00 & 93.00 & - & - \\" in tex
    assert r"Decomp-Det & \textbf{99.00} & 50.00 & \textbf{74.50} \\" in (tmp_path / "tables" / "table2.tex").read_text()


def test_latex_escapes_text():
    from clipbackdoor.analysis.tables import Table

    tex = Table("50% of a_b & c", "", [], ["x"], [(("row_1 #2",), [1.0])]).latex()
    assert r"\caption{50\% of a\_b \& c}" in tex and r"row\_1 \#2 & 1.00 \\" in tex


def test_repaired_models_become_defense_rows(tmp_path):
    import pyarrow as pa

    from clipbackdoor.defenses.predictions import PREDICTIONS_SCHEMA
    from clipbackdoor.io import write_parquet
    from clipbackdoor.analysis.report import defend_rows

    rows = {"defense": ["none"] * 4 + ["decomp_rep"] * 4, "variant": ["-"] * 4 + ["auto"] * 4,
            "split": ["clean", "clean", "triggered", "triggered"] * 2, "index": [0, 1, 0, 1] * 2,
            "label": [1, 2, 1, 2] * 2, "pred": [1, 2, 0, 0, 1, 2, 1, 2], "score": [None] * 8}
    table = pa.Table.from_pydict(rows, schema=PREDICTIONS_SCHEMA).replace_schema_metadata({"target": "0"})
    write_parquet(tmp_path / "d.parquet", table)  # as the defend stage writes it (with its column digests)
    out = defend_rows([{"model": "badnet-s1.cleanclip", "trigger": "badnet-s1", "eval_set": "world",
                        "path": tmp_path / "d.parquet"}])
    assert [(r["attack"], r["repair"], r["defense"], r["seed"], r["asr"], r["cacc"]) for r in out] == [
        ("badnet", "cleanclip", "none", 1, 1.0, 1.0), ("badnet", "cleanclip", "decomp_rep", 1, 0.0, 1.0)]
    assert [(r["n_clean"], r["n_triggered"], r["n_asr"]) for r in out] == [(2, 2, 2)] * 2
    assert all(r["asr_lo"] <= r["asr"] <= r["asr_hi"] and r["cacc_lo"] <= r["cacc"] <= r["cacc_hi"] for r in out)


def test_abd_image_only_arm_is_also_table_iii_uap_lbd(tmp_path):
    import pyarrow as pa

    from clipbackdoor.defenses.predictions import PREDICTIONS_SCHEMA
    from clipbackdoor.io import write_parquet
    from clipbackdoor.analysis.report import defend_rows

    rows = {"defense": ["none"] * 4, "variant": ["-"] * 4, "split": ["clean", "clean", "triggered", "triggered"],
            "index": [0, 1, 0, 1], "label": [1, 2, 1, 2], "pred": [1, 1, 0, 2], "score": [None] * 4}
    write_parquet(tmp_path / "d.parquet",
                  pa.Table.from_pydict(rows, schema=PREDICTIONS_SCHEMA).replace_schema_metadata({"target": "0"}))
    out = defend_rows([{"model": "badnet-s0.abd_img_only", "trigger": "badnet-s0", "eval_set": "world",
                        "path": tmp_path / "d.parquet"}])
    assert [(r["repair"], r["defense"], r["asr"], r["cacc"]) for r in out] == [
        ("abd_img_only", "none", 0.5, 0.5), ("uap_lbd", "none", 0.5, 0.5)]


def test_summary_keeps_repair_defense_and_each_setting_in_columns(tmp_path):
    from clipbackdoor.analysis.report import read_summary

    fixture_summary(tmp_path / "s.csv")
    raw = pd.read_csv(tmp_path / "s.csv")
    assert list(raw.columns[:7]) == ["attack", "seed", "eval_set", "target", "repair", "defense", "variant"]
    row = raw[(raw.repair == "cleanclip") & (raw.defense == "decomp_rep")].iloc[0]
    assert row["mode"] == "auto:heads" and row.variant == "auto:heads"
    teco = raw[(raw.defense == "teco")].sort_values("mode")
    assert list(teco["mode"]) == ["compounding", "independent"] and list(teco.n_images) == [64, 64]
    assert raw[raw.defense == "fixed_heads"].heads.iloc[0] == "L5H0-L5H1-L5H2"
    assert {"n_clean", "n_triggered", "n_asr", "asr_lo", "asr_hi", "auroc_lo", "auroc_hi"} <= set(raw.columns)
    methods = read_summary(tmp_path / "s.csv").method
    assert {"cleanclip", "cleanclip+decomp_rep", "none", "strip"} <= set(methods)
    (tmp_path / "old.csv").write_text("attack,defense,variant\nbadnet,none,-\n")
    import pytest

    from clipbackdoor.errors import UserError

    with pytest.raises(UserError, match="no column.*repair.*rerun the `summary` stage"):
        read_summary(tmp_path / "old.csv")


def test_headline_metrics_are_a_few_numbers_per_attack(tmp_path):
    from clipbackdoor.analysis.report import headline, read_summary

    fixture_summary(tmp_path / "s.csv")
    tree = headline(read_summary(tmp_path / "s.csv"))
    assert tree == {"world": {"clean": {"cacc": 0.96},
                              "badnet": {"asr": 0.97, "cacc": 0.95, "decomp_rep_asr": 0.02, "decomp_rep_cacc": 0.94,
                                         "decomp_det_auroc": 0.99},
                              "blended": {"asr": 0.87, "cacc": 0.97, "decomp_det_auroc": 0.5}}}


def test_every_markdown_page_has_an_html_twin_that_renders_its_table(tmp_path):
    from clipbackdoor.analysis.pages import markdown_to_html

    fixture_summary(tmp_path / "s.csv")
    write_tables(tmp_path / "s.csv", tmp_path / "tables", [["L5H0", "L5H1", "L5H2"]])
    page = (tmp_path / "tables" / "table2.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<title>Table 2. AUROC (%) on world (target ?)</title>" in page
    assert "<th>Methods</th><th>BadNet</th><th>Blended</th><th>Average</th>" in page
    assert "<tr><td>Decomp-Det</td><td><strong>99.00</strong></td><td>50.00</td><td><strong>74.50</strong></td></tr>" in page
    assert "|" not in page.split("<body>")[1]  # no Markdown left over
    html = markdown_to_html("# T <1>\n\npara `a_b` **x**\nmore\n\n- one\n  wrapped\n- two\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert "<h1>T &lt;1&gt;</h1>" in html and "<p>para <code>a_b</code> <strong>x</strong> more</p>" in html
    assert "<ul><li>one wrapped</li><li>two</li></ul>" in html
    assert "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td>2</td></tr></tbody></table>" in html
