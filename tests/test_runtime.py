"""Runtime: parity with the reference trace for every family, early exit, compaction, inputs."""
from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gfnet_edge import evaluate as ev
from gfnet_edge.build import BuildConfig, build_bundle
from gfnet_edge.errors import InputError, UnavailableError
from gfnet_edge.models import GFNet, save_checkpoint
from gfnet_edge.runtime import Runtime
from gfnet_edge.variants import released_spec
from runner_spy import first_args, recorded_runs  # noqa: E402

FAMILIES = ["mobilenetv3_large_100", "regnety_600m", "densenet121", "efficientnet_b2", "resnet50"]


def _bundle(tmp_path_factory, name, P=None, budgets=None):
    torch.manual_seed(0)
    model = GFNet(released_spec(name, P))
    with torch.no_grad():
        model.policy.actor[0].weight.mul_(50)  # spread the patches of a random policy
    d = tmp_path_factory.mktemp(name)
    ck = save_checkpoint(d / "m.pth.tar", model)
    b = build_bundle(ck, d / "bundle", BuildConfig(precision="fp32", backend="onnxruntime", include_checkpoint=True),
                     progress=False)
    if budgets:
        b.update_manifest(lambda m: m["budgets"].update(budgets))
    return model, b


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_fp32_trace_equals_reference(tmp_path_factory, name):
    model, bundle = _bundle(tmp_path_factory, name)
    S = model.spec.image_size
    x = torch.randn(3, 3, S, S)
    ref = model.trace(x)
    with Runtime(bundle, backend="onnxruntime", precision="fp32") as rt:
        tr = rt.trace(x.numpy())
    assert tr.probs.shape == tuple(ref.probs.shape)
    np.testing.assert_allclose(tr.probs, ref.probs.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(tr.coords, ref.coords.numpy())


@pytest.fixture(scope="module")
def mnv3(tmp_path_factory):
    return _bundle(tmp_path_factory, "mobilenetv3_large_100")


def _thresholds_for(probs, p):
    return [float(t) for t in ev.fit_thresholds(probs, ev.exit_fractions(p, probs.shape[0]))]


def test_early_exit_matches_reference_evaluation(mnv3):
    model, bundle = mnv3
    torch.manual_seed(1)
    x = torch.randn(24, 3, 224, 224)
    ref = model.trace(x)
    probs = ref.probs.numpy()
    thr = _thresholds_for(probs, 1.0)
    assert thr[0] < 1e7  # some images exit early
    bundle.update_manifest(lambda m: m["budgets"].update({"mid": {"thresholds": thr}}))
    expected = ev.dynamic_evaluate(probs, np.zeros(24, int), [1, 2, 3], thr)
    with Runtime(bundle.root, backend="onnxruntime", precision="fp32", budget="mid") as rt:
        with recorded_runs(rt) as calls:
            pred = rt.predict(x.numpy())
    np.testing.assert_array_equal(pred.exit_step, expected.exit_step)
    np.testing.assert_array_equal(pred.classes, expected.prediction)
    # compaction: focus step t only sees images that had not exited before it
    focus = [n for g, n in calls if g == "focus"]
    assert focus == [int((expected.exit_step >= t).sum()) for t in (1, 2) if (expected.exit_step >= t).any()]
    # boxes: one P x P box per focus step actually run, at the reference coordinates
    for i in range(24):
        boxes = pred.boxes(i)
        assert len(boxes) == expected.exit_step[i]
        for t, (r, c, r2, c2) in enumerate(boxes):
            assert (r, c) == tuple(ref.coords[t, i].tolist()) and (r2 - r, c2 - c) == (96, 96)


def test_uint8_frames_and_float_inputs_agree(mnv3):
    _, bundle = mnv3
    from gfnet_edge import ops

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(3)]
    with Runtime(bundle, backend="onnxruntime", precision="fp32") as rt:
        a = rt.predict(frames)
        images = ops.preprocess(frames, 224, crop_pct=0.875, interpolation="bilinear")
        b = rt.predict(images)
        single = rt.predict(frames[0])
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_allclose(a.confidence, b.confidence, rtol=1e-6)
    assert len(single) == 1 and single.classes[0] == a.classes[0]


@pytest.mark.parametrize("max_batch", [None, 2])  # one chunk, several chunks
def test_frame_sizes_are_an_ordinary_array_for_a_stack_and_for_a_list(demo_onnx_bundle, max_batch):
    """Predictions.frame_sizes of a (N, H, W, 3) stack is the same kind of array as of a list of
    frames (int64 (N, 2), writable, C-contiguous, its own rows): writing into one row leaves the
    others and the next call's sizes alone."""
    stack = np.zeros((5, 50, 60, 3), np.uint8)
    with Runtime(demo_onnx_bundle, backend="onnxruntime", precision="fp32", threads=1, max_batch=max_batch) as rt:
        got = {"stack": rt.predict(stack).frame_sizes, "list": rt.predict(list(stack)).frame_sizes}
        for kind, sizes in got.items():
            assert isinstance(sizes, np.ndarray) and sizes.dtype == np.int64 and sizes.shape == (5, 2), kind
            assert sizes.flags.writeable and sizes.flags.c_contiguous and sizes.flags.owndata, kind
            np.testing.assert_array_equal(sizes, [[50, 60]] * 5)
            sizes[0] = (7, 8)
            np.testing.assert_array_equal(sizes[1:], [[50, 60]] * 4)
        np.testing.assert_array_equal(rt.predict(stack).frame_sizes, [[50, 60]] * 5)


def test_threads_sharing_a_runtime_are_served_in_call_order(demo_onnx_bundle):
    """Calls waiting for a shared Runtime run in the order they were made: a thread that ends a
    call and calls again at once queues behind the threads already waiting."""
    from sim_device import demo_test_images

    x = demo_test_images(demo_onnx_bundle.model, 1)
    order = []

    def wait_for_queue(rt, n):  # until n calls wait (up to 2 s)
        t0 = time.perf_counter()
        while len(getattr(rt._lock, "_waiting", ())) < n and time.perf_counter() - t0 < 2:
            time.sleep(0.01)

    with Runtime(demo_onnx_bundle, backend="onnxruntime", precision="fp32", threads=1) as rt:
        run = rt._run
        rt._run = lambda *a, **kw: order.append(threading.current_thread().name) or run(*a, **kw)
        held, release = threading.Event(), threading.Event()

        def first():  # a call in progress, then the same thread's next call at once
            with rt._lock:
                held.set()
                release.wait(10)
            rt.predict(x)

        threads = {name: threading.Thread(target=first if name == "A" else lambda: rt.predict(x), name=name)
                   for name in "ABC"}
        threads["A"].start()
        held.wait(10)
        for n, name in enumerate("BC", 1):
            threads[name].start()
            wait_for_queue(rt, n)
        release.set()
        for t in threads.values():
            t.join(30)
    assert order == ["B", "C", "A"]


def test_fifo_lock_survives_a_waiter_interrupted():
    """A thread interrupted while it waits leaves the queue: the threads behind it still get the lock."""
    from gfnet_edge.runtime.api import FifoLock

    lock, got = FifoLock(), []

    class Stop(Exception):
        pass

    with lock:
        cond = lock._cond
        real_wait = cond.wait
        calls = {"n": 0}

        def wait_then_fail(*a, **kw):  # the first waiter is interrupted on its first wait
            calls["n"] += 1
            if threading.current_thread().name == "interrupted":
                raise Stop
            return real_wait(*a, **kw)

        cond.wait = wait_then_fail
        errors = []
        t1 = threading.Thread(target=lambda: errors.append(pytest.raises(Stop, lock.__enter__)), name="interrupted")
        t1.start()
        t1.join(10)

        def later():
            with lock:
                got.append("later")

        t2 = threading.Thread(target=later)
        t2.start()
        time.sleep(0.05)
    t2.join(10)
    assert len(errors) == 1 and got == ["later"] and not lock._waiting and not lock._held


def test_profiler_memory_is_bounded():
    """A profiler left on for a long stream keeps at most ``max_samples`` durations per stage
    (the default: MAX_SAMPLES): count, total and mean cover every one, percentiles the latest."""
    from gfnet_edge.runtime.profile import MAX_SAMPLES, Profiler

    assert Profiler(True).max_samples == MAX_SAMPLES <= 1 << 16
    p = Profiler(True, max_samples=10)
    for seconds in [1.0] * 25 + [2.0] * 10:
        p.record("glance", seconds)
        p.add_call(seconds, 2)
    assert len(p._samples["glance"]) == len(p._calls) == 10
    s = p.summary()
    assert s["glance"]["count"] == 35 and s["glance"]["total_ms"] == pytest.approx(45e3)
    assert s["glance"]["mean_ms"] == pytest.approx(45e3 / 35) and s["glance"]["p50_ms"] == pytest.approx(2e3)
    assert s["per_image"]["count"] == 35 and s["per_image"]["p99_ms"] == pytest.approx(1e3)
    p.reset()
    assert p.summary() == {}


def test_profiler_counts_every_stage_of_the_host_loop(mnv3):
    """profile=True: one pre-process, glance and first step per call, one focus run and step per
    focus step reached, one per-image sample per call; the native step's parts (heads and exit
    test every step, policy and crop for each focus run) add up to less than the step; percentiles
    ordered; off records nothing."""
    from gfnet_edge.runtime.profile import HOST_STEP_PARTS, backbone_ms

    _, bundle = mnv3
    rng = np.random.default_rng(6)
    frames = rng.integers(0, 256, (3, 240, 320, 3), dtype=np.uint8)
    with Runtime(bundle, backend="onnxruntime", precision="fp32", profile=True) as rt:
        calls = [rt.predict(frames), rt.predict(frames[:1])]
        s = rt.profiler.summary()
        rt.profiler.reset()
        rt.profiler.enabled = False
        rt.predict(frames)
        assert rt.profiler.summary() == {}
    focus_runs = sum(int(c.exit_step.max()) for c in calls)  # compaction: one run per step reached
    assert s["preprocess"]["count"] == s["glance"]["count"] == 2
    assert s["step"]["count"] == 2 + focus_runs
    assert s.get("focus", {"count": 0})["count"] == focus_runs
    assert s["per_image"]["count"] == 2  # one sample per call: its time over its images
    assert s["heads"]["count"] == s["exit"]["count"] == s["step"]["count"]
    assert s["policy"]["count"] == s["crop"]["count"] == focus_runs  # each focus run's patches
    assert sum(s[k]["total_ms"] for k in HOST_STEP_PARTS) < s["step"]["total_ms"]
    assert backbone_ms(s) == pytest.approx(s["glance"]["total_ms"] + s["focus"]["total_ms"])
    for st in s.values():
        assert 0 < st["p50_ms"] <= st["p95_ms"] <= st["p99_ms"]
    staged_ms = sum(st["total_ms"] for k, st in s.items() if k != "per_image" and k not in HOST_STEP_PARTS)
    assert staged_ms <= 3 * s["per_image"]["total_ms"]  # the calls took at most 3 x their per-image time


def test_float16_head_weights_on_the_trained_demo_model(demo_checkpoint, demo_onnx_bundle):
    """head_dtype="float16" stores the GRU / Linear head weights in half precision: on the
    trained demo model (cascaded classifier, GRU policy) the trace stays within 1e-2 of the
    reference's probabilities, with the same classes and almost always the same patches."""
    from gfnet_edge import load_checkpoint, ops
    from gfnet_edge.data import ClutteredDigits, demo_config

    model = load_checkpoint(demo_checkpoint).eval()
    bundle = demo_onnx_bundle
    frames, _ = ClutteredDigits("test", config=demo_config(bundle.model)).arrays(64)
    images = ops.preprocess(frames, model.spec.image_size, crop_pct=1.0, mean=model.spec.mean, std=model.spec.std)
    with torch.no_grad():
        ref = model.trace(torch.from_numpy(images))
    with Runtime(bundle, backend="onnxruntime", precision="fp32", head_dtype="float16") as rt:
        assert rt.heads.actor.weight_dtype == "float16" and rt.heads.cls.weight_dtype == "float16"
        tr = rt.trace(images)
    np.testing.assert_allclose(tr.probs, ref.probs.numpy(), rtol=0, atol=1e-2)
    assert (tr.probs.argmax(2) == ref.probs.numpy().argmax(2)).mean() >= 0.98
    assert (tr.coords == ref.coords.numpy()).all(axis=2).mean() >= 0.95


@pytest.mark.slow
def test_float16_gru_classifier_head(tmp_path_factory):
    """The GRU classifier family (resnet50 layout) with float16 head weights: probabilities
    within 1e-2 of the reference trace (a random model, so no claim about its patches)."""
    model, bundle = _bundle(tmp_path_factory, "resnet50")
    torch.manual_seed(2)
    x = torch.randn(4, 3, 224, 224)
    ref = model.trace(x)
    with Runtime(bundle, backend="onnxruntime", precision="fp32", head_dtype="float16") as rt:
        assert rt.heads.kind == "gru" and rt.heads.cls.weight_dtype == "float16"
        tr = rt.trace(x.numpy())
    np.testing.assert_allclose(tr.probs, ref.probs.numpy(), rtol=0, atol=1e-2)


@pytest.mark.parametrize("stacked", [True, False])
def test_s_by_s_uint8_frames_trace_like_their_normalised_images(mnv3, stacked):
    """S x S frames stay uint8 in the host loop (glance and crops normalise on the fly): every
    step's probabilities and patch coordinates equal those of the normalised float images."""
    model, bundle = mnv3
    from gfnet_edge import ops

    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    images = ops.preprocess(frames, 224, crop_pct=1.0, mean=model.spec.mean, std=model.spec.std)
    with Runtime(bundle, backend="onnxruntime", precision="fp32") as rt:
        assert rt.model.crop_pct == 0.875  # force the no-crop path of a crop_pct=1 model
        rt.model = dataclasses.replace(rt.model, crop_pct=1.0)
        ta = rt.trace(frames if stacked else list(frames))
        tb = rt.trace(images)
    np.testing.assert_allclose(ta.probs, tb.probs, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ta.coords, tb.coords)


def test_deterministic_and_thread_safe(mnv3):
    _, bundle = mnv3
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 3, 224, 224)).astype(np.float32)
    with Runtime(bundle, backend="onnxruntime", precision="fp32") as rt:
        first = rt.trace(x)
        again = rt.trace(x)
        assert np.array_equal(first.probs, again.probs) and np.array_equal(first.coords, again.coords)
        results = [None] * 4

        def work(i):
            results[i] = rt.predict(x)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        single = rt.predict(x)
    for r in results:
        assert np.array_equal(r.classes, single.classes) and np.array_equal(r.confidence, single.confidence)


def test_close_waits_for_a_call_running_in_another_thread(mnv3):
    """close() from another thread while a long predict runs: the call finishes with the same
    results as an undisturbed one, close() returns after it, and later calls say the Runtime is
    closed."""
    _, bundle = mnv3
    x = np.random.default_rng(5).standard_normal((48, 3, 224, 224)).astype(np.float32)
    with Runtime(bundle, backend="onnxruntime", precision="fp32") as ref:
        want = ref.predict(x)
    rt = Runtime(bundle, backend="onnxruntime", precision="fp32")
    out, err, started = {}, [], threading.Event()

    def work():
        started.set()
        try:
            out["p"] = rt.predict(x)
        except Exception as exc:  # noqa: BLE001 - the test reports whatever the call raised
            err.append(exc)

    t = threading.Thread(target=work)
    t.start()
    started.wait()
    time.sleep(0.05)
    rt.close()
    t.join()
    assert not err, err
    assert np.array_equal(out["p"].classes, want.classes) and np.array_equal(out["p"].exit_step, want.exit_step)
    with pytest.raises(InputError, match="this Runtime is closed"):
        rt.predict(x[:1])
    with pytest.raises(InputError, match="this Runtime is closed"):
        rt.set_budget(None)


def test_runtime_refuses_copies_bad_thresholds_models_and_indices(mnv3):
    import copy
    import pickle

    _, bundle = mnv3
    with Runtime(bundle, backend="onnxruntime", precision="fp32") as rt:
        for make in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="cannot be (copied|pickled)"):
                make(rt)
        T = rt.model.steps
        for bad in ([0.5] * (T - 1), [float("nan")] * T, [0.5, float("inf")] + [0.5] * (T - 2),
                    np.full((1, T), 0.5), "abc", "1" * T, b"1" * T, 0.5, (t for t in [0.5] * (T + 1))):
            with pytest.raises(InputError, match=f"thresholds must be {T} finite numbers"):
                rt.thresholds = bad
        rt.thresholds = [2.0] * (T - 1) + [-1e8]  # by hand: every image runs every step
        rt.thresholds[0] = float("nan")  # a copy: what is in use changes only through the checked setter
        assert rt.thresholds == [2.0] * (T - 1) + [-1e8]
        x = np.random.default_rng(6).standard_normal((3, 3, 224, 224)).astype(np.float32)
        assert rt.predict(x).exit_step.tolist() == [T - 1] * 3
        with pytest.raises(InputError, match="class_names"):
            rt.model = dataclasses.replace(rt.model, class_names=("a", "b"))
        preds = rt.predict(x)
        assert preds[-1] == preds[2] and preds[np.int64(0)]["class"] == int(preds.classes[0])
        with pytest.raises(TypeError, match="index must be an int"):
            preds[0:2]
        with pytest.raises(IndexError, match="out of range"):
            preds[3]


def test_a_runtime_that_fails_to_open_releases_its_runner(mnv3, monkeypatch):
    """An unknown budget or a malformed step_costs entry, found after the runner was activated,
    raises the one-line error and leaves no active runner (its sessions / engines released)."""
    from gfnet_edge.runtime.backends.onnxruntime import OnnxRuntimeRunner

    _, bundle = mnv3
    made = first_args(monkeypatch, OnnxRuntimeRunner, "activate")
    with pytest.raises(InputError, match="nope"):
        Runtime(bundle, backend="onnxruntime", precision="fp32", budget="nope")
    assert len(made) == 1 and not made[0].active and not made[0].sessions


def test_prediction_boxes_check_the_image_index():
    """``boxes(i)`` takes the indices ``preds[i]`` takes (negative ones from the end) and refuses
    others with the same messages."""
    from gfnet_edge.runtime.api import Predictions

    coords = np.array([[[0, 0], [10, 20], [-1, -1]], [[5, 6], [-1, -1], [-1, -1]]], np.int32)  # (T-1, N, 2)
    preds = Predictions(classes=np.array([1, 2, 3]), confidence=np.array([0.9, 0.8, 0.7], np.float32),
                        exit_step=np.array([2, 1, 0]), coords=coords, patch_size=4)
    assert preds.boxes(0) == [(0, 0, 4, 4), (5, 6, 9, 10)] and preds.boxes(1) == [(10, 20, 14, 24)]
    assert preds.boxes(-3) == preds.boxes(0) and preds.boxes(np.int64(2)) == [] == preds[2]["boxes"]
    with pytest.raises(IndexError, match="image 99 out of range for 3 predictions"):
        preds.boxes(99)
    with pytest.raises(IndexError, match="image -4 out of range"):
        preds.boxes(-4)
    with pytest.raises(TypeError, match="index must be an int"):
        preds.boxes(1.0)


def test_truncated_heads_file_is_a_bundle_error(tmp_path):
    from gfnet_edge.errors import InputError as Err
    from gfnet_edge.runtime.heads import load_head_arrays

    np.savez(tmp_path / "heads.npz", w=np.zeros((4, 4), np.float32))
    data = (tmp_path / "heads.npz").read_bytes()
    (tmp_path / "heads.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(Err, match="cannot read head weights"):
        load_head_arrays(tmp_path / "heads.npz")
    np.savez(tmp_path / "ok.npz", w=np.zeros((4, 4), np.float32))

    def corrupt(*args, **kw):  # numpy / zipfile raise other types for some corruptions
        raise RuntimeError("File 'w.npy' is encrypted, password required for extraction")

    import gfnet_edge.runtime.heads as heads_mod

    real = heads_mod.np.load
    heads_mod.np.load = corrupt
    try:
        with pytest.raises(Err, match="cannot read head weights .*RuntimeError"):
            load_head_arrays(tmp_path / "ok.npz")
    finally:
        heads_mod.np.load = real


def test_heads_that_decompress_beyond_the_limit_are_refused_unread(tmp_path, monkeypatch):
    """A compressed heads.npz is judged by its archive directory: one that would decompress
    beyond MAX_HEAD_BYTES is refused before any array is decompressed."""
    import gfnet_edge.runtime.heads as heads_mod

    np.savez_compressed(tmp_path / "heads.npz", w=np.zeros((1024, 1024), np.float32))  # 4 MiB in a few KiB
    assert (tmp_path / "heads.npz").stat().st_size < 64 << 10
    monkeypatch.setattr(heads_mod, "MAX_HEAD_BYTES", 1 << 20)

    def no_load(*a, **k):
        raise AssertionError("decompressed")

    monkeypatch.setattr(heads_mod.np, "load", no_load)
    with pytest.raises(InputError, match=r"heads.npz: head weights of 4 MiB once decompressed, more than 1 MiB"):
        heads_mod.load_head_arrays(tmp_path / "heads.npz")
    monkeypatch.undo()
    assert heads_mod.load_head_arrays(tmp_path / "heads.npz")["w"].shape == (1024, 1024)


def _cpu_burnt_while_idle(run) -> float:
    """CPU seconds the process uses in the 0.2 s of sleep after ``run()`` (three times)."""
    time.sleep(0.3)  # let threads still spinning from earlier work (torch's, say) go to sleep first
    for _ in range(3):
        run()
    c0 = time.process_time()
    time.sleep(0.2)
    return time.process_time() - c0


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs for an ONNX Runtime worker thread")
def test_onnxruntime_workers_stop_spinning_after_a_run(mnv3):
    """Between two backbone runs the extension works: ONNX Runtime's workers must not spin there."""
    import onnxruntime as ort

    _, bundle = mnv3
    x = np.random.default_rng(5).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with Runtime(bundle, backend="onnxruntime", precision="fp32", threads=2) as rt:
        burnt = _cpu_burnt_while_idle(lambda: rt.predict(x))
        # Control: a session with ONNX Runtime's default options on the same graph does spin,
        # so the measurement above can see spinning.
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        default = ort.InferenceSession(str(rt.runner.graphs["focus"]), so, providers=["CPUExecutionProvider"])
        shape = [d if isinstance(d, int) else 1 for d in default.get_inputs()[0].shape]
        patch = np.zeros(shape, np.float32)
        control = _cpu_burnt_while_idle(lambda: default.run(None, {"image": patch}))
    if control < 0.02:
        pytest.skip(f"this ONNX Runtime does not spin after a run by default ({control * 1e3:.1f} ms of CPU)")
    assert burnt < 0.01, f"{burnt * 1e3:.1f} ms of CPU burnt in 200 ms of idle after predict (control {control * 1e3:.1f})"


def test_torch_backend_matches_onnxruntime(mnv3):
    _, bundle = mnv3
    x = np.random.default_rng(4).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with Runtime(bundle, backend="torch") as a, Runtime(bundle, backend="onnxruntime", precision="fp32") as b:
        ta, tb = a.trace(x), b.trace(x)
    np.testing.assert_allclose(ta.probs, tb.probs, atol=1e-4)
    np.testing.assert_array_equal(ta.coords, tb.coords)


@pytest.mark.parametrize("bad,exc,match", [
    (np.zeros((2, 3, 100, 100), np.float32), InputError, r"\(N, 3, 224, 224\)"),
    (np.full((1, 3, 224, 224), np.nan, np.float32), InputError, "NaN"),
    ([np.zeros((10, 10), np.uint8)], InputError, "uint8 HWC"),
    ([np.zeros((10, 10, 3), np.float64)], InputError, "uint8 HWC"),
    ([], InputError, "no images"),
    (np.zeros((0, 224, 224, 3), np.uint8), InputError, "no images"),
    ([np.zeros((10, 10, 3), np.uint8), np.zeros((0, 7, 3), np.uint8)], InputError, r"image 1: empty frame \(0, 7, 3\)"),
    (np.zeros((2, 5, 0, 3), np.uint8), InputError, r"empty frames \(2, 5, 0, 3\)"),
    (np.full((1, 3, 224, 224), 3e38, np.float32), InputError, "image 0 holds values up to 3e\\+38"),
    (None, InputError, "got NoneType"),
    (3, InputError, "got int"),
])
def test_bad_inputs(mnv3, bad, exc, match):
    _, bundle = mnv3
    with Runtime(bundle, backend="onnxruntime", precision="fp32") as rt:
        with pytest.raises(exc, match=match):
            rt.predict(bad)


def test_bad_runtime_options(mnv3, tmp_path):
    _, bundle = mnv3
    with pytest.raises(InputError, match="unknown backend"):
        Runtime(bundle, backend="tflite")
    with pytest.raises(InputError, match="no budget named"):
        Runtime(bundle, backend="onnxruntime", budget="nope")
    with pytest.raises(InputError, match="no 'int8-cpu' graphs"):
        Runtime(bundle, backend="onnxruntime", precision="int8-cpu")
    with pytest.raises(InputError, match="head_dtype"):
        Runtime(bundle, backend="onnxruntime", head_dtype="bfloat16")
    made = []
    with pytest.MonkeyPatch.context() as mp:  # a bad value is refused before any session is made
        mp.setattr(Runtime, "_make_runner", lambda self, *a: made.append(a))
        for threads in (0, -1, 0.5, 2000, True):
            with pytest.raises(InputError, match="threads must be an int from 1 to 1024"):
                Runtime(bundle, backend="onnxruntime", threads=threads)
        for flag in ("profile", "verify", "cuda_graphs"):
            with pytest.raises(InputError, match=f"{flag} must be True or False, got 'no'"):
                Runtime(bundle, backend="onnxruntime", **{flag: "no"})
    assert made == []
    with pytest.raises((UnavailableError, InputError)):
        Runtime(bundle, backend="tensorrt")  # no TensorRT engines / no TensorRT here


def _bundle_with_latency_budgets(src, root, threads=2):
    """A copy of the fp32 demo bundle with two latency budgets (the default one calibrated on
    int8-cpu graphs, one on fp32) and fp32 step costs measured with ``threads`` threads."""
    import json
    import shutil

    shutil.copytree(src, root)
    manifest = json.loads((root / "manifest.json").read_text())
    T = manifest["model"]["steps"]
    common = {"unit": "ms", "kind": "mean", "backend": "onnxruntime", "batch": 1, "device": "cpu", "data": "demo",
              "source": "gfnet-edge calibrate", "thresholds": [0.9] * (T - 1) + [-1e8]}
    manifest["budgets"]["ms-1.0"] = {**common, "budget_ms": 1.0, "precision": "int8-cpu", "threads": threads}
    manifest["budgets"]["ms-2.0"] = {**common, "budget_ms": 2.0, "precision": "fp32", "threads": None}
    manifest["default_budget"] = "ms-1.0"
    ms = [1.0 * (t + 1) for t in range(T)]
    manifest["step_costs"] = {"onnxruntime/fp32": {
        "backend": "onnxruntime", "precision": "fp32", "threads": threads, "device": "cpu", "source": "test",
        "batches": [{"batch": 1, "calls": 10, "cumulative": {k: ms for k in ("mean_ms", "p50_ms", "p95_ms", "p99_ms")}}]}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def test_a_budget_calibrated_with_other_settings_is_a_warning_at_its_first_use(demo_onnx_bundle, tmp_path, caplog):
    """A latency budget holds for the backend, precision and threads it was measured with: the
    first call that uses one measured otherwise logs one warning naming both settings; budgets
    that agree, and macs budgets, log nothing."""
    import logging

    root = _bundle_with_latency_budgets(demo_onnx_bundle.root, tmp_path / "b")
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    with caplog.at_level(logging.WARNING, logger="gfnet_edge"):
        with Runtime(root, backend="onnxruntime", precision="fp32") as rt:
            assert rt.budget == "ms-1.0" and "budget" not in caplog.text  # nothing until it is used
            rt.predict(x)
            rt.predict(x)
            lines = [r.getMessage() for r in caplog.records if "budget" in r.getMessage()]
            assert lines == ["runtime: budget 'ms-1.0' was calibrated with precision int8-cpu, threads 2; this "
                             "runtime runs with precision fp32, threads default: its latency limit does not hold "
                             "here (calibrate the bundle with these settings)"]
            caplog.clear()
            rt.predict(x, budget="ms-2.0")  # calibrated as this runtime runs
            rt.predict(x, budget="macs-mid")  # multiply-adds hold anywhere
            rt.set_budget("ms-2.0")
            rt.predict(x)
            rt.thresholds = [0.5] * rt.model.steps  # set by hand
            rt.predict(x)
            assert caplog.records == []
            assert rt.budget_mismatch("ms-2.0") is None and "int8-cpu" in rt.budget_mismatch("ms-1.0")
        with Runtime(root, backend="onnxruntime", precision="fp32", budget="ms-2.0", threads=2) as rt:
            rt.predict(x)
        assert [r.getMessage() for r in caplog.records] == [
            "runtime: budget 'ms-2.0' was calibrated with threads default; this runtime runs with threads 2: its "
            "latency limit does not hold here (calibrate the bundle with these settings)"]


def test_thresholds_set_for_a_block_give_back_the_budget_they_replaced(demo_onnx_bundle, tmp_path, caplog):
    """calibrate's ``using_thresholds`` gives back a budget's thresholds as that budget's: the
    Runtime's next call still checks the settings the budget was calibrated with (one warning
    for a budget measured otherwise), and runs with its thresholds."""
    import logging

    from gfnet_edge.calibrate.latency import using_thresholds

    root = _bundle_with_latency_budgets(demo_onnx_bundle.root, tmp_path / "b")
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    with caplog.at_level(logging.WARNING, logger="gfnet_edge"):
        with Runtime(root, backend="onnxruntime", precision="fp32") as rt:
            before = rt.thresholds
            with using_thresholds(rt, [0.5] * rt.model.steps):
                pass
            assert rt.budget == "ms-1.0" and rt.thresholds == before
            rt.predict(x)
    assert ["'ms-1.0' was calibrated with precision int8-cpu" in r.getMessage() for r in caplog.records] == [True]


def test_step_costs_of_other_threads_are_a_warning_only_when_a_deadline_uses_them(demo_onnx_bundle, tmp_path,
                                                                                  caplog):
    import logging

    root = _bundle_with_latency_budgets(demo_onnx_bundle.root, tmp_path / "b", threads=1)
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    with caplog.at_level(logging.WARNING, logger="gfnet_edge"):
        with Runtime(root, backend="onnxruntime", precision="fp32", budget="macs-mid", threads=2) as rt:
            rt.predict(x)
            assert "step costs" not in caplog.text  # no deadline: the step costs are not used
            rt.predict(x, deadline_ms=1000.0)
            rt.predict(x, deadline_ms=1000.0)
        assert caplog.text.count("measured with threads=1, this runtime runs with threads=2") == 1
        caplog.clear()
        with Runtime(root, backend="onnxruntime", precision="fp32", budget="macs-mid", threads=2) as rt:
            rt.set_step_costs([1.0] * rt.model.steps)  # its own costs: the bundle's threads do not matter
            rt.predict(x, deadline_ms=1000.0)
        with Runtime(root, backend="onnxruntime", precision="fp32", budget="macs-mid", threads=1) as rt:
            rt.predict(x, deadline_ms=1000.0)
        assert "step costs" not in caplog.text


def test_predict_says_once_when_the_default_budget_was_calibrated_for_other_graphs(demo_onnx_bundle, tmp_path):
    """`gfnet-edge predict --precision fp32` on a bundle whose default budget was calibrated on
    int8-cpu graphs: the results, and one warning line on stderr."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    root = _bundle_with_latency_budgets(demo_onnx_bundle.root, tmp_path / "b")
    for i in range(3):
        Image.fromarray(np.full((230, 240, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    r = subprocess.run([sys.executable, "-m", "gfnet_edge.cli", "predict", str(root), *(str(tmp_path / f"{i}.png")
                        for i in range(3)), "--backend", "onnxruntime", "--precision", "fp32"],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3
    assert r.stderr.splitlines() == [
        "gfnet-edge: WARNING: runtime: budget 'ms-1.0' was calibrated with precision int8-cpu, threads 2; this "
        "runtime runs with precision fp32, threads default: its latency limit does not hold here (calibrate the "
        "bundle with these settings)"], r.stderr


def test_heads_that_do_not_fit_a_graph_name_the_file_once(demo_onnx_bundle, tmp_path):
    """Head weights of another width, or glance and focus graphs swapped in the manifest: one
    BundleError naming the file at fault once."""
    import json
    import shutil

    from gfnet_edge.bundle import BundleError, sha256_file

    heads = shutil.copytree(demo_onnx_bundle.root, tmp_path / "heads")
    with np.load(heads / "heads.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["pol.w_ih"] = arrays["pol.w_ih"][:, :7]
    np.savez(heads / "heads.npz", **arrays)
    m = json.loads((heads / "manifest.json").read_text())
    m["artifacts"]["heads.npz"].update(sha256=sha256_file(heads / "heads.npz"), bytes=(heads / "heads.npz").stat().st_size)
    (heads / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as info:
        Runtime(heads, backend="onnxruntime", precision="fp32")
    assert str(info.value) == (f"{heads / 'heads.npz'}: head weights do not fit the glance graph: its 'policy_state' "
                               "output has width 256, the heads expect 7")

    swapped = shutil.copytree(demo_onnx_bundle.root, tmp_path / "swapped")
    m = json.loads((swapped / "manifest.json").read_text())
    g = m["graphs"]["fp32"]
    g["glance"], g["focus"] = g["focus"], g["glance"]
    (swapped / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as info:
        Runtime(swapped, backend="onnxruntime", precision="fp32")
    assert str(info.value).startswith(f"{swapped / 'graphs' / 'focus.fp32.onnx'}: its outputs (feature, policy_state) "
                                      "are not those of a glance graph"), str(info.value)
