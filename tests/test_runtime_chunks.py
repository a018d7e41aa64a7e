"""Runtime calls of any size run in chunks of ``max_batch`` images: results equal chunk-by-chunk
calls, ``predict_iter`` streams, the device place uploads chunk by chunk, and peak memory of a
4000-frame call stays within the input's size + 300 MB."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gfnet_edge import ops
from gfnet_edge.errors import InputError
from gfnet_edge.runtime import Predictions, Runtime
from gfnet_edge.runtime.backends.base import Runner
from probs import gap_thresholds
from runner_spy import recorded_runs
from sim_device import DeviceArray, SimHeads, SimMemory, sim_ops

ROOT = Path(__file__).resolve().parents[1]
N, CHUNK = 70, 16  # 4 full chunks and a partial one
FIELDS = ("classes", "confidence", "exit_step", "coords")


@pytest.fixture(scope="module")
def demo(demo_onnx_bundle):
    """The demo bundle with a budget whose exits spread over the steps on the demo test frames,
    and those frames (uint8 S x S)."""
    from gfnet_edge.data import ClutteredDigits, demo_config

    bundle = demo_onnx_bundle
    frames, _ = ClutteredDigits("test", config=demo_config(bundle.model)).arrays(N)
    with Runtime(bundle, backend="onnxruntime", precision="fp32", max_batch=N) as rt:
        probs = rt.trace(frames).probs
    thr = gap_thresholds(probs)
    bundle.update_manifest(lambda m: m["budgets"].update({"spread": {"thresholds": thr}}))
    return bundle, frames


def _runtime(bundle, **kw):
    return Runtime(bundle, backend="onnxruntime", precision="fp32", budget="spread", **kw)


def _concat(parts):
    return Predictions(*(np.concatenate([getattr(p, f) for p in parts], axis=1 if f == "coords" else 0)
                         for f in FIELDS), parts[0].patch_size)


def _assert_same(a, b):
    assert len(a) == len(b)
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


def _normalised(bundle, frames):
    m = bundle.model
    return ops.preprocess(list(frames), m.image_size, crop_pct=1.0, mean=m.mean, std=m.std)


@pytest.mark.parametrize("kind", ["array", "list", "float"])
def test_a_call_equals_its_chunks_called_one_by_one(demo, kind):
    bundle, frames = demo
    x = {"array": frames, "list": list(frames), "float": _normalised(bundle, frames)}[kind]
    with _runtime(bundle, max_batch=CHUNK) as rt:
        with recorded_runs(rt) as seen:
            whole, tr = rt.predict(x), rt.trace(x)
        glance_batches = [n for g, n in seen if g == "glance"]
        parts = [rt.predict(x[i:i + CHUNK]) for i in range(0, N, CHUNK)]
        tparts = [rt.trace(x[i:i + CHUNK]) for i in range(0, N, CHUNK)]
    assert glance_batches == [16, 16, 16, 16, 6] * 2  # predict, then trace: never more than a chunk
    assert len(np.unique(whole.exit_step)) == 3  # exits at every step, across chunk borders
    _assert_same(whole, _concat(parts))
    np.testing.assert_array_equal(tr.probs, np.concatenate([t.probs for t in tparts], axis=1))
    np.testing.assert_array_equal(tr.coords, np.concatenate([t.coords for t in tparts], axis=1))
    with _runtime(bundle, max_batch=N) as rt:  # one chunk: same answers up to float rounding
        one, tr_one = rt.predict(x), rt.trace(x)
    np.testing.assert_array_equal(whole.classes, one.classes)
    np.testing.assert_array_equal(whole.exit_step, one.exit_step)
    np.testing.assert_allclose(tr.probs, tr_one.probs, rtol=0, atol=1e-5)


def test_max_batch_defaults_and_checks(demo):
    bundle, _ = demo
    with _runtime(bundle) as rt:
        assert rt.max_batch == 32  # ONNX Runtime has no max batch of its own
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(InputError, match="max_batch must be a positive int"):
            _runtime(bundle, max_batch=bad)


def test_nan_in_a_later_chunk_names_the_image(demo):
    bundle, frames = demo
    x = _normalised(bundle, frames[:40])
    x[37, 1, 5, 5] = np.inf
    with _runtime(bundle, max_batch=CHUNK) as rt:
        with pytest.raises(InputError, match=r"NaN or Inf \(image 37\)"):
            rt.predict(x)
        _assert_same(rt.predict(x[:37]), rt.predict(x[:37]))  # the runtime still works


def test_predict_iter_streams_batch_by_batch(demo):
    """Single frames and stacks from a generator: read only as far as the batch being filled,
    one Predictions per batch, equal to one chunked call on the same images."""
    bundle, frames = demo
    consumed = []

    def stream():
        for i in range(30):
            consumed.append(i)
            yield frames[i]
        consumed.append("stack")
        yield frames[30:N]  # a stack of 40, split over three batches

    with _runtime(bundle, max_batch=CHUNK) as rt:
        it = rt.predict_iter(stream(), batch_size=CHUNK)
        first = next(it)
        assert consumed == list(range(16)) and len(first) == 16
        rest = list(it)
        whole = rt.predict(frames)
        floats = list(rt.predict_iter((im for im in _normalised(bundle, frames)), batch_size=CHUNK))
        by_float = rt.predict(_normalised(bundle, frames))
    assert [len(p) for p in [first] + rest] == [16, 16, 16, 16, 6]
    _assert_same(_concat([first] + rest), whole)
    _assert_same(_concat(floats), by_float)


def test_predict_iter_bad_input(demo):
    bundle, frames = demo
    S = bundle.model.image_size
    with _runtime(bundle) as rt:
        with pytest.raises(InputError, match="batch_size must be a positive int"):
            rt.predict_iter(iter(frames), batch_size=0)  # before anything is read
        with pytest.raises(InputError, match="no budget named 'nope'"):
            rt.predict_iter(iter(frames), budget="nope")
        with pytest.raises(InputError, match=r"item 2: expected a uint8 \(H, W, 3\) frame.*float64"):
            list(rt.predict_iter([frames[0], frames[1], np.zeros((S, S, 3))]))
        with pytest.raises(InputError, match="item 1: float32 images in a batch of uint8 ones"):
            list(rt.predict_iter([frames[0], np.zeros((3, S, S), np.float32)]))
        with pytest.raises(InputError, match="item 0: .*got str"):
            list(rt.predict_iter(["frame.png"]))


# -------------------------------------------------- the device place, on a simulated GPU
class _SimDeviceRunner(Runner):
    """Runs a host runner on simulated device memory (sim_device.SimMemory)."""

    name = "sim"
    supports_device = True

    def __init__(self, host, mem, P):
        super().__init__(host.precision)
        self.host, self.mem, self.P, self.out = host, mem, P, {}

    def _activate(self):
        self.host.activate()

    def _run_device(self, graph, image, batch, stream):
        x = np.ascontiguousarray(self.mem.view(image, (batch, 3, self.P, self.P), np.float32))
        result = {}
        for name, a in self.host.run(graph, x).items():
            ptr, size = self.out.get((graph, name), (0, 0))
            if size < a.nbytes:
                ptr, size = self.mem.alloc(a.nbytes), a.nbytes
                self.out[(graph, name)] = (ptr, size)
            self.mem.view(ptr, a.shape, np.float32)[:] = a
            result[name] = (ptr, a.shape)
        return result


def test_device_place_uploads_and_runs_chunk_by_chunk(demo, monkeypatch):
    """Host frames, float images and frames in (simulated) GPU memory: every device buffer is
    sized for a chunk, not for the call, and the answers equal the host place's."""
    from gfnet_edge.runtime.driver import Driver

    bundle, frames = demo
    frames = frames[:40]
    S, P = bundle.model.image_size, bundle.model.patch_size
    with _runtime(bundle, max_batch=CHUNK) as host_rt:
        want = host_rt.predict(frames)
        want_trace = host_rt.trace(frames)
    mem = SimMemory()
    sim = sim_ops(monkeypatch, mem)
    with _runtime(bundle, max_batch=CHUNK) as rt:
        rt.driver = Driver(rt.model, _SimDeviceRunner(rt.runner, mem, P).activate(), SimHeads(rt.heads, mem),
                           rt.profiler)
        assert rt.device_loop
        results = [rt.predict(frames), rt.predict(list(frames))]
        sim.synced.clear()
        results.append(rt.predict(DeviceArray(mem, frames, stream=5)))
        assert sim.synced == [5]  # the producer's stream, once for the three chunks
        results.append(rt.predict([DeviceArray(mem, f) for f in frames]))
        tr = rt.trace(frames)
        bufs = dict(rt.driver.place._bufs)  # close() at the end of the block frees them
    for got in results:  # the device place normalises in float32 first: confidences within rounding
        for f in ("classes", "exit_step", "coords"):
            np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
        np.testing.assert_allclose(got.confidence, want.confidence, rtol=0, atol=1e-5)
    np.testing.assert_allclose(tr.probs, want_trace.probs, rtol=0, atol=1e-5)
    assert bufs["input.frames"].nbytes == CHUNK * S * S * 3
    assert bufs["input.images"].nbytes == CHUNK * 3 * S * S * 4
    assert max(b.nbytes for b in bufs.values()) == CHUNK * 3 * S * S * 4


def test_camera_frames_of_one_size_are_preprocessed_in_one_call_per_run(demo, monkeypatch):
    """On the (simulated) device place, uploaded frames that need a resize are pre-processed with
    one ``cuda_preprocess`` call per run of consecutive frames of one size (a chunk of a camera's
    frames in one call), and the answers equal the host place's on the same frames."""
    from gfnet_edge.runtime.device_place import contiguous_runs
    from gfnet_edge.runtime.driver import Driver

    bundle, frames = demo
    a = np.pad(frames[:20], ((0, 0), (4, 4), (12, 12), (0, 0)), mode="edge")  # (S + 8) x (S + 24)
    b = np.pad(frames[20:23], ((0, 0), (10, 10), (2, 2), (0, 0)), mode="edge")
    mixed = [a[0], a[1], b[0], a[2], b[1], b[2]]
    P = bundle.model.patch_size
    with _runtime(bundle, max_batch=CHUNK) as host_rt:
        want = [host_rt.predict(a), host_rt.predict(mixed)]
    mem = SimMemory()
    sim_ops(monkeypatch, mem)
    calls, preprocess = [], ops.cuda_preprocess

    def spy(frame, h, w, *args, n=1, **kw):
        calls.append((h, w, n))
        return preprocess(frame, h, w, *args, n=n, **kw)

    monkeypatch.setattr(ops, "cuda_preprocess", spy)
    with _runtime(bundle, max_batch=CHUNK) as rt:
        rt.driver = Driver(rt.model, _SimDeviceRunner(rt.runner, mem, P).activate(), SimHeads(rt.heads, mem),
                           rt.profiler)
        got = [rt.predict(a)]
        (ha, wa), (hb, wb) = a.shape[1:3], b.shape[1:3]
        assert calls == [(ha, wa, CHUNK), (ha, wa, 20 - CHUNK)]  # one call per chunk
        calls.clear()
        got.append(rt.predict(mixed))
        assert calls == [(ha, wa, 2), (hb, wb, 1), (ha, wa, 1), (hb, wb, 2)]
    for g, w in zip(got, want):
        for f in ("classes", "exit_step", "coords"):
            np.testing.assert_array_equal(getattr(g, f), getattr(w, f), err_msg=f)
        np.testing.assert_allclose(g.confidence, w.confidence, rtol=0, atol=1e-5)
    # runs follow memory: a frame of the same size elsewhere starts a new run
    x, y = 1000, 5000
    assert contiguous_runs([(x, 2, 3), (x + 18, 2, 3), (y, 2, 3), (y + 18, 2, 3), (y + 36, 3, 2)]) == \
        [(0, 2), (2, 2), (4, 1)]


class _AsyncSimRunner(_SimDeviceRunner):
    """Like _SimDeviceRunner, but its work runs when the (asynchronous) stream gets to it."""

    def _run_device(self, graph, image, batch, stream):
        P, result = self.P, {}
        dry = self.host.run(graph, np.zeros((batch, 3, P, P), np.float32))
        for name, a in dry.items():
            ptr, size = self.out.get((graph, name), (0, 0))
            if size < a.nbytes:
                ptr, size = self.mem.alloc(a.nbytes), a.nbytes
                self.out[(graph, name)] = (ptr, size)
            result[name] = (ptr, a.shape)

        def work():
            x = np.array(self.mem.view(image, (batch, 3, P, P), np.float32))
            for name, a in self.host.run(graph, x).items():
                self.mem.view(result[name][0], a.shape, np.float32)[:] = a
        self.mem.launch(stream, work)
        return result


def test_the_next_chunk_uploads_while_the_current_one_runs(demo, monkeypatch):
    """On the (asynchronous, simulated) GPU, a call of several chunks uploads chunk k + 1 on a
    stream of its own, through page-locked memory, before chunk k runs; the loop's stream waits
    for that upload on the device only. Answers equal the host place's."""
    from gfnet_edge.runtime.driver import Driver

    bundle, frames = demo
    frames = frames[:40]
    P = bundle.model.patch_size
    with _runtime(bundle, max_batch=CHUNK) as host_rt:
        want = host_rt.predict(frames)
        want_images = host_rt.predict(_normalised(bundle, frames))
    mem = SimMemory()
    sim_ops(monkeypatch, mem, asynchronous=True)
    log = []
    run_device = _AsyncSimRunner._run_device

    def logged(self, graph, image, batch, stream):
        log.append(("run", graph, int(stream)))
        return run_device(self, graph, image, batch, stream)

    monkeypatch.setattr(_AsyncSimRunner, "_run_device", logged)
    with _runtime(bundle, max_batch=CHUNK) as rt:
        rt.driver = Driver(rt.model, _AsyncSimRunner(rt.runner, mem, P).activate(), SimHeads(rt.heads, mem),
                           rt.profiler, cuda_graphs=False)
        place = rt.driver.place
        prefetch = place.prefetch

        def logged_prefetch(data):
            log.append(("prefetch", len(data)))
            prefetch(data)

        monkeypatch.setattr(place, "prefetch", logged_prefetch)
        got = rt.predict(frames)
        chunks = -(-len(frames) // CHUNK)
        upload, loop = int(place._upload.handle), int(place.stream.handle)
        assert upload != loop
        # chunk k + 1 is prefetched before chunk k's glance runs; the loop waits for it once per chunk
        order = [e[0] if e[0] == "prefetch" else e[1] for e in log if e[0] == "prefetch" or e[1] == "glance"]
        assert order == ["prefetch", "glance"] * (chunks - 1) + ["glance"], order
        assert [w[0] for w in mem.waits] == [loop] * (chunks - 1)
        assert mem.streams.enqueued[upload] >= chunks - 1
        log.clear()
        got_images = rt.predict(_normalised(bundle, frames))  # float images take the same route
        sizes = [min(CHUNK, len(frames) - k * CHUNK) for k in range(1, chunks)]
        assert [e for e in log if e[0] == "prefetch"] == [("prefetch", k) for k in sizes]
    for a, b in ((got, want), (got_images, want_images)):
        for f in ("classes", "exit_step", "coords"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
        np.testing.assert_allclose(a.confidence, b.confidence, rtol=0, atol=1e-5)


# ------------------------------------------------------- peak memory of a 4000-frame call
MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from gfnet_edge.runtime import Runtime

    def peak():  # peak resident set size of this process so far, bytes (Linux: ru_maxrss in KiB)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    bundle, n, chunk, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with Runtime(bundle, backend="onnxruntime", precision="fp32", threads=2, max_batch=chunk) as rt:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
        rt.predict(x[:1])
        base = peak()  # runtime loaded, input in memory
        pred = rt.predict(x)
        after_predict = peak()
        tr = rt.trace(x)
        after_trace = peak()
        # the reference: one call per chunk, for the first, a middle and the last (partial) chunk
        starts = sorted({0, (n // chunk // 2) * chunk, (n - 1) // chunk * chunk})
        ref = [(rt.predict(x[i:i + chunk]), rt.trace(x[i:i + chunk])) for i in starts]
    got = {"classes": pred.classes, "confidence": pred.confidence, "exit_step": pred.exit_step,
           "coords": pred.coords, "probs": tr.probs, "trace_coords": tr.coords}
    arrays = {}
    for i, (p, t) in zip(starts, ref):
        want = {"classes": p.classes, "confidence": p.confidence, "exit_step": p.exit_step, "coords": p.coords,
                "probs": t.probs, "trace_coords": t.coords}
        for name, a in want.items():
            axis = 1 if name in ("coords", "probs", "trace_coords") else 0
            arrays[f"{name}_{i}"] = np.take(got[name], np.arange(i, min(i + chunk, n)), axis=axis)
            arrays[f"ref_{name}_{i}"] = a
    np.savez(out, **arrays)
    print(json.dumps({"input": x.nbytes, "base": base, "predict": after_predict, "trace": after_trace}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's unit")
def test_4000_frames_peak_memory_within_input_plus_300mb(demo, tmp_path):
    """A fresh process: predict and trace of 4000 uint8 224 x 224 frames (574 MiB). Their peak
    resident memory, above the process's peak before the call (runtime loaded, input in
    memory), stays under 300 MB (measured on the 2-core development VM: +50 MB for predict,
    +103 MB for trace); the answers of sampled chunks equal one call on that chunk (every chunk
    is compared in test_a_call_equals_its_chunks_called_one_by_one, on 70 images)."""
    bundle, _ = demo
    out = tmp_path / "results.npz"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(bundle.root), "4000", "32", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    for call in ("predict", "trace"):
        grown = m[call] - m["base"]
        assert grown < 300e6, f"{call} of 4000 frames: peak RSS +{grown / 1e6:.0f} MB over {m['base'] / 1e6:.0f} MB"
    r = np.load(out)
    checked = sorted({k.split("_")[-1] for k in r.files})
    assert checked == ["0", "1984", "3968"]  # chunks of 32: the first, the 63rd of 125, the last
    for k in r.files:
        if not k.startswith("ref_"):
            np.testing.assert_array_equal(r[k], r[f"ref_{k}"], err_msg=k)


# ------------------------------------------------ frames already resized and centre-cropped
def _cropping(bundle):
    """The demo bundle's model as one that crops (crop_pct 0.875): S x S frames given without
    ``cropped`` are then resized and centre-cropped again."""
    import dataclasses

    return dataclasses.replace(bundle.model, crop_pct=0.875)


def _assert_close(got, want):
    for f in ("classes", "exit_step", "coords"):
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
    np.testing.assert_allclose(got.confidence, want.confidence, rtol=0, atol=1e-5)


def test_cropped_frames_are_only_normalised_on_the_host(demo):
    """``cropped=True``: the runtime's answers on S x S uint8 frames equal those on the same frames
    normalised beforehand (the float path), for arrays, lists, chunked calls, traces and streams,
    although the model crops; without it the frames are cropped a second time."""
    bundle, frames = demo
    with _runtime(bundle, max_batch=CHUNK) as rt:
        rt.model = _cropping(bundle)
        x = _normalised(bundle, frames)
        want, want_trace = rt.predict(x), rt.trace(x)
        got = [rt.predict(frames, cropped=True), rt.predict(list(frames), cropped=True),
               _concat(list(rt.predict_iter(iter(frames), batch_size=9, cropped=True)))]
        tr = rt.trace(frames, cropped=True)
        recropped = rt.trace(frames)
    assert len(np.unique(want.exit_step)) == 3
    for g in got:
        _assert_close(g, want)
    np.testing.assert_allclose(tr.probs, want_trace.probs, rtol=0, atol=1e-5)
    assert np.abs(recropped.probs - want_trace.probs).max() > 0.05  # the flag matters for a model that crops


def test_frames_cropped_with_ops_resize_crop_give_the_answers_of_the_full_frames(demo):
    """The documented way to crop ahead (e.g. on a capture thread): ``ops.resize_crop`` with the
    model's size, crop_pct and interpolation, then ``predict(..., cropped=True)``, answers exactly
    as ``predict`` on the camera-sized frames."""
    bundle, frames = demo
    rng = np.random.default_rng(3)
    big = [np.ascontiguousarray(np.pad(f, ((h, h), (w, w), (0, 0)), mode="edge"))
           for f, h, w in zip(frames[:12], rng.integers(0, 60, 12), rng.integers(20, 120, 12))]
    with _runtime(bundle) as rt:
        rt.model = _cropping(bundle)
        m = rt.model
        want = rt.predict(big)
        crops = ops.resize_crop(big, m.image_size, m.crop_pct, m.dataset_interpolation)
        got = rt.predict(crops, cropped=True)
    for f in ("classes", "exit_step", "coords", "confidence"):
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)


def test_cropped_frames_cross_to_the_gpu_as_uint8(demo, monkeypatch):
    """On the (simulated) device place, frames given as cropped are uploaded as uint8 (a quarter of
    the bytes of float32 images) and normalised as one batch per chunk (contiguous frames: one
    array, uploaded or in GPU memory) or with crop_pct 1 frame by frame (a list of separate
    frames in GPU memory); answers equal the host place's on the normalised images."""
    from gfnet_edge.runtime.driver import Driver

    bundle, frames = demo
    frames = frames[:40]
    P = bundle.model.patch_size
    with _runtime(bundle, max_batch=CHUNK) as host_rt:
        host_rt.model = _cropping(bundle)
        want = host_rt.predict(_normalised(bundle, frames))
    mem = SimMemory()
    sim_ops(monkeypatch, mem)
    crops, batches = [], []
    preprocess, normalise = ops.cuda_preprocess, ops.cuda_normalise_frames

    def spy(*a, **kw):
        crops.append(kw["crop_pct"])
        return preprocess(*a, **kw)

    def batch_spy(frames, n, *a, **kw):
        batches.append(n)
        return normalise(frames, n, *a, **kw)

    monkeypatch.setattr(ops, "cuda_preprocess", spy)
    monkeypatch.setattr(ops, "cuda_normalise_frames", batch_spy)
    with _runtime(bundle, max_batch=CHUNK) as rt:
        rt.model = _cropping(bundle)
        rt.driver = Driver(rt.model, _SimDeviceRunner(rt.runner, mem, P).activate(), SimHeads(rt.heads, mem),
                           rt.profiler)
        got = [rt.predict(frames, cropped=True), rt.predict(DeviceArray(mem, frames), cropped=True)]
        assert batches == [16, 16, 8] * 2 and crops == []
        got.append(rt.predict([DeviceArray(mem, f) for f in frames], cropped=True))
        bufs = dict(rt.driver.place._bufs)
        with pytest.raises(InputError, match=r"frame 0 is 40 x 41: frames given as cropped must be the model's "
                                             r"input size"):
            rt.predict(DeviceArray(mem, np.zeros((2, 40, 41, 3), np.uint8)), cropped=True)
    for g in got:
        _assert_close(g, want)
    assert set(crops) == {1.0} and len(crops) == len(frames)
    S = bundle.model.image_size
    assert bufs["input.frames"].nbytes == CHUNK * S * S * 3


def test_cropped_needs_uint8_frames_of_the_models_size(demo):
    bundle, frames = demo
    S = bundle.model.image_size
    with _runtime(bundle) as rt:
        with pytest.raises(InputError, match=r"frame 1 is 40 x 40: frames given as cropped must be the model's "
                                             rf"input size, {S} x {S}"):
            rt.predict([frames[0], np.zeros((40, 40, 3), np.uint8)], cropped=True)
        with pytest.raises(InputError, match="cropped=True is for uint8 frames"):
            rt.predict(_normalised(bundle, frames[:2]), cropped=True)
        with pytest.raises(InputError, match="cropped must be True or False, got 'yes'"):
            rt.predict(frames[:2], cropped="yes")
        with pytest.raises(InputError, match="cropped must be True or False"):
            rt.predict_iter(frames, cropped=1)  # refused at the call, before any batch
        with pytest.raises(InputError, match=rf"frame 0 is 30 x {S}"):
            rt.trace(np.zeros((1, 30, S, 3), np.uint8), cropped=True)
    with _runtime(bundle, max_batch=2) as rt:  # checked before the first chunk runs, named in the call
        bad = list(frames[:4]) + [np.zeros((S + 1, S, 3), np.uint8)]
        with recorded_runs(rt) as seen, pytest.raises(InputError, match=rf"frame 4 is {S + 1} x {S}"):
            rt.predict(bad, cropped=True)
        assert seen == []
        stream = iter([frames[0]] * 3 + [np.zeros((40, 40, 3), np.uint8)])  # the stream's item 3
        batches = rt.predict_iter(stream, batch_size=2, cropped=True)
        assert len(next(batches)) == 2
        with pytest.raises(InputError, match=rf"item 3 is 40 x 40: frames given as cropped must be the model's "
                                             rf"input size, {S} x {S}"):
            next(batches)
