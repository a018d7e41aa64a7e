"""Per-call deadlines: stop the loop before a step that would end too late.

A GFNet has an answer after every step. With a deadline, the loop checks before each focus
step whether that step, for the images still running, would end after the deadline; if so the
images still running stop there and keep their current prediction (``Predictions.
deadline_stopped``). The glance step always runs (it is the first answer).

The cost of a step comes from :class:`StepCosts`: the per-image latency of each step measured on
this device by ``gfnet-edge calibrate`` and stored in the bundle manifest (``step_costs``), or
given by the caller. A batch shares one deadline; the cost of a step for ``n`` images is
interpolated between the batch sizes the costs were measured at (per-image cost at batch 1
times ``n`` when only batch 1 was measured: an over-estimate where batching helps, so the
deadline errs on the early side). ``margin`` scales every predicted cost.
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from .chunking import check_batch

#: The percentile of the measured step latency a deadline plans with (tail, not mean). From few
#: timed calls per step it is about their slowest, so a stall of the device while they were
#: measured makes the deadlines conservative (steps stop earlier than needed; calibrate first
#: times a step whose p99 takes in one or two stalls alone until they lie beyond it, then up to 300
#: calls per step, where they fit in 5 s: ``--latency-seconds``, ``--latency-calls``); a lower
#: percentile lets calls run late: on the demo model (2-core x86 VM, one thread) planned
#: with the p95, 18 % of batch-1 calls ended after a 2.74 ms deadline, against at most 1.3 % with
#: the p99 (``python bench/deadlines.py --images 300 --deadlines 6 [--plan-stat p95]``).
DEFAULT_STAT = "p99_ms"

#: The manifest ``step_costs`` entries ``gfnet-edge calibrate`` writes name it as their ``source``.
CALIBRATE_SOURCE = "gfnet-edge calibrate"

#: Each :attr:`StepCosts.source`, in words for reports and messages: what the costs are and
#: where they came from (a manifest entry with another ``source`` shows that text).
STEP_COST_SOURCES: Dict[str, str] = {
    "given": "step costs given with the deadline",
    "set_step_costs": "step costs given to Runtime.set_step_costs",
    "step times": "no step costs (every step runs, its check only notes the time)",
    "bundle manifest": "the step costs stored in the bundle's manifest",
    CALIBRATE_SOURCE: "the step latency gfnet-edge calibrate measured on this device, as stored in the bundle's "
                      "manifest",
}


def check_number(value: Any, name: str) -> float:
    """``value`` as a float (a real number: not a bool, a string or None).

    Raises:
        InputError: not a real number, or an int beyond the float range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int (or Fraction) beyond the float range
        raise InputError(f"{name} must be a finite number, got one beyond the float range") from None


def check_deadline(deadline_ms: Any, margin: Any) -> Tuple[float, float]:
    """``(deadline_ms, margin)`` as floats: a finite number > 0 and a finite number >= 0.

    Raises:
        InputError: either is not such a number (bools and strings refused).
    """
    deadline_ms, margin = check_number(deadline_ms, "deadline_ms"), check_number(margin, "deadline_margin")
    if not (deadline_ms > 0.0) or deadline_ms == float("inf"):
        raise InputError(f"deadline_ms must be a finite number > 0, got {deadline_ms!r}")
    if not (margin >= 0.0) or margin == float("inf"):
        raise InputError(f"deadline margin must be a finite number >= 0, got {margin!r}")
    return deadline_ms, margin


def _check_step_ms(values: Any, name: str) -> Tuple[float, ...]:
    """``values`` (a sequence of per-image ms, one per step) as a tuple of floats."""
    if (isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray))
            or (isinstance(values, np.ndarray) and values.ndim == 0)):  # one number, not one per step
        raise InputError(f"{name} must be a sequence of ms, one number per step, got {values!r}")
    return tuple(check_number(v, f"{name}[{i}]") for i, v in enumerate(values))


def _check_batch_ms(batch: Any, ms: Any, prefix: str, ms_name: str) -> Tuple[int, Tuple[float, ...]]:
    """``(batch, ms)`` checked: a positive int and a sequence of numbers (``prefix`` and
    ``ms_name`` name them in messages)."""
    if batch is None:  # check_batch takes None for "not given"
        raise InputError(f"{prefix}batch must be a positive int, got None")
    return check_batch(batch, f"{prefix}batch"), _check_step_ms(ms, f"{prefix}{ms_name}")


def _check_other(other: Any, ms_name: str) -> Optional[Tuple[int, Tuple[float, ...]]]:
    """:attr:`StepCosts.other` checked: None or ``(batch, ms of each step)``."""
    if other is None:
        return None
    if isinstance(other, (str, bytes)) or not isinstance(other, Sequence) or len(other) != 2:
        raise InputError(f"other must be None or (batch, ms of each step), got {other!r}")
    return _check_batch_ms(other[0], other[1], "other's ", ms_name)


@dataclass(frozen=True)
class StepCosts:
    """Per-image milliseconds of each step (the increment of step k over step k - 1) at one or
    two batch sizes.

    Attributes:
        step_ms: per-image ms of steps 0..T-1 at ``batch``.
        batch: the batch size ``step_ms`` was measured at.
        other: ``(batch, step_ms)`` measured at a larger batch, or None.
        source: where the figures come from: a key of :data:`STEP_COST_SOURCES`, or the
            ``source`` a manifest entry records.
        basis: what the figures are (the statistic and the calls it comes from), or empty.

    Raises:
        InputError: ``step_ms`` (or ``other``'s) is not a sequence of finite numbers >= 0 (bools
            and strings refused), a batch size is not a positive int, or ``other`` is not None
            or ``(batch, step_ms)`` with a larger batch and a cost per step.
    """

    step_ms: Tuple[float, ...]
    batch: int = 1
    other: Optional[Tuple[int, Tuple[float, ...]]] = None
    source: str = "given"
    basis: str = ""

    def __post_init__(self) -> None:
        batch, step_ms = _check_batch_ms(self.batch, self.step_ms, "", "step_ms")
        other = _check_other(self.other, "step_ms")
        object.__setattr__(self, "step_ms", step_ms)
        object.__setattr__(self, "batch", batch)
        object.__setattr__(self, "other", other)
        for name, ms in [("step_ms", step_ms)] + ([("other's step_ms", other[1])] if other else []):
            if not step_ms or any(not (v >= 0.0) or v == float("inf") for v in ms):
                raise InputError(f"step costs must be finite and >= 0 ms, got {name} {list(ms)}")
        if other is not None and (other[0] <= batch or len(other[1]) != len(step_ms)):
            raise InputError("step costs: a second batch size must be larger than the first, with a cost per step")

    @property
    def steps(self) -> int:
        return len(self.step_ms)

    def describe(self) -> str:
        """Where the costs come from and what they are, in words (:data:`STEP_COST_SOURCES`):
        ``the step latency gfnet-edge calibrate measured on this device, ... (p99 of 300 calls
        at batch 1 ...)``."""
        words = STEP_COST_SOURCES.get(self.source, f"step costs from {self.source}")
        return f"{words} ({self.basis})" if self.basis else words

    def call_ms(self, step: int, n: int) -> float:
        """Predicted ms of running ``step`` for ``n`` images in one call."""
        a = self.step_ms[step]
        if self.other is None or n <= self.batch:
            return a * n
        b_batch, b_ms = self.other
        b = b_ms[step]
        if n >= b_batch:
            return b * n
        w = (n - self.batch) / (b_batch - self.batch)  # per-image cost linear in the batch size
        return (a + w * (b - a)) * n

    @classmethod
    def from_cumulative(cls, cumulative_ms: Sequence[float], batch: int = 1,
                        other: Optional[Tuple[int, Sequence[float]]] = None, source: str = "given") -> "StepCosts":
        """From cumulative per-image latency (image exits at step k: ``cumulative_ms[k]``)."""
        def steps(c: Tuple[float, ...]) -> Tuple[float, ...]:
            return tuple(max(c[k] - (c[k - 1] if k else 0.0), 0.0) for k in range(len(c)))

        batch, cumulative = _check_batch_ms(batch, cumulative_ms, "", "cumulative_ms")
        other = _check_other(other, "cumulative_ms")
        return cls(steps(cumulative), batch, None if other is None else (other[0], steps(other[1])), source)

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any], stat: str = DEFAULT_STAT) -> "StepCosts":
        """From a manifest ``step_costs`` entry (written by ``gfnet-edge calibrate``).

        A focus step k costs the ``stat`` of its ``increments`` (the time from the check before
        step k to the next check, or to the end of the call after the last step, in calls that
        run every step: what a call a deadline lets run step k takes until it can stop again),
        never below their mean. Entries without ``increments`` give the increments of the
        cumulative ``stat`` latency, each step never below the increment of the mean (a tail
        percentile need not grow from step to step: a slow outlier in the calls exiting at
        step k can put its p99 above step k + 1's, which would otherwise give step k + 1 a
        cost of 0 and let it run past any deadline); so does step 0 (the glance, which always
        runs). ``source`` is the entry's, ``basis`` names the percentile and the calls it came
        from at each batch size."""
        used, checks = [], []

        def steps(block: Mapping[str, Any]) -> Tuple[float, ...]:
            calls = block.get("step_calls") or ([block["calls"]] if block.get("calls") else [])
            lo, hi = (min(calls), max(calls)) if calls else (0, 0)
            at = f" at batch {block['batch']}" if "batch" in block else ""
            used.append(f"{stat[:-3]}{at}" if not calls else f"{stat[:-3]} of {lo} calls{at}" if lo == hi else
                        f"{stat[:-3]} of {lo}-{hi} calls{at}")
            tail = cls.from_cumulative(block["cumulative"][stat]).step_ms
            mean = cls.from_cumulative(block["cumulative"]["mean_ms"]).step_ms
            if len(tail) != len(mean):
                raise ValueError(f"{stat} has {len(tail)} steps, mean_ms {len(mean)}")
            costs = [max(a, b) for a, b in zip(tail, mean)]
            inc = block.get("increments")
            if inc is not None:  # measured from one step check to the next: the focus steps' own
                inc_tail, inc_mean = inc[stat], inc["mean_ms"]
                if not len(inc_tail) == len(inc_mean) == len(costs):
                    raise ValueError(f"increments have {len(inc_tail)} / {len(inc_mean)} steps, not {len(costs)}")
                costs[1:] = [max(float(a), float(b)) for a, b in zip(inc_tail[1:], inc_mean[1:])]
                checks.append(True)
            return tuple(costs)

        try:
            first = entry["batches"][0]
            other = entry["batches"][1] if len(entry["batches"]) > 1 else None
            first_ms = steps(first)
            other_ms = None if other is None else (int(other["batch"]), steps(other))
            return cls(first_ms, int(first["batch"]), other_ms, source=str(entry.get("source", "bundle manifest")),
                       basis=f"per step, the {' and the '.join(used)}"
                             + ("; focus steps timed from the check before each one to the next check" if checks else ""))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise InputError(f"the bundle's step_costs entry is malformed ({type(exc).__name__}: {exc}); "
                             "re-run gfnet-edge calibrate") from exc


@dataclass
class Deadline:
    """The deadline of one call.

    Args:
        deadline_ms: milliseconds from ``start`` by which the call should return.
        costs: the step cost model.
        margin: every predicted step cost is multiplied by ``1 + margin``.
        clock: seconds, monotonic (default ``time.perf_counter``).
        start: the clock's value when the call began (default: now).
    """

    deadline_ms: float
    costs: StepCosts
    margin: float = 0.0
    clock: Callable[[], float] = time.perf_counter
    start: Optional[float] = None
    #: (step, images, predicted ms, ms left) of each decision, for tests and reports.
    decisions: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.deadline_ms, self.margin = check_deadline(self.deadline_ms, self.margin)
        if self.start is None:
            self.start = self.clock()

    def left_ms(self) -> float:
        return self.deadline_ms - (self.clock() - self.start) * 1e3

    def allows(self, step: int, n: int) -> bool:
        """True when ``step`` for ``n`` images is predicted to end by the deadline."""
        if step >= self.costs.steps:
            return False
        need = self.costs.call_ms(step, n) * (1.0 + self.margin)
        left = self.left_ms()
        self.decisions.append((step, n, need, left))
        return need <= left


class StepTimes:
    """A deadline that lets every step run and notes when each focus step's check comes
    (milliseconds from ``start``): :meth:`Runtime.time_steps <gfnet_edge.runtime.Runtime.time_steps>`.

    Args:
        steps: the model's steps (the loop checks that the cost model has as many).
        clock: seconds (default ``time.perf_counter``).
    """

    def __init__(self, steps: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.costs = StepCosts((0.0,) * steps, source="step times")
        self.clock = clock
        self.start = clock()
        self.marks: list = []

    def elapsed_ms(self) -> float:
        return (self.clock() - self.start) * 1e3

    def allows(self, step: int, n: int) -> bool:
        self.marks.append(self.elapsed_ms())
        return True


def step_costs_entry(latencies: Sequence[Any], backend: str, precision: str, threads: Optional[int],
                     device: str, source: str = CALIBRATE_SOURCE) -> Dict[str, Any]:
    """A manifest ``step_costs`` entry from calibration's per-batch step latencies
    (:class:`calibrate.latency.StepLatency`, smallest batch first)."""
    def per_step(stats: Sequence[Any]) -> Dict[str, list]:  # {stat: [ms of each step]}
        dicts = [s.to_dict() for s in stats]
        return {k: [float(d[k]) for d in dicts] for k in ("mean_ms", "p50_ms", "p95_ms", "p99_ms")}

    batches = []
    for lat in latencies:
        retimed = [int(r) for r in (getattr(lat, "retimed", None) or [0] * len(lat.steps))]
        block = {"batch": int(lat.batch), "calls": min(int(s.n) for s in lat.steps),
                 "step_calls": [int(s.n) for s in lat.steps], "retimed_calls": retimed,
                 "cumulative": per_step(lat.steps)}
        incs = getattr(lat, "increments", None) or []
        if incs:
            block["increments"] = per_step(incs)
            block["increment_calls"] = min(int(s.n) for s in incs)
        batches.append(block)
    return {"backend": backend, "precision": precision, "threads": threads, "device": device,
            "batches": batches, "source": source}


def step_costs_key(backend: str, precision: str) -> str:
    """The manifest key of the step costs a runtime of this backend and precision uses."""
    return f"{backend}/{precision}"
