"""The patch guard: which glance activations move the first patch, and keeping their readers
in float (checked against graphs built independently from the FP32 graph)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

import gfnet_edge.quantize as gq  # noqa: E402
from gfnet_edge.quantize import patch_guard  # noqa: E402
from gfnet_edge.quantize.qdq import weighted_nodes  # noqa: E402

from test_quantize_finetune import S, P, _run, tiny  # noqa: E402,F401  (module fixture)


def _weights_only_reference(q, f):
    """The FP32 graph with each weight replaced by its INT8 value times its scale (what a graph
    with quantized weights and float activations computes), built from the initializers."""
    qi = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(f)
    done = 0
    for n in q.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in qi or qi[n.input[0]].dtype != np.int8:
            continue
        w, s = qi[n.input[0]].astype(np.float32), qi[n.input[1]].astype(np.float32)
        if s.ndim == 1:
            s = s.reshape((-1,) + (1,) * (w.ndim - 1))
        name = n.input[0][:-len("_quantized")] if n.input[0].endswith("_quantized") else n.input[0]
        for t in out.graph.initializer:
            if t.name == name:
                t.CopyFrom(numpy_helper.from_array((w * s).astype(np.float32), name))
                done += 1
    assert done == len(weighted_nodes(f))
    return out


def test_readers_cover_every_weighted_node_and_kept_pairs_are_exactly_those_asked(tiny):
    q, f = onnx.load(str(tiny["q"])), onnx.load(str(tiny["pre"]))
    readers = patch_guard.activation_readers(q)
    # the tensorrt profile quantizes the input of every weighted node, each read through one tensor
    assert set().union(*readers.values()) == {name for name, _ in weighted_nodes(f)}
    assert sum(len(r) for r in readers.values()) == len(weighted_nodes(f))
    x = tiny["calib"].inputs("glance")[:8]
    # nothing kept: quantized weights, float activations
    got = _run(patch_guard.keep_activations(q, ()), x)
    want = _run(_weights_only_reference(q, f), x)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # everything kept: the Q/DQ graph itself
    for a, b in zip(_run(patch_guard.keep_activations(q, list(readers)), x), _run(q, x)):
        np.testing.assert_array_equal(a, b)
    # one tensor kept: its QuantizeLinear and no other activation one
    t = sorted(readers)[1]
    m = patch_guard.keep_activations(q, (t,))
    inits = {i.name for i in m.graph.initializer}
    assert [n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits] == [t]
    assert patch_guard.activation_readers(m) == {t: readers[t]}


def test_tensors_also_read_in_int8_by_other_ops_are_not_offered(tiny, tmp_path):
    """With the residual stream in INT8 a block's input also reaches its Add through Q/DQ:
    keeping the Convs reading it in float would not take its rounding out, so it is no candidate."""
    from gfnet_edge.quantize.options import ort_settings
    from gfnet_edge.quantize.qdq import quantize_graph

    st = ort_settings(gq.QuantizeOptions(profile="tensorrt", method="max", residual_int8=True))
    dst = tmp_path / "glance.res8.onnx"
    quantize_graph(tiny["pre"], dst, tiny["calib"].reader("glance", 8, progress=False), st, "max", "tensorrt")
    q = onnx.load(str(dst))
    readers = patch_guard.activation_readers(q)
    producer = {o: n for n in q.graph.node for o in n.output}
    add_inputs = {producer[producer[i].input[0]].input[0] for n in q.graph.node if n.op_type == "Add"
                  for i in n.input if i in producer and producer[i].op_type == "DequantizeLinear"}
    assert add_inputs and not add_inputs & set(readers)
    weighted_inputs = {producer[producer[n.input[0]].input[0]].input[0] for n in q.graph.node
                       if n.op_type in ("Conv", "Gemm") and producer[n.input[0]].op_type == "DequantizeLinear"}
    assert set(readers) == weighted_inputs - add_inputs


def _cand(name, mse, macs):
    return patch_guard.Candidate(name, frozenset({name + "/Conv"}), macs, mse)


def test_choose_takes_the_most_error_per_multiply_add_within_the_share():
    cands = [_cand("a", 4.0, 100), _cand("b", 3.0, 10), _cand("c", 2.0, 1000), _cand("d", 0.01, 1)]
    macs = {c.tensor + "/Conv": c.macs for c in cands}
    share = lambda nodes: sum(macs[n] for n in nodes) / 10000.0  # noqa: E731
    g = patch_guard.choose(cands, {"all_int8": 10.0, "weights_only": 0.5}, share, max_share=0.05)
    # by error per multiply-add: d (too small to matter: < 5 % of 9.01), b, a; c would be 11.1 %
    assert [c.tensor for c in g.kept] == ["b", "a"]
    assert g.nodes == {"a/Conv", "b/Conv"} and g.float_mac_share == pytest.approx(0.011)
    assert g.rms_px == {"all_int8": pytest.approx(np.sqrt(10.0), abs=1e-4),
                        "weights_only": pytest.approx(np.sqrt(0.5), abs=1e-4)}
    assert patch_guard.choose(cands, {"all_int8": 10.0, "weights_only": 0.5}, share, max_share=0.0).nodes == set()


def test_measured_errors_are_the_location_shift_of_each_tensor_alone(tiny):
    q, f = onnx.load(str(tiny["q"])), onnx.load(str(tiny["pre"]))
    heads = dict(np.load(str(tiny["paths"]["heads"])))
    x = tiny["calib"].inputs("glance")
    loc = patch_guard.first_patch_pixels(heads, S, P)
    macs = {name: 1 for name, _ in weighted_nodes(f)}
    cands, totals = patch_guard.measure(q, patch_guard.LocationProbe(f, x, loc, threads=1, batch=8), macs)
    # the policy applied by the torch reference model, in pixels (graphs run by ONNX Runtime
    # as the measurement runs them: the same kernels round the same way)
    from gfnet_edge.quantize.probe import outputs

    ps = lambda m: torch.from_numpy(outputs(m, x, 8, 1)["policy_state"])  # noqa: E731
    policy = tiny["model"].policy

    def pixels(m):
        with torch.no_grad():
            return policy.actor(policy.recur(ps(m), None)[0]).numpy() * (S - P)

    ref = pixels(f)
    mse = lambda m: float(((pixels(m) - ref) ** 2).mean())  # noqa: E731
    assert totals["all_int8"] == pytest.approx(mse(q), rel=1e-3)
    assert totals["weights_only"] == pytest.approx(mse(patch_guard.keep_activations(q, ())), rel=1e-3)
    assert totals["all_int8"] > totals["weights_only"] > 0
    assert [c.added_mse for c in cands] == sorted((c.added_mse for c in cands), reverse=True)
    top = cands[0]
    assert top.added_mse == pytest.approx(mse(patch_guard.keep_activations(q, (top.tensor,))) - totals["weights_only"],
                                          rel=1e-3)
    assert top.macs == len(top.nodes) and top.added_mse > 0


def test_quantize_model_keeps_the_guarded_readers_in_float(tiny, tmp_path):
    pytest.importorskip("gfnet_edge.ops", reason="the runtime extension scores the graphs")
    model = tiny["model"]
    fp32 = {g: tiny["paths"][g] for g in ("glance", "focus")}
    base = dict(profile="tensorrt", method="max", max_accuracy_drop=None, threads=1, batch_size=8, finetune_epochs=0)
    res = gq.quantize_model(model, fp32, tiny["paths"]["heads"], tiny["calib"], tmp_path / "g",
                            gq.QuantizeOptions(**base, patch_guard_share=0.2), progress=False)
    off = gq.quantize_model(model, fp32, tiny["paths"]["heads"], tiny["calib"], tmp_path / "off",
                            gq.QuantizeOptions(**base, patch_guard_share=0.0), progress=False)
    rep = json.loads((tmp_path / "g" / "quantization.json").read_text())["patch_guard"]
    assert "patch_guard" not in off.report and off.report["int8_mac_share"] == 1.0
    kept = set(rep["nodes"])
    assert kept and 0 < rep["float_mac_share"] <= 0.2
    assert res.report["int8_mac_share"] == pytest.approx(1.0 - rep["float_mac_share"], abs=1e-5)
    rms = rep["location_rms_px"]
    assert rms["weights_only"] <= rms["with_guard"] < rms["all_int8"]
    g = onnx.load(str(res.graphs["glance"]))
    assert gq.check_tensorrt_compat(g) == []
    producer = {o: n for n in g.graph.node for o in n.output}
    for n in g.graph.node:
        if n.name in {name for name, _ in weighted_nodes(onnx.load(str(tiny["pre"])))}:
            src = producer.get(n.input[0])
            in_float = src is None or src.op_type != "DequantizeLinear"
            assert in_float == (n.name in kept), n.name
    # the guarded graph moves the first patch less than the all-INT8 one, on the calibration inputs
    heads = dict(np.load(str(tiny["paths"]["heads"])))
    loc = patch_guard.first_patch_pixels(heads, S, P)
    x = tiny["calib"].inputs("glance")
    names = [o.name for o in onnx.load(str(tiny["pre"])).graph.output]
    at = lambda path: loc(dict(zip(names, _run(onnx.load(str(path)), x))))  # noqa: E731
    ref = at(tiny["pre"])
    err = lambda path: float(((at(path) - ref) ** 2).mean())  # noqa: E731
    assert err(res.graphs["glance"]) < err(off.graphs["glance"])


def test_profiles_that_fold_relus_into_their_quantizers_are_left_alone(tiny, tmp_path):
    pytest.importorskip("gfnet_edge.ops", reason="the runtime extension scores the graphs")
    fp32 = {g: tiny["paths"][g] for g in ("glance", "focus")}
    res = gq.quantize_model(tiny["model"], fp32, tiny["paths"]["heads"], tiny["calib"], tmp_path / "cpu",
                            gq.QuantizeOptions(profile="cpu", method="max", max_accuracy_drop=None, threads=1,
                                               batch_size=8, patch_guard_share=0.2), progress=False)
    assert "Relu" in res.report["patch_guard"]["skipped"] and res.report["int8_mac_share"] == 1.0


def test_a_guard_that_keeps_nothing_hands_its_int8_graph_on(tiny, tmp_path, monkeypatch):
    """When no tensor is worth keeping in float, the guard's all-INT8 glance graph is the one the
    run goes on with: the glance graph is quantized once, and the result equals a run without
    the guard."""
    pytest.importorskip("gfnet_edge.ops", reason="the runtime extension scores the graphs")
    from gfnet_edge.quantize import session as qs

    calls = []
    real = qs.quantize_graph
    monkeypatch.setattr(qs, "quantize_graph", lambda src, dst, *a, **k: calls.append(dst.name) or real(src, dst, *a, **k))
    fp32 = {g: tiny["paths"][g] for g in ("glance", "focus")}
    base = dict(profile="tensorrt", method="max", max_accuracy_drop=None, threads=1, batch_size=8, finetune_epochs=0)
    res = gq.quantize_model(tiny["model"], fp32, tiny["paths"]["heads"], tiny["calib"], tmp_path / "g",
                            gq.QuantizeOptions(**base, patch_guard_share=1e-9), progress=False)
    assert res.report["patch_guard"]["nodes"] == [] and res.report["int8_mac_share"] == 1.0
    assert sum(name.startswith("glance.") for name in calls) == 1, calls
    off = gq.quantize_model(tiny["model"], fp32, tiny["paths"]["heads"], tiny["calib"], tmp_path / "off",
                            gq.QuantizeOptions(**base, patch_guard_share=0.0), progress=False)
    a, b = onnx.load(str(res.graphs["glance"])), onnx.load(str(off.graphs["glance"]))
    assert [(n.op_type, list(n.input)) for n in a.graph.node] == [(n.op_type, list(n.input)) for n in b.graph.node]
    for ta, tb in zip(a.graph.initializer, b.graph.initializer):
        assert ta.name == tb.name and np.array_equal(numpy_helper.to_array(ta), numpy_helper.to_array(tb)), ta.name
