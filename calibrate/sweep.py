"""The deadline sweep of a calibration report: for per-call deadlines from the glance's latency to
past the point where both GFNet and the static baselines meet them, the accuracy GFNet keeps under
``Runtime.predict(..., deadline_ms=D)`` and the share of calls the static baseline (its measured
latency distribution) would finish after ``D``. Its percentiles of call latency are the report's
(:func:`calibrate.budgets.tail_quantile`: the p99 is the smallest call with at most 1 % of the
calls slower)."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .budgets import tail_quantile
from .latency import WARMUP_MS, StepLatency, check_frames, using_thresholds, warm_up
from .progress import Progress


@dataclass
class SweepRow:
    """GFNet under one deadline, measured on the held-out images.

    Attributes:
        deadline_ms: the per-call deadline.
        accuracy: the runtime's accuracy (percent).
        over_pct: calls finishing after the deadline (percent).
        over_10pct: calls finishing after the deadline + 10 % (percent).
        stopped_pct: images whose steps the deadline cut short (percent).
        mean_steps: steps run per image.
        p50_ms, p99_ms, max_ms: call latency (percentiles: :func:`calibrate.budgets.tail_quantile`).
        static_miss_pct: per static baseline, the share of its measured calls slower than the deadline.
    """

    deadline_ms: float
    accuracy: float
    over_pct: float
    over_10pct: float
    stopped_pct: float
    mean_steps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    static_miss_pct: Dict[str, float] = field(default_factory=dict)


@dataclass
class DeadlineSweep:
    """Every deadline of the sweep, with the thresholds and margin it ran with.

    Attributes:
        budget: name of the budget whose thresholds the runtime used.
        margin: the deadline margin (predicted step costs scaled by ``1 + margin``).
        batch: images per call (a call's images share its deadline).
        rows: one per deadline, ascending.
        static_p50_ms: per static baseline, its median call latency (:func:`calibrate.budgets.tail_quantile`).
        no_deadline_accuracy: the runtime's accuracy with the same thresholds and no deadline.
        planned_with: the step costs the runtime planned with, in words (``StepCosts.describe``).
    """

    budget: str
    margin: float
    batch: int
    rows: List[SweepRow]
    static_p50_ms: Dict[str, float] = field(default_factory=dict)
    no_deadline_accuracy: Optional[float] = None
    planned_with: str = ""

    def add_static(self, name: str, call_ms: Sequence[float]) -> None:
        """Adds a static baseline's miss rate at every deadline from its measured call latencies
        (wall-clock, as GFNet's calls here: ``StaticResult.call_ms`` whatever ``--clock``)."""
        a = np.asarray(call_ms, dtype=np.float64)
        for r in self.rows:
            r.static_miss_pct[name] = 100.0 * float((a > r.deadline_ms).mean())
        self.static_p50_ms[name] = tail_quantile([a], 0.50)

    def to_dict(self) -> Dict[str, Any]:
        return {"budget": self.budget, "margin": self.margin, "batch": self.batch,
                "no_deadline_accuracy": self.no_deadline_accuracy, "rows": [asdict(r) for r in self.rows],
                "static_p50_ms": dict(self.static_p50_ms), "planned_with": self.planned_with}


#: How far past a meeting point (GFNet's full model, a static baseline's p99 call) the sweep runs.
SWEEP_PAD = 0.05


def sweep_deadlines(lat: StepLatency, n: int, margin: Optional[float] = None,
                    static_call_ms: Sequence[Sequence[float]] = ()) -> List[float]:
    """The sweep's deadlines (ms per call at ``lat.batch``).

    ``n`` deadlines run from the glance's p50 to past the point from which the runtime plans every
    step: the full model's p99 scaled by ``1 + margin`` (the runtime plans its steps with p99 step
    latency times that) and by ``1 + SWEEP_PAD``.
    When a static baseline's p99 call (``static_call_ms``: each baseline's call latencies; the
    p99 as the report defines it, :func:`calibrate.budgets.tail_quantile`) lies beyond that, up to ``n`` more deadlines, spaced like the first ones where they fit, reach
    ``SWEEP_PAD`` past the slowest baseline's p99, so that its miss rate is seen falling to
    (nearly) zero.

    Args:
        lat: the step latency at the sweep's batch.
        n: deadlines up to GFNet's meeting point (0: none).
        margin: the deadline margin the runtime plans with (default: the runtime's).
        static_call_ms: per static baseline, its timed calls' wall-clock latency (ms per call).
    """
    if n <= 0:
        return []
    if margin is None:
        from gfnet_edge.runtime.api import DEFAULT_MARGIN

        margin = DEFAULT_MARGIN
    lo = lat.steps[0].p50_ms * lat.batch
    hi = max(lat.steps[-1].p99_ms * lat.batch * (1.0 + float(margin)) * (1.0 + SWEEP_PAD), lo)
    grid = [float(d) for d in np.linspace(lo, hi, n)] if n > 1 else [hi]  # one deadline: GFNet's meeting point
    static_hi = max((tail_quantile([a], 0.99) for a in static_call_ms if len(a)), default=0.0) * (1.0 + SWEEP_PAD)
    if static_hi > hi:
        step = (hi - lo) / (n - 1) if n > 1 else 0.0
        more = n if step <= 0.0 else min(n, math.ceil((static_hi - hi) / step - 1e-9))
        grid += [float(d) for d in np.linspace(hi, static_hi, more + 1)[1:]]
    return grid


def deadline_sweep(rt, frames: np.ndarray, labels: np.ndarray, thresholds: Sequence[float], budget: str,
                   deadlines: Sequence[float], batch: int = 1, margin: Optional[float] = None,
                   no_deadline_accuracy: Optional[float] = None, progress: bool = False,
                   warmup_ms: float = WARMUP_MS) -> DeadlineSweep:
    """Runs ``rt`` over ``frames`` (``batch`` per call) once per deadline and measures each call.

    Args:
        rt: an open Runtime with step costs set (``Runtime.set_step_costs``).
        frames, labels: held-out uint8 frames and labels.
        thresholds: exit thresholds the runtime uses.
        budget: their budget's name (for the report).
        deadlines: per-call deadlines (ms).
        batch: images per call.
        margin: the deadline margin (default: the runtime's).
        no_deadline_accuracy: the same thresholds' accuracy without a deadline (for the report).
        progress: show a progress bar.
        warmup_ms: untimed calls (at least 3) until this much wall-clock time has passed.
    """
    from gfnet_edge.runtime.api import DEFAULT_MARGIN

    margin = DEFAULT_MARGIN if margin is None else float(margin)
    rows: List[SweepRow] = []
    chunks = [(frames[i:i + batch], labels[i:i + batch]) for i in range(0, len(frames), batch)]
    check_frames(rt.model, frames)
    inputs = [x for x, _ in chunks]
    was = rt.profiler.enabled
    rt.profiler.enabled = False
    try:
        with using_thresholds(rt, thresholds), Progress(progress, len(deadlines) * len(chunks), "deadlines") as bar:
            warm_up(lambda i: rt.predict(inputs[i % len(inputs)], cropped=True), min(3, len(inputs)),
                    warmup_ms if inputs else 0.0)
            for d in deadlines:
                ms, right, steps, stopped = [], 0, [], []
                for x, (_, y) in zip(inputs, chunks):
                    t0 = time.perf_counter()
                    p = rt.predict(x, deadline_ms=d, deadline_margin=margin, cropped=True)
                    ms.append((time.perf_counter() - t0) * 1e3)
                    right += int((p.classes == y).sum())
                    steps.extend((p.exit_step + 1).tolist())
                    stopped.extend(np.asarray(p.deadline_stopped, dtype=bool).tolist())
                    bar(1)
                a = np.asarray(ms)
                rows.append(SweepRow(
                    deadline_ms=float(d), accuracy=100.0 * right / len(labels), over_pct=100.0 * float((a > d).mean()),
                    over_10pct=100.0 * float((a > 1.1 * d).mean()), stopped_pct=100.0 * float(np.mean(stopped)),
                    mean_steps=float(np.mean(steps)), p50_ms=tail_quantile([a], 0.50),
                    p99_ms=tail_quantile([a], 0.99), max_ms=float(a.max())))
    finally:
        rt.profiler.enabled = was
    return DeadlineSweep(budget, margin, batch, rows, no_deadline_accuracy=no_deadline_accuracy)


__all__ = ["SWEEP_PAD", "DeadlineSweep", "SweepRow", "deadline_sweep", "sweep_deadlines"]
