"""Options of one calibration run (the ``gfnet-edge calibrate`` flags as a dataclass)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np

from gfnet_edge.errors import InputError

from .budgets import Budget, BudgetKind

#: ``--default auto``: the budget the report suggests becomes the bundle's default.
AUTO_DEFAULT = "auto"
from .fit import MAX_MARGIN, METHODS
from .latency import CLOCKS, EXTEND_SECONDS, WARMUP_MS


def _in_range(x, hi: float) -> bool:
    """Whether ``x`` is a real number (not a bool) in ``[0, hi)``."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and 0.0 <= x < hi


@dataclass
class CalibrationConfig:
    """Options of one calibration (the CLI's flags).

    Attributes:
        bundle: bundle directory.
        data: ``demo``, a folder with class subfolders, or an ``.npz`` with labels.
        output: report directory (written atomically).
        budgets_ms: mean per-image latency budgets (ms).
        budgets: budgets of any kind (:class:`~calibrate.budgets.Budget`: ``p95:1.2``, ``mean:2``);
            with ``budgets_ms`` empty too: three mean budgets spread between the glance's and the
            full model's latency.
        backend, precision, threads, dla_core, head_dtype: how the runtime runs (as ``Runtime``).
        device: where the torch backend runs (``cpu`` / ``cuda``; ``None``: the CPU); the static
            baseline runs there too.
        batch: images per ``predict`` call for which budgets are fitted and verified.
        batch_size: a second batch size whose step latency is measured (throughput; 0: none).
        num_images: calibration images used (``demo``: how many are generated).
        holdout: held-out fraction.
        skip_unreadable: leave out image files of a ``data`` folder that cannot be read
            (each named in a warning) instead of stopping at the first.
        method: ``search`` or ``reference`` threshold fitting (:data:`calibrate.fit.METHODS`).
        margin: safety margin of the fit (fraction of the budget, in ``[0, 0.5)``).
        tolerance: (below, above) fractions of the budget, each in ``[0, 1)``: the measured
            statistic (mean or percentile) must lie in ``[budget * (1 - below), budget * (1 + above)]``.
        attempts: fit/verify rounds per budget (a later round re-measures the step latency and
            refits when the previous round's measured latency was outside the tolerance).
        repeats, warmup: timed and untimed calls per step for the latency measurement.
        latency_calls: the first measurement at each batch size (the one the budgets start from
            and the manifest's ``step_costs`` come from) takes more timed calls per step, up to
            this many, while its timed calls stay within ``latency_seconds``: a deadline plans
            with their p99, which from ``repeats`` calls is about the slowest one (0: only
            ``repeats``, and no step timed again for a lone stall).
        latency_seconds: the time box (wall-clock seconds) of those timed calls: first a step
            whose p99 takes in one or two stalls of the device is timed alone until they lie
            beyond it, then all steps up to ``latency_calls``.
        warmup_ms: untimed calls before each measurement go on until this much wall-clock time
            has passed (devices settle in time, not in calls).
        static: static baselines (checkpoint or ONNX), optional.
        static_int8: also quantize each static baseline to INT8 (ONNX Runtime, CPU profile).
        compare_precisions: trace the other precisions of the bundle.
        write_manifest: store the budgets in the bundle's manifest.
        default: make this budget (a name or a ms value) the bundle's default.
        force: replace an existing report directory.
        gallery: number of gallery images.
        deadlines: deadlines of the report's deadline sweep (0: no sweep).
        seed: split seed.
        clock: ``wall`` (wall-clock latency) or ``cpu`` (CPU time of the calling thread; needs
            ``threads=1``; for shared machines whose other load would distort wall-clock times).
        progress: show progress bars.
    """

    bundle: str
    data: str
    output: str
    budgets_ms: Sequence[float] = ()
    budgets: Sequence[Budget] = ()
    backend: str = "auto"
    precision: str = "auto"
    threads: Optional[int] = None
    dla_core: Optional[int] = None
    head_dtype: str = "float32"
    device: Optional[str] = None
    batch: int = 1
    batch_size: int = 8
    num_images: Optional[int] = None
    holdout: float = 0.5
    skip_unreadable: bool = False
    method: str = "search"
    margin: float = 0.03
    tolerance: Tuple[float, float] = (0.10, 0.05)
    attempts: int = 3
    repeats: int = 60
    latency_calls: int = 300
    latency_seconds: float = EXTEND_SECONDS
    warmup: int = 5
    warmup_ms: float = WARMUP_MS
    static: Sequence[str] = ()
    static_int8: bool = False
    compare_precisions: bool = True
    write_manifest: bool = True
    default: Optional[str] = None
    force: bool = False
    gallery: int = 12
    deadlines: int = 6
    seed: int = 0
    clock: str = "wall"
    progress: bool = True
    argv: List[str] = field(default_factory=list)

    def validate(self) -> "CalibrationConfig":
        if self.batch < 1:
            raise InputError(f"--batch must be >= 1, got {self.batch}")
        if self.batch_size < 0:
            raise InputError(f"--batch-size must be >= 0, got {self.batch_size}")
        if self.latency_calls < 0:
            raise InputError(f"--latency-calls must be >= 0, got {self.latency_calls}")
        if not np.isfinite(self.latency_seconds) or self.latency_seconds <= 0:
            raise InputError(f"--latency-seconds must be a finite number of seconds > 0, got {self.latency_seconds}")
        if self.repeats < 5 or self.warmup < 0:
            raise InputError(f"--repeats must be >= 5 and --warmup >= 0 (got {self.repeats}, {self.warmup})")
        if not np.isfinite(self.warmup_ms) or self.warmup_ms < 0:
            raise InputError(f"--warmup-ms must be a non-negative number of milliseconds, got {self.warmup_ms}")
        if self.deadlines < 0:
            raise InputError(f"--deadlines must be >= 0, got {self.deadlines}")
        if self.attempts < 1:
            raise InputError(f"--attempts must be >= 1, got {self.attempts}")
        if self.method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not _in_range(self.margin, MAX_MARGIN):
            raise InputError(f"--margin must be a fraction of the budget in [0, {MAX_MARGIN:g}), got {self.margin!r}")
        tol = tuple(self.tolerance) if isinstance(self.tolerance, (tuple, list)) else ()
        if len(tol) != 2 or not all(_in_range(x, 1.0) for x in tol):
            raise InputError("--tolerance must be BELOW,ABOVE: two fractions of the budget in [0, 1), e.g. 0.10,0.05; "
                             f"got {self.tolerance!r}")
        for b in self.budgets_ms:
            if not np.isfinite(b) or b <= 0:
                raise InputError(f"--budget-ms values must be positive milliseconds, got {b}")
        names = [b.name for b in self.given_budgets()]
        if len(set(names)) != len(names):
            raise InputError(f"--budget-ms / --budget have duplicates: {', '.join(names)}")
        if self.default == AUTO_DEFAULT:  # the suggested budget, known once the budgets are verified
            pass
        elif names:  # a --default that is none of the budgets asked for fails before any measurement
            self.default_name(names)
        elif self.default is not None and not self._names_a_mean_budget(self.default):
            raise InputError(f"--default {self.default!r} can name none of the budgets this run calibrates: without "
                             "--budget-ms / --budget they are mean budgets chosen from the measured latency, named "
                             "ms-MS (give ms-MS, MS or mean:MS, or the budgets themselves)")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be >= 1, got {self.threads}")
        if self.device not in (None, "cpu", "cuda"):
            raise InputError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.clock not in CLOCKS:
            raise InputError(f"--clock must be one of {', '.join(CLOCKS)}, got {self.clock!r}")
        if self.clock == "cpu" and self.threads != 1:
            raise InputError("--clock cpu measures the calling thread only: use it with --threads 1")
        return self

    def quick(self) -> "CalibrationConfig":
        """The same options with half the timed calls (at least 10): for re-measurements."""
        return replace(self, repeats=max(10, self.repeats // 2))

    @staticmethod
    def _names_a_mean_budget(text: str) -> bool:
        """Whether ``text`` can mean a mean budget (``ms-3.0``, ``3.0`` or ``mean:3.0``)."""
        text = str(text).strip()
        try:
            return Budget.parse(text[3:] if text.startswith("ms-") else text).kind is BudgetKind.MEAN
        except InputError:
            return False

    def default_name(self, names: Sequence[str]) -> Optional[str]:
        """The budget of ``names`` that ``default`` means (a name, a number of ms for a mean budget,
        or ``KIND:MS``); ``None`` without a default, or for ``auto`` (the suggested budget, chosen
        once the budgets are verified). Raises ``InputError`` when it is none of them."""
        if self.default is None or self.default == AUTO_DEFAULT:
            return None
        d = self.default
        if d in names:
            return d
        try:
            n = Budget.parse(d).name
        except InputError:
            n = d
        if n in names:
            return n
        raise InputError(f"--default {d!r} is not one of the calibrated budgets ({', '.join(names)})")

    def given_budgets(self) -> List[Budget]:
        """The budgets asked for: ``budgets_ms`` as mean budgets, then ``budgets``."""
        return [Budget.mean(b) for b in self.budgets_ms] + [b if isinstance(b, Budget) else Budget.parse(str(b))
                                                           for b in self.budgets]

    def timed_calls(self) -> int:
        """Timed calls per step of the step-latency measurement: ``repeats``, raised with tail
        budgets to ``10 / (1 - q)`` (200 for p95, 1000 for p99), so that the share of a step's
        timings above a limit is estimated from at least ten timings at the allowed share."""
        tails = [b.kind.quantile for b in self.given_budgets() if b.kind.is_tail]
        return max([self.repeats] + [int(np.ceil(10.0 / (1.0 - q) - 1e-9)) for q in tails])
