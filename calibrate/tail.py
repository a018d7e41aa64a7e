"""Exit thresholds for a tail budget: a limit on a percentile of per-image latency (numpy only).

An image that exits at step ``k`` takes as long as a call whose images all exit at ``k``; the
calibration measures that latency many times per step (``samples[k]``, ms per image). With
``e_k(L)``, the share of step ``k``'s measurements above a limit ``L``, the share of images slower
than ``L`` under thresholds whose exit fractions are ``f_k`` is ``sum_k f_k * e_k(L)``: the same
linear form as the mean latency ``sum_k f_k * cost[k]``. A budget "quantile ``q`` of per-image
latency <= ``B``" is therefore fitted by the same threshold search
(:func:`calibrate.fit.search_thresholds`) with the per-step cost ``e_k(B * (1 - margin))`` and
the target ``1 - q``. Ties in accuracy go to the thresholds with the larger mean latency.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np

from gfnet_edge.errors import InputError
from gfnet_edge.evaluate import DEFAULT_PS

from .budgets import Budget, tail_quantile
from .fit import BudgetFit, InfeasibleBudget, _fractions, _scores, check_fit_inputs, search_thresholds

#: Weight of the mean latency in the per-step cost of a tail fit: it only breaks ties (far below
#: the smallest step of the exceedance share, 1 / (images * measurements)).
_TIE_WEIGHT = 1e-7


def check_samples(samples: Sequence[Sequence[float]]) -> List[np.ndarray]:
    """Per-step latency measurements as float64 arrays (each non-empty, finite, positive)."""
    out = [np.asarray(s, dtype=np.float64).reshape(-1) for s in samples]
    if not out or any(s.size == 0 or not np.isfinite(s).all() or (s <= 0).any() for s in out):
        raise InputError("per-step latency measurements must be non-empty, finite and positive")
    return out


def exceedance(samples: Sequence[np.ndarray], limit_ms: float) -> np.ndarray:
    """Per step, the share of its latency measurements above ``limit_ms`` (T,)."""
    return np.asarray([float((s > limit_ms).mean()) for s in samples], dtype=np.float64)


def smallest_limit(samples: np.ndarray, quantile: float) -> float:
    """The smallest measured value ``v`` with at most ``1 - quantile`` of ``samples`` above it
    (:func:`calibrate.budgets.tail_quantile`)."""
    return tail_quantile([samples], quantile)


def mixture_quantile(samples: Sequence[np.ndarray], fractions: Sequence[float], quantile: float) -> float:
    """The ``quantile`` of per-image latency when a share ``fractions[k]`` of the images exits at
    step ``k`` and each step's latency is distributed as its measurements (ms): the smallest
    measured value ``L`` with ``sum_k fractions[k] * e_k(L) <= 1 - quantile``
    (:func:`calibrate.budgets.tail_quantile`)."""
    return tail_quantile(samples, quantile, fractions)


def check_tail_feasible(budget: Budget, samples: Sequence[np.ndarray], where: str = "") -> None:
    """Raises :class:`InfeasibleBudget` when the glance alone (step 0, which every image runs)
    exceeds ``budget.ms`` for more than ``1 - quantile`` of its measurements."""
    q = budget.kind.quantile
    if q is None:
        raise InputError(f"{budget.name} is a mean budget, not a tail budget")
    s = check_samples(samples)
    floor = smallest_limit(s[0], q)
    if budget.ms < floor:
        raise InfeasibleBudget(
            f"budget {budget.kind.value}:{budget.ms:g} ms cannot be met: the glance alone (step 0) has a "
            f"{budget.kind.value} latency of {floor:.3f} ms per image{' ' + where if where else ''}, and every image "
            f"runs the glance; the smallest feasible {budget.kind.value} budget here is about "
            f"{np.ceil(floor * 10) / 10:.1f} ms (the full model's {budget.kind.value} is "
            f"{smallest_limit(s[-1], q):.3f} ms)")


def fit_tail_budget(probs: np.ndarray, labels: np.ndarray, samples: Sequence[Sequence[float]], budget: Budget,
                    margin: float = 0.03, method: str = "search", ps: Sequence[float] = DEFAULT_PS,
                    starts: int = 12, max_candidates: int = 256) -> BudgetFit:
    """Chooses thresholds so that at most ``1 - q`` of the images are predicted to take longer
    than ``budget.ms * (1 - margin)`` (never below the glance's own ``q`` quantile).

    Args:
        probs: softmax outputs (T, N, classes) of the fitting split.
        labels: true classes (N,).
        samples: per step k, measured per-image latencies (ms) of images exiting at k.
        budget: a tail budget (``p95:1.2`` ...).
        margin, method, ps, starts, max_candidates: as :func:`calibrate.fit.fit_budget`.

    Returns:
        The :class:`BudgetFit`; ``target_ms`` is the latency limit fitted to, ``expected_ms`` the
        mean latency of the exit-step model, ``fit_exceedance`` the predicted share above the limit.

    Raises:
        InfeasibleBudget: the glance alone exceeds the budget too often.
        InputError: a mean budget, bad shapes or values.
    """
    check_tail_feasible(budget, samples)
    s = check_samples(samples)
    probs, labels = check_fit_inputs(probs, labels, len(s), method, margin)
    q = budget.kind.quantile
    limit = max(budget.ms * (1.0 - margin), smallest_limit(s[0], q))
    mean = np.asarray([x.mean() for x in s])
    exceed = exceedance(s, limit)
    cost = exceed + _TIE_WEIGHT * mean / mean.max()
    thr, p = search_thresholds(probs, labels, cost, (1.0 - q) + _TIE_WEIGHT, method, ps, starts, max_candidates)
    conf, correct = probs.max(axis=2), probs.argmax(axis=2) == labels[None]
    nc, _, e = _scores(conf, correct, cost, thr)
    fr = _fractions(e, len(s))
    return BudgetFit(float(budget.ms), float(limit), method, thr, 100.0 * nc / labels.size,
                     float(np.dot(fr, mean)), fr, p, quantile=q, fit_exceedance=float(np.dot(fr, exceed)))


__all__ = ["check_tail_feasible", "exceedance", "fit_tail_budget", "mixture_quantile", "smallest_limit"]
