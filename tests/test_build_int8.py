"""An INT8 bundle built by build-engine runs at the accuracy its quantization report measured."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxsim")

from gfnet_edge.quantize import load_calibration_images  # noqa: E402
from gfnet_edge.runtime import Runtime  # noqa: E402

from conftest import DEMO_INT8_CALIB as N_CAL, DEMO_INT8_EVAL as N_EVAL  # noqa: E402


@pytest.fixture()
def int8_bundle(demo_int8_bundle):
    """The session's INT8 demo bundle (tests/conftest.py)."""
    return demo_int8_bundle


def _probs(bundle, precision: str, x: np.ndarray) -> np.ndarray:
    with Runtime(bundle.root, backend="onnxruntime", precision=precision, threads=2) as rt:
        return np.concatenate([rt.trace(x[i:i + 16]).probs for i in range(0, len(x), 16)], axis=1)


def _final_accuracy(bundle, precision: str, x: np.ndarray, y: np.ndarray) -> list:
    return list(100.0 * (_probs(bundle, precision, x).argmax(axis=2) == y[None]).mean(axis=1))


def _demo_frames(bundle, n: int):
    """The first ``n`` uint8 frames and labels of the demo validation split, as a camera gives them."""
    from gfnet_edge.data import ClutteredDigits, demo_config

    return ClutteredDigits("val", config=demo_config(bundle.model)).arrays(n, progress=False)


def test_int8_bundle_accuracy_equals_quantization_report(int8_bundle):
    """The report's held-out figures are those of the deployed runtime: uint8 frames, normalised
    inside it (the build's held-out images are the demo split's after the calibration ones)."""
    from gfnet_edge.quantize.scoring import kl_divergence

    report = int8_bundle.manifest["quantization"]["cpu"]["accuracy"]
    assert report["n"] == N_EVAL
    frames, y = _demo_frames(int8_bundle, N_CAL + N_EVAL)
    frames, y = frames[N_CAL:], y[N_CAL:]
    np.testing.assert_allclose(_final_accuracy(int8_bundle, "int8-cpu", frames, y), report["accuracy_int8"], atol=1e-3)
    np.testing.assert_allclose(_final_accuracy(int8_bundle, "fp32", frames, y), report["accuracy_fp32"], atol=1e-3)
    probs = {p: _probs(int8_bundle, p, frames) for p in ("fp32", "int8-cpu")}
    kl = float(kl_divergence(probs["fp32"][-1], probs["int8-cpu"][-1]).mean())
    np.testing.assert_allclose(kl, report["kl_final"], rtol=1e-3)
    assert "uint8 frames" in int8_bundle.manifest["quantization"]["cpu"]["held_out"]
    assert set(int8_bundle.manifest["graphs"]) == {"fp32", "int8-cpu"}


def test_int8_bundle_graphs_are_quantized(int8_bundle):
    """Each int8-cpu graph the bundle lists is a quantized graph (Q/DQ or QLinear nodes) whose
    outputs, on ONNX Runtime directly, differ from the FP32 graph's on the same images."""
    import onnx
    import onnxruntime as ort

    m = int8_bundle.manifest
    listed = sorted(rel for rel in m["artifacts"] if rel.startswith("graphs/") and rel.endswith(".int8-cpu.onnx"))
    assert listed == sorted(m["graphs"]["int8-cpu"].values()) and len(listed) == 2
    x, _ = load_calibration_images("demo", int8_bundle.model, N_CAL + N_EVAL, return_labels=True)
    P, c = int8_bundle.model.patch_size, (int8_bundle.model.image_size - int8_bundle.model.patch_size) // 2
    x = np.ascontiguousarray(x[N_CAL:N_CAL + 8, :, c:c + P, c:c + P])  # held-out image centres, the graphs' size
    fp32 = int8_bundle.graph_paths("fp32")
    for g, path in int8_bundle.graph_paths("int8-cpu").items():
        assert path == int8_bundle.root / m["graphs"]["int8-cpu"][g]
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops or any(o.startswith("QLinear") for o in ops), \
            (g, sorted(ops))
        assert not any(o in ("QuantizeLinear", "DequantizeLinear") or o.startswith("QLinear")
                       for o in {n.op_type for n in onnx.load(str(fp32[g])).graph.node})
        outs = []
        for p in (path, fp32[g]):
            sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            outs.append(sess.run(None, {sess.get_inputs()[0].name: x}))
        assert len(outs[0]) == len(outs[1])
        for q, f in zip(*outs):
            assert q.shape == f.shape and np.isfinite(q).all()
        assert max(float(np.abs(q - f).max()) for q, f in zip(*outs)) > 1e-3, g


def test_build_engine_prints_what_each_int8_graph_set_keeps_in_float(int8_bundle):
    from gfnet_edge.bundle_info import quantization_summary

    m = int8_bundle.manifest
    rep = m["quantization"]["cpu"]
    (line,) = quantization_summary(m)
    assert line.startswith(f"int8-cpu: {100 * rep['int8_mac_share']:.1f}% of the backbone multiply-adds in INT8")
    assert f"{0.0 - rep['accuracy']['final_drop']:+.2f} points against FP32 on {rep['accuracy']['n']} held-out" in line
    assert line.endswith(f"; calibrated on {rep['calibration']['images']} images ({rep['method']})")
    assert rep["calibration"]["images"] == N_CAL
    guarded = {"quantization": {"tensorrt": {"int8_mac_share": 0.98311, "patch_guard": {"nodes": ["a", "b"]},
                                             "float_nodes": [{"node": "c"}], "accuracy": {"final_drop": 0.3, "n": 256}}}}
    assert quantization_summary(guarded) == [
        "int8-tensorrt: 98.3% of the backbone multiply-adds in INT8 (nodes in float: 2 by the patch guard, "
        "1 by the accuracy search); final-step accuracy -0.30 points against FP32 on 256 held-out images"]
    # a whole graph kept in float by the search counts its nodes
    whole = {"quantization": {"cpu": {"int8_mac_share": 0.5, "float_nodes": [{"node": "(whole glance graph)",
                                                                               "members": 12}]}}}
    assert quantization_summary(whole) == [
        "int8-cpu: 50.0% of the backbone multiply-adds in INT8 (nodes in float: 12 by the accuracy search)"]
    # without labels the figure is agreement with FP32's predictions, not an accuracy difference
    unlabelled = {"quantization": {"cpu": {"int8_mac_share": 1.0, "mixed_precision": "target met (...)",
                                           "accuracy": {"labels": "fp32 predictions", "final_drop": 0.424, "n": 236}}}}
    assert quantization_summary(unlabelled) == [
        "int8-cpu: 100.0% of the backbone multiply-adds in INT8; final-step predictions 99.58% the same as "
        "FP32's on 236 unlabelled held-out images"]
    # no held-out images: nothing was measured, and the line says so
    unchecked = {"quantization": {"cpu": {"int8_mac_share": 1.0, "mixed_precision": "skipped: no held-out images",
                                          "accuracy": None}}}
    assert quantization_summary(unchecked) == [
        "int8-cpu: 100.0% of the backbone multiply-adds in INT8; accuracy not checked (no held-out images)"]
    missed = {"quantization": {"cpu": {"int8_mac_share": 0.9, "float_nodes": [{"node": "c"}] * 8,
                                       "mixed_precision": "target NOT met (final-step drop <= 0.5): drop 1.2 ...",
                                       "accuracy": {"labels": "true", "final_drop": 1.2, "n": 256}}}}
    assert quantization_summary(missed) == [
        "int8-cpu: 90.0% of the backbone multiply-adds in INT8 (nodes in float: 8 by the accuracy search); "
        "final-step accuracy -1.20 points against FP32 on 256 held-out images (the search's accuracy target NOT met)"]


def test_info_shows_what_the_int8_build_measured(int8_bundle, capsys):
    """``gfnet-edge info BUNDLE`` (the device side, no torch) prints the same quantization lines
    as build-engine did, and gives them in --json."""
    import json

    from gfnet_edge import cli
    from gfnet_edge.bundle_info import quantization_summary

    lines = quantization_summary(int8_bundle.manifest)
    assert lines and lines[0].startswith("int8-cpu: ")
    assert cli.main(["info", str(int8_bundle.root)]) == 0
    out = capsys.readouterr().out
    budgets = int8_bundle.manifest["budgets"]
    for name, b in budgets.items():  # thresholds as the runtime reads them: > 1 never exits, <= 0 always does
        want = ", ".join("never" if t > 1 else "always" if t <= 0 else f"{t:.3f}" for t in b["thresholds"])
        assert f"{name}{' (default)' if name == int8_bundle.manifest['default_budget'] else ''}: {want}" in out
    assert "always" in out and "e+" not in out and "100000000" not in out
    rows = [r for r in out.splitlines() if r.startswith("quantization ")]
    assert [r[len("quantization"):].strip() for r in rows] == lines
    assert cli.main(["info", str(int8_bundle.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantization"] == lines


def test_calibrating_an_int8_bundle_traces_the_exits_its_runtime_takes(int8_bundle, tmp_path, capsys):
    """An INT8 graph rounds its input to its quantization grid, so uint8 frames normalised on the
    way in and the same frames normalised beforehand (equal to about 1e-6) give different
    probabilities for some images; calibrate traces the frames the way its timed calls pass
    them, so every budget's held-out run takes exactly the traced exits and classes."""
    import json
    import shutil

    from gfnet_edge import cli
    from gfnet_edge.calibrate.data import load_calibration_data
    from gfnet_edge.calibrate.latency import prepare_frames

    with Runtime(int8_bundle.root, backend="onnxruntime", precision="int8-cpu", threads=2) as rt:
        frames, _ = load_calibration_data("demo", rt.model, 160).part("holdout")
        assert rt.model.crop_pct == 1.0  # the runtime takes these S x S frames as they are
        moved = np.abs(rt.trace(frames).probs - rt.trace(prepare_frames(rt.model, frames)).probs).max()
    assert moved > 1e-3  # the premise: the two ways in differ for INT8
    bundle = tmp_path / "bundle"
    shutil.copytree(int8_bundle.root, bundle)
    out = tmp_path / "report"
    rc = cli.main(["calibrate", str(bundle), "--data", "demo", "--num-images", "160", "-o", str(out),
                   "--precision", "int8-cpu", "--threads", "2", "--repeats", "5",
                   "--warmup", "1", "--warmup-ms", "0", "--batch-size", "0", "--gallery", "0", "--deadlines", "0",
                   "--attempts", "1", "--no-compare", "--no-write", "-q"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "report.json").read_text())
    budgets = res["budgets"]  # three, between the glance's latency and the full model's
    assert len(budgets) == 3 and all(b["consistent_with_trace"] for b in budgets)
    assert any(0 < b["measured"]["exit_fractions"][-1] < 1 for b in budgets)  # early exits and late ones


def test_num_calib_help_states_how_many_images_are_held_out(monkeypatch):
    """``--num-calib``'s help says how many images beyond it the build loads to check the accuracy."""
    import argparse
    import re

    import gfnet_edge.quantize as gq
    from gfnet_edge import build, cli
    from gfnet_edge.errors import InputError

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = next(a.help for a in sub.choices["build-engine"]._actions if "--num-calib" in a.option_strings)
    held = re.search(r"(\d+) more, when the data has them, are held out", text)
    assert held, text
    asked = []

    def loader(source, model, n, **kw):
        asked.append(n)
        raise ValueError("stop")

    monkeypatch.setattr(gq, "load_calibration_images", loader)
    with pytest.raises(InputError):
        build._calibration_images(object(), build.BuildConfig(calib_data="demo", num_calib=64))
    assert asked == [64 + int(held.group(1))]


def test_num_eval_sets_how_many_images_are_held_out(monkeypatch, capsys):
    """``--num-eval N`` loads N images after the calibration images for the accuracy check; 0 turns
    the check off, fewer than the search needs is refused before anything is built, and on a
    build from a bundle (or a non-INT8 build) it is refused as ignored."""
    import gfnet_edge.quantize as gq
    from gfnet_edge import build, cli
    from gfnet_edge.errors import InputError

    asked = []

    def loader(source, model, n, **kw):
        asked.append(n)
        raise ValueError("stop")

    monkeypatch.setattr(gq, "load_calibration_images", loader)
    for n in (0, 2400):
        with pytest.raises(InputError):
            build._calibration_images(object(), build.BuildConfig(calib_data="demo", num_calib=64, num_eval=n))
    assert asked == [64, 64 + 2400]
    with pytest.raises(InputError, match="--num-eval must be 0 .* or at least 32, got 8"):
        build._check_int8_options(build.BuildConfig(num_eval=8))
    demo = Path(__file__).resolve().parents[1] / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar"
    assert cli.main(["build-engine", str(demo), "-o", "unused", "--precision", "fp32", "--num-eval", "64"]) == 2
    assert "--num-eval applies to --precision int8" in capsys.readouterr().err
    for n in ("16", "-1"):  # the option's own range: 0, or at least what the search needs
        assert cli.main(["build-engine", str(demo), "-o", "unused", "--num-eval", n]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"argument --num-eval: must be 0 or in [32, 1000000], got {n}" in err, err


def test_a_quiet_build_renders_demo_calibration_images_without_a_progress_bar(demo_checkpoint, tmp_path,
                                                                             monkeypatch, capsys):
    """``build-engine -q``: the demo images rendered for calibration (none cached) show no bar."""
    from gfnet_edge import build
    from gfnet_edge.models import load_checkpoint

    monkeypatch.setenv("GFNET_EDGE_CACHE", str(tmp_path))
    model = load_checkpoint(demo_checkpoint)
    capsys.readouterr()
    cfg = build.BuildConfig(calib_data="demo", num_calib=16, num_eval=0)
    frames, _ = build._calibration_images(model, cfg, progress=False)
    assert len(frames) == 16 and list(tmp_path.glob("cluttered_digits_val_*.npz"))  # rendered, not read
    assert capsys.readouterr().err == ""


def test_held_out_check_traces_frames_as_the_runtime_takes_them(int8_bundle):
    """The INT8 held-out check (``trace_graphs``, as ``quantize_model(eval_images=frames)`` runs
    it) takes uint8 S x S frames as already cropped, for a model that crops too: its trace equals
    the runtime's ``trace(frames, cropped=True)`` and, on the FP32 graphs, the trace of the
    frames normalised beforehand; a second crop would differ."""
    import dataclasses

    from gfnet_edge import ops
    from gfnet_edge.runtime.api import trace_graphs

    b = int8_bundle
    cropping = dataclasses.replace(b.model, crop_pct=0.875)
    frames, _ = _demo_frames(b, 12)
    x = ops.normalise_frames(frames, cropping.mean, cropping.std)
    for prec in ("fp32", "int8-cpu"):
        got = trace_graphs(cropping, b.graph_paths(prec), b.heads_path, frames).probs
        with Runtime(b.root, backend="onnxruntime", precision=prec) as rt:
            rt.model = cropping
            np.testing.assert_allclose(got, rt.trace(frames, cropped=True).probs, rtol=0, atol=1e-6)
            recropped = rt.trace(frames).probs
        assert np.abs(recropped - got).max() > 0.05
    np.testing.assert_allclose(trace_graphs(cropping, b.graph_paths("fp32"), b.heads_path, x).probs,
                               trace_graphs(cropping, b.graph_paths("fp32"), b.heads_path, frames).probs,
                               rtol=0, atol=1e-5)
    from gfnet_edge.errors import InputError

    with pytest.raises(InputError, match=r"frames to trace must be uint8 \(N, 224, 224, 3\), already resized"):
        trace_graphs(cropping, b.graph_paths("fp32"), b.heads_path, np.zeros((1, 240, 260, 3), np.uint8))


def test_calib_data_with_other_class_folders_than_the_models_is_refused(tmp_path, capsys):
    """A model trained on an image folder records its classes; --calib-data ROOT (class folders
    ``train`` and ``val``) would label the held-out check's images by split, so it is refused in
    one line before anything is written; ROOT/val, or ROOT with --num-eval 0, is taken."""
    from PIL import Image

    from gfnet_edge import build, cli
    from gfnet_edge.models import save_checkpoint
    from gfnet_edge.models.checkpoint import load_checkpoint
    from tiny_gfnet import random_gfnet

    names = ["blue jay", "grüne Äpfel", "red car"]
    model = random_gfnet("tiny_classes", 64, 32, 2, num_classes=3, channels=(8, 8, 16, 16), policy_hidden=8)
    ckpt = save_checkpoint(tmp_path / "gfnet.pth.tar", model, metadata={"classes": names})
    root = tmp_path / "my data"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in names:
            (root / split / c).mkdir(parents=True)
            for i in range(6):
                img = rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i}.png")
    out = tmp_path / "bundle"
    rc = cli.main(["build-engine", str(ckpt), "-o", str(out), "--precision", "int8", "--calib-data", str(root),
                   "--num-calib", "16", "--backend", "onnxruntime", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not the model's classes" in err[0] and "train, val" in err[0], err
    assert not out.exists()
    loaded = load_checkpoint(ckpt)
    frames, labels = build._calibration_images(loaded, build.BuildConfig(calib_data=str(root / "val"), num_calib=16),
                                               progress=False)
    assert len(frames) == 18 and sorted(np.bincount(labels)) == [6, 6, 6]
    frames, _ = build._calibration_images(loaded, build.BuildConfig(calib_data=str(root), num_calib=16, num_eval=0),
                                          progress=False)
    assert len(frames) == 16
    # a bundle inside the folder it calibrates on would become one of its class folders
    inside = root / "val" / "bundle"
    capsys.readouterr()
    rc = cli.main(["build-engine", str(ckpt), "-o", str(inside), "--precision", "int8", "--calib-data", str(root / "val"),
                   "--num-calib", "16", "--backend", "onnxruntime", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"is inside the --calib-data folder {root / 'val'}" in err[0], err
    assert not inside.exists()
    # the same name written decomposed (as on macOS): the message says how the look-alikes differ
    import unicodedata

    (root / "val" / "grüne Äpfel").rename(root / "val" / unicodedata.normalize("NFD", "grüne Äpfel"))
    rc = cli.main(["build-engine", str(ckpt), "-o", str(out), "--precision", "int8", "--calib-data", str(root / "val"),
                   "--num-calib", "16", "--backend", "onnxruntime", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "('gr\\xfcne \\xc4pfel', 'gru\\u0308ne A\\u0308pfel')" in err[0], err


def test_threads_reach_the_quantization(monkeypatch, tmp_path):
    """``build-engine --threads N`` (``BuildConfig.threads``) is the thread count the INT8
    quantization runs ONNX Runtime and the search with (``QuantizeOptions.threads``)."""
    from types import SimpleNamespace

    import gfnet_edge.quantize as gq
    from gfnet_edge import build

    seen = []

    class Stop(Exception):
        pass

    def quantize_model(model, fp32, heads, calib, out_dir, opts, **kw):
        seen.append(opts.threads)
        raise Stop()

    monkeypatch.setattr(gq.QuantCalibrationSet, "from_model", classmethod(lambda cls, model, x, progress=True: None))
    monkeypatch.setattr(gq, "quantize_model", quantize_model)
    model = SimpleNamespace(spec=SimpleNamespace(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    frames = np.zeros((16, 8, 8, 3), np.uint8)
    for threads in (1, 3, None):
        cfg = build.BuildConfig(num_calib=16, num_eval=0, int8_profiles=("cpu",), threads=threads)
        with pytest.raises(Stop):
            build._quantize(model, tmp_path, {"graphs": {}}, frames, cfg, "onnxruntime", progress=False)
    assert seen == [1, 3, None]


def test_threads_bound_torch_for_the_whole_build_and_are_restored(monkeypatch, tmp_path):
    """``BuildConfig.threads`` is torch's thread count while the graphs are exported (and so
    while the INT8 fine-tuning runs), and the caller's count comes back afterwards, also when
    the build fails; without it torch keeps the caller's count."""
    import torch

    from gfnet_edge import build, export
    from gfnet_edge.demo import DEMO_CHECKPOINT

    seen = []

    class Stop(Exception):
        pass

    def export_model(model, out):
        seen.append(torch.get_num_threads())
        raise Stop()

    monkeypatch.setattr(export, "export_model", export_model)
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    for threads in (want, None):
        with pytest.raises(Stop):
            build.build_bundle(DEMO_CHECKPOINT, tmp_path / "b", build.BuildConfig(precision="fp32", threads=threads),
                               progress=False)
        assert torch.get_num_threads() == before
    assert seen == [want, before]
    assert not (tmp_path / "b").exists()


def test_one_helper_sets_torch_threads_for_the_build_and_the_fine_tuning(monkeypatch):
    """``quantize.finetune.torch_threads`` is the thread setting of both the build
    (``build_bundle``) and the fine-tuning (``finetune_weights``): N torch threads inside the
    block, the count found before it after it, also when the block raises; None leaves torch's
    count alone."""
    import torch

    from gfnet_edge import build
    from gfnet_edge.quantize import finetune

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    with finetune.torch_threads(want):
        assert torch.get_num_threads() == want
    with pytest.raises(KeyError):
        with finetune.torch_threads(want):
            raise KeyError("the block failed")
    with finetune.torch_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before
    entered, real = [], finetune.torch_threads

    def spy(threads):
        entered.append(threads)
        return real(None)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop()

    monkeypatch.setattr(finetune, "torch_threads", spy)
    monkeypatch.setattr(build, "_build_bundle", stop)
    monkeypatch.setattr(finetune, "_finetune", stop)
    with pytest.raises(Stop):
        build.build_bundle(Path("ck.pth"), Path("out"), build.BuildConfig(threads=3), progress=False)
    with pytest.raises(Stop):
        finetune.finetune_weights(None, None, np.zeros((1, 1), np.float32), epochs=1, threads=2)
    assert entered == [3, 2]
