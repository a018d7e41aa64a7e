"""INT8 post-training quantization of GFNet backbone graphs (``gfnet_edge.quantize``).

Built on ONNX Runtime's quantization tooling (calibrators, QDQ insertion); adds what GFNet and
TensorRT need: calibration on glance inputs and on patches at the policy's own locations, the
``tensorrt`` / ``cpu`` profiles (:class:`Profile` objects in :data:`PROFILES`), accuracy-driven
mixed precision scored through the real runtime, and a static TensorRT-compatibility checker run
on every graph written.

Example::

    from gfnet_edge.quantize import (QuantizeOptions, quantize_model, QuantCalibrationSet,
                                     load_calibration_images, check_tensorrt_compat)
    images = load_calibration_images("demo", model, 256)   # the model: its demo data config
    calib = QuantCalibrationSet.from_model(model, images)
    res = quantize_model(model, {"glance": "glance.onnx", "focus": "focus.onnx"}, "heads.npz",
                         calib, "out/int8-tensorrt", QuantizeOptions(profile="tensorrt"))
    assert check_tensorrt_compat(res.graphs["focus"]) == []

Importing this package needs numpy only; ONNX / ONNX Runtime / torch load when used.
"""
from __future__ import annotations

from .calibration import MIN_CALIB_IMAGES, QuantCalibrationSet, GraphDataReader, check_images, load_calibration_images
from .checker import TensorRTCompatError, assert_tensorrt_compat, check_tensorrt_compat
from .options import METHODS, QuantizeOptions, ort_settings
from .profiles import PROFILES, CalibMethod, Profile, get_profile

__all__ = [
    "CalibMethod", "QuantCalibrationSet", "GraphDataReader", "MIN_CALIB_IMAGES", "METHODS", "PROFILES", "Profile",
    "QuantizeOptions", "get_profile",
    "QuantizationResult", "TensorRTCompatError", "assert_tensorrt_compat", "check_images",
    "check_tensorrt_compat", "load_calibration_images", "ort_settings", "quantize_model",
]


def __getattr__(name: str):
    if name in ("quantize_model", "QuantizationResult"):
        from . import core

        return getattr(core, name)
    raise AttributeError(f"module 'gfnet_edge.quantize' has no attribute {name!r}")
