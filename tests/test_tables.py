"""Paper tables from a fixture summary: the paper's rows and columns, this run's values, '-' where missing."""

import pandas as pd

from clipbackdoor.report import COLUMNS
from clipbackdoor.tables import write_tables


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
        ("badnet", "fixed_heads", "heads=1-2-3", 0.90, 0.94, None),
        ("badnet", "decomp_reverse", "x", 0.40, 0.80, None),
        ("badnet", "ablate_all_heads", "-", 0.20, 0.60, None),
        ("blended", "none", "-", 0.87, 0.97, None),
        ("blended", "ablate_all_mlps", "-", 0.10, 0.70, None),
        ("blended", "decomp_det", "zeta=1", None, None, 0.50),
        ("blended", "strip", "n=16,n_images=64", None, None, 0.60),
    ]
    df = pd.DataFrame([{"attack": a, "defense": d, "variant": v, "seed": 0, "eval_set": "world", "asr": asr,
                        "cacc": cacc, "auroc": auroc} for a, d, v, asr, cacc, auroc in rows]).reindex(columns=COLUMNS)
    df.to_csv(path, index=False)


def lines_of(text, start):
    return [line for line in text.splitlines() if line.startswith(start)]


def test_tables_have_the_paper_rows_and_this_runs_values(tmp_path):
    fixture_summary(tmp_path / "s.csv")
    paths = write_tables(tmp_path / "s.csv", tmp_path / "tables", [[1, 2, 3]])
    assert [p.name for p in paths] == [f"table{i}.md" for i in range(1, 6)]
    t1 = (tmp_path / "tables" / "table1.md").read_text()
    assert lines_of(t1, "| Methods")[0] == "| Methods | BadNet ASR | CACC | Blended ASR | CACC |"
    assert [line.split(" | ")[0] for line in t1.splitlines() if line.startswith("| ") and "Methods" not in line] == [
        "| No Defense", "| + Base-Decomp", "| + Decomp-Rep", "| CleanCLIP", "| + Base-Decomp", "| + Decomp-Rep"]
    assert "| CleanCLIP | 15.00 | 93.00 | - | - |" in t1
    assert "| + Decomp-Rep | 2.00 | 94.00 | - | - |" in t1

    t2 = (tmp_path / "tables" / "table2.md").read_text()
    assert "| Decomp-Det | **0.990** | 0.500 | 0.745 |" in t2  # best in bold; average over attacks
    assert "| STRIP | 0.780 | **0.600** | 0.690 |" in t2
    assert "| SCALE-UP | - | - | - |" in t2
    assert "TeCo (compounding, public code) | 0.480 |" in t2 and "64 test images" in t2

    t3 = (tmp_path / "tables" / "table3.md").read_text()  # local triggers only
    assert "Blended" not in lines_of(t3, "| Methods")[0]
    assert "| + Fixed [1, 2, 3] | 90.00 | 94.00 |" in t3
    assert "| Original Clean | - | 96.00 |" in t3 and "| + Decomp-Reverse | 40.00 | 80.00 |" in t3

    t5 = (tmp_path / "tables" / "table5.md").read_text()
    assert "| w/o All AHs | 20.00 | 60.00 | - | - |" in t5 and "| w/o All MLPs | - | - | 10.00 | 70.00 |" in t5
    assert "this profile has one" in (tmp_path / "tables" / "table4.md").read_text()


def test_repaired_models_become_defense_rows(tmp_path):
    import pyarrow as pa

    from clipbackdoor.defend import OUTPUT_SCHEMA
    from clipbackdoor.io import write_parquet
    from clipbackdoor.report import defend_rows

    rows = {"defense": ["none"] * 4 + ["decomp_rep"] * 4, "variant": ["-"] * 4 + ["auto"] * 4,
            "split": ["clean", "clean", "triggered", "triggered"] * 2, "index": [0, 1, 0, 1] * 2,
            "label": [1, 2, 1, 2] * 2, "pred": [1, 2, 0, 0, 1, 2, 1, 2], "score": [None] * 8}
    table = pa.Table.from_pydict(rows, schema=OUTPUT_SCHEMA).replace_schema_metadata({"target": "0"})
    write_parquet(tmp_path / "d.parquet", table)  # as the defend stage writes it (with its column digests)
    out = defend_rows([{"model": "badnet-s1.cleanclip", "trigger": "badnet-s1", "eval_set": "world",
                        "path": tmp_path / "d.parquet"}])
    assert [(r["attack"], r["defense"], r["seed"], r["asr"], r["cacc"]) for r in out] == [
        ("badnet", "cleanclip", 1, 1.0, 1.0), ("badnet", "cleanclip+decomp_rep", 1, 0.0, 1.0)]


def test_abd_image_only_arm_is_also_table_iii_uap_lbd(tmp_path):
    import pyarrow as pa

    from clipbackdoor.defend import OUTPUT_SCHEMA
    from clipbackdoor.io import write_parquet
    from clipbackdoor.report import defend_rows

    rows = {"defense": ["none"] * 4, "variant": ["-"] * 4, "split": ["clean", "clean", "triggered", "triggered"],
            "index": [0, 1, 0, 1], "label": [1, 2, 1, 2], "pred": [1, 1, 0, 2], "score": [None] * 4}
    write_parquet(tmp_path / "d.parquet",
                  pa.Table.from_pydict(rows, schema=OUTPUT_SCHEMA).replace_schema_metadata({"target": "0"}))
    out = defend_rows([{"model": "badnet-s0.abd_img_only", "trigger": "badnet-s0", "eval_set": "world",
                        "path": tmp_path / "d.parquet"}])
    assert [(r["defense"], r["asr"], r["cacc"]) for r in out] == [("abd_img_only", 0.5, 0.5), ("uap_lbd", 0.5, 0.5)]
