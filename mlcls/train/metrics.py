"""Multi-label metrics and threshold calibration: one implementation for train, eval and calibrate.

Inputs are `scores` (N, C) probabilities and `targets` (N, C) in {0, 1}.
Average precision follows scikit-learn's definition (step-wise, ties
grouped), so numbers match `sklearn.metrics.average_precision_score`.
Classes with no positive example have no defined AP and are left out of mAP
(reported as NaN per class); images with no labels are valid negatives.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MIN_POSITIVES_FOR_OWN_THRESHOLD = 5
SHRINK_POSITIVES = 50.0  # the global cut's weight in a class's threshold, in validation positives
CALIBRATION_METHOD = "f1-per-class-shrunk"


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class AP, shape (C,); NaN where a class has no positives."""
    scores, targets = _check(scores, targets)
    return np.array([_ap(scores[:, j], targets[:, j]) for j in range(scores.shape[1])])


def _ap(s: np.ndarray, t: np.ndarray) -> float:
    if t.sum() == 0:
        return math.nan
    precision, recall, _ = _pr_points(s, t)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _pr_points(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and threshold at every distinct score, highest score first (ties grouped)."""
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(t)[last_of_tie]
    return tp / (last_of_tie + 1), tp / max(float(t.sum()), 1.0), s[last_of_tie]


def precision_recall_curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class's PR curve (precision, recall, threshold), in increasing-threshold order like scikit-learn's,
    without its final (precision 1, recall 0) point."""
    s = np.asarray(scores, dtype=np.float64)
    t = (np.asarray(targets) > 0).astype(np.float64)
    precision, recall, thresholds = _pr_points(s, t)
    return precision[::-1], recall[::-1], thresholds[::-1]


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Macro mAP over the classes that have positives."""
    ap = average_precision(scores, targets)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else math.nan


def top_k_predictions(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean (N, C): each image's k highest-scoring classes."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    pred = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(pred, top, True, axis=1)
    return pred


def classification_metrics(pred: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """CP/CR/CF1 (per-class, then averaged), OP/OR/OF1 (over all labels), macro F1,
    Hamming loss, subset accuracy, and the false-positive rate on images with no labels."""
    pred, t = pred.astype(bool), targets.astype(bool)
    per = per_class_metrics(pred, t)
    tp = (pred & t).sum(0).astype(float)
    fp = (pred & ~t).sum(0).astype(float)
    fn = (~pred & t).sum(0).astype(float)
    cp, cr = per["precision"].mean(), per["recall"].mean()
    op = tp.sum() / max(tp.sum() + fp.sum(), 1)
    orec = tp.sum() / max(tp.sum() + fn.sum(), 1)
    empty = ~t.any(1)
    return {
        "CP": float(cp), "CR": float(cr), "CF1": _f1(cp, cr),
        "OP": float(op), "OR": float(orec), "OF1": _f1(op, orec),
        "macro_f1": float(per["f1"].mean()),
        "hamming_loss": float((pred != t).mean()),
        "subset_accuracy": float((pred == t).all(1).mean()),
        "empty_images": int(empty.sum()),
        "empty_fpr": float(pred[empty].any(1).mean()) if empty.any() else math.nan,
    }


def per_class_metrics(pred: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support (0 where undefined, as scikit-learn's `zero_division=0`)."""
    pred, t = pred.astype(bool), targets.astype(bool)
    tp = (pred & t).sum(0).astype(float)
    fp = (pred & ~t).sum(0).astype(float)
    fn = (~pred & t).sum(0).astype(float)
    return {
        "precision": np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0),
        "recall": np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0),
        "f1": np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0),
        "support": t.sum(0),
    }


def f1_by_global_threshold(scores: np.ndarray, targets: np.ndarray,
                           grid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Macro and micro F1 with one threshold for every class, over a grid of thresholds (the report's curve)."""
    scores, targets = _check(scores, targets)
    grid = np.linspace(0.02, 0.98, 49) if grid is None else np.asarray(grid, dtype=np.float64)
    macro, micro = [], []
    for th in grid:
        m = classification_metrics(scores >= th, targets)
        macro.append(m["macro_f1"])
        micro.append(m["OF1"])
    return {"threshold": grid, "macro_f1": np.array(macro), "micro_f1": np.array(micro)}


def _f1(p: float, r: float) -> float:
    return float(2 * p * r / (p + r)) if p + r > 0 else 0.0


def evaluate(scores: np.ndarray, targets: np.ndarray, thresholds: np.ndarray, classes: list[str],
             top_k: int = 3) -> dict[str, Any]:
    """Every reported metric: mAP, per-class AP, metrics at the thresholds and at top-k."""
    scores, targets = _check(scores, targets)
    ap = average_precision(scores, targets)
    return {
        "images": len(scores),
        "mAP": mean_average_precision(scores, targets),
        "per_class_ap": {c: (None if math.isnan(a) else float(a)) for c, a in zip(classes, ap, strict=True)},
        "positives": {c: int(n) for c, n in zip(classes, targets.sum(0), strict=True)},
        "at_thresholds": classification_metrics(scores >= thresholds, targets),
        f"at_top{top_k}": classification_metrics(top_k_predictions(scores, top_k), targets),
    }


def best_f1_threshold(s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """The threshold that maximises F1 for one class, and that F1.

    Cuts are placed halfway between consecutive distinct scores, so the
    threshold generalises instead of sitting exactly on a validation score.
    """
    n_pos = float(t.sum())
    if n_pos == 0:
        return 1.0, 0.0
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(t)[last_of_tie]
    predicted = last_of_tie + 1
    f1 = 2 * tp / (predicted + n_pos)
    best = int(np.argmax(f1))
    i = last_of_tie[best]
    below = s[i + 1] if i + 1 < len(s) else max(0.0, s[i] - 1e-3)
    return float((s[i] + below) / 2), float(f1[best])


def best_global_threshold(scores: np.ndarray, targets: np.ndarray) -> float:
    """One threshold for all classes that maximises F1 over all labels (micro)."""
    threshold, _ = best_f1_threshold(scores.ravel(), targets.ravel())
    return threshold


def calibrate_thresholds(scores: np.ndarray, targets: np.ndarray,
                         min_positives: int = MIN_POSITIVES_FOR_OWN_THRESHOLD,
                         shrink: float = SHRINK_POSITIVES) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-class F1-maximising thresholds, each pulled toward the best global one by its evidence.

    A class's own max-F1 cut on a few hundred validation images sits where
    a handful of borderline scores happened to fall; on new images it is
    often worse than one global cut. So each class's threshold is the
    average of its own cut, weighted by its validation positives, and the
    global cut, weighted by `shrink` pseudo-positives (empirical-Bayes
    shrinkage; classes with fewer than `min_positives` take the global cut
    outright). Measured on 14 training runs of bench/train_vs_loop.py's
    canvases (bench/RESULTS.md, issue 14): test macro-F1 at least that of the
    unshrunk cuts in 14 of 14 and above a plain 0.5 in 14 of 14, where the
    unshrunk cuts fell below 0.5 once; `shrink` = 50 was chosen on the first
    7 runs, the other 7 agree.
    """
    scores, targets = _check(scores, targets)
    global_t = best_global_threshold(scores, targets)
    own_t = np.full(scores.shape[1], global_t, dtype=np.float64)
    positives = targets.sum(0)
    own = positives >= min_positives
    for j in np.flatnonzero(own):
        own_t[j], _ = best_f1_threshold(scores[:, j], targets[:, j])
    weight = np.where(own, positives, 0.0)
    thresholds = (weight * own_t + shrink * global_t) / (weight + shrink) if shrink > 0 else own_t
    info = {"method": CALIBRATION_METHOD, "global_threshold": global_t, "min_positives": min_positives,
            "shrink_positives": shrink, "own_thresholds": [float(t) for t in own_t],
            "fallback_classes": int((~own).sum()), "fallback": [int(j) for j in np.flatnonzero(~own)]}
    return np.clip(thresholds, 1e-4, 1.0 - 1e-4), info


def _check(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be (N, C)")
    return scores, (targets > 0).astype(np.float64)
