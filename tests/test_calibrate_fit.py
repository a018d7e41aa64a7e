"""Threshold fitting under a millisecond budget, against hand-computed cases (numpy only)."""
from __future__ import annotations

import numpy as np
import pytest

from gfnet_edge.calibrate import fit as cf
from gfnet_edge.calibrate.latency import LatencyStats, forced_exit_thresholds
from gfnet_edge.calibrate.precision import comparable_precisions, compare
from gfnet_edge.errors import InputError
from gfnet_edge.evaluate import dynamic_evaluate
from probs import two_class_probs as _probs


# Two steps, four images, all labelled 1. Step 0 (the glance) is right on images 0 and 2, step 1 on 0, 1, 3.
# cost: glance 1 ms, glance + one focus step 3 ms (cumulative).
CONF2 = [[0.9, 0.8, 0.6, 0.5], [0.7, 0.7, 0.7, 0.7]]
CLS2 = [[1, 0, 1, 0], [1, 1, 0, 1]]
Y2 = [1, 1, 1, 1]
COST2 = [1.0, 3.0]


def test_search_hand_computed_two_steps():
    # Threshold t on step 0: images with conf >= t exit there (1 ms), the others run step 1 (3 ms).
    #   t <= 0.5: all exit at 0      -> correct {0, 2} = 2/4, 1.0 ms
    #   t = 0.6 : 3 exit, #3 goes on -> correct {0, 2, 3} = 3/4, (3*1 + 3)/4 = 1.5 ms
    #   t = 0.8 : 2 exit             -> correct {0, 3} = 2/4, (2*1 + 2*3)/4 = 2.0 ms
    #   t = 0.9 : 1 exits            -> correct {0, 1, 3} = 3/4, (1 + 3*3)/4 = 2.5 ms
    #   never   : all run step 1     -> correct {0, 1, 3} = 3/4, 3.0 ms
    P = _probs(CONF2, CLS2)
    f = cf.fit_budget(P, Y2, COST2, 2.0, margin=0.0)
    np.testing.assert_allclose(f.thresholds, [0.6, -1e8], rtol=1e-6)
    assert f.accuracy == pytest.approx(75.0) and f.expected_ms == pytest.approx(1.5)
    assert f.exit_fractions == pytest.approx([0.75, 0.25])
    # at 2.5 ms two solutions reach 75 %; the tie goes to the one spending more of the budget
    f = cf.fit_budget(P, Y2, COST2, 2.5, margin=0.0)
    np.testing.assert_allclose(f.thresholds, [0.9, -1e8], rtol=1e-6)
    assert f.expected_ms == pytest.approx(2.5)
    # the whole budget of the full model: nobody needs to exit early
    f = cf.fit_budget(P, Y2, COST2, 3.0, margin=0.0)
    assert f.thresholds[0] == np.float32(1e8) and f.expected_ms == pytest.approx(3.0)
    # exactly the glance's latency: everyone exits at the glance
    f = cf.fit_budget(P, Y2, COST2, 1.0, margin=0.0)
    assert f.expected_ms == pytest.approx(1.0) and f.accuracy == pytest.approx(50.0)


def test_margin_tightens_the_target():
    P = _probs(CONF2, CLS2)
    # 2.5 ms with a 10 % margin -> target 2.25 ms: the 2.5 ms solution is out, 1.5 ms is best
    f = cf.fit_budget(P, Y2, COST2, 2.5, margin=0.1)
    assert f.target_ms == pytest.approx(2.25)
    np.testing.assert_allclose(f.thresholds, [0.6, -1e8], rtol=1e-6)


def test_reference_method_hand_computed():
    # T = 2: q_1 = 1 / (1 + p); floor(4 q_1) = 3 for p <= 1/3 (t = 0.6), 2 for p <= 1 (t = 0.8), 1 above (t = 0.9)
    P = _probs(CONF2, CLS2)
    f = cf.fit_budget(P, Y2, COST2, 2.0, margin=0.0, method="reference")
    np.testing.assert_allclose(f.thresholds, [0.6, -1e8], rtol=1e-6)
    assert f.p == pytest.approx(0.05)
    f = cf.fit_budget(P, Y2, COST2, 3.0, margin=0.0, method="reference")
    np.testing.assert_allclose(f.thresholds, [0.9, -1e8], rtol=1e-6)  # the sweep never runs everyone to the end


def test_search_three_steps_beats_reference_hand_computed():
    # Three steps, cost 1 / 2 / 4 ms, six images labelled 0. The glance is right only on its two most
    # confident images, step 1 is right on images 2 and 3 but with LOW confidence, step 2 on everything.
    conf = [[0.95, 0.9, 0.6, 0.58, 0.56, 0.55],
            [0.6, 0.6, 0.52, 0.51, 0.9, 0.9],
            [0.99, 0.99, 0.99, 0.99, 0.99, 0.99]]
    cls = [[0, 0, 1, 1, 1, 1],
           [0, 0, 0, 0, 1, 1],
           [0, 0, 0, 0, 0, 0]]
    P, y, cost = _probs(conf, cls), [0] * 6, [1.0, 2.0, 4.0]
    # Budget 1.9 ms, by hand. Images 2 and 3 are only right at step 1, where their confidence is the lowest,
    # so t1 <= 0.51 and images 4, 5 exit (wrongly) at step 1 too; at most 4/6 can be right under 1.9 ms:
    #   t0 in (0.60, 0.90]: 0, 1 exit at the glance, 2-5 at step 1 -> 4/6, (2*1 + 4*2)/6 = 1.667 ms
    #   t0 in (0.90, 0.95]: 0 exits at the glance, 1-5 at step 1 (1 is right there too) -> 4/6, (1 + 5*2)/6 = 1.833 ms
    #   t0 > 0.95: everyone to step 1 -> 4/6 at 2.0 ms (infeasible); 5/6 needs step 2 for 4, 5 -> >= 2.33 ms
    # The tie at 4/6 goes to the solution spending more of the budget: 1.833 ms, exits [0, 1, 1, 1, 1, 1].
    f = cf.fit_budget(P, y, cost, 1.9, margin=0.0)
    assert f.accuracy == pytest.approx(100 * 4 / 6)
    assert f.expected_ms == pytest.approx(11 / 6)
    assert 0.9 < f.thresholds[0] <= 0.95 and f.thresholds[1] <= 0.51
    r = dynamic_evaluate(P, y, cost, f.thresholds)
    np.testing.assert_array_equal(r.exit_step, [0, 1, 1, 1, 1, 1])
    ref = cf.fit_budget(P, y, cost, 1.9, margin=0.0, method="reference")
    assert ref.expected_ms <= 1.9 + 1e-9 and ref.accuracy < f.accuracy
    # at 2.0 ms 4/6 solutions costing exactly 2.0 ms become feasible and win the tie
    f = cf.fit_budget(P, y, cost, 2.0, margin=0.0)
    assert f.accuracy == pytest.approx(100 * 4 / 6) and f.expected_ms == pytest.approx(2.0)


def test_search_never_worse_than_reference_and_within_target(rng):
    T, N, K = 4, 400, 10
    labels = rng.integers(0, K, N)
    logits = rng.normal(size=(T, N, K))
    for t in range(T):
        logits[t, np.arange(N), labels] += 0.8 * (t + 1)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    cost = [1.5, 2.5, 3.5, 5.0]
    for budget in (1.6, 2.0, 3.0, 4.0, 5.0, 9.0):
        s = cf.fit_budget(probs, labels, cost, budget)
        r = cf.fit_budget(probs, labels, cost, budget, method="reference")
        assert s.expected_ms <= s.target_ms + 1e-9 and r.expected_ms <= r.target_ms + 1e-9
        assert s.accuracy >= r.accuracy
        check = dynamic_evaluate(probs, labels, cost, s.thresholds)
        assert check.accuracy == pytest.approx(s.accuracy) and check.expected_cost == pytest.approx(s.expected_ms)


def test_infeasible_budget_message():
    P = _probs(CONF2, CLS2)
    with pytest.raises(cf.InfeasibleBudget, match=r"glance alone \(step 0\) takes 1.000 ms") as e:
        cf.fit_budget(P, Y2, COST2, 0.5)
    assert isinstance(e.value, InputError)
    with pytest.raises(cf.InfeasibleBudget, match="positive"):
        cf.check_feasible(-1.0, COST2)
    cf.check_feasible(1.0, COST2)  # exactly the glance's latency is feasible


@pytest.mark.parametrize("kw,match", [({"method": "magic"}, "unknown threshold method"),
                                      ({"margin": 0.7}, "margin"),
                                      ({"cost": [1.0, float("nan")]}, "finite and positive"),
                                      ({"cost": [1.0, 2.0, 3.0]}, "probs must be")])
def test_bad_arguments(kw, match):
    args = {"probs": _probs(CONF2, CLS2), "labels": Y2, "cost": COST2, "budget_ms": 2.0, **kw}
    with pytest.raises(InputError, match=match):
        cf.fit_budget(**args)


@pytest.mark.parametrize("kw,option", [({"margin": 0.5}, "--margin"), ({"margin": 0.6}, "--margin"),
                                       ({"margin": -0.01}, "--margin"), ({"margin": float("nan")}, "--margin"),
                                       ({"margin": "0.1"}, "--margin"), ({"method": "magic"}, "--method"),
                                       ({"tolerance": (-0.1, 0.05)}, "--tolerance"),
                                       ({"tolerance": (0.1, -0.05)}, "--tolerance"),
                                       ({"tolerance": (0.1, 1.0)}, "--tolerance"),
                                       ({"tolerance": (float("nan"), 0.05)}, "--tolerance"),
                                       ({"tolerance": (0.1,)}, "--tolerance"),
                                       ({"tolerance": (0.1, 0.05, 0.0)}, "--tolerance"),
                                       ({"tolerance": "0.1,0.05"}, "--tolerance")])
def test_calibration_config_checks_the_fit_options(kw, option):
    """``CalibrationConfig.validate()`` refuses a margin the fit refuses, an unknown method and a
    tolerance that is not two fractions in [0, 1), in one line naming the option; values the fit
    and the tolerance check accept pass."""
    from gfnet_edge.calibrate.config import CalibrationConfig

    with pytest.raises(InputError, match=option) as e:
        CalibrationConfig(bundle="b", data="d", output="o", **kw).validate()
    assert "\n" not in str(e.value)
    name = next(iter(kw))
    if name == "margin" and isinstance(kw[name], float) and kw[name] == kw[name]:
        with pytest.raises(InputError, match="margin"):  # the fit itself refuses it too
            cf.fit_budget(_probs(CONF2, CLS2), Y2, COST2, 2.0, margin=kw[name])
    for good in ({"margin": 0.0}, {"margin": 0.49}, {"method": "reference"}, {"method": cf.METHODS[0]},
                 {"tolerance": (0.0, 0.0)}, {"tolerance": [0.99, 0.5]}):
        CalibrationConfig(bundle="b", data="d", output="o", **good).validate()


def test_names_and_defaults():
    assert cf.budget_name(3) == "ms-3.0" and cf.budget_name(2.25) == "ms-2.25"
    assert cf.default_budgets([2.0, 4.0, 6.0]) == [3.0, 4.0, 5.0]
    assert cf.default_budgets([3.9, 3.95, 4.0]) == [3.92, 3.95, 3.98]  # narrow span: finer steps
    assert [cf.budget_name(b) for b in cf.default_budgets([3.9, 3.95, 4.0])] == ["ms-3.92", "ms-3.95", "ms-3.98"]
    assert forced_exit_thresholds(3, 0) == [-1e8, -1e8, -1e8]
    assert forced_exit_thresholds(3, 2) == [2.0, 2.0, -1e8]
    s = LatencyStats.of([1.0, 2.0, 3.0, 4.0])
    assert s.mean_ms == 2.5 and s.p50_ms == 2.5 and s.n == 4


def test_precision_comparison():
    P = _probs(CONF2, CLS2)
    Q = P.copy()
    Q[1, 3] = Q[1, 3, ::-1]  # the "int8" graphs flip one step-1 prediction
    out = compare({"fp32": {"probs": P, "cost_ms": [1, 3]}, "int8-cpu": {"probs": Q, "cost_ms": [0.5, 1.5]}},
                  np.asarray(Y2), {"ms-2.0": [0.6, -1e8]})
    rows = {r["precision"]: r for r in out["rows"]}
    assert out["reference"] == "fp32"
    assert rows["int8-cpu"]["step_agreement"] == [100.0, 75.0]
    assert rows["int8-cpu"]["budgets"]["ms-2.0"]["prediction_agreement"] == 75.0
    assert rows["int8-cpu"]["budgets"]["ms-2.0"]["expected_ms"] == pytest.approx((3 * 0.5 + 1.5) / 4)
    # a budget fitted with other step latency (the device slowed down): its expected ms uses that latency,
    # as the budgets table does, while another budget keeps the precision's own
    out = compare({"fp32": {"probs": P, "cost_ms": [1, 3]},
                   "int8-cpu": {"probs": Q, "cost_ms": [0.5, 1.5], "budget_cost_ms": {"ms-2.0": [0.7, 2.1]}}},
                  np.asarray(Y2), {"ms-2.0": [0.6, -1e8], "ms-9.0": [0.6, -1e8]})
    int8 = next(r for r in out["rows"] if r["precision"] == "int8-cpu")["budgets"]
    assert int8["ms-2.0"]["expected_ms"] == pytest.approx((3 * 0.7 + 2.1) / 4)
    assert int8["ms-9.0"]["expected_ms"] == pytest.approx((3 * 0.5 + 1.5) / 4)
    assert comparable_precisions({"graphs": {"int8-cpu": {}, "fp32": {}, "int8-tensorrt": {}}}, "onnxruntime") == \
        ["fp32", "int8-cpu"]
    engines = [{"precision": "int8"}, {"precision": "fp32"}, {"precision": "int8"}]
    # TensorRT sets are named as its runner names them, so the main precision is not traced twice.
    assert comparable_precisions({"engines": engines}, "tensorrt") == ["fp32-tensorrt", "int8-tensorrt"]


def test_the_suggested_budget_is_the_cheapest_within_one_point_of_best():
    """The budget the report suggests (and ``--default auto`` / the demo make the default)."""
    from gfnet_edge.calibrate.report import pick_default_budget

    def b(name, ms, acc):
        return {"name": name, "budget_ms": ms, "holdout": {"accuracy": acc}}

    budgets = [b("ms-9.9", 9.9, 90.0), b("ms-6.0", 6.0, 65.0), b("ms-7.9", 7.9, 89.2)]
    assert pick_default_budget(budgets) == "ms-7.9"  # 89.2 >= 90.0 - 1, and cheaper than ms-9.9
    assert pick_default_budget(budgets, slack=0.5) == "ms-9.9"
    assert pick_default_budget([b("ms-5.0", 5.0, 70.0)]) == "ms-5.0"
    with pytest.raises(Exception, match="no budgets"):
        pick_default_budget([])


def test_static_baseline_matches_the_runtime_precision():
    from types import SimpleNamespace

    from gfnet_edge.calibrate.compare import static_int8

    assert static_int8(SimpleNamespace(static_int8=False), "int8-cpu") is True
    assert static_int8(SimpleNamespace(static_int8=False), "int8-tensorrt") is True
    assert static_int8(SimpleNamespace(static_int8=False), "fp32") is False
    assert static_int8(SimpleNamespace(static_int8=True), "fp32") is True
