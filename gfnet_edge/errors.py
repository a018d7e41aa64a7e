"""Errors the CLI turns into a clear message and a non-zero exit."""
from __future__ import annotations


class GFNetEdgeError(Exception):
    """Base class of user-facing errors (bad input, unmet requirement)."""


class InputError(GFNetEdgeError, ValueError):
    """Bad input: file, shape, value or option."""


class UnavailableError(GFNetEdgeError, RuntimeError):
    """A requirement is missing here (TensorRT, a GPU, torch) with a hint how to proceed."""
