"""TensorRT backend: which engine fits this device, and running it.

Written against the TensorRT 10.x and 11.x Python API and imported lazily; without TensorRT or
a GPU every entry point raises :class:`~gfnet_edge.errors.UnavailableError` saying how to
proceed. Decisions that do not need TensorRT itself (features per version range, engine
matching) are plain functions, tested on machines without it. Engine building lives in
:mod:`.tensorrt_build` (re-exported here).

* One ``ILogger`` per process (:func:`trt_logger`), as TensorRT expects; it forwards to the
  ``gfnet_edge`` logger and can record a build's messages (the DLA device report).
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

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ...errors import InputError, UnavailableError
from .base import GRAPHS, Runner

logger = logging.getLogger("gfnet_edge")

HOW_TO = (
    "TensorRT is not available here. On a Jetson, TensorRT comes with JetPack (python3-libnvinfer); "
    "elsewhere install it from NVIDIA's index. You can still build the portable part of a bundle here "
    "(`gfnet-edge build-engine CKPT -o BUNDLE --backend onnxruntime`) and build the engines on the device "
    "with `gfnet-edge build-engine BUNDLE --backend tensorrt`."
)


def import_tensorrt():
    """Imports ``tensorrt`` or raises :class:`UnavailableError` with instructions."""
    try:
        import tensorrt as trt  # noqa: WPS433
    except Exception as exc:
        raise UnavailableError(f"{HOW_TO} (import tensorrt failed: {exc})") from exc
    return trt


def parse_version(v: str) -> Tuple[int, int, int]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(v))
    if not m:
        raise ValueError(f"cannot parse TensorRT version {v!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


@dataclass(frozen=True)
class TrtFeatures:
    """What a TensorRT version offers, by version range (NVIDIA's headers and release notes).

    Attributes:
        version: (major, minor, patch).
        precision_flags: ``BuilderFlag.FP16`` / ``INT8`` exist (10.x; removed in 11.0).
        fp16_flag_deprecated: weak typing (``BuilderFlag.FP16``) is deprecated (10.12 and later).
        always_strongly_typed: every network is strongly typed (11.x; the creation flag is ignored).
        dla: DLA engines can be built: 10.0-10.7 (JetPack 6 ships 10.3) and 11.4.1 or later
            (AGX Orin with JetPack 7.2.2 or later). 11.0-11.4.0 have no DLA on Jetson.
    """

    version: Tuple[int, int, int]

    @classmethod
    def of(cls, version: str) -> "TrtFeatures":
        return cls(parse_version(version))

    @property
    def precision_flags(self) -> bool:
        return self.version[0] < 11

    @property
    def fp16_flag_deprecated(self) -> bool:
        return self.version >= (10, 12, 0)

    @property
    def always_strongly_typed(self) -> bool:
        return self.version[0] >= 11

    @property
    def dla(self) -> bool:
        return (10, 0, 0) <= self.version < (10, 8, 0) or self.version >= (11, 4, 1)

    def require_supported(self) -> None:
        if self.version[0] < 10:
            raise UnavailableError(f"TensorRT {'.'.join(map(str, self.version))} is too old: "
                                   "gfnet-edge needs TensorRT 10 or 11")


# ----------------------------------------------------------------------- logger
_LOGGER: Dict[int, Tuple[Any, Any]] = {}  # id(tensorrt module) -> (module, logger)


def trt_logger(trt):
    """The process's one TensorRT logger (created on first use, per ``tensorrt`` module).

    It forwards errors and warnings to the ``gfnet_edge`` logger, info to debug, drops verbose
    messages, and while :meth:`capture` is active records every info-or-worse message (the
    builder prints its DLA / GPU layer report at info level)."""
    key = id(trt)
    if key in _LOGGER:
        return _LOGGER[key][1]
    sev = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._captures: List[List[str]] = []

        def log(self, severity, msg) -> None:  # noqa: D401 - TensorRT's callback
            if int(severity) > int(sev.INFO):
                return
            for lines in self._captures:
                lines.append(str(msg))
            if int(severity) <= int(sev.ERROR):
                logger.error("TensorRT: %s", msg)
            elif int(severity) == int(sev.WARNING):
                logger.warning("TensorRT: %s", msg)
            else:
                logger.debug("TensorRT: %s", msg)

        @contextmanager
        def capture(self) -> Iterator[List[str]]:
            lines: List[str] = []
            self._captures.append(lines)
            try:
                yield lines
            finally:
                self._captures.remove(lines)

    _LOGGER[key] = (trt, _Logger())
    return _LOGGER[key][1]


# --------------------------------------------------------------------- device info
def _jetson_model() -> Optional[str]:
    """The board's model from the device tree (Jetson: "NVIDIA Jetson AGX Orin ..."), else None."""
    try:
        text = Path("/proc/device-tree/model").read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    return text.strip("\x00\n ") or None


def gpu_info() -> Dict[str, Any]:
    """Name, compute capability, SM count and board model of CUDA device 0.

    ``device_model`` is the Jetson board model where the device tree names it (AGX Orin and
    Orin Nano GPUs are both "Orin", sm_87), else the GPU name.

    Raises:
        UnavailableError: no CUDA build or no GPU.
    """
    from ... import ops

    if ops.cuda_device_count() < 1:
        raise UnavailableError("no CUDA GPU is visible here; " + HOW_TO)
    props = ops.cuda_device_properties(0)
    return {"gpu_name": props["name"], "compute_capability": f"{props['major']}.{props['minor']}",
            "multiprocessors": int(props["multiprocessors"]), "device_model": _jetson_model() or props["name"]}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def engine_dir_name(info: Dict[str, Any], trt_version: str, dla_core: Optional[int] = None) -> str:
    """``engines/`` subdirectory for a device: board model (or GPU name), SM arch, TensorRT, DLA core."""
    name = _slug(info.get("device_model") or info["gpu_name"]) or "gpu"
    dla = f"-dla{dla_core}" if dla_core is not None else ""
    return f"{name}-sm{info['compute_capability'].replace('.', '')}-trt{trt_version}{dla}"


#: Fields that identify a device model; the first two are always recorded, the others where known.
DEVICE_KEYS = ("gpu_name", "compute_capability", "device_model", "multiprocessors")


def device_mismatches(entry: Dict[str, Any], here: Dict[str, Any]) -> List[str]:
    """How an engine entry's device differs from this one (empty: the same device model).
    ``gpu_name`` and ``compute_capability`` must match; board model and SM count must match
    where both record them."""
    out = []
    for k in DEVICE_KEYS:
        a, b = entry.get(k), here.get(k)
        if k in DEVICE_KEYS[:2] or (a is not None and b is not None):
            if a != b:
                out.append(f"{k.replace('_', ' ')} {a} vs this device's {b}")
    return out


def check_engine_compat(entry: Dict[str, Any], here: Dict[str, Any], trt_version: str, bundle_root: Path) -> None:
    """Refuses an engine built for another device model or TensorRT version, saying how to rebuild."""
    problems = []
    if device_mismatches(entry, here):
        model = lambda d: f"{d.get('device_model') or d.get('gpu_name')}, {d.get('multiprocessors', '?')} SMs"  # noqa: E731
        problems.append(f"GPU {entry.get('gpu_name')} (compute capability {entry.get('compute_capability')}; "
                        f"{model(entry)}) vs this {here['gpu_name']} ({here['compute_capability']}; {model(here)})")
    if entry.get("tensorrt_version") != trt_version:
        problems.append(f"TensorRT {entry.get('tensorrt_version')} vs this TensorRT {trt_version}")
    if problems:
        raise InputError(
            f"{bundle_root}: the {entry.get('precision')} engines were built for another device: "
            + "; ".join(problems)
            + f". Engines are specific to the device model and TensorRT version: rebuild them here with "
            f"`gfnet-edge build-engine {bundle_root} --backend tensorrt --precision {entry.get('precision')}`"
        )


def engine_dla_core(entry: Dict[str, Any]) -> Optional[int]:
    """The DLA core an engine entry was built for (``None``: the GPU)."""
    core = entry.get("build_options", {}).get("dla_core")
    return None if core is None else int(core)


def same_engine_slot(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two engine entries are for the same precision, device model, TensorRT version and
    DLA core (a new build replaces the old entry of its slot; other device models keep theirs)."""
    keys = ("precision", "tensorrt_version")
    return (all(a.get(k) == b.get(k) for k in keys) and not device_mismatches(a, b)
            and engine_dla_core(a) == engine_dla_core(b))


def _target(dla_core: Optional[int]) -> str:
    return "GPU" if dla_core is None else f"DLA core {dla_core}"


def select_engine(bundle, precision: str = "auto", here: Optional[Dict[str, Any]] = None,
                  trt_version: Optional[str] = None, dla_core: Optional[int] = None) -> Dict[str, Any]:
    """The bundle's engine entry for this device model, ``precision`` (``auto``: int8 > fp16 >
    fp32) and target: the GPU (``dla_core=None``) or one DLA core. A bundle may hold engines
    for several device models and for both targets."""
    engines = [e for e in bundle.manifest.get("engines", []) if e.get("backend") == "tensorrt"]
    if not engines:
        raise InputError(
            f"{bundle.root}: no TensorRT engines in this bundle; build them on the device with "
            f"`gfnet-edge build-engine {bundle.root} --backend tensorrt`"
        )
    for_target = [e for e in engines if engine_dla_core(e) == dla_core]
    if not for_target:
        have = sorted({_target(engine_dla_core(e)) for e in engines}, key=lambda t: (t != "GPU", t))
        flag = "" if dla_core is None else f" --dla-core {dla_core}"
        raise InputError(
            f"{bundle.root}: no TensorRT engine for the {_target(dla_core)} (this bundle has engines for: "
            f"{', '.join(have)}; select one with dla_core= / --dla-core, or build with "
            f"`gfnet-edge build-engine {bundle.root} --backend tensorrt{flag}`)"
        )
    engines = for_target
    if here is None:
        here = gpu_info()
    if trt_version is None:
        trt_version = import_tensorrt().__version__
    if precision and precision.endswith("-tensorrt"):  # the graph-set name, as `predict --precision` lists it
        precision = precision[: -len("-tensorrt")]
    order = ["int8", "fp16", "fp32"] if precision in ("auto", None) else [precision]
    candidates = [e for p in order for e in engines if e.get("precision") == p]
    if not candidates:
        raise InputError(f"{bundle.root}: no {precision} TensorRT engine (has: {', '.join(e.get('precision', '?') for e in engines)})")
    matching = [e for e in candidates if not device_mismatches(e, here) and e.get("tensorrt_version") == trt_version]
    if matching:
        return matching[0]
    check_engine_compat(candidates[0], here, trt_version, bundle.root)
    return candidates[0]  # pragma: no cover - check_engine_compat raised


# ---------------------------------------------------------------------- execute
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
    """

    stream: int
    contexts: Dict[str, Any] = field(default_factory=dict)
    staging: Dict[str, Any] = field(default_factory=dict)
    outputs: Dict[str, Dict[str, Tuple[Any, Tuple[int, ...]]]] = field(default_factory=dict)
    per_batch: bool = False
    batch_contexts: Dict[Tuple[str, int], Any] = field(default_factory=dict)


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
    ADDRESS_ALIGNMENT = 256
    #: Streams (each with its own contexts and buffers) one runner serves.
    MAX_STREAMS = 4

    def __init__(self, bundle, entry: Dict[str, Any]) -> None:
        super().__init__(f"{entry['precision']}-tensorrt")
        self.bundle = bundle
        self.entry = entry
        opts = entry.get("build_options", {})
        self.static_batch: Optional[int] = entry.get("static_batch")
        self.max_batch = int(self.static_batch or opts.get("max_batch", 32))
        self._engines: Dict[str, Any] = {}
        self._lanes: Dict[int, _Lane] = {}
        self._stream = None
        self._runtime = None

    # ---------------------------------------------------------------- lifecycle
    def _activate(self) -> None:
        from ... import ops

        trt = import_tensorrt()
        self._trt = trt
        runtime = trt.Runtime(trt_logger(trt))
        if hasattr(runtime, "engine_host_code_allowed"):
            runtime.engine_host_code_allowed = False  # never run host code embedded in an engine
        core = engine_dla_core(self.entry)
        if core is not None:  # a DLA engine runs on the core the runtime names at deserialisation
            available = int(getattr(runtime, "num_DLA_cores", 0))
            if core >= available:
                raise UnavailableError(f"the engines were built for DLA core {core}, but this device has "
                                       f"{available} DLA core(s); use the GPU engines (no --dla-core) or rebuild")
            runtime.DLA_core = core
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
        self._lanes.clear()
        self._engines.clear()
        self._runtime = None
        self._stream = None

    def _check_io(self, graph: str, engine: Any) -> None:
        trt = self._trt
        for name in self._io_names(engine):
            if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise InputError(f"the {graph} engine's tensor {name!r} is {engine.get_tensor_dtype(name)}; gfnet-edge "
                                 "feeds and reads float32: rebuild the engines with this gfnet-edge")

    @staticmethod
    def _io_names(engine: Any) -> List[str]:
        return [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]

    def _output_names(self, engine: Any) -> List[str]:
        return [n for n in self._io_names(engine) if engine.get_tensor_mode(n) == self._trt.TensorIOMode.OUTPUT]

    # ------------------------------------------------------------------- lanes
    def _lane(self, stream: int) -> _Lane:
        """The contexts and buffers of ``stream``, created (for the max batch) on its first use."""
        lane = self._lanes.get(stream)
        if lane is not None:
            return lane
        if stream == 0:
            raise ValueError("TensorRTRunner needs an explicit CUDA stream, not the legacy default stream "
                             "(0 / None: TensorRT would synchronise the whole device around every call); "
                             "pass a gfnet_edge.ops.Stream(), or your torch / CuPy stream")
        if len(self._lanes) >= self.MAX_STREAMS:
            raise ValueError(f"this TensorRTRunner already serves {len(self._lanes)} CUDA streams (each has its own "
                             "execution contexts and buffers); reuse one of them or use another runner")
        from ... import ops

        lane = _Lane(stream)
        for g, engine in self._engines.items():
            try:
                ctx = self._new_context(g)
            except UnavailableError:
                lane.contexts.clear()
                raise
            lane.contexts[g] = ctx
            shape = self._input_shape(engine, self.max_batch)
            self._set_input_shape(ctx, g, shape)
            lane.staging[g] = ops.DeviceBuffer(int(np.prod(shape)) * 4)
            lane.staging[g].zero(stream)
            lane.outputs[g] = {}
            for name in self._output_names(engine):
                out_shape = self._output_shape(ctx, g, name)
                lane.outputs[g][name] = (ops.DeviceBuffer(max(int(np.prod(out_shape)) * 4, 1)), out_shape)
        self._lanes[stream] = lane
        return lane

    def _new_context(self, graph: str) -> Any:
        ctx = self._engines[graph].create_execution_context()
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
            ctx = lane.batch_contexts[(graph, batch)] = self._new_context(graph)
        return ctx

    def graph_capture(self, stream: Any):
        """Stream capture of ``enqueueV3`` (:class:`~gfnet_edge.runtime.graphs.NativeCapture`).

        A captured engine run bakes in its input shape and tensor addresses, so from now on the
        stream's lane runs each (graph, batch) on an execution context of its own, created on
        first use, whose shape is set once; the loop runs every shape once before capturing it,
        as TensorRT requires. Each context holds its own activation memory: the number of
        contexts is two per batch bucket the loop meets (:func:`~gfnet_edge.runtime.graphs.buckets`).
        """
        from ... import ops
        from ..graphs import NativeCapture

        handle = ops.stream_handle(stream)
        self._lane(handle).per_batch = True
        return NativeCapture(handle)

    @staticmethod
    def _input_shape(engine: Any, batch: int) -> Tuple[int, ...]:
        return (int(batch),) + tuple(int(d) for d in engine.get_tensor_shape("image"))[1:]

    def _set_input_shape(self, ctx: Any, graph: str, shape: Tuple[int, ...]) -> None:
        if not ctx.set_input_shape("image", shape):
            raise InputError(f"the {graph} engine rejects input shape {shape} (outside its "
                             f"optimisation profile? built for batches up to {self.max_batch})")

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
        self._set_input_shape(ctx, graph, shape)
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
        self._set_input_shape(lane.contexts[graph], graph, self._input_shape(engine, self.static_batch or len(image)))
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


#: The build side's names, importable from here too (loaded on first use: the build module
#: imports this one, so a module-level import would be a cycle).
_BUILD_NAMES = ("BuildOptions", "BuildPlan", "build_engine", "convert_to_fp16", "plan_build")


def __getattr__(name: str) -> Any:
    if name in _BUILD_NAMES:
        from . import tensorrt_build

        return getattr(tensorrt_build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
