"""INT8 quantization: calibration data, Q/DQ placement, the TensorRT checker, accuracy tooling.

A tiny custom GFNet (ResNet-18 layout at 1/8 width, S=128, P=64) keeps the whole file well
under a minute on 2 cores.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.quantization")
from onnx import helper, numpy_helper

import gfnet_edge.quantize as gq  # noqa: E402

from gfnet_edge.export import export_model, manifest_model
from gfnet_edge.models import GFNet, crop_patches
from gfnet_edge.quantize.options import ort_settings
from gfnet_edge.quantize.qdq import preprocess, quantize_graph, run_quantize_static

from tiny_gfnet import random_gfnet  # noqa: E402

S, P = 128, 64


def _tiny_model() -> GFNet:
    return random_gfnet("tiny_quant", S, P, 3, 10, (8, 16, 32, 64), 32, logit_scale=1.0, random_bn=True)


def _images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random images (closer to natural statistics than white noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 16, 16, generator=g)
    x = torch.nn.functional.interpolate(low, size=(S, S), mode="bilinear", align_corners=False)
    return (x + 0.2 * torch.randn(n, 3, S, S, generator=g)).numpy().astype(np.float32)


def _frames(n: int, seed: int = 0) -> np.ndarray:
    """uint8 S x S frames, what the build loads (``load_calibration_images(as_frames=True)``)."""
    return np.random.default_rng(seed).integers(0, 256, (n, S, S, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, torch_mod):
    root = tmp_path_factory.mktemp("quant")
    model = _tiny_model()
    paths = export_model(model, root / "fp32")
    calib = gq.QuantCalibrationSet.from_model(model, _images(24), progress=False)
    pre = {g: preprocess(paths[g], root / f"{g}.pre.onnx")[0] for g in ("glance", "focus")}
    out = {}
    for prof in ("tensorrt", "cpu"):  # tensorrt: with the residual stream in INT8 (the Add placement rule)
        st = ort_settings(gq.QuantizeOptions(profile=prof, method="max", residual_int8=True))
        for g in ("glance", "focus"):
            dst = root / f"{g}.{prof}.onnx"
            quantize_graph(pre[g], dst, calib.reader(g, 8, progress=False), st, "max", prof)
            out[(prof, g)] = dst
    return {"root": root, "model": model, "paths": paths, "calib": calib, "pre": pre, "q": out}


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ------------------------------------------------------------------------------------ checker
def test_checker_accepts_tensorrt_profile_models(tiny):
    for g in ("glance", "focus"):
        path = tiny["q"][("tensorrt", g)]
        assert gq.check_tensorrt_compat(path) == []
        m = onnx.load(str(path))
        ops = {n.op_type for n in m.graph.node}
        assert "QLinearConv" not in ops and "ConvInteger" not in ops
        inits = _inits(m)
        prod = {o: n for n in m.graph.node for o in n.output}
        for n in m.graph.node:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                zp = inits[n.input[2]]
                assert zp.dtype == np.int8 and not zp.any()
            if n.op_type == "Conv":  # every conv quantized, weights per channel on axis 0
                dq = prod[n.input[1]]
                assert dq.op_type == "DequantizeLinear" and prod[n.input[0]].op_type == "DequantizeLinear"
                w, s = inits[dq.input[0]], inits[dq.input[1]]
                assert s.shape == (w.shape[0],)
                assert helper.get_attribute_value(next(a for a in dq.attribute if a.name == "axis")) == 0
            if n.op_type == "Add":  # residual add: only the skip input is quantized
                kinds = [prod[i].op_type if i in prod else "input" for i in n.input]
                assert kinds.count("DequantizeLinear") == 1, (n.name, kinds)
        for o in m.graph.output:  # graph outputs stay float (not a DequantizeLinear copy)
            assert prod[o.name].op_type not in ("DequantizeLinear", "QuantizeLinear")


def _violations(model) -> str:
    return "\n".join(gq.check_tensorrt_compat(model))


def test_checker_rejects_nonzero_zero_point(tiny):
    m = onnx.load(str(tiny["q"][("tensorrt", "focus")]))
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear")
    for t in m.graph.initializer:
        if t.name == q.input[2]:
            t.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), t.name))
    assert "non-zero zero-point" in _violations(m)


def test_checker_rejects_qoperator_and_uint8(tiny, tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    dst = tmp_path / "qop.onnx"
    quantize_static(str(tiny["pre"]["focus"]), str(dst), tiny["calib"].reader("focus", 8, progress=False),
                    quant_format=QuantFormat.QOperator, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    v = _violations(dst)
    assert "(QLinearConv): unsupported by TensorRT: QOperator op" in v
    # the cpu profile (uint8 asymmetric activations) is not a TensorRT model
    v = _violations(tiny["q"][("cpu", "focus")])
    assert "uint8 zero-point" in v and "INT32 DequantizeLinear" in v
    assert gq.check_tensorrt_compat(tiny["q"][("cpu", "focus")], profile="cpu") == []


def test_checker_rejects_per_tensor_conv_weights_and_half_quantized(tiny, tmp_path):
    opts = gq.QuantizeOptions(profile="tensorrt", method="max", per_channel=False)
    dst = tmp_path / "per_tensor.onnx"
    quantize_graph(tiny["pre"]["focus"], dst, tiny["calib"].reader("focus", 8, progress=False),
                   ort_settings(opts), "max", "tensorrt")
    assert "per-tensor weight scale; the TensorRT profile requires per-channel weight scales on axis 0" in _violations(dst)
    # a conv whose weights are quantized but whose input is float
    m = onnx.load(str(tiny["q"][("tensorrt", "focus")]))
    prod = {o: n for n in m.graph.node for o in n.output}
    conv = next(n for n in m.graph.node if n.op_type == "Conv" and prod[n.input[0]].op_type == "DequantizeLinear"
                and n.input[0] != "image_DequantizeLinear_Output")
    q = prod[prod[conv.input[0]].input[0]]
    conv.input[0] = q.input[0]
    assert "only its weights is quantized" in _violations(m)


def test_checker_rejects_unsupported_op_and_per_channel_axis(tiny):
    m = onnx.load(str(tiny["q"][("tensorrt", "focus")]))
    m.graph.initializer.append(numpy_helper.from_array(np.eye(2, dtype=np.float32), "sq"))
    m.graph.node.append(helper.make_node("Det", ["sq"], ["det_out"], name="planted_det"))
    m.graph.output.append(helper.make_tensor_value_info("det_out", onnx.TensorProto.FLOAT, []))
    v = _violations(m)
    assert "'planted_det' (Det): unsupported by TensorRT" in v
    # per-channel scales on the wrong axis of a Conv weight
    m = onnx.load(str(tiny["q"][("tensorrt", "focus")]))
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")
              and any(a.name == "axis" for a in n.attribute))
    for a in dq.attribute:
        if a.name == "axis":
            a.i = 1
    assert "TensorRT needs them on the output-channel axis 0" in _violations(m)


# --------------------------------------------------------------------------------- accuracy
def _cos(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


@pytest.mark.parametrize("profile", ["tensorrt", "cpu"])
def test_quantized_outputs_close_to_fp32(tiny, profile):
    for g in ("glance", "focus"):
        x = tiny["calib"].inputs(g)[:16]
        ref = ort.InferenceSession(str(tiny["paths"][g]), providers=["CPUExecutionProvider"])
        qs = ort.InferenceSession(str(tiny["q"][(profile, g)]), providers=["CPUExecutionProvider"])
        names = [o.name for o in ref.get_outputs()]
        assert [o.name for o in qs.get_outputs()] == names
        r = dict(zip(names, ref.run(None, {"image": x})))
        q = dict(zip(names, qs.run(None, {"image": x})))
        for k in ("feature", "policy_state"):
            assert _cos(r[k], q[k]).min() > 0.99, (profile, g, k, _cos(r[k], q[k]).min())


# ------------------------------------------------------------------------------ calibration
def test_calibration_patches_are_at_policy_locations(tiny):
    model, calib = tiny["model"], tiny["calib"]
    x = torch.from_numpy(calib.images)
    tr = model.trace(x)
    np.testing.assert_array_equal(calib.coords, tr.coords.numpy())
    T = model.spec.steps
    n = calib.num_images
    assert calib.focus.shape == ((T - 1) * n, 3, P, P) and calib.source == "policy"
    for t in range(T - 1):
        want = crop_patches(x, tr.coords[t], P).numpy()
        np.testing.assert_array_equal(calib.focus[t * n:(t + 1) * n], want)
        np.testing.assert_array_equal(calib.focus_image[t * n:(t + 1) * n], np.arange(n))
    np.testing.assert_allclose(calib.glance, model.glance(x).numpy())
    rnd = gq.QuantCalibrationSet.random_crops(model, calib.images, seed=3, progress=False)
    assert rnd.source == "random" and not np.array_equal(rnd.coords, calib.coords)
    assert rnd.coords.min() >= 0 and rnd.coords.max() <= S - P
    sub = calib.subset([1, 3])
    assert sub.glance.shape[0] == 2 and sub.focus.shape[0] == 2 * (T - 1)
    np.testing.assert_array_equal(sub.focus[0], calib.focus[1])


def test_reader_batches_and_ranges(tiny):
    r = tiny["calib"].reader("focus", batch_size=10, progress=False)
    total = tiny["calib"].focus.shape[0]  # 48 patches: equal batches of 8 (histograms stack batches)
    assert r.batch_size == 8 and len(r) == 6
    assert [b["image"].shape[0] for b in r] == [8] * 6
    r.set_range(1, 2)
    assert r.get_next()["image"].shape[0] == 8 and r.get_next() is None
    assert total == 48


def _write_images(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (150, 140, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_load_calibration_images_folder_and_npz(tiny, tmp_path):
    spec = tiny["model"].spec
    _write_images(tmp_path / "imgs", 20)
    x = gq.load_calibration_images(tmp_path / "imgs", spec, n=18)
    assert x.shape == (18, 3, S, S) and x.dtype == np.float32 and np.isfinite(x).all()
    frames = np.random.default_rng(1).integers(0, 255, (17, S, S, 3), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", images=frames, labels=np.arange(17) % 10)
    x, y = gq.load_calibration_images(tmp_path / "c.npz", spec, n=100, return_labels=True)
    assert x.shape == (17, 3, S, S) and y.tolist() == (np.arange(17) % 10).tolist()
    mean, std = np.array(spec.mean, np.float32), np.array(spec.std, np.float32)
    np.testing.assert_allclose(x[0, :, 5, 7], (frames[0, 5, 7] / 255.0 - mean) / std, rtol=1e-5)


def test_bad_calibration_data_errors(tiny, tmp_path):
    spec, model = tiny["model"].spec, tiny["model"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        gq.load_calibration_images(tmp_path / "empty", spec)
    _write_images(tmp_path / "few", 3)
    with pytest.raises(ValueError, match="only 3 image.*at least 16"):
        gq.load_calibration_images(tmp_path / "few", spec)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        gq.load_calibration_images(tmp_path / "bad", spec)
    nan = np.random.default_rng(0).random((20, 3, S, S)).astype(np.float32)
    nan[4, 0, 1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", images=nan)
    with pytest.raises(ValueError, match="NaN"):
        gq.load_calibration_images(tmp_path / "nan.npz", spec)
    with pytest.raises(ValueError, match="no such file"):
        gq.load_calibration_images(tmp_path / "missing", spec)
    good = _images(20)
    with pytest.raises(ValueError, match=r"expected shape \(N, 3, 128, 128\)"):
        gq.QuantCalibrationSet.from_model(model, good[:, :, :100, :100], progress=False)
    with pytest.raises(ValueError, match="at least 16"):
        gq.QuantCalibrationSet.from_model(model, good[:5], progress=False)
    with pytest.raises(ValueError, match="empty"):
        gq.QuantCalibrationSet.from_model(model, good[:0], progress=False)
    bad = good.copy()
    bad[2, 1, 3, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        gq.QuantCalibrationSet.from_model(model, bad, progress=False)
    with pytest.raises(ValueError, match="normalised float"):
        gq.QuantCalibrationSet.from_model(model, (good * 50).astype(np.uint8), progress=False)
    with pytest.raises(ValueError, match="unknown quantization profile"):
        gq.QuantizeOptions(profile="int4").validate()


def test_values_beyond_float32_range_are_rejected_after_the_cast():
    """Images are checked as the float32 arrays calibration uses: a float64 value beyond float32's
    range (Inf once cast) is an error, like NaN / Inf; one within it is kept as numpy casts it."""
    import warnings

    ok = _images(16).astype(np.float64)
    ok[3, 0, 0, 0] = 1e38
    got = gq.check_images(ok, S)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_array_equal(got, ok.astype(np.float32))
    bad = ok.copy()
    bad[3, 0, 0, 0] = 10.0 * float(np.finfo(np.float32).max)
    assert np.isfinite(bad).all()  # finite as given
    patches = ok[:, :, :P, :P]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error itself, not a cast warning
        with pytest.raises(ValueError, match=r"1 image\(s\) contain NaN or Inf.*first: index 3"):
            gq.check_images(bad, S)
        with pytest.raises(ValueError, match="glance inputs contain NaN or Inf"):
            gq.QuantCalibrationSet(bad[:, :, :P, :P], patches, np.arange(16))
        with pytest.raises(ValueError, match="focus inputs contain NaN or Inf"):
            gq.QuantCalibrationSet(patches, bad[:, :, :P, :P], np.arange(16))
    assert gq.QuantCalibrationSet(patches, patches, np.arange(16)).glance.dtype == np.float32


# --------------------------------------------------------------------------- quantize_model
def test_quantize_model_end_to_end(tiny, tmp_path):
    pytest.importorskip("gfnet_edge.ops", reason="the runtime extension scores the graphs")
    model = tiny["model"]
    fp32 = {g: tiny["paths"][g] for g in ("glance", "focus")}
    ev = _images(24, seed=5)
    # whole graphs as candidates too, and no limit on the multiply-adds in float; the drop itself
    # against the target (on 24 held-out images it is within its standard error)
    opts = gq.QuantizeOptions(profile="tensorrt", method="max", max_accuracy_drop=0.0, max_candidates=3,
                              max_float_nodes=2, threads=1, graph_fallback=True, max_float_mac_share=1.0,
                              drop_noise_z=0.0)
    # ranges from images scaled down 20x: most activations clip, so INT8 hurts and the search runs
    small = gq.QuantCalibrationSet(tiny["calib"].glance / 20, tiny["calib"].focus / 20, tiny["calib"].focus_image)
    res = gq.quantize_model(model, fp32, tiny["paths"]["heads"], small, tmp_path / "out", opts,
                            eval_images=ev, progress=False)
    rep = res.report
    json.dumps(rep)  # serialisable
    assert json.loads((tmp_path / "out" / "quantization.json").read_text())["profile"] == "tensorrt"
    for g in ("glance", "focus"):
        assert res.graphs[g].is_file() and gq.check_tensorrt_compat(res.graphs[g]) == []
        assert rep["checker"][g]["violations"] == []
    acc = rep["accuracy"]
    assert len(acc["accuracy_fp32"]) == model.spec.steps and acc["labels"] == "fp32 predictions"
    assert rep["accuracy_all_int8"]["final_drop"] > 0
    sens = rep["sensitivity"]  # 3 nodes (ranked by the local proxy) + each whole graph
    assert len(sens) == 5 and sum(s["op_type"] == "graph" for s in sens) == 2
    assert all("local_error" in s for s in sens if s["op_type"] != "graph")
    assert len(rep["float_nodes"]) <= 2
    for f in rep["float_nodes"]:  # a node kept in float has no Q/DQ on its inputs
        m = onnx.load(str(res.graphs[f["graph"]]))
        prod = {o: n for n in m.graph.node for o in n.output}
        if f["op_type"] == "graph":  # a whole graph kept in float has no Q/DQ at all
            assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)
            continue
        node = next(n for n in m.graph.node if n.name == f["node"])
        assert all(prod.get(i) is None or prod[i].op_type != "DequantizeLinear" for i in node.input)
        assert f["drop_after"] <= f["drop_before"] or f["kl_after"] < f["kl_before"]
    # the INT8 pair runs through the runtime and agrees with FP32 on most predictions
    from gfnet_edge.quantize.scoring import trace

    man = manifest_model(model)
    t32 = trace(man, fp32, tiny["paths"]["heads"], ev)
    tq = trace(man, res.graphs, tiny["paths"]["heads"], ev)
    assert t32.probs.shape == tq.probs.shape


def test_tensorrt_profile_keeps_both_graphs_int8_within_mac_limit(tiny, tmp_path):
    pytest.importorskip("gfnet_edge.ops", reason="the runtime extension scores the graphs")
    from gfnet_edge.quantize.macs import node_macs

    model = tiny["model"]
    fp32 = {g: tiny["paths"][g] for g in ("glance", "focus")}
    opts = gq.QuantizeOptions(profile="tensorrt", method="max", max_accuracy_drop=0.0, max_candidates=4,
                              max_float_nodes=3, threads=1)
    small = gq.QuantCalibrationSet(tiny["calib"].glance / 20, tiny["calib"].focus / 20, tiny["calib"].focus_image)
    res = gq.quantize_model(model, fp32, tiny["paths"]["heads"], small, tmp_path / "out", opts,
                            eval_images=_images(24, seed=5), progress=False)
    rep = res.report
    assert rep["accuracy_all_int8"]["final_drop"] > 0  # the search ran
    assert not any(s["op_type"] == "graph" for s in rep["sensitivity"])
    # independent count: multiply-adds of the weighted nodes left without Q/DQ on their input,
    # the focus graph counted T-1 times
    runs = {"glance": 1, "focus": model.spec.steps - 1}
    total = int8 = 0
    for g in ("glance", "focus"):
        q = onnx.load(str(res.graphs[g]))
        prod = {o: n for n in q.graph.node for o in n.output}
        assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) > 0  # no graph left in float
        for name, macs in node_macs(onnx.load(str(tiny["pre"][g]))).items():
            node = next(n for n in q.graph.node if n.name == name)
            total += runs[g] * macs
            if prod.get(node.input[0]) is not None and prod[node.input[0]].op_type == "DequantizeLinear":
                int8 += runs[g] * macs
    assert int8 / total >= 0.95
    assert rep["int8_mac_share"] == pytest.approx(int8 / total, abs=1e-4)


def test_multiply_adds_are_counted_through_weights_quantized_in_the_graph(tiny):
    """ModelOpt writes float weights followed by QuantizeLinear -> DequantizeLinear; the count
    through that chain equals the FP32 graph's."""
    from gfnet_edge.quantize.macs import node_macs

    f = onnx.load(str(tiny["pre"]["glance"]))
    want = node_macs(f)
    assert want and all(want.values())
    m = onnx.ModelProto()
    m.CopyFrom(f)
    inits = {t.name for t in m.graph.initializer}
    nodes = []
    for n in m.graph.node:
        if n.name in want and n.input[1] in inits:
            w = n.input[1]
            m.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(0.01, np.float32), f"{w}_s"),
                                        onnx.numpy_helper.from_array(np.array(0, np.int8), f"{w}_z")])
            nodes += [helper.make_node("QuantizeLinear", [w, f"{w}_s", f"{w}_z"], [f"{w}_q"]),
                      helper.make_node("DequantizeLinear", [f"{w}_q", f"{w}_s", f"{w}_z"], [f"{w}_dq"])]
            n.input[1] = f"{w}_dq"
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.graph.value_info[:]
    assert node_macs(m) == want


def test_search_target_allows_for_the_held_out_noise():
    """A held-out drop is (lost - gained) / n with a standard error of 100 * sqrt(lost + gained) / n
    points; the targets count as missed only when a drop exceeds them by more than
    ``drop_noise_z`` standard errors (0: the drop itself)."""
    from gfnet_edge.quantize.scoring import Traced, compare, flips
    from gfnet_edge.quantize.search import _met, goal

    ok_ref = np.array([1, 1, 1, 1, 0, 0, 1, 1], bool)
    ok_int8 = np.array([0, 0, 1, 1, 1, 0, 1, 1], bool)
    assert flips(ok_ref, ok_int8) == {"lost": 2, "gained": 1, "drop_noise": round(100 * np.sqrt(3) / 8, 3)}
    # compare() gives the same for the final step and for the mid budget
    probs = np.full((2, 8, 2), 0.25, np.float32)
    probs[:, :, 1] = 0.75  # FP32 says class 1 at both steps, never confident enough to exit at step 0
    q = probs.copy()
    q[:, :3] = probs[:, :3, ::-1]  # INT8 says class 0 on the first three images
    labels = np.array([1, 1, 1, 1, 0, 0, 1, 1])
    r = compare(Traced(probs, np.zeros((1, 8, 2))), Traced(q, np.zeros((1, 8, 2))), labels)
    assert r["final_flips"] == r["budget_flips"] == flips(probs[-1].argmax(1) == labels, q[-1].argmax(1) == labels)
    assert r["final_drop"] == pytest.approx(100 * (r["final_flips"]["lost"] - r["final_flips"]["gained"]) / 8, abs=1e-3)

    def measured(drop, noise, budget_drop=0.0, budget_noise=0.0):
        return {"final_drop": drop, "final_flips": {"drop_noise": noise}, "budget_drop": budget_drop,
                "budget_flips": {"drop_noise": budget_noise}, "exit": {"agreement": 100.0}}

    default = gq.QuantizeOptions(max_accuracy_drop=0.5).validate()
    assert default.drop_noise_z == pytest.approx(1.645)
    # 256 images, 10 changed answers (7 lost, 3 gained): drop 1.56 +- 1.24, within the noise of 0.5
    assert _met(default, measured(1.56, 1.24))
    assert not _met(replace(default, drop_noise_z=0.0), measured(1.56, 1.24))
    assert not _met(default, measured(3.0, 0.9))  # beyond the noise: the search runs
    budget = replace(default, max_accuracy_drop=None, max_budget_drop=0.5)
    assert _met(budget, measured(5.0, 0.1, 1.56, 1.24)) and not _met(budget, measured(0.0, 0.0, 3.0, 0.9))
    assert "standard error" in goal(default) and "standard error" not in goal(replace(default, drop_noise_z=0))
    with pytest.raises(ValueError, match="drop_noise_z"):
        gq.QuantizeOptions(drop_noise_z=-1.0).validate()


def test_search_does_not_run_for_a_drop_within_the_noise(tiny, tmp_path):
    """A held-out drop above ``max_accuracy_drop`` by less than ``drop_noise_z`` standard errors
    leaves every node in INT8; with ``drop_noise_z=0`` the same drop starts the search."""
    pytest.importorskip("gfnet_edge.ops", reason="the runtime extension scores the graphs")
    model = tiny["model"]
    fp32 = {g: tiny["paths"][g] for g in ("glance", "focus")}
    small = gq.QuantCalibrationSet(tiny["calib"].glance / 20, tiny["calib"].focus / 20, tiny["calib"].focus_image)
    ev = _images(24, seed=5)
    base = dict(profile="tensorrt", method="max", max_candidates=1, max_float_nodes=1, threads=1)
    first = gq.quantize_model(model, fp32, tiny["paths"]["heads"], small, tmp_path / "all8",
                              gq.QuantizeOptions(**base, max_accuracy_drop=None), eval_images=ev, progress=False)
    all8 = first.report["accuracy_all_int8"]
    noise = all8["final_flips"]["drop_noise"]
    assert all8["final_drop"] > 0 and noise > 0
    target = max(all8["final_drop"] - 0.5 * noise, 0.0)  # missed by half a standard error
    within = gq.quantize_model(model, fp32, tiny["paths"]["heads"], small, tmp_path / "z",
                               gq.QuantizeOptions(**base, max_accuracy_drop=target), eval_images=ev, progress=False)
    assert within.report["mixed_precision"].startswith("not needed") and not within.report["sensitivity"]
    exact = gq.quantize_model(model, fp32, tiny["paths"]["heads"], small, tmp_path / "z0",
                              gq.QuantizeOptions(**base, max_accuracy_drop=target, drop_noise_z=0.0),
                              eval_images=ev, progress=False)
    assert exact.report["sensitivity"] and not exact.report["mixed_precision"].startswith("not needed")


def test_quantize_model_holds_out_calibration_images(tiny, tmp_path):
    pytest.importorskip("gfnet_edge.ops", reason="the runtime extension scores the graphs")
    fp32 = {g: tiny["paths"][g] for g in ("glance", "focus")}
    calib = gq.QuantCalibrationSet.from_model(tiny["model"], _images(40, seed=7), progress=False)
    opts = gq.QuantizeOptions(profile="cpu", method="entropy", max_accuracy_drop=None, min_eval=8, threads=1)
    res = gq.quantize_model(tiny["model"], fp32, tiny["paths"]["heads"], calib, tmp_path / "cpu", opts, progress=False)
    rep = res.report
    assert rep["held_out"].startswith("10 of the 40") and rep["calibration"]["images"] == 30
    assert rep["calibration"]["focus"] == 60 and rep["mixed_precision"].startswith("disabled")
    assert gq.check_tensorrt_compat(res.graphs["focus"], profile="cpu") == []


def test_num_calib_takes_a_seeded_sample_of_a_larger_set(tiny, monkeypatch, tmp_path):
    """A calibration set larger than num_calib is cut to a sample drawn with the seed, not to its
    first images: a class-sorted set keeps every class, each image its own patches; a set of
    num_calib images (build-engine's) is used whole."""
    import gfnet_edge.quantize.core as core

    class Stop(Exception):
        pass

    seen = []

    def session(desc, fp32, heads, calib, *a, **k):
        seen.append(calib)
        raise Stop

    monkeypatch.setattr(core, "QuantSession", session)
    n, classes = 80, 4
    glance = np.random.default_rng(1).standard_normal((n, 3, P, P)).astype(np.float32)
    labels = np.repeat(np.arange(classes), n // classes)  # sorted by class, as a class folder loads
    focus_image = np.repeat(np.arange(n), 2)
    calib = gq.QuantCalibrationSet(glance, 0.5 * glance[focus_image], focus_image, labels=labels)
    fp32 = {g: tiny["paths"][g] for g in ("glance", "focus")}

    def calibrated(**kw):
        opts = gq.QuantizeOptions(profile="cpu", max_accuracy_drop=None, **kw)
        with pytest.raises(Stop):
            gq.quantize_model(tiny["model"], fp32, tiny["paths"]["heads"], calib, tmp_path / "out", opts,
                              eval_images=np.zeros((0, 3, S, S), np.float32), progress=False)
        c = seen.pop()
        # which of the set's images, found by value
        return c, [int(np.flatnonzero((glance == g).all(axis=(1, 2, 3)))[0]) for g in c.glance]

    c, idx = calibrated(num_calib=20)
    assert c.num_images == len(set(idx)) == 20
    np.testing.assert_array_equal(c.labels, labels[idx])
    assert set(c.labels.tolist()) == set(range(classes))  # every class, not the first 20 images
    assert c.focus.shape[0] == 40
    np.testing.assert_array_equal(c.focus, 0.5 * c.glance[c.focus_image])  # each image's own patches
    assert calibrated(num_calib=20)[1] == idx  # seeded
    assert set(calibrated(num_calib=20, seed=1)[1]) != set(idx)
    whole, _ = calibrated(num_calib=n)
    np.testing.assert_array_equal(whole.glance, glance)
    np.testing.assert_array_equal(whole.focus, calib.focus)


def test_quantize_model_replaces_its_outputs_only_once_complete(tiny, monkeypatch, tmp_path):
    """quantize_model stages its outputs beside out_dir: a run that fails while writing them
    leaves an earlier run's files as they were and no staging folder; one that succeeds replaces
    all three (and removes the staging folders of killed runs)."""
    import gfnet_edge.quantize.core as core

    fp32 = {g: tiny["paths"][g] for g in ("glance", "focus")}
    opts = gq.QuantizeOptions(profile="cpu", method="max", max_accuracy_drop=None, threads=1)
    out = tmp_path / "out"

    def run(calib):
        return gq.quantize_model(tiny["model"], fp32, tiny["paths"]["heads"], calib, out, opts,
                                 eval_images=np.zeros((0, 3, S, S), np.float32), progress=False)

    def files():
        return {p.name: p.read_bytes() for p in out.iterdir()}

    run(tiny["calib"].subset(np.arange(16)))
    before = files()
    assert set(before) == {"glance.onnx", "focus.onnx", "quantization.json"}

    class Stop(Exception):
        pass

    checker = core.check_tensorrt_compat

    def failing(path, *a, **k):  # fails once the glance graph is written
        if Path(path).name == "focus.onnx":
            raise Stop
        return checker(path, *a, **k)

    other = tiny["calib"].subset(np.arange(4, 24))  # other ranges: other graphs; 20 images: another report
    monkeypatch.setattr(core, "check_tensorrt_compat", failing)
    with pytest.raises(Stop):
        run(other)
    assert files() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()
    from gfnet_edge.bundle import writer_tag

    stale = tmp_path / f".out.999999999-{writer_tag().split('-', 1)[1]}.x.partial"  # a killed run's (no such process)
    stale.mkdir()
    res = run(other)
    after = files()
    assert set(after) == set(before) and all(after[k] != before[k] for k in before), [k for k in before if after[k] == before[k]]
    assert res.graphs == {g: out / f"{g}.onnx" for g in ("glance", "focus")}
    assert json.loads(after["quantization.json"]) == json.loads(json.dumps(res.report))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_profile_settings_and_auto_method():
    trt = gq.QuantizeOptions(profile="tensorrt").validate()
    cpu = gq.QuantizeOptions(profile="cpu").validate()
    assert trt.resolved_method == "percentile" and cpu.resolved_method == "percentile"
    s = gq.ort_settings(trt)
    assert (s.activation_type, s.weight_type, s.per_channel) == ("QInt8", "QInt8", True)
    assert s.extra_options["ActivationSymmetric"] and s.extra_options["WeightSymmetric"]
    assert s.extra_options["QuantizeBias"] is False and s.extra_options["CalibPercentile"] == 99.99
    assert "Relu" not in s.op_types_to_quantize and "Conv" in s.op_types_to_quantize
    c = gq.ort_settings(cpu)
    assert (c.activation_type, c.weight_type) == ("QUInt8", "QInt8")
    assert c.extra_options["CalibTensorRangeSymmetric"] is False and c.extra_options["CalibPercentile"] == 99.99
    assert "CalibPercentile" not in gq.ort_settings(gq.QuantizeOptions(profile="cpu", method="entropy")).extra_options


def test_finetuning_default_follows_the_calibration_set_size():
    trt, cpu = gq.get_profile("tensorrt"), gq.get_profile("cpu")
    assert trt.finetune_epochs > 0 and trt.finetune_min_images > 0
    opts = gq.QuantizeOptions(profile="tensorrt").validate()
    assert opts.finetune_for(trt.finetune_min_images - 1) == 0  # too few images: would fit the set
    assert opts.finetune_for(trt.finetune_min_images) == trt.finetune_epochs
    assert gq.QuantizeOptions(profile="tensorrt", finetune_epochs=0).finetune_for(10 ** 6) == 0
    assert gq.QuantizeOptions(profile="tensorrt", finetune_epochs=3).finetune_for(16) == 3
    assert gq.QuantizeOptions(profile="cpu").finetune_for(10 ** 6) == cpu.finetune_epochs == 0


def test_demo_calibration_sources(demo_checkpoint, caplog):
    from gfnet_edge.data import ClutteredDigits, demo_config
    from gfnet_edge.models import load_checkpoint
    from gfnet_edge import ops
    from gfnet_edge.quantize.calibration import demo_source

    assert (demo_source("demo"), demo_source("demo:train"), demo_source("demo:val")) == ("val", "train", "val")
    assert demo_source("demo_images") is None and demo_source(Path("demo")) is None
    with pytest.raises(ValueError, match="demo:train, demo:val"):
        demo_source("demo:test")
    model = load_checkpoint(demo_checkpoint)
    x, y = gq.load_calibration_images("demo:train", model, 20, return_labels=True)
    frames, labels = ClutteredDigits("train", config=demo_config(model)).arrays(20, progress=False)
    assert y.tolist() == labels[:20].tolist()
    np.testing.assert_allclose(x, ops.normalise_frames(frames[:20], model.spec.mean, model.spec.std), atol=1e-6)
    np.testing.assert_array_equal(gq.load_calibration_images("demo:train", model, 20, as_frames=True), frames[:20])
    xv = gq.load_calibration_images("demo", model, 20)
    # a bare spec does not record the config the model was trained on: the images differ, and a warning says so
    with caplog.at_level(logging.WARNING, logger="gfnet_edge"):
        caplog.clear()
        gq.load_calibration_images("demo", model, 20)
        assert not caplog.records  # the model records its config
        xs = gq.load_calibration_images("demo", model.spec, 20)
    assert not np.allclose(xs, xv)
    assert any("generator's default config" in r.getMessage() for r in caplog.records)
    assert not np.allclose(xv, x)  # the validation split's images, not the train split's


def test_uneven_reader_batches_are_rebatched_for_histograms(tiny, tmp_path):
    class Uneven:  # 21 patches in batches of 8, 8, 5
        def __init__(self, x):
            self.chunks = [x[i:i + 8] for i in range(0, len(x), 8)]

        def get_next(self):
            return {"image": self.chunks.pop(0)} if self.chunks else None

        def __len__(self):
            return len(self.chunks)

    st = gq.ort_settings(gq.QuantizeOptions(profile="cpu", method="entropy"))
    dst = tmp_path / "uneven.onnx"
    run_quantize_static(tiny["pre"]["focus"], dst, Uneven(tiny["calib"].focus[:21]), st, "entropy")
    assert gq.check_tensorrt_compat(dst, profile="cpu") == []


def test_profile_registry_and_calibration_methods(tiny):
    from onnxruntime.quantization import CalibrationMethod

    assert set(gq.PROFILES) == {"tensorrt", "cpu"} and gq.get_profile("cpu") is gq.PROFILES["cpu"]
    with pytest.raises(ValueError, match="unknown quantization profile 'int4'"):
        gq.get_profile("int4")
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        gq.QuantizeOptions(method="kl").validate()
    assert gq.QuantizeOptions(method="entropy").resolved_method is gq.CalibMethod.ENTROPY
    assert gq.CalibMethod.MAX.ort == CalibrationMethod.MinMax
    # the checker applies the rules the profile object names: the cpu graph breaks TensorRT's
    # rules, and passes the cpu profile's, given by name or as the object
    cpu_graph = tiny["q"][("cpu", "focus")]
    assert gq.check_tensorrt_compat(cpu_graph, gq.PROFILES["tensorrt"]) != []
    assert gq.check_tensorrt_compat(cpu_graph, gq.PROFILES["cpu"]) == gq.check_tensorrt_compat(cpu_graph, "cpu") == []


def _channel_means(model, tensors, x, as_written=False):
    """Per-channel means (axis 1) of ``tensors`` on ``x``; ``as_written``: the Q/DQ nodes run as
    written (no fusion into ONNX Runtime's integer kernels)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in tensors:
        m.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    if as_written:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    out = dict(zip(names, s.run(None, {"image": x})))
    return {t: out[t].astype(np.float64).mean(axis=tuple(k for k in range(out[t].ndim) if k != 1)) for t in tensors}


def test_bias_correction_restores_fp32_channel_means(tiny):
    from gfnet_edge.quantize.bias_correction import correct_biases

    q = onnx.load(str(tiny["q"][("tensorrt", "focus")]))
    q2 = onnx.load(str(tiny["q"][("tensorrt", "focus")]))
    f = onnx.load(str(tiny["pre"]["focus"]))
    prod = {o: n for n in q.graph.node for o in n.output}
    convs = [n for n in q.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) == 3
             and prod.get(n.input[1]) is not None and prod[n.input[1]].op_type == "DequantizeLinear"]
    assert convs
    tensors = [n.output[0] for n in convs]
    x = tiny["calib"].focus[:16]
    ref = _channel_means(f, tensors, x)
    before = _channel_means(q, tensors, x)
    cache = {}
    done = correct_biases(q, f, x, reference=cache)
    assert set(done) == {n.name for n in convs}
    assert set(cache) == set(tensors) and all(np.allclose(cache[t], ref[t], rtol=1e-5, atol=1e-6) for t in tensors)
    # a second variant of the graph reuses the FP32 means (FP32 graph not run: garbage in its
    # place would otherwise change the result) and gets the same biases
    assert correct_biases(q2, onnx.ModelProto(), x, reference=cache) == done
    assert all(np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
               for a, b in zip(q.graph.initializer, q2.graph.initializer))
    after = _channel_means(q, tensors, x)
    err_before = err_after = 0.0
    for t in tensors:  # every corrected node has FP32's channel means (up to float rounding)
        scale = np.abs(ref[t]).max() + 1e-6
        assert np.abs(after[t] - ref[t]).max() <= 1e-3 * scale, t
        err_before += np.abs(before[t] - ref[t]).sum()
        err_after += np.abs(after[t] - ref[t]).sum()
    assert err_after < 0.1 * err_before  # quantization had moved the means
    assert gq.check_tensorrt_compat(q) == []


def test_bias_correction_moves_the_int32_biases_of_the_cpu_profile(tiny):
    """The cpu profile's biases are int32 DequantizeLinear inputs (ONNX Runtime's QuantizeBias):
    they are corrected in steps of their scale, the corrected nodes get FP32's channel means, and
    the graph's outputs, run by ONNX Runtime's integer kernels, move toward FP32's."""
    from gfnet_edge.quantize.bias_correction import correct_biases

    q = onnx.load(str(tiny["q"][("cpu", "focus")]))
    f = onnx.load(str(tiny["pre"]["focus"]))
    before_inits = _inits(q)
    prod = {o: n for n in q.graph.node for o in n.output}

    def dq_of(name):
        n = prod.get(name)
        return n if n is not None and n.op_type == "DequantizeLinear" else None

    convs = [n for n in q.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) == 3
             and dq_of(n.input[1]) is not None and dq_of(n.input[2]) is not None]
    assert convs and all(before_inits[dq_of(n.input[2]).input[0]].dtype == np.int32 for n in convs)
    # FP32 reference: the output of the FP32 node of the same name (where ONNX Runtime folded a
    # ReLU into the next quantizer, the quantized Conv writes the ReLU's tensor name)
    f_out = {n.name: n.output[0] for n in f.graph.node}
    assert any(f_out[n.name] != n.output[0] for n in convs)
    x = tiny["calib"].focus[:16]
    tensors = [n.output[0] for n in convs]
    ref = _channel_means(f, [f_out[n.name] for n in convs], x)
    before = _channel_means(q, tensors, x, as_written=True)
    sess = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])  # noqa: E731
    out_f, out_before = sess(f).run(None, {"image": x}), sess(q).run(None, {"image": x})
    done = correct_biases(q, f, x)
    assert set(done) == {n.name for n in convs}
    after_inits = _inits(q)
    changed = {k for k in before_inits if not np.array_equal(before_inits[k], after_inits[k])}
    # only the int32 biases moved (scales, zero points and weights as ONNX Runtime wrote them)
    assert changed == {dq_of(n.input[2]).input[0] for n in convs}
    assert all(after_inits[k].dtype == np.int32 for k in changed)
    after = _channel_means(q, tensors, x, as_written=True)
    err_before = err_after = 0.0
    for n in convs:  # FP32's channel means, up to the bias step (input scale x weight scale)
        t, r = n.output[0], ref[f_out[n.name]]
        step = np.broadcast_to(np.abs(after_inits[dq_of(n.input[2]).input[1]]).astype(np.float64), r.shape)
        assert np.all(np.abs(after[t] - r) <= step + 1e-3 * (np.abs(r).max() + 1e-6)), n.name
        err_before += np.abs(before[t] - r).sum()
        err_after += np.abs(after[t] - r).sum()
    assert err_after < 0.1 * err_before
    # the graph's outputs (fused integer kernels, ONNX Runtime's default optimisations) move
    # toward FP32's: channel means and mean absolute error
    out_after = sess(q).run(None, {"image": x})
    mean_err = lambda outs: sum(float(np.abs(o.mean(axis=0) - r.mean(axis=0)).mean())  # noqa: E731
                                for o, r in zip(outs, out_f))
    abs_err = lambda outs: sum(float(np.abs(o - r).mean()) for o, r in zip(outs, out_f))  # noqa: E731
    assert mean_err(out_after) < 0.5 * mean_err(out_before)
    assert abs_err(out_after) < abs_err(out_before)
    assert gq.check_tensorrt_compat(q, "cpu") == []


@pytest.mark.parametrize("profile", ["tensorrt", "cpu"])
def test_bias_correction_gives_a_shared_bias_a_copy_per_node(tmp_path, profile):
    """Two Convs reading one bias (float, or one int32 DequantizeLinear output): each gets its own
    corrected copy, the graph stays valid and in order, and both reach FP32's channel means."""
    from onnx import TensorProto

    from gfnet_edge.quantize.bias_correction import correct_biases
    from gfnet_edge.quantize.calibration import GraphDataReader

    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3 for _ in range(2))
    b = rng.standard_normal(4).astype(np.float32) * 0.1
    g = helper.make_graph(
        [helper.make_node("Conv", ["image", "W1", "B"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["image", "W2", "B"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
         helper.make_node("Add", ["c1", "c2"], ["out"], name="add")],
        "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 4, 8, 8])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(b, "B")])
    f = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    f.ir_version = 8
    onnx.save(f, str(tmp_path / "fp32.onnx"))
    x = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    st = ort_settings(gq.QuantizeOptions(profile=profile, method="max"))
    quantize_graph(tmp_path / "fp32.onnx", tmp_path / "q.onnx", GraphDataReader(x, 16, progress=False), st, "max",
                   profile)
    q = onnx.load(str(tmp_path / "q.onnx"))
    convs = {n.name: n for n in q.graph.node if n.op_type == "Conv"}
    convs["conv2"].input[2] = convs["conv1"].input[2]  # ONNX Runtime writes one bias per node: share it
    done = correct_biases(q, f, x, threads=1)
    assert set(done) == {"conv1", "conv2"}
    onnx.checker.check_model(q)
    assert convs["conv1"].input[2] != convs["conv2"].input[2]
    before = _channel_means(f, ["c1", "c2"], x)
    after = _channel_means(q, ["c1", "c2"], x, as_written=True)
    for t in ("c1", "c2"):
        assert np.abs(after[t] - before[t]).max() <= 1e-3 * np.abs(before[t]).max(), t
    assert gq.check_tensorrt_compat(q, profile) == []


def test_fc_inputs_take_their_calibration_min_max(tiny, tmp_path):
    from gfnet_edge.quantize.ranges import role_tensors
    from gfnet_edge.quantize.profiles import TensorRole

    fp32 = {g: tiny["paths"][g] for g in ("glance", "focus")}
    opts = gq.QuantizeOptions(profile="tensorrt", method="percentile", percentile=99.0, max_accuracy_drop=None,
                              max_range_for=("fc-input",), threads=1)
    res = gq.quantize_model(tiny["model"], fp32, tiny["paths"]["heads"], tiny["calib"], tmp_path / "fc", opts,
                            progress=False)
    pre = onnx.load(str(tiny["pre"]["focus"]))
    fc_in = role_tensors(pre, frozenset({TensorRole.FC_INPUT}))
    gemm_inputs = [n.input[0] for n in pre.graph.node if n.op_type == "Gemm"]
    assert fc_in and set(fc_in) == set(gemm_inputs)
    m = onnx.ModelProto()
    m.CopyFrom(pre)
    for t in fc_in:
        m.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in s.get_outputs()], s.run(None, {"image": tiny["calib"].focus})))
    q = onnx.load(str(res.graphs["focus"]))
    inits = _inits(q)
    for t in fc_in:  # symmetric int8: scale = max |x| / 127 over the calibration patches, no clipping
        ql = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == t)
        assert float(inits[ql.input[1]]) == pytest.approx(np.abs(out[t]).max() / 127.0, rel=1e-4)
    # without the option the 99th percentile clips those tensors (a smaller scale)
    plain = gq.quantize_model(tiny["model"], fp32, tiny["paths"]["heads"], tiny["calib"], tmp_path / "plain",
                              replace(opts, max_range_for=()), progress=False)
    q2 = onnx.load(str(plain.graphs["focus"]))
    inits2 = _inits(q2)
    t = fc_in[0]
    ql2 = next(n for n in q2.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == t)
    assert float(inits2[ql2.input[1]]) < float(inits[next(n for n in q.graph.node if n.op_type == "QuantizeLinear"
                                                          and n.input[0] == t).input[1]])


def test_tensorrt_default_keeps_residual_stream_float(tiny, tmp_path):
    st = ort_settings(gq.QuantizeOptions(profile="tensorrt", method="max"))
    assert "Add" not in st.op_types_to_quantize
    dst = tmp_path / "focus.onnx"
    quantize_graph(tiny["pre"]["focus"], dst, tiny["calib"].reader("focus", 8, progress=False), st, "max", "tensorrt")
    assert gq.check_tensorrt_compat(dst) == []
    m = onnx.load(str(dst))
    prod = {o: n for n in m.graph.node for o in n.output}
    adds = [n for n in m.graph.node if n.op_type == "Add"]
    assert adds and all(prod.get(i) is None or prod[i].op_type != "DequantizeLinear" for n in adds for i in n.input)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert all(prod[n.input[0]].op_type == "DequantizeLinear" and prod[n.input[1]].op_type == "DequantizeLinear"
               for n in convs)  # every multiply-add still in INT8


def test_build_quantizes_with_every_calibration_image_it_loads(monkeypatch, tmp_path):
    """build-engine's --num-calib (more than QuantizeOptions' default) and --patch-guard reach
    the quantizer."""
    import gfnet_edge.quantize as quant_pkg
    from gfnet_edge import build

    class Stop(Exception):
        pass

    seen = {}

    def fake_quantize_model(model, fp32, heads, calib, out, opts, **kw):
        seen["calib"], seen["opts"] = calib, opts
        raise Stop

    monkeypatch.setattr(quant_pkg, "quantize_model", fake_quantize_model)
    model = _tiny_model()
    n = gq.QuantizeOptions().num_calib + 40
    images = _frames(n + 40)
    cfg = build.BuildConfig(num_calib=n, int8_profiles=("tensorrt",), patch_guard_share=0.03)
    with pytest.raises(Stop):
        build._quantize(model, tmp_path, {"graphs": {}}, images, cfg, "onnxruntime", False)
    assert seen["calib"].num_images == n == seen["opts"].num_calib
    assert seen["opts"].guard_share == 0.03 != gq.QuantizeOptions(profile="tensorrt").guard_share


def test_a_small_calibration_folder_still_calibrates_with_enough_images(monkeypatch, tmp_path):
    """With few images the held-out set shrinks, not the calibration set below the 16 images
    calibration needs, and a held-out set smaller than the search's minimum (32) is not made:
    those images calibrate too. The split is what _quantize hands the quantizer."""
    import gfnet_edge.quantize as quant_pkg
    from gfnet_edge import build

    for n_images, num_calib, want in [(20, 256, 20), (31, 256, 31), (40, 256, 40), (50, 256, 50), (64, 256, 32),
                                      (80, 256, 48), (600, 256, 256), (16, 256, 16), (20, 17, 17), (100, 20, 20),
                                      (600, 580, 568), (40, 30, 30)]:
        n_cal = build.calibration_split(n_images, num_calib)
        assert n_cal == want, (n_images, num_calib, n_cal)
        assert gq.MIN_CALIB_IMAGES <= n_cal <= min(n_images, num_calib)
        held = n_images - n_cal
        assert held >= gq.QuantizeOptions().min_eval or held == 0 or n_cal == num_calib
        assert n_cal >= n_images // 2 or n_cal == num_calib
    for n_images, num_calib in [(256, 256), (600, 256), (40, 256)]:  # --num-eval 0: nothing held out
        assert build.calibration_split(n_images, num_calib, 0) == min(n_images, num_calib)

    class Stop(Exception):
        pass

    seen = {}

    def fake_quantize_model(model, fp32, heads, calib, out, opts, eval_images=None, **kw):
        seen["calib"], seen["eval"] = calib.num_images, len(eval_images) if eval_images is not None else 0
        seen["given"] = eval_images
        raise Stop

    monkeypatch.setattr(quant_pkg, "quantize_model", fake_quantize_model)
    cfg = build.BuildConfig(num_calib=256, int8_profiles=("cpu",))
    with pytest.raises(Stop):
        build._quantize(_tiny_model(), tmp_path, {"graphs": {}}, _frames(20), cfg, "onnxruntime", False)
    assert {k: seen[k] for k in ("calib", "eval")} == {"calib": 20, "eval": 0}
    # 30 of 40 calibrate (--num-calib 30): the 10 left are too few to check the accuracy with
    cfg = build.BuildConfig(num_calib=30, int8_profiles=("cpu",))
    with pytest.raises(Stop):
        build._quantize(_tiny_model(), tmp_path, {"graphs": {}}, _frames(40), cfg, "onnxruntime", False)
    assert {k: seen[k] for k in ("calib", "eval")} == {"calib": 30, "eval": 0}
    # --num-eval 0: every image calibrates and the quantizer is told there is no held-out set (an
    # empty one: given None it would hold out a share of the calibration images instead)
    cfg = build.BuildConfig(num_calib=256, num_eval=0, int8_profiles=("cpu",))
    with pytest.raises(Stop):
        build._quantize(_tiny_model(), tmp_path, {"graphs": {}}, _frames(256), cfg, "onnxruntime", False)
    assert {k: seen[k] for k in ("calib", "eval")} == {"calib": 256, "eval": 0} and seen["given"] is not None


def test_an_empty_held_out_set_means_no_accuracy_check():
    """quantize_model's held-out set: an empty array is none (nothing taken from the calibration
    images), None is the default share of the calibration images."""
    from types import SimpleNamespace

    from gfnet_edge.quantize.core import _held_out

    images = np.zeros((128, 3, 8, 8), np.float32)
    calib = SimpleNamespace(images=images, labels=None, num_images=128, subset=lambda idx: ("subset", len(idx)))
    opts = gq.QuantizeOptions()
    kept, x, y, desc = _held_out(calib, opts, np.zeros((0, 8, 8, 3), np.uint8), None)
    assert kept is calib and x is None and y is None and desc.startswith("none")
    kept, x, y, desc = _held_out(calib, opts, None, None)
    assert kept == ("subset", 96) and len(x) == 32 and desc.startswith("32 of the 128 calibration images")


def test_a_class_folder_is_mixed_before_the_calibration_split(tmp_path):
    """A folder lists its images class by class; the build mixes them (seeded) so that both the
    calibration images and the held-out ones cover every class."""
    from PIL import Image

    from gfnet_edge import build

    rng = np.random.default_rng(0)
    for c in range(4):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(24):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    cfg = build.BuildConfig(calib_data=str(tmp_path / "data"), num_calib=48, num_eval=48)
    images, labels = build._calibration_images(_tiny_model(), cfg)
    assert sorted(np.bincount(labels).tolist()) == [24] * 4 and len(images) == 96
    n_cal = build.calibration_split(len(images), cfg.num_calib)
    assert (n_cal, len(images) - n_cal) == (48, 48)
    assert set(labels[:n_cal]) == set(labels[n_cal:]) == {0, 1, 2, 3}
    again, labels2 = build._calibration_images(_tiny_model(), cfg)
    np.testing.assert_array_equal(labels, labels2)  # the same split every build
    np.testing.assert_array_equal(images, again)


def test_unreadable_calibration_files_stop_the_build_unless_skipped(tmp_path, caplog):
    """A broken file in the calibration folder stops the build naming it and --skip-unreadable;
    with skip_unreadable it is left out with a warning and the rest are the folder's images."""
    import shutil

    from PIL import Image

    from gfnet_edge import build
    from gfnet_edge.errors import InputError

    rng = np.random.default_rng(1)
    for c in range(2):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    shutil.copytree(tmp_path / "data", tmp_path / "clean")
    bad = tmp_path / "data" / "c1" / "3b.png"
    bad.write_bytes(b"GIF89a")
    cfg = build.BuildConfig(calib_data=str(tmp_path / "data"), num_calib=16, num_eval=16)
    with pytest.raises(InputError, match=f"{bad}: cannot read image .* \\(--skip-unreadable leaves such files out\\)"):
        build._calibration_images(_tiny_model(), cfg)
    cfg.skip_unreadable = True
    with caplog.at_level("WARNING", logger="gfnet_edge"):
        images, labels = build._calibration_images(_tiny_model(), cfg)
    assert f"left out {bad}: cannot read image" in caplog.text and "1 unreadable image file(s)" in caplog.text
    want, want_labels = build._calibration_images(_tiny_model(), build.BuildConfig(calib_data=str(tmp_path / "clean"),
                                                                                  num_calib=16, num_eval=16))
    np.testing.assert_array_equal(images, want)
    np.testing.assert_array_equal(labels, want_labels)


@pytest.mark.parametrize("kw,match", [({"num_calib": 8}, "at least 16"), ({"int8_profiles": ()}, "non-empty"),
                                      ({"int8_profiles": ("cpu", "arm")}, "non-empty selection")])
def test_build_refuses_int8_options_that_cannot_work_before_writing(tmp_path, kw, match):
    from gfnet_edge import build
    from gfnet_edge.errors import InputError

    def gfnet_edge_root():
        import gfnet_edge

        return Path(gfnet_edge.__file__).parent

    out = tmp_path / "b"
    with pytest.raises(InputError, match=match):
        build.build_bundle(Path(gfnet_edge_root()) / "assets" / "demo_gfnet.pth.tar", out, build.BuildConfig(calib_data="demo", **kw), progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_patch_guard_share_defaults_and_bounds():
    trt, cpu = gq.get_profile("tensorrt"), gq.get_profile("cpu")
    assert 0 < trt.patch_guard_share <= trt.max_float_mac_share and cpu.patch_guard_share == 0
    assert gq.QuantizeOptions(profile="tensorrt").guard_share == trt.patch_guard_share
    assert gq.QuantizeOptions(profile="tensorrt", patch_guard_share=0.0).guard_share == 0.0
    with pytest.raises(ValueError, match="patch_guard_share"):
        gq.QuantizeOptions(patch_guard_share=1.5).validate()


def test_cpu_profile_node_kept_in_float_reads_the_relu_output(tiny, tmp_path):
    """The cpu profile quantizes ReLUs, which ONNX Runtime folds into the Q after them; a Conv
    kept in float that reads a ReLU output (here one a quantized Conv reads too) must still get
    the ReLU applied: its graph is no further from FP32 than the all-INT8 one."""
    from gfnet_edge.quantize.probe import outputs

    pre = tiny["pre"]["glance"]
    f = onnx.load(str(pre))
    producer = {o: n for n in f.graph.node for o in n.output}
    readers = {}
    for n in f.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    target = next(n.name for n in f.graph.node if n.op_type == "Conv" and producer.get(n.input[0]) is not None
                  and producer[n.input[0]].op_type == "Relu"
                  and any(r.op_type == "Conv" and r is not n for r in readers[n.input[0]]))
    st = ort_settings(gq.QuantizeOptions(profile="cpu", method="max"))
    x = tiny["calib"].inputs("glance")
    ref = outputs(f, x)

    def error(excluded):
        dst = tmp_path / f"q{len(excluded)}.onnx"
        quantize_graph(pre, dst, tiny["calib"].reader("glance", 8, progress=False), st, "max", "cpu", excluded)
        got = outputs(onnx.load(str(dst)), x)
        return sum(float(np.abs(got[k] - ref[k]).mean() / np.abs(ref[k]).mean()) for k in ref)

    assert error([target]) < 1.2 * error([])
