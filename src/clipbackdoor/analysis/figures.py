"""Stage ``figures``: the paper's Figure 2 (layer-wise mean-ablation curves) and Figure 5 (densities of the
cosine between last-layer head terms and their prototypes, clean vs triggered), from artifacts only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from clipbackdoor.config import Params
from clipbackdoor.pipeline.runs import parse_run
from clipbackdoor.io import save_figure
from clipbackdoor.analysis.report import read_summary


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attack_colour(attack: str):
    """One colour per attack in every figure (fixed by the attack's place among all attacks, not by which
    attacks a profile runs), named as in the tables."""
    from clipbackdoor.analysis.tables import PAPER_ATTACK_NAMES

    order = list(PAPER_ATTACK_NAMES)
    i = order.index(attack) if attack in order else len(order) + sum(map(ord, attack))
    return _plt().cm.tab10.colors[i % 10]


def attack_label(attack: str) -> str:
    from clipbackdoor.analysis.tables import attack_title

    return attack_title(attack)


def _layer_ablations(df: pd.DataFrame, attacks: list[str], metrics: list[str]):
    """Per panel of the per-layer ablation figures -- (row, column, heads | mlps, forward | backward | separate) --
    each attack's mean ``metrics`` per ablated layer: (row, column, part, mode, [(attack, curve [layers x metrics])])."""
    for r, part in enumerate(("heads", "mlps")):
        for c, mode in enumerate(("forward", "backward", "separate")):
            curves = []
            for attack in attacks:
                rows = df[(df.attack == attack) & (df.method == f"ablate_{part}_{mode}")]
                if len(rows):
                    layer = rows.variant.str.removeprefix("layer=").astype(int).rename("layer")
                    curves.append((attack, rows.groupby(layer)[metrics].mean()))
            yield r, c, part, mode, curves


def layerwise_figure(summary_csv: str | Path, png: str | Path) -> None:
    """ASR (solid) and CACC (dotted) per layer for forward / backward / separate ablation of heads and MLPs."""
    plt = _plt()
    df = read_summary(summary_csv)
    df = df[df.attack != "clean"]
    attacks = _attack_rows(df)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharey=True)
    for r, c, part, mode, curves in _layer_ablations(df, attacks, ["asr", "cacc"]):
        ax = axes[r, c]
        for attack, curve in curves:
            colour = attack_colour(attack)
            ax.plot(curve.index, curve.asr, "-o", color=colour, label=f"{attack_label(attack)} ASR", ms=3)
            ax.plot(curve.index, curve.cacc, ":", color=colour, label=f"{attack_label(attack)} CACC")
            base = df[(df.attack == attack) & (df.method == "none")].asr.mean()
            ax.axhline(base, color=colour, ls="--", lw=0.8)
        ax.set_title(f"{mode} ablation of {part}", fontsize=9)
        ax.set_xlabel("layer (0 = first)")
        ax.set_ylim(-0.02, 1.02)
        axes[r, 0].set_ylabel(f"ASR / CACC ({part} ablated)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Mean-ablation per layer (solid: ASR; dotted: CACC; dashed: undefended ASR)")
    fig.tight_layout()
    save_figure(fig, png)


def prototype_cosine_figure(entries: list[tuple[str, Path, Path, Path]], png: str | Path) -> None:
    """entries: (attack run, clean decomposition, triggered decomposition, prototypes) -> one row per run."""
    from clipbackdoor.defenses.defend import prototype_cosines
    from clipbackdoor.decomposition.prototypes import load_prototypes

    plt = _plt()
    rows = len(entries)
    first = load_prototypes(entries[0][3])
    n_heads = first["heads"].shape[1]
    fig, axes = plt.subplots(rows, n_heads, figsize=(1.8 * n_heads, 1.7 * rows + 0.6), squeeze=False)
    bins = np.linspace(-1, 1, 41)
    last = first["heads"].shape[0] - 1  # the last layer's index (heads numbered L{layer}H{head} from 0)
    for r, (run, clean, trig, protos_path) in enumerate(entries):
        protos = load_prototypes(protos_path)
        cos_c, cos_t = prototype_cosines(clean, protos), prototype_cosines(trig, protos)  # [N, H]
        for h in range(n_heads):
            ax = axes[r, h]
            ax.hist(cos_c[:, h], bins=bins, density=True, alpha=0.55, color="tab:green", label="clean")
            ax.hist(cos_t[:, h], bins=bins, density=True, alpha=0.55, color="tab:red", label="triggered")
            ax.set_yticks([])
            ax.set_title(f"{run} L{last}H{h}" if h == 0 else f"L{last}H{h}", fontsize=7)
            if r == rows - 1:
                ax.set_xlabel("cosine to prototype", fontsize=7)
        axes[r, 0].set_ylabel("density", fontsize=7)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"Cosine of the last layer's (L{last}) head terms to their prototypes", fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)


ROC_METHODS = {"decomp_det": ("Decomp-Det", "tab:red"), "strip": ("STRIP", "tab:blue"),
               "scaleup": ("SCALE-UP", "tab:green"), "teco": ("TeCo", "tab:purple")}


def roc_methods() -> dict[str, tuple[str, str]]:
    """{method: (label, colour)} of the ROC figure: Decomp-Det, the input detectors, then every registered
    extension detector and detecting defense (in grey tones)."""
    from clipbackdoor.extensions import Defense, Detector, of_kind

    extra = [e for e in of_kind(Detector).values()] + [e for e in of_kind(Defense).values() if e.detector]
    return {**ROC_METHODS, **{e.name: (e.title or e.name, f"{0.2 + 0.5 * i / max(1, len(extra))}")
                              for i, e in enumerate(extra)}}


def roc_figure(entries: list[tuple[str, list[Path]]], png: str | Path) -> None:
    """ROC curves of Decomp-Det and the input detectors, one panel per attack run: (run, [its defend table, its
    detect table]) -> clean test images negative, triggered positive, each detector's per-image scores."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from clipbackdoor.io import read_parquet

    plt = _plt()
    fig, axes = plt.subplots(1, len(entries), figsize=(3.4 * len(entries), 3.6), squeeze=False)
    for ax, (run, paths) in zip(axes[0], entries):
        for path in paths:
            table = read_parquet(path, made_by="the `defend` or `detect` stage").to_pandas()
            methods = roc_methods()
            table = table[table.defense.isin(list(methods))]
            for (defense, variant), g in table.groupby(["defense", "variant"], sort=True):
                y = (g.split == "triggered").to_numpy().astype(int)
                fpr, tpr, _ = roc_curve(y, g.score.to_numpy())
                name, colour = methods[defense]
                mode = variant.split(",")[0] if defense == "teco" else ""
                ax.plot(fpr, tpr, color=colour, ls=":" if mode == "compounding" else "-", lw=1.2,
                        label=f"{name}{' ' + mode if mode else ''} ({roc_auc_score(y, g.score.to_numpy()):.3f})")
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.6, ls="--")
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("false positive rate (clean flagged)")
        ax.set_ylabel("true positive rate (triggered flagged)")
        ax.legend(fontsize=6, loc="lower right", title="AUROC", title_fontsize=6)
    fig.suptitle("Detection ROC: Decomp-Det vs input detectors (dashed: chance)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)


def _attack_rows(df: pd.DataFrame) -> list[str]:
    return sorted(a for a in df.attack.unique() if a != "clean")


def ablation_bars_figure(summary_csv: str | Path, png: str | Path) -> None:
    """Figure 1: ASR and CACC with all MLPs or all heads mean-ablated, per attack (dashes: undefended)."""
    plt = _plt()
    df = read_summary(summary_csv)
    attacks = _attack_rows(df)
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.3 * len(attacks) + 3), 3.6), sharey=True)
    x = np.arange(len(attacks))
    for ax, metric in zip(axes, ("asr", "cacc")):
        for k, (defense, label, colour) in enumerate((("ablate_all_mlps", "w/o all MLPs", "tab:blue"),
                                                     ("ablate_all_heads", "w/o all heads", "tab:orange"))):
            vals = [df[(df.attack == a) & (df.method == defense)][metric].mean() for a in attacks]
            ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, label=label, color=colour)
        base = [df[(df.attack == a) & (df.method == "none")][metric].mean() for a in attacks]
        ax.hlines(base, x - 0.4, x + 0.4, colors="k", linestyles="--", lw=1, label="undefended")
        ax.set_xticks(x, [attack_label(a) for a in attacks], rotation=30, fontsize=8)
        ax.set_title(metric.upper(), fontsize=9)
        ax.set_ylabel(metric.upper())
        ax.set_ylim(0, 1.02)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)  # below the bars, not on them
    fig.suptitle("Mean-ablation of all MLPs or all attention heads", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save_figure(fig, png)


def eps_sweep_figure(summary_csv: str | Path, png: str | Path) -> None:
    """Figure 6: Decomp-Rep with one fixed eps for every head: ASR and CACC against eps, per attack."""
    plt = _plt()
    df = read_summary(summary_csv)
    rows = df[df.method == "decomp_rep_sweep"].copy()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharex=True)
    if not rows.empty:
        rows["eps"] = rows.variant.str.extract(r"eps=([-0-9.e]+)")[0].astype(float)
        for attack in _attack_rows(rows):
            curve = rows[rows.attack == attack].groupby("eps")[["asr", "cacc"]].mean()
            for ax, metric in zip(axes, ("asr", "cacc")):
                ax.plot(curve.index, curve[metric], "-o", ms=3, label=attack_label(attack), color=attack_colour(attack))
    for ax, metric in zip(axes, ("ASR", "CACC")):
        ax.set_xlabel("eps (cosine threshold)")
        ax.set_ylabel(metric)
        ax.set_title(metric, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle("Decomp-Rep: effect of eps", fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)


def mmd_cacc_figure(summary_csv: str | Path, mmd_csvs: dict[str, Path], png: str | Path) -> None:
    """Figure 8: (a-c) CACC of forward / backward / separate ablation of heads (top) and MLPs (bottom);
    (d) layer-wise MMD between clean and triggered terms of the heads (top) and MLPs (bottom)."""
    plt = _plt()
    df = read_summary(summary_csv)
    attacks = _attack_rows(df)
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for r, c, part, mode, curves in _layer_ablations(df, attacks, ["cacc"]):
        ax = axes[r, c]
        for attack, curve in curves:
            ax.plot(curve.index, curve.cacc, "-o", ms=3, color=attack_colour(attack), label=attack_label(attack))
            ax.axhline(df[(df.attack == attack) & (df.method == "none")].cacc.mean(), color=attack_colour(attack),
                       ls="--", lw=0.8)
        ax.set_title(f"({'abc'[c]}) CACC, {mode} ablation of {part}", fontsize=8)
        ax.set_xlabel("layer (0 = first)")
        ax.set_ylabel("CACC")
    for r, part in enumerate(("heads", "mlps")):
        ax = axes[r, 3]
        kind = "heads" if part == "heads" else "mlp"
        kernel = ""
        for run, path in sorted(mmd_csvs.items()):
            m = pd.read_csv(path)
            m = m[m.kind == kind]
            attack = parse_run(run)[0]
            ax.plot(m.layer, m.mmd2, "-o", ms=3, color=attack_colour(attack), label=run)
            kernel = f"{m.kernel.iloc[0]} kernel, median-heuristic bandwidth" if len(m) else kernel
        ax.set_title(f"(d) MMD^2 of {part} per layer", fontsize=8)
        ax.set_xlabel("layer (0 = first)")
        ax.set_ylabel("MMD^2")
    axes[0, 0].legend(fontsize=7)
    axes[0, 3].legend(fontsize=6)
    fig.suptitle(f"Dashed: undefended CACC. MMD^2: clean vs triggered terms of the backdoored model ({kernel})",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)


def head_map_figure(entries: list[tuple[str, Path, Path, Path, Path | None]], cfg, png: str | Path) -> None:
    """Where the backdoor lives, per head: one row per attack run (run, clean decomposition, triggered
    decomposition, prototypes, MMD CSV or None), layer x head heatmaps of (a) the share of triggered test images
    whose head the infected-head rule flags (``defend``'s rule and thresholds, on every layer), (b) the same on
    clean test images (the false-alarm floor: ~q under ``clean_quantile``), (c) each head's MMD^2 between its
    clean and triggered terms (the ``mmd`` stage)."""
    from clipbackdoor.defenses.defend import flag_rates
    from clipbackdoor.decomposition.prototypes import load_prototypes

    plt = _plt()
    cols = 3 if any(e[4] is not None for e in entries) else 2
    fig, axes = plt.subplots(len(entries), cols, figsize=(4.2 * cols, 3.2 * len(entries) + 0.6), squeeze=False)
    for r, (run, clean, trig, protos_path, mmd_csv) in enumerate(entries):
        protos = load_prototypes(protos_path)
        maps = [("flagged, triggered images", flag_rates(trig, protos, cfg), (0, 1), "Reds"),
                ("flagged, clean images", flag_rates(clean, protos, cfg), (0, 1), "Reds")]
        if mmd_csv is not None:
            m = pd.read_csv(mmd_csv)
            m = m[m.kind == "head"]
            grid = np.full(maps[0][1].shape, np.nan)  # [L, H]
            grid[m.layer.to_numpy(), m["head"].to_numpy()] = m.mmd2.to_numpy()
            maps.append(("MMD^2 clean vs triggered", grid, (0, np.nanmax(grid) if np.isfinite(grid).any() else 1),
                         "viridis"))
        for c, (title, grid, (lo, hi), cmap) in enumerate(maps):
            ax = axes[r, c]
            im = ax.imshow(grid, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
            n_layers, n_heads = grid.shape
            ax.set_xticks(range(n_heads), [f"H{h}" for h in range(n_heads)], fontsize=6)
            ax.set_yticks(range(n_layers), [f"L{l}" for l in range(n_layers)], fontsize=6)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"{run}: {title}", fontsize=8)
            if n_layers * n_heads <= 64:  # small maps carry their numbers
                for (l, h), v in np.ndenumerate(grid):
                    high = v > lo + 0.6 * (hi - lo)  # Reds darken upwards, viridis is dark at the bottom
                    ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="w" if high == (cmap == "Reds") else "k")
            fig.colorbar(im, ax=ax, fraction=0.046)
        for c in range(len(maps), cols):
            axes[r, c].axis("off")
    rule = f"{cfg.rule} <= eps" if cfg.rule == "dot" else f"{cfg.rule} < eps"
    thresholds = f"each head's clean-validation {cfg.quantile:g} quantile" if cfg.threshold == "clean_quantile" \
        else f"eps = {cfg.eps:g}"
    fig.suptitle(f"Per-head infected-head flags ({rule}; {thresholds}) and MMD^2, heads L{{layer}}H{{head}} from 0",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)


def training_figure(models: dict[str, Path], png: str | Path) -> None:
    """Training loss per step of every trained model (its ``history.csv``): one panel per training stage --
    the clean model's pretraining, the backdoor fine-tunes, each repair -- coloured by attack, with a
    moving average over the raw (faint) curve. Models without a history (pretrained weights) are skipped."""
    from clipbackdoor.models.artifact import HISTORY_FILE

    plt = _plt()
    panels: dict[str, list[tuple[str, pd.DataFrame]]] = {}
    for name, folder in models.items():
        path = Path(folder) / HISTORY_FILE
        if not path.exists():
            continue
        stage = "pretraining (clean model)" if name == "clean" else \
            f"repair: {name.partition('.')[2]}" if "." in name else "backdoor fine-tuning"
        panels.setdefault(stage, []).append((name, pd.read_csv(path)))
    order = sorted(panels, key=lambda s: (not s.startswith("pretraining"), not s.startswith("backdoor"), s))
    ncols = min(4, max(1, len(order)))
    nrows = -(-max(1, len(order)) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows + 0.4), squeeze=False)
    for ax in axes.flat[len(order):]:
        ax.axis("off")
    for ax, stage in zip(axes.flat, order):
        for name, h in panels[stage]:
            colour = "0.2" if name == "clean" else attack_colour(parse_run(name.partition(".")[0])[0])
            window = max(1, len(h) // 25)
            ax.plot(h.step, h.loss, color=colour, alpha=0.25, lw=0.6)
            ax.plot(h.step, h.loss.rolling(window, center=True, min_periods=1).mean(), color=colour, lw=1.3, label=name)
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=6)
    if not order:
        axes[0, 0].text(0.5, 0.5, "no trained model has a loss history", ha="center", va="center")
    fig.suptitle("Training loss per step (faint: raw; solid: centred moving average over 1/25 of the run)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)


def rate_sweep_figure(table: pd.DataFrame, png: str | Path) -> None:
    """ASR (left) and CACC (right) against the poisoning rate, one line per swept run and evaluation set with its
    95 % bootstrap band (``rate_sweep.sweep_table``); the x axis is logarithmic (rates span decades)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for (attack, run, eval_set), rows in table.groupby(["attack", "run", "eval_set"], sort=True):
        label = f"{attack_label(attack)} ({run}, {eval_set})"
        for ax, metric in zip(axes, ("asr", "cacc")):
            ax.plot(rows.rate, rows[metric], marker="o", ms=3, color=attack_colour(attack), label=label,
                    ls="-" if parse_run(run)[1] == 0 else "--")
            ax.fill_between(rows.rate, rows[f"{metric}_lo"], rows[f"{metric}_hi"], color=attack_colour(attack),
                            alpha=0.15, lw=0)
    from matplotlib.ticker import NullFormatter

    rates = sorted(table.rate.unique())
    for ax, metric in zip(axes, ("ASR", "CACC")):
        ax.set_xscale("log")
        ax.set_xticks(rates, [f"{100 * r:g} %" for r in rates], fontsize=7)  # the swept rates, not 10^k
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("poisoning rate (share of fine-tuning pairs, log scale)")
        ax.set_ylabel(metric)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{metric} against poisoning rate", fontsize=9)
    axes[0].legend(fontsize=6)
    fig.suptitle("Poisoning-rate sweep: every evaluation image, clean and triggered (bands: 95 % bootstrap)",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)


def figures_stage(args, p: None) -> None:
    """CLI stage ``figures``: Figure 2, Figure 5 and the ROC curves."""
    from clipbackdoor.pipeline.runs import run_decomps

    layerwise_figure(args.summary, args.layerwise)
    prototype_cosine_figure(run_decomps(args.runs), args.proto_cosine)
    scores = []
    for spec in args.scores:
        run, _, paths = spec.partition("=")
        scores.append((run, [Path(x) for x in paths.split(",")]))
    roc_figure(scores, args.roc)


def head_map_stage(args, p: Params) -> None:
    """CLI stage ``head-map``."""
    from clipbackdoor.pipeline.runs import name_paths, run_decomps

    mmd = name_paths(args.mmd)
    head_map_figure([(*entry, mmd.get(entry[0])) for entry in run_decomps(args.runs)], p.defend, args.png)


def training_curves_stage(args, p: None) -> None:
    """CLI stage ``training-curves``."""
    from clipbackdoor.pipeline.runs import name_paths

    training_figure(name_paths(args.models), args.png)
