"""``gfnet-edge doctor BUNDLE`` and ``gfnet-edge info BUNDLE`` against the TensorRT stand-in
(tests/trt_standin.py) on the asynchronous simulated GPU (tests/sim_device.py)."""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from gfnet_edge import cli
from gfnet_edge.runtime.backends import tensorrt_util as trt_util

ORIN_AGX = {"gpu_name": "Orin", "compute_capability": "8.7", "multiprocessors": 16,
            "device_model": "NVIDIA Jetson AGX Orin Developer Kit"}


@pytest.fixture(scope="module")
def portable_bundle(demo_onnx_bundle):
    """The session's fp32 demo bundle (no engines); tests that add engines work on a copy."""
    return demo_onnx_bundle


def _device(monkeypatch, here=ORIN_AGX, **kw):
    """The stand-in TensorRT on an asynchronous simulated GPU; returns its state."""
    from sim_device import SimMemory, sim_ops
    from trt_standin import make_trt

    mem = SimMemory()
    sim_ops(monkeypatch, mem, asynchronous=True)
    trt, state = make_trt("10.3.0", mem=mem, **kw)
    monkeypatch.setattr(trt_util, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_util, "gpu_info", lambda: dict(here))
    return state


def _bundle_with_engines(portable_bundle, tmp_path, monkeypatch, *extra):
    root = tmp_path / "bundle"
    shutil.copytree(portable_bundle.root, root)
    _device(monkeypatch, dla_cores=1)
    assert cli.main(["build-engine", str(root), "--backend", "tensorrt", "--precision", "fp32", "--max-batch", "4",
                     *extra]) == 0
    return root


def _doctor(root, tmp_path, capsys, *args):
    out = tmp_path / f"report{len(list(tmp_path.glob('report*')))}.json"
    rc = cli.main(["doctor", str(root), "-o", str(out), *args])
    text = capsys.readouterr()
    return rc, (json.loads(out.read_text()) if out.exists() else None), text


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_doctor_without_tensorrt_exits_3_with_one_line(portable_bundle, tmp_path, capsys):
    rc, report, text = _doctor(portable_bundle.root, tmp_path, capsys)
    assert rc == 3 and report is None
    err = text.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gfnet-edge: error: TensorRT is not available here")


def test_doctor_full_report_on_stand_ins(portable_bundle, tmp_path, monkeypatch, capsys):
    """Environment, engine, batches 1 / 2 / 4 through run and run_device against ONNX Runtime,
    all passing; the report file holds the same; doctor never overwrites a file."""
    root = _bundle_with_engines(portable_bundle, tmp_path, monkeypatch)
    _device(monkeypatch)
    rc, report, text = _doctor(root, tmp_path, capsys)
    assert rc == 0, text.out + text.err
    assert {"tensorrt", "cuda driver", "gpu", "compute capability", "device model", "dla cores",
            "power mode"} <= set(report["environment"])
    assert report["environment"]["tensorrt"] == "10.3.0" and report["environment"]["dla cores"] == 0
    assert report["engine"]["precision"] == "fp32" and report["engine"]["target"] == "GPU"
    names = [c["name"] for c in report["checks"]]
    assert names[0] == "load engines" and len(names) == 1 + 3 * 2 * 2
    for n in (1, 2, 4):
        for g in ("glance", "focus"):
            for path in ("run", "run_device"):
                c = report["checks"][names.index(f"{g} batch {n} ({path})")]
                assert c["ok"] and c["error"] <= 1e-5 and c["tolerance"] == 1e-3
    assert "all checks passed" in text.out and "report written to" in text.out
    existing = tmp_path / "report0.json"
    assert cli.main(["doctor", str(root), "-o", str(existing)]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("faults,here,args,match", [
    ({"context"}, ORIN_AGX, [], "could not create an execution context"),
    ({"enqueue"}, ORIN_AGX, [], "failed to enqueue the glance engine"),
    ({"skew"}, ORIN_AGX, [], None),  # wrong numbers: over the tolerance
    (set(), dict(ORIN_AGX, device_model="NVIDIA Jetson Orin Nano Developer Kit", multiprocessors=8), [],
     "built for another device.*--build"),
])
def test_doctor_reports_each_injected_failure(portable_bundle, tmp_path, monkeypatch, capsys, faults, here, args,
                                              match):
    root = _bundle_with_engines(portable_bundle, tmp_path, monkeypatch)
    _device(monkeypatch, here=here, faults=faults)
    rc, report, text = _doctor(root, tmp_path, capsys, *args)
    assert rc == 1 and "FAILED" in text.out
    failed = [c for c in report["checks"] if not c["ok"]]
    assert failed
    if match is None:
        assert all(c["error"] > c["tolerance"] for c in failed if c["error"] is not None)
        assert any(c["error"] is not None and c["error"] > c["tolerance"] for c in failed), failed
    else:
        import re

        assert any(re.search(match, c["detail"]) for c in failed), failed


@pytest.mark.parametrize("args, frag", [
    (["--precision", "int4"], "--precision"), (["--dla-core", "-1"], "--dla-core"),
    (["--build", "--max-batch", "0"], "--max-batch"), (["--max-batch", "8"], "--max-batch applies with --build"),
    (["--seed", "-1"], "--seed"),
])
def test_doctor_refuses_bad_options_before_any_check(portable_bundle, tmp_path, monkeypatch, capsys, args, frag):
    """A bad option is bad input (exit 2, one line, no report file), on a device with TensorRT,
    not a failed check of the device (exit 1) or an option silently ignored."""
    root = _bundle_with_engines(portable_bundle, tmp_path, monkeypatch)
    _device(monkeypatch)
    capsys.readouterr()
    rc, report, text = _doctor(root, tmp_path, capsys, *args)
    err = text.err.strip().splitlines()
    assert rc == 2 and report is None and text.out == "", text.out + text.err
    assert len(err) == 1 and err[0].startswith("gfnet-edge: error: ") and frag in err[0], err


def test_doctor_builds_missing_engines_for_this_device(portable_bundle, tmp_path, monkeypatch, capsys):
    root = tmp_path / "bundle"
    shutil.copytree(portable_bundle.root, root)
    _device(monkeypatch)
    rc, report, text = _doctor(root, tmp_path, capsys, "--build", "--precision", "fp32", "--max-batch", "2")
    assert rc == 0, text.out + text.err
    assert report["checks"][0]["name"] == "build fp32 engines" and report["engine"]["max_batch"] == 2


def test_dla_engines_show_their_layer_placement(portable_bundle, tmp_path, monkeypatch, capsys):
    """A DLA build (static batch, FP16) records where the builder put each layer; `info`
    shows the counts and `doctor --dla-core` the per-layer map from the engine inspector."""
    root = tmp_path / "bundle"
    shutil.copytree(portable_bundle.root, root)
    _device(monkeypatch, dla_cores=1)
    assert cli.main(["build-engine", str(root), "--backend", "tensorrt", "--precision", "fp16", "--dla-core", "0",
                     "--max-batch", "2"]) == 0
    capsys.readouterr()
    assert cli.main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "fp16 on DLA core 0" in out and "batch 2 (static)" in out
    # the stand-in puts every layer but the last on the DLA: one run of layers, one DLA subgraph
    assert "glance: 1 DLA subgraph(s), 1 GPU layer(s)" in out
    _device(monkeypatch, dla_cores=1)
    rc, report, text = _doctor(root, tmp_path, capsys, "--dla-core", "0")
    assert rc == 0, text.out + text.err
    assert report["engine"]["target"] == "DLA core 0" and report["engine"]["static_batch"] == 2
    for g in ("glance", "focus"):
        devices = [x["device"] for x in report["layers"][g]]
        assert devices.count("GPU") == 1 and devices.count("DLA") >= 1 and "?" not in devices
        # the DLA engine's tensor moves are named as such, not counted on either device
        assert [x["name"] for x in report["layers"][g] if x["device"] == "copy"] == \
            [f"{t} {how}" for t in ("image", "logits") for how in ("to nvm", "from nvm", "copy finish")]
    assert "layers (" in text.out and "on DLA):" in text.out


def test_a_report_that_cannot_be_written_is_one_line_and_leaves_no_file(portable_bundle, tmp_path, monkeypatch,
                                                                        capsys):
    """A full disk when the report is written: one line naming the report (exit 2), and no
    partial file in its folder."""
    import pathlib

    root = _bundle_with_engines(portable_bundle, tmp_path, monkeypatch)
    capsys.readouterr()
    real_write_text = pathlib.Path.write_text

    def full(self, data, *a, **kw):
        real_write_text(self, data[:100], *a, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    (tmp_path / "reports").mkdir()
    out = tmp_path / "reports" / "r.json"
    rc = cli.main(["doctor", str(root), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"gfnet-edge: error: {out}: cannot write the report (No space left on device)\n", err
    assert list((tmp_path / "reports").iterdir()) == []


def test_report_file_is_strict_json_when_an_engine_outputs_nan():
    """An engine whose outputs are NaN fails its check with an error that is not a number: the
    report says so, and its JSON holds null there (strict JSON, readable by any tool)."""
    from gfnet_edge.doctor import DoctorReport, _rel_error

    report = DoctorReport("b", {"gpu": "Orin"})
    want = {"feature": np.ones((1, 4), np.float32)}
    err = _rel_error({"feature": np.full((1, 4), np.nan, np.float32)}, want)
    report.add("glance batch 1 (run)", err <= 1e-3, error=err, tolerance=1e-3)
    text = report.to_json()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in the report"))
    assert data["checks"][0]["error"] is None and data["checks"][0]["ok"] is False
    assert not report.ok and "FAIL" in report.text()
