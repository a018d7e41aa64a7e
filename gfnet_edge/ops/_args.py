"""Conversion of Python arguments into what the extension takes.

The extension (``csrc/bindings``) is the one layer that validates arrays: dtypes, shapes,
contiguity, value ranges and sizes. What stays here is what only Python can do: turning
numbers, sequences, weights given as any array-like, and buffer / stream objects into the
plain ints, floats, lists and float32 arrays the extension takes.
"""
from __future__ import annotations

import enum
import math
import numbers
from typing import Any, Optional, Tuple

import numpy as np


class Device(str, enum.Enum):
    """Where a head's weights live and its kernels run."""

    CPU = "cpu"
    CUDA = "cuda"

    @classmethod
    def parse(cls, value: Any) -> "Device":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"device must be one of {', '.join(repr(d.value) for d in cls)}, "
                             f"got {value!r}") from None


#: Largest image side, patch side or coordinate the kernels take (they compute in int32).
INT32_MAX = 2 ** 31 - 1


def to_int(value: Any, name: str, minimum: Optional[int] = 1, maximum: Optional[int] = None) -> int:
    """An int in [``minimum``, ``maximum``] (TypeError for a non-integer, ValueError outside the
    range; no lower check with ``minimum=None``, where the extension checks the value)."""
    if type(value) is int and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return value  # the common case, without the ABC check
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def choice(value: Any, name: str, choices: Tuple[str, ...]) -> str:
    """One of ``choices`` (for arguments the extension does not parse itself)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def triple(value: Any, name: str) -> list:
    """Three finite floats as a list (the mean / std of a normalisation)."""
    try:
        vals = [float(v) for v in value]
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of 3 numbers") from exc
    if len(vals) != 3:
        raise ValueError(f"{name} must have 3 values, got {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{name} must be finite")
    return vals


def ndarray(value: Any, name: str) -> np.ndarray:
    """``value`` itself when it is a numpy array (where Python needs its dtype or shape)."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(value).__name__}")
    return value


def weights(value: Any, name: str, ndim: int) -> np.ndarray:
    """Converts weights (any real array-like) once to contiguous, finite float32."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return arr


def opt_weights(value: Any, name: str, ndim: int) -> Optional[np.ndarray]:
    return None if value is None else weights(value, name, ndim)


def rows(x: Any) -> Any:
    """A 1-D vector promoted to one row; anything else is passed on for the extension to check."""
    if isinstance(x, np.ndarray) and x.ndim == 1:
        return x.reshape(1, -1)
    return x


def batch(x: Any, name: str, width: int) -> np.ndarray:
    """A float32 (N, width) C-contiguous batch for the device heads' numpy convenience path
    (device kernels take pointers, so the shape is checked here); 1-D is promoted to N = 1."""
    x = ndarray(x, name)
    if x.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype}")
    x = rows(x)
    if x.ndim != 2 or x.shape[1] != width or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, {width}), got {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray)")
    return x
