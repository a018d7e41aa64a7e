"""Per-stage timing of the runtime (pre-process, glance, policy, crop, focus, heads, exit; the
host loop does heads, exit test, policy and crop in one native call, stage ``step``, and reports
those four parts of it too, timed inside the call)."""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import nullcontext
from typing import ContextManager, Deque, Dict, List

import numpy as np

STAGES = ("preprocess", "glance", "policy", "crop", "focus", "heads", "exit", "step")
#: The stages that run a backbone graph; everything else is work outside them.
BACKBONE_STAGES = ("glance", "focus")
#: The parts of the host loop's native ``step`` call, timed inside it while profiling.
HOST_STEP_PARTS = ("heads", "exit", "policy", "crop")
_NO_OP = nullcontext()  # reusable and reentrant
#: Durations kept per stage for the percentiles: a profiler left on for hours (a video stream,
#: ~15 durations per batch-1 call) keeps about 0.5 MB per stage.
MAX_SAMPLES = 1 << 14


class Profiler:
    """Collects wall-clock durations (seconds) per stage; thread-safe; off by default.

    Memory is bounded however long it runs: a stage's count and total cover every duration,
    its percentiles the latest :data:`MAX_SAMPLES` (``max_samples``).
    """

    def __init__(self, enabled: bool = False, max_samples: int = MAX_SAMPLES) -> None:
        self.enabled = enabled
        self.max_samples = max_samples
        self._lock = threading.Lock()
        self._samples: Dict[str, Deque[float]] = {}
        self._totals: Dict[str, List[float]] = {}  # stage -> [count, total seconds]
        self._calls: Deque[float] = deque(maxlen=max_samples)
        self._call_total = [0, 0.0]

    def stage(self, name: str) -> ContextManager[None]:
        """Times the ``with`` block as stage ``name`` (a shared no-op when disabled). The loop
        enters ~8 stages per image, so the timer is a plain object with ``__slots__`` rather
        than a generator-based context manager, which costs several times more per entry."""
        if not self.enabled:
            return _NO_OP
        return _Timer(self, name)

    def record(self, name: str, seconds: float) -> None:
        """Adds one duration of stage ``name`` (timed elsewhere, e.g. inside the extension)."""
        with self._lock:
            samples = self._samples.get(name)
            if samples is None:
                samples = self._samples[name] = deque(maxlen=self.max_samples)
                self._totals[name] = [0, 0.0]
            samples.append(seconds)
            total = self._totals[name]
            total[0] += 1
            total[1] += seconds

    def add_call(self, seconds: float, images: int) -> None:
        if self.enabled:
            with self._lock:
                self._calls.append(seconds / max(images, 1))
                self._call_total[0] += 1
                self._call_total[1] += seconds / max(images, 1)

    def reset(self) -> None:
        with self._lock:
            self._samples.clear()
            self._totals.clear()
            self._calls.clear()
            self._call_total = [0, 0.0]

    def summary(self) -> Dict[str, Dict[str, float]]:
        """``{stage: {count, total_ms, mean_ms, p50_ms, p95_ms, p99_ms}}`` plus ``per_image``
        (count, total and mean of every duration; percentiles of the latest ``max_samples``)."""
        out: Dict[str, Dict[str, float]] = {}
        with self._lock:
            items = {k: (list(v), tuple(self._totals[k])) for k, v in self._samples.items()}
            calls = (list(self._calls), tuple(self._call_total))
        for name in list(STAGES) + sorted(set(items) - set(STAGES)):
            if name in items and items[name][0]:
                out[name] = _stats(*items[name])
        if calls[0]:
            out["per_image"] = _stats(*calls)
        return out


class _Timer:
    """``with`` block timer of one stage entry (see :meth:`Profiler.stage`)."""

    __slots__ = ("prof", "name", "t0")

    def __init__(self, prof: Profiler, name: str) -> None:
        self.prof, self.name = prof, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.prof.record(self.name, time.perf_counter() - self.t0)


def backbone_ms(summary: Dict[str, Dict[str, float]]) -> float:
    """Total milliseconds of the backbone stages in a :meth:`Profiler.summary`."""
    return sum(summary[k]["total_ms"] for k in BACKBONE_STAGES if k in summary)


def _stats(xs: List[float], totals: tuple) -> Dict[str, float]:
    a = np.asarray(xs) * 1e3
    count, total_ms = int(totals[0]), float(totals[1]) * 1e3
    return {
        "count": count, "total_ms": total_ms, "mean_ms": total_ms / count,
        "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
        "p99_ms": float(np.percentile(a, 99)),
    }
