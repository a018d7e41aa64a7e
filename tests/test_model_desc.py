"""The typed model description and the manifest's JSON Schema (numpy-free, fast).

The schema is checked against ``jsonschema`` (an independent implementation of JSON Schema):
every manifest the schema refuses there is refused by :func:`check_manifest` with a message naming
a field that validator also names, and every manifest it accepts passes the schema part here.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path

import pytest

from gfnet_edge.manifest_schema import SCHEMA_PATH, ManifestError, check_manifest, check_model, schema
from gfnet_edge.model_desc import ModelDesc, as_desc
from gfnet_edge.variants import released_spec
from json_edit import DELETE, set_path

ROOT = Path(__file__).resolve().parents[1]

#: Where model-description reads must be attribute reads (``desc.steps``), not dict reads.
ATTRIBUTE_ONLY = ("gfnet_edge", "calibrate", "quantize", "bench", "tools")
#: The modules that parse the manifest's ``model`` dict into a :class:`ModelDesc`.
PARSERS = {"gfnet_edge/model_desc.py", "gfnet_edge/manifest_schema.py"}
DICT_READ = re.compile(r"""\bmodel\[\s*['"]|\bmodel\.get\(""")

MODEL = {"model_name": "m", "family": "custom", "image_size": 64, "patch_size": 32, "steps": 3, "num_classes": 10,
         "crop_pct": 0.875, "dataset_interpolation": "bilinear", "glance_interpolation": "bicubic",
         "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "classifier": "gru", "step0": "classifier"}
MANIFEST = {"format": "gfnet-edge-bundle", "format_version": 1, "model": MODEL,
            "artifacts": {"heads.npz": {"sha256": "0" * 64, "bytes": 5}, "g.onnx": {"sha256": "1" * 64},
                          "f.onnx": {"sha256": "2" * 64}, "e.plan": {"sha256": "3" * 64},
                          "e2.plan": {"sha256": "4" * 64}},
            "heads": "heads.npz", "graphs": {"fp32": {"glance": "g.onnx", "focus": "f.onnx"}},
            "budgets": {"ms-3.0": {"thresholds": [0.5, 0.5, -1e8]}}, "default_budget": "ms-3.0",
            "step_costs": {"onnxruntime/fp32": {"batches": [
                {"batch": 1, "cumulative": {"mean_ms": [1.0, 2.0, 3.0], "p99_ms": [1.5, 2.5, 3.5]}}]}},
            "engines": [{"precision": "fp16", "glance": "e.plan", "focus": "e2.plan", "build_options": {"max_batch": 4}}]}


def dict_reads(text: str):
    """Line numbers of ``model["x"]`` / ``model.get("x")`` reads in ``text``."""
    return [i for i, line in enumerate(text.splitlines(), 1) if DICT_READ.search(line)]


def test_the_scan_finds_dict_reads():
    """The pattern of the next test matches the forms it forbids (else that test proves nothing)."""
    code = 'a = int(model["steps"])\nb = rt.model[\'patch_size\']\nc = self.model.get("x")\nd = model.steps\ne = m["model"]'
    assert dict_reads(code) == [1, 2, 3]


def test_model_description_is_read_by_attribute():
    found = []
    for top in ATTRIBUTE_ONLY:
        for dirpath, _, files in os.walk(ROOT / top):  # symlinked folders are not followed
            for name in files:
                p = Path(dirpath, name)
                rel = p.relative_to(ROOT).as_posix()
                if p.suffix == ".py" and rel not in PARSERS:
                    found += [f"{rel}:{n}" for n in dict_reads(p.read_text(encoding="utf-8"))]
    assert found == []


def test_description_from_spec_round_trips_through_the_manifest():
    spec = released_spec("resnet50", 128)
    desc = ModelDesc.from_spec(spec, {"seed": 3})
    for f in ("image_size", "patch_size", "steps", "num_classes", "classifier", "step0", "model_name", "family",
              "backbone", "feature_dim", "fmap_channels", "policy_conv", "policy_hidden", "fc_hidden"):
        assert getattr(desc, f) == getattr(spec, f), f
    assert desc.mean == tuple(spec.mean) and desc.std == tuple(spec.std) and desc.crop_pct == spec.crop_pct
    assert desc.spec == spec.to_dict() and desc.demo_data_config == {"seed": 3}
    entry = desc.to_dict()
    assert entry["mean"] == list(spec.mean) and check_model(entry) is entry
    back = ModelDesc.from_manifest(entry)
    assert back == desc and back.spec == desc.spec and as_desc(entry) == desc and as_desc(desc) is desc
    with pytest.raises(dataclasses.FrozenInstanceError):
        desc.steps = 2  # type: ignore[misc]
    with pytest.raises(ManifestError, match="'model.patch_size'"):
        ModelDesc.from_spec(dataclasses.replace(spec, patch_size=spec.image_size + 1))


def test_schema_ships_with_the_package():
    assert SCHEMA_PATH.is_file() and SCHEMA_PATH.parent.parent == ROOT / "gfnet_edge"
    assert schema()["$schema"].startswith("http://json-schema.org/draft-04/")
    check_manifest(copy.deepcopy(MANIFEST))


def _set(path, value):
    m = copy.deepcopy(MANIFEST)
    set_path(m, path, value)
    return m


_DELETE = DELETE

#: (path, value, the field the message names, a fragment of the problem)
CASES = [
    (("model",), _DELETE, "model", "is missing"),
    (("model", "steps"), _DELETE, "model.steps", "is missing"),
    (("model",), [], "model", "must be an object, got list"),
    (("model", "steps"), 3.0, "model.steps", "must be an integer, got float"),
    (("model", "num_classes"), True, "model.num_classes", "must be an integer, got bool"),
    (("model", "image_size"), 1 << 17, "model.image_size", "must be in [1, 65536], got 131072"),
    (("model", "crop_pct"), 0, "model.crop_pct", "must be in (0, 1], got 0"),
    (("model", "glance_interpolation"), "area", "model.glance_interpolation", "must be one of bilinear, bicubic"),
    (("model", "mean"), [0.5, 0.5], "model.mean", "must have 3 values, got 2"),
    (("model", "std"), ["a", 1, 1], "model.std[0]", "must be a number, got str"),
    (("model", "policy_conv"), "yes", "model.policy_conv", "must be a boolean or null, got str"),
    (("artifacts", "heads.npz", "sha256"), "A" * 64, "artifacts.heads.npz.sha256", "64 lower-case hex digits"),
    (("artifacts", "heads.npz", "sha256"), "0" * 64 + "\n", "artifacts.heads.npz.sha256", "64 lower-case hex"),
    (("graphs", "fp32"), {"glance": "g.onnx"}, "graphs.fp32.focus", "is missing"),
    (("budgets", "ms-3.0", "thresholds"), [0.5, "x", 1], "budgets.ms-3.0.thresholds[1]", "must be a number"),
    (("step_costs", "onnxruntime/fp32", "batches"), [], "step_costs.onnxruntime/fp32.batches", "non-empty list"),
    (("engines",), {}, "engines", "must be a list, got dict"),
    (("engines", 0, "build_options"), {"max_batch": 0}, "engines[0].build_options.max_batch", "in [1, 65536]"),
    (("default_budget",), "", "default_budget", "must be a non-empty string"),
]


#: Valid to the schema, refused by the checks in code.
CONSISTENCY = [
    (("model", "patch_size"), 96, "model.patch_size", "must not exceed model.image_size (64)"),
    (("model", "std"), [0.2, 0.0, 0.2], "model.std", "must be positive"),
    (("model", "crop_pct"), float("nan"), "model.crop_pct", "must be finite"),
    (("budgets", "ms-3.0", "thresholds"), [0.5, 0.5], "budgets.ms-3.0.thresholds", "must have 3 values, got 2"),
    (("budgets", "ms-3.0", "thresholds"), [0.5, float("-inf"), 1], "budgets.ms-3.0.thresholds[1]", "must be finite"),
    (("budgets", "ms-3.0", "thresholds"), [0.5, 10 ** 400, 1], "budgets.ms-3.0.thresholds[1]", "is too large"),
    (("model", "mean"), [-10 ** 400, 0.4, 0.3], "model.mean[0]", "is too large"),
    (("costs",), {"macs": {"cumulative": [1.0, float("nan"), 3.0]}}, "costs.macs.cumulative[1]", "must be finite"),
    (("quantization",), {"cpu": {"int8_mac_share": float("nan")}}, "quantization.cpu.int8_mac_share", "must be finite"),
    (("created",), float("inf"), "created", "must be finite"),
    (("heads",), "other.npz", "heads", "not listed in 'artifacts'"),
    (("graphs", "fp32", "focus"), "g.onnx", "graphs.fp32", "one file for both"),
    (("engines", 0, "glance"), "x.plan", "engines[0].glance", "not listed in 'artifacts'"),
    (("default_budget",), "nope", "default_budget", "not in 'budgets' (ms-3.0)"),
    (("checkpoint",), "checkpoint.pth.tar", "checkpoint", "not listed in 'artifacts'"),
]


@pytest.mark.parametrize("path,value,field,problem", CASES + CONSISTENCY,
                         ids=[".".join(map(str, c[0])) for c in CASES + CONSISTENCY])
def test_errors_name_the_field(path, value, field, problem):
    """Schema errors (CASES) and consistency errors (CONSISTENCY) both name the field."""
    with pytest.raises(ManifestError) as exc:
        check_manifest(_set(path, value))
    assert str(exc.value).startswith(f"manifest field '{field}' ") and problem in str(exc.value)


def _json_path(path) -> str:
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


@pytest.mark.parametrize("refused,path,value,field", [(True, *c[:3]) for c in CASES] + [(False, *c[:3]) for c in CONSISTENCY],
                         ids=[f"{'schema' if i < len(CASES) else 'code'}-{'.'.join(map(str, c[0]))}"
                              for i, c in enumerate(CASES + CONSISTENCY)])
def test_schema_agrees_with_an_independent_validator(refused, path, value, field):
    """jsonschema's Draft 4 validator refuses exactly the manifests of CASES (naming the same
    field, or for a missing key the object that lacks it) and accepts those of CONSISTENCY."""
    jsonschema = pytest.importorskip("jsonschema")  # in the test extras (setup.py)
    errors = list(jsonschema.Draft4Validator(schema()).iter_errors(_set(path, value)))
    if not refused:
        assert errors == []
        return
    named = {_json_path(e.absolute_path) for e in errors}
    parent = field.rsplit(".", 1)[0] if "." in field else ""
    assert field in named or parent in named, named
