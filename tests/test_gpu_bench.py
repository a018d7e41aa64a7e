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


def test_gpu_benchmarks_dry_run_end_to_end(tmp_path):
    """bench/e2e_gpu.py and bench/gpu_shapes.py as a GPU session runs them, on the CPU (``--device
    cpu``): the report is written whole, the loop's own exits give the accuracy the trace predicted
    at the chosen operating point, and gpu_shapes takes its exit profile from e2e_gpu's JSON."""
    import json

    import e2e_gpu
    import gpu_shapes

    out = tmp_path / "e2e_gpu.md"
    assert e2e_gpu.main(["--device", "cpu", "--batches", "1,8", "--precisions", "fp32", "--num-test", "24",
                         "--num-val", "24", "--tolerance", "100", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["complete"] is True and "Partial" not in out.read_text()
    run = res["runs"]["fp32"]
    pick = run["pick"]  # a tolerance of 100 points: every point qualifies, the fewest mean steps wins
    assert pick["mean_steps"] == min(p["mean_steps"] for p in run["points"])
    assert sum(pick["exits"]) == 24
    assert run["pick_accuracy_measured"] == pytest.approx(pick["accuracy"])
    assert sorted(run["batches"]) == ["1", "8"]
    for entry in run["batches"].values():
        assert entry["outside"]["loop_ms"] > 0 and entry["outside"]["preprocess_ms"] > 0

    shapes = tmp_path / "gpu_shapes.md"
    assert gpu_shapes.main(["--device", "cpu", "--models", "mobilenetv3_large_100:96", "--batches", "1",
                            "--precisions", "fp32", "--images", "4", "--reps", "1",
                            "--profile-from", str(out.with_suffix(".json")), "--out", str(shapes)]) == 0
    sres = json.loads(shapes.with_suffix(".json").read_text())
    assert sres["complete"] is True
    assert sres["profile"]["source"].startswith(str(out.with_suffix(".json")))
    np.testing.assert_allclose(sres["profile"]["fractions"], np.asarray(pick["exits"]) / 24)
    (m,) = sres["models"]
    assert (m["model"], m["P"], m["T"]) == ("mobilenetv3_large_100", 96, 3)
    assert m["batches"]["1"]["static_ms"] > 0


def test_a_float16_runner_leaves_the_model_in_float32():
    """The runner's backbones are a converted copy: the model's weights (which the heads and runs
    at other precisions read) keep their dtype and values."""
    import gpu_common

    model = random_gfnet("tiny_bench", 64, 32, 3, 10, (8, 16, 32, 64), 32, random_bn=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graphs = gpu_common.backbone_graphs(model, "cpu", "float16")
    assert {p.dtype for g in graphs.values() for p in g.parameters()} == {torch.float16}
    after = model.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


def _wheel(folder: Path, name: str, files: dict) -> Path:
    """A minimal pure-Python wheel ``name-99.0-py3-none-any.whl`` holding ``files``."""
    import zipfile

    path = folder / f"{name}-99.0-py3-none-any.whl"
    info = f"{name}-99.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        for rel, text in files.items():
            z.writestr(rel, text)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 99.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_gpu_session_script_checks_its_python_before_any_step(tmp_path):
    """bench/gpu_session.sh with no steps: env.txt lists the packages it looked for and the
    results are packed. Carried wheels go onto the path ahead of the machine's packages: a
    carried fastjsonschema that does not import stops the run (exit 5) before any step, saying
    how to carry the missing wheels."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    (tmp_path / "wheels").mkdir()  # no carried wheels (the checkout's .whl/ may hold real ones)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(OUT=str(tmp_path / "out"), PACK_TO=str(tmp_path / "pack"), STEPS="nothing", PYTHONPATH=str(repo),
               WHEELS=str(tmp_path / "wheels"))
    r = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (tmp_path / "out" / "env.txt").read_text()
    assert "python packages missing: " in text and "steps: nothing" in text
    assert (tmp_path / "pack" / "gpu-session.tgz").is_file() and (tmp_path / "pack" / "env.txt").is_file()

    (tmp_path / "carried").mkdir()
    wheel = _wheel(tmp_path / "carried", "fastjsonschema",
                   {"fastjsonschema/__init__.py": "raise ImportError('a stand-in that does not import')\n"})
    env.update(OUT=str(tmp_path / "out2"), WHEELS=str(tmp_path / "carried"), STEPS="build tests")
    r = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "gfnet_edge does not import" in r.stdout and "bench/gpu_wheels.sh" in r.stdout
    assert f"installed {wheel}" in (tmp_path / "out2" / "env.txt").read_text()
    assert (tmp_path / "out2" / "site" / "fastjsonschema" / "__init__.py").is_file()
    assert not (tmp_path / "out2" / "build.log").exists()
