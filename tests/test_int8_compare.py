"""bench/int8_compare.py: its accuracy, flip, exit and multiply-add figures, recomputed
independently from the traces it kept, the images and the graphs."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxsim")
onnx = pytest.importorskip("onnx")

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import int8_compare  # noqa: E402
from int8_metrics import graph_macs, weighted_float_share  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    work = tmp_path_factory.mktemp("int8_compare")
    rc = int8_compare.main(["--quick", "--work", str(work), "--results", str(work / "r.md"), "--seeds", "11,12"])
    assert rc == 0
    return work, json.loads((work / "r.json").read_text())


def _trace(work: Path, graph_set: str, set_name: str):
    (path,) = (work / "demo" / "traces").glob(f"{graph_set}.{set_name}.*.npz")
    with np.load(path) as z:
        return z["probs"], z["classes"], z["exit_step"]


def _labels(seed: int, n: int) -> np.ndarray:
    """The held-out labels, rendered again from the generator (independent of the bench's cache)."""
    from gfnet_edge.data import ClutteredDigits, demo_config
    from gfnet_edge.models import load_checkpoint

    cfg = dataclasses.replace(demo_config(load_checkpoint(int8_compare.DEMO_CHECKPOINT)), seed=seed)
    ds = ClutteredDigits("test", size=n, config=cfg)
    return np.array([ds[i][1] for i in range(n)])


def test_accuracy_flips_and_exits_match_a_recomputation(quick):
    from gfnet_edge.bundle import Bundle

    work, res = quick
    (case,) = res["cases"]
    assert case["image_sets"] == ["seed11-n12", "seed12-n12"]
    thr = Bundle.load(work / "demo" / "compare").thresholds(None)
    assert thr == case["budget_thresholds"]
    rows = {r["graph_set"]: r for r in case["rows"]}
    assert set(rows) == {"fp32", "int8-cpu", "int8-tensorrt"}
    ref = {}
    for seed, name in zip((11, 12), case["image_sets"]):
        y = _labels(seed, 12)
        for g, row in rows.items():
            probs, classes, exits = _trace(work, g, name)
            # the runtime's early-exit answers follow from its own all-steps trace and the budget
            want_exit = np.array([next(t for t in range(len(thr)) if t == len(thr) - 1 or probs[t, i].max() >= thr[t])
                                  for i in range(len(y))])
            np.testing.assert_array_equal(exits, want_exit)
            np.testing.assert_array_equal(classes, [probs[e, i].argmax() for i, e in enumerate(exits)])
            final_ok = [probs[-1, i].argmax() == y[i] for i in range(len(y))]
            budget_ok = [classes[i] == y[i] for i in range(len(y))]
            if g == "fp32":
                ref[name] = (final_ok, budget_ok, exits)
                continue
            r_final, r_budget, r_exits = ref[name]
            got = row["per_seed"][name]
            assert got["final_flips"] == {"lost": sum(a and not b for a, b in zip(r_final, final_ok)),
                                          "gained": sum(b and not a for a, b in zip(r_final, final_ok))}
            assert got["budget_flips"] == {"lost": sum(a and not b for a, b in zip(r_budget, budget_ok)),
                                           "gained": sum(b and not a for a, b in zip(r_budget, budget_ok))}
            assert got["final_delta"] == pytest.approx(100.0 * (sum(final_ok) - sum(r_final)) / len(y))
            assert got["budget_delta"] == pytest.approx(100.0 * (sum(budget_ok) - sum(r_budget)) / len(y))
            assert got["exit_agreement"] == pytest.approx(100.0 * sum(a == b for a, b in zip(exits, r_exits)) / len(y))
            # each disagreement counted once, at the first step where one run exits and the other goes on
            first = [min(a, b) for a, b in zip(exits, r_exits) if a != b]
            assert [d["flips"] for d in got["exit_decision_flips"]] == [first.count(k) for k in range(len(thr) - 1)]
            assert [d["reached"] for d in got["exit_decision_flips"]] == [
                sum(min(a, b) >= k for a, b in zip(exits, r_exits)) for k in range(len(thr) - 1)]
    for g, row in rows.items():  # pooled figures are the image-weighted mean of the per-seed ones
        per = row["per_seed"].values()
        assert row["pooled"]["final_delta"] == pytest.approx(np.mean([p["final_delta"] for p in per]))
        assert row["pooled"]["exit_agreement"] == pytest.approx(np.mean([p["exit_agreement"] for p in per]))
    md = (work / "r.md").read_text()
    assert "gfnet-edge `tensorrt` profile" in md and "seed11-n12" in md


def test_graph_multiply_adds_match_the_models_own_count(quick):
    from gfnet_edge.models import load_checkpoint
    from gfnet_edge.models.macs import count_step_macs

    work, res = quick
    costs = count_step_macs(load_checkpoint(int8_compare.DEMO_CHECKPOINT))
    fp32 = {r["graph_set"]: r for r in res["cases"][0]["rows"]}["fp32"]["macs"]
    # both graphs run the encoder (+ the policy's state encoder); the glance graph adds the
    # backbone's own classifier, counted by forward hooks on the torch model
    assert fp32["glance"] - fp32["focus"] == costs.backbone_classifier
    assert costs.backbone <= fp32["focus"] <= costs.backbone + costs.policy
    assert fp32["float_pct_at_budget"] == 100.0
    for row in res["cases"][0]["rows"]:
        assert (row["macs"]["glance"], row["macs"]["focus"]) == (fp32["glance"], fp32["focus"])


def test_compare_arm_matches_a_loop_over_images(rng):
    from int8_metrics import ArmTrace, compare_arm

    T, N, K = 3, 200, 4
    labels = rng.integers(0, K, N)

    def arm():
        probs = rng.dirichlet(np.ones(K), size=(T, N)).astype(np.float32)
        exits = rng.integers(0, T, N)
        return ArmTrace(probs, probs[exits, np.arange(N)].argmax(axis=1), exits)

    ref, test = arm(), arm()
    got = compare_arm(ref, test, labels)
    lost = gained = b_lost = b_gained = same_exit = 0
    for i in range(N):
        r_ok, t_ok = ref.probs[-1, i].argmax() == labels[i], test.probs[-1, i].argmax() == labels[i]
        lost, gained = lost + (r_ok and not t_ok), gained + (t_ok and not r_ok)
        rb, tb = ref.classes[i] == labels[i], test.classes[i] == labels[i]
        b_lost, b_gained = b_lost + (rb and not tb), b_gained + (tb and not rb)
        same_exit += ref.exit_step[i] == test.exit_step[i]
    assert lost != gained  # the data tell the two directions apart
    assert got["final_flips"] == {"lost": lost, "gained": gained}
    assert got["budget_flips"] == {"lost": b_lost, "gained": b_gained}
    assert got["final_delta"] == pytest.approx(100.0 * (gained - lost) / N)
    assert got["budget_delta"] == pytest.approx(100.0 * (b_gained - b_lost) / N)
    assert got["exit_agreement"] == pytest.approx(100.0 * same_exit / N)
    for t in range(T):
        assert got["step_accuracy"][t] == pytest.approx(100.0 * sum(
            test.probs[t, i].argmax() == labels[i] for i in range(N)) / N)


def _qdq_conv_model(path: Path) -> None:
    """image (1,3,8,8) -> Conv 4x3x3x3 pad 1 in INT8 (Q/DQ on input and weight) -> Conv 2x4x1x1 in
    float -> Flatten -> Gemm 128->5 with only its input dequantized."""
    from onnx import TensorProto, helper, numpy_helper

    f = np.float32
    inits = [numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.int8), "w1q"),
             numpy_helper.from_array(np.ones((2, 4, 1, 1), f), "w2"),
             numpy_helper.from_array(np.ones((128, 5), f), "w3"),
             numpy_helper.from_array(np.array(0.1, f), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["image", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]),
             helper.make_node("DequantizeLinear", ["w1q", "s", "z"], ["w1"]),
             helper.make_node("Conv", ["x", "w1"], ["c1"], name="int8_conv", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "w2"], ["c2"], name="float_conv"),
             helper.make_node("Flatten", ["c2"], ["fl"]),
             helper.make_node("QuantizeLinear", ["fl", "s", "z"], ["flq"]),
             helper.make_node("DequantizeLinear", ["flq", "s", "z"], ["fld"]),
             helper.make_node("Gemm", ["fld", "w3"], ["out"], name="half_gemm")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_graph_macs_counts_and_classifies_nodes(tmp_path):
    _qdq_conv_model(tmp_path / "m.onnx")
    nodes = {n.name: n for n in graph_macs(tmp_path / "m.onnx")}
    assert (nodes["int8_conv"].macs, nodes["int8_conv"].int8) == (4 * 8 * 8 * 3 * 3 * 3, True)
    assert (nodes["float_conv"].macs, nodes["float_conv"].int8) == (2 * 8 * 8 * 4, False)
    assert (nodes["half_gemm"].macs, nodes["half_gemm"].int8) == (128 * 5, False)
    g = list(nodes.values())
    flt = 2 * 8 * 8 * 4 + 128 * 5
    assert weighted_float_share(g, g, 1, 2) == pytest.approx(100.0 * flt / sum(n.macs for n in g))
    assert weighted_float_share(g, [], 1, 5) == pytest.approx(100.0 * flt / sum(n.macs for n in g))


@pytest.mark.parametrize("args, needle", [(["--seeds", "0,3"], "--seeds"), (["--per-seed", "0"], "positive integer"),
                                          (["--imagenet-model", "nosuchnet"], "nosuchnet")])
def test_bad_options_are_refused_with_one_line(args, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        rc = int8_compare.main(["--work", str(tmp_path / "w")] + args)
        raise SystemExit(rc)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1]
    assert not (tmp_path / "w").exists()


def test_modelopt_arm_is_skipped_with_its_reason(tmp_path):
    arm = int8_compare.MODELOPT_ARMS[0]
    for python, needle in ((None, "--modelopt-python"), (str(tmp_path / "nopython"), "no such file")):
        st = int8_compare.Settings(tmp_path, 1, python)
        graphs, why = int8_compare.modelopt_graphs(arm, None, tmp_path, tmp_path / "c.npz", st, {})
        assert graphs is None and needle in why
    assert not (tmp_path / arm.graph_set).exists()


def test_exit_steps_from_the_trace_are_the_runtime_predict_answers(quick):
    from gfnet_edge.bundle import Bundle
    from gfnet_edge.runtime import Runtime

    work, res = quick
    case = int8_compare.cases(int8_compare.parse_args(["--quick", "--seeds", "11,12"]))[0]
    bundle = Bundle.load(work / "demo" / "compare")
    x, _ = int8_compare.eval_images(case, bundle.model, 11, cache=False)
    for arm in int8_compare.GFNET_ARMS:
        _, classes, exits = _trace(work, arm.graph_set, "seed11-n12")
        with Runtime(bundle.root, backend="onnxruntime", precision=arm.graph_set, threads=2) as rt:
            p = rt.predict(x)
        np.testing.assert_array_equal(exits, p.exit_step)
        np.testing.assert_array_equal(classes, p.classes)


def test_demo_calibration_options_reach_the_case():
    a = int8_compare.parse_args(["--demo-calib", "demo:train", "--num-calib", "3000", "--imagenet-model", "none"])
    (case,) = int8_compare.cases(a)
    assert (case.demo_calib, case.num_calib) == ("demo:train", 3000)
    assert int8_compare._checkpoint(case, Path("unused"))[1] == "demo:train"  # the build's calib_data
    with pytest.raises(SystemExit):
        int8_compare.parse_args(["--demo-calib", "demo:test"])


def test_modelopt_graphs_are_reused_only_for_the_same_calibration_set(quick, tmp_path):
    from gfnet_edge.bundle import Bundle

    work, _ = quick
    bundle = Bundle.load(work / "demo" / "bundle")
    arm = int8_compare.MODELOPT_ARMS[0]
    st = int8_compare.Settings(tmp_path, 1, None)
    out = tmp_path / arm.graph_set
    out.mkdir()
    for g in ("glance", "focus"):
        (out / f"{g}.onnx").write_bytes(b"graph")
    fp32 = [bundle.manifest["artifacts"][bundle.manifest["graphs"]["fp32"][g]]["sha256"] for g in ("glance", "focus")]
    from gfnet_edge.bundle import sha256_file

    calib = tmp_path / "calibration_arrays_3000_256_demo-train.npz"
    calib.write_bytes(b"these calibration arrays")
    other = tmp_path / "other.npz"
    other.write_bytes(b"other calibration arrays")
    (out / "modelopt.json").write_text(json.dumps({"key": {"calibration": sha256_file(other), "fp32": fp32}}))
    graphs, why = int8_compare.modelopt_graphs(arm, bundle, tmp_path, calib, st, {})
    assert graphs is None and "no ModelOpt environment" in why  # other calibration images: quantize again
    (out / "modelopt.json").write_text(json.dumps({"key": {"calibration": sha256_file(calib), "fp32": fp32}}))
    graphs, why = int8_compare.modelopt_graphs(arm, bundle, tmp_path, calib, st, {})
    assert why is None and graphs == {g: out / f"{g}.onnx" for g in ("glance", "focus")}
