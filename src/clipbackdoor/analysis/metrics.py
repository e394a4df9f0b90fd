"""Stage ``metrics``: ASR / CACC / AUROC for every (model, trigger, defense setting).

ASR is defined explicitly because peers disagree (REFERENCE.md):
- ``asr`` (primary): among triggered test images whose true class is NOT the target, the fraction
  classified as the target;
- ``asr_all``: the same over all triggered test images (target-class images count as successes).
``cacc``: clean zero-shot top-1 on the clean test images. ``auroc``: scikit-learn ROC AUC of the detection
score, clean test images negative, triggered positive (higher score = more suspicious).

Uncertainty: a 95 % percentile bootstrap interval (``*_lo``, ``*_hi``) over the images of each row, 1,000 draws,
seeded from the study's seed and the row's identity (reruns and row order give the same intervals). ASR and CACC
are proportions: resampling n images with replacement makes the resampled rate Binomial(n, rate) / n, drawn as
such. AUROC resamples the clean and the triggered images separately (stratified) and scores every draw at once from
the sorted scores. ``n_clean`` / ``n_triggered``: images behind the row; ``n_asr``: the ASR's denominator.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score



def attack_success(pred: np.ndarray, labels: np.ndarray, target: int) -> tuple[float, float]:
    """(asr over non-target images, asr over all images)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    hit = pred == target
    keep = labels != target
    asr = float(hit[keep].mean()) if keep.any() else float("nan")
    return asr, float(hit.mean()) if len(hit) else float("nan")


def clean_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(labels)).mean())


def detection_auroc(clean_scores: np.ndarray, triggered_scores: np.ndarray) -> float:
    y = np.r_[np.zeros(len(clean_scores)), np.ones(len(triggered_scores))]
    return float(roc_auc_score(y, np.r_[clean_scores, triggered_scores]))


def rates_at(clean_flags: np.ndarray, triggered_flags: np.ndarray) -> tuple[float, float]:
    """(true positive rate, false positive rate) of a hard decision."""
    return float(np.mean(triggered_flags)), float(np.mean(clean_flags))


BOOTSTRAP_DRAWS, BOOTSTRAP_LEVEL = 1000, 0.95


def row_rng(seed: int, key: str) -> np.random.Generator:
    """A row's own bootstrap stream: the same interval whatever else the summary holds."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _interval(draws: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_rate(hits: int, n: int, rng: np.random.Generator, draws: int = BOOTSTRAP_DRAWS,
                   level: float = BOOTSTRAP_LEVEL) -> tuple[float, float]:
    """Percentile interval of a proportion hits / n over n resampled 0/1 outcomes."""
    if n == 0:
        return float("nan"), float("nan")
    return _interval(rng.binomial(n, hits / n, size=draws) / n, level)


def bootstrap_auroc(clean_scores: np.ndarray, triggered_scores: np.ndarray, rng: np.random.Generator,
                    draws: int = BOOTSTRAP_DRAWS, level: float = BOOTSTRAP_LEVEL) -> tuple[float, float]:
    """Percentile interval of the AUROC, clean and triggered images resampled separately."""
    if len(clean_scores) == 0 or len(triggered_scores) == 0:
        return float("nan"), float("nan")
    return _interval(auroc_draws(clean_scores, triggered_scores, rng, draws), level)


def auroc_draws(clean_scores: np.ndarray, triggered_scores: np.ndarray, rng: np.random.Generator, draws: int,
                chunk: int = 100) -> np.ndarray:
    """[draws] AUROCs of bootstrap resamples (per chunk of draws: clean indices [b, n0], then triggered [b, n1]).
    Each draw is scored from per-score weights: AUROC = sum over triggered images of (clean weight below its score
    + half the clean weight at it) / (n0 n1), the Mann-Whitney form of :func:`detection_auroc` (ties count half).
    Memory O(chunk x distinct scores), not O(draws x images x images)."""
    neg, pos = np.asarray(clean_scores, np.float64), np.asarray(triggered_scores, np.float64)
    n0, n1 = len(neg), len(pos)
    values, index = np.unique(np.r_[neg, pos], return_inverse=True)
    u, idx0, idx1 = len(values), index[:n0], index[n0:]
    out = []
    for start in range(0, draws, chunk):
        b = min(chunk, draws - start)
        offsets = (np.arange(b) * u)[:, None]  # [b, 1]: one row of u score bins per draw
        pick0, pick1 = rng.integers(0, n0, (b, n0)), rng.integers(0, n1, (b, n1))
        w0 = np.bincount((idx0[pick0] + offsets).ravel(), minlength=b * u).reshape(b, u)  # [b, u] clean weights
        w1 = np.bincount((idx1[pick1] + offsets).ravel(), minlength=b * u).reshape(b, u)
        below = np.cumsum(w0, axis=1) - w0  # clean weight strictly below each score
        out.append((w1 * (below + 0.5 * w0)).sum(axis=1) / (n0 * n1))
    return np.concatenate(out)


def with_intervals(row: dict, rng: np.random.Generator, hits: dict[str, tuple[int, int]],
                   scores: tuple[np.ndarray, np.ndarray] | None) -> dict:
    """Adds ``{metric}_lo/_hi`` for every proportion in ``hits`` ({metric: (hits, n)}) and the AUROC."""
    for metric, (k, n) in hits.items():
        row[f"{metric}_lo"], row[f"{metric}_hi"] = bootstrap_rate(k, n, rng)
    if scores is not None:
        row["auroc_lo"], row["auroc_hi"] = bootstrap_auroc(*scores, rng)
    return row


def setting_rows(table: pd.DataFrame, target: int, seed: int = 0, key: str = "") -> list[dict]:
    """One row per (defense, variant) of a defend output table, with sample counts and bootstrap intervals
    (streams from ``seed`` and ``key`` + the setting)."""
    from clipbackdoor.extensions import detection_kind

    rows = []
    for (defense, variant), g in table.groupby(["defense", "variant"], sort=False):
        clean, trig = g[g.split == "clean"], g[g.split == "triggered"]
        row = {"defense": defense, "variant": variant, "n_clean": len(clean), "n_triggered": len(trig)}
        rng = row_rng(seed, f"{key}|{defense}|{variant}")
        detection = detection_kind(defense)  # declared by the defense or detector, not read from its name
        if detection is not None:
            neg, pos = clean.score.to_numpy(), trig.score.to_numpy()
            row["auroc"] = detection_auroc(neg, pos)
            if detection == "decisions":  # input detectors give scores only, no hard decision
                row["tpr"], row["fpr"] = rates_at(clean.pred.to_numpy(), trig.pred.to_numpy())
            rows.append(with_intervals(row, rng, {}, (neg, pos)))
            continue
        # decomp_reverse: clean images carrying the triggered images' infected heads are the attacked ones
        attacked = clean if defense == "decomp_reverse" else trig
        pred, labels = attacked.pred.to_numpy(), attacked.label.to_numpy()
        row["asr"], row["asr_all"] = attack_success(pred, labels, target)
        row["cacc"] = clean_accuracy(clean.pred, clean.label)
        row["n_asr"] = int((labels != target).sum())
        hits = {"asr": (int((pred[labels != target] == target).sum()), row["n_asr"]),
                "cacc": (int((clean.pred.to_numpy() == clean.label.to_numpy()).sum()), len(clean))}
        rows.append(with_intervals(row, rng, hits, None))
    return rows
