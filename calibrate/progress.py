"""Progress bars of the long calibration stages (tqdm on stderr, or nothing)."""
from __future__ import annotations

import sys


class Progress:
    """A tqdm bar (or nothing) with an ``update`` that accepts counts."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="call", leave=False, file=sys.stderr, dynamic_ncols=True)

    def __call__(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
