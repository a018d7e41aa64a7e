"""``gfnet-edge doctor BUNDLE``: the first command to run on a Jetson.

It reports the device (TensorRT, CUDA driver, GPU name, compute capability and SM count,
board model, DLA cores, L4T release and power mode where readable), selects the bundle's
engines for this device (``--build`` builds them when missing), runs them at batch 1, a
middle batch and the max batch, through the host path (``run``) and the device path
(``run_device`` on an explicit stream), compares the outputs with ONNX Runtime on the same
inputs within :data:`TOLERANCES`, shows where the layers of DLA engines run, and writes
everything to a JSON file to attach to a bug report.

Exit status: 0 every check passed, 1 a check failed (the report says which), 2 bad input,
3 TensorRT or a GPU missing (one line saying what).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .argtypes import NON_NEGATIVE, int_range
from .errors import GFNetEdgeError, InputError

#: Largest accepted error per engine precision: max |TensorRT - ONNX Runtime| over an output,
#: divided by max(1, max |ONNX Runtime|). INT8 engines are compared with the same Q/DQ graphs
#: on ONNX Runtime, FP16 and FP32 engines with the FP32 graphs.
TOLERANCES = {"fp32": 1e-3, "fp16": 2e-2, "int8": 5e-2}
#: ``--precision``: an engine precision, or ``auto``; the graph-set names are accepted as in ``predict``.
PRECISIONS = ("auto", "int8", "fp16", "fp32", "int8-tensorrt", "fp32-tensorrt")


@dataclass
class Check:
    """One check: what ran, whether it passed, the error against the reference, and its time."""

    name: str
    ok: bool
    error: Optional[float] = None
    tolerance: Optional[float] = None
    ms: Optional[float] = None
    detail: str = ""


@dataclass
class DoctorReport:
    """Everything ``doctor`` found; :meth:`text` for people, :meth:`to_json` for the file."""

    bundle: str
    environment: Dict[str, Any]
    engine: Optional[Dict[str, Any]] = None
    checks: List[Check] = field(default_factory=list)
    layers: Dict[str, List[Dict[str, str]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, **kw: Any) -> Check:
        self.checks.append(Check(name, ok, **kw))
        return self.checks[-1]

    def to_json(self) -> str:
        """Strict JSON: an error that is not finite (an engine that outputs NaN) is ``null``."""
        from .bundle import finite_or_null

        return json.dumps(finite_or_null(asdict(self)), indent=2, default=str, allow_nan=False)

    def text(self) -> str:
        lines = [f"gfnet-edge doctor: {self.bundle}"]
        lines += [f"  {k:<20} {v}" for k, v in self.environment.items()]
        if self.engine:
            e = self.engine
            lines.append(f"  {'engine':<20} {e.get('precision')} on {e.get('target')} "
                         f"(built with TensorRT {e.get('tensorrt_version')}, batches up to {e.get('max_batch')})")
        for c in self.checks:
            err = "" if c.error is None else f"  error {c.error:.2e} (tolerance {c.tolerance:.0e})"
            ms = "" if c.ms is None else f"  {c.ms:.2f} ms"
            lines.append(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}{err}{ms}{('  ' + c.detail) if c.detail else ''}")
        for g, layers in self.layers.items():
            lines.append(f"  {g} engine layers ({sum(x['device'] == 'DLA' for x in layers)} on DLA):")
            lines += [f"    {x['device']:<4} {x['name']}" for x in layers]
        lines.append("  result: " + ("all checks passed" if self.ok else "FAILED"))
        return "\n".join(lines)


# ------------------------------------------------------------------ environment
def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text(errors="replace").strip("\x00\n ") or None
    except OSError:
        return None


def _cuda_driver_version() -> Optional[str]:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
            return None
        return f"{v.value // 1000}.{(v.value % 1000) // 10}"
    except OSError:
        return None


def _power_mode() -> Optional[str]:
    """The nvpmodel mode (Jetson), from its status file."""
    status = _read("/var/lib/nvpmodel/status")
    return status.replace("pmode:", "mode ") if status else None


def environment(trt: Any, here: Dict[str, Any]) -> Dict[str, Any]:
    """What this device is; fields that cannot be read here are "unknown"."""
    from .runtime.backends.tensorrt_util import trt_logger

    dla = getattr(trt.Runtime(trt_logger(trt)), "num_DLA_cores", None)
    env = {
        "tensorrt": trt.__version__, "cuda driver": _cuda_driver_version(), "gpu": here.get("gpu_name"),
        "compute capability": here.get("compute_capability"), "multiprocessors": here.get("multiprocessors"),
        "device model": here.get("device_model"), "dla cores": dla,
        "l4t": (_read("/etc/nv_tegra_release") or "").split("\n")[0] or None, "power mode": _power_mode(),
        "python": platform.python_version(), "machine": platform.machine(),
    }
    return {k: ("unknown" if v is None else v) for k, v in env.items()}


# ---------------------------------------------------------------------- checks
def _rel_error(got: Dict[str, np.ndarray], want: Dict[str, np.ndarray]) -> float:
    if set(got) != set(want):
        raise InputError(f"the engine's outputs {sorted(got)} differ from the graph's {sorted(want)}")
    return max(float(np.max(np.abs(got[k].astype(np.float64) - want[k]))) / max(1.0, float(np.max(np.abs(want[k]))))
               for k in want)


def _read_device(outs: Dict[str, Any], stream: Any) -> Dict[str, np.ndarray]:
    """Copies ``run_device`` outputs ({name: (ptr, shape)}) to the host, in order on ``stream``."""
    from . import ops

    res = {}
    for name, (ptr, shape) in outs.items():
        host = np.empty(shape, np.float32)
        tmp = ops.DeviceBuffer(max(host.nbytes, 1))
        ops.cuda_copy(tmp, ptr, host.nbytes, stream)
        tmp.copy_to_host(host, stream)
        res[name] = host
    return res


def _select_or_build(bundle, here, trt, args, report: DoctorReport):
    from .runtime.backends.tensorrt_engines import select_engine

    try:
        return bundle, select_engine(bundle, args.precision, here, trt.__version__, args.dla_core)
    except InputError as exc:
        if not args.build:
            report.add("engines for this device", False, detail=f"{exc} (or run `gfnet-edge doctor {bundle.root} "
                                                                 "--build`)")
            return bundle, None
    from .build import BuildConfig, build_engines
    from .runtime.backends.tensorrt_build import BuildOptions

    precision = "int8" if args.precision == "auto" else args.precision.replace("-tensorrt", "")
    opts = BuildOptions(precision=precision, dla_core=args.dla_core,
                        **({} if args.max_batch is None else {"max_batch": args.max_batch})).validate()
    t0 = time.perf_counter()
    bundle = build_engines(bundle.root, BuildConfig(precision=precision, backend="tensorrt", trt=opts))
    report.add(f"build {precision} engines", True, ms=(time.perf_counter() - t0) * 1e3)
    return bundle, select_engine(bundle, precision, here, trt.__version__, args.dla_core)


#: Layers a DLA engine adds to move its tensors between GPU memory and the DLA's (``image to
#: nvm``, ``logits from nvm``, ``logits copy finish``); the builder's report names neither side.
_DLA_COPY = re.compile(r" (to nvm|from nvm|copy finish)$")


def _layer_map(runner: Any, trt: Any, entry: Dict[str, Any]) -> Dict[str, List[Dict[str, str]]]:
    """Per engine layer (engine inspector) its device, from the builder's DLA report: ``DLA``,
    ``GPU``, ``copy`` (a DLA engine's tensor moves) or ``?`` (a layer the report does not name)."""
    out = {}
    for g, engine in runner._engines.items():
        placement = (entry.get("dla_placement") or {}).get(g, {}).get("device_map") or {"dla": [], "gpu": []}
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
        names = [x if isinstance(x, str) else x.get("Name", "?") for x in info.get("Layers", [])]

        def dev(n: str) -> str:
            if n in placement["dla"]:
                return "DLA"
            if n in placement["gpu"]:
                return "GPU"
            return "copy" if placement["dla"] and _DLA_COPY.search(n) else "?"

        out[g] = [{"name": n, "device": dev(n)} for n in names]
    return out


def _run_checks(bundle, entry: Dict[str, Any], trt: Any, report: DoctorReport, seed: int) -> None:
    from . import ops
    from .runtime.backends.base import GRAPHS
    from .runtime.backends.onnxruntime import OnnxRuntimeRunner
    from .runtime.backends.tensorrt import TensorRTRunner
    from .runtime.backends.tensorrt_engines import engine_dla_core

    precision = entry["precision"]
    tol = TOLERANCES[precision]
    runner = TensorRTRunner(bundle, entry)
    core = engine_dla_core(entry)
    report.engine = {"precision": precision, "tensorrt_version": entry.get("tensorrt_version"),
                     "target": "GPU" if core is None else f"DLA core {core}", "max_batch": runner.max_batch,
                     "static_batch": entry.get("static_batch"), "files": [entry[g] for g in GRAPHS]}
    ref_set = "int8-tensorrt" if precision == "int8" else "fp32"
    P = bundle.model.patch_size
    rng = np.random.default_rng(seed)
    batches = sorted({1, max(1, runner.max_batch // 2), runner.max_batch})
    with OnnxRuntimeRunner(bundle.graph_paths(ref_set), ref_set, threads=1) as ref:
        try:
            runner.activate()
        except GFNetEdgeError as exc:
            report.add("load engines", False, detail=str(exc))
            return
        try:
            report.add("load engines", True)
            stream = ops.Stream()
            for n in batches:
                x = rng.uniform(-2.0, 2.0, (n, 3, P, P)).astype(np.float32)
                dev = ops.DeviceBuffer(x.nbytes)
                dev.copy_from_host(x, stream)
                for g in GRAPHS:
                    want = ref.run(g, x)
                    for path in ("run", "run_device"):
                        name = f"{g} batch {n} ({path})"
                        try:
                            t0 = time.perf_counter()
                            if path == "run":
                                got = runner.run(g, x)
                            else:
                                got = _read_device(runner.run_device(g, dev.ptr, n, stream), stream)
                            ms = (time.perf_counter() - t0) * 1e3
                            err = _rel_error(got, want)
                            report.add(name, err <= tol, error=err, tolerance=tol, ms=ms)
                        except (GFNetEdgeError, RuntimeError, ValueError) as exc:
                            report.add(name, False, detail=str(exc))
            if core is not None:
                report.layers = _layer_map(runner, trt, entry)
        finally:
            runner.deactivate()


def run_doctor(args: argparse.Namespace) -> DoctorReport:
    """Runs every check (see the module docstring) and returns the report.

    Raises:
        UnavailableError: no TensorRT or no GPU here.
        InputError: not a bundle.
    """
    from .bundle import Bundle
    from .runtime.backends.tensorrt_util import gpu_info, import_tensorrt

    bundle = Bundle.load(args.bundle)  # a wrong path is bad input (2), whatever this machine has
    trt = import_tensorrt()
    here = gpu_info()
    report = DoctorReport(str(args.bundle), environment(trt, here))
    bundle, entry = _select_or_build(bundle, here, trt, args, report)
    if entry is not None:
        _run_checks(bundle, entry, trt, report, args.seed)
    return report


def _output_path(args: argparse.Namespace) -> Path:
    out = Path(args.output) if args.output else Path(f"gfnet-edge-doctor-{time.strftime('%Y%m%d-%H%M%S')}.json")
    if out.exists():
        raise InputError(f"{out} exists; pass another -o FILE (doctor never overwrites a file)")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent} is not a directory")
    return out


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.max_batch is not None and not args.build:
        raise InputError("--max-batch applies with --build (the engines' max batch); without it doctor checks the "
                         "engines as they were built")
    out = _output_path(args)
    report = run_doctor(args)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(report.to_json())
        tmp.replace(out)
    except OSError as exc:  # a full disk: one line, and no partial file left
        tmp.unlink(missing_ok=True)
        raise InputError(f"{out}: cannot write the report ({exc.strerror or exc})") from exc
    print(report.text())
    print(f"report written to {out} (attach it to a bug report)")
    return 0 if report.ok else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .runtime.backends.tensorrt_build import BuildOptions

    p = sub.add_parser(
        "doctor", help="check TensorRT on this device against ONNX Runtime, and write a report",
        description="Report TensorRT, CUDA, the GPU and DLA; run the bundle's engines at batch 1, a middle batch and "
                    "the max batch (host and device paths) against ONNX Runtime; write everything to a JSON file. "
                    "Exit 0: all checks passed; 1: a check failed; 2: bad input; 3: TensorRT or a GPU is missing.")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, metavar="PRECISION",
                   help="engine precision: auto (int8 > fp16 > fp32; the default), int8, fp16, fp32")
    p.add_argument("--dla-core", type=NON_NEGATIVE,
                   help="check the engines built for this DLA core (default: the GPU engines)")
    p.add_argument("--build", action="store_true", help="build the engines for this device when the bundle has none")
    p.add_argument("--max-batch", type=int_range(1, 65536),
                   help=f"with --build: the engines' max batch (default {BuildOptions().max_batch})")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the random test inputs (default 0)")
    p.add_argument("-o", "--output", help="report file (default gfnet-edge-doctor-DATE-TIME.json here)")
    p.set_defaults(func=cmd_doctor)
