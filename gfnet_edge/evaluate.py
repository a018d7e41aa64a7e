"""Anytime and budgeted evaluation of GFNet step outputs, in numpy (no torch).

Implements the reference's budgeted batch classification exactly: exit fractions
``q_k ∝ p^k`` (k = 1..T, normalised, float32) for ``p = i/20, i = 1..39``; for each step k < T-1
the threshold is the confidence of the ``floor(N * q_k)``-th most confident sample not yet
exited; the last threshold is -1e8. Costs may be any per-step cumulative vector: multiply-adds
(the paper) or measured milliseconds (a deployment).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

NO_EXIT = np.float32(1e8)
LAST = np.float32(-1e8)
DEFAULT_PS: Tuple[float, ...] = tuple(i / 20 for i in range(1, 40))


def _confidences(probs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"probs must be (T, N, classes), got shape {probs.shape}")
    if probs.shape[1] == 0:
        raise ValueError("probs hold no samples")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or Inf")
    p = probs.astype(np.float32, copy=False)
    return p.max(axis=2), p.argmax(axis=2)


def _labels(labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"{labels.shape[0]} labels for {n} samples")
    return labels.astype(np.int64)


def exit_fractions(p: float, steps: int) -> np.ndarray:
    """Fractions q_k ∝ p^k, k = 1..T, normalised, computed in float32 as the reference does."""
    if p <= 0:
        raise ValueError(f"p must be > 0, got {p}")
    k = np.arange(1, steps + 1, dtype=np.float32)
    q = np.exp(np.log(np.float32(p)) * k).astype(np.float32)
    return (q / q.sum(dtype=np.float32)).astype(np.float32)


def fit_thresholds(probs: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """Reference threshold fitting (``dynamic_find_threshold``).

    Args:
        probs: softmax outputs (T, N, classes) on the fitting set.
        fractions: target exit fraction per step (T,), e.g. :func:`exit_fractions`.

    Returns:
        float32 thresholds (T,); 1e8 means "nobody exits here", the last is -1e8.
    """
    conf, _ = _confidences(probs)
    T, n = conf.shape
    q = np.asarray(fractions, dtype=np.float32)
    if q.shape != (T,):
        raise ValueError(f"fractions must have {T} entries, got {q.shape}")
    thr = np.full(T, NO_EXIT, dtype=np.float32)
    exited = np.zeros(n, dtype=bool)
    for k in range(T - 1):
        out_n = math.floor(np.float32(n) * q[k])
        order = np.argsort(-conf[k], kind="stable")
        remaining = order[~exited[order]]
        if 1 <= out_n <= remaining.size:
            thr[k] = conf[k][remaining[out_n - 1]]
        exited |= conf[k] >= thr[k]
    thr[T - 1] = LAST
    return thr


def exit_steps(probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """First step k whose max probability >= thresholds[k], per sample (N,) int."""
    conf, _ = _confidences(probs)
    thr = np.asarray(thresholds, dtype=np.float32).reshape(-1, 1)
    if thr.shape[0] != conf.shape[0]:
        raise ValueError(f"{thr.shape[0]} thresholds for {conf.shape[0]} steps")
    hit = conf >= thr
    hit[-1] = True  # every sample exits by the last step
    return hit.argmax(axis=0)


@dataclass
class DynamicResult:
    """Result of running with fixed thresholds.

    Attributes:
        accuracy: top-1 accuracy in percent.
        expected_cost: mean cost per sample (same unit as ``costs``).
        exit_counts: samples exiting at each step (T,).
        exit_step: per-sample exit step (N,).
        prediction: per-sample predicted class (N,).
    """

    accuracy: float
    expected_cost: float
    exit_counts: np.ndarray
    exit_step: np.ndarray
    prediction: np.ndarray


def dynamic_evaluate(probs: np.ndarray, labels: np.ndarray, costs: Sequence[float], thresholds: Sequence[float]) -> DynamicResult:
    """Accuracy and expected cost with early exit (``dynamic_evaluate`` of the reference).

    Args:
        probs: (T, N, classes).
        labels: (N,) true classes.
        costs: cumulative cost of steps 0..k (T,).
        thresholds: (T,).
    """
    conf, pred = _confidences(probs)
    T, n = conf.shape
    labels = _labels(labels, n)
    costs = np.asarray(costs, dtype=np.float64).reshape(-1)
    if costs.shape[0] != T:
        raise ValueError(f"{costs.shape[0]} costs for {T} steps")
    steps = exit_steps(probs, thresholds)
    prediction = pred[steps, np.arange(n)]
    counts = np.bincount(steps, minlength=T)
    acc = 100.0 * float((prediction == labels).sum()) / n
    return DynamicResult(acc, float((counts / n * costs).sum()), counts, steps, prediction)


def anytime_accuracy(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Top-1 accuracy (percent) at each fixed step (T,)."""
    _, pred = _confidences(probs)
    labels = _labels(labels, pred.shape[1])
    return 100.0 * (pred == labels[None]).mean(axis=1)


@dataclass
class BudgetCurve:
    """Budgeted batch classification over a sweep of p.

    Attributes:
        ps: the p values.
        thresholds: (len(ps), T) fitted thresholds.
        accuracy: test accuracy (percent) per p.
        cost: expected test cost per p.
    """

    ps: List[float]
    thresholds: np.ndarray
    accuracy: List[float]
    cost: List[float]

    def as_lists(self) -> List[List[float]]:
        """``[costs, accuracies]`` as the reference's ``budgeted_batch_classification``."""
        return [list(self.cost), list(self.accuracy)]

    def accuracy_at_cost(self, budget: float) -> Optional[float]:
        """Best accuracy among points whose cost is <= budget (None if none)."""
        ok = [a for a, c in zip(self.accuracy, self.cost) if c <= budget]
        return max(ok) if ok else None


def budgeted_curve(
    fit_probs: np.ndarray,
    test_probs: np.ndarray,
    test_labels: np.ndarray,
    costs: Sequence[float],
    ps: Sequence[float] = DEFAULT_PS,
) -> BudgetCurve:
    """Fits thresholds on ``fit_probs`` for each p and evaluates them on the test set."""
    T = np.asarray(fit_probs).shape[0]
    thrs, accs, cs = [], [], []
    for p in ps:
        thr = fit_thresholds(fit_probs, exit_fractions(p, T))
        r = dynamic_evaluate(test_probs, test_labels, costs, thr)
        thrs.append(thr)
        accs.append(r.accuracy)
        cs.append(r.expected_cost)
    return BudgetCurve(list(ps), np.stack(thrs), accs, cs)
