"""Exit thresholds for a budget in milliseconds (numpy only).

Two methods, both on a *fitting* split's per-step probabilities and the measured cumulative
per-step latency ``cost[k]`` (ms, steps 0..k):

* ``reference``: the paper's sweep (:func:`gfnet_edge.evaluate.fit_thresholds` with exit
  fractions ``q_k ∝ p^k``, ``p = i/20``), keeping the most accurate ``p`` whose expected latency
  ``sum_k frac_k * cost[k]`` on the fitting split is within the target.
* ``search`` (default): maximises the number of correct fitting samples under the same
  expected-latency constraint by coordinate ascent over the per-step thresholds, started from the
  best reference solutions (so it is never worse than ``reference`` on the fitting split).

Ties in accuracy go to the candidate that spends more of the budget (the budget is what the
user chose to spend; on held-out data more computation is rarely harmful).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from gfnet_edge.errors import InputError
from gfnet_edge.evaluate import DEFAULT_PS, LAST, NO_EXIT, exit_fractions, fit_thresholds

METHODS = ("search", "reference")

#: The safety margin of a fit lies in ``[0, MAX_MARGIN)`` (a fraction of the budget).
MAX_MARGIN = 0.5


class InfeasibleBudget(InputError):
    """A budget below the glance's own latency: no thresholds can meet it."""


@dataclass
class BudgetFit:
    """Thresholds chosen for one budget, scored on the fitting split.

    Attributes:
        budget_ms: the budget asked for.
        target_ms: the expected latency the fit had to stay within (budget minus safety margin).
        method: ``search`` or ``reference``.
        thresholds: float32 (T,); 1e8 = nobody exits at that step, the last is -1e8.
        accuracy: fitting-split top-1 accuracy (percent).
        expected_ms: fitting-split expected latency ``sum_k frac_k * cost[k]``.
        exit_fractions: fitting-split fraction of samples exiting at each step.
        p: the reference ``p`` (``reference``) or the ``p`` the best search start came from.
        quantile: a tail budget's quantile (0.95 for p95); None for a mean budget.
        fit_exceedance: a tail budget's fitting-split share of images predicted to take longer
            than ``target_ms`` (the fit keeps it within ``1 - quantile``).
    """

    budget_ms: float
    target_ms: float
    method: str
    thresholds: np.ndarray
    accuracy: float
    expected_ms: float
    exit_fractions: List[float] = field(default_factory=list)
    p: Optional[float] = None
    quantile: Optional[float] = None
    fit_exceedance: Optional[float] = None

    def to_dict(self) -> dict:
        out = {"budget_ms": self.budget_ms, "target_ms": self.target_ms, "method": self.method,
               "thresholds": [float(t) for t in self.thresholds], "fit_accuracy": self.accuracy,
               "fit_expected_ms": self.expected_ms, "fit_exit_fractions": list(self.exit_fractions),
               "p": self.p}
        if self.quantile is not None:
            out.update(quantile=self.quantile, fit_exceedance=self.fit_exceedance)
        return out


def check_costs(cost: Sequence[float]) -> np.ndarray:
    """Validates a cumulative per-step latency vector (finite, positive)."""
    c = np.asarray(cost, dtype=np.float64).reshape(-1)
    if c.size == 0 or not np.isfinite(c).all() or (c <= 0).any():
        raise InputError(f"per-step latencies must be finite and positive, got {c.tolist()}")
    return c


def check_fit_inputs(probs: np.ndarray, labels: np.ndarray, steps: int, method: str,
                     margin: float) -> Tuple[np.ndarray, np.ndarray]:
    """``(probs float32 (T, N, K), labels int64 (N,))`` after checking shapes, method and margin.

    Raises:
        InputError: naming the first problem.
    """
    if method not in METHODS:
        raise InputError(f"unknown threshold method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 <= margin < MAX_MARGIN:
        raise InputError(f"margin must be in [0, {MAX_MARGIN:g}), got {margin}")
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[0] != steps:
        raise InputError(f"probs must be (T={steps}, N, classes), got {probs.shape}")
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if labels.size != probs.shape[1]:
        raise InputError(f"{labels.size} labels for {probs.shape[1]} samples")
    return probs, labels


def check_feasible(budget_ms: float, cost: Sequence[float], where: str = "") -> None:
    """Raises :class:`InfeasibleBudget` when ``budget_ms`` is below the glance's latency ``cost[0]``.

    Args:
        budget_ms: the budget (mean milliseconds per image).
        cost: cumulative per-step latency (ms).
        where: words naming the device/backend, for the message.
    """
    c = check_costs(cost)
    if not np.isfinite(budget_ms) or budget_ms <= 0:
        raise InfeasibleBudget(f"budget {budget_ms} ms: a budget must be a positive number of milliseconds")
    if budget_ms < c[0]:
        raise InfeasibleBudget(
            f"budget {budget_ms:g} ms cannot be met: the glance alone (step 0) takes {c[0]:.3f} ms per image"
            f"{' ' + where if where else ''}, and every image runs the glance; the smallest feasible budget here is "
            f"about {np.ceil(c[0] * 10) / 10:.1f} ms (the full model takes {c[-1]:.3f} ms)")


def _scores(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, thr: np.ndarray) -> Tuple[int, float, np.ndarray]:
    """(correct count, expected cost, exit steps) of thresholds ``thr``."""
    hit = conf >= thr.reshape(-1, 1)
    hit[-1] = True
    e = hit.argmax(axis=0)
    idx = np.arange(conf.shape[1])
    return int(correct[e, idx].sum()), float(cost[e].mean()), e


def _candidates(conf_k: np.ndarray, max_candidates: int) -> np.ndarray:
    """Threshold values worth trying at one step: sample confidences (or quantiles), 0 and 1e8."""
    u = np.unique(conf_k.astype(np.float32))
    if u.size > max_candidates:
        u = np.unique(np.quantile(u, np.linspace(0.0, 1.0, max_candidates), method="nearest").astype(np.float32))
    return np.concatenate([np.float32([0.0]), u, np.float32([NO_EXIT])])


def _better(a: Tuple[int, float], b: Tuple[int, float]) -> bool:
    """Lexicographic: more correct, then more of the budget spent."""
    return a[0] > b[0] or (a[0] == b[0] and a[1] > b[1] + 1e-12)


def coordinate_search(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, target: float, init: np.ndarray,
                      max_candidates: int = 256, max_sweeps: int = 20) -> np.ndarray:
    """Coordinate ascent over thresholds 0..T-2 maximising (correct, cost) with mean cost <= target.

    Args:
        conf: max probability per step and sample (T, N).
        correct: whether each step's prediction is right (T, N) bool.
        cost: cumulative per-step cost (T,).
        target: the expected-cost limit.
        init: feasible starting thresholds (T,).
        max_candidates: threshold values tried per step (quantiles of the confidences).
        max_sweeps: passes over the steps.

    Returns:
        float32 thresholds (T,), last -1e8.
    """
    T, n = conf.shape
    thr = np.asarray(init, dtype=np.float32).copy()
    thr[-1] = LAST
    cands = [_candidates(conf[k], max_candidates) for k in range(T - 1)]
    tol = target + 1e-9 * max(1.0, abs(target))
    for _ in range(max_sweeps):
        changed = False
        for k in range(T - 1):
            hit = conf >= thr.reshape(-1, 1)
            hit[-1] = True
            before = hit[:k].any(axis=0)
            e_before = hit[:k].argmax(axis=0) if k else np.zeros(n, np.int64)
            after = hit[k + 1:].argmax(axis=0) + k + 1  # first exit after k (T-1 at worst)
            idx = np.arange(n)
            fixed_c = float(correct[e_before, idx][before].sum())
            fixed_t = float(cost[e_before][before].sum())
            rest = ~before
            ck, ca = correct[k, rest], correct[after[rest], idx[rest]]
            tk, ta = cost[k], cost[after[rest]]
            m = conf[k, rest][None, :] >= cands[k][:, None]  # (C, n_rest)
            n_corr = fixed_c + (m * ck).sum(1) + (~m * ca).sum(1)
            n_cost = (fixed_t + m.sum(1) * tk + (~m * ta).sum(1)) / n
            feas = n_cost <= tol
            cur = thr[k]
            best_i = None
            for i in np.flatnonzero(feas):
                key = (int(round(n_corr[i])), float(n_cost[i]))
                if best_i is None or _better(key, best_key):
                    best_i, best_key = i, key
            if best_i is None:
                continue
            cur_c, cur_t, _ = _scores(conf, correct, cost, thr)
            if _better(best_key, (cur_c, cur_t)) and cands[k][best_i] != cur:
                thr[k] = cands[k][best_i]
                changed = True
        if not changed:
            break
    return thr


def _fractions(e: np.ndarray, T: int) -> List[float]:
    return (np.bincount(e, minlength=T) / e.size).tolist()


def reference_sweep(probs: np.ndarray, cost: np.ndarray, ps: Sequence[float] = DEFAULT_PS) -> List[Tuple[float, np.ndarray]]:
    """``[(p, thresholds)]`` of the reference sweep, plus ``(0.0, all-exit-at-glance)``."""
    T = probs.shape[0]
    out = [(float(p), fit_thresholds(probs, exit_fractions(p, T))) for p in ps]
    glance_only = np.full(T, LAST, dtype=np.float32)
    out.append((0.0, glance_only))
    return out


def fit_budget(probs: np.ndarray, labels: np.ndarray, cost: Sequence[float], budget_ms: float, margin: float = 0.03,
               method: str = "search", ps: Sequence[float] = DEFAULT_PS, starts: int = 12,
               max_candidates: int = 256) -> BudgetFit:
    """Chooses thresholds for a mean-latency budget on a fitting split.

    Args:
        probs: softmax outputs (T, N, classes) of the fitting split.
        labels: true classes (N,).
        cost: measured cumulative latency of steps 0..k (T,), ms per image.
        budget_ms: the budget.
        margin: safety margin; the fit keeps the expected latency within ``budget * (1 - margin)``
            (never below the glance's latency).
        method: ``search`` or ``reference``.
        ps: the reference's p sweep.
        starts: how many distinct reference solutions (the most accurate) seed the search, besides the
            all-glance one.
        max_candidates: threshold values tried per step by the search.

    Returns:
        The chosen :class:`BudgetFit`.

    Raises:
        InfeasibleBudget: the budget is below ``cost[0]``.
        InputError: bad method, shapes or values.
    """
    c = check_costs(cost)
    probs, labels = check_fit_inputs(probs, labels, c.size, method, margin)
    check_feasible(budget_ms, c)
    target = max(budget_ms * (1.0 - margin), float(c[0]))
    thr, p = search_thresholds(probs, labels, c, target, method, ps, starts, max_candidates)
    conf, correct = probs.max(axis=2), probs.argmax(axis=2) == labels[None]
    nc, t, e = _scores(conf, correct, c, thr)
    return BudgetFit(float(budget_ms), float(target), method, thr.astype(np.float32),
                     100.0 * nc / labels.size, t, _fractions(e, c.size), p)


def search_thresholds(probs: np.ndarray, labels: np.ndarray, cost: np.ndarray, target: float, method: str = "search",
                      ps: Sequence[float] = DEFAULT_PS, starts: int = 12,
                      max_candidates: int = 256) -> Tuple[np.ndarray, Optional[float]]:
    """The most accurate thresholds on a split whose mean per-image ``cost`` of the exit step is
    within ``target``: ``sum_k frac_k * cost[k] <= target``.

    ``cost`` may be any per-step quantity averaged over images: the cumulative latency (a mean
    budget) or the probability that an image exiting at step k exceeds a latency limit (a tail
    budget). Ties in accuracy go to the larger cost.

    Args:
        probs: softmax outputs (T, N, classes); labels: (N,).
        cost: per-step cost (T,); target: its limit.
        method, ps, starts, max_candidates: as :func:`fit_budget`.

    Returns:
        ``(thresholds float32 (T,), p)``: ``p`` of the reference solution (or the search's best start).

    Raises:
        InfeasibleBudget: not even "every image exits at the glance" meets the target.
    """
    c = np.asarray(cost, dtype=np.float64)
    conf, pred = probs.max(axis=2), probs.argmax(axis=2)
    correct = pred == labels[None]
    scored = []
    for p, thr in reference_sweep(probs, c, ps):
        nc, t, e = _scores(conf, correct, c, thr)
        if t <= target + 1e-9 * max(1.0, target):
            scored.append(((nc, t), p, thr))
    if not scored:
        raise InfeasibleBudget(f"no thresholds meet the target {target:g}: the glance alone costs {c[0]:g}")
    order = sorted(range(len(scored)), key=lambda i: (scored[i][0][0], scored[i][0][1]), reverse=True)
    (best_key, best_p, best_thr) = scored[order[0]]
    if method == "search":
        seeds, seen = [], set()
        for i in order:  # distinct feasible reference solutions, best first, and always the all-glance one
            key = scored[i][2].tobytes()
            if key not in seen and (len(seeds) < starts or scored[i][1] == 0.0):
                seen.add(key)
                seeds.append(i)
        for i in seeds:
            key0, p0, thr0 = scored[i]
            thr = coordinate_search(conf, correct, c, target, thr0, max_candidates=max_candidates)
            nc, t, _ = _scores(conf, correct, c, thr)
            if _better((nc, t), best_key):
                best_key, best_p, best_thr = (nc, t), p0, thr
    return best_thr.astype(np.float32), best_p


def budget_name(budget_ms: float) -> str:
    """Manifest name of a millisecond budget: ``ms-3.0``, ``ms-2.25``."""
    b = float(budget_ms)
    return f"ms-{b:.1f}" if abs(round(b, 1) - b) < 1e-9 else f"ms-{b:g}"


def default_budgets(cost: Sequence[float], n: int = 3) -> List[float]:
    """``n`` budgets spread between the glance's and the full model's latency, rounded to 0.1 ms,
    or to 0.01 / 0.001 ms when the span is too narrow for ``n`` distinct budgets at 0.1 ms (a
    model whose steps cost little next to the fixed cost of a call); never below the glance."""
    c = check_costs(cost)
    lo, hi = float(c[0]), float(c[-1])
    out: List[float] = []
    for digits in (1, 2, 3):
        out = []
        for f in np.linspace(0.0, 1.0, n + 2)[1:-1]:
            b = round(lo + f * (hi - lo), digits)
            b = max(b, np.ceil(lo * 10 ** digits) / 10 ** digits)
            if b not in out:
                out.append(float(b))
        if len(out) == n:
            break
    return out


__all__ = ["BudgetFit", "InfeasibleBudget", "METHODS", "budget_name", "check_feasible", "coordinate_search",
           "check_fit_inputs", "default_budgets", "fit_budget", "reference_sweep", "search_thresholds"]
