"""The device side runs without the build side: every device module imports, and ``predict``,
``calibrate`` and ``info`` work on a bundle, in a Python where torch, torchvision, timm, onnx,
onnxsim, scipy, scikit-learn and matplotlib cannot be imported; build-side commands say what to
install and exit 3. Results equal the full install's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from device_side import ABSENT, cli_without_build_side, prediction_rows, run_without_build_side, write_image_folder
from tiny_gfnet import fp32_bundle, random_gfnet

pytest.importorskip("onnxruntime")
try:
    from gfnet_edge import _C  # noqa: F401
except ImportError:  # pragma: no cover - the extension is part of the build
    pytest.skip("the native extension gfnet_edge._C is not built (pip install -e .)", allow_module_level=True)

from gfnet_edge.cli import main

DEMO = Path(__file__).resolve().parents[1] / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar"
S, P, T = 96, 48, 3

#: Modules that are build-side by design (torch models, export, training, the demo-task generator).
BUILD_SIDE = ("gfnet_edge.models", "gfnet_edge.export", "gfnet_edge.train.data", "gfnet_edge.train.demo_results",
              "gfnet_edge.train.stages", "gfnet_edge.train.static", "gfnet_edge.data.cluttered_digits",
              "gfnet_edge.train.dist", "gfnet_edge.train.folder_data", "gfnet_edge.train.folder_stages",
              "gfnet_edge.train.pretrained")

_IMPORT_ALL = f'''
import importlib, json, pkgutil
build_side = {BUILD_SIDE!r}
failed, seen = {{}}, []

def visit(name):
    if any(name == b or name.startswith(b + ".") for b in build_side):
        return
    seen.append(name)
    try:
        mod = importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{{type(exc).__name__}}: {{exc}}"
        return
    for info in pkgutil.iter_modules(getattr(mod, "__path__", None) or []):
        visit(f"{{name}}.{{info.name}}")

for root in ("gfnet_edge", "gfnet_edge.calibrate", "gfnet_edge.quantize"):
    visit(root)
from gfnet_edge import Runtime, cli
from gfnet_edge.calibrate import CalibrationConfig, run_calibration
import argparse
commands = sorted(next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices)
print(json.dumps({{"failed": failed, "seen": sorted(set(seen)), "tried": _Absent.tried, "commands": commands}}))
'''


def test_every_device_module_imports_without_the_build_side():
    r = run_without_build_side(_IMPORT_ALL)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["failed"] == {}
    assert out["tried"] == []  # importing the device side does not even try a build-side module
    for name in ("gfnet_edge", "gfnet_edge.runtime", "gfnet_edge.runtime.api", "gfnet_edge.calibrate.pipeline",
                 "gfnet_edge.cli", "gfnet_edge.cli.predict", "gfnet_edge.cli.build_engine", "gfnet_edge.data.images",
                 "gfnet_edge.selftest"):
        assert name in out["seen"]
    assert {"info", "build-engine", "predict", "calibrate", "demo", "train"} <= set(out["commands"])


def test_the_blocker_refuses_what_a_device_install_lacks():
    """The finder makes the listed modules unimportable (else the tests above prove nothing)."""
    r = run_without_build_side("import json\nfailed = []\nfor n in %r:\n    try:\n        __import__(n)\n"
                               "    except ModuleNotFoundError as exc:\n        failed.append(exc.name)\n"
                               "print(json.dumps(failed))\n" % (ABSENT + ("onnx.helper", "scipy.ndimage"),))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == list(ABSENT) + ["onnx", "scipy"]  # a submodule fails on its package


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, torch_mod):
    """A random-weight S=96 bundle (fp32, ONNX Runtime), its checkpoint, and 24 labelled images in a folder."""
    root = tmp_path_factory.mktemp("devside")
    # named demo_*: `calibrate --data demo` accepts it up to generating the demo images
    model = random_gfnet("demo_tiny_device", S, P, T, num_classes=3, channels=(8, 8, 16, 16), policy_hidden=16)
    ckpt, bundle = fp32_bundle(model, root)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (24, S + 8, S + 16, 3), dtype=np.uint8)
    images = write_image_folder(root / "images", frames, np.arange(24) % 3)
    _add_median_budget(bundle, images)
    return {"root": root, "bundle": bundle, "ckpt": ckpt, "images": images}


def _add_median_budget(bundle: Path, images: Path) -> None:
    """Makes the default budget exit about half of the images still running at each step (the median
    confidence of the images as thresholds), so that predictions exercise early exit."""
    from gfnet_edge.bundle import Bundle
    from gfnet_edge.calibrate.latency import prepare_frames
    from gfnet_edge.data.images import load_images
    from gfnet_edge.runtime import Runtime

    b = Bundle.load(bundle)
    frames, _ = load_images(images, S, b.model.crop_pct, b.model.dataset_interpolation)
    with Runtime(bundle) as rt:
        conf = rt.trace(prepare_frames(b.model, frames)).probs.max(axis=2)
    thresholds = [float(np.median(conf[k])) for k in range(T - 1)] + [-1e8]
    b.update_manifest(lambda m: m.update(budgets={"median": {"thresholds": thresholds, "unit": "test"}},
                                         default_budget="median"))


def test_predict_without_the_build_side_equals_the_full_install(tiny, capsys):
    assert main(["predict", str(tiny["bundle"]), str(tiny["images"]), "--json", "--batch-size", "5"]) == 0
    full = prediction_rows(capsys.readouterr().out)
    r = cli_without_build_side(["predict", tiny["bundle"], tiny["images"], "--json", "--batch-size", "5"])
    assert r.returncode == 0, r.stderr
    dev = prediction_rows(r.stdout)
    assert sorted(dev) == sorted(full) and len(dev) == 24
    assert len({row["exit_step"] for row in full.values()}) > 1  # the thresholds are exercised
    for name, row in full.items():
        assert (dev[name]["class"], dev[name]["exit_step"]) == (row["class"], row["exit_step"])
        assert dev[name]["confidence"] == pytest.approx(row["confidence"], abs=1e-6)


def test_calibrate_without_the_build_side(tiny):
    """A folder of labelled images; no matplotlib: the report has its tables and says why it has no figures.
    The held-out anytime accuracy equals the full install's Runtime on the same split."""
    from gfnet_edge.bundle import Bundle
    from gfnet_edge.calibrate.data import load_calibration_data
    from gfnet_edge.calibrate.latency import prepare_frames
    from gfnet_edge.runtime import Runtime

    out = tiny["root"] / "report"
    r = cli_without_build_side(["calibrate", tiny["bundle"], "--data", tiny["images"], "-o", out, "--no-write",
                                "--repeats", "5", "--warmup", "0", "--batch-size", "0", "--gallery", "2",
                                "--attempts", "1", "-q"])
    assert r.returncode == 0, r.stderr
    assert "figures omitted: matplotlib is not installed" in r.stdout
    rep = json.loads((out / "report.json").read_text())
    assert "matplotlib" in rep["figures_note"] and "<img class=\"plot\"" not in (out / "report.html").read_text()
    model = Bundle.load(tiny["bundle"]).model
    data = load_calibration_data(str(tiny["images"]), model)
    x, y = data.part("holdout")
    with Runtime(tiny["bundle"]) as rt:
        probs = rt.trace(prepare_frames(model, x)).probs
    expected = [100.0 * float(np.mean(probs[k].argmax(1) == y)) for k in range(T)]
    assert rep["anytime"]["fp32 (held-out)"] == pytest.approx(expected, abs=1e-9)
    assert rep["data"]["images"] == 24 and rep["data"]["holdout"] == len(y)


def test_info_on_a_bundle_without_the_build_side(tiny):
    r = cli_without_build_side(["info", tiny["bundle"], "--json"])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    manifest = json.loads((tiny["bundle"] / "manifest.json").read_text())
    assert info["model_name"] == manifest["model"]["model_name"] == "demo_tiny_device"
    assert (info["image_size"], info["patch_size"], info["steps"]) == (S, P, T)
    assert info["graphs"] == sorted(manifest["graphs"])
    assert info["budgets"] == {k: v["thresholds"] for k, v in manifest["budgets"].items()}
    assert info["default_budget"] == manifest["default_budget"]
    assert info["macs"]["cumulative"] == manifest["costs"]["macs"]["cumulative"]
    table = cli_without_build_side(["info", tiny["bundle"]])
    assert table.returncode == 0 and f"S={S} P={P} T={T} classes=3" in table.stdout


@pytest.mark.parametrize("argv, needs", [
    (["build-engine", "{ckpt}", "-o", "{root}/new_bundle"], "torch"),
    (["info", "{ckpt}"], "torch"),
    (["train", "--out", "{root}/train_run"], "torch"),
    (["calibrate", "{bundle}", "--data", "demo", "-o", "{root}/demo_report"], "scipy"),
])
def test_build_side_commands_name_the_extras_and_exit_3(tiny, argv, needs):
    argv = [a.format(**tiny) for a in argv]
    before = sorted(p.name for p in tiny["root"].iterdir())
    r = cli_without_build_side(argv)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gfnet-edge: error: ")
    assert f"{needs} is not installed" in lines[0] and 'pip install "gfnet-edge[build]"' in lines[0]
    assert sorted(p.name for p in tiny["root"].iterdir()) == before  # nothing written


def test_demo_without_the_build_side_says_what_to_install(tmp_path):
    r = cli_without_build_side(["demo", "-o", tmp_path / "demo"])
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "gfnet-edge[build,report]"' in lines[0]
    assert "missing here: " + ", ".join(ABSENT) in lines[0]
    assert not (tmp_path / "demo").exists()


def test_engines_on_the_device_need_tensorrt_not_torch(tiny):
    """``build-engine BUNDLE --backend tensorrt`` is the device's half of the build: without TensorRT
    it names TensorRT, not the build extras."""
    if run_without_build_side("import tensorrt").returncode == 0:
        pytest.skip("TensorRT is installed here: this case is about a device without it")
    r = cli_without_build_side(["build-engine", tiny["bundle"], "--backend", "tensorrt"])
    assert r.returncode == 3, r.stderr
    assert "TensorRT is not available" in r.stderr and "gfnet-edge[build]" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_missing_part_of_an_installed_module_is_not_called_a_missing_install(torch_mod):
    """Only modules that are not installed are blamed on the install; anything else stays a bug."""
    from gfnet_edge.errors import missing_build_module

    assert missing_build_module(ModuleNotFoundError("x", name="torch._no_such_part")) is None
    assert missing_build_module(ModuleNotFoundError("x", name="tensorrt")) is None  # not a build-side module
    assert missing_build_module(ValueError("x")) is None


def test_a_checkout_that_is_not_installed_maps_calibrate_and_quantize(tmp_path):
    """A GPU machine builds the extension in place and runs the checkout without installing it:
    gfnet_edge.calibrate and gfnet_edge.quantize are then the checkout's calibrate/ and quantize/,
    as in an installed copy (an installed editable copy's import hook is switched off here)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in repr(f)]\n")
    code = ("import sys, gfnet_edge.calibrate as c, gfnet_edge.quantize as q\n"
            "assert not any('Editable' in repr(f) for f in sys.meta_path)\n"
            "print(c.__file__); print(q.__file__)")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{root}")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(root / "calibrate" / "__init__.py"), str(root / "quantize" / "__init__.py")]
