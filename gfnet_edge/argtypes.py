"""Checked ``argparse`` types for the CLI's numeric options: a value out of range (or NaN, or
infinite) is an argparse error (one line, exit 2) instead of a traceback or a silent NaN later."""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional


def int_range(lo: Optional[int] = None, hi: Optional[int] = None) -> Callable[[str], int]:
    """An ``int`` in ``[lo, hi]`` (either bound optional)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be in [{_bound(lo, '-inf')}, {_bound(hi)}], got {value}")
        return value

    parse.__name__ = "int"
    return parse


def zero_or_int_range(lo: int, hi: Optional[int] = None) -> Callable[[str], int]:
    """``0`` (the feature off) or an ``int`` in ``[lo, hi]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value != 0 and (value < lo or (hi is not None and value > hi)):
            raise argparse.ArgumentTypeError(f"must be 0 or in [{lo}, {_bound(hi)}], got {value}")
        return value

    parse.__name__ = "int"
    return parse


def float_range(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[str], float]:
    """A finite ``float`` in ``[lo, hi]`` (``(lo`` / ``hi)`` with ``lo_open`` / ``hi_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = not math.isfinite(value)
        if lo is not None:
            bad = bad or value < lo or (lo_open and value == lo)
        if hi is not None:
            bad = bad or value > hi or (hi_open and value == hi)
        if bad:
            interval = f"{'(' if lo_open else '['}{_bound(lo, '-inf')}, {_bound(hi)}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text!r}")
        return value

    parse.__name__ = "float"
    return parse


def _bound(v, infinity: str = "inf") -> str:
    return infinity if v is None else str(v)


#: Most CPU threads any option, the runtime or the extension's pool takes.
MAX_THREADS = 1024
#: A count of threads: 1 .. MAX_THREADS.
THREADS = int_range(1, MAX_THREADS)
#: A positive count (images, repeats ...).
POSITIVE = int_range(1, 1 << 31)
#: A count that may be zero.
NON_NEGATIVE = int_range(0, 1 << 31)
#: A random seed: 0 .. 2**32 - 1.
SEED = int_range(0, (1 << 32) - 1)
