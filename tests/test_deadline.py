"""Per-call deadlines (runtime/deadline.py): the loop stops before a step predicted to end late.

The cost model and the stop decisions are checked with a fake clock that advances by exactly
what the cost model predicts for each backbone run, so the steps where the loop must stop are
known in advance (computed here from the same rule, independently of the runtime). The host
place, the device place on the simulated GPU (plain launches and CUDA graphs) must agree, and
images stopped by the deadline must carry the trace's answer at the last step they ran.
"""
from __future__ import annotations


import numpy as np
import pytest

from gfnet_edge import ops
from gfnet_edge.errors import InputError
from gfnet_edge.runtime.deadline import STEP_COST_SOURCES, Deadline, StepCosts, StepTimes, step_costs_entry

COST = (1.0, 2.0, 3.0)  # per-image ms of the glance and the two focus steps (fake clock)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance_ms(self, ms):
        self.now += ms / 1e3


def test_step_costs_model():
    c = StepCosts.from_cumulative([1.0, 3.0, 6.0])
    assert c.step_ms == COST and c.steps == 3
    assert c.call_ms(2, 4) == 12.0  # batch 1 only: per-image cost times n
    two = StepCosts.from_cumulative([1.0, 3.0, 6.0], other=(9, [0.5, 1.0, 1.5]))
    assert two.call_ms(1, 1) == 2.0 and two.call_ms(1, 9) == 0.5 * 9 and two.call_ms(1, 20) == 0.5 * 20
    assert two.call_ms(1, 5) == pytest.approx((2.0 + 0.5 * (0.5 - 2.0)) * 5)  # per-image cost halfway
    for bad in (lambda: StepCosts(()), lambda: StepCosts((1.0, float("nan"))), lambda: StepCosts((1.0, -1.0)),
                lambda: StepCosts((1.0,), other=(1, (1.0,))), lambda: StepCosts((1.0, 2.0), other=(4, (1.0,)))):
        with pytest.raises(InputError):
            bad()
    clock = FakeClock()
    d = Deadline(5.0, c, margin=0.0, clock=clock)
    assert d.allows(1, 2) and not d.allows(1, 3)  # 4 ms fits in 5, 6 ms does not
    clock.advance_ms(2.5)
    assert d.allows(1, 1) and not d.allows(2, 1) and not d.allows(3, 1)  # no step 3
    assert not Deadline(5.0, c, margin=0.5, clock=clock, start=clock()).allows(1, 2)  # 4 * 1.5 > 5
    for kw in (dict(deadline_ms=0), dict(deadline_ms=float("inf")), dict(deadline_ms=1.0, margin=-0.1)):
        with pytest.raises(InputError):
            Deadline(costs=c, **kw)


@pytest.mark.parametrize("make, named, given", [
    (lambda: StepCosts(("1", 1, 1)), "step_ms[0] must be a number", "'1'"),
    (lambda: StepCosts((1.0, None)), "step_ms[1] must be a number", "None"),
    (lambda: StepCosts(((1.0, 2.0), 1.0)), "step_ms[0] must be a number", "(1.0, 2.0)"),
    (lambda: StepCosts((1.0, True, 1.0)), "step_ms[1] must be a number", "True"),
    (lambda: StepCosts((1.0, 10 ** 400)), "step_ms[1] must be a finite number", "beyond the float range"),
    (lambda: StepCosts("123"), "step_ms must be a sequence", "'123'"),
    (lambda: StepCosts(None), "step_ms must be a sequence", "None"),
    (lambda: StepCosts(5.0), "step_ms must be a sequence", "5.0"),
    (lambda: StepCosts(np.array(5.0)), "step_ms must be a sequence", "array(5.)"),  # iterating it: a TypeError
    (lambda: StepCosts((1.0, 1.0), other=(4, np.array(2.0))), "other's step_ms must be a sequence",
     "array(2.)"),
    (lambda: StepCosts((1.0, 1.0), batch="2"), "batch must be a positive int", "'2'"),
    (lambda: StepCosts((1.0, 1.0), batch=True), "batch must be a positive int", "True"),
    (lambda: StepCosts((1.0, 1.0), batch=None), "batch must be a positive int", "None"),
    (lambda: StepCosts((1.0, 1.0), other=5), "other must be None or (batch, ms of each step)", "5"),
    (lambda: StepCosts((1.0, 1.0), other=(4, ("x", 1.0))), "other's step_ms[0] must be a number", "'x'"),
    (lambda: StepCosts((1.0, -1.0)), "step costs must be finite and >= 0 ms", "step_ms [1.0, -1.0]"),
    (lambda: StepCosts((1.0, 1.0), other=(4, (1.0, -2.0))), "step costs must be finite and >= 0 ms",
     "other's step_ms [1.0, -2.0]"),  # the costs that hold the bad value
    (lambda: StepCosts((1.0, 1.0), other=(None, (1.0, 1.0))), "other's batch must be a positive int", "None"),
    (lambda: StepCosts.from_cumulative(["1", 2]), "cumulative_ms[0] must be a number", "'1'"),
    (lambda: StepCosts.from_cumulative(np.array(3.0)), "cumulative_ms must be a sequence", "array(3.)"),
    (lambda: StepCosts.from_cumulative([1, 2], other=[3]), "other must be None or (batch, ms of each step)", "[3]"),
])
def test_step_costs_refuse_what_is_not_numbers_as_input_errors(make, named, given):
    """Any bad argument of StepCosts is an InputError whose one line names the argument and what
    was given (as for deadline_ms), not a TypeError from comparing it."""
    with pytest.raises(InputError) as e:
        make()
    msg = str(e.value)
    assert msg.startswith(named) and msg.endswith(given) and "\n" not in msg


def test_step_costs_keep_numbers_of_any_real_type_as_floats():
    c = StepCosts(np.array([1, 2.5], np.float32), batch=np.int64(2), other=[4, [1, 2]])
    assert c.step_ms == (1.0, 2.5) and c.batch == 2 and c.other == (4, (1.0, 2.0))
    assert all(type(v) is float for v in c.step_ms + c.other[1]) and type(c.batch) is int


def test_step_costs_from_a_manifest_entry():
    class Lat:
        def __init__(self, batch, cum, tail, p95=None, calls=300):
            self.batch = batch
            self.steps = [type("S", (), {"n": calls, "to_dict": (lambda s, m=m, p=p, q=q: {
                "mean_ms": m, "p50_ms": m, "p95_ms": q, "p99_ms": p})})()
                for m, p, q in zip(cum, tail, p95 or tail)]

    entry = step_costs_entry([Lat(1, [1.0, 3.0, 6.0], [1.5, 3.0, 7.0]), Lat(8, [0.4, 1.0, 1.6], [0.5, 1.2, 2.0])],
                             "onnxruntime", "fp32", 1, "cpu")
    c = StepCosts.from_manifest(entry)
    assert c.step_ms == (1.5, 2.0, 4.0) and c.other == (8, (0.5, 0.7, 0.8))  # step 1: the mean's increment
    assert "p99 of 300 calls at batch 1" in c.basis and entry["batches"][0]["calls"] == 300
    few = step_costs_entry([Lat(1, [1.0, 3.0, 6.0], [1.5, 9.0, 10.0], p95=[1.2, 3.6, 6.8], calls=60)],
                           "onnxruntime", "fp32", 1, "cpu")
    c = StepCosts.from_manifest(few)  # the p99 whatever the count; another percentile when asked
    assert c.step_ms == pytest.approx((1.5, 7.5, 3.0)) and "p99 of 60 calls at batch 1" in c.basis
    assert StepCosts.from_manifest(few, stat="p95_ms").step_ms == pytest.approx((1.2, 2.4, 3.2))
    del few["batches"][0]["calls"]  # an entry that does not record its count reads as before
    assert StepCosts.from_manifest(few).step_ms == pytest.approx((1.5, 7.5, 3.0))
    # a slow outlier among the calls exiting at step 1 puts its p99 above step 2's (as measured on a
    # shared 2-core VM): step 2 costs at least its mean increment, not 0
    entry = step_costs_entry([Lat(1, [0.7, 1.4, 2.0], [0.8, 3.2, 2.3])], "onnxruntime", "fp32", 1, "cpu")
    c = StepCosts.from_manifest(entry)
    assert c.step_ms == pytest.approx((0.8, 2.4, 0.6))
    clock = FakeClock()
    d = Deadline(10.0, c, clock=clock)
    clock.advance_ms(9.9)
    assert not d.allows(2, 1)  # 0.6 ms left is needed, 0.1 ms is
    with pytest.raises(InputError, match="malformed"):
        StepCosts.from_manifest({"batches": [{"batch": 1}]})


def expected_stops(exit_free, deadline_ms, cost=COST, margin=0.0):
    """The steps each image ends at under the rule 'run step k for the n images still running
    only if now + cost[k] * n * (1 + margin) <= deadline', the clock advancing by cost[k] * n per
    run: (exit step, stopped) per image, given the exit steps without a deadline."""
    exit_free = np.asarray(exit_free)
    n_all, T = len(exit_free), len(cost)
    now = cost[0] * n_all
    exit_step, stopped = exit_free.copy(), np.zeros(n_all, bool)
    for k in range(1, T):
        running = np.flatnonzero(exit_free >= k)
        if running.size == 0:
            break
        need = cost[k] * running.size * (1 + margin)
        if now + need > deadline_ms:
            exit_step[running], stopped[running] = k - 1, True
            break
        now += need / (1 + margin)
    return exit_step, stopped


@pytest.fixture(scope="module")
def demo(demo_onnx_bundle):
    return demo_onnx_bundle


class _Timed:
    """Wraps a runner: each backbone run advances the fake clock by the cost model's time."""

    def __init__(self, runner, clock, device=False):
        self.runner, self.clock, self.device, self.step = runner, clock, device, 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def run(self, graph, x):
        self._tick(graph, x.shape[0])
        return self.runner.run(graph, x)

    def run_device(self, graph, image, batch, stream):
        self._tick(graph, batch)
        return self.runner.run_device(graph, image, batch, stream)

    def _tick(self, graph, n):
        self.step = 0 if graph == "glance" else self.step + 1
        self.clock.advance_ms(COST[self.step] * n)


def _host_driver(bundle, clock):
    from gfnet_edge.runtime.backends.onnxruntime import OnnxRuntimeRunner
    from gfnet_edge.runtime.driver import Driver
    from gfnet_edge.runtime.heads import HeadSet, load_head_arrays
    from gfnet_edge.runtime.profile import Profiler

    runner = OnnxRuntimeRunner(bundle.graph_paths("fp32"), "fp32", 1).activate()
    heads = HeadSet(load_head_arrays(bundle.heads_path), bundle.model)
    return Driver(bundle.model, _Timed(runner, clock), heads, Profiler(False)), runner, heads


def test_the_loop_stops_exactly_where_the_cost_model_says(demo):
    from probs import gap_thresholds
    from sim_device import demo_test_images

    clock = FakeClock()
    driver, runner, _ = _host_driver(demo, clock)
    x = demo_test_images(demo.model, 6)
    g = ops.glance(x, demo.model.patch_size, demo.model.glance_interpolation)
    tr = driver.run(x, g, None)
    thr = gap_thresholds(tr.probs)
    free = driver.run(x, g, thr)
    assert len(set(free.exit_step.tolist())) == 3, free.exit_step  # exits at every step
    costs = StepCosts(COST)
    stops_seen = set()
    for deadline_ms in (6.5, 7.5, 14.5, 9.5, 20.5, 13.5, 100.0):  # no decision on a boundary
        d = Deadline(deadline_ms, costs, clock=clock)
        got = driver.run(x, g, thr, d)
        want_exit, want_stopped = expected_stops(free.exit_step, deadline_ms)
        np.testing.assert_array_equal(got.exit_step, want_exit, err_msg=f"deadline {deadline_ms}")
        np.testing.assert_array_equal(got.stopped, want_stopped, err_msg=f"deadline {deadline_ms}")
        # a stopped image answers with the trace's class at the last step it ran
        cls = tr.probs.argmax(axis=2)[got.exit_step, np.arange(len(x))]
        np.testing.assert_array_equal(got.prediction, cls)
        for i in np.flatnonzero(got.stopped):
            assert (got.coords[got.exit_step[i]:, i] == -1).all()
            np.testing.assert_array_equal(got.coords[:got.exit_step[i], i], free.coords[:got.exit_step[i], i])
        # each decision counted the images still running
        for step, n, need, _left in d.decisions:
            assert n == int((free.exit_step >= step).sum()) and need == COST[step] * n
        stops_seen.add(tuple(np.unique(got.exit_step[got.stopped]).tolist()))
    assert {(0,), (1,), ()} <= stops_seen
    with pytest.raises(InputError, match="not to a trace"):
        driver.run(x, g, None, Deadline(5.0, costs, clock=clock))
    with pytest.raises(InputError, match="steps"):
        driver.run(x, g, thr, Deadline(5.0, StepCosts((1.0, 2.0)), clock=clock))
    runner.deactivate()


@pytest.mark.parametrize("graphs", [False, True])
def test_device_place_stops_like_the_host_place(demo, monkeypatch, graphs):
    """The same deadlines on the simulated GPU (plain launches, or CUDA graphs) give the host
    place's exits, stops and answers."""
    from probs import gap_thresholds
    from sim_device import SimCapture, SimHeads, SimMemory, demo_test_images, sim_ops

    from gfnet_edge.runtime.backends.base import Runner
    from gfnet_edge.runtime.driver import Driver
    from gfnet_edge.runtime.profile import Profiler

    clock = FakeClock()
    host, runner, cpu_heads = _host_driver(demo, clock)
    x = demo_test_images(demo.model, 6)
    P = demo.model.patch_size
    g = ops.glance(x, P, demo.model.glance_interpolation)
    thr = gap_thresholds(host.run(x, g, None).probs)
    mem = SimMemory()
    sim_ops(monkeypatch, mem, asynchronous=True)

    class SimRunner(Runner):
        name, supports_device = "sim", True

        def __init__(self):
            super().__init__("fp32")
            self.out = {}

        def _activate(self):
            pass

        def graph_capture(self, stream):
            return SimCapture(mem, stream=stream) if graphs else None

        def _run_device(self, graph, image, batch, stream):
            key = (graph, batch)
            if key not in self.out:
                dry = runner.run(graph, np.zeros((batch, 3, P, P), np.float32))
                self.out[key] = {k: (mem.alloc(a.nbytes), a.shape) for k, a in dry.items()}
            outs = self.out[key]

            def work():
                xs = np.array(mem.view(image, (batch, 3, P, P), np.float32))
                for k, a in runner.run(graph, xs).items():
                    mem.view(outs[k][0], a.shape, np.float32)[:] = a
            mem.launch(stream, work)
            return dict(outs)

    dev = Driver(demo.model, SimRunner().activate(), SimHeads(cpu_heads, mem), Profiler(False), cuda_graphs=graphs)
    assert dev.on_device and (dev.place.graphs is not None) == graphs
    # the clock advances per step by the cost of the images still running (a replayed graph does
    # not call the runner, so the time is charged where the driver runs each step)
    make_steps = dev.place.steps

    class TimedSteps:
        def __init__(self, steps, n):
            self.steps, self.n = steps, n

        def __getattr__(self, name):
            return getattr(self.steps, name)

        def backbone(self, graph, x):
            step, n = (0, self.n) if graph == "glance" else self.steps.running()
            clock.advance_ms(COST[step] * n)
            return self.steps.backbone(graph, x)

    monkeypatch.setattr(dev.place, "steps", lambda images, n, thr, glance=None: TimedSteps(
        make_steps(images, n, thr, glance=glance), n))
    for deadline_ms in (6.5, 9.5, 13.5, 20.5, 100.0):
        a = host.run(x, g, thr, Deadline(deadline_ms, StepCosts(COST), clock=clock))
        b = dev.run(x, g, thr, Deadline(deadline_ms, StepCosts(COST), clock=clock))
        for f in ("prediction", "exit_step", "coords", "stopped"):
            np.testing.assert_array_equal(getattr(b, f), getattr(a, f), err_msg=f"{f}, deadline {deadline_ms}")
    runner.deactivate()


def test_runtime_predict_with_a_deadline(demo):
    """Through the API on the real clock: a deadline shorter than anything stops every image
    still running after the glance; a generous one stops none; no step costs is a clear error."""
    from gfnet_edge.runtime import Runtime
    from sim_device import demo_test_images

    x = demo_test_images(demo.model, 8)
    with Runtime(demo, backend="onnxruntime", precision="fp32", threads=1) as rt:
        with pytest.raises(InputError, match="gfnet-edge calibrate") as info:
            rt.predict(x, deadline_ms=5.0)
        import re
        import shlex

        from gfnet_edge.cli import build_parser

        # the command it names is one calibrate takes, for this runtime's backend and graphs
        named = shlex.split(re.search(r"`gfnet-edge (calibrate [^`]+)`", str(info.value)).group(1))
        args = build_parser().parse_args([a.replace("IMAGES", "imgs").replace("REPORT", "rep") for a in named])
        assert (args.backend, args.precision, args.data, args.output) == ("onnxruntime", "fp32", "imgs", "rep"), args
        for bad in ("5", True, -1.0):  # a bad deadline is named before the missing step costs
            with pytest.raises(InputError, match="deadline_ms must be a"):
                rt.predict(x, deadline_ms=bad)
        assert rt.predict(x).deadline_stopped is None
        with pytest.raises(InputError, match="each of the 3 steps"):
            rt.set_step_costs([1.0, 2.0])
        for bad in ("123", 5.0, np.array(5.0), [1.0, "x", 2.0], ["1", "2", "3"], [True, 1, 1], [1.0, None, 1.0]):
            with pytest.raises(InputError, match="one number of ms per step"):
                rt.set_step_costs(bad)
        rt.set_step_costs([0.5, 1.0, 1.0])
        free = rt.predict(x, budget=None)
        tight = rt.predict(x, deadline_ms=1e-3)
        assert (tight.exit_step == 0).all() and (tight.deadline_stopped == (free.exit_step > 0)).all()
        loose = rt.predict(x, deadline_ms=1e6)
        assert not loose.deadline_stopped.any()
        np.testing.assert_array_equal(loose.exit_step, free.exit_step)
        assert "deadline_stopped" in tight[0]
        with pytest.raises(InputError, match="deadline_ms"):
            rt.predict(x, deadline_ms=-1)
        for kw in (dict(deadline_ms="5"), dict(deadline_ms=True), dict(deadline_ms=5.0, deadline_margin="0.1")):
            with pytest.raises(InputError, match=f"{'deadline_margin' if 'deadline_margin' in kw else 'deadline_ms'} "
                                                 "must be a number"):
                rt.predict(x, **kw)
            with pytest.raises(InputError, match="must be a number"):
                rt.predict_iter([x[0]], **kw)


def test_a_deadline_counts_the_wait_for_another_threads_call(demo):
    """A Runtime shared by threads serialises its calls: a call that waits for another thread's
    call has that much less time, so one whose deadline passed while it waited runs the glance
    only."""
    import threading
    import time

    from gfnet_edge.runtime import Runtime
    from sim_device import demo_test_images

    x = demo_test_images(demo.model, 8)
    with Runtime(demo, backend="onnxruntime", precision="fp32", threads=1) as rt:
        rt.set_step_costs([0.5, 1.0, 1.0])
        free = rt.predict(x)
        assert (free.exit_step > 0).any()
        held, release = threading.Event(), threading.Event()

        def other_call():  # holds the Runtime as a long call of another thread would
            with rt._lock:
                held.set()
                release.wait(10)

        other = threading.Thread(target=other_call)
        other.start()
        held.wait(10)
        threading.Timer(0.2, release.set).start()
        t0 = time.perf_counter()
        waited = rt.predict(x, deadline_ms=100.0)
        assert time.perf_counter() - t0 >= 0.2
        other.join()
        assert (waited.exit_step == 0).all() and (waited.deadline_stopped == (free.exit_step > 0)).all()


def test_manifest_step_costs_are_checked_on_load():
    from gfnet_edge.manifest_schema import ManifestError, check_manifest

    class Lat:
        def __init__(self, batch, cum):
            self.batch = batch
            self.steps = [type("S", (), {"n": 60, "to_dict": (lambda s, c=c: {"mean_ms": c, "p50_ms": c, "p95_ms": c,
                                                                             "p99_ms": c})})() for c in cum]

    good = step_costs_entry([Lat(1, [1.0, 2.0, 3.0])], "onnxruntime", "fp32", 1, "cpu")
    base = {"model": {"model_name": "m", "family": "custom", "image_size": 64, "patch_size": 32, "steps": 3,
                      "num_classes": 10, "crop_pct": 1.0, "dataset_interpolation": "bilinear",
                      "glance_interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
                      "classifier": "gru", "step0": "classifier"},
            "artifacts": {"heads.npz": {"sha256": "0" * 64}, "g.onnx": {"sha256": "1" * 64},
                          "f.onnx": {"sha256": "2" * 64}},
            "heads": "heads.npz", "graphs": {"fp32": {"glance": "g.onnx", "focus": "f.onnx"}}}
    check_manifest(dict(base, step_costs={"onnxruntime/fp32": good}))
    bad = dict(good, batches=[{"batch": 1, "cumulative": {"mean_ms": [1.0, 2.0], "p99_ms": [1.0, 2.0, 3.0]}}])
    with pytest.raises(ManifestError, match=r"step_costs.onnxruntime/fp32.batches\[0\].cumulative.mean_ms"):
        check_manifest(dict(base, step_costs={"onnxruntime/fp32": bad}))
    nan = dict(good, batches=[{"batch": 1, "cumulative": {"mean_ms": [1.0, float("nan"), 3.0],
                                                           "p99_ms": [1.0, 2.0, 3.0]}}])
    with pytest.raises(ManifestError, match="finite"):
        check_manifest(dict(base, step_costs={"onnxruntime/fp32": nan}))
    short95 = dict(good, batches=[dict(good["batches"][0], cumulative=dict(good["batches"][0]["cumulative"],
                                                                            p95_ms=[1.0, 2.0]))])
    with pytest.raises(ManifestError, match=r"cumulative.p95_ms"):  # the stat planned with when few calls were timed
        check_manifest(dict(base, step_costs={"onnxruntime/fp32": short95}))
    for calls in (0, "60"):
        with pytest.raises(ManifestError, match="calls"):
            check_manifest(dict(base, step_costs={"onnxruntime/fp32": dict(good, batches=[
                dict(good["batches"][0], calls=calls)])}))
    inc = dict(good["batches"][0], increments={"mean_ms": [1.0, 1.0, 1.0], "p99_ms": [1.2, 1.1, 1.3]},
               increment_calls=60)
    check_manifest(dict(base, step_costs={"onnxruntime/fp32": dict(good, batches=[inc])}))
    for broken, where in (({"mean_ms": [1.0, 1.0], "p99_ms": [1.2, 1.1, 1.3]}, r"increments.mean_ms"),
                          ({"mean_ms": [1.0, 1.0, 1.0], "p99_ms": [1.2, float("inf"), 1.3]}, "finite"),
                          ({"mean_ms": [1.0, 1.0, 1.0]}, "p99_ms")):
        with pytest.raises(ManifestError, match=where):
            check_manifest(dict(base, step_costs={"onnxruntime/fp32": dict(good, batches=[
                dict(inc, increments=broken)])}))


def test_focus_steps_plan_with_their_time_from_one_step_check_to_the_next():
    """With ``increments`` (calibrate times them at the step checks) a focus step costs their
    p99, never below their mean; step 0 (the glance, which always runs) and entries without
    increments plan with the cumulative latency's increments as before."""
    block = {"batch": 1, "calls": 300, "cumulative": {"mean_ms": [1.0, 2.0, 3.0], "p99_ms": [1.4, 2.3, 3.5]},
             "increments": {"mean_ms": [1.1, 1.0, 1.0], "p99_ms": [1.5, 1.3, 0.9]}}
    c = StepCosts.from_manifest({"batches": [block]})
    assert c.step_ms == pytest.approx((1.4, 1.3, 1.0)) and "from the check before each one to the next check" in c.basis
    old = {k: v for k, v in block.items() if k != "increments"}
    c = StepCosts.from_manifest({"batches": [old]})
    assert c.step_ms == pytest.approx((1.4, 1.0, 1.2)) and "check" not in c.basis
    with pytest.raises(InputError, match="malformed"):
        StepCosts.from_manifest({"batches": [dict(block, increments={"mean_ms": [1.0, 1.0], "p99_ms": [1.0, 1.0]})]})


def test_time_steps_reads_the_clock_at_each_focus_steps_check_and_at_the_end(demo):
    """Runtime.time_steps answers as predict does, reading the clock at the start, at each focus
    step's check and at the end (a clock that ticks a second per read): T - 1 checks when every
    image runs every step, none when every image exits at the glance."""
    from gfnet_edge.runtime import Runtime
    from sim_device import demo_test_images

    x = demo_test_images(demo.model, 8)

    def ticking():
        n = iter(range(10 ** 6))
        return lambda: float(next(n))

    with Runtime(demo, backend="onnxruntime", precision="fp32", threads=1) as rt:
        T = rt.model.steps
        free = rt.predict(x)
        pred, _ = rt.time_steps(x)
        for f in ("classes", "exit_step", "confidence"):
            np.testing.assert_array_equal(getattr(pred, f), getattr(free, f))
        rt.thresholds = [2.0] * (T - 1) + [-1e8]  # every image runs every step
        pred, marks = rt.time_steps(x, clock=ticking())
        assert marks == [1000.0 * k for k in range(1, T + 1)]
        assert (pred.exit_step == T - 1).all() and not pred.deadline_stopped.any()
        rt.thresholds = [-1e8] * T  # every image exits at the glance
        pred, marks = rt.time_steps(x, clock=ticking())
        assert marks == [1000.0] and (pred.exit_step == 0).all()


def test_every_step_cost_source_has_words_for_reports():
    """Each place that makes step costs names a source that :data:`STEP_COST_SOURCES` puts in words,
    and :meth:`StepCosts.describe` gives them, with what the figures are where that is known."""
    from gfnet_edge.runtime.api import Runtime

    class Rt:  # set_step_costs needs the model's steps and the open check only
        model = type("M", (), {"steps": 2})()

        def _check_open(self) -> None:
            pass

    rt = Rt()
    Runtime.set_step_costs(rt, [1.0, 2.0])
    block = {"batch": 1, "step_calls": [60, 80], "cumulative": {"mean_ms": [1.0, 2.0], "p99_ms": [1.5, 2.5]}}
    made = [StepCosts((1.0,)), rt.step_costs, StepTimes(2).costs,
            StepCosts.from_manifest({"batches": [block]}),
            StepCosts.from_manifest(step_costs_entry([], "onnxruntime", "fp32", 1, "cpu") | {"batches": [block]})]
    for c in made:
        assert c.source in STEP_COST_SOURCES and c.describe().startswith(STEP_COST_SOURCES[c.source])
    assert made[-1].describe() == (STEP_COST_SOURCES["gfnet-edge calibrate"] +
                                   " (per step, the p99 of 60-80 calls at batch 1)")
    # a manifest entry from elsewhere shows the source it records
    other = StepCosts.from_manifest({"source": "bench/deadlines.py", "batches": [block]})
    assert other.describe().startswith("step costs from bench/deadlines.py (")
