"""The extension's CUDA graph capture, events, pinned memory and the crop's row index on a real
GPU, against plain launches and the CPU kernels (skipped with a reason where no GPU is usable).
The bookkeeping of the captured loop is tested on the simulated device (test_device_loop.py)."""
from __future__ import annotations

import numpy as np
import pytest

from gfnet_edge import ops
from gfnet_edge.ops._ext import _C
from gfnet_edge.runtime.graphs import NativeCapture

HAVE_GPU = ops.has_cuda_build() and ops.cuda_device_count() > 0
REASON = ("gfnet_edge._C built without CUDA" if not ops.has_cuda_build()
          else f"no usable CUDA device ({ops.cuda_device_error()})")
requires_gpu = pytest.mark.skipif(not HAVE_GPU, reason=REASON)
pytestmark = pytest.mark.gpu


def test_graph_and_event_without_gpu_say_why():
    if HAVE_GPU:
        pytest.skip("a GPU is present")
    for make in (ops.CudaGraph, ops.CudaEvent, lambda: ops.pinned_empty((4,), np.float32)):
        with pytest.raises(RuntimeError, match="without CUDA|no usable CUDA device"):
            make()


@requires_gpu
def test_crop_through_a_row_index_matches_the_cpu_crop():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((5, 3, 32, 32)).astype(np.float32)
    rows = np.array([4, 0, 4, 2], np.int32)
    coords = rng.integers(0, 32 - 8 + 1, (4, 2)).astype(np.int32)
    st = ops.Stream()
    ib, rb, cb = ops.to_device(images, st), ops.to_device(rows, st), ops.to_device(coords, st)
    out, flag = ops.DeviceBuffer(4 * 3 * 8 * 8 * 4), ops.DeviceBuffer(4)
    flag.zero(st)
    ops.cuda_crop_patches(ib, 4, 32, cb, out, 8, error_flag=flag, stream=st, rows=rb, image_rows=5)
    got = ops.from_device(out, (4, 3, 8, 8), np.float32, st)
    assert np.array_equal(got, ops.crop_patches(images, coords, 8, index=rows.astype(np.int64)))
    assert int(ops.from_device(flag, (1,), np.int32, st)[0]) == 0
    bad = ops.to_device(np.array([0, 5, 1, 1], np.int32), st)  # row 5 of 5 images
    ops.cuda_crop_patches(ib, 4, 32, cb, out, 8, error_flag=flag, stream=st, rows=bad, image_rows=5)
    got = ops.from_device(out, (4, 3, 8, 8), np.float32, st)
    assert int(ops.from_device(flag, (1,), np.int32, st)[0]) == 1 and not got[1].any()
    with pytest.raises(ValueError, match="image row"):
        ops.cuda_crop_patches(ib, 4, 32, cb, out, 8, stream=st, rows=bad, image_rows=5)


@requires_gpu
def test_native_capture_replays_the_extension_kernels_on_new_data():
    """A graph of crop (row index) -> GRU classifier step -> copy, captured once, replayed on
    new inputs written to the same addresses: equal to plain launches on those inputs."""
    rng = np.random.default_rng(1)
    n, S, P, H, C = 3, 32, 8, 16, 5
    I = 3 * P * P
    w = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in [(3 * H, I), (3 * H, H), (3 * H,), (3 * H,), (C, H), (C,)]]
    head = ops.GRUHead(*w, device="cuda")
    st = ops.Stream()
    img, rows, coords = ops.DeviceBuffer(n * 3 * S * S * 4), ops.DeviceBuffer(n * 4), ops.DeviceBuffer(n * 8)
    patches, h0, h1 = ops.DeviceBuffer(n * I * 4), ops.DeviceBuffer(n * H * 4), ops.DeviceBuffer(n * H * 4)
    logits, mp, am, flag, copy = (ops.DeviceBuffer(n * C * 4), ops.DeviceBuffer(n * 4), ops.DeviceBuffer(n * 4),
                                  ops.DeviceBuffer(4), ops.DeviceBuffer(n * C * 4))

    def step():
        flag.zero(st)
        ops.cuda_crop_patches(img, n, S, coords, patches, P, error_flag=flag, stream=st, rows=rows, image_rows=n)
        head.step_device(patches, h0, h1, n, logits, mp, am, stream=st)
        ops.cuda_copy(copy, logits, n * C * 4, st)

    def load(seed):
        r = np.random.default_rng(seed)
        data = (r.standard_normal((n, 3, S, S)).astype(np.float32), r.permutation(n).astype(np.int32),
                r.integers(0, S - P + 1, (n, 2)).astype(np.int32), r.standard_normal((n, H)).astype(np.float32))
        for buf, a in zip((img, rows, coords, h0), data):
            buf.copy_from_host(a, st)
        return data

    def read():
        return [ops.from_device(b, s, t, st) for b, s, t in
                ((h1, (n, H), np.float32), (copy, (n, C), np.float32), (mp, (n,), np.float32), (am, (n,), np.int32))]

    load(2)
    step()  # plain launches once, as the loop does before capturing
    replay = NativeCapture(st).capture(step)
    assert replay.graph.nodes >= 4
    for seed in (3, 4):
        load(seed)
        step()
        want = read()
        for b in (h1, copy, mp, am):
            b.zero(st)
        replay()
        for got, ref in zip(read(), want):
            assert np.array_equal(got, ref)
    with pytest.raises(RuntimeError, match="captured already"):
        replay.graph.begin_capture(st)
    for legacy in (0, 1):  # 0 and cudaStreamLegacy name the legacy default stream, which no capture takes
        with pytest.raises(ValueError, match="legacy default stream"):
            ops.CudaGraph().begin_capture(legacy)
    with pytest.raises(ValueError, match="out of range"):
        _C.cuda.device_name(ops.cuda_device_count())

    def unsupported():  # a synchronous copy cannot be captured: the capture fails, the stream recovers
        step()
        st.synchronize()

    with pytest.raises(RuntimeError):
        NativeCapture(st).capture(unsupported)
    step()
    st.synchronize()


@requires_gpu
def test_captured_head_steps_hold_no_memory_nodes():
    """The heads as the captured loop calls them (policy step with an action buffer, GRU and
    cascaded classifier steps with float32 logits) enqueue kernels only: no allocation or free
    node, which would keep the step graph out of the batch-1 loop graph's conditional nodes.
    Replays match plain launches, and the CPU heads."""
    from gfnet_edge.ops.cascaded import CascadedHead

    rng = np.random.default_rng(7)
    n, I, H, C, T, S, P = 3, 24, 16, 5, 3, 64, 16

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.2

    gru = [w(3 * H, I), w(3 * H, H), w(3 * H), w(3 * H)]
    actor_w = gru + [w(2, H), w(2)]
    actor, actor_cpu = ops.ActorHead(*actor_w, device="cuda"), ops.ActorHead(*actor_w)
    cls_w = gru + [w(C, H), w(C)]
    cls, cls_cpu = ops.GRUHead(*cls_w, device="cuda"), ops.GRUHead(*cls_w)
    layers = [(w(C, k * I), w(C)) for k in range(2, T + 1)]  # fc_2 .. fc_T
    casc, casc_cpu = CascadedHead(layers, device="cuda"), CascadedHead(layers)
    st = ops.Stream()
    x, h = w(n, I), w(n, H)
    feats = w(T, n, I)
    b = {name: ops.DeviceBuffer(size * 4) for name, size in
            (("x", n * I), ("h", n * H), ("feats", T * n * I), ("hp", n * H), ("hc", n * H), ("action", 2 * n),
             ("coords", 2 * n), ("lc", n * C), ("mc", n), ("ac", n), ("lk", n * C), ("mk", n), ("ak", n))}
    for name, a in (("x", x), ("h", h), ("feats", feats)):
        b[name].copy_from_host(a, st)

    def step():
        actor.step_device(b["x"], b["h"], b["hp"], n, b["action"], b["coords"], S, P, stream=st)
        cls.step_device(b["x"], b["h"], b["hc"], n, b["lc"], b["mc"], b["ac"], stream=st)
        casc.step_device(b["feats"], T, n, I, 2, b["lk"], b["mk"], b["ak"], layout="tnf", stream=st)

    def read():
        shapes = {"hp": ((n, H), np.float32), "action": ((n, 2), np.float32), "coords": ((n, 2), np.int32),
                  "hc": ((n, H), np.float32), "lc": ((n, C), np.float32), "mc": ((n,), np.float32),
                  "ac": ((n,), np.int32), "lk": ((n, C), np.float32), "mk": ((n,), np.float32), "ak": ((n,), np.int32)}
        return {k: ops.from_device(b[k], *shapes[k], st) for k in shapes}

    step()
    plain = read()
    replay = NativeCapture(st).capture(step)
    kinds = replay.graph.node_kinds
    assert set(kinds) == {"kernel"}, kinds
    for buf in ("hp", "action", "coords", "hc", "lc", "mc", "ac", "lk", "mk", "ak"):
        b[buf].zero(st)
    replay()
    got = read()
    for k, v in plain.items():
        assert np.array_equal(got[k], v), k
    hp, action, coords = actor_cpu.step(x, h, S, P)
    np.testing.assert_allclose(got["hp"], hp, atol=2e-5)
    np.testing.assert_allclose(got["action"], action, atol=2e-6)
    assert np.abs(got["coords"] - coords).max() <= 1  # floor() at a boundary may differ by a pixel
    hc, lc, mc, ac = cls_cpu.step(x, h)
    np.testing.assert_allclose(got["hc"], hc, atol=2e-5)
    np.testing.assert_allclose(got["lc"], lc, atol=2e-5)
    np.testing.assert_allclose(got["mc"], mc, atol=2e-6)
    assert np.array_equal(got["ac"], ac)
    lk, mk, ak = casc_cpu.step(feats, 2, layout="tnf")
    np.testing.assert_allclose(got["lk"], lk, atol=2e-5)
    np.testing.assert_allclose(got["mk"], mk, atol=2e-6)
    assert np.array_equal(got["ak"], ak)


@requires_gpu
def test_scratch_taken_while_capturing_is_stream_ordered_or_refused_naming_the_rule():
    """A GRU classifier step with float16 logits takes scratch for its float32 logits. Captured:
    on a device with memory pools the graph allocates and frees it (mem_alloc / mem_free nodes)
    and replays equal to plain launches; on one without, the step is refused with a message
    naming the rule, and the capture is still valid (nothing the capture disallows was called)."""
    rng = np.random.default_rng(9)
    n, I, H, C = 4, 12, 8, 6
    w = [rng.standard_normal(s).astype(np.float32) * 0.3 for s in [(3 * H, I), (3 * H, H), (3 * H,), (3 * H,),
                                                                  (C, H), (C,)]]
    head = ops.GRUHead(*w, device="cuda")
    st = ops.Stream()
    x, h0 = ops.to_device(rng.standard_normal((n, I)).astype(np.float32), st), ops.DeviceBuffer(n * H * 4)
    h0.copy_from_host(rng.standard_normal((n, H)).astype(np.float32), st)
    h1, logits, mp, am = ops.DeviceBuffer(n * H * 4), ops.DeviceBuffer(n * C * 2), ops.DeviceBuffer(n * 4), \
        ops.DeviceBuffer(n * 4)

    def step():
        head.step_device(x, h0, h1, n, logits, mp, am, logits_dtype="float16", stream=st)

    def read():
        return [ops.from_device(logits, (n, C), np.float16, st), ops.from_device(mp, (n,), np.float32, st),
                ops.from_device(am, (n,), np.int32, st)]

    step()
    want = read()
    graph = ops.CudaGraph()
    graph.begin_capture(st)
    try:
        step()
    except RuntimeError as exc:  # a device without memory pools
        assert "cudaMalloc is not allowed during a capture" in str(exc) and "\n" not in str(exc)
        graph.end_capture()  # the capture was not invalidated
        assert graph.nodes > 0  # the GRU step enqueued before the scratch was refused
        return
    graph.end_capture()
    kinds = graph.node_kinds
    assert kinds.get("mem_alloc", 0) >= 1 and kinds.get("mem_free", 0) >= 1, kinds
    for b in (logits, mp, am):
        b.zero(st)
    graph.launch(st)
    for got, ref in zip(read(), want):
        assert np.array_equal(got, ref)


@requires_gpu
def test_calls_that_would_wait_or_read_host_memory_are_refused_while_capturing():
    """A crop or gather without error_flag waits for its stream, a gather with host indices
    would copy them again at each replay, and a crop with host coordinates uploads them to a
    buffer it allocates and waits for: while the stream is captured each is refused with a
    ValueError naming what to pass instead, before anything is enqueued, so the capture stays
    valid and the graph replays the calls made with a flag / device indices and coordinates.
    Outside a capture host coordinates work."""
    rng = np.random.default_rng(3)
    n, S, P = 3, 16, 8
    images = rng.standard_normal((n, 3, S, S)).astype(np.float32)
    coords = rng.integers(0, S - P + 1, (n, 2)).astype(np.int32)
    st = ops.Stream()
    ib, cb = ops.to_device(images, st), ops.to_device(coords, st)
    out, flag = ops.DeviceBuffer(n * 3 * P * P * 4), ops.DeviceBuffer(4)
    idx = ops.to_device(np.array([2, 0, 1], np.int32), st)
    rows = ops.DeviceBuffer(n * 3 * S * S * 4)
    flag.zero(st)
    graph = ops.CudaGraph()
    graph.begin_capture(st)
    try:
        with pytest.raises(ValueError, match="error_flag"):
            ops.cuda_crop_patches(ib, n, S, cb, out, P, stream=st)
        with pytest.raises(ValueError, match="error_flag"):
            ops.cuda_gather_rows(ib, n, idx, rows, 3 * S * S * 4, n=n, stream=st)
        with pytest.raises(ValueError, match="indices in device memory"):
            ops.cuda_gather_rows(ib, n, np.array([2, 0, 1]), rows, 3 * S * S * 4, stream=st)
        with pytest.raises(ValueError, match="coordinates in device memory"):
            ops.cuda_crop_patches(ib, n, S, coords, out, P, error_flag=flag, stream=st)
        ops.cuda_crop_patches(ib, n, S, cb, out, P, error_flag=flag, stream=st)
        ops.cuda_gather_rows(ib, n, idx, rows, 3 * S * S * 4, n=n, error_flag=flag, stream=st)
    finally:
        graph.end_capture()  # raises if a refused call had invalidated the capture
    graph.launch(st)
    assert np.array_equal(ops.from_device(out, (n, 3, P, P), np.float32, st), ops.crop_patches(images, coords, P))
    assert np.array_equal(ops.from_device(rows, (n, 3, S, S), np.float32, st), images[[2, 0, 1]])
    assert int(ops.from_device(flag, (1,), np.int32, st)[0]) == 0
    ops.cuda_crop_patches(ib, n, S, coords[::-1].copy(), out, P, stream=st)  # not captured: host coords work
    assert np.array_equal(ops.from_device(out, (n, 3, P, P), np.float32, st),
                          ops.crop_patches(images, coords[::-1].copy(), P))


def test_a_crop_with_host_coordinates_on_a_captured_stream_is_refused_before_the_upload(monkeypatch):
    """The order of the refusal, without a GPU: with its stream being captured, a crop with host
    coordinates raises before it uploads them or launches anything (the upload would allocate
    and wait, which ends the capture)."""
    from gfnet_edge.ops import cuda_kernels

    asked, done = [], []
    monkeypatch.setattr(cuda_kernels._C.cuda, "stream_capturing", lambda s: asked.append(s) or True)
    monkeypatch.setattr(cuda_kernels, "to_device", lambda *a, **k: done.append("upload"))
    monkeypatch.setattr(cuda_kernels._C.cuda, "crop_patches", lambda *a, **k: done.append("launch"))
    with pytest.raises(ValueError, match="coordinates in device memory"):
        ops.cuda_crop_patches(0x1000, 2, 16, np.zeros((2, 2), np.int32), 0x2000, 8, error_flag=0x3000, stream=0x4000)
    assert asked == [0x4000] and done == []


@requires_gpu
def test_events_and_pinned_memory():
    st = ops.Stream()
    a, b = ops.CudaEvent(), ops.CudaEvent()
    buf = ops.DeviceBuffer(1 << 24)
    a.record(st)
    for _ in range(8):
        buf.zero(st)
    b.record(st)
    assert b.elapsed_ms(a) > 0
    host = ops.pinned_empty((4, 5), np.int32)
    assert host.shape == (4, 5) and host.dtype == np.int32 and host.flags.writeable
    src = np.arange(20, dtype=np.int32).reshape(4, 5)
    d = ops.to_device(src, st)
    d.copy_to_host(host, st)
    assert np.array_equal(host, src)


@requires_gpu
@pytest.mark.parametrize("warm", [True, False], ids=["table-built-before-capture", "table-built-while-capturing"])
def test_captured_preprocess_replays_after_its_resize_table_left_the_cache(warm):
    """A graph captured around cuda_preprocess bakes in its frame size's resize table. Pre-processing
    40 other frame sizes afterwards (more than the 32 tables the cache keeps) must neither free
    nor overwrite it: replays on new frames equal the CPU's pre-processing. A table first needed
    while capturing is built outside the capture (the capture completes)."""
    rng = np.random.default_rng(11)
    S, (h, w) = 32, ((41, 57) if warm else (43, 59))
    st = ops.Stream()
    fb, out = ops.DeviceBuffer(h * w * 3), ops.DeviceBuffer(3 * S * S * 4)

    def step():
        ops.cuda_preprocess(fb, h, w, S, out, stream=st)

    def replay_on(frame):
        fb.copy_from_host(frame, st)
        out.zero(st)
        replay()
        return ops.from_device(out, (1, 3, S, S), np.float32, st)

    if warm:
        fb.copy_from_host(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), st)
        step()
    replay = NativeCapture(st).capture(step)
    frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert np.array_equal(replay_on(frame), ops.preprocess(frame, S))
    other_out = ops.DeviceBuffer(3 * S * S * 4)
    for k in range(40):  # same crop, nearby sizes: tables of the same byte size, which would reuse its memory
        oh, ow = h + 1 + k, w + 2 + k
        other = ops.to_device(rng.integers(0, 256, (oh, ow, 3), dtype=np.uint8), st)
        ops.cuda_preprocess(other, oh, ow, S, other_out, stream=st)
    # device memory a freed table would have held, taken and filled with 0xFF bytes (indices far
    # out of range, NaN weights): a replay reading a freed table reads these
    garbage = []
    for nbytes in np.unique(np.geomspace(256, 1 << 18, 48).astype(np.int64) // 4 * 4):
        for _ in range(4):
            buf = ops.DeviceBuffer(int(nbytes))
            buf.copy_from_host(np.full(int(nbytes), 0xFF, np.uint8), st)
            garbage.append(buf)
    st.synchronize()
    for seed in (1, 2):
        frame = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert np.array_equal(replay_on(frame), ops.preprocess(frame, S))
