"""Single-input image classifiers (a static baseline network) run with the same technology as a
GFNet runtime: the same backend, place and precision, graph-captured where the GFNet loop is.

A comparison of GFNet with a static network says something about the networks only when both
sides run alike. :class:`Technology` names how one side runs; :func:`gfnet_technology` reads it
from an open :class:`~gfnet_edge.runtime.Runtime`, :func:`static_technology` derives the static
side's from it, and the classifiers run it:

* :class:`OnnxRuntimeClassifier` -- ONNX Runtime on the CPU (uint8 frames normalised by the
  extension, one session call);
* :class:`TorchClassifier` -- a torch module on the CPU or on CUDA: the uint8 frames are copied
  into a fixed input buffer, normalised by torch on the device, run in fp32 (no TF32) or fp16,
  and the logits copied back; on CUDA the whole device part of a call is one CUDA graph per
  batch bucket (:class:`~gfnet_edge.runtime.graphs.GraphCache`: plain launches the first time,
  then captured; a failed capture falls back to plain launches with a logged reason);
* :class:`~.classifier_tensorrt.TensorRTClassifier` -- an engine built from the classifier's
  ONNX graph, fed by the extension's CUDA pre-processing, ``enqueueV3`` captured the same way.

Every classifier maps uint8 (N, S, S, 3) frames (already S x S: no resize, no crop) to float32
logits (N, classes) on the host.
"""
from __future__ import annotations

import contextlib
import enum
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ...errors import InputError, UnavailableError
from ..graphs import GraphCache, bucket_for
from .torch import TorchCapture


class NumericPrecision(str, enum.Enum):
    """What the network's arithmetic runs in."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"

    @classmethod
    def of(cls, runner_precision: str) -> "NumericPrecision":
        """The precision of a runner's label (``fp32``, ``int8-cpu``, ``fp16-torch``,
        ``fp16-tensorrt`` ...)."""
        head = str(runner_precision).split("-", 1)[0]
        try:
            return cls(head)
        except ValueError:
            raise InputError(f"unknown runner precision {runner_precision!r}") from None


@dataclass(frozen=True)
class Technology:
    """How one side of a comparison runs.

    Attributes:
        backend: ``onnxruntime``, ``torch`` or ``tensorrt``.
        device: ``cpu`` or ``cuda``.
        precision: the arithmetic (:class:`NumericPrecision` value).
        captured: the device work of a call is replayed as CUDA graphs.
        note: why it is not captured, where it could have been (a fallback's reason).
    """

    backend: str
    device: str
    precision: str
    captured: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        from . import get

        places = get(self.backend).places  # InputError naming the choices for an unknown backend
        if self.device not in places:
            raise InputError(f"the {self.backend} backend runs on {' or '.join(places)}, not {self.device}")
        if self.precision not in {p.value for p in NumericPrecision}:
            raise InputError(f"precision must be one of {', '.join(p.value for p in NumericPrecision)}, "
                             f"got {self.precision!r}")
        if self.captured and self.device != "cuda":
            raise InputError("CUDA graph capture needs device 'cuda'")

    def describe(self) -> str:
        """``torch cuda fp16, captured``, ``tensorrt cuda fp16, plain launches (why)`` or, on
        the CPU (where nothing is captured), ``onnxruntime cpu fp32``."""
        if self.device == "cpu":
            return f"{self.backend} cpu {self.precision}"
        how = "captured" if self.captured else "plain launches"
        return f"{self.backend} {self.device} {self.precision}, {how}" + (f" ({self.note})" if self.note else "")

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "description": self.describe()}


def gfnet_technology(rt: Any) -> Technology:
    """How an open :class:`~gfnet_edge.runtime.Runtime` runs its loop: backend, place (the
    device place when the runner runs on device buffers), precision and whether its steps are
    captured (graphs on and no capture failure so far)."""
    driver = rt.driver
    on_device = bool(driver.on_device)
    graphs = getattr(driver.place, "graphs", None) if on_device else None
    cache = getattr(graphs, "cache", None)
    captured = cache is not None and cache.active
    note = ""
    if on_device and not captured:
        note = cache.disabled if cache is not None else \
            getattr(driver.place, "not_captured", None) or "graphs switched off"
    return Technology(rt.backend, "cuda" if on_device else "cpu", NumericPrecision.of(rt.precision).value,
                      captured, note)


def static_technology(gfnet: Technology) -> Technology:
    """The static side's technology for a GFNet side: the same backend, place and precision,
    captured exactly when the GFNet loop is (a DLA GFNet's loop is not, so neither is its static
    engine, built with the same DLA options). ONNX Runtime runs the float graph (an INT8
    GFNet is compared with the float static network and, on request, its INT8 copy)."""
    precision = NumericPrecision.FP32.value if gfnet.backend == "onnxruntime" else gfnet.precision
    if gfnet.backend == "torch" and precision == NumericPrecision.INT8.value:
        raise InputError("the torch backend runs fp32 or fp16, not int8")
    return Technology(gfnet.backend, gfnet.device, precision, gfnet.captured)


# ------------------------------------------------------------------------------ classifiers
class Classifier:
    """Base class: uint8 (N, S, S, 3) frames -> float32 logits (N, classes) on the host.

    Attributes:
        technology: what it was asked to run (:class:`Technology`).
        cache: its graph cache (captured classifiers), else None.
    """

    def __init__(self, technology: Technology, image_size: int) -> None:
        self.technology = technology
        self.image_size = int(image_size)
        self.cache: Optional[GraphCache] = None

    def ran(self) -> Technology:
        """How it ran: the planned technology, not captured any more when a capture failed."""
        t = self.technology
        if t.captured and self.cache is not None and not self.cache.active:
            return Technology(t.backend, t.device, t.precision, False, str(self.cache.disabled))
        return t

    def check(self, frames: np.ndarray) -> np.ndarray:
        S = self.image_size
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 \
                or frames.shape[1:] != (S, S, 3) or frames.shape[0] < 1:
            desc = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
            raise ValueError(f"frames must be uint8 (N, {S}, {S}, 3), got {desc}")
        return np.ascontiguousarray(frames)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return self.logits(frames)

    def logits(self, frames: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Releases sessions, engines and buffers."""

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OnnxRuntimeClassifier(Classifier):
    """An ONNX graph on ONNX Runtime (CPU): the frames normalised by the extension
    (``ops.preprocess``, ``crop_pct=1``), then one session call.

    Args:
        path: the ONNX graph (one float32 (N, 3, S, S) input, logits first output).
        model: the GFNet's description (S, interpolation, mean / std).
        threads: ONNX Runtime threads.
        precision: what the graph computes in (``fp32``, or ``int8`` for a Q/DQ graph).
    """

    def __init__(self, path: Path, model: Any, threads: Optional[int] = None, precision: str = "fp32") -> None:
        from .onnxruntime import load_session

        super().__init__(Technology("onnxruntime", "cpu", precision), model.image_size)
        self.model = model
        self.session = load_session(Path(path), threads)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise InputError(f"{path}: expected a graph with one image input, it has {len(inputs)}")
        self.input_name = inputs[0].name

    def logits(self, frames: np.ndarray) -> np.ndarray:
        from ... import ops

        m = self.model
        x = ops.normalise_frames(self.check(frames), m.mean, m.std)
        return np.asarray(self.session.run(None, {self.input_name: x})[0])

    def close(self) -> None:
        self.session = None


class TorchClassifier(Classifier):
    """A torch module fed uint8 frames: copied into the input buffer of the call's batch bucket
    (page-locked on CUDA), normalised by torch where the module runs, run in the technology's
    precision (fp32 without TF32, or fp16 weights and activations), logits copied back.

    On CUDA with ``technology.captured`` the device part of each call (normalisation, forward,
    copy into the bucket's output buffer) is one CUDA graph per bucket (powers of two, padded;
    :class:`~gfnet_edge.runtime.graphs.GraphCache`).

    Args:
        module: the classifier (float32 weights; converted as the technology says).
        model: the GFNet's description (S, mean / std).
        technology: a torch :class:`Technology`.
        capture: the capturer to use instead of ``torch.cuda.CUDAGraph`` (tests: a stand-in
            that lets the bookkeeping run on the CPU); ``None`` picks by technology.
        threads: torch CPU threads (``None``: torch's default).
    """

    def __init__(self, module: Any, model: Any, technology: Technology, capture: Any = None,
                 threads: Optional[int] = None) -> None:
        if technology.backend != "torch":
            raise InputError(f"TorchClassifier runs the torch backend, not {technology.backend}")
        if technology.precision == NumericPrecision.FP16.value and technology.device != "cuda":
            raise InputError("the torch backend runs fp16 on CUDA only")
        try:
            import torch
        except ImportError as exc:
            raise UnavailableError("the torch backend needs PyTorch: pip install 'gfnet-edge[build]'") from exc
        super().__init__(technology, model.image_size)
        if technology.device == "cuda" and not torch.cuda.is_available():
            raise UnavailableError("the torch backend was asked for device 'cuda' but this torch has no usable CUDA "
                                   "device (torch.cuda.is_available() is False)")
        if threads:
            torch.set_num_threads(int(threads))
        self.device = technology.device
        self.half = technology.precision == NumericPrecision.FP16.value
        self.module = (module.half() if self.half else module.float()).to(self.device).eval()
        self.mean = torch.tensor(model.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(model.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0)
        self.stream = torch.cuda.Stream() if self.device == "cuda" else None
        if capture is None and technology.captured:
            capture = TorchCapture(None, self.stream)
        self.cache = GraphCache(capture)
        self._in: Dict[int, Any] = {}  # bucket -> uint8 (B, S, S, 3) input where the module runs
        self._host: Dict[int, Any] = {}  # bucket -> page-locked host staging (CUDA)
        self._out: Dict[int, Any] = {}  # bucket -> float32 (B, classes) logits

    def _math(self):
        import torch

        from .torch import _ieee_fp32

        return _ieee_fp32(torch) if self.device == "cuda" and not self.half else contextlib.nullcontext()

    def _streamed(self):
        import torch

        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _step(self, bucket: int) -> None:
        """The device work of one call at ``bucket`` images: input buffer -> output buffer."""
        x = self._in[bucket]
        z = (x.permute(0, 3, 1, 2).float() - self.mean) * self.inv_std
        y = self.module(z.half() if self.half else z).float()
        out = self._out.get(bucket)
        if out is None:  # allocated by the first (plain) run, outside any capture
            out = self._out[bucket] = y.new_empty(y.shape)
        out.copy_(y)

    def _buffers(self, bucket: int) -> None:
        import torch

        if bucket in self._in:
            return
        S = self.image_size
        self._in[bucket] = torch.zeros((bucket, S, S, 3), dtype=torch.uint8, device=self.device)
        if self.device == "cuda":
            self._host[bucket] = torch.empty((bucket, S, S, 3), dtype=torch.uint8, pin_memory=True)
            # The buffer (and, the first time, the weights and constants) were made on torch's
            # current stream; the runner's own stream does not otherwise wait for it.
            self.stream.wait_stream(torch.cuda.current_stream())

    def logits(self, frames: np.ndarray) -> np.ndarray:
        import torch

        frames = self.check(frames)
        n = frames.shape[0]
        bucket = bucket_for(n, None)
        self._buffers(bucket)
        with torch.inference_mode(), self._math(), self._streamed():
            if self.device == "cuda":
                host = self._host[bucket]
                host.numpy()[:n] = frames
                self._in[bucket][:n].copy_(host[:n], non_blocking=True)
            else:
                self._in[bucket][:n].copy_(torch.from_numpy(frames))
            self.cache.run(bucket, lambda: self._step(bucket))
            out = self._out[bucket][:n].cpu().numpy()  # on CUDA a new host array (waits for the stream)
            return out if self.device == "cuda" else out.copy()  # on the CPU a view of the reused buffer

    def close(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        self.cache.clear()
        self._in.clear()
        self._host.clear()
        self._out.clear()


def onnx_to_torch(path: Path) -> Any:
    """An ONNX classifier graph as a torch module (``onnx2torch``).

    Raises:
        UnavailableError: onnx2torch is not installed.
        InputError: the graph cannot be converted.
    """
    try:
        from onnx2torch import convert
    except ImportError as exc:
        raise UnavailableError(f"{path}: the torch backend runs the static baseline as a torch module; converting an "
                               "ONNX graph needs onnx2torch (pip install onnx2torch), or pass the static checkpoint "
                               "(.pth.tar)") from exc
    try:
        return convert(_fold_identities(path)).eval()
    except Exception as exc:  # onnx2torch raises NotImplementedError / KeyError ... for what it cannot convert
        raise InputError(f"{path}: onnx2torch cannot convert this graph: {str(exc).splitlines()[0]}") from exc


def _fold_identities(path: Path) -> Any:
    """The ONNX model with ``Identity`` nodes over initializers replaced by copies of them
    (torch's exporter shares equal folded weights that way; onnx2torch expects a Conv / Gemm
    weight to be an initializer)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    keep = []
    for node in m.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            m.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]),
                                                               node.output[0]))
        else:
            keep.append(node)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m
