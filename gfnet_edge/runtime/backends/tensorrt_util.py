"""TensorRT essentials shared by the build side, engine selection and the runner.

Written against the TensorRT 10.x and 11.x Python API and imported lazily; without TensorRT or
a GPU every entry point raises :class:`~gfnet_edge.errors.UnavailableError` saying how to
proceed. What does not need TensorRT itself (features per version range) is a plain function,
tested on machines without it.

* One ``ILogger`` per process (:func:`trt_logger`), as TensorRT expects; it forwards to the
  ``gfnet_edge`` logger and can record a build's messages (the DLA device report).
* :func:`gpu_info` names this device the way engine entries record theirs.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ...errors import UnavailableError

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


#: TensorRT requires tensor addresses aligned to 256 bytes.
ADDRESS_ALIGNMENT = 256


def safe_runtime(trt, dla_core: Optional[int] = None, what: str = "the engines were"):
    """A ``trt.Runtime`` that never runs host code embedded in an engine.

    ``dla_core``: the DLA core the engines it deserialises were built for, named to the runtime
    (``IRuntime.DLA_core``) before any is deserialised: TensorRT runs a DLA engine on the core
    its runtime names, core 0 where none is named.

    Raises:
        UnavailableError: this device has no DLA core ``dla_core`` (``what`` names the engines).
    """
    runtime = trt.Runtime(trt_logger(trt))
    if hasattr(runtime, "engine_host_code_allowed"):
        runtime.engine_host_code_allowed = False
    if dla_core is not None:
        available = int(getattr(runtime, "num_DLA_cores", 0))
        if dla_core >= available:
            raise UnavailableError(f"{what} built for DLA core {dla_core}, but this device has {available} DLA "
                                   "core(s); use the GPU engines (no --dla-core) or rebuild")
        runtime.DLA_core = int(dla_core)
    return runtime


def io_names(engine: Any, mode: Any = None) -> List[str]:
    """An engine's I/O tensor names, in order (only those of ``trt.TensorIOMode`` ``mode``)."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    return names if mode is None else [n for n in names if engine.get_tensor_mode(n) == mode]


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

