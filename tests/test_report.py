"""The computed findings of summary.md on a fixture table."""


from clipbackdoor.analysis.report import findings, summary_frame, with_method


def _row(attack, defense, variant="-", seed=0, **metrics):
    return {"attack": attack, "repair": "-", "defense": defense, "variant": variant, "seed": seed, "eval_set": "world",
            **metrics}


def test_findings_say_whether_the_localisation_reproduces_and_what_the_defenses_do():
    rows = []
    for seed in (0, 1):
        rows += [_row("badnet", "none", seed=seed, asr=0.9, cacc=0.96),
                 _row("badnet", "decomp_rep", "auto:heads,rule=cosine,q=0.01,layers=1", seed, asr=0.1, cacc=0.95),
                 _row("badnet", "decomp_det", "rule=cosine,q=0.01,layers=1,zeta=1", seed, auroc=0.9 + 0.05 * seed,
                      tpr=0.9, fpr=0.1),
                 _row("badnet", "ablate_all_heads", seed=seed, asr=0.2, cacc=0.6),
                 _row("badnet", "ablate_all_mlps", seed=seed, asr=0.95, cacc=0.8),
                 _row("blended", "none", seed=seed, asr=0.85, cacc=0.97),
                 _row("blended", "ablate_all_heads", seed=seed, asr=0.6, cacc=0.6),
                 _row("blended", "ablate_all_mlps", seed=seed, asr=0.9, cacc=0.8)]
        rows += [_row("badnet", "ablate_heads_separate", f"layer={l}", seed, asr=0.9 - 0.1 * l, cacc=0.9)
                 for l in range(3)]
    notes = findings(with_method(summary_frame(rows)))
    text = "\n".join(notes)
    assert "badnet (local trigger)" in text and "all heads -> 0.20, all MLPs -> 0.95: REPRODUCED." in text
    assert "blended (global trigger)" in text and "NOT reproduced" in text
    assert "lowers ASR 0.90 -> 0.10 (cut 0.80) at a CACC change of -0.010" in text
    assert "Decomp-Det AUROC 0.925" in text
    assert "lowers ASR most at layer 2 (ASR 0.70); the paper finds the last layer (2) - consistent." in text


def test_training_figure_reads_each_models_loss_history(tmp_path):
    """history.csv per trained model (as save_artifact writes it) -> one panel per training stage; a model
    without one (open_clip pretrained weights) is skipped, a folder of none draws a note, not an error."""
    from PIL import Image

    from clipbackdoor.analysis.figures import training_figure

    models = {}
    for name, steps in (("clean", 40), ("badnet-s0", 20), ("blended-s0", 20), ("badnet-s0.cleanclip", 10)):
        folder = tmp_path / name
        folder.mkdir()
        rows = "".join(f"{s},{3.0 / s:.6g},0.001\n" for s in range(1, steps + 1))
        (folder / "history.csv").write_text("step,loss,lr\n" + rows)
        models[name] = folder
    (tmp_path / "pretrained").mkdir()
    models["pretrained"] = tmp_path / "pretrained"
    training_figure(models, tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size[0] > 3 * 400  # pretraining, fine-tuning, cleanclip panels
    training_figure({"pretrained": tmp_path / "pretrained"}, tmp_path / "none.png")
    assert (tmp_path / "none.png").stat().st_size > 1000


def test_report_prints_one_parameter_files_results_and_names_the_others(tmp_path):
    from conftest import run_cli

    for name in ("default", "abd"):
        metrics = tmp_path / "results" / name / "metrics"
        metrics.mkdir(parents=True)
        (metrics / "summary.csv").write_text("attack,asr\nbadnet,0.5\n")
        (metrics / "summary.md").write_text(f"# {name} results\n")
    out = run_cli("report", cwd=tmp_path).stdout
    assert out.startswith("# default results") and "other parameter files' results: results/abd/" in out
    assert run_cli("report", "--results", "abd", cwd=tmp_path).stdout.startswith("# abd results")
    proc = run_cli("report", "--results", "paper", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "results/paper/metrics/summary.csv: no results for 'paper' yet (results exist for: abd, default)" \
        in proc.stderr and "Traceback" not in proc.stderr
