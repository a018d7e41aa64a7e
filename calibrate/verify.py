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

from .config import CalibrationConfig
from .fit import BudgetFit, budget_name, fit_budget
from .latency import CLOCKS, CallRun, measure_calls
from .progress import Progress


@dataclass
class Measurement:
    """One measurement of the per-step latency during a calibration.

    Attributes:
        when: what it was taken for (``start``, ``re-measure ms-3.0``, ``end``).
        cost_ms: cumulative per-image mean latency of steps 0..k.
        calls: timed calls per step.
    """

    when: str
    cost_ms: List[float]
    calls: int

    def to_dict(self) -> Dict[str, Any]:
        return {"when": self.when, "cost_ms": list(self.cost_ms), "calls": self.calls}


def pooled(history: Sequence[Measurement]) -> np.ndarray:
    """Per-step median of the step-latency measurements so far (robust to one taken under a load spike)."""
    return np.median(np.asarray([h.cost_ms for h in history], dtype=np.float64), axis=0)


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
    feasible = [h for h in history if h.cost_ms[0] <= budget]
    if not feasible:  # callers check every budget against the first measurement; this is a bug if reached
        raise RuntimeError(f"budget {budget} ms is below the glance latency of every measurement")
    h = feasible[-1]
    note = (f"the device slowed down during calibration: the glance now takes {pool[0]:.3f} ms (median of "
            f"{len(history)} measurements), above this budget; thresholds were fitted with the step latency "
            f"measured at '{h.when}' (glance {h.cost_ms[0]:.3f} ms)")
    return np.asarray(h.cost_ms, dtype=np.float64), note


@dataclass
class Attempt:
    """One fit/verify round of a budget."""

    attempt: int
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
        name, budget_ms: the budget.
        fit: the final fit (fitting split).
        holdout: trace-based held-out score of the final thresholds.
        run: the verification run (per-image latency, classes, exit steps).
        accuracy: the runtime's held-out accuracy (percent).
        exit_fractions: the runtime's share of images exiting at each step.
        batch: images per call of the verification run.
        consistent_with_trace: the runtime's exits and classes equal the trace-based evaluation.
        within_tolerance: the measured mean latency lies within the tolerance of the budget.
        cost_ms: the cumulative step latency the final thresholds were fitted with.
        note: why ``cost_ms`` is not the pooled step latency, or None.
        attempts: every fit/verify round.
        reference: the reference method's solution.
    """

    name: str
    budget_ms: float
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
    def thresholds(self) -> List[float]:
        return self.fit.thresholds.tolist()

    def to_dict(self) -> Dict[str, Any]:
        """The budget's entry of ``report.json`` (the run's per-image arrays left out)."""
        return {
            "name": self.name, "budget_ms": self.budget_ms, "thresholds": self.thresholds,
            "fit": self.fit.to_dict(), "holdout": asdict(self.holdout),
            "measured": {**self.run.stats.to_dict(), "accuracy": self.accuracy, "exit_fractions": self.exit_fractions,
                         "batch": self.batch, "images": int(len(self.run.ms))},
            "consistent_with_trace": self.consistent_with_trace, "within_tolerance": self.within_tolerance,
            "cost_ms": self.cost_ms, "note": self.note, "attempts": [asdict(a) for a in self.attempts],
            "reference_method": asdict(self.reference),
        }


def fit_and_verify(rt, budget: float, fit_probs, fit_y, hold_probs, hold_y, hold_frames, cost: np.ndarray,
                   cfg: CalibrationConfig, remeasure: Callable[[str], np.ndarray],
                   note: Optional[str] = None) -> BudgetResult:
    """Fits thresholds for one budget and verifies them by running the runtime on the held-out images.

    When the measured mean latency is outside the tolerance, the step latency is measured again
    (``remeasure``: the device's load may have changed since; it returns the per-step median of all
    measurements so far) and the thresholds refitted; a refit that picks the same thresholds ends
    the rounds.

    Args:
        rt: the open runtime.
        budget: mean ms per image.
        fit_probs, fit_y: the fitting split's traced probabilities (T, N, K) and labels.
        hold_probs, hold_y, hold_frames: the held-out split's probabilities, labels and uint8 frames.
        cost: cumulative per-step latency to start from.
        cfg: the calibration options.
        remeasure: measures the step latency again, returns the pooled cost.
        note: why ``cost`` is not the pooled step latency (:func:`starting_cost`), kept in the result.
    """
    lo, hi = cfg.tolerance
    T = len(cost)
    clock = CLOCKS[cfg.clock]
    c = cost
    fit = fit_budget(fit_probs, fit_y, c, budget, margin=cfg.margin, method=cfg.method)
    attempts: List[Attempt] = []
    for attempt in range(cfg.attempts):
        hold = dynamic_evaluate(hold_probs, hold_y, c, fit.thresholds)
        with Progress(cfg.progress, len(hold_frames), f"verify {budget_name(budget)}") as bar:
            run = measure_calls(rt, hold_frames, fit.thresholds, batch=cfg.batch, warmup=cfg.warmup, progress=bar,
                                clock=clock)
        fr = np.bincount(run.exit_step, minlength=T) / len(run.exit_step)
        model_ms = float((fr * c).sum())
        measured = run.stats.mean_ms
        ok = (1 - lo) * budget <= measured <= (1 + hi) * budget
        attempts.append(Attempt(attempt, [float(x) for x in c], fit.thresholds.tolist(), fit.expected_ms,
                                hold.expected_cost, model_ms, measured, ok))
        if ok or attempt + 1 == cfg.attempts:
            break
        new_c = remeasure(f"re-measure {budget_name(budget)}")
        if budget < new_c[0]:
            break  # the glance alone now exceeds the budget: keep the verified result
        new_fit = fit_budget(fit_probs, fit_y, new_c, budget, margin=cfg.margin, method=cfg.method)
        if np.array_equal(new_fit.thresholds, fit.thresholds):
            break  # the step latency measured now gives the same thresholds: nothing to re-verify
        logger.info("%s: measured %.3f ms vs model %.3f ms; step latency re-measured (%s ms), refitting",
                    budget_name(budget), measured, model_ms, ", ".join(f"{x:.2f}" for x in new_c))
        c, fit = new_c, new_fit
    ref = fit_budget(fit_probs, fit_y, c, budget, margin=cfg.margin, method="reference") if cfg.method != "reference" \
        else fit
    ref_hold = dynamic_evaluate(hold_probs, hold_y, c, ref.thresholds)
    return BudgetResult(
        name=budget_name(budget), budget_ms=float(budget), fit=fit,
        holdout=HoldoutScore(hold.accuracy, hold.expected_cost, (hold.exit_counts / hold.exit_counts.sum()).tolist()),
        run=run, accuracy=100.0 * float((run.classes == hold_y).mean()), exit_fractions=fr.tolist(),
        batch=cfg.batch,
        consistent_with_trace=bool(np.array_equal(run.exit_step, hold.exit_step) and
                                   np.array_equal(run.classes, hold.prediction)),
        within_tolerance=attempts[-1].within_tolerance, cost_ms=[float(x) for x in c], note=note,
        attempts=attempts,
        reference=ReferenceScore(ref.thresholds.tolist(), ref.p, ref_hold.accuracy, ref_hold.expected_cost,
                                 ref.accuracy))


def stability(history: Sequence[Measurement], clock: str) -> Dict[str, Any]:
    """Spread of the full model's latency over the repeated step-latency measurements."""
    full = [h.cost_ms[-1] for h in history]
    spread = 100.0 * (max(full) - min(full)) / min(full)
    out: Dict[str, Any] = {"full_model_ms": full, "spread_pct": spread, "warning": None}
    if spread > 10.0:
        out["warning"] = (f"the step latency changed by {spread:.0f}% during calibration ({min(full):.2f} to "
                          f"{max(full):.2f} ms for the full model): the device was not idle, so measured latencies "
                          "follow its load; calibrate on an idle device" +
                          (" (or use --clock cpu --threads 1)" if clock == "wall" else ""))
    return out
