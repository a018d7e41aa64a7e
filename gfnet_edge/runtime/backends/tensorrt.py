"""The TensorRT runner: a bundle's glance/focus engines, run on explicit CUDA streams.

Engines come from :mod:`.tensorrt_engines` (which engine fits this device) and are built by
:mod:`.tensorrt_build`; TensorRT itself is imported through :mod:`.tensorrt_util`.

* Engines are deserialised with ``engine_host_code_allowed = False``.
* Every TensorRT call that reports failure by its return value is checked, with a message
  that says what to do.
* Execution uses ``execute_async_v3`` on explicit streams only (the legacy default stream is
  refused: TensorRT synchronises the whole device around it). Each stream gets its own
  execution contexts and buffers (a :class:`_Lane`), so :meth:`TensorRTRunner.run` (the
  runner's stream) and :meth:`TensorRTRunner.run_device` (the caller's stream) never share
  memory. A lane's buffers are allocated once, for the max batch, and keep their addresses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np

from ...errors import InputError, UnavailableError
from . import tensorrt_util
from .base import GRAPHS, Runner
from .tensorrt_engines import DLA_NOT_CAPTURED, engine_dla_core, select_engine

if TYPE_CHECKING:  # pragma: no cover
    from . import RunnerRequest


def load_runner(request: "RunnerRequest") -> "TensorRTRunner":
    """The runner of the bundle's engines for this device, ``request.precision`` and DLA core."""
    return TensorRTRunner(request.bundle, select_engine(request.bundle, request.precision,
                                                        dla_core=request.dla_core))


@dataclass
class _Lane:
    """Execution on one CUDA stream: an execution context per graph and its device buffers,
    allocated once for the max batch (their addresses never change while the runner is active).

    Attributes:
        stream: the cudaStream_t handle.
        contexts: graph -> ``IExecutionContext``.
        staging: graph -> input buffer for images that cannot be read in place (misaligned,
            or fewer than a static-batch engine's batch).
        outputs: graph -> {output name: (DeviceBuffer, shape at the max batch)}.
        per_batch: the lane's work is captured as CUDA graphs: every (graph, batch) runs on an
            execution context of its own whose input shape never changes
            (:meth:`TensorRTRunner.graph_capture`).
        batch_contexts: (graph, batch) -> ``IExecutionContext`` when ``per_batch``.
        scratch: the activation memory every context of the lane shares (they run one at a
            time, in order on ``stream``), or None where TensorRT allocates it per context.
        input_shapes: ``id(context)`` -> the input shape set on that context (each context of
            the lane gets ``set_input_shape`` once per shape, the first time included).
    """

    stream: int
    contexts: Dict[str, Any] = field(default_factory=dict)
    staging: Dict[str, Any] = field(default_factory=dict)
    outputs: Dict[str, Dict[str, Tuple[Any, Tuple[int, ...]]]] = field(default_factory=dict)
    per_batch: bool = False
    batch_contexts: Dict[Tuple[str, int], Any] = field(default_factory=dict)
    scratch: Any = None
    input_shapes: Dict[int, Tuple[int, ...]] = field(default_factory=dict)


class TensorRTRunner(Runner):
    """Runs the bundle's glance/focus engines.

    :meth:`run` (numpy) runs on the runner's own stream; :meth:`run_device` enqueues on the
    caller's stream and keeps inputs and outputs in device memory. Each stream has its own
    execution contexts and buffers (created on its first use, for the max batch), so work on
    two streams never shares memory; at most :attr:`MAX_STREAMS` streams per runner.
    Engines built for a static batch (DLA) run every call at that batch: smaller batches are
    copied into a staging buffer and only their rows of the outputs are returned.

    Args:
        bundle: the loaded bundle.
        entry: its engine entry (:func:`select_engine`).
    """

    name = "tensorrt"
    supports_device = True
    #: TensorRT requires tensor addresses aligned to 256 bytes (``IExecutionContext::setTensorAddress``).
    ADDRESS_ALIGNMENT = tensorrt_util.ADDRESS_ALIGNMENT
    #: Streams (each with its own contexts and buffers) one runner serves.
    MAX_STREAMS = 4

    def __init__(self, bundle, entry: Dict[str, Any]) -> None:
        super().__init__(f"{entry['precision']}-tensorrt")
        self.bundle = bundle
        self.entry = entry
        opts = entry.get("build_options", {})
        self.static_batch: Optional[int] = entry.get("static_batch")
        self.max_batch = int(self.static_batch or opts.get("max_batch", 32))
        #: DLA engines run as plain launches (:meth:`graph_capture`).
        self.capture_refusal: Optional[str] = DLA_NOT_CAPTURED if engine_dla_core(entry) is not None else None
        self._engines: Dict[str, Any] = {}
        self._lanes: Dict[int, _Lane] = {}
        self._stream = None
        self._runtime = None

    # ---------------------------------------------------------------- lifecycle
    def _activate(self) -> None:
        from ... import ops

        trt = tensorrt_util.import_tensorrt()
        self._trt = trt
        runtime = tensorrt_util.safe_runtime(trt, engine_dla_core(self.entry))
        try:
            for g in GRAPHS:
                path = self.bundle.path(self.entry[g])
                engine = runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise InputError(f"{path}: TensorRT could not deserialize this engine (truncated, corrupt or "
                                     "built elsewhere)")
                self._check_io(g, engine)
                self._engines[g] = engine
            self._runtime = runtime
            self._stream = ops.Stream()
        except BaseException:
            self._engines.clear()
            raise

    def _deactivate(self) -> None:
        """Waits for the work of every stream this runner enqueued on, then frees its contexts,
        buffers and engines (contexts before engines, as TensorRT requires)."""
        from ... import ops

        for lane in self._lanes.values():
            ops.stream_synchronize(lane.stream)
        for lane in self._lanes.values():
            lane.batch_contexts.clear()
            lane.contexts.clear()
            lane.scratch = None  # after the contexts that use it
        self._lanes.clear()
        self._engines.clear()
        self._runtime = None
        self._stream = None

    def _check_io(self, graph: str, engine: Any) -> None:
        trt = self._trt
        for name in tensorrt_util.io_names(engine):
            if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise InputError(f"the {graph} engine's tensor {name!r} is {engine.get_tensor_dtype(name)}; gfnet-edge "
                                 "feeds and reads float32: rebuild the engines with this gfnet-edge")

    def _output_names(self, engine: Any) -> List[str]:
        return tensorrt_util.io_names(engine, self._trt.TensorIOMode.OUTPUT)

    # ------------------------------------------------------------------- lanes
    def _lane(self, stream: int) -> _Lane:
        """The contexts and buffers of ``stream``, created (for the max batch) on its first use."""
        lane = self._lanes.get(stream)
        if lane is not None:
            return lane
        if stream in (0, 1):  # 0 / None, and cudaStreamLegacy (handle 1): the same stream
            raise ValueError("TensorRTRunner needs an explicit CUDA stream, not the legacy default stream "
                             "(0 / None / cudaStreamLegacy: TensorRT would synchronise the whole device around "
                             "every call); "
                             "pass a gfnet_edge.ops.Stream(), or your torch / CuPy stream")
        if len(self._lanes) >= self.MAX_STREAMS:
            raise ValueError(f"this TensorRTRunner already serves {len(self._lanes)} CUDA streams (each has its own "
                             "execution contexts and buffers); reuse one of them or use another runner")
        from ... import ops

        lane = _Lane(stream)
        if all(hasattr(e, "device_memory_size_v2") for e in self._engines.values()):  # TensorRT 10.1+
            size = max(int(e.device_memory_size_v2) for e in self._engines.values())
            lane.scratch = ops.DeviceBuffer(max(size, 1))
        for g, engine in self._engines.items():
            try:
                ctx = self._new_context(g, lane)
            except UnavailableError:
                lane.contexts.clear()
                raise
            lane.contexts[g] = ctx
            shape = self._input_shape(engine, self.max_batch)
            self._set_input_shape(lane, ctx, g, shape)
            lane.staging[g] = ops.DeviceBuffer(int(np.prod(shape)) * 4)
            lane.staging[g].zero(stream)
            lane.outputs[g] = {}
            for name in self._output_names(engine):
                out_shape = self._output_shape(ctx, g, name)
                lane.outputs[g][name] = (ops.DeviceBuffer(max(int(np.prod(out_shape)) * 4, 1)), out_shape)
        self._lanes[stream] = lane
        return lane

    def _new_context(self, graph: str, lane: _Lane) -> Any:
        """A context of ``graph`` for ``lane``: its activation memory is the lane's scratch,
        shared by all the lane's contexts (one stream runs them one at a time), so that the
        contexts per batch bucket of a captured lane cost no activation memory each."""
        engine = self._engines[graph]
        if lane.scratch is None:
            ctx = engine.create_execution_context()
        else:
            ctx = engine.create_execution_context(self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is not None:
                ctx.set_device_memory(lane.scratch.ptr, lane.scratch.nbytes)
        if ctx is None:
            raise UnavailableError(
                f"TensorRT could not create an execution context for the {graph} engine (not enough GPU memory "
                f"for its activations): close other GPU programs, rebuild the engines with a smaller "
                f"--max-batch (now {self.max_batch}), or run with cuda_graphs=False (one context per engine)")
        return ctx

    def _context(self, lane: _Lane, graph: str, batch: int) -> Any:
        """The execution context ``graph`` runs ``batch`` images on in ``lane``."""
        if not lane.per_batch:
            return lane.contexts[graph]
        ctx = lane.batch_contexts.get((graph, batch))
        if ctx is None:
            ctx = lane.batch_contexts[(graph, batch)] = self._new_context(graph, lane)
        return ctx

    def graph_capture(self, stream: Any):
        """Stream capture of ``enqueueV3`` (:class:`~gfnet_edge.runtime.graphs.NativeCapture`).

        A captured engine run bakes in its input shape and tensor addresses, so from now on the
        stream's lane runs each (graph, batch) on an execution context of its own, created on
        first use, whose shape is set once; the loop runs every shape once before capturing it,
        as TensorRT requires. Each context holds its own activation memory: the number of
        contexts is two per batch bucket the loop meets (:func:`~gfnet_edge.runtime.graphs.buckets`).

        None for DLA engines (:attr:`capture_refusal`): TensorRT does not support CUDA graphs
        with DLA offloading (trtexec turns graphs off when a DLA core is set), so their loop
        runs as plain launches on one execution context per engine.
        """
        from ... import ops
        from ..graphs import NativeCapture

        if self.capture_refusal is not None:
            return None
        handle = ops.stream_handle(stream)
        self._lane(handle).per_batch = True
        return NativeCapture(handle)

    @staticmethod
    def _input_shape(engine: Any, batch: int) -> Tuple[int, ...]:
        return (int(batch),) + tuple(int(d) for d in engine.get_tensor_shape("image"))[1:]

    def _set_input_shape(self, lane: _Lane, ctx: Any, graph: str, shape: Tuple[int, ...]) -> None:
        """Sets the input shape of ``ctx`` unless this lane set that shape on it already (no call
        that could mark the context for re-initialisation inside a capture). A new context is
        always given its shape, even where ``get_tensor_shape`` already reports it (a profile
        with one batch): enqueueV3 needs the input shape set."""
        shape = tuple(int(d) for d in shape)
        if lane.input_shapes.get(id(ctx)) == shape:
            return
        if not ctx.set_input_shape("image", shape):
            raise InputError(f"the {graph} engine rejects input shape {shape} (outside its "
                             f"optimisation profile? built for batches up to {self.max_batch})")
        lane.input_shapes[id(ctx)] = shape

    @staticmethod
    def _output_shape(ctx: Any, graph: str, name: str) -> Tuple[int, ...]:
        shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise RuntimeError(f"TensorRT could not infer the shape of {graph} output {name!r}: {shape}")
        return shape

    def _set_address(self, ctx: Any, graph: str, name: str, ptr: int) -> None:
        if ptr % self.ADDRESS_ALIGNMENT:
            raise RuntimeError(f"the address of the {graph} tensor {name!r} is not {self.ADDRESS_ALIGNMENT}-byte aligned")
        if not ctx.set_tensor_address(name, ptr):
            raise RuntimeError(f"TensorRT refused the address of the {graph} tensor {name!r}")

    def _enqueue(self, lane: _Lane, graph: str, image: int, batch: int) -> Dict[str, Tuple[int, Tuple[int, ...]]]:
        """Enqueues ``graph`` on ``lane``'s stream for ``batch`` images at device address
        ``image``; the outputs stay in the lane's buffers."""
        from ... import ops

        run_batch = self.static_batch or batch
        engine, ctx = self._engines[graph], self._context(lane, graph, run_batch)
        shape = self._input_shape(engine, run_batch)
        self._set_input_shape(lane, ctx, graph, shape)
        staged = lane.staging[graph]
        if image != staged.ptr and (image % self.ADDRESS_ALIGNMENT or run_batch != batch):
            # A misaligned view (e.g. a slice of a larger batch), or fewer images than a static
            # engine's batch: staged in the lane's aligned buffer (rows past ``batch`` are ignored).
            ops.cuda_copy(staged, image, batch * int(np.prod(shape[1:])) * 4, lane.stream)
            image = staged.ptr
        self._set_address(ctx, graph, "image", image)
        outs: Dict[str, Tuple[int, Tuple[int, ...]]] = {}
        for name, (buf, _) in lane.outputs[graph].items():
            out_shape = self._output_shape(ctx, graph, name)
            self._set_address(ctx, graph, name, buf.ptr)
            outs[name] = (buf.ptr, (batch,) + out_shape[1:])
        if not ctx.execute_async_v3(lane.stream):
            raise RuntimeError(f"TensorRT failed to enqueue the {graph} engine (see the TensorRT log above)")
        return outs

    # --------------------------------------------------------------------- run
    def _run(self, graph: str, image: np.ndarray) -> Dict[str, np.ndarray]:
        image = np.ascontiguousarray(image, dtype=np.float32)
        engine = self._engines[graph]
        expect = self._input_shape(engine, image.shape[0])
        if image.shape != expect:
            raise InputError(f"the {graph} engine takes images of shape {expect}, got {image.shape}")
        lane = self._lane(self._stream.handle)
        self._set_input_shape(lane, lane.contexts[graph], graph,
                              self._input_shape(engine, self.static_batch or len(image)))
        buf = lane.staging[graph]
        if image.nbytes > buf.nbytes:
            raise InputError(f"{len(image)} images exceed the {graph} engine's max batch {self.max_batch}")
        buf.copy_from_host(image, lane.stream)
        outs = self._enqueue(lane, graph, buf.ptr, image.shape[0])
        result = {}
        for name, (_, shape) in outs.items():
            host = np.empty(shape, np.float32)
            lane.outputs[graph][name][0].copy_to_host(host, lane.stream)  # synchronises the stream
            result[name] = host
        return result

    def _run_device(self, graph: str, image: int, batch: int, stream: int) -> Dict[str, Tuple[int, Tuple[int, ...]]]:
        return self._enqueue(self._lane(stream), graph, image, batch)
