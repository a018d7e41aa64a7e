"""Budgeted evaluation against hand-computed cases (numpy only)."""
from __future__ import annotations

import numpy as np
import pytest

from gfnet_edge import evaluate as ev
from probs import two_class_probs as _probs


CONF = [[0.9, 0.6, 0.8, 0.55], [0.7, 0.95, 0.65, 0.6], [0.99, 0.51, 0.7, 0.8]]
CLS = [[1, 0, 0, 1], [1, 1, 0, 1], [1, 1, 0, 0]]
LABELS = [1, 1, 1, 0]


def test_exit_fractions_hand_computed():
    q = ev.exit_fractions(0.5, 3)
    np.testing.assert_allclose(q, np.array([0.5, 0.25, 0.125]) / 0.875, rtol=1e-6)
    assert q.dtype == np.float32


def test_fit_thresholds_hand_computed():
    probs = _probs(CONF, CLS)
    thr = ev.fit_thresholds(probs, [0.5, 0.25, 0.25])
    # step 0: floor(4*0.5)=2nd most confident = 0.8; step 1: of s1,s3 the 1st = 0.95
    np.testing.assert_array_equal(thr, np.array([0.8, 0.95, -1e8], np.float32))


def test_fit_thresholds_zero_quota_never_exits():
    thr = ev.fit_thresholds(_probs(CONF, CLS), [0.1, 0.1, 0.8])  # floor(0.4) = 0
    assert thr[0] == np.float32(1e8) and thr[1] == np.float32(1e8)


def test_dynamic_evaluate_hand_computed():
    probs = _probs(CONF, CLS)
    r = ev.dynamic_evaluate(probs, LABELS, [1.0, 3.0, 6.0], [0.8, 0.95, -1e8])
    # exits: s0@0 (pred 1, ok), s1@1 (pred 1, ok), s2@0 (pred 0, wrong), s3@2 (pred 0, ok)
    np.testing.assert_array_equal(r.exit_step, [0, 1, 0, 2])
    np.testing.assert_array_equal(r.exit_counts, [2, 1, 1])
    assert r.accuracy == pytest.approx(75.0)
    assert r.expected_cost == pytest.approx((2 * 1 + 3 + 6) / 4)


def test_anytime_accuracy():
    acc = ev.anytime_accuracy(_probs(CONF, CLS), LABELS)
    np.testing.assert_allclose(acc, [25.0, 50.0, 75.0])


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _early_exit(probs: np.ndarray, labels: np.ndarray, costs, thresholds) -> tuple:
    """Accuracy (percent), mean cost and per-sample exit step of a plain early-exit run: each
    sample leaves at the first step whose max probability (float32) reaches that step's
    threshold, at the last step otherwise, with that step's prediction and cumulative cost."""
    conf, pred = probs.astype(np.float32).max(-1), probs.argmax(-1)
    T, n = conf.shape
    exit_at = np.full(n, T - 1)
    for k in range(T - 2, -1, -1):
        exit_at = np.where(conf[k] >= np.float32(thresholds[k]), k, exit_at)
    correct = pred[exit_at, np.arange(n)] == labels
    return 100.0 * correct.mean(), float(np.asarray(costs, np.float64)[exit_at].mean()), exit_at


def test_budgeted_curve_monotone_endpoints(rng):
    T, N, K = 3, 400, 5
    scale = np.array([1, 2, 3])[:, None, None]
    fit_probs = _softmax(rng.normal(size=(T, N, K)) * scale)
    test_probs = _softmax(rng.normal(size=(T, N, K)) * scale)
    labels = rng.integers(0, K, N)
    costs = [1, 2, 3]
    curve = ev.budgeted_curve(fit_probs, test_probs, labels, costs)
    assert len(curve.cost) == 39 and curve.thresholds.shape == (39, T)
    assert curve.ps == [i / 20 for i in range(1, 40)]
    # small p => most exit early (cheap), large p => most go to the end (expensive)
    assert curve.cost[0] < curve.cost[-1]
    assert all(1 <= c <= 3 for c in curve.cost)
    step0_exits = []
    for i, p in enumerate(curve.ps):
        # thresholds fitted on the fitting set, accuracy and cost measured on the test set
        thr = ev.fit_thresholds(fit_probs, ev.exit_fractions(p, T))
        np.testing.assert_array_equal(curve.thresholds[i], thr)
        acc, cost, exit_at = _early_exit(test_probs, labels, costs, thr)
        assert curve.accuracy[i] == pytest.approx(acc, abs=1e-9), p
        assert curve.cost[i] == pytest.approx(cost, rel=1e-12), p
        step0_exits.append(int((exit_at == 0).sum()))
    assert len(set(curve.accuracy)) > 1 and 0.0 < min(curve.accuracy)
    # the step-0 quota q_0 = 1 / (1 + p + p^2) shrinks as p grows, so the step-0 threshold (the
    # confidence at that rank of the fitting set) never falls and fewer test samples exit there
    assert all(np.diff(curve.thresholds[:, 0]) >= 0)
    assert all(np.diff(step0_exits) <= 0) and step0_exits[0] > step0_exits[-1]


def test_budgeted_curve_cost_never_falls_with_two_steps(rng):
    """With two steps the only choice is who exits at step 0; a larger p exits fewer there, so
    the test cost never falls as p grows (the curve runs cheapest first)."""
    N, K = 300, 4
    fit_probs = _softmax(rng.normal(size=(2, N, K)) * np.array([1.5, 3])[:, None, None])
    test_probs = _softmax(rng.normal(size=(2, N, K)) * np.array([1.5, 3])[:, None, None])
    labels = rng.integers(0, K, N)
    curve = ev.budgeted_curve(fit_probs, test_probs, labels, [2.0, 5.0])
    for i, p in enumerate(curve.ps):
        acc, cost, _ = _early_exit(test_probs, labels, [2.0, 5.0], ev.fit_thresholds(fit_probs, ev.exit_fractions(p, 2)))
        assert (curve.accuracy[i], curve.cost[i]) == (pytest.approx(acc, abs=1e-9), pytest.approx(cost, rel=1e-12))
    assert all(np.diff(curve.cost) >= 0) and curve.cost[0] < curve.cost[-1]
    assert all(2.0 <= c <= 5.0 for c in curve.cost)


def test_bad_inputs():
    with pytest.raises(ValueError, match="probs must be"):
        ev.fit_thresholds(np.zeros((3, 4)), [0.1, 0.1, 0.8])
    with pytest.raises(ValueError, match="NaN"):
        ev.anytime_accuracy(np.full((2, 3, 2), np.nan), [0, 1, 0])
    with pytest.raises(ValueError, match="labels"):
        ev.anytime_accuracy(_probs(CONF, CLS), [0, 1])
    with pytest.raises(ValueError, match="p must be"):
        ev.exit_fractions(0, 3)
