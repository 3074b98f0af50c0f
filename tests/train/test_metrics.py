"""Metrics and threshold calibration against scikit-learn (to 1e-6), on data with ties and awkward classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from mlcls.train import metrics


def _data(seed: int, n: int = 200, c: int = 7):
    """Scores with ties (rounded), a class with no positives, a class that is always predicted, empty images."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < rng.uniform(0.05, 0.5, c)).astype(np.float32)
    targets[:, 3] = 0  # no positives: AP undefined
    targets[: n // 5] = 0  # 20 % images with no labels
    scores = np.clip(0.6 * targets + rng.normal(0.3, 0.25, (n, c)), 0, 1)
    scores = np.round(scores, 2)  # many ties
    scores[:, 5] = 0.99  # every image scores the same for one class
    return scores, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_matches_sklearn(seed):
    scores, targets = _data(seed)
    ap = metrics.average_precision(scores, targets)
    for j in range(targets.shape[1]):
        if targets[:, j].sum() == 0:
            assert math.isnan(ap[j])
        else:
            assert ap[j] == pytest.approx(skm.average_precision_score(targets[:, j], scores[:, j]), abs=1e-6)
    has_pos = targets.sum(0) > 0
    expected = skm.average_precision_score(targets[:, has_pos], scores[:, has_pos], average="macro")
    assert metrics.mean_average_precision(scores, targets) == pytest.approx(expected, abs=1e-6)


def test_pr_curve_matches_sklearn():
    scores, targets = _data(4)
    for j in (0, 1, 5):
        p, r, t = metrics.precision_recall_curve(scores[:, j], targets[:, j])
        sp, sr, st = skm.precision_recall_curve(targets[:, j], scores[:, j])
        np.testing.assert_allclose(p, sp[:-1], atol=1e-6)
        np.testing.assert_allclose(r, sr[:-1], atol=1e-6)
        np.testing.assert_allclose(t, st, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8, 1.0])
def test_classification_metrics_match_sklearn(threshold):
    scores, targets = _data(3)
    pred = scores >= threshold
    m = metrics.classification_metrics(pred, targets)
    kw = {"zero_division": 0}
    cp = skm.precision_score(targets, pred, average="macro", **kw)
    cr = skm.recall_score(targets, pred, average="macro", **kw)
    assert m["CP"] == pytest.approx(cp, abs=1e-6)
    assert m["CR"] == pytest.approx(cr, abs=1e-6)
    assert m["CF1"] == pytest.approx(2 * cp * cr / (cp + cr) if cp + cr else 0.0, abs=1e-6)
    assert m["OP"] == pytest.approx(skm.precision_score(targets, pred, average="micro", **kw), abs=1e-6)
    assert m["OR"] == pytest.approx(skm.recall_score(targets, pred, average="micro", **kw), abs=1e-6)
    assert m["OF1"] == pytest.approx(skm.f1_score(targets, pred, average="micro", **kw), abs=1e-6)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(targets, pred, average="macro", **kw), abs=1e-6)
    assert m["hamming_loss"] == pytest.approx(skm.hamming_loss(targets, pred), abs=1e-6)
    assert m["subset_accuracy"] == pytest.approx(skm.accuracy_score(targets, pred), abs=1e-6)
    empty = targets.sum(1) == 0
    assert m["empty_images"] == int(empty.sum())
    assert m["empty_fpr"] == pytest.approx(pred[empty].any(1).mean(), abs=1e-6)
    per = metrics.per_class_metrics(pred, targets)
    np.testing.assert_allclose(per["f1"], skm.f1_score(targets, pred, average=None, **kw), atol=1e-6)


def test_top_k_and_no_empty_images():
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
    assert metrics.top_k_predictions(scores, 2).tolist() == [[True, False, True, False], [False, True, True, False]]
    assert metrics.top_k_predictions(scores, 9).all()
    m = metrics.classification_metrics(scores >= 0.5, np.array([[1, 0, 1, 0], [0, 1, 0, 0]]))
    assert m["empty_images"] == 0 and math.isnan(m["empty_fpr"])
    assert m["subset_accuracy"] == 0.5


def test_per_class_threshold_maximises_f1_is_shrunk_toward_the_global_one_and_rare_classes_fall_back():
    scores, targets = _data(5, n=300)
    targets[:, 6] = 0
    targets[:4, 6] = 1  # 4 positives: fewer than 5, takes the global threshold
    thresholds, info = metrics.calibrate_thresholds(scores, targets)
    own, g = np.array(info["own_thresholds"]), info["global_threshold"]
    assert info["method"] == "f1-per-class-shrunk" and info["min_positives"] == 5
    assert info["fallback"] == [3, 6] and info["fallback_classes"] == 2
    assert thresholds[3] == thresholds[6] == pytest.approx(g)
    for j in (0, 1, 2, 4):  # each class's own cut is the best any cut achieves ...
        f1 = skm.f1_score(targets[:, j], scores[:, j] >= own[j])
        best = max(skm.f1_score(targets[:, j], scores[:, j] >= c) for c in np.unique(scores[:, j]))
        assert f1 == pytest.approx(best, abs=1e-9)
        assert not np.isin(own[j], scores[:, j])  # halfway between scores, not on one
        n = targets[:, j].sum()  # ... and the threshold weighs it by its positives against 50 for the global cut
        assert thresholds[j] == pytest.approx((n * own[j] + 50 * g) / (n + 50))
        assert min(own[j], g) <= thresholds[j] <= max(own[j], g)
    micro = skm.f1_score(targets.ravel(), scores.ravel() >= g)
    best = max(skm.f1_score(targets.ravel(), scores.ravel() >= c) for c in np.unique(scores))
    assert micro == pytest.approx(best, abs=1e-9)
    unshrunk, _ = metrics.calibrate_thresholds(scores, targets, shrink=0)
    np.testing.assert_allclose(unshrunk[[0, 1, 2, 4]], own[[0, 1, 2, 4]])


def test_evaluate_reports_everything_named_in_the_issue():
    scores, targets = _data(6)
    out = metrics.evaluate(scores, targets, np.full(7, 0.5), list("abcdefg"))
    assert out["per_class_ap"]["d"] is None and out["positives"]["d"] == 0
    for key in ("CP", "CR", "CF1", "OP", "OR", "OF1", "hamming_loss", "subset_accuracy", "empty_fpr"):
        assert key in out["at_thresholds"] and key in out["at_top3"]
    curve = metrics.f1_by_global_threshold(scores, targets, grid=[0.5])
    assert curve["macro_f1"][0] == pytest.approx(out["at_thresholds"]["macro_f1"])
