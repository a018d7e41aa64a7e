"""Data for gfnet-edge: the cluttered-digits demo task and a generic image loader.

Names are imported when first used, so that the device side (``gfnet_edge.data.images``: numpy
and Pillow) never loads the demo task's generator, which needs scipy and scikit-learn.
"""
from __future__ import annotations

from typing import Any

_CLUTTERED = ("ClutteredDigits", "ClutteredDigitsConfig", "config_from_dict", "demo_config", "digit_crops",
              "load_digit_source", "normalize", "render_sample", "split_pool")
_IMAGES = ("iter_image_batches", "load_images")

__all__ = sorted(_CLUTTERED + _IMAGES)


def __getattr__(name: str) -> Any:
    import importlib

    if name in _CLUTTERED:
        return getattr(importlib.import_module("gfnet_edge.data.cluttered_digits"), name)
    if name in _IMAGES:
        return getattr(importlib.import_module("gfnet_edge.data.images"), name)
    raise AttributeError(f"module 'gfnet_edge.data' has no attribute {name!r}")
