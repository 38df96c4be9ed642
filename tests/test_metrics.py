"""Metrics equal sklearn's on the same arrays, degenerate ones included."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from feallm_llava.facs.labels import AUS, EXPRESSIONS
from feallm_llava.eval.metrics import (
    au_f1, au_matrix, au_metrics, confusion_matrix, fer_accuracy, fer_metrics,
)

FAIL = "<parse failure>"  # sklearn stand-in for None: a label no ground truth has


def _random_fer(rng, n, p_fail):
    gt = list(rng.choice(EXPRESSIONS, size=n))
    pred = [None if rng.random() < p_fail else str(rng.choice(EXPRESSIONS)) for _ in range(n)]
    return [str(g) for g in gt], pred


@pytest.mark.parametrize("seed", range(5))
def test_fer_accuracy_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    gt, pred = _random_fer(rng, int(rng.integers(1, 300)), p_fail=0.2)
    expected = accuracy_score(gt, [FAIL if p is None else p for p in pred])
    assert fer_accuracy(gt, pred) == pytest.approx(expected, abs=1e-12)
    assert fer_metrics(gt, pred).accuracy == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_confusion_matrix_equals_sklearn_with_a_parse_failure_column(seed):
    rng = np.random.default_rng(100 + seed)
    gt, pred = _random_fer(rng, 200, p_fail=0.15)
    labels = list(EXPRESSIONS) + [FAIL]
    expected = sk_confusion_matrix(gt, [FAIL if p is None else p for p in pred], labels=labels)
    assert np.array_equal(confusion_matrix(gt, pred), expected[:len(EXPRESSIONS)])


def test_parse_failures_are_wrong_and_counted_never_neutral():
    gt = ["Neutral", "Neutral", "Happiness"]
    pred = [None, "Neutral", None]
    m = fer_metrics(gt, pred)
    assert m.correct == 1
    assert m.accuracy == pytest.approx(1 / 3)
    assert m.parse_failures == 2
    neutral = EXPRESSIONS.index("Neutral")
    assert m.confusion[neutral][neutral] == 1
    assert m.confusion[neutral][-1] == 1
    assert m.columns[-1] == "parse failure"


def test_fer_all_parse_failures_scores_zero():
    m = fer_metrics(["Fear"] * 4, [None] * 4)
    assert m.accuracy == 0.0 and m.parse_failures == 4


def test_fer_rejects_unknown_labels_and_empty_input():
    with pytest.raises(ValueError, match="Contempt"):
        fer_accuracy(["Contempt"], ["Neutral"])
    with pytest.raises(ValueError, match="happy"):
        fer_accuracy(["Happiness"], ["happy"])
    with pytest.raises(ValueError, match="no FER items"):
        fer_accuracy([], [])
    with pytest.raises(ValueError, match="2 ground-truth"):
        fer_accuracy(["Fear", "Fear"], ["Fear"])


def _sk_f1(gt, pred):
    return np.array([f1_score(gt[:, k], pred[:, k], zero_division=0) for k in range(gt.shape[1])])


@pytest.mark.parametrize("seed", range(6))
def test_au_f1_equals_sklearn_per_au(seed):
    rng = np.random.default_rng(200 + seed)
    n, k = int(rng.integers(1, 120)), len(AUS)
    gt = rng.random((n, k)) < rng.random(k)       # per-AU base rates, some near 0 or 1
    pred = rng.random((n, k)) < rng.random(k)
    ours = au_f1(gt, pred)
    assert np.allclose(ours, _sk_f1(gt, pred), atol=1e-12)
    assert not np.isnan(ours).any()


@pytest.mark.parametrize("name,gt,pred", [
    ("never present, never predicted", np.zeros((5, 3), bool), np.zeros((5, 3), bool)),
    ("never predicted", np.ones((5, 3), bool), np.zeros((5, 3), bool)),
    ("never present", np.zeros((5, 3), bool), np.ones((5, 3), bool)),
    ("all right", np.eye(3, dtype=bool), np.eye(3, dtype=bool)),
    ("one item", np.array([[True, False, False]]), np.array([[True, True, False]])),
])
def test_au_f1_degenerate_arrays_are_finite_and_equal_sklearn(name, gt, pred):
    ours = au_f1(gt, pred)
    assert np.allclose(ours, _sk_f1(gt, pred)), name
    assert np.isfinite(ours).all(), name


def test_au_mean_is_unweighted_over_the_scored_aus():
    rng = np.random.default_rng(7)
    aus = (1, 2, 4, 6, 12, 25, 26)                 # DISFA's shared AUs
    gt = [set(int(a) for a in aus if rng.random() < 0.3) for _ in range(50)]
    pred = [set(int(a) for a in aus if rng.random() < 0.3) for _ in range(50)]
    m = au_metrics(gt, pred, aus)
    g, p = au_matrix(gt, aus), au_matrix(pred, aus)
    sk = _sk_f1(g, p)
    assert [m.f1[a] for a in aus] == pytest.approx(list(sk))
    assert m.mean_f1 == pytest.approx(float(np.mean(sk)))
    assert m.mean_f1 == pytest.approx(f1_score(g, p, average="macro", zero_division=0))


def test_au_parse_failures_predict_nothing_and_are_counted():
    gt = [{6, 12}, {4}, set()]
    m = au_metrics(gt, [None, {4}, None], aus=(4, 6, 12))
    assert m.parse_failures == 2
    assert m.fn[6] == 1 and m.fn[12] == 1 and m.tp[4] == 1
    assert m.f1 == {4: 1.0, 6: 0.0, 12: 0.0}
    assert not any(math.isnan(v) for v in m.f1.values())


def test_au_outside_the_targets_are_ignored():
    m = au_metrics([{6, 9}], [{6, 17}], aus=(6,))
    assert m.aus == (6,) and m.f1 == {6: 1.0} and m.fp[6] == 0


def test_au_metrics_rejects_empty_input():
    with pytest.raises(ValueError, match="no AUD items"):
        au_metrics([], [], aus=AUS)
    with pytest.raises(ValueError, match="au_targets is empty"):
        au_metrics([{1}], [{1}], aus=())


def test_metrics_serialise_with_zero_padded_au_keys():
    d = au_metrics([{1}], [{1}], aus=(1, 12)).to_dict()
    assert d["f1"] == {"AU01": 1.0, "AU12": 0.0}
    assert fer_metrics(["Fear"], ["Fear"]).to_dict()["confusion"][EXPRESSIONS.index("Fear")][
        EXPRESSIONS.index("Fear")] == 1
