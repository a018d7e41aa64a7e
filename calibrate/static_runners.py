"""Which technology runs a calibration's static baseline, and the classifier that runs it.

The static baseline runs like the GFNet bundle it is compared with (:class:`StaticPlan`):

* ONNX Runtime bundle: the static ONNX graph on ONNX Runtime (CPU), as the float baseline
  (and its INT8 copy for an INT8 GFNet or ``--static-int8``);
* torch bundle: the static network as a torch module on the runtime's device (the static
  checkpoint, or an ONNX graph converted with onnx2torch), in the runtime's precision, uint8
  frames normalised on the device, each call one CUDA graph per batch bucket where the GFNet
  loop is captured;
* TensorRT bundle: an engine built from the static ONNX graph with the precision and builder
  options of the bundle's engines, pre-processing and ``enqueueV3`` captured per batch bucket
  where the GFNet loop is (an INT8 engine is built from a Q/DQ copy made with the ``tensorrt``
  quantization profile).

:func:`check_static_sources` refuses, before any measurement, a source the plan cannot run
(one line saying why and what to pass instead).
"""
from __future__ import annotations

import enum
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from gfnet_edge.errors import InputError, UnavailableError
from gfnet_edge.log import logger
from gfnet_edge.runtime.backends.classifier import (Classifier, NumericPrecision, OnnxRuntimeClassifier, Technology,
                                                    TorchClassifier, gfnet_technology, onnx_to_torch,
                                                    static_technology)

from .report import format_technology_line

#: Batches the accuracy pass runs at (its last call may be smaller); engines are built for them.
ACCURACY_BATCH = 32


class SourceKind(str, enum.Enum):
    """What a ``--static`` file is."""

    ONNX = "onnx"
    CHECKPOINT = "checkpoint"

    @classmethod
    def of(cls, path: Path) -> "SourceKind":
        return cls.ONNX if Path(path).suffix.lower() == ".onnx" else cls.CHECKPOINT


@dataclass(frozen=True)
class StaticPlan:
    """How each side of the comparison runs.

    Attributes:
        gfnet: the GFNet runtime's technology.
        static: the static baseline's (same backend, place, precision and capture).
        engine: TensorRT: the bundle's engine entry (precision, builder options).
    """

    gfnet: Technology
    static: Technology
    engine: Optional[Dict[str, Any]] = field(default=None, compare=False)

    @classmethod
    def of_runtime(cls, rt: Any) -> "StaticPlan":
        """The plan for an open :class:`~gfnet_edge.runtime.Runtime`."""
        gfnet = gfnet_technology(rt)
        entry = getattr(rt.runner, "entry", None) if gfnet.backend == "tensorrt" else None
        return cls(gfnet, static_technology(gfnet), entry)

    @classmethod
    def host(cls) -> "StaticPlan":
        """ONNX Runtime on the CPU for both sides (no runtime given)."""
        t = Technology("onnxruntime", "cpu", "fp32")
        return cls(t, t)

    def describe(self) -> str:
        """The report's technology line (:func:`~calibrate.report.format_technology_line`)."""
        return format_technology_line(self.gfnet.describe(), [self.static.describe()])

    def to_dict(self) -> Dict[str, Any]:
        return {"gfnet": self.gfnet.to_dict(), "static": self.static.to_dict(), "description": self.describe()}


def _have(*modules: str) -> Optional[str]:
    """The first of ``modules`` that is not installed, else None."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            return m
    return None


def check_static_sources(sources: Sequence[str], plan: StaticPlan, convert: bool = True) -> None:
    """Refuses, with one line, a ``--static`` file that is missing or that the plan's backend
    cannot run here (``convert``: also try converting an ONNX graph for the torch backend, so
    that one onnx2torch cannot convert is refused before anything is measured).

    Raises:
        InputError: a missing file.
        UnavailableError: a conversion the backend needs is not installed.
    """
    backend = plan.static.backend
    for src in sources:
        p = Path(src)
        if not p.is_file():
            raise InputError(f"--static {src}: no such file (give a static checkpoint .pth.tar or an .onnx graph)")
        kind = SourceKind.of(p)
        if kind is SourceKind.CHECKPOINT:
            missing = _have("torch", "timm")
            if missing:
                why = ("to export it to ONNX for the TensorRT engine" if backend == "tensorrt"
                       else "to run it" if backend == "torch" else "to export it to ONNX")
                raise UnavailableError(f"--static {src}: a static checkpoint needs {missing} {why}, which is not "
                                       "installed here; export it elsewhere and pass the ONNX graph "
                                       "(--static MODEL.onnx)")
        elif backend == "torch":
            if _have("onnx2torch"):
                raise UnavailableError(f"--static {src}: the torch backend runs the static baseline as a torch "
                                       "module; converting an ONNX graph needs onnx2torch (pip install onnx2torch), "
                                       "or pass the static checkpoint (.pth.tar)")
            if not convert:
                continue
            try:
                onnx_to_torch(p)  # a graph onnx2torch cannot convert is refused now, not after the measurements
            except InputError as exc:
                raise InputError(f"--static {exc}") from exc


def _quantize_for_tensorrt(onnx_path: Path, dst: Path, calib: np.ndarray) -> Path:
    """A Q/DQ INT8 copy of the static graph for TensorRT (the ``tensorrt`` quantization
    profile, its default calibration method)."""
    from gfnet_edge.quantize.options import QuantizeOptions, ort_settings

    from .static import quantize_static_int8

    opts = QuantizeOptions(profile="tensorrt")
    return quantize_static_int8(onnx_path, dst, calib, settings=ort_settings(opts), method=opts.spec.auto_method)


def open_classifier(plan: StaticPlan, source: Path, onnx_path: Callable[[], Path], model: Any,
                    threads: Optional[int], work: Path, batch: int, precision: Optional[str] = None,
                    calib: Optional[Callable[[], np.ndarray]] = None, network: Any = None) -> Classifier:
    """The classifier of one static source with the plan's static technology.

    Args:
        plan: the comparison's plan.
        source: the ``--static`` file.
        onnx_path: the source as an ONNX graph (exported on the first call for a checkpoint).
        model: the GFNet's description.
        threads: CPU threads.
        work: a scratch directory (engines are built there).
        batch: the calibration batch (the engine profile is tuned for it).
        precision: run at this precision instead of the plan's (the extra INT8 baseline).
        calib: normalised calibration images (N, 3, S, S) for an INT8 graph or engine.
        network: a static checkpoint's network already read (the torch backend runs it, converted
            in place to the technology's precision and device); ``None``: read ``source`` here.
    """
    tech = plan.static
    if precision is not None:
        tech = Technology(tech.backend, tech.device, NumericPrecision(precision).value, tech.captured)
    if tech.backend == "onnxruntime":
        path = onnx_path()
        if tech.precision == NumericPrecision.INT8.value:  # its INT8 copy, ONNX Runtime's CPU profile
            if calib is None:
                raise InputError("an INT8 static baseline needs calibration images")
            from .static import quantize_static_int8

            path = quantize_static_int8(path, work / "static.int8.onnx", calib())
        return OnnxRuntimeClassifier(path, model, threads, precision=tech.precision)
    if tech.backend == "torch":
        if network is not None:
            net = network
        elif SourceKind.of(source) is SourceKind.ONNX:
            net = onnx_to_torch(source)
        else:
            from gfnet_edge.train.static import load_static

            net, _ = load_static(source)
        return TorchClassifier(net, model, tech, threads=threads)
    return _tensorrt_classifier(plan, tech, onnx_path(), model, work, batch, calib)


def _tensorrt_classifier(plan: StaticPlan, tech: Technology, onnx_path: Path, model: Any, work: Path, batch: int,
                         calib: Optional[Callable[[], np.ndarray]]) -> Classifier:
    from gfnet_edge.runtime.backends.classifier_tensorrt import (TensorRTClassifier, build_classifier_engine,
                                                                 classifier_build_options)

    entry = dict(plan.engine or {"precision": tech.precision})
    entry["precision"] = tech.precision
    options = classifier_build_options(entry, max_batch=max(batch, ACCURACY_BATCH), opt_batch=batch)
    src = onnx_path
    if tech.precision == NumericPrecision.INT8.value:
        if calib is None:
            raise InputError("an INT8 TensorRT static baseline needs calibration images")
        src = _quantize_for_tensorrt(onnx_path, work / "static.int8-tensorrt.onnx", calib())
    built = build_classifier_engine(src, work / f"static.{tech.precision}.engine", options)
    return TensorRTClassifier(work / f"static.{tech.precision}.engine", model, tech, options.max_batch,
                              static_batch=built.get("static_batch"), dla_core=options.dla_core)


def extra_int8(plan: StaticPlan, int8: bool) -> List[str]:
    """Precisions measured besides the plan's for ``--static-int8`` / an INT8 GFNet: ONNX
    Runtime adds its INT8 copy (``int8``), TensorRT an INT8 engine when the plan's is not one;
    torch has no INT8 (a warning says so)."""
    if not int8:
        return []
    backend = plan.static.backend
    dla = ((plan.engine or {}).get("build_options") or {}).get("dla_core")
    if backend == "tensorrt" and dla is not None:
        logger.warning("--static-int8: the GFNet runs on DLA core %s, which runs no Q/DQ INT8 engine; no INT8 static "
                       "baseline measured", dla)
        return []
    if backend == "onnxruntime" or (backend == "tensorrt" and plan.static.precision != NumericPrecision.INT8.value):
        return [NumericPrecision.INT8.value]
    if backend == "torch":
        logger.warning("--static-int8: the torch backend runs fp32 or fp16; no INT8 static baseline measured")
    return []

