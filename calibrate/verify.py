"""Fitting a budget's thresholds and verifying them by running the runtime on held-out images.

The per-step latency a fit uses is the per-step median of every step-latency measurement taken so
far (:class:`Measurement`), robust to one taken under a load spike. When the runtime's measured
latency on the held-out images is outside the tolerance, the step latency is measured again and the
thresholds refitted (at most ``attempts`` rounds, every round kept in :attr:`BudgetResult.attempts`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from gfnet_edge.evaluate import dynamic_evaluate
from gfnet_edge.log import logger

from .budgets import Budget, tail_quantile
from .config import CalibrationConfig
from .fit import BudgetFit, check_feasible, fit_budget
from .latency import CLOCKS, CallRun, StepLatency, measure_calls
from .progress import Progress
from .tail import check_tail_feasible, fit_tail_budget, mixture_quantile, smallest_limit


@dataclass
class Measurement:
    """One measurement of the per-step latency during a calibration.

    Attributes:
        when: what it was taken for (``start``, ``re-measure ms-3.0``, ``end``).
        cost_ms: cumulative per-image mean latency of steps 0..k.
        calls: timed calls per step.
        samples: per step, the per-image ms of every timed call (not in ``report.json``).
    """

    when: str
    cost_ms: List[float]
    calls: int
    samples: Optional[List[np.ndarray]] = field(default=None, repr=False)

    def to_dict(self) -> Dict[str, Any]:
        return {"when": self.when, "cost_ms": list(self.cost_ms), "calls": self.calls}


def pooled(history: Sequence[Measurement]) -> np.ndarray:
    """Per-step median of the step-latency measurements so far (robust to one taken under a load spike)."""
    return np.median(np.asarray([h.cost_ms for h in history], dtype=np.float64), axis=0)


@dataclass
class PooledLatency:
    """The step latency a fit uses.

    Attributes:
        cost: cumulative per-step mean latency (ms) (mean budgets).
        samples: per step, per-image latency measurements (ms) (tail budgets).
    """

    cost: np.ndarray
    samples: List[np.ndarray]


def pooled_samples(history: Sequence[Measurement]) -> List[np.ndarray]:
    """Per step, every measurement's samples together."""
    have = [h.samples for h in history if h.samples]
    return [np.concatenate([h[k] for h in have]) for k in range(len(have[0]))] if have else []


def pool(history: Sequence[Measurement]) -> PooledLatency:
    """All measurements so far: the per-step median of the means and every sample."""
    return PooledLatency(pooled(history), pooled_samples(history))


def starting_latency(budget: Budget, history: Sequence[Measurement]) -> Tuple[PooledLatency, Optional[str]]:
    """The step latency a budget's fit starts from, and a note when it is not the pooled one
    (mean budgets: :func:`starting_cost`; tail budgets: the same rule with the budget's quantile
    of the glance's measurements in place of its mean)."""
    if not budget.kind.is_tail:
        cost, note = starting_cost(budget.ms, history)
        return PooledLatency(cost, pooled_samples(history)), note
    q = budget.kind.quantile
    lat = pool(history)
    glance = smallest_limit(lat.samples[0], q)
    if budget.ms >= glance:
        return lat, None
    h, note = _fallback(history, budget.ms, lambda m: smallest_limit(m.samples[0], q) if m.samples else np.inf,
                        glance, f"'s {budget.kind.value}", f"{len(history)} measurements pooled")
    return PooledLatency(np.asarray(h.cost_ms, dtype=np.float64), list(h.samples)), note


def _fallback(history: Sequence[Measurement], budget_ms: float, glance_of: Callable[[Measurement], float],
              now: float, what: str, how: str) -> Tuple[Measurement, str]:
    """The latest measurement whose glance (``glance_of``) meets ``budget_ms``, and the note saying
    the fit uses it because the glance now takes ``now`` ms (``how``: over which measurements)."""
    feasible = [h for h in history if glance_of(h) <= budget_ms]
    if not feasible:  # callers check every budget against the first measurement; this is a bug if reached
        raise RuntimeError(f"budget {budget_ms} ms is below the glance latency of every measurement")
    h = feasible[-1]
    note = (f"the device slowed down during calibration: the glance{what} now takes {now:.3f} ms ({how}), "
            f"above this budget; thresholds were fitted with the step latency "
            f"measured at '{h.when}' (glance{what} {glance_of(h):.3f} ms)")
    return h, note


def starting_cost(budget: float, history: Sequence[Measurement]) -> Tuple[np.ndarray, Optional[str]]:
    """The step latency a budget's fit starts from, and a note when it is not the pooled one.

    Normally the per-step median of all measurements so far. Every budget was checked against the
    first measurement, but when the device has slowed down since (another process took the CPU),
    the pooled glance latency can exceed a small budget, and no thresholds could be fitted. The fit
    then starts from the most recent measurement under which the budget can be met, and the note
    says so; the verification run measures what the device does now, and the tolerance check
    reports it.

    Args:
        budget: the budget (ms per image).
        history: the measurements, oldest first; the first met ``budget``.

    Returns:
        ``(cost, note)``: the cumulative per-step latency (ms) and ``None`` or the note.
    """
    pool = pooled(history)
    if budget >= pool[0]:
        return pool, None
    h, note = _fallback(history, budget, lambda m: m.cost_ms[0], float(pool[0]), "",
                        f"median of {len(history)} measurements")
    return np.asarray(h.cost_ms, dtype=np.float64), note


@dataclass
class Attempt:
    """One fit/verify round of a budget."""

    attempt: int
    statistic: str
    cost_ms: List[float]
    thresholds: List[float]
    fit_expected_ms: float
    holdout_expected_ms: float
    model_ms_of_run: float
    measured_ms: float
    within_tolerance: bool


@dataclass
class HoldoutScore:
    """Trace-based score of thresholds on the held-out split (exit-step model)."""

    accuracy: float
    expected_ms: float
    exit_fractions: List[float]


@dataclass
class ReferenceScore:
    """The reference method's solution for the same budget, scored on the held-out split."""

    thresholds: List[float]
    p: Optional[float]
    accuracy: float
    expected_ms: float
    fit_accuracy: float


@dataclass
class BudgetResult:
    """A budget's fitted thresholds and what the runtime measured with them on the held-out images.

    Attributes:
        budget: what is bounded (mean or a percentile) and the limit.
        fit: the final fit (fitting split).
        holdout: trace-based held-out score of the final thresholds.
        run: the verification run (per-image latency, classes, exit steps).
        accuracy: the runtime's held-out accuracy (percent).
        exit_fractions: the runtime's share of images exiting at each step.
        batch: images per call of the verification run.
        consistent_with_trace: the runtime's exits and classes equal the trace-based evaluation.
        within_tolerance: the measured statistic (mean or percentile) lies within the tolerance of
            the budget.
        cost_ms: the cumulative step latency the final thresholds were fitted with.
        note: why ``cost_ms`` is not the pooled step latency, or None.
        attempts: every fit/verify round.
        reference: the reference method's solution.
    """

    budget: Budget
    fit: BudgetFit
    holdout: HoldoutScore
    run: CallRun = field(repr=False)
    accuracy: float
    exit_fractions: List[float]
    batch: int
    consistent_with_trace: bool
    within_tolerance: bool
    cost_ms: List[float]
    note: Optional[str]
    attempts: List[Attempt]
    reference: ReferenceScore

    @property
    def name(self) -> str:
        return self.budget.name

    @property
    def budget_ms(self) -> float:
        return float(self.budget.ms)

    @property
    def thresholds(self) -> List[float]:
        return self.fit.thresholds.tolist()

    @property
    def measured_ms(self) -> float:
        """The measured statistic the budget bounds (mean or percentile, ms per image)."""
        return self.budget.kind.statistic(self.run.ms)

    @property
    def over_budget_pct(self) -> float:
        """Share of held-out images slower than the budget (percent)."""
        return 100.0 * float((self.run.ms > self.budget.ms).mean())

    def distribution(self) -> Dict[str, float]:
        """Percentiles of the measured per-image latency (ms), as tail budgets define them
        (:func:`calibrate.budgets.tail_quantile`: ``p95_ms`` is the smallest latency with at most
        5 % of the images slower)."""
        ms = self.run.ms
        out = {f"p{q}_ms": tail_quantile([ms], q / 100.0) for q in (50, 90, 95, 99)}
        return {**out, "max_ms": float(ms.max()), "mean_ms": float(ms.mean()), "over_budget_pct": self.over_budget_pct}

    def to_dict(self) -> Dict[str, Any]:
        """The budget's entry of ``report.json`` (the run's per-image arrays left out)."""
        return {
            "name": self.name, "kind": self.budget.kind.value, "quantile": self.budget.kind.quantile,
            "budget_ms": self.budget_ms, "thresholds": self.thresholds,
            "fit": self.fit.to_dict(), "holdout": asdict(self.holdout),
            "measured": {**self.run.stats.to_dict(), "accuracy": self.accuracy, "exit_fractions": self.exit_fractions,
                         "batch": self.batch, "images": int(len(self.run.ms)), "statistic_ms": self.measured_ms,
                         "distribution": self.distribution()},
            "consistent_with_trace": self.consistent_with_trace, "within_tolerance": self.within_tolerance,
            "cost_ms": self.cost_ms, "note": self.note, "attempts": [asdict(a) for a in self.attempts],
            "reference_method": asdict(self.reference),
        }


def check_budget_feasible(budget: Budget, lat: StepLatency, where: str = "") -> None:
    """Raises :class:`~calibrate.fit.InfeasibleBudget` (one line) when the glance alone, which every
    image runs, already exceeds ``budget`` under the measured step latency ``lat``."""
    if budget.kind.is_tail:
        check_tail_feasible(budget, lat.samples, where)
    else:
        check_feasible(budget.ms, lat.cost, where)


def fit_for(budget: Budget, probs: np.ndarray, labels: np.ndarray, lat: PooledLatency, cfg: CalibrationConfig,
            method: Optional[str] = None) -> BudgetFit:
    """Thresholds for ``budget`` on a split: :func:`fit_budget` (mean) or :func:`fit_tail_budget`."""
    method = method or cfg.method
    if budget.kind.is_tail:
        return fit_tail_budget(probs, labels, lat.samples, budget, margin=cfg.margin, method=method)
    return fit_budget(probs, labels, lat.cost, budget.ms, margin=cfg.margin, method=method)


def feasible_now(budget: Budget, lat: PooledLatency) -> bool:
    """Whether the glance alone still meets ``budget`` under ``lat``."""
    if budget.kind.is_tail:
        return smallest_limit(lat.samples[0], budget.kind.quantile) <= budget.ms
    return budget.ms >= lat.cost[0]


def _model_statistic(budget: Budget, lat: PooledLatency, fractions: np.ndarray) -> float:
    """The budget's statistic predicted by the exit-step model for these exit fractions."""
    if budget.kind.is_tail:
        return mixture_quantile(lat.samples, fractions, budget.kind.quantile)
    return float((fractions * lat.cost).sum())


def fit_and_verify(rt, budget: Budget, fit_probs, fit_y, hold_probs, hold_y, hold_frames, lat: PooledLatency,
                   cfg: CalibrationConfig, remeasure: Callable[[str], PooledLatency],
                   note: Optional[str] = None) -> BudgetResult:
    """Fits thresholds for one budget and verifies them by running the runtime on the held-out images.

    When the measured statistic (the mean, or the budget's percentile) is outside the tolerance,
    the step latency is measured again (``remeasure``: the device's load may have changed since; it
    returns all measurements so far, pooled) and the thresholds refitted; a refit that picks the
    same thresholds ends the rounds.

    Args:
        rt: the open runtime.
        budget: the budget.
        fit_probs, fit_y: the fitting split's traced probabilities (T, N, K) and labels.
        hold_probs, hold_y, hold_frames: the held-out split's probabilities, labels and uint8 frames.
        lat: the step latency to start from.
        cfg: the calibration options.
        remeasure: measures the step latency again, returns the pooled latency.
        note: why ``lat`` is not the pooled step latency (:func:`starting_latency`), kept in the result.
    """
    lo, hi = cfg.tolerance
    T = len(lat.cost)
    clock = CLOCKS[cfg.clock]
    fit = fit_for(budget, fit_probs, fit_y, lat, cfg)
    attempts: List[Attempt] = []
    for attempt in range(cfg.attempts):
        hold = dynamic_evaluate(hold_probs, hold_y, lat.cost, fit.thresholds)
        with Progress(cfg.progress, len(hold_frames), f"verify {budget.name}") as bar:
            run = measure_calls(rt, hold_frames, fit.thresholds, batch=cfg.batch, warmup=cfg.warmup,
                                warmup_ms=cfg.warmup_ms, progress=bar,
                                clock=clock)
        fr = np.bincount(run.exit_step, minlength=T) / len(run.exit_step)
        model_ms = _model_statistic(budget, lat, fr)
        measured = budget.kind.statistic(run.ms)
        ok = (1 - lo) * budget.ms <= measured <= (1 + hi) * budget.ms
        attempts.append(Attempt(attempt, budget.kind.value, [float(x) for x in lat.cost], fit.thresholds.tolist(),
                                fit.expected_ms, hold.expected_cost, model_ms, measured, ok))
        if ok or attempt + 1 == cfg.attempts:
            break
        new_lat = remeasure(f"re-measure {budget.name}")
        if not feasible_now(budget, new_lat):
            break  # the glance alone now exceeds the budget: keep the verified result
        new_fit = fit_for(budget, fit_probs, fit_y, new_lat, cfg)
        if np.array_equal(new_fit.thresholds, fit.thresholds):
            break  # the step latency measured now gives the same thresholds: nothing to re-verify
        logger.info("%s: measured %.3f ms vs model %.3f ms; step latency re-measured (%s ms), refitting",
                    budget.name, measured, model_ms, ", ".join(f"{x:.2f}" for x in new_lat.cost))
        lat, fit = new_lat, new_fit
    ref = fit_for(budget, fit_probs, fit_y, lat, cfg, method="reference") if cfg.method != "reference" else fit
    ref_hold = dynamic_evaluate(hold_probs, hold_y, lat.cost, ref.thresholds)
    return BudgetResult(
        budget=budget, fit=fit,
        holdout=HoldoutScore(hold.accuracy, hold.expected_cost, (hold.exit_counts / hold.exit_counts.sum()).tolist()),
        run=run, accuracy=100.0 * float((run.classes == hold_y).mean()), exit_fractions=fr.tolist(),
        batch=cfg.batch,
        consistent_with_trace=bool(np.array_equal(run.exit_step, hold.exit_step) and
                                   np.array_equal(run.classes, hold.prediction)),
        within_tolerance=attempts[-1].within_tolerance, cost_ms=[float(x) for x in lat.cost], note=note,
        attempts=attempts,
        reference=ReferenceScore(ref.thresholds.tolist(), ref.p, ref_hold.accuracy, ref_hold.expected_cost,
                                 ref.accuracy))


def stability(history: Sequence[Measurement], clock: str) -> Dict[str, Any]:
    """Spread of the full model's latency over the repeated step-latency measurements.

    The spread compares each measurement's *median* call (of the full model) when the samples are
    there: a single slow call (a page fault, a scheduler hiccup) moves a 20-call mean by several
    per cent without the device having changed, but not the median. A warning is given above 10 %.
    """
    full = [h.cost_ms[-1] for h in history]
    typical = [float(np.median(h.samples[-1])) if h.samples else h.cost_ms[-1] for h in history]
    spread = 100.0 * (max(typical) - min(typical)) / min(typical)
    out: Dict[str, Any] = {"full_model_ms": full, "full_model_median_ms": typical, "spread_pct": spread,
                           "warning": None}
    if spread > 10.0:
        out["warning"] = (f"the step latency changed by {spread:.0f}% during calibration ({min(typical):.2f} to "
                          f"{max(typical):.2f} ms median for the full model): another process was using the "
                          "device, or its clocks changed, so budgets may be off by as much; calibrate on an idle "
                          "device" + (" (or use --clock cpu --threads 1)" if clock == "wall" else ""))
    return out
