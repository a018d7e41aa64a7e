"""A single-input classifier (a static baseline) as a TensorRT engine, run like the GFNet
runner's engines (:mod:`.tensorrt`): explicit stream, buffers allocated once for the max batch,
one execution context per batch bucket whose shape and tensor addresses never change, and the
device work of a call (the extension's CUDA normalisation of the bucket's uint8 frames, one
launch, then ``enqueueV3``) captured as one CUDA graph per bucket with the extension's stream capture.

:func:`build_classifier_engine` builds the engine through :func:`.tensorrt_build.build_engine`
with the precision and builder options of the bundle's engines, so both sides get the same
precision flags and network typing.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ...errors import InputError, UnavailableError
from . import tensorrt_util
from .classifier import Classifier, Technology
from .tensorrt_build import BuildOptions, build_engine
from .tensorrt_engines import DLA_NOT_CAPTURED

F32 = 4


def classifier_build_options(entry: Dict[str, Any], max_batch: int, opt_batch: int) -> BuildOptions:
    """The bundle engine entry's builder options (precision, workspace, level, DLA core and
    fallback) for a classifier engine with batches up to ``max_batch``, tuned for ``opt_batch``.
    The timing cache is not shared (the classifier's layers are other layers)."""
    opts = dict(entry.get("build_options") or {})
    known = {k: opts[k] for k in ("workspace_mb", "opt_level", "dla_core", "gpu_fallback") if k in opts}
    base = BuildOptions(precision=str(entry.get("precision", "fp32")), **known)
    return replace(base, max_batch=int(max_batch), opt_batch=int(min(opt_batch, max_batch))).validate()


def build_classifier_engine(onnx_path: Path, out_path: Path, options: BuildOptions) -> Dict[str, Any]:
    """Builds the classifier's engine (``tensorrt_build.build_engine``); its manifest-style entry."""
    return build_engine(Path(onnx_path), Path(out_path), options)


class TensorRTClassifier(Classifier):
    """Runs a classifier engine on uint8 frames.

    A call uploads the frames through page-locked memory into a fixed device buffer, then (one
    graph per bucket when captured) normalises the bucket's frames into the engine's input
    buffer in one launch and enqueues the engine on the bucket's execution context; the logits are read
    back (the only synchronisation). Buckets are powers of two up to the engine's max batch
    (an engine built for one batch, DLA, runs every call at that batch).

    Args:
        engine_path: the serialized engine.
        model: the GFNet's description (S, interpolation, mean / std).
        technology: a tensorrt :class:`~.classifier.Technology`.
        max_batch: the engine profile's largest batch.
        static_batch: the one batch of a static-shape (DLA) engine, else None.
        dla_core: the DLA core the engine was built for, else None (GPU); the engine is
            deserialised on that core. A DLA engine is never captured
            (:data:`~.tensorrt_engines.DLA_NOT_CAPTURED`): its calls are plain launches.
    """

    def __init__(self, engine_path: Path, model: Any, technology: Technology, max_batch: int,
                 static_batch: Optional[int] = None, dla_core: Optional[int] = None) -> None:
        from ... import ops
        from ..graphs import GraphCache, NativeCapture

        if technology.backend != "tensorrt":
            raise InputError(f"TensorRTClassifier runs the tensorrt backend, not {technology.backend}")
        super().__init__(technology, model.image_size)
        self.model = model
        self.max_batch = int(static_batch or max_batch)
        self.static_batch = static_batch
        trt = self._trt = tensorrt_util.import_tensorrt()
        runtime = tensorrt_util.safe_runtime(trt, dla_core, what=f"{engine_path} was")
        engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if engine is None:
            raise InputError(f"{engine_path}: TensorRT could not deserialize this engine")
        names = tensorrt_util.io_names(engine)
        inputs = tensorrt_util.io_names(engine, trt.TensorIOMode.INPUT)
        outputs = tensorrt_util.io_names(engine, trt.TensorIOMode.OUTPUT)
        if len(inputs) != 1 or not outputs:
            raise InputError(f"{engine_path}: expected one image input and a logits output, got inputs {inputs}")
        for n in names:
            if engine.get_tensor_dtype(n) != trt.DataType.FLOAT:
                raise InputError(f"{engine_path}: tensor {n!r} is {engine.get_tensor_dtype(n)}, not float32")
        self._runtime, self._engine = runtime, engine
        self.input_name, self.output_names = inputs[0], outputs
        S = self.image_size
        shape = tuple(int(d) for d in engine.get_tensor_shape(inputs[0]))
        if len(shape) != 4 or shape[1:] != (3, S, S):
            raise InputError(f"{engine_path}: the engine's input {inputs[0]!r} is {shape}, not (N, 3, {S}, {S}) images")
        for n in outputs:
            dims = tuple(int(d) for d in engine.get_tensor_shape(n))
            if len(dims) < 2 or min(dims[1:]) < 1:
                raise InputError(f"{engine_path}: output {n!r} has shape {dims}; a classifier's outputs are "
                                 "(N, ...) with fixed sizes past the batch")
        self.classes = int(engine.get_tensor_shape(outputs[0])[1])
        self.stream = ops.Stream()
        B = self.max_batch
        self._frames = ops.DeviceBuffer(B * S * S * 3)
        self._pinned = ops.pinned_empty((B, S, S, 3), np.uint8)
        self._image = ops.DeviceBuffer(B * 3 * S * S * F32)
        self._image.zero(self.stream)
        self._outs = {n: ops.DeviceBuffer(max(B * self._row_elems(n) * F32, 1)) for n in outputs}
        self._contexts: Dict[int, Any] = {}
        dla = dla_core is not None
        self.cache = GraphCache(NativeCapture(self.stream.handle) if technology.captured and not dla else None)
        if dla:
            self.cache.disabled = DLA_NOT_CAPTURED

    def _row_elems(self, name: str) -> int:
        return int(np.prod([int(d) for d in self._engine.get_tensor_shape(name)][1:]))

    def _context(self, bucket: int) -> Any:
        """The bucket's execution context: shape and addresses set once (a captured enqueue
        bakes them in)."""
        ctx = self._contexts.get(bucket)
        if ctx is not None:
            return ctx
        ctx = self._engine.create_execution_context()
        if ctx is None:
            raise UnavailableError("TensorRT could not create an execution context for the static baseline's engine "
                                   "(not enough GPU memory)")
        S = self.image_size
        if not ctx.set_input_shape(self.input_name, (bucket, 3, S, S)):
            raise InputError(f"the static baseline's engine rejects batch {bucket} (built for up to {self.max_batch})")
        for name, ptr in [(self.input_name, self._image.ptr)] + [(n, b.ptr) for n, b in self._outs.items()]:
            if ptr % tensorrt_util.ADDRESS_ALIGNMENT or not ctx.set_tensor_address(name, ptr):
                raise RuntimeError(f"TensorRT refused the address of the static baseline's tensor {name!r}")
        self._contexts[bucket] = ctx
        return ctx

    def _step(self, bucket: int) -> None:
        """Normalise the bucket's frame slots (one launch), then the engine, on the stream."""
        from ... import ops

        m, S = self.model, self.image_size
        ctx = self._context(bucket)
        ops.cuda_normalise_frames(self._frames.ptr, bucket, S, self._image.ptr, mean=m.mean, std=m.std,
                                  stream=self.stream)
        if not ctx.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT failed to enqueue the static baseline's engine (see the TensorRT log above)")

    def _bucket(self, n: int) -> int:
        if self.static_batch:
            return int(self.static_batch)
        from ..graphs import bucket_for

        return bucket_for(n, self.max_batch)

    def logits(self, frames: np.ndarray) -> np.ndarray:
        frames = self.check(frames)
        parts: List[np.ndarray] = []
        S = self.image_size
        for i in range(0, frames.shape[0], self.max_batch):
            chunk = frames[i:i + self.max_batch]
            n = chunk.shape[0]
            bucket = self._bucket(n)
            self._pinned[:n] = chunk
            self._frames.copy_from_host(self._pinned.reshape(-1)[:n * S * S * 3], self.stream)
            self.cache.run(bucket, lambda b=bucket: self._step(b))
            out = np.empty((n, self.classes), np.float32)
            self._outs[self.output_names[0]].copy_to_host(out, self.stream)  # synchronises the stream
            parts.append(out)
        return np.concatenate(parts)

    def close(self) -> None:
        from ... import ops

        if self._engine is None:
            return
        ops.stream_synchronize(self.stream)
        self.cache.clear()
        self._contexts.clear()  # contexts before the engine, as TensorRT requires
        self._engine = None
        self._runtime = None
