"""TensorRT backend: engine building (explicit Q/DQ INT8, FP16, FP32) and execution.

Written against the TensorRT 10.x and 11.x Python API and imported lazily; without TensorRT or
a GPU every entry point raises :class:`~gfnet_edge.errors.UnavailableError` saying how to
proceed. Decisions that do not need TensorRT itself (flags per version, engine compatibility)
are plain functions so they are tested on machines without it.

* INT8 comes only from the Q/DQ nodes of the ``int8-tensorrt`` graphs: no calibrators.
* TensorRT 11 removed the precision builder flags: networks are strongly typed, and FP16 means
  an ONNX graph converted to FP16 beforehand (ModelOpt AutoCast). On 10.x FP16 uses
  ``BuilderFlag.FP16``; Q/DQ networks are built strongly typed where the flag exists.
* Engines are deserialised with ``engine_host_code_allowed = False``.
* Execution uses ``execute_async_v3`` with tensor addresses on one stream; device memory comes
  from the extension's :class:`DeviceBuffer` (no pycuda needed). :meth:`TensorRTRunner.run`
  copies numpy in and out; :meth:`TensorRTRunner.run_device` reads a device batch and leaves
  the outputs in the runner's device buffers, on the caller's stream, without host copies.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ...errors import InputError, UnavailableError
from .base import GRAPHS, Runner

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


@dataclass
class BuildOptions:
    """TensorRT builder options users expect.

    Attributes:
        precision: ``int8`` (from Q/DQ graphs), ``fp16`` or ``fp32``.
        workspace_mb: workspace memory-pool limit.
        opt_level: builder optimisation level (0-5; TensorRT's default is 3).
        timing_cache: file to read/write the timing cache (speeds up rebuilds).
        dla_core: DLA core to build for (Jetson Xavier/Orin), ``None`` for the GPU.
        gpu_fallback: let layers DLA cannot run fall back to the GPU.
        max_batch: largest batch of the optimisation profile.
        opt_batch: batch the profile is tuned for.
    """

    precision: str = "int8"
    workspace_mb: int = 1024
    opt_level: Optional[int] = None
    timing_cache: Optional[str] = None
    dla_core: Optional[int] = None
    gpu_fallback: bool = True
    max_batch: int = 32
    opt_batch: int = 1

    def validate(self) -> "BuildOptions":
        if self.precision not in ("int8", "fp16", "fp32"):
            raise InputError(f"precision must be int8, fp16 or fp32, got {self.precision!r}")
        if not (1 <= self.opt_batch <= self.max_batch <= 65536):
            raise InputError(f"need 1 <= opt batch ({self.opt_batch}) <= max batch ({self.max_batch}) <= 65536")
        if self.workspace_mb < 16:
            raise InputError(f"workspace must be >= 16 MiB, got {self.workspace_mb}")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise InputError(f"builder optimisation level must be 0..5, got {self.opt_level}")
        if self.dla_core is not None and self.dla_core < 0:
            raise InputError(f"DLA core must be >= 0, got {self.dla_core}")
        return self


@dataclass
class BuildPlan:
    """What to ask TensorRT for, decided from its version and the precision.

    Attributes:
        graph_set: which bundle graphs to parse (``int8-tensorrt``, ``fp16``, ``fp32``).
        strongly_typed: create the network with ``STRONGLY_TYPED``.
        builder_flags: ``BuilderFlag`` names to set.
        convert_fp16: convert the FP32 ONNX graph to FP16 before parsing (11.x route).
    """

    graph_set: str
    strongly_typed: bool
    builder_flags: List[str] = field(default_factory=list)
    convert_fp16: bool = False


def plan_build(trt_version: str, options: BuildOptions, has_strongly_typed_flag: bool = True) -> BuildPlan:
    """Decides flags for a TensorRT version (10.x or 11.x) and precision."""
    major, _, _ = parse_version(trt_version)
    if major < 10:
        raise UnavailableError(f"TensorRT {trt_version} is too old: gfnet-edge needs TensorRT 10 or 11")
    flags: List[str] = []
    if options.dla_core is not None and options.gpu_fallback:
        flags.append("GPU_FALLBACK")
    if options.precision == "int8":
        # Explicit quantization: Q/DQ nodes carry the precision; strongly typed where available.
        return BuildPlan("int8-tensorrt", strongly_typed=major >= 11 or has_strongly_typed_flag, builder_flags=flags)
    if options.precision == "fp16":
        if major >= 11:
            return BuildPlan("fp32", strongly_typed=True, builder_flags=flags, convert_fp16=True)
        return BuildPlan("fp32", strongly_typed=False, builder_flags=flags + ["FP16"])
    return BuildPlan("fp32", strongly_typed=major >= 11, builder_flags=flags)


def convert_to_fp16(src: Path, dst: Path) -> Path:
    """FP32 ONNX -> mixed FP16 ONNX with ModelOpt AutoCast (TensorRT 11's documented FP16 route)."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except Exception as exc:
        raise UnavailableError(
            "FP16 engines on TensorRT 11 need an FP16 ONNX graph; install NVIDIA ModelOpt "
            "(pip install nvidia-modelopt[onnx]) or use --precision int8/fp32"
        ) from exc
    import onnx

    model = convert_to_mixed_precision(onnx_path=str(src), low_precision_type="fp16", keep_io_types=True)
    onnx.save(model, str(dst))
    return dst


# --------------------------------------------------------------------- device info
def gpu_info() -> Dict[str, Any]:
    """Name and compute capability of CUDA device 0, via the extension.

    Raises:
        UnavailableError: no CUDA build or no GPU.
    """
    from ... import ops

    if ops.cuda_device_count() < 1:
        raise UnavailableError("no CUDA GPU is visible here; " + HOW_TO)
    props = ops.cuda_device_properties(0)
    return {"gpu_name": props["name"], "compute_capability": f"{props['major']}.{props['minor']}"}


def engine_dir_name(info: Dict[str, Any], trt_version: str, dla_core: Optional[int] = None) -> str:
    name = re.sub(r"[^A-Za-z0-9]+", "-", info["gpu_name"]).strip("-").lower() or "gpu"
    dla = f"-dla{dla_core}" if dla_core is not None else ""
    return f"{name}-sm{info['compute_capability'].replace('.', '')}-trt{trt_version}{dla}"


def check_engine_compat(entry: Dict[str, Any], here: Dict[str, Any], trt_version: str, bundle_root: Path) -> None:
    """Refuses an engine built for another GPU or TensorRT version, saying how to rebuild."""
    problems = []
    if entry.get("compute_capability") != here["compute_capability"]:
        problems.append(
            f"GPU {entry.get('gpu_name')} (compute capability {entry.get('compute_capability')}) "
            f"vs this {here['gpu_name']} ({here['compute_capability']})"
        )
    if entry.get("tensorrt_version") != trt_version:
        problems.append(f"TensorRT {entry.get('tensorrt_version')} vs this TensorRT {trt_version}")
    if problems:
        raise InputError(
            f"{bundle_root}: the {entry.get('precision')} engines were built for another device: "
            + "; ".join(problems)
            + f". Engines are specific to the GPU and TensorRT version: rebuild them here with "
            f"`gfnet-edge build-engine {bundle_root} --backend tensorrt --precision {entry.get('precision')}`"
        )


def engine_dla_core(entry: Dict[str, Any]) -> Optional[int]:
    """The DLA core an engine entry was built for (``None``: the GPU)."""
    core = entry.get("build_options", {}).get("dla_core")
    return None if core is None else int(core)


def same_engine_slot(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two engine entries are for the same precision, GPU, TensorRT version and DLA core
    (a new build replaces the old entry of its slot)."""
    keys = ("precision", "compute_capability", "tensorrt_version")
    return all(a.get(k) == b.get(k) for k in keys) and engine_dla_core(a) == engine_dla_core(b)


def _target(dla_core: Optional[int]) -> str:
    return "GPU" if dla_core is None else f"DLA core {dla_core}"


def select_engine(bundle, precision: str = "auto", here: Optional[Dict[str, Any]] = None,
                  trt_version: Optional[str] = None, dla_core: Optional[int] = None) -> Dict[str, Any]:
    """The bundle's engine entry for this device, ``precision`` (``auto``: int8 > fp16 > fp32)
    and target: the GPU (``dla_core=None``) or one DLA core. A bundle may hold engines for
    both (``build-engine --dla-core N`` adds DLA engines beside the GPU ones)."""
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
    matching = [e for e in candidates if e.get("compute_capability") == here["compute_capability"] and e.get("tensorrt_version") == trt_version]
    if matching:
        return matching[0]
    check_engine_compat(candidates[0], here, trt_version, bundle.root)
    return candidates[0]  # pragma: no cover - check_engine_compat raised


# ------------------------------------------------------------------------- build
def build_engine(onnx_path: Path, out_path: Path, options: BuildOptions) -> Dict[str, Any]:
    """Builds one serialized engine from an ONNX graph (input ``image``, dynamic batch).

    Returns:
        The engine's manifest fields (version, GPU, options).
    """
    options.validate()
    trt = import_tensorrt()
    here = gpu_info()
    version = trt.__version__
    plan = plan_build(version, options, hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"))
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    flags = 0
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if plan.strongly_typed and typed_flag is not None:  # 11.x: always strongly typed, the flag is kept but ignored
        flags |= 1 << int(typed_flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    src = Path(onnx_path)
    with tempfile.TemporaryDirectory() as td:
        if plan.convert_fp16:
            src = convert_to_fp16(src, Path(td) / "fp16.onnx")
        if not parser.parse_from_file(str(src)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise InputError(f"{onnx_path}: TensorRT's ONNX parser failed: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
    if options.opt_level is not None:
        config.builder_optimization_level = int(options.opt_level)
    for f in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    if options.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(options.dla_core)
    cache = None
    if options.timing_cache:
        blob = Path(options.timing_cache).read_bytes() if Path(options.timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    _, c, h, w = inp.shape
    profile.set_shape(inp.name, (1, c, h, w), (options.opt_batch, c, h, w), (options.max_batch, c, h, w))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InputError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(bytes(serialized))
    if cache is not None:
        Path(options.timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "backend": "tensorrt", "precision": options.precision, "tensorrt_version": version,
        **here, "build_options": asdict(options), "graph_set": plan.graph_set,
        "strongly_typed": plan.strongly_typed,
    }


# ---------------------------------------------------------------------- execute
class TensorRTRunner(Runner):
    """Runs the bundle's glance/focus engines on one CUDA stream.

    :meth:`run` (numpy) uses the runner's own stream; :meth:`run_device` enqueues on the
    caller's stream and keeps inputs and outputs in device memory (the outputs live in the
    runner's :class:`~gfnet_edge.ops.DeviceBuffer` s, one per graph and tensor, grown on demand).

    Args:
        bundle: the loaded bundle.
        entry: its engine entry (:func:`select_engine`).
    """

    name = "tensorrt"
    supports_device = True
    #: TensorRT requires tensor addresses aligned to 256 bytes.
    ADDRESS_ALIGNMENT = 256

    def __init__(self, bundle, entry: Dict[str, Any]) -> None:
        super().__init__(f"{entry['precision']}-tensorrt")
        self.bundle = bundle
        self.entry = entry
        self.max_batch = int(entry.get("build_options", {}).get("max_batch", 32))
        self._engines: Dict[str, Any] = {}
        self._contexts: Dict[str, Any] = {}
        self._buffers: Dict[Tuple[str, str], Any] = {}
        self._stream = None

    def _activate(self) -> None:
        from ... import ops

        trt = import_tensorrt()
        self._trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if hasattr(runtime, "engine_host_code_allowed"):
            runtime.engine_host_code_allowed = False  # never run host code embedded in an engine
        core = engine_dla_core(self.entry)
        if core is not None:  # a DLA engine runs on the core the runtime names at deserialisation
            available = int(getattr(runtime, "num_DLA_cores", 0))
            if core >= available:
                raise UnavailableError(f"the engines were built for DLA core {core}, but this device has "
                                       f"{available} DLA core(s); use the GPU engines (no --dla-core) or rebuild")
            runtime.DLA_core = core
        for g in GRAPHS:
            path = self.bundle.path(self.entry[g])
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise InputError(f"{path}: TensorRT could not deserialize this engine (truncated, corrupt or built elsewhere)")
            self._engines[g] = engine
            self._contexts[g] = engine.create_execution_context()
        self._stream = ops.Stream()

    def _deactivate(self) -> None:
        self._contexts.clear()
        self._engines.clear()
        self._buffers.clear()
        if self._stream is not None:
            self._stream.synchronize()
        self._stream = None

    def _buffer(self, graph: str, name: str, nbytes: int):
        from ... import ops

        key = (graph, name)
        buf = self._buffers.get(key)
        if buf is None or buf.nbytes < nbytes:
            buf = ops.DeviceBuffer(max(nbytes, 1))
            self._buffers[key] = buf
        return buf

    def _set_input_shape(self, ctx: Any, graph: str, shape: Tuple[int, ...]) -> None:
        if not ctx.set_input_shape("image", shape):
            raise InputError(f"the {graph} engine rejects input shape {shape} (outside its "
                             f"optimisation profile? built for batches up to {self.max_batch})")

    def _run(self, graph: str, image: np.ndarray) -> Dict[str, np.ndarray]:
        trt = self._trt
        engine, ctx, stream = self._engines[graph], self._contexts[graph], self._stream
        image = np.ascontiguousarray(image, dtype=np.float32)
        self._set_input_shape(ctx, graph, tuple(image.shape))
        inp = self._buffer(graph, "image", image.nbytes)
        inp.copy_from_host(image, stream)
        ctx.set_tensor_address("image", inp.ptr)
        outs: Dict[str, Tuple[Any, np.ndarray]] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            host = np.empty(shape, dtype)
            buf = self._buffer(graph, name, host.nbytes)
            ctx.set_tensor_address(name, buf.ptr)
            outs[name] = (buf, host)
        if not ctx.execute_async_v3(stream.handle):
            raise RuntimeError(f"TensorRT failed to enqueue the {graph} engine")
        for buf, host in outs.values():
            buf.copy_to_host(host, stream)
        stream.synchronize()
        return {k: v[1].astype(np.float32, copy=False) for k, v in outs.items()}

    def _run_device(self, graph: str, image: int, batch: int, stream: int) -> Dict[str, Tuple[int, Tuple[int, ...]]]:
        from ... import ops

        trt = self._trt
        engine, ctx = self._engines[graph], self._contexts[graph]
        if engine.get_tensor_dtype("image") != trt.float32:
            raise InputError(f"the {graph} engine takes {engine.get_tensor_dtype('image')} images; "
                             "the device loop feeds float32")
        in_shape = (batch,) + tuple(int(d) for d in engine.get_tensor_shape("image"))[1:]
        self._set_input_shape(ctx, graph, in_shape)
        if image % self.ADDRESS_ALIGNMENT:
            # A misaligned view (e.g. a slice of a larger batch): stage it in an aligned buffer.
            nbytes = int(np.prod(in_shape)) * 4
            staged = self._buffer(graph, "image", nbytes)
            ops.cuda_copy(staged, image, nbytes, stream)
            image = staged.ptr
        if not ctx.set_tensor_address("image", image):
            raise RuntimeError(f"TensorRT refused the input address of the {graph} engine")
        outs: Dict[str, Tuple[int, Tuple[int, ...]]] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            if engine.get_tensor_dtype(name) != trt.float32:
                raise InputError(f"the {graph} engine's output {name!r} is {engine.get_tensor_dtype(name)}; "
                                 "the device loop needs float32 outputs")
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"TensorRT could not infer the shape of {graph} output {name!r}: {shape}")
            buf = self._buffer(graph, name, max(int(np.prod(shape)) * 4, 1))
            if not ctx.set_tensor_address(name, buf.ptr):
                raise RuntimeError(f"TensorRT refused the address of the {graph} output {name!r}")
            outs[name] = (buf.ptr, shape)
        if not ctx.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT failed to enqueue the {graph} engine")
        return outs
