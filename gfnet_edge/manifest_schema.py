"""The schema of a bundle's ``manifest.json``, checked when a bundle is loaded.

The structure (types, required keys, ranges, choices, patterns) is a JSON Schema document shipped
with the package, :data:`SCHEMA_PATH` (``gfnet_edge/schemas/manifest.schema.json``), validated with
``fastjsonschema``: it compiles the schema to plain Python once, is pure Python with no
dependencies, and so installs wherever the device side does (aarch64 included; ``jsonschema``
depends on ``rpds-py``, native code). What a schema cannot say is checked here in code: a patch no larger than
the image, one threshold and one step cost per step, graph / engine / head / checkpoint paths that
are listed artifacts, distinct glance and focus graphs, a default budget that exists, positive
``std`` and finite numbers (``NaN`` passes every JSON Schema range test).

A problem is reported as one :class:`ManifestError` naming the field (``model.patch_size``,
``budgets.ms-3.0.thresholds[1]`` ...). The schema covers every field a command reads (the
runtime, ``info``, ``demo``, ``doctor``: ``costs.macs.cumulative``, ``quantization``,
``source_checkpoint``, engine entries ...); fields only stored or printed as they are (``created``,
a budget's ``source`` ...) may hold anything JSON holds. No field may hold ``NaN``, an infinity
or an integer beyond the range of a float.
"""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Sequence

import fastjsonschema

from .errors import InputError

#: The JSON Schema of ``manifest.json`` (draft 4: an integer field refuses ``3.0``).
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "manifest.schema.json"
GRAPHS = ("glance", "focus")

_ARTICLE = {"object": "an object", "array": "a list", "integer": "an integer", "number": "a number",
            "boolean": "a boolean", "null": "null"}


class ManifestError(InputError):
    """A manifest field with a wrong type, range or an inconsistency; the message names it."""


def _fail(field: str, problem: str) -> None:
    raise ManifestError(f"manifest field '{field}' {problem}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@functools.lru_cache(maxsize=None)
def schema() -> Dict[str, Any]:
    """The manifest's JSON Schema (parsed :data:`SCHEMA_PATH`)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=None)
def _validator(definition: str) -> Callable[..., Any]:
    """The compiled validator of the whole manifest (``""``) or of one of its definitions."""
    s = schema()
    if definition:
        s = {"$schema": s["$schema"], "definitions": s["definitions"], "allOf": [{"$ref": f"#/definitions/{definition}"}]}
    return fastjsonschema.compile(s)


def _field(name: str) -> str:
    """``data.model.std[0]`` (the validator's name for a value) -> ``model.std[0]``."""
    return name[len("data."):] if name.startswith("data.") else name[len("data"):]


def _interval(d: Mapping[str, Any]) -> str:
    lo, hi = d.get("minimum"), d.get("maximum")
    if lo is not None and hi is not None:
        return f"in {'(' if d.get('exclusiveMinimum') else '['}{lo}, {hi}{')' if d.get('exclusiveMaximum') else ']'}"
    if lo is not None:
        return f"{'>' if d.get('exclusiveMinimum') else '>='} {lo}"
    return f"{'<' if d.get('exclusiveMaximum') else '<='} {hi}"


def _problem(exc: fastjsonschema.JsonSchemaValueException) -> ManifestError:
    """The validator's error in the words of :func:`_fail`: the field, then what is wrong with it."""
    field, rule, value, d = _field(exc.name), exc.rule, exc.value, exc.definition or {}
    if rule == "required":
        missing = next(k for k in d["required"] if k not in value)
        field, problem = (f"{field}.{missing}" if field else missing), "is missing"
    elif rule == "type" and "enum" in d:
        problem = f"must be one of {', '.join(map(str, d['enum']))}, got {_kind(value)}"
    elif rule == "type":
        types = d["type"] if isinstance(d["type"], list) else [d["type"]]
        words = [("a non-empty string" if d.get("minLength") else "a string") if t == "string" else _ARTICLE[t]
                 for t in types]
        problem = f"must be {' or '.join(words)}, got {_kind(value)}"
    elif rule == "enum":
        problem = f"must be one of {', '.join(map(str, d['enum']))}, got {value!r}"
    elif rule in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        problem = f"must be {_interval(d)}, got {value}"
    elif rule in ("minItems", "maxItems"):
        lo, hi = d.get("minItems"), d.get("maxItems")
        problem = (f"must have {lo} values, got {len(value)}" if lo == hi
                   else "must be a non-empty list" if lo == 1 and hi is None else f"has {len(value)} values")
    elif rule in ("minLength", "maxLength", "pattern") and d.get("description"):
        problem = f"must be {d['description']}"
    elif rule == "minLength":
        problem = "must be a non-empty string"
    else:  # a rule this module has no words for: the validator's own
        problem = exc.message.split(" ", 1)[1] if " " in exc.message else exc.message
    return ManifestError(f"manifest field '{field or 'manifest'}' {problem}")


def _validate(value: Any, definition: str, prefix: str) -> None:
    try:
        _validator(definition)(value, name_prefix=prefix)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise _problem(exc) from None


def _finite(value: Any, field: str) -> None:
    """Every number under ``value`` is finite (JSON has no ``NaN``; Python's parser accepts it)
    and within the range of a float (an integer of hundreds of digits is valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        _fail(field, f"must be finite, got {value}")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
        _fail(field, "is too large (beyond the range of a float)")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{field}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite(v, f"{field}[{i}]")


def _length(values: Sequence[Any], field: str, length: int) -> None:
    if len(values) != length:
        _fail(field, f"must have {length} values, got {len(values)}")


def _artifact(rel: str, field: str, artifacts: Mapping[str, Any]) -> None:
    if rel not in artifacts:
        _fail(field, f"names {rel!r}, which is not listed in 'artifacts'")


def check_model(model: Any) -> Dict[str, Any]:
    """Checks the ``model`` entry (sizes, steps, normalisation, head layout).

    Raises:
        ManifestError: naming the first field that is wrong.
    """
    _validate(model, "model", "data.model")
    return _model_rules(model)


def _model_rules(model: Dict[str, Any]) -> Dict[str, Any]:
    """What the schema cannot say about a schema-valid ``model`` entry."""
    _finite(model, "model")
    if model["patch_size"] > model["image_size"]:
        _fail("model.patch_size", f"({model['patch_size']}) must not exceed model.image_size ({model['image_size']})")
    if any(v <= 0 for v in model["std"]):  # one message for the vector the normaliser divides by
        _fail("model.std", f"must be positive, got {model['std']}")
    names = model.get("class_names")
    if names is not None:
        if len(names) != model["num_classes"]:
            _fail("model.class_names", f"has {len(names)} names for {model['num_classes']} classes")
        if len(set(names)) != len(names):
            _fail("model.class_names", "names a class twice")
    return model


def check_manifest(manifest: Any) -> Dict[str, Any]:
    """Checks a parsed manifest (format, version and identity are checked by the caller).

    Raises:
        ManifestError: naming the first field that is wrong.
    """
    _validate(manifest, "", "data")  # the whole schema, the model entry included
    m = manifest
    _model_rules(m["model"])
    steps = m["model"]["steps"]
    arts = m["artifacts"]
    _artifact(m["heads"], "heads", arts)
    for name, g in m["graphs"].items():
        for part in GRAPHS:
            _artifact(g[part], f"graphs.{name}.{part}", arts)
        if g["glance"] == g["focus"]:
            _fail(f"graphs.{name}", "names one file for both the glance and the focus graph")
    budgets = m.get("budgets", {})
    for name, b in budgets.items():
        _length(b["thresholds"], f"budgets.{name}.thresholds", steps)
    default = m.get("default_budget")
    if default is not None and default not in budgets:
        _fail("default_budget", f"names {default!r}, which is not in 'budgets' ({', '.join(budgets) or 'none'})")
    for key, entry in m.get("step_costs", {}).items():
        for j, block in enumerate(entry["batches"]):
            for part in ("cumulative", "increments"):
                where = f"step_costs.{key}.batches[{j}].{part}"
                for stat in ("mean_ms", "p95_ms", "p99_ms"):
                    if stat in block.get(part, {}):
                        _length(block[part][stat], f"{where}.{stat}", steps)
            for counts in ("step_calls", "retimed_calls"):
                if counts in block:
                    _length(block[counts], f"step_costs.{key}.batches[{j}].{counts}", steps)
    for i, e in enumerate(m.get("engines", [])):
        for part in GRAPHS:
            _artifact(e[part], f"engines[{i}].{part}", arts)
    if m.get("checkpoint") is not None:
        _artifact(m["checkpoint"], "checkpoint", arts)
    for key, value in m.items():  # thresholds, step costs and every other field (model: _model_rules)
        if key != "model":
            _finite(value, key)
    return m
