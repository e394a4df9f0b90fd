"""Stage ``metrics``: ASR / CACC / AUROC for every (model, trigger, defense setting).

ASR is defined explicitly because peers disagree (REFERENCE.md):
- ``asr`` (primary): among triggered test images whose true class is NOT the target, the fraction
  classified as the target;
- ``asr_all``: the same over all triggered test images (target-class images count as successes).
``cacc``: clean zero-shot top-1 on the clean test images. ``auroc``: scikit-learn ROC AUC of the detection
score, clean test images negative, triggered positive (higher score = more suspicious).
"""

from __future__ import annotations

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


DETECTORS = ("strip", "scaleup", "teco")  # the detect stage's outputs (scores, higher = more suspicious)


def setting_rows(table: pd.DataFrame, target: int) -> list[dict]:
    """One row per (defense, variant) of a defend output table."""
    rows = []
    for (defense, variant), g in table.groupby(["defense", "variant"], sort=False):
        clean, trig = g[g.split == "clean"], g[g.split == "triggered"]
        row = {"defense": defense, "variant": variant}
        if defense == "decomp_reverse":  # clean images carrying the triggered images' infected heads
            row["asr"], row["asr_all"] = attack_success(clean.pred, clean.label, target)
            row["cacc"] = clean_accuracy(clean.pred, clean.label)
        elif defense.startswith("decomp_det") or defense in DETECTORS:
            row["auroc"] = detection_auroc(clean.score.to_numpy(), trig.score.to_numpy())
            if defense not in DETECTORS:  # input detectors give scores only, no hard decision
                row["tpr"], row["fpr"] = rates_at(clean.pred.to_numpy(), trig.pred.to_numpy())
        else:
            row["asr"], row["asr_all"] = attack_success(trig.pred, trig.label, target)
            row["cacc"] = clean_accuracy(clean.pred, clean.label)
        rows.append(row)
    return rows
