"""Building TensorRT engines: explicit Q/DQ INT8, FP16 and FP32, for the GPU or a DLA core.

* INT8 comes only from the Q/DQ nodes of the ``int8-tensorrt`` graphs: no calibrators.
* Typing by version range (:class:`~.tensorrt_util.TrtFeatures`): TensorRT 11 has no precision
  builder flags (every network is strongly typed), so FP16 means an ONNX graph converted to
  FP16 beforehand (ModelOpt AutoCast). 10.0-10.11 build FP16 with ``BuilderFlag.FP16``;
  10.12 and later deprecate it and take the strongly typed route when ModelOpt is installed
  (the deprecated flag otherwise, with a warning). Q/DQ networks are strongly typed.
* DLA: static shapes (min = opt = max = ``max_batch``; the runner pads smaller batches),
  FP16 only (DLA does not take this project's explicit Q/DQ INT8 graphs, and runs no FP32),
  only on TensorRT versions with DLA. The builder's DLA/GPU layer report is recorded; an
  engine in which no layer runs on the DLA is refused instead of silently running on the GPU.
* Every return value that signals failure is checked; timing caches are merged, never
  overwritten by an empty or foreign one.
"""
from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ...errors import InputError, UnavailableError
from . import tensorrt_util
from .tensorrt_util import TrtFeatures


#: The largest batch DLA runs (TensorRT's "DLA Supported Layers and Restrictions"); a larger one
#: puts every layer on the GPU.
DLA_MAX_BATCH = 4096


@dataclass
class BuildOptions:
    """TensorRT builder options users expect.

    Attributes:
        precision: ``int8`` (from Q/DQ graphs), ``fp16`` or ``fp32``.
        workspace_mb: workspace memory-pool limit.
        opt_level: builder optimisation level (0-5; TensorRT's default is 3).
        timing_cache: file to read and merge the timing cache into (speeds up rebuilds).
        dla_core: DLA core to build for (Jetson Orin), ``None`` for the GPU.
        gpu_fallback: let layers DLA cannot run fall back to the GPU.
        max_batch: largest batch of the optimisation profile (the one batch of a DLA engine).
        opt_batch: batch the profile is tuned for (GPU engines).
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
        if self.dla_core is not None and self.precision != "fp16":
            why = ("DLA does not take explicit-quantization (Q/DQ) INT8 networks, and INT8 here comes only from "
                   "Q/DQ graphs" if self.precision == "int8" else "DLA runs FP16 or INT8, never FP32")
            raise InputError(f"--dla-core needs --precision fp16: {why}")
        if self.dla_core is not None and self.max_batch > DLA_MAX_BATCH:
            raise InputError(f"--dla-core needs --max-batch <= {DLA_MAX_BATCH} (DLA runs batches of at most "
                             f"{DLA_MAX_BATCH}; a DLA engine is built for its max batch), got {self.max_batch}")
        return self


@dataclass
class BuildPlan:
    """What to ask TensorRT for, decided from its version and the options.

    Attributes:
        graph_set: which bundle graphs to parse (``int8-tensorrt``, ``fp32``).
        strongly_typed: create the network with ``STRONGLY_TYPED``.
        builder_flags: ``BuilderFlag`` names to set.
        convert_fp16: convert the FP32 ONNX graph to FP16 before parsing (strongly typed FP16).
        static_batch: build for this one batch (DLA), else ``None`` (dynamic 1..max).
        notes: warnings for the user (deprecated routes).
    """

    graph_set: str
    strongly_typed: bool
    builder_flags: List[str] = field(default_factory=list)
    convert_fp16: bool = False
    static_batch: Optional[int] = None
    notes: List[str] = field(default_factory=list)


def plan_build(trt_version: str, options: BuildOptions, has_strongly_typed_flag: bool = True,
               has_modelopt: bool = False) -> BuildPlan:
    """Decides network typing, flags and shapes for a TensorRT version (10.x or 11.x)."""
    feat = TrtFeatures.of(trt_version)
    feat.require_supported()
    options.validate()
    flags: List[str] = []
    static = None
    if options.dla_core is not None:
        if not feat.dla:
            raise UnavailableError(
                f"TensorRT {trt_version} builds no DLA engines: DLA is in TensorRT 10.0-10.7 (JetPack 6 ships 10.3) "
                "and 11.4.1 or later (Jetson AGX Orin with JetPack 7.2.2 or later); build for the GPU (no --dla-core)")
        static = options.max_batch
        if options.gpu_fallback:
            flags.append("GPU_FALLBACK")
    if options.precision == "int8":
        return BuildPlan("int8-tensorrt", strongly_typed=feat.always_strongly_typed or has_strongly_typed_flag,
                         builder_flags=flags, static_batch=static)
    if options.precision == "fp16":
        if feat.always_strongly_typed or (feat.fp16_flag_deprecated and has_modelopt):
            return BuildPlan("fp32", strongly_typed=True, builder_flags=flags, convert_fp16=True, static_batch=static)
        notes = []
        if feat.fp16_flag_deprecated:
            notes.append(f"TensorRT {trt_version} deprecates BuilderFlag.FP16 (weak typing); install NVIDIA ModelOpt "
                         "(pip install 'nvidia-modelopt[onnx]') for the strongly typed FP16 route")
        return BuildPlan("fp32", strongly_typed=False, builder_flags=flags + ["FP16"], static_batch=static, notes=notes)
    return BuildPlan("fp32", strongly_typed=feat.always_strongly_typed, builder_flags=flags, static_batch=static)


def has_modelopt() -> bool:
    return importlib.util.find_spec("modelopt") is not None


def convert_to_fp16(src: Path, dst: Path) -> Path:
    """FP32 ONNX -> mixed FP16 ONNX with ModelOpt AutoCast (the strongly typed FP16 route)."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except Exception as exc:
        raise UnavailableError(
            "strongly typed FP16 engines need an FP16 ONNX graph; install NVIDIA ModelOpt "
            "(pip install nvidia-modelopt[onnx]) or use --precision int8/fp32"
        ) from exc
    import onnx

    model = convert_to_mixed_precision(onnx_path=str(src), low_precision_type="fp16", keep_io_types=True)
    onnx.save(model, str(dst))
    return dst


# ------------------------------------------------------------------ timing cache
def open_timing_cache(config: Any, path: Path) -> Any:
    """Gives the builder the cache in ``path`` (empty when the file does not exist).

    Raises:
        InputError: TensorRT cannot read it, or rejects it (written by another device or
            TensorRT version); the file is left as it is.
    """
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None:
        raise InputError(f"{path}: TensorRT could not read this timing cache; pass another --timing-cache file")
    if not config.set_timing_cache(cache, False):
        raise InputError(f"{path}: TensorRT rejected this timing cache (written on another device model or "
                         "TensorRT version); pass a --timing-cache file for this device, or move this one away")
    return cache


def save_timing_cache(config: Any, path: Path) -> bool:
    """Merges the build's timing cache into ``path`` (re-read now: another build may have
    written it meanwhile) and replaces the file atomically. Returns False, writing nothing,
    when the file on disk can no longer be merged with (it changed to a foreign cache) or
    TensorRT cannot serialize the merged cache."""
    built = config.get_timing_cache()
    if built is None:
        return False
    merged = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    if merged is None or not merged.combine(built, False):
        tensorrt_util.logger.warning("%s: timing cache changed on disk to one TensorRT cannot merge with; not updated", path)
        return False
    blob = merged.serialize()
    if blob is None:  # ITimingCache::serialize returns nullptr on failure
        tensorrt_util.logger.warning("%s: TensorRT could not serialize the timing cache; not updated", path)
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(bytes(blob))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


# ------------------------------------------------------------------ device report
_REPORT = re.compile(r"\[(Dla|Gpu)Layer\]\s*(.*)")
#: The layer type TensorRT 8.4+ puts before a GPU layer's name (``[GpuLayer] SHUFFLE: Reshape_2``).
_LAYER_TYPE = re.compile(r"^[A-Z][A-Z0-9_]*: ")


def parse_device_report(lines: List[str]) -> Optional[Dict[str, List[str]]]:
    """The builder's layer report as ``{"dla": [...], "gpu": [...]}`` (layer names, as the
    engine inspector names them); ``None`` when the log holds no report.

    The report is an INFO-level log, not an API; the forms handled are TensorRT 8.4-10.x's
    (``---------- Layers Running on DLA ----------``, ``[DlaLayer] {ForeignNode[...]}``,
    ``---------- Layers Running on GPU ----------``, ``[GpuLayer] TYPE: name``) and the one of
    NVIDIA's cuDLA sample (``--------------- Layers running on DLA:``, names ending in ``,``)."""
    found = {"dla": [], "gpu": []}
    seen = False
    for line in lines:
        if "layers running on" in line.lower():
            seen = True
        for m in _REPORT.finditer(line):
            name = _LAYER_TYPE.sub("", m.group(2).strip().rstrip(",").rstrip(), count=1)
            found[m.group(1).lower()].append(name)
            seen = True
    return found if seen else None


# ------------------------------------------------------------------------- build
def _network_flags(trt: Any, plan: BuildPlan) -> int:
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if plan.strongly_typed and typed is not None:  # 11.x: kept but ignored, passed when it exists
        return 1 << int(typed)
    return 0


def _parse(trt: Any, network: Any, log: Any, onnx_path: Path, plan: BuildPlan) -> None:
    parser = trt.OnnxParser(network, log)
    src = Path(onnx_path)
    with tempfile.TemporaryDirectory() as td:
        if plan.convert_fp16:
            src = convert_to_fp16(src, Path(td) / "fp16.onnx")
        if not parser.parse_from_file(str(src)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise InputError(f"{onnx_path}: TensorRT's ONNX parser failed: {errs}")


def _configure(trt: Any, builder: Any, network: Any, plan: BuildPlan, options: BuildOptions,
               onnx_path: Path) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer details for the engine inspector
    if options.opt_level is not None:
        config.builder_optimization_level = int(options.opt_level)
    for f in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    if options.dla_core is not None:
        available = int(getattr(builder, "num_DLA_cores", 0))
        if options.dla_core >= available:
            raise UnavailableError(f"DLA core {options.dla_core} asked for, but this device has {available} DLA "
                                   "core(s); build for the GPU (no --dla-core)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(options.dla_core)
    profile = builder.create_optimization_profile()
    if network.num_inputs != 1:
        raise InputError(f"{onnx_path}: the graph has {network.num_inputs} inputs; gfnet-edge builds engines of "
                         "graphs with one image input (N, C, H, W)")
    inp = network.get_input(0)
    dims = tuple(int(d) for d in inp.shape)
    if len(dims) != 4 or min(dims[1:]) < 1:
        raise InputError(f"{onnx_path}: input {inp.name!r} has shape {dims}; gfnet-edge needs (N, C, H, W) with "
                         "fixed C, H and W (export the graph with a dynamic batch axis only)")
    _, c, h, w = dims
    lo = plan.static_batch or 1
    opt = plan.static_batch or options.opt_batch
    hi = plan.static_batch or options.max_batch
    if dims[0] != -1 and not lo == hi == dims[0]:
        raise InputError(f"{onnx_path}: input {inp.name!r} has a fixed batch of {dims[0]} (the profile asks for "
                         f"{lo}..{hi}); export the graph with a dynamic batch axis")
    try:  # the Python binding returns None and raises RuntimeError on inconsistent shapes
        profile.set_shape(inp.name, (lo, c, h, w), (opt, c, h, w), (hi, c, h, w))
    except RuntimeError as exc:
        raise InputError(f"{onnx_path}: TensorRT refused the batch profile {lo}/{opt}/{hi} for input "
                         f"{inp.name!r} of shape {tuple(inp.shape)}: {exc}") from exc
    if config.add_optimization_profile(profile) < 0:
        raise InputError(f"{onnx_path}: TensorRT refused the optimisation profile (batches {lo}..{hi}); "
                         "check --max-batch / --opt-batch")
    return config


def build_engine(onnx_path: Path, out_path: Path, options: BuildOptions) -> Dict[str, Any]:
    """Builds one serialized engine from an ONNX graph (input ``image``, dynamic batch).

    Returns:
        The engine's manifest fields: TensorRT version, device model, options, typing, the
        static batch (DLA) and, for DLA engines, the builder's layer placement
        (``device_map``, ``dla_layers``, ``gpu_layers``).
    """
    options.validate()
    trt = tensorrt_util.import_tensorrt()
    here = tensorrt_util.gpu_info()
    version = trt.__version__
    plan = plan_build(version, options, hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"), has_modelopt())
    for note in plan.notes:
        tensorrt_util.logger.warning(note)
    log = tensorrt_util.trt_logger(trt)
    builder = trt.Builder(log)
    network = builder.create_network(_network_flags(trt, plan))
    if network is None:
        raise UnavailableError("TensorRT could not create a network definition (see the TensorRT log above)")
    _parse(trt, network, log, onnx_path, plan)
    config = _configure(trt, builder, network, plan, options, onnx_path)
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    if cache_path is not None:
        open_timing_cache(config, cache_path)
    with log.capture() as lines:
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InputError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    entry: Dict[str, Any] = {
        "backend": "tensorrt", "precision": options.precision, "tensorrt_version": version,
        **here, "build_options": asdict(options), "graph_set": plan.graph_set,
        "strongly_typed": plan.strongly_typed, "static_batch": plan.static_batch,
    }
    if options.dla_core is not None:
        report = parse_device_report(lines)
        if report is not None and not report["dla"]:
            raise InputError(f"{onnx_path}: no layer runs on DLA core {options.dla_core}: every layer fell back to "
                             "the GPU (see the TensorRT log with -vv); build for the GPU (no --dla-core) instead")
        entry["device_map"] = report
        entry["dla_layers"] = None if report is None else len(report["dla"])
        entry["gpu_layers"] = None if report is None else len(report["gpu"])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(bytes(serialized))
    if cache_path is not None:
        save_timing_cache(config, cache_path)
    return entry
