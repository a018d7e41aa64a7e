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


def test_budgeted_curve_monotone_endpoints(rng):
    T, N, K = 3, 400, 5
    logits = rng.normal(size=(T, N, K)) * np.array([1, 2, 3])[:, None, None]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = rng.integers(0, K, N)
    curve = ev.budgeted_curve(probs, probs, labels, [1, 2, 3])
    assert len(curve.cost) == 39 and curve.thresholds.shape == (39, T)
    # small p => most exit early (cheap), large p => most go to the end (expensive)
    assert curve.cost[0] < curve.cost[-1]
    assert all(1 <= c <= 3 for c in curve.cost)


def test_bad_inputs():
    with pytest.raises(ValueError, match="probs must be"):
        ev.fit_thresholds(np.zeros((3, 4)), [0.1, 0.1, 0.8])
    with pytest.raises(ValueError, match="NaN"):
        ev.anytime_accuracy(np.full((2, 3, 2), np.nan), [0, 1, 0])
    with pytest.raises(ValueError, match="labels"):
        ev.anytime_accuracy(_probs(CONF, CLS), [0, 1])
    with pytest.raises(ValueError, match="p must be"):
        ev.exit_fractions(0, 3)
