"""The GPU benchmarks' own plumbing, run on the CPU: the loop they time over an in-memory GFNet
(bench/gpu_common.py, bench/e2e_gpu.py) gives the ONNX Runtime trace's answers, so a GPU
session does not find a broken script after its machine was started."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("gfnet_edge.ops", reason="the runtime extension runs the loop")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from tiny_gfnet import random_gfnet  # noqa: E402


@pytest.mark.parametrize("per_step", [False, True])
def test_bench_driver_traces_like_onnxruntime(tmp_path, per_step):
    import e2e_gpu
    import gpu_common

    from gfnet_edge import ops
    from gfnet_edge.export import export_model, model_desc
    from gfnet_edge.quantize.scoring import trace

    model = random_gfnet("tiny_bench", 64, 32, 3, 10, (8, 16, 32, 64), 32, logit_scale=4.0, random_bn=True)
    desc = model_desc(model)
    frames = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    images = ops.normalise_frames(frames, desc.mean, desc.std)
    driver = (e2e_gpu.per_step_driver if per_step else gpu_common.gfnet_driver)(model, "cpu", "float32")
    try:
        got = driver.run(images, None, None)
    finally:
        driver.runner.deactivate()
    paths = export_model(model, tmp_path / "fp32")
    ref = trace(desc, {g: paths[g] for g in ("glance", "focus")}, paths["heads"], images, threads=1)
    np.testing.assert_allclose(np.asarray(got.probs), ref.probs, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got.coords), ref.coords)
