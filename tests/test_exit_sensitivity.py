"""bench/exit_sensitivity.py: the weight perturbations it measures."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from exit_sensitivity import perturb_weights  # noqa: E402


def _graph(tmp: Path) -> Path:
    from onnx import helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = np.arange(4, dtype=np.float32)  # small tensors (biases) stay as they are
    g = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    p = tmp / "g.onnx"
    onnx.save(helper.make_model(g), str(p))
    return p


def _inits(p: Path):
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer}


def test_fp16_rounding_and_relative_noise(tmp_path):
    src = _graph(tmp_path)
    w, b = _inits(src)["w"], _inits(src)["b"]
    fp16 = _inits(perturb_weights(src, tmp_path / "h.onnx", 0.0))
    np.testing.assert_array_equal(fp16["w"], w.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(fp16["b"], b)
    noisy = _inits(perturb_weights(src, tmp_path / "n.onnx", 0.02))
    rel = noisy["w"] / w - 1.0
    assert 0.01 < rel.std() < 0.03 and abs(rel.mean()) < 0.01  # about 2 % per weight, no bias
    np.testing.assert_array_equal(noisy["b"], b)
