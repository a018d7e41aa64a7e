"""Budget kinds: a limit on the mean or on a percentile (the tail) of per-image latency.

``--budget-ms 1.2`` (or ``--budget mean:1.2`` / ``--budget 1.2``) bounds the *mean* latency per
image; ``--budget p95:1.2`` bounds its 95th percentile: at most 5 % of the held-out images may
take longer than 1.2 ms. That is the one definition of a percentile here (:func:`tail_quantile`):
the fit, its feasibility check, the exit-step model and the verification all use it. Every
budget is stored in the bundle's manifest under its name (``ms-1.2``, ``p95-1.2``) with the
thresholds the runtime selects by that name.
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
        """This statistic of per-image latencies ``ms``: the mean, or :func:`tail_quantile` (the
        smallest of them with at most ``1 - quantile`` of them above it)."""
        a = np.asarray(ms, dtype=np.float64)
        return float(a.mean()) if self is BudgetKind.MEAN else tail_quantile([a], self.quantile)


#: Slack on the allowed share above the limit: float rounding of ``1 - quantile`` only (0.05 is
#: stored as 0.05000000000000004), far below one image in ``1 / TAIL_SLACK`` images.
TAIL_SLACK = 1e-9


def tail_quantile(samples: Sequence[Sequence[float]], quantile: float,
                  fractions: Optional[Sequence[float]] = None) -> float:
    """The ``quantile`` of per-image latency as a tail budget defines it: the smallest measured
    value ``L`` with at most a share ``1 - quantile`` of the images slower than ``L`` (strictly
    above it; ties at ``L`` count as meeting it).

    With ``fractions``, a share ``fractions[k]`` of the images exits at step ``k`` and each step's
    latency is distributed as its measurements ``samples[k]``: the share slower than ``L`` is
    ``sum_k fractions[k] * e_k(L)`` with ``e_k(L)`` the share of ``samples[k]`` above ``L``, as the
    tail fit (:mod:`calibrate.tail`) computes it. Without, ``samples`` holds one set of per-image
    latencies (``[ms]``). For ``n`` latencies this is the ``ceil(quantile * n)``-th smallest.

    Raises:
        ValueError: no measurement, or fractions that do not match ``samples`` or sum to zero.
    """
    s = [np.sort(np.asarray(x, dtype=np.float64).reshape(-1)) for x in samples]
    f = np.ones(len(s)) if fractions is None else np.asarray(fractions, dtype=np.float64).reshape(-1)
    if f.size != len(s) or not s or any(x.size == 0 for x in s) or not f.sum() > 0:
        raise ValueError("tail_quantile needs non-empty samples and as many fractions, summing to more than 0")
    f = f / f.sum()
    values = np.unique(np.concatenate(s))
    above = np.zeros(values.size)
    for fk, x in zip(f, s):
        if fk > 0:
            above += fk * ((x.size - np.searchsorted(x, values, side="right")) / x.size)
    # ``above`` falls with the value and is 0 at the largest one, so a first index always exists
    return float(values[int(np.argmax(above <= (1.0 - float(quantile)) + TAIL_SLACK))])


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


__all__ = ["TAIL_SLACK", "Budget", "BudgetKind", "parse_budget_arg", "tail_quantile"]
