"""Batch-1 runs of the captured device loop on CUDA conditional graph nodes
(runtime/graph_loop.py, csrc/cuda/loop_graph.cu, csrc/common/exit_rule.h).

CPU: the device exit rule's host build against the Python loop's rule (ties at the threshold,
NaN), the exit step and the result block against ExitBook, which path a mode and a machine
give and why, and the whole batch-1 path on the simulated device (tests/sim_device.py) with
the loop graph replaced by a simulation that runs the captured focus steps and the bound host
exit step. GPU (skipped without one, saying why): the loop graph's device exit kernel against
the host exit step (the batch-1 runs of real models against the per-step captured loop and ONNX
Runtime are in test_device_loop.py, beside its other GPU parity tests).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from gfnet_edge import ops
from gfnet_edge.errors import InputError
from gfnet_edge.ops import cuda_loop
from gfnet_edge.runtime.graph_loop import ENV_VAR, ConditionalMode, LoopResult, decide, mode_from_env
from gfnet_edge.runtime.types import ExitBook
from probs import exits_mid_loop, gap_thresholds
from sim_device import SimCapture, SimHeads, SimMemory, demo_test_images, sim_ops
from test_device_loop import _GraphSimRunner, _images, _sim_reference, demo_bundle  # noqa: F401

HAVE_GPU = ops.has_cuda_build() and ops.cuda_device_count() > 0
GPU_REASON = ("gfnet_edge._C built without CUDA" if not ops.has_cuda_build()
              else f"no usable CUDA device ({ops.cuda_device_error()})")
F32 = np.float32


def _python_exits(maxprob: np.ndarray, threshold: float) -> np.ndarray:
    """The Python loop's rule, through ExitBook.exits: True where an image exits."""
    keep = ExitBook(maxprob.size, 2).exits(0, maxprob, F32(threshold))
    done = np.ones(maxprob.size, bool) if keep is not None else np.zeros(maxprob.size, bool)
    if keep is not None:
        done[keep] = False
    return done


# ------------------------------------------------------------------ CPU: the exit rule
def test_device_exit_rule_equals_the_python_rule_on_edge_cases():
    nan, inf = F32(np.nan), F32(np.inf)
    for thr in (0.5, 0.0, 1.0, 0.9999, 1e-45, nan, inf, -inf, -0.0):
        t = F32(thr)
        near = [t, np.nextafter(t, F32(-1)), np.nextafter(t, F32(2))] if np.isfinite(t) else []
        mp = np.array(near + [0.0, -0.0, 0.5, 1.0, nan, inf, -inf, 1e-45, 0.3333333], F32)
        got = cuda_loop.exits_at(mp, t)
        np.testing.assert_array_equal(got, _python_exits(mp, t), err_msg=f"threshold {thr}")
        if np.isfinite(t):  # a tie exits, one ulp below does not
            assert got[0] and not got[1] and got[2]
        assert not got[len(near) + 4]  # a NaN probability never exits
    assert not cuda_loop.exits_at(np.array([0.0, 1.0, inf], F32), nan).any()


def _host_chain(blocks: np.ndarray, thr: np.ndarray, result: np.ndarray) -> int:
    """Runs the bound exit step over the steps' blocks as the loop graph does; steps run."""
    T = thr.size
    for t in range(T):
        if not cuda_loop.loop_exit_step(np.ascontiguousarray(blocks[t]), thr, result, t, T):
            return t + 1
    raise AssertionError("the last step must end the run")


def _blocks(rng, T, thr):
    """Random step blocks: max probabilities below, at and above the thresholds, or NaN."""
    mp = rng.uniform(0.05, 1.0, T).astype(F32)
    for t in range(T):
        mp[t] = rng.choice([mp[t], thr[t], np.nextafter(thr[t], F32(0)), F32(np.nan)], p=[0.55, 0.2, 0.15, 0.1])
    b = np.zeros((T, ops.cuda_loop.STEP_BLOCK_WORDS), np.int32)
    b[:, 0] = mp.view(np.int32)
    b[:, 1] = rng.integers(0, 1000, T)
    b[:, 2:4] = rng.integers(0, 97, (T, 2))
    return b


def test_exit_step_and_result_block_equal_the_exit_book():
    rng = np.random.default_rng(0)
    for trial in range(300):
        T = int(rng.integers(2, 7))
        thr = rng.uniform(0.2, 1.0, T).astype(F32)
        blocks = _blocks(rng, T, thr)
        words = np.full(cuda_loop.loop_result_words(T), -777, np.int32)  # garbage of an earlier run
        ran = _host_chain(blocks, thr, words)
        ref = ExitBook(1, T)  # the per-step loop's bookkeeping on the same blocks
        for t in range(T):
            mp = blocks[t, :1].view(F32)
            ref.record(t, mp, blocks[t, 1:2], blocks[t, 2:4].reshape(1, 2))
            if t == T - 1:
                break
            keep = ref.exits(t, mp, thr[t])
            if keep is not None and keep.size == 0:
                break
        got = ExitBook(1, T)
        LoopResult.decode(words, T).record(got)
        assert ran == int(ref.exit_step[0]) + 1, trial
        for f in ("prediction", "confidence", "exit_step", "coords"):
            np.testing.assert_array_equal(getattr(got, f), getattr(ref, f), err_msg=f"{f}, trial {trial}")

    # an error flag ends the run at its step; the host raises like the per-step loop
    T, thr = 4, np.zeros(4, F32)
    blocks = _blocks(rng, T, np.full(4, 2.0, F32))  # nothing exits
    blocks[:, 0] = F32(0.5).view(np.int32)
    thr[:] = 0.9
    blocks[2, 4] = 1
    words = np.zeros(cuda_loop.loop_result_words(T), np.int32)
    assert _host_chain(blocks, thr, words) == 3
    res = LoopResult.decode(words, T)
    assert res.flag_step == 2 and res.exit_step == 2 and (res.coords[2] == -1).all()
    with pytest.raises(RuntimeError, match="step 2: a patch coordinate"):
        res.record(ExitBook(1, T))


@pytest.mark.parametrize("args,exc,match", [
    (dict(t=4), ValueError, r"t must lie in \[0, 3\]"),
    (dict(stats=np.zeros(4, np.int32)), ValueError, "stats must hold 5"),
    (dict(stats=np.zeros(5, F32)), TypeError, "stats must have dtype int32"),
    (dict(thresholds=np.zeros(3, F32)), ValueError, "thresholds must hold"),
    (dict(result=np.zeros(9, np.int32)), ValueError, "result must hold 10"),
    (dict(steps=0), ValueError, "steps must be positive"),
])
def test_exit_step_rejects_bad_arguments(args, exc, match):
    kw = dict(stats=np.zeros(5, np.int32), thresholds=np.zeros(4, F32), result=np.zeros(10, np.int32), t=0, steps=4)
    kw.update(args)
    with pytest.raises(exc, match=match):
        cuda_loop.loop_exit_step(**kw)
    with pytest.raises(ValueError, match="int32"):
        LoopResult.decode(np.zeros(10, F32), 4)


# ------------------------------------------------------------- CPU: which path, and why
def test_mode_and_decision():
    P = ConditionalMode.parse
    assert [P(v) for v in (True, "on", "1", "TRUE", " On ")] == [ConditionalMode.ON] * 5
    assert [P(v) for v in (False, "off", "0", "false")] == [ConditionalMode.OFF] * 4
    assert P("auto") is ConditionalMode.AUTO and mode_from_env({}) is ConditionalMode.AUTO
    assert mode_from_env({ENV_VAR: "0"}) is ConditionalMode.OFF
    for bad in ("yes", "", "2"):
        with pytest.raises(InputError, match=f"{ENV_VAR} must be auto, on \\(1\\) or off \\(0\\), got"):
            mode_from_env({ENV_VAR: bad})

    def never():
        raise AssertionError("the support is not probed when the mode is off")

    assert decide(ConditionalMode.OFF, never) == decide(ConditionalMode.OFF, never)
    assert not decide(ConditionalMode.OFF, never).use and "off" in decide(ConditionalMode.OFF, never).reason
    old = cuda_loop.ConditionalSupport(True, 12030, 12080, "the driver supports CUDA 12.3; conditional graph "
                                                          "nodes need 12.4 or newer")
    for mode in (ConditionalMode.AUTO, ConditionalMode.ON):
        d = decide(mode, lambda: old)
        assert not d.use and d.reason == old.error
        assert decide(mode, lambda: cuda_loop.ConditionalSupport(True, 12040, 12040, "")).use
    here = cuda_loop.conditional_support()
    assert here.usable == (here.error == "") and here.compiled == ops.has_cuda_build()
    if not HAVE_GPU:
        assert not here.usable and ("CUDA device" in here.error or "without CUDA" in here.error), here


# --------------------------------------------- CPU: the batch-1 path on the simulated device
class _KeepingSimCapture(SimCapture):
    """Simulated capture whose replays carry their graph (as NativeCapture's and torch's with
    keep_graph do): the replay itself, whose recorded work the simulated loop graph runs."""

    def capture(self, fn):
        replay = super().capture(fn)
        replay.cuda_graph = replay
        return replay


class _KeepingRunner(_GraphSimRunner):
    def graph_capture(self, stream):
        self.capturer = _KeepingSimCapture(self.mem, stream=stream, fail=self.fail)
        return self.capturer


def _sim_loop_graph(mem, log):
    """CudaLoopGraph on the simulated device: one piece of stream work that runs each focus
    step graph's recorded work and the bound host exit step on the device buffers."""

    class SimLoopGraph:
        def __init__(self, focus, stats, thresholds, result):
            if log.get("fail"):
                raise RuntimeError("cudaErrorNotSupported: simulated instantiation failure")
            self.focus, self.T = list(focus), len(focus) + 1
            self.ptrs = (ops.device_pointer(stats), ops.device_pointer(thresholds), ops.device_pointer(result))
            log["builds"] = log.get("builds", 0) + 1

        def launch(self, stream):
            s, th, r = self.ptrs
            T = self.T

            def work():
                for t in range(T):
                    if t > 0:
                        for fn in self.focus[t - 1].ops:
                            fn()
                    stats = mem.view(s, (cuda_loop.STEP_BLOCK_WORDS,), np.int32)
                    if not cuda_loop.loop_exit_step(stats, mem.view(th, (T,), F32),
                                                    mem.view(r, (cuda_loop.loop_result_words(T),), np.int32), t, T):
                        break
            mem.launch(stream, work)
            log["launches"] = log.get("launches", 0) + 1

    return SimLoopGraph


class _Deadline:
    """A deadline stand-in: ``allows`` answers ``answer`` and records what it was asked."""

    def __init__(self, T, answer):
        self.costs, self.answer, self.asked = SimpleNamespace(steps=T), answer, []

    def allows(self, step, n):  # as Deadline.allows: no decision recorded past the last step
        if step >= self.costs.steps:
            return False
        self.asked.append((step, n))
        return self.answer


@pytest.mark.parametrize("kind", ["cascaded-demo", pytest.param("gru-resnet-like", marks=pytest.mark.slow)])
def test_batch1_loop_graph_equals_the_per_step_loop_on_simulated_device(tmp_path_factory, monkeypatch, request,
                                                                         caplog, kind):
    """Every image alone through the loop graph (exit tests in the graph, one read per run)
    gives the host loop's answers; a new budget reuses the graph; off, a deadline, a build
    failure or a capture that keeps no graphs go step by step with the same answers."""
    from gfnet_edge.runtime.driver import Driver
    from gfnet_edge.runtime.profile import Profiler

    bundle, model, T, Pz, host, cpu_heads, ref = _sim_reference(kind, request, tmp_path_factory)
    mem = SimMemory()
    sim = sim_ops(monkeypatch, mem, asynchronous=True)
    log = {}
    monkeypatch.setattr(cuda_loop, "conditional_support", lambda: cuda_loop.ConditionalSupport(True, 12040, 12040, ""))
    monkeypatch.setattr(cuda_loop, "CudaLoopGraph", _sim_loop_graph(mem, log))
    monkeypatch.delenv(ENV_VAR, raising=False)
    heads = SimHeads(cpu_heads, mem)

    def driver(runner_cls=_KeepingRunner, env=None):
        if env is None:
            monkeypatch.delenv(ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(ENV_VAR, env)
        return Driver(model, runner_cls(host, mem, Pz).activate(), heads, Profiler(False))

    x = demo_test_images(bundle.model, 10) if kind == "cascaded-demo" else _images(bundle, 7, seed=2)
    n = x.shape[0]
    g = ops.glance(x, Pz, model.glance_interpolation)
    thr = gap_thresholds(ref.run(x, g, None).probs)
    a = ref.run(x, g, thr)
    assert exits_mid_loop(a.exit_step, T), a.exit_step

    def singles(dev, thresholds, deadline=None):
        outs, reads = [], []
        for i in range(n):
            sim.reads = 0
            outs.append(dev.run(x[i:i + 1], g[i:i + 1], thresholds, deadline))
            reads.append(sim.reads)
        return outs, reads

    def agree(outs, want):
        for i, o in enumerate(outs):
            for f in ("prediction", "confidence", "exit_step"):
                np.testing.assert_array_equal(getattr(o, f)[0], getattr(want, f)[i], err_msg=f"{f}, image {i}")
            np.testing.assert_array_equal(o.coords[:, 0], want.coords[:, i], err_msg=f"coords, image {i}")

    dev = driver()
    ws = dev.place.graphs
    outs, reads = singles(dev, thr)
    agree(outs, a)
    assert ws.loop.disabled is None and log["builds"] == 1 and log["launches"] == n == ws.loop.launches
    assert reads == [1] * n  # one read per run, whatever the exit step
    # a new budget: same graph, thresholds re-uploaded
    thr2 = [min(1.0, v * 0.98) for v in thr[:-1]] + [thr[-1]]
    outs, reads = singles(dev, thr2)
    agree(outs, ref.run(x, g, thr2))
    assert log["builds"] == 1 and reads == [1] * n
    # bigger batches keep the per-step captured loop; batch 1 afterwards still uses the graph
    big = dev.run(x, g, thr)
    np.testing.assert_array_equal(big.exit_step, a.exit_step)
    agree(singles(dev, thr)[0], a)

    # off: step by step, one read per step run
    off = driver(env="off")
    outs, reads = singles(off, thr)
    agree(outs, a)
    assert off.place.graphs.loop.launches == 0 and reads == [int(e) + 1 for e in a.exit_step]

    # a deadline goes step by step from its first check; "stopped" as in the per-step loop
    for answer in (True, False):
        d_loop, d_off = _Deadline(T, answer), _Deadline(T, answer)
        launches = ws.loop.launches
        got, reads = singles(dev, thr, d_loop)
        want, _ = singles(off, thr, d_off)
        assert ws.loop.launches == launches and d_loop.asked == d_off.asked
        for p, q in zip(got, want):
            for f in ("prediction", "exit_step", "stopped", "coords"):
                np.testing.assert_array_equal(getattr(p, f), getattr(q, f))
        if answer:
            agree(got, a)
            assert reads == [int(e) + 1 for e in a.exit_step]

    # the loop graph does not instantiate: logged once, step by step, same answers
    log["fail"] = True
    with caplog.at_level("INFO", logger="gfnet_edge"):
        failing = driver()
        agree(singles(failing, thr)[0], a)
        plain = driver(runner_cls=_GraphSimRunner)  # its capture keeps no graphs
        agree(singles(plain, thr)[0], a)
        broken = driver(runner_cls=lambda *a: _KeepingRunner(*a, fail=True))  # every capture fails
        agree(singles(broken, thr)[0], a)
    assert not broken.place.graphs.cache.active and broken.place.graphs.loop.launches == 0
    assert "simulated instantiation failure" in failing.place.graphs.loop.disabled
    assert "does not keep its CUDA graphs" in plain.place.graphs.loop.disabled
    assert caplog.text.count("go step by step") == 2
    # unavailable conditional nodes in auto mode: logged as information, not a warning
    monkeypatch.setattr(cuda_loop, "conditional_support",
                        lambda: cuda_loop.ConditionalSupport(True, 12030, 12080, "driver too old"))
    caplog.clear()
    with caplog.at_level("INFO", logger="gfnet_edge"):
        old = driver()
        agree(singles(old, thr)[0], a)
    assert old.place.graphs.loop.disabled == "driver too old"
    assert [r.levelname for r in caplog.records if "go step by step" in r.message] == ["INFO"]
    # close(): the loop graph and its threshold / result buffers go with the place's own
    assert ws.loop.graph is not None and ws.loop._thr is not None and ws.loop._result is not None
    dev.close()
    assert ws.loop.graph is None and ws.loop._thr is None and ws.loop._result is None
    host.deactivate()


def test_captures_keep_their_graphs_for_the_loop_graph():
    """torch's capture is swapped for one with keep_graph=True (same runner, stream and pool);
    other capturers are kept as they are."""
    pytest.importorskip("torch")
    from gfnet_edge.runtime.backends.torch import TorchCapture
    from gfnet_edge.runtime.graph_loop import child_graph, keep_graphs

    runner = SimpleNamespace(name="torch")
    base = TorchCapture(runner, 0x5010)
    base.pool = ("pool",)
    kept = keep_graphs(base)
    assert type(kept) is TorchCapture and kept.keep_graph and not base.keep_graph
    assert (kept.runner, kept.stream, kept.pool, kept.name) == (runner, 0x5010, ("pool",), base.name)
    assert keep_graphs(kept) is kept
    other = SimCapture(SimMemory())
    assert keep_graphs(other) is other
    assert child_graph(lambda: None) is None


def test_bad_mode_in_the_environment_is_refused_before_anything_runs(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "maybe")
    from gfnet_edge.runtime.graph_steps import GraphWorkspace

    place = SimpleNamespace(ctx=SimpleNamespace(T=3, S=8, P=4, heads=SimpleNamespace(
        cls=SimpleNamespace(out_features=2), pol_hidden=4, cls_hidden=4, kind="gru")), stream=7)
    with pytest.raises(InputError, match=f"{ENV_VAR} must be"):
        GraphWorkspace(place, None)


# ----------------------------------------------------------------------------- GPU
requires_conditional = pytest.mark.skipif(not HAVE_GPU or not cuda_loop.conditional_support().usable,
                                          reason=GPU_REASON if not HAVE_GPU else
                                          f"no conditional graph nodes: {cuda_loop.conditional_support().error}")


@pytest.mark.gpu
@requires_conditional
def test_device_exit_kernel_equals_the_host_exit_step():
    """The loop graph over focus "steps" that each copy a prepared step block into the stats
    buffer: its result block equals the host exit step's on the same blocks (ties, NaN)."""
    rng = np.random.default_rng(5)
    st = ops.Stream()
    W = cuda_loop.STEP_BLOCK_WORDS
    for T in (2, 3, 5):
        script, stats = ops.DeviceBuffer(T * W * 4), ops.DeviceBuffer(W * 4)
        thr_buf, res_buf = ops.DeviceBuffer(T * 4), ops.DeviceBuffer(cuda_loop.loop_result_words(T) * 4)
        graphs = []
        for t in range(1, T):
            g = ops.CudaGraph()
            g.begin_capture(st)
            ops.cuda_copy(stats, script.ptr + t * W * 4, W * 4, st)
            g.end_capture()
            graphs.append(g)
        loop = cuda_loop.CudaLoopGraph([g.handle for g in graphs], stats, thr_buf, res_buf)
        assert loop.steps == T
        for trial in range(40):
            thr = rng.uniform(0.2, 1.0, T).astype(F32)
            blocks = _blocks(rng, T, thr)
            want = np.zeros(cuda_loop.loop_result_words(T), np.int32)
            _host_chain(blocks, thr, want)
            script.copy_from_host(blocks, st)
            thr_buf.copy_from_host(thr, st)
            ops.cuda_copy(stats, script, W * 4, st)  # the glance step's block
            res_buf.copy_from_host(np.full(want.size, -5, np.int32), st)
            loop.launch(st)
            got = np.empty_like(want)
            res_buf.copy_to_host(got, st)
            np.testing.assert_array_equal(got, want, err_msg=f"T={T}, trial {trial}")
