"""The native extension ``gfnet_edge._C``, imported once for the ``ops`` package."""
from __future__ import annotations

try:
    from .. import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "gfnet_edge._C (the native extension) is not built: run `pip install -e .` "
        f"in the repository ({exc})"
    ) from exc

__all__ = ["_C"]
