"""Quantization-aware fine-tuning: the torch interpreter of Q/DQ graphs against ONNX's reference
and ONNX Runtime, straight-through gradients, and fine-tuned weights that quantize back to the
graph that was trained."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import gfnet_edge.quantize as gq  # noqa: E402
from gfnet_edge.quantize.options import ort_settings  # noqa: E402
from gfnet_edge.quantize.qdq import preprocess, quantize_graph  # noqa: E402

from tiny_gfnet import random_gfnet  # noqa: E402

S, P = 64, 32


def _images(n: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(S, S), mode="bilinear", align_corners=False)
    return (x + 0.2 * torch.randn(n, 3, S, S, generator=g)).numpy().astype(np.float32)


def _run(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q/DQ run as written
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from gfnet_edge.export import export_model

    root = tmp_path_factory.mktemp("finetune")
    model = random_gfnet("tiny_ft", S, P, 3, 10, (8, 16, 32, 64), 32, logit_scale=4.0, random_bn=True)
    paths = export_model(model, root / "fp32")
    calib = gq.QuantCalibrationSet.from_model(model, _images(32, 0), progress=False)
    pre = preprocess(paths["glance"], root / "glance.pre.onnx")[0]
    st = ort_settings(gq.QuantizeOptions(profile="tensorrt", method="max"))
    q = root / "glance.q.onnx"
    cache = root / "glance.calibration.json"
    quantize_graph(pre, q, calib.reader("glance", 8, progress=False), st, "max", "tensorrt", [], cache)
    return {"root": root, "model": model, "paths": paths, "calib": calib, "pre": pre, "q": q, "cache": cache,
            "settings": st}


def test_fake_quant_matches_onnx_reference_and_passes_gradients_inside_the_range():
    from onnx.reference import ReferenceEvaluator

    from gfnet_edge.quantize.torch_graph import fake_quant

    # ties at .5 (ONNX rounds half to even), saturation at both ends, int8 and uint8
    x = np.array([-300.0, -1.5, -0.5, 0.5, 1.5, 2.5, 2.4999, 126.5, 127.5, 300.0], np.float32) * 0.1
    for zp_dtype, zp_val, qmin, qmax in ((np.int8, 0, -128, 127), (np.uint8, 100, 0, 255)):
        node_q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])
        node_d = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])
        ttype = TensorProto.INT8 if zp_dtype == np.int8 else TensorProto.UINT8
        g = helper.make_graph([node_q, node_d], "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [10])],
                              [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                               helper.make_tensor("z", ttype, [], [zp_val])])
        ref = ReferenceEvaluator(helper.make_model(g)).run(None, {"x": x})[0]
        t = torch.tensor(x, requires_grad=True)
        y = fake_quant(t, torch.tensor(0.1), float(zp_val), qmin, qmax)
        np.testing.assert_allclose(y.detach().numpy(), ref, rtol=0, atol=1e-6)
        y.sum().backward()
        inside = (x / 0.1 + zp_val >= qmin) & (x / 0.1 + zp_val <= qmax)
        np.testing.assert_array_equal(t.grad.numpy(), inside.astype(np.float32))


def test_interpreter_reproduces_onnxruntime_on_the_qdq_graph(tiny):
    from gfnet_edge.quantize.torch_graph import QdqGraphModule

    q, f = onnx.load(str(tiny["q"])), onnx.load(str(tiny["pre"]))
    m = QdqGraphModule(q, f)
    x = _images(8, 7)[:, :, ::2, ::2].copy()  # glance inputs are P x P
    ref = _run(q, x)
    fp32 = _run(f, x)
    with torch.no_grad():
        out = [o.numpy() for o in m(torch.from_numpy(x))]
    dq_weights = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"
                  and any(t.name == n.input[0] for t in q.graph.initializer)}
    assert len(m.weights) == len(dq_weights) >= sum(n.op_type in ("Conv", "Gemm") for n in q.graph.node) - 1
    for r, o, ff in zip(ref, out, fp32):
        err = np.abs(r - o)
        # equal up to float32 ties in a rounding (a single quantization step, rare)
        assert np.mean(err <= 1e-4 * (np.abs(r).max() + 1)) > 0.99
        assert np.abs(r - ff).max() > 10 * np.median(err)  # the graph is quantized, not FP32


@pytest.mark.parametrize("reduce_range", [False, True])
def test_weights_train_on_the_grid_the_graph_deploys(tmp_path, reduce_range):
    """cpu profile with and without reduce_range (ONNX Runtime's 7-bit weights): each weight is
    fake-quantized with the graph's own scale and integer range, and the interpreter's outputs
    are ONNX Runtime's on that graph."""
    from gfnet_edge.quantize.calibration import GraphDataReader
    from gfnet_edge.quantize.torch_graph import QdqGraphModule, fake_quant, weight_scale

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3
    w3 = rng.standard_normal((5, 4)).astype(np.float32) * 0.5
    g = helper.make_graph(
        [helper.make_node("Conv", ["image", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
         helper.make_node("Flatten", ["p"], ["v"], name="flat"),
         helper.make_node("Gemm", ["v", "W3", "B3"], ["out"], name="fc", transB=1)],
        "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 5])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(np.zeros(8, np.float32) + 0.1, "B1"),
         numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(np.zeros(4, np.float32), "B2"),
         numpy_helper.from_array(w3, "W3"), numpy_helper.from_array(np.zeros(5, np.float32), "B3")])
    f = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    f.ir_version = 8
    onnx.save(f, str(tmp_path / "fp32.onnx"))
    x = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    st = ort_settings(gq.QuantizeOptions(profile="cpu", method="max", reduce_range=reduce_range))
    assert st.reduce_range is reduce_range
    quantize_graph(tmp_path / "fp32.onnx", tmp_path / "q.onnx", GraphDataReader(x, 16, progress=False), st, "max",
                   "cpu")
    q = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    m = QdqGraphModule(q, f)
    key_of = {v: k for k, v in m.param_names.items()}
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
           and inits[n.input[0]].dtype == np.int8]
    assert {n.input[0][:-len("_quantized")] for n in dqs} == {"W1", "W2", "W3"}
    for n in dqs:
        key = key_of[n.input[0][:-len("_quantized")]]
        w, qmax = m.weights[key], m.weight_qmax[key]
        axis = int(next((a.i for a in n.attribute if a.name == "axis"), 1))
        graph_scale = inits[n.input[1]].astype(np.float64)
        scale = weight_scale(w, axis, qmax)
        # the training scale is the deployed one, and the fake-quantized weight the graph's
        np.testing.assert_allclose(scale.detach().numpy().reshape(-1), graph_scale.reshape(-1), rtol=1e-6)
        shape = [1] * w.dim()
        shape[axis] = -1
        deployed = inits[n.input[0]].astype(np.float64) * graph_scale.reshape(shape)
        trained = fake_quant(w, scale, 0.0, -qmax, qmax).detach().numpy()
        np.testing.assert_allclose(trained, deployed, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        out = m(torch.from_numpy(x))[0].numpy()
    ref, fp32 = _run(q, x)[0], _run(f, x)[0]
    assert np.abs(out - ref).max() <= 1e-4 * (np.abs(ref).max() + 1)
    assert np.abs(ref - fp32).max() > 100 * np.abs(out - ref).max()  # the graph is quantized, not FP32


def test_fine_tuned_weights_quantize_back_to_the_trained_graph_and_lower_the_error(tiny):
    from gfnet_edge.quantize.finetune import finetune_weights
    from gfnet_edge.quantize.torch_graph import QdqGraphModule

    q, f = onnx.load(str(tiny["q"])), onnx.load(str(tiny["pre"]))
    x = tiny["calib"].inputs("glance")
    tuned, res = finetune_weights(q, f, x, epochs=6, batch_size=8, threads=1)
    assert res.iterations == 6 * (len(x) // 8) and res.inputs == len(x)
    assert res.loss_after < 0.9 * res.loss_before
    # the fine-tuned FP32 graph, quantized with the same calibration ranges (cache), is the
    # graph the training ended with
    tuned_path = tiny["root"] / "glance.tuned.onnx"
    onnx.save(tuned, str(tuned_path))
    q2 = tiny["root"] / "glance.q2.onnx"
    quantize_graph(tuned_path, q2, None, tiny["settings"], "max", "tensorrt", [], tiny["cache"])
    q2m = onnx.load(str(q2))
    assert gq.check_tensorrt_compat(q2m) == []
    xs = x[:16]
    with torch.no_grad():
        trained = [o.numpy() for o in QdqGraphModule(q2m, tuned)(torch.from_numpy(xs))]
    written = _run(q2m, xs)
    ref, before = _run(f, xs), _run(q, xs)
    for a, b, r in zip(trained, written, ref):
        # equal but for float32 ties in a rounding (one step, then carried through the layers
        # after it): far below the quantization error itself
        assert np.abs(a - b).mean() < 0.1 * np.abs(b - r).mean()
    # and it is closer to FP32 than the graph before fine-tuning, on the calibration inputs
    err = lambda outs: sum(float(np.mean((o - r) ** 2) / (np.var(r) + 1e-12)) for o, r in zip(outs, ref))
    assert err(written) < err(before)
    # the FP32 graph given was not modified
    assert all(np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
               for a, b in zip(f.graph.initializer, onnx.load(str(tiny["pre"])).graph.initializer))


def test_unsupported_op_is_named():
    from gfnet_edge.quantize.torch_graph import QdqGraphModule, UnsupportedGraph

    g = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], name="sm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g)
    with pytest.raises(UnsupportedGraph, match="Softmax.*'sm'"):
        QdqGraphModule(m, m)


def test_quantize_model_fine_tunes_both_graphs_and_reports_it(tiny, tmp_path):
    pytest.importorskip("gfnet_edge.ops", reason="the runtime extension scores the graphs")
    model = tiny["model"]
    fp32 = {g: tiny["paths"][g] for g in ("glance", "focus")}
    base = dict(profile="tensorrt", method="max", max_accuracy_drop=None, threads=1, batch_size=8)
    res = gq.quantize_model(model, fp32, tiny["paths"]["heads"], tiny["calib"], tmp_path / "ft",
                            gq.QuantizeOptions(**base, finetune_epochs=6), progress=False)
    plain = gq.quantize_model(model, fp32, tiny["paths"]["heads"], tiny["calib"], tmp_path / "plain",
                              gq.QuantizeOptions(**base), progress=False)
    rep = json.loads((tmp_path / "ft" / "quantization.json").read_text())
    assert "finetune" not in plain.report
    assert rep["finetune"]["glance"]["tensors"] > 0  # the glance graph was fine-tuned
    for g in ("glance", "focus"):
        ft = rep["finetune"][g]
        assert ft["epochs"] == 6
        assert gq.check_tensorrt_compat(res.graphs[g]) == []
        # same Q/DQ placement and activation scales; other integer weights where fine-tuning
        # lowered the loss, the plain graph's where it did not
        a, b = onnx.load(str(res.graphs[g])), onnx.load(str(plain.graphs[g]))
        assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
        ia = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
        ib = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
        assert ia.keys() == ib.keys()
        acts = [n.input[1] for n in a.graph.node if n.op_type == "QuantizeLinear"]
        assert acts and all(np.array_equal(ia[s], ib[s]) for s in acts)
        changed = any(not np.array_equal(ia[k], ib[k]) for k in ia if ia[k].dtype == np.int8 and ia[k].ndim > 1)
        if ft["tensors"]:
            assert ft["loss_after"] < ft["loss_before"] and changed, ft
        else:
            assert ft["loss_after"] >= ft["loss_before"] and not changed, ft


def test_fine_tuning_that_does_not_lower_the_loss_keeps_the_fp32_weights(tiny):
    from gfnet_edge.quantize.finetune import finetune_weights

    q, f = onnx.load(str(tiny["q"])), onnx.load(str(tiny["pre"]))
    # a step of a whole quantization step per iteration on every weight at once: the loss rises
    tuned, res = finetune_weights(q, f, tiny["calib"].inputs("glance"), epochs=2, lr=1.0, batch_size=8, threads=1)
    assert res.loss_after >= res.loss_before and res.tensors == 0
    assert all(np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
               for a, b in zip(tuned.graph.initializer, f.graph.initializer))


def test_fine_tuning_trains_with_its_threads_and_sets_torch_back(tiny):
    """finetune_weights(threads=N) runs with N torch threads and leaves torch's thread count as
    it found it, also when it raises."""
    from gfnet_edge.quantize.finetune import finetune_weights

    q, f = onnx.load(str(tiny["q"])), onnx.load(str(tiny["pre"]))
    x = tiny["calib"].inputs("glance")[:16]
    seen = []

    def record(outs):  # a derived target: called while the graph runs
        seen.append(torch.get_num_threads())
        return []

    def fail(outs):
        raise RuntimeError("derived target failed")

    original = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        finetune_weights(q, f, x, epochs=1, batch_size=8, derived=record, threads=1)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="derived target failed"):
            finetune_weights(q, f, x, epochs=1, batch_size=8, derived=fail, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)


def test_mixed_graph_takes_each_output_from_the_graph_named(tiny):
    """bench/int8_outputs.py's mixed glance graph: the outputs asked for come from the INT8
    graph, the others from the FP32 graph, on the same input."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from int8_outputs import mixed_graph

    out = mixed_graph(tiny["pre"], tiny["q"], ["policy_state"], tiny["root"] / "mixed.onnx")
    x = tiny["calib"].inputs("glance")[:4]
    names = [o.name for o in onnx.load(str(tiny["pre"])).graph.output]
    got = dict(zip(names, _run(onnx.load(str(out)), x)))
    f = dict(zip(names, _run(onnx.load(str(tiny["pre"])), x)))
    q = dict(zip(names, _run(onnx.load(str(tiny["q"])), x)))
    assert "policy_state" in names and len(names) >= 2
    for n in names:
        want = q[n] if n == "policy_state" else f[n]
        np.testing.assert_allclose(got[n], want, rtol=0, atol=1e-6)
        assert not np.allclose(q[n], f[n], atol=1e-6)  # the two sources differ


def test_first_patch_location_is_the_policys_first_action(tiny):
    """The glance fine-tuning's extra target equals the model's own policy (GRU from a zero
    state, actor) applied to the graph's policy_state output."""
    from gfnet_edge.quantize.finetune import first_patch_location

    heads = dict(np.load(str(tiny["paths"]["heads"])))
    f = onnx.load(str(tiny["pre"]))
    x = tiny["calib"].inputs("glance")[:6]
    outs = dict(zip([o.name for o in f.graph.output], _run(f, x)))
    got = first_patch_location(heads)({k: torch.from_numpy(v) for k, v in outs.items()})[0].numpy()
    policy = tiny["model"].policy
    with torch.no_grad():
        out, _ = policy.recur(torch.from_numpy(outs["policy_state"]), None)
        want = policy.actor(out).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.shape == (6, 2) and np.ptp(got) > 1e-3  # actions differ between images
