"""Shared fixtures. Tests run on the CPU; GPU tests skip themselves with a reason."""
from __future__ import annotations

import os

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


@pytest.fixture(scope="session")
def demo_onnx_bundle(tmp_path_factory):
    """The shipped demo checkpoint as an fp32 ONNX Runtime bundle (built once per session)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from pathlib import Path

    from gfnet_edge.build import BuildConfig, build_bundle

    demo = Path(__file__).resolve().parents[1] / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar"
    out = tmp_path_factory.mktemp("demo_onnx") / "bundle"
    return build_bundle(demo, out, BuildConfig(precision="fp32", backend="onnxruntime"), progress=False)
