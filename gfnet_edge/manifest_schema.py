"""The schema of a bundle's ``manifest.json``, checked when a bundle is loaded.

Every field the runtime reads is checked for its type, its range and its consistency with the
other fields (sizes, steps, thresholds, budgets, paths listed as artifacts), and a problem is
reported as one :class:`ManifestError` naming the field (``model.patch_size``,
``budgets.ms-3.0.thresholds[1]`` ...). Fields the runtime does not read (``created``,
``costs``, ``quantization`` ...) may hold anything JSON holds.

The checks are plain typed code rather than a JSON Schema document: most of what matters is
consistency between fields (thresholds per step, a patch no larger than the image, graph and
engine paths that are artifacts), which a schema validator cannot express, and the runtime
on the device then needs no further dependency.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Sequence

from .errors import InputError

INTERPOLATIONS = ("bilinear", "bicubic")
CLASSIFIERS = ("gru", "cascaded")
STEP0 = ("classifier", "backbone")
GRAPHS = ("glance", "focus")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: Sizes above this are refused (no real model comes near; it keeps buffer sizes far from overflow).
MAX_SIZE = 1 << 16


class ManifestError(InputError):
    """A manifest field with a wrong type, range or an inconsistency; the message names it."""


def _fail(field: str, problem: str) -> None:
    raise ManifestError(f"manifest field '{field}' {problem}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _obj(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        _fail(field, f"must be an object, got {_kind(value)}")
    return value


def _str(value: Any, field: str, choices: Sequence[str] = ()) -> str:
    if not isinstance(value, str) or not value:
        _fail(field, f"must be a non-empty string, got {_kind(value)}")
    if choices and value not in choices:
        _fail(field, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _int(value: Any, field: str, lo: int = 1, hi: int = MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, f"must be an integer, got {_kind(value)}")
    if not lo <= value <= hi:
        _fail(field, f"must be in [{lo}, {hi}], got {value}")
    return value


def _num(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(field, f"must be a number, got {_kind(value)}")
    if not math.isfinite(value):
        _fail(field, f"must be finite, got {value}")
    return float(value)


def _list(value: Any, field: str, length: int) -> List[Any]:
    if not isinstance(value, list):
        _fail(field, f"must be a list, got {_kind(value)}")
    if len(value) != length:
        _fail(field, f"must have {length} values, got {len(value)}")
    return value


def _need(obj: Mapping[str, Any], key: str, field: str) -> Any:
    if key not in obj:
        _fail(f"{field}.{key}" if field else key, "is missing")
    return obj[key]


def _artifact(rel: Any, field: str, artifacts: Mapping[str, Any]) -> None:
    _str(rel, field)
    if rel not in artifacts:
        _fail(field, f"names {rel!r}, which is not listed in 'artifacts'")


def check_model(model: Any) -> Dict[str, Any]:
    """Checks the ``model`` entry (sizes, steps, normalisation, head layout)."""
    m = _obj(model, "model")
    S = _int(_need(m, "image_size", "model"), "model.image_size")
    P = _int(_need(m, "patch_size", "model"), "model.patch_size")
    if P > S:
        _fail("model.patch_size", f"({P}) must not exceed model.image_size ({S})")
    _int(_need(m, "steps", "model"), "model.steps", 1, 64)
    _int(_need(m, "num_classes", "model"), "model.num_classes", 1, 1 << 20)
    crop = _num(_need(m, "crop_pct", "model"), "model.crop_pct")
    if not 0.0 < crop <= 1.0:
        _fail("model.crop_pct", f"must be in (0, 1], got {crop}")
    _str(_need(m, "dataset_interpolation", "model"), "model.dataset_interpolation", INTERPOLATIONS)
    _str(_need(m, "glance_interpolation", "model"), "model.glance_interpolation", INTERPOLATIONS)
    for key in ("mean", "std"):
        vals = [_num(v, f"model.{key}[{i}]") for i, v in enumerate(_list(_need(m, key, "model"), f"model.{key}", 3))]
        if key == "std" and any(v <= 0 for v in vals):
            _fail("model.std", f"must be positive, got {vals}")
    _str(_need(m, "classifier", "model"), "model.classifier", CLASSIFIERS)
    _str(_need(m, "step0", "model"), "model.step0", STEP0)
    return m


def check_manifest(manifest: Any) -> Dict[str, Any]:
    """Checks a parsed manifest (format, version and identity are checked by the caller).

    Raises:
        ManifestError: naming the first field that is wrong.
    """
    m = _obj(manifest, "manifest")
    model = check_model(_need(m, "model", ""))
    steps = int(model["steps"])
    arts = _obj(_need(m, "artifacts", ""), "artifacts")
    for rel, entry in arts.items():
        e = _obj(entry, f"artifacts.{rel}")
        digest = _need(e, "sha256", f"artifacts.{rel}")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            _fail(f"artifacts.{rel}.sha256", "must be 64 lower-case hex digits")
        if "bytes" in e:
            _int(e["bytes"], f"artifacts.{rel}.bytes", 0, 1 << 50)
    _artifact(_need(m, "heads", ""), "heads", arts)
    graphs = _obj(_need(m, "graphs", ""), "graphs")
    for name, entry in graphs.items():
        g = _obj(entry, f"graphs.{name}")
        for part in GRAPHS:
            _artifact(_need(g, part, f"graphs.{name}"), f"graphs.{name}.{part}", arts)
        if g["glance"] == g["focus"]:
            _fail(f"graphs.{name}", "names one file for both the glance and the focus graph")
    budgets = _obj(m.get("budgets", {}), "budgets")
    for name, entry in budgets.items():
        b = _obj(entry, f"budgets.{name}")
        thr = _list(_need(b, "thresholds", f"budgets.{name}"), f"budgets.{name}.thresholds", steps)
        for i, t in enumerate(thr):
            _num(t, f"budgets.{name}.thresholds[{i}]")
    default = m.get("default_budget")
    if default is not None:
        _str(default, "default_budget")
        if default not in budgets:
            _fail("default_budget", f"names {default!r}, which is not in 'budgets' ({', '.join(budgets) or 'none'})")
    costs = _obj(m.get("step_costs", {}), "step_costs")
    for key, entry in costs.items():
        e = _obj(entry, f"step_costs.{key}")
        batches = _need(e, "batches", f"step_costs.{key}")
        if not isinstance(batches, list) or not batches:
            _fail(f"step_costs.{key}.batches", "must be a non-empty list")
        for j, block in enumerate(batches):
            where = f"step_costs.{key}.batches[{j}]"
            blk = _obj(block, where)
            _int(_need(blk, "batch", where), f"{where}.batch", 1, 1 << 16)
            cum = _obj(_need(blk, "cumulative", where), f"{where}.cumulative")
            for stat in ("mean_ms", "p99_ms"):
                vals = _list(_need(cum, stat, f"{where}.cumulative"), f"{where}.cumulative.{stat}", steps)
                for i, v in enumerate(vals):
                    if _num(v, f"{where}.cumulative.{stat}[{i}]") < 0:
                        _fail(f"{where}.cumulative.{stat}[{i}]", f"must be >= 0, got {v}")
    engines = m.get("engines", [])
    if not isinstance(engines, list):
        _fail("engines", f"must be a list, got {_kind(engines)}")
    for i, entry in enumerate(engines):
        e = _obj(entry, f"engines[{i}]")
        _str(_need(e, "precision", f"engines[{i}]"), f"engines[{i}].precision")
        for part in GRAPHS:
            _artifact(_need(e, part, f"engines[{i}]"), f"engines[{i}].{part}", arts)
        opts = _obj(e.get("build_options", {}), f"engines[{i}].build_options")
        if "max_batch" in opts:
            _int(opts["max_batch"], f"engines[{i}].build_options.max_batch", 1, 1 << 16)
    if m.get("checkpoint") is not None:
        _artifact(m["checkpoint"], "checkpoint", arts)
    return m
