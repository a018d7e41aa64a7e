"""The device side as a device installs it: ``pip install`` of this project alone (no extras) in a
fresh virtual environment, with the oldest supported numpy and ONNX Runtime, runs ``predict``,
``calibrate`` (a folder of images), ``info`` and the ``Runtime`` API on the demo bundle built by the
full install, with results equal to the full install's.

The environment is built once per run in a temporary directory (about a minute: the project's
wheel packages the extension already built for this Python, ``GFNET_EDGE_PREBUILT_EXT``; pip
fetches the pinned packages). The test skips, saying why, only when pip cannot reach a package
index.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

from device_side import ABSENT, ROOT, prediction_rows, write_image_folder

pytestmark = pytest.mark.slow
pytest.importorskip("onnxruntime")
try:
    from gfnet_edge import _C
except ImportError:  # pragma: no cover - the extension is part of the build
    pytest.skip("the native extension gfnet_edge._C is not built (pip install -e .)", allow_module_level=True)

from gfnet_edge.cli import main

#: The oldest numpy and ONNX Runtime the device side supports (the floors of setup.py's install_requires).
PINS = {"numpy": "1.24.4", "onnxruntime": "1.18.0"}
DEMO = ROOT / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar"
#: What pip prints when it cannot reach an index (the only reason to skip).
_OFFLINE = ("NewConnectionError", "ConnectTimeout", "Max retries exceeded", "Temporary failure in name resolution",
            "Network is unreachable", "ProxyError", "Could not fetch URL")
_ROOT_SKIP = {".git", "build", "dist", ".venv", ".whl", ".gl", "runs", "out", "work", ".pytest_cache", ".hypothesis"}


def _run(cmd: List[Any], cwd: Path, env: Dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _clean_env() -> Dict[str, str]:
    """This environment without what would make a Python import from elsewhere than its own site-packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
                                                              "VIRTUAL_ENV")}


def _copy_source(dst: Path) -> Path:
    """The checkout's sources (no build outputs, no built extension, no git directory)."""
    def ignore(folder: str, names: List[str]) -> set:
        skip = {n for n in names if n == "__pycache__" or n.endswith((".so", ".pyc", ".egg-info", ".onnx", ".engine"))}
        return skip | (_ROOT_SKIP & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


def test_pins_are_the_declared_floors():
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    for name, version in PINS.items():
        floor = re.search(rf'"{name}>=([0-9.]+)', setup)
        assert floor, f"setup.py declares no lower bound for {name}"
        assert version == floor.group(1) or version.startswith(floor.group(1) + "."), (name, version, floor.group(1))


@pytest.fixture(scope="module")
def device_env(tmp_path_factory) -> Dict[str, Any]:
    """A fresh virtual environment with ``pip install`` of this project (no extras) and :data:`PINS`."""
    tmp = tmp_path_factory.mktemp("device_install")
    env = _clean_env()
    src = _copy_source(tmp / "src")
    r = _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "wheel"],
             tmp, {**env, "GFNET_EDGE_PREBUILT_EXT": _C.__file__})
    assert r.returncode == 0, f"building the wheel failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    (wheel,) = (tmp / "wheel").glob("gfnet_edge-*.whl")
    venv = tmp / "venv"
    r = _run([sys.executable, "-m", "venv", venv], tmp, env)
    assert r.returncode == 0, f"python -m venv failed: {r.stderr[-2000:]}"
    py = venv / "bin" / "python"
    r = _run([py, "-m", "pip", "install", "-q", wheel, *(f"{k}=={v}" for k, v in PINS.items())], tmp, env)
    if r.returncode != 0:
        if any(s in r.stderr for s in _OFFLINE):
            pytest.skip(f"pip cannot reach a package index for {', '.join(f'{k}=={v}' for k, v in PINS.items())}: "
                        f"{r.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"pip install of the device side failed:\n{r.stderr[-4000:]}")
    return {"tmp": tmp, "python": py, "cli": venv / "bin" / "gfnet-edge", "env": env}


def _dev(device_env, cmd: List[Any]) -> subprocess.CompletedProcess:
    """Runs a command of the virtual environment outside the checkout (so only its install is importable)."""
    return _run(cmd, device_env["tmp"], device_env["env"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_onnx_bundle_copy):
    """The demo bundle (fp32, ONNX Runtime) built by the full install (this module's copy of the
    session's), and 40 demo test images (4 per class) as a labelled folder and an array."""
    from gfnet_edge.data import ClutteredDigits, demo_config

    root = tmp_path_factory.mktemp("device_demo")
    bundle = demo_onnx_bundle_copy
    frames, labels = ClutteredDigits("test", config=demo_config(bundle.manifest)).arrays(200)
    pick = np.concatenate([np.flatnonzero(labels == c)[:4] for c in range(10)])
    assert len(pick) == 40
    images = write_image_folder(root / "images", frames[pick], labels[pick])
    np.save(root / "frames.npy", frames[pick])
    return {"root": root, "bundle": bundle.root, "images": images, "frames": frames[pick], "labels": labels[pick]}


def test_the_environment_is_the_device_side_alone(device_env):
    code = ("import importlib.util, importlib.metadata as md, json, gfnet_edge\n"
            f"print(json.dumps({{'absent': [n for n in {ABSENT!r} if importlib.util.find_spec(n) is None], "
            f"'versions': {{n: md.version(n) for n in {list(PINS)!r}}}, 'package': gfnet_edge.__file__}}))")
    r = _dev(device_env, [device_env["python"], "-c", code])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["absent"] == list(ABSENT)
    assert out["versions"] == PINS
    assert Path(out["package"]).is_relative_to(device_env["python"].parents[1])


def test_predict_equals_the_full_install(device_env, demo, capsys):
    assert main(["predict", str(demo["bundle"]), str(demo["images"]), "--json"]) == 0
    full = prediction_rows(capsys.readouterr().out)
    r = _dev(device_env, [device_env["cli"], "predict", demo["bundle"], demo["images"], "--json"])
    assert r.returncode == 0, r.stderr
    dev = prediction_rows(r.stdout)
    assert sorted(dev) == sorted(full) and len(dev) == 40
    assert len({row["exit_step"] for row in full.values()}) > 1  # early exit is exercised
    for name, row in full.items():
        assert (dev[name]["class"], dev[name]["exit_step"]) == (row["class"], row["exit_step"]), name
        assert dev[name]["confidence"] == pytest.approx(row["confidence"], abs=1e-5)


def test_runtime_api_equals_the_full_install(device_env, demo):
    from gfnet_edge.runtime import Runtime

    out = demo["root"] / "api.npz"
    code = ("import sys, numpy as np\nfrom gfnet_edge import Runtime\n"
            "frames = np.load(sys.argv[2])\n"
            "with Runtime(sys.argv[1]) as rt:\n"
            "    p = rt.predict(frames)\n"
            "    t = rt.trace(frames)\n"
            "np.savez(sys.argv[3], classes=p.classes, exit_step=p.exit_step, confidence=p.confidence, "
            "probs=t.probs, coords=t.coords)\n")
    r = _dev(device_env, [device_env["python"], "-c", code, demo["bundle"], demo["root"] / "frames.npy", out])
    assert r.returncode == 0, r.stderr
    dev = np.load(out)
    with Runtime(demo["bundle"]) as rt:
        p = rt.predict(demo["frames"])
        t = rt.trace(demo["frames"])
    np.testing.assert_array_equal(dev["classes"], p.classes)
    np.testing.assert_array_equal(dev["exit_step"], p.exit_step)
    np.testing.assert_allclose(dev["confidence"], p.confidence, atol=1e-5)
    np.testing.assert_allclose(dev["probs"], t.probs, atol=1e-5)
    np.testing.assert_array_equal(dev["coords"], t.coords)
    assert float(np.mean(p.classes == demo["labels"])) > 0.5  # the demo model, not noise


def test_calibrate_a_folder_equals_the_full_install(device_env, demo):
    """No matplotlib in the environment: the report has its tables (the page rendered from the
    installed templates) and says why it has no figures; the held-out anytime accuracy equals the
    full install's Runtime on the same split."""
    from gfnet_edge.calibrate.data import load_calibration_data
    from gfnet_edge.calibrate.latency import prepare_frames
    from gfnet_edge.runtime import Runtime

    out = device_env["tmp"] / "report"
    r = _dev(device_env, [device_env["cli"], "calibrate", demo["bundle"], "--data", demo["images"], "-o", out,
                          "--no-write", "--repeats", "5", "--warmup", "1", "--batch-size", "0", "--gallery", "2",
                          "--attempts", "1", "-q"])
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert "matplotlib" in rep["figures_note"] and rep["budgets"]
    page = (out / "report.html").read_text()
    assert '<table class="budgets">' in page and "id='figures-note'" in page
    model = json.loads((demo["bundle"] / "manifest.json").read_text())["model"]
    x, y = load_calibration_data(str(demo["images"]), model).part("holdout")
    with Runtime(demo["bundle"]) as rt:
        probs = rt.trace(prepare_frames(model, x)).probs
    expected = [100.0 * float(np.mean(probs[k].argmax(1) == y)) for k in range(probs.shape[0])]
    assert rep["anytime"]["fp32 (held-out)"] == pytest.approx(expected, abs=1e-9)


def test_info_and_build_side_commands(device_env, demo, tmp_path):
    r = _dev(device_env, [device_env["cli"], "info", demo["bundle"], "--json"])
    assert r.returncode == 0, r.stderr
    manifest = json.loads((demo["bundle"] / "manifest.json").read_text())
    info = json.loads(r.stdout)
    assert (info["model_name"], info["default_budget"]) == (manifest["model"]["model_name"], manifest["default_budget"])
    for argv, needs in ((["build-engine", DEMO, "-o", tmp_path / "b"], 'torch is not installed here: pip install "gfnet-edge[build]"'),
                        (["calibrate", demo["bundle"], "--data", "demo", "-o", tmp_path / "r"], "scipy is not installed"),
                        (["demo", "-o", tmp_path / "d"], 'pip install "gfnet-edge[build,report]"')):
        r = _dev(device_env, [device_env["cli"], *argv])
        assert r.returncode == 3, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and needs in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []
