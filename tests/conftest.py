"""Shared fixtures. Tests run on the CPU; GPU tests skip themselves with a reason."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def torch_mod():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


#: The shipped demo checkpoint (quarter-width ResNet-18 GFNet, S=96, P=48, T=3, 10 classes).
DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar"


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """The shipped demo checkpoint's path (read only)."""
    return DEMO_CHECKPOINT


@pytest.fixture(scope="session")
def demo_onnx_bundle(tmp_path_factory, demo_checkpoint):
    """The shipped demo checkpoint as an fp32 ONNX Runtime bundle (built once per session; read
    only: a test that changes a bundle uses :func:`demo_onnx_bundle_copy`)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from gfnet_edge.build import BuildConfig, build_bundle

    out = tmp_path_factory.mktemp("demo_onnx") / "bundle"
    return build_bundle(demo_checkpoint, out, BuildConfig(precision="fp32", backend="onnxruntime"), progress=False)


@pytest.fixture(scope="module")
def demo_onnx_bundle_copy(demo_onnx_bundle, tmp_path_factory):
    """A copy of :func:`demo_onnx_bundle` that the tests of one module may change."""
    from gfnet_edge.bundle import Bundle

    root = tmp_path_factory.mktemp("demo_onnx_copy") / "bundle"
    shutil.copytree(demo_onnx_bundle.root, root)
    return Bundle.load(root)


#: Calibration and evaluation images of :func:`demo_int8_bundle`.
DEMO_INT8_CALIB, DEMO_INT8_EVAL = 32, 48


@pytest.fixture(scope="session")
def demo_int8_bundle(tmp_path_factory, demo_checkpoint):
    """The demo checkpoint as an INT8 ONNX Runtime bundle: fp32 and int8-cpu graphs, calibrated
    on :data:`DEMO_INT8_CALIB` demo images and scored on :data:`DEMO_INT8_EVAL` (read only)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from gfnet_edge.build import BuildConfig, build_bundle

    cfg = BuildConfig(precision="int8", backend="onnxruntime", calib_data="demo", num_calib=DEMO_INT8_CALIB,
                      num_eval=DEMO_INT8_EVAL, int8_profiles=("cpu",), max_accuracy_drop=100.0, threads=2)
    return build_bundle(demo_checkpoint, tmp_path_factory.mktemp("demo_int8") / "bundle", cfg, progress=False)
