"""Budget kinds: a limit on the mean or on a percentile (the tail) of per-image latency.

``--budget-ms 1.2`` (or ``--budget mean:1.2`` / ``--budget 1.2``) bounds the *mean* latency per
image; ``--budget p95:1.2`` bounds its 95th percentile: at most 5 % of the held-out images may
take longer than 1.2 ms. Every budget is stored in the bundle's manifest under its name
(``ms-1.2``, ``p95-1.2``) with the thresholds the runtime selects by that name.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from gfnet_edge.errors import InputError


class BudgetKind(enum.Enum):
    """What a budget bounds: the mean or a percentile of the per-image latency."""

    MEAN = "mean"
    P90 = "p90"
    P95 = "p95"
    P99 = "p99"

    @property
    def quantile(self) -> Optional[float]:
        """The bounded quantile (0.95 for ``p95``), or None for the mean."""
        return None if self is BudgetKind.MEAN else int(self.value[1:]) / 100.0

    @property
    def is_tail(self) -> bool:
        return self is not BudgetKind.MEAN

    def statistic(self, ms: Sequence[float]) -> float:
        """This statistic of per-image latencies ``ms`` (mean, or the percentile)."""
        a = np.asarray(ms, dtype=np.float64)
        return float(a.mean()) if self is BudgetKind.MEAN else float(np.percentile(a, 100.0 * self.quantile))


def _num(b: float) -> str:
    return f"{b:.1f}" if abs(round(b, 1) - b) < 1e-9 else f"{b:g}"


@dataclass(frozen=True)
class Budget:
    """A latency budget: ``kind`` of the per-image latency must not exceed ``ms``.

    Attributes:
        kind: mean or a percentile.
        ms: the limit, milliseconds per image.
    """

    kind: BudgetKind
    ms: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ms) and self.ms > 0):
            raise InputError(f"a budget must be a positive number of milliseconds, got {self.ms}")

    @property
    def name(self) -> str:
        """Manifest name: ``ms-3.0`` for a mean budget, ``p95-1.2`` for a tail budget."""
        return f"{'ms' if self.kind is BudgetKind.MEAN else self.kind.value}-{_num(float(self.ms))}"

    @property
    def label(self) -> str:
        """Words for tables and messages: ``mean <= 3.00 ms``, ``p95 <= 1.20 ms``."""
        return f"{self.kind.value} <= {self.ms:.2f} ms"

    @classmethod
    def mean(cls, ms: float) -> "Budget":
        return cls(BudgetKind.MEAN, float(ms))

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """``KIND:MS`` (``p95:1.2``, ``p99:2``, ``mean:1.5``) or ``MS`` (a mean budget).

        Raises:
            InputError: an unknown kind or a value that is not a positive number.
        """
        kinds = ", ".join(k.value for k in BudgetKind)
        kind_s, _, ms_s = str(text).strip().rpartition(":")
        try:
            kind = BudgetKind(kind_s.lower() or "mean")
        except ValueError:
            raise InputError(f"budget {text!r}: unknown kind {kind_s!r}; use KIND:MS with KIND one of {kinds}, "
                             "e.g. p95:1.2") from None
        try:
            ms = float(ms_s)
        except ValueError:
            raise InputError(f"budget {text!r}: {ms_s!r} is not a number of milliseconds (e.g. p95:1.2)") from None
        if not (math.isfinite(ms) and ms > 0):
            raise InputError(f"budget {text!r}: the limit must be a positive number of milliseconds")
        return cls(kind, ms)


def parse_budget_arg(text: str) -> Budget:
    """argparse ``type`` of ``--budget`` (an :class:`InputError` becomes a usage error)."""
    import argparse

    try:
        return Budget.parse(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


__all__ = ["Budget", "BudgetKind", "parse_budget_arg"]
