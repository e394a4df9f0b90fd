"""Stage ``figures``: the paper's Figure 2 (layer-wise mean-ablation curves) and Figure 5 (densities of the
cosine between last-layer head terms and their prototypes, clean vs triggered), from artifacts only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from clipbackdoor.io import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png) -> None:
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def layerwise_figure(summary_csv: str | Path, png: str | Path) -> None:
    """ASR (solid) and CACC (dotted) per layer for forward / backward / separate ablation of heads and MLPs."""
    plt = _plt()
    df = pd.read_csv(summary_csv)
    df = df[df.attack != "clean"]
    attacks = sorted(df.attack.unique())
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharey=True)
    colours = plt.cm.tab10.colors
    for r, part in enumerate(("heads", "mlps")):
        for c, mode in enumerate(("forward", "backward", "separate")):
            ax = axes[r, c]
            for i, attack in enumerate(attacks):
                rows = df[(df.attack == attack) & (df.defense == f"ablate_{part}_{mode}")].copy()
                if rows.empty:
                    continue
                rows["layer"] = rows.variant.str.removeprefix("layer=").astype(int)
                curve = rows.groupby("layer")[["asr", "cacc"]].mean()
                ax.plot(curve.index, curve.asr, "-o", color=colours[i % 10], label=f"{attack} ASR", ms=3)
                ax.plot(curve.index, curve.cacc, ":", color=colours[i % 10], label=f"{attack} CACC")
                base = df[(df.attack == attack) & (df.defense == "none")].asr.mean()
                ax.axhline(base, color=colours[i % 10], ls="--", lw=0.8)
            ax.set_title(f"{mode} ablation of {part}", fontsize=9)
            ax.set_xlabel("layer")
            ax.set_ylim(-0.02, 1.02)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Mean-ablation per layer (dashed: undefended ASR)")
    fig.tight_layout()
    _save(fig, png)
    plt.close(fig)


def prototype_cosine_figure(entries: list[tuple[str, Path, Path, Path]], png: str | Path) -> None:
    """entries: (attack run, clean decomposition, triggered decomposition, prototypes) -> one row per run."""
    from clipbackdoor.defend import prototype_cosines
    from clipbackdoor.prototypes import load_prototypes

    plt = _plt()
    rows = len(entries)
    first = load_prototypes(entries[0][3])
    n_heads = first["heads"].shape[1]
    fig, axes = plt.subplots(rows, n_heads, figsize=(1.8 * n_heads, 1.7 * rows + 0.6), squeeze=False)
    bins = np.linspace(-1, 1, 41)
    for r, (run, clean, trig, protos_path) in enumerate(entries):
        protos = load_prototypes(protos_path)
        cos_c, cos_t = prototype_cosines(clean, protos), prototype_cosines(trig, protos)  # [N, H]
        for h in range(n_heads):
            ax = axes[r, h]
            ax.hist(cos_c[:, h], bins=bins, density=True, alpha=0.55, color="tab:green", label="clean")
            ax.hist(cos_t[:, h], bins=bins, density=True, alpha=0.55, color="tab:red", label="triggered")
            ax.set_yticks([])
            ax.set_title(f"{run} H{h}" if h == 0 else f"H{h}", fontsize=7)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle("Cosine of last-layer head terms to their prototypes", fontsize=9)
    fig.tight_layout()
    _save(fig, png)
    plt.close(fig)
