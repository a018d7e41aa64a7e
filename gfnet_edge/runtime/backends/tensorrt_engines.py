"""Which TensorRT engine of a bundle fits this device: selection and compatibility checks.

Engines are specific to the device model (GPU name, compute capability, board model, SM count),
the TensorRT version and the target (the GPU or one DLA core). A bundle may hold engines for
several of them; :func:`select_engine` picks the one for here, or says how to build it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from ...errors import InputError
from . import tensorrt_util


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


#: Why DLA engines run as plain launches: TensorRT does not support CUDA graphs together with DLA
#: offloading (trtexec switches graphs off when a DLA core is set, with this warning).
DLA_NOT_CAPTURED = "DLA engines are not captured: CUDA graphs and DLA offloading are not supported together"


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
        here = tensorrt_util.gpu_info()
    if trt_version is None:
        trt_version = tensorrt_util.import_tensorrt().__version__
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

