"""The step latency calibrate records (``measure_steps``), and the p99 deadlines plan with, on a
fake runtime that advances a fake clock by a scripted time per call: a lone stall of the device
is timed out of a step's p99 (that step timed alone, within the time box), a consistent tail is
not, and a stall the time box leaves in place is reported. ``--latency-seconds`` is checked."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from gfnet_edge.calibrate.config import CalibrationConfig
from gfnet_edge.calibrate.latency import UNREACHABLE, measure_steps, stall_warning
from gfnet_edge.errors import InputError
from gfnet_edge.runtime.deadline import StepCosts, step_costs_entry

T = 3
FRAMES = np.zeros((4, 8, 8, 3), np.uint8)


class FakeClock:
    """Seconds that pass only when the fake runtime runs a call."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeRuntime:
    """``predict`` takes ``step_ms[k]`` (+-5 % uniform jitter) for the exit step ``k`` its
    thresholds force, ``slow(k, i)`` extra ms on step ``k``'s call ``i`` (0-based), and logs the
    ms of every call per step."""

    def __init__(self, clock: FakeClock, step_ms, slow=lambda k, i: 0.0, seed: int = 0, warm: float = 1.0) -> None:
        self.clock, self.step_ms, self.slow, self.warm = clock, step_ms, slow, warm
        self.rng = np.random.default_rng(seed)
        self.model = SimpleNamespace(steps=T)
        self.profiler = SimpleNamespace(enabled=False, reset=lambda: None, summary=lambda: {})
        self.thresholds = [0.5] * T
        self.log = [[] for _ in range(T)]
        self.calls = []  # the step of every call, in order

    def predict(self, frames, cropped=False):
        """``warm`` times faster right after a call of the same step (caches warm for it)."""
        k = sum(t == UNREACHABLE for t in self.thresholds)
        ms = self.step_ms[k] * self.rng.uniform(0.95, 1.05) + self.slow(k, len(self.log[k]))
        if self.calls and self.calls[-1] == k:
            ms *= self.warm
        self.log[k].append(ms)
        self.calls.append(k)
        self.clock.t += ms * len(frames) / 1e3


def _subsequence(part, whole) -> bool:
    """Whether ``part`` is ``whole`` with some values left out (equal to 1e-9, in order)."""
    it = iter(whole)
    return all(any(abs(v - w) <= 1e-9 * abs(w) for w in it) for v in part)


def _measure(step_ms, slow=lambda k, i: 0.0, seed=0, warm=1.0, **kw):
    clock = FakeClock()
    rt = FakeRuntime(clock, step_ms, slow, seed, warm)
    args = dict(repeats=60, warmup=0, warmup_ms=0.0, stage_calls=0, extend_to=60, extend_seconds=5.0)
    args.update(kw)
    lat = measure_steps(rt, FRAMES, clock=clock, timer=clock, **args)
    # no warm-up and no stage breakdown: the only untimed calls are one of step k - 1 before each
    # call of a step k timed alone (step T - 1 before step 0)
    for k in range(T):
        assert len(rt.log[k]) == len(lat.samples[k]) + lat.retimed[(k + 1) % T]
        assert _subsequence(lat.samples[k], rt.log[k])
        if not lat.retimed[(k + 1) % T]:
            np.testing.assert_allclose(lat.samples[k], rt.log[k], rtol=1e-9)
        assert lat.steps[k].p99_ms == pytest.approx(np.percentile(lat.samples[k], 99), rel=1e-9)
    return lat, rt


def _one_stall(k, i):
    return 6.0 if (k, i) == (1, 20) else 0.0  # step 1's 21st call: +6 ms on a 2 ms step


def test_a_lone_stall_is_timed_out_of_the_steps_p99():
    lat, rt = _measure((1.0, 2.0, 3.0), _one_stall)
    calm = np.delete(np.asarray(rt.log[1]), 20)
    # step 1 timed alone until its one stall lies beyond the p99: 101 calls, whose p99 (position
    # 0.99 * 100 = 100 in sorted order) is the slowest call that is not the stall
    assert [s.n for s in lat.steps] == [60, 101, 60] and lat.retimed == [0, 41, 0]
    assert lat.steps[1].p99_ms == pytest.approx(calm.max(), rel=1e-9)
    assert lat.steps[1].p99_ms < 1.1 * np.median(calm)
    assert lat.lone_stall_steps() == [] and stall_warning([lat], 5.0) is None

    # the same calls without timing the step again: the stall sets the p99
    plain, rt2 = _measure((1.0, 2.0, 3.0), _one_stall, retime_stalls=False)
    assert [s.n for s in plain.steps] == [60] * T and plain.retimed == [0] * T
    assert plain.steps[1].p99_ms > 1.5 * np.median(rt2.log[1])
    assert plain.lone_stall_steps() == [1]

    # the step costs deadlines plan with: step 1's p99 increment is no longer the stall
    costs = [StepCosts.from_manifest(step_costs_entry([x], "onnxruntime", "fp32", 1, "cpu")) for x in (lat, plain)]
    assert costs[0].step_ms[1] < 1.5 and costs[1].step_ms[1] > 3.0
    entry = step_costs_entry([lat], "onnxruntime", "fp32", 1, "cpu")["batches"][0]
    assert entry["step_calls"] == [60, 101, 60] and entry["retimed_calls"] == [0, 41, 0] and entry["calls"] == 60
    assert "p99 of 60-101 calls" in costs[0].basis


class FakeCheckedRuntime(FakeRuntime):
    """A runtime whose calls are also timed at the focus steps' checks (``time_steps``): a call
    running every step reaches the check before focus step k after ``split[k - 1]`` of its time."""

    split = (0.3, 0.65)

    def time_steps(self, frames, cropped=False, clock=None):
        t0 = self.clock.t
        self.predict(frames, cropped)
        ms = (self.clock.t - t0) * 1e3
        self.checked.append(ms / len(frames))
        return None, [ms * f for f in self.split] + [ms]


def test_the_full_models_calls_are_cut_at_the_step_checks():
    """Calls of step T - 1 go through ``time_steps`` when the runtime has it: every such call
    gives the focus steps' increments between checks (per image), and the step costs a deadline
    plans with come from them; a runtime without ``time_steps`` gives none (cumulative costs)."""
    clock = FakeClock()
    rt = FakeCheckedRuntime(clock, (1.0, 2.0, 3.0))
    rt.checked = []
    lat = measure_steps(rt, np.zeros((4, 8, 8, 3), np.uint8), batch=2, repeats=60, warmup=0, warmup_ms=0.0,
                        stage_calls=0, extend_to=100, extend_seconds=5.0, clock=clock, timer=clock)
    full = np.asarray(rt.checked)
    np.testing.assert_allclose(lat.samples[T - 1], full, rtol=1e-9)
    assert len(full) == lat.steps[T - 1].n == 100 and len(lat.increments) == T
    cuts = np.stack([full * 0.3, full * (0.65 - 0.3), full * (1 - 0.65)], 1)
    for k in range(T):
        assert lat.increments[k].p99_ms == pytest.approx(np.percentile(cuts[:, k], 99), rel=1e-9)
        assert lat.increments[k].mean_ms == pytest.approx(cuts[:, k].mean(), rel=1e-9)
    entry = step_costs_entry([lat], "onnxruntime", "fp32", 1, "cpu")
    assert entry["batches"][0]["increment_calls"] == 100
    costs = StepCosts.from_manifest(entry)
    assert costs.step_ms[1:] == pytest.approx([np.percentile(cuts[:, k], 99) for k in (1, 2)], rel=1e-9)
    plain, _ = _measure((1.0, 2.0, 3.0))
    assert plain.increments == [] and "increments" not in step_costs_entry([plain], "o", "fp32", 1, "cpu")["batches"][0]


@pytest.mark.parametrize("step", [0, 1, 2])
def test_each_call_of_a_step_timed_alone_follows_one_of_the_step_before_it(step):
    """As when the steps are interleaved (step T - 1 before step 0): a device whose caches favour
    a step called back to back (here 20 % faster) gives the step its interleaved cost, not the
    back-to-back one, so deadlines planned with it are not overrun."""
    stall = lambda k, i: 6.0 if (k, i) == (step, 20) else 0.0  # noqa: E731
    lat, rt = _measure((1.0, 2.0, 3.0), stall, warm=0.8)
    assert lat.retimed == [41 if k == step else 0 for k in range(T)]
    assert rt.calls[:60 * T] == list(range(T)) * 60  # interleaved, then pairs (step before, step)
    assert rt.calls[60 * T:] == [(step - 1) % T, step] * 41
    assert 0.95 <= min(lat.samples[step]) / (1.0, 2.0, 3.0)[step]
    assert lat.steps[step].p99_ms == pytest.approx(sorted(lat.samples[step])[-2], rel=1e-9)


def test_two_stalls_need_201_calls_and_interleaved_calls_follow_within_the_time_box():
    # 10 / 20 / 30 ms steps: 60 repetitions take 3.6 s of the 5 s box; step 1's two stalls need
    # 141 more calls of it alone, each after one of step 0 (4.2 s): the box ends first, and the
    # p99 is still theirs
    two = lambda k, i: 60.0 if (k, i) in ((1, 5), (1, 40)) else 0.0  # noqa: E731
    lat, rt = _measure((10.0, 20.0, 30.0), two, extend_to=300)
    spent = sum(map(sum, rt.log)) / 1e3
    assert spent <= 5.0 + 0.03 and lat.steps[0].n == 60 and lat.steps[1].n < 201
    assert lat.lone_stall_steps() == [1]
    warning = stall_warning([lat], 5.0)
    assert warning.count("\n") == 0 and f"2 of {lat.steps[1].n} calls" in warning and "step 1 at batch 1" in warning
    assert "--latency-seconds" in warning and "idle device" in warning

    # a longer box: 201 calls of step 1 (the p99 is the slowest calm call), then every step
    # interleaved, up to 300 calls or the end of the box
    lat, rt = _measure((10.0, 20.0, 30.0), two, extend_to=300, extend_seconds=12.0)
    extra = lat.steps[0].n - 60
    assert lat.retimed == [0, 141, 0] and extra > 0 and [s.n for s in lat.steps] == [60 + extra, 201 + extra, 60 + extra]
    assert sum(map(sum, rt.log)) / 1e3 <= 12.0 + 0.07
    calm = np.delete(np.asarray(rt.log[1]), [5, 40])
    assert lat.steps[1].p99_ms <= calm.max() * (1 + 1e-9) and lat.lone_stall_steps() == []


def test_stalls_in_two_steps_are_timed_out_earliest_step_first_as_the_time_box_allows():
    """Steps 1 and 2 with a lone stall each, and a 5.5 s box (60 repetitions: 3.7 s) with room for
    41 more calls of step 1 (with step 0's before them: 1.2 s) but not also for 41 of step 2
    (2.0 s): step 1's cost is freed (a deadline that stops
    before step 1 never runs step 2), step 2 keeps its stall and the warning names it alone."""
    both = lambda k, i: 60.0 if (k, i) in ((1, 20), (2, 30)) else 0.0  # noqa: E731
    lat, rt = _measure((10.0, 20.0, 30.0), both, extend_to=300, extend_seconds=5.5)
    assert lat.retimed[1] == 41 and lat.steps[1].n == 101 and 0 < lat.retimed[2] < 41
    assert sum(map(sum, rt.log)) / 1e3 <= 5.5 + 0.05
    assert lat.lone_stall_steps() == [2]
    warning = stall_warning([lat], 5.5)
    assert "step 2 at batch 1" in warning and "step 1 at" not in warning


def test_a_slow_model_whose_repeats_fill_the_time_box_keeps_its_stall_and_says_so():
    slow_stall = lambda k, i: 600.0 if (k, i) == (1, 20) else 0.0  # noqa: E731
    lat, _ = _measure((100.0, 200.0, 300.0), slow_stall, extend_to=300)  # 60 repetitions: 36 s
    assert [s.n for s in lat.steps] == [60] * T and lat.retimed == [0] * T
    assert lat.steps[1].p99_ms > 1.5 * lat.steps[1].p50_ms
    assert "1 of 60 calls" in stall_warning([lat], 5.0)
    lat, _ = _measure((100.0, 200.0, 300.0), slow_stall, extend_to=300, extend_seconds=50.0)
    assert lat.retimed == [0, 41, 0] and stall_warning([lat], 50.0) is None


@pytest.mark.parametrize("seed", range(8))
def test_a_consistent_five_percent_tail_stays_in_the_p99(seed):
    """Step 2 takes twice as long on 5 % of its calls (at random): however many calls the
    measurement takes, its p99 stays in the slow calls."""
    coin = np.random.default_rng(100 + seed).random(1000) < 0.05
    lat, rt = _measure((10.0, 20.0, 30.0), lambda k, i: 30.0 if k == 2 and coin[i] else 0.0, seed=seed,
                       extend_to=300, extend_seconds=60.0)
    log = np.asarray(rt.log[2])
    slow = log > 45.0
    assert 0.02 < slow.mean() < 0.09  # the tail is there, and more than 1 % of the calls
    assert lat.steps[2].p99_ms > 1.5 * np.median(log) and lat.steps[2].p99_ms >= np.min(log[slow])
    assert 2 not in lat.lone_stall_steps()


def test_every_twentieth_call_slow_is_a_tail_not_a_lone_stall():
    lat, rt = _measure((10.0, 20.0, 30.0), lambda k, i: 30.0 if k == 2 and i % 20 == 7 else 0.0)
    assert lat.retimed == [0, 0, 0] and lat.lone_stall_steps() == []
    assert lat.steps[2].p99_ms > np.sort(rt.log[2])[-4] and lat.steps[2].p99_ms > 1.5 * np.median(rt.log[2])


def test_no_retiming_without_extension():
    """The re-measurements during a calibration (``extend_to`` 0) take ``repeats`` calls only."""
    lat, _ = _measure((1.0, 2.0, 3.0), _one_stall, extend_to=0)
    assert [s.n for s in lat.steps] == [60] * T and lat.lone_stall_steps() == [1]


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_latency_seconds_must_be_a_finite_positive_number(value):
    with pytest.raises(InputError, match="--latency-seconds must be a finite number of seconds > 0"):
        CalibrationConfig(bundle="b", data="d", output="o", latency_seconds=value).validate()
    assert CalibrationConfig(bundle="b", data="d", output="o", latency_seconds=0.5).validate().latency_seconds == 0.5


@pytest.mark.parametrize("value", ["0", "-2", "nan", "inf", "five"])
def test_latency_seconds_option_refuses_bad_values(value, tmp_path, capsys):
    from gfnet_edge import cli

    out = tmp_path / "r"
    rc = cli.main(["calibrate", str(tmp_path / "no-bundle"), "--data", "demo", "-o", str(out),
                   "--latency-seconds", value])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.count("\n") == 1 and "--latency-seconds" in err and repr(value) in err
