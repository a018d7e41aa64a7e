"""gfnet-edge: deploy Glance-and-Focus Networks on small GPUs and CPUs.

The public API is imported lazily so that the device side (``Runtime``) never pulls in torch:

* :func:`load_checkpoint`, :func:`save_checkpoint` (build side, need torch)
* :class:`Runtime` (device side: numpy + ONNX Runtime / TensorRT)
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_checkpoint": ("gfnet_edge.models.checkpoint", "load_checkpoint"),
    "save_checkpoint": ("gfnet_edge.models.checkpoint", "save_checkpoint"),
    "CheckpointError": ("gfnet_edge.models.checkpoint", "CheckpointError"),
    "GFNet": ("gfnet_edge.models.gfnet", "GFNet"),
    "Runtime": ("gfnet_edge.runtime", "Runtime"),
}

__all__ = ["__version__", *_LAZY]


def _map_checkout_packages() -> None:
    """Run from a source checkout that is not installed (``python3 -m gfnet_edge`` or pytest in
    the checkout, a GPU machine that only builds the extension in place), ``calibrate/`` and
    ``quantize/`` beside this package are ``gfnet_edge.calibrate`` / ``gfnet_edge.quantize``, as
    setup.py's ``package_dir`` maps them in an installed copy: a finder that knows those two
    names only, consulted first (an editable install of another checkout must not supply them)."""
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    dirs = {f"{__name__}.{p}": root / p for p in ("calibrate", "quantize")}
    if not (root / "setup.py").is_file() or not all((d / "__init__.py").is_file() for d in dirs.values()):
        return

    class CheckoutFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            d = dirs.get(name)
            return None if d is None else importlib.util.spec_from_file_location(
                name, d / "__init__.py", submodule_search_locations=[str(d)])

    if not any(type(f).__name__ == "CheckoutFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, CheckoutFinder())


_map_checkout_packages()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'gfnet_edge' has no attribute {name!r}")
