"""The extension's host-loop step (`ops.host_loop`) against a step-by-step numpy loop over the
`ops` heads (themselves tested against torch in test_kernels.py): predictions, confidences,
exit steps, patch coordinates and patches, with exits, compaction and trace, for both
classifier kinds and both image kinds; and its argument checks."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import child_python
from gfnet_edge import ops

S, P, T, F, HS, HP, HC, C = 32, 12, 4, 6, 10, 8, 7, 5
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _heads(kind, rng):
    g = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)  # noqa: E731
    actor = ops.ActorHead(g(3 * HP, HS), g(3 * HP, HP), g(3 * HP), g(3 * HP), g(2, HP) * 4, g(2))
    if kind == "gru":
        return actor, ops.GRUHead(g(3 * HC, F), g(3 * HC, HC), g(3 * HC), g(3 * HC), g(C, HC), g(C)), None
    return actor, None, ops.CascadedHead([(g(C, k * F), g(C)) for k in range(2, T + 1)])


def _native(actor, gru, cascaded, step0_backbone):
    return ops.host_loop(actor, gru if gru is not None else cascaded, T, S, P, step0_backbone, MEAN, STD,
                         feature_dim=F)


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _reference(images, outs, actor, gru, cascaded, step0_backbone, thr):
    """The loop written out in numpy over the ops heads; `outs[t]` gives the graph outputs
    (feature, state, logits) of step t for each image (rows indexed by image)."""
    n = len(images)
    norm = dict(mean=MEAN, std=STD) if images.dtype == np.uint8 else {}
    pred, conf = np.zeros(n, np.int64), np.zeros(n, np.float32)
    exit_step, coords_all = np.full(n, T - 1, np.int64), np.full((T - 1, n, 2), -1, np.int32)
    probs, patches_seen = np.zeros((T, n, C), np.float32), []
    active = np.arange(n)
    feature, state, logits0 = outs[0]
    h_cls = np.zeros((n, HC), np.float32) if gru is not None else None
    feats = np.zeros((n, T, F), np.float32)
    feats[:, 0] = feature
    if gru is not None:
        h_cls, logits, mp, am = gru.step(feature, h_cls)
    if step0_backbone:
        logits = logits0
        mp, am = ops.softmax_stats(logits)
    h_pol = np.zeros((n, HP), np.float32)
    for t in range(T):
        if t > 0:
            h_pol, _, coords = actor.step(np.ascontiguousarray(state), h_pol, S, P)
            coords_all[t - 1, active] = coords
            patches_seen.append(ops.crop_patches(images, coords, P, index=active, **norm))
            feature, state, _ = (o[active] for o in outs[t])
            if gru is not None:
                h_cls, logits, mp, am = gru.step(np.ascontiguousarray(feature), h_cls)
            else:
                feats[:, t] = feature
                logits, mp, am = cascaded.step(feats, t + 1)
        probs[t, active] = _softmax(logits)
        pred[active], conf[active] = am, mp
        if thr is None or t == T - 1:
            continue
        done = mp >= thr[t]
        exit_step[active[done]] = t
        keep = ~done
        active, state, h_pol = active[keep], state[keep], h_pol[keep]
        feats = feats[keep]
        if h_cls is not None:
            h_cls = h_cls[keep]
        if active.size == 0:
            break
    return pred, conf, exit_step, coords_all, probs, patches_seen


@pytest.mark.parametrize("kind,step0_backbone", [("gru", False), ("gru", True), ("cascaded", True)])
@pytest.mark.parametrize("u8", [True, False])
@pytest.mark.parametrize("mode", ["exits", "trace"])
def test_host_loop_matches_the_numpy_loop(kind, step0_backbone, u8, mode):
    rng = np.random.default_rng(zlib.crc32(repr((kind, step0_backbone, u8, mode)).encode()))
    n = 9
    actor, gru, cascaded = _heads(kind, rng)
    frames = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
    images = frames if u8 else ops.preprocess(frames, S, crop_pct=1.0, mean=MEAN, std=STD)
    # per-step graph outputs, fixed per image (what a backbone would return for it)
    outs = [(rng.standard_normal((n, F)).astype(np.float32), rng.standard_normal((n, HS)).astype(np.float32),
             rng.standard_normal((n, C)).astype(np.float32) * 3) for _ in range(T)]
    thr = None
    if mode == "exits":  # about a third of the images still running exit at each step
        trace_probs = _reference(images, outs, actor, gru, cascaded, step0_backbone, None)[4]
        running, thr = np.arange(n), []
        for t in range(T - 1):  # an image's probabilities do not depend on the others'
            mp = trace_probs[t, running].max(1)
            thr.append(np.quantile(mp, 0.67) if running.size else 2.0)
            running = running[mp < thr[-1]]
        thr = np.array(thr + [-1e8], np.float32)
    ref = _reference(images, outs, actor, gru, cascaded, step0_backbone, thr)

    loop = _native(actor, gru, cascaded, step0_backbone)
    f0, s0, l0 = outs[0]
    patches = loop.begin(images, f0, s0, l0 if step0_backbone else None, thr)
    probs = np.zeros((T, n, C), np.float32)
    probs[0] = _softmax(loop.logits())
    t, seen = 0, []
    while patches is not None:
        t += 1
        seen.append(patches.copy())
        active = loop.active()
        patches = loop.next(outs[t][0][active], outs[t][1][active])
        probs[t, active] = _softmax(loop.logits())  # the rows that ran this step
    pred, conf, exit_step, coords = loop.outputs()
    np.testing.assert_array_equal(pred, ref[0])
    np.testing.assert_allclose(conf, ref[1], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(exit_step, ref[2])
    np.testing.assert_array_equal(coords, ref[3])
    assert len(seen) == len(ref[5])
    for a, b in zip(seen, ref[5]):
        np.testing.assert_array_equal(a, b)
    if mode == "trace":
        np.testing.assert_allclose(probs, ref[4], rtol=0, atol=1e-6)
    else:
        assert 0 < (exit_step < T - 1).sum() < n  # the case exercised exits and compaction
        # ... after a focus step too, with a survivor after an exited image (rows really move)
        assert any((exit_step == t).any() and (exit_step > t).any()
                   and np.flatnonzero(exit_step == t).min() < np.flatnonzero(exit_step > t).max()
                   for t in range(1, T - 1)), exit_step


def test_host_loop_refuses_bad_arguments():
    rng = np.random.default_rng(0)
    actor, gru, cascaded = _heads("cascaded", rng)
    loop = _native(actor, None, cascaded, True)
    frames = rng.integers(0, 256, (2, S, S, 3), dtype=np.uint8)
    f, s, lg = (np.zeros((2, F), np.float32), np.zeros((2, HS), np.float32), np.zeros((2, C), np.float32))
    with pytest.raises(ValueError, match="call begin"):
        loop.next(f, s)
    with pytest.raises(ValueError, match=r"state must have shape \(2, 10\)"):
        loop.begin(frames, f, np.zeros((2, 3), np.float32), lg, None)
    with pytest.raises(ValueError, match="thresholds must have 4 values"):
        loop.begin(frames, f, s, lg, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="logits"):
        loop.begin(frames, f, s, None, None)
    with pytest.raises(ValueError, match="gave 7 logits"):
        loop.begin(frames, f, s, np.zeros((2, 7), np.float32), None)
    with pytest.raises(ValueError, match="does not fit features"):
        loop.begin(frames, np.zeros((2, F + 1), np.float32), s, lg, None)
    with pytest.raises(ValueError, match=r"uint8 images must have shape \(N, 32, 32, 3\)"):
        loop.begin(np.ascontiguousarray(frames[:, :16]), f, s, lg, None)
    with pytest.raises(TypeError, match="uint8 frames or float32"):
        loop.begin(frames.astype(np.int16), f, s, lg, None)
    patches = loop.begin(frames, f, s, lg, np.full(T, 2.0, np.float32))  # nobody exits
    assert patches.shape == (2, 3, P, P)
    with pytest.raises(ValueError, match=r"feature must have shape \(2, 6\)"):
        loop.next(np.zeros((1, F), np.float32), s)
    with pytest.raises(ValueError, match="step-0 logits"):
        _native(actor, None, cascaded, False)


def test_a_refused_begin_leaves_no_batch_running():
    """begin() refused (here: logits of the wrong width) ends the batch that was running: next()
    is refused too instead of cropping the earlier batch's images, which the loop no longer keeps
    alive."""
    rng = np.random.default_rng(5)
    actor, gru, _ = _heads("gru", rng)
    loop = _native(actor, gru, None, True)
    n = 4
    images = rng.standard_normal((n, 3, S, S)).astype(np.float32)
    f, s = rng.standard_normal((n, F)).astype(np.float32), rng.standard_normal((n, HS)).astype(np.float32)
    assert loop.begin(images, f, s, np.zeros((n, C), np.float32), None).shape == (n, 3, P, P)
    with pytest.raises(ValueError, match="logits"):
        loop.begin(images[:2].copy(), f[:2].copy(), s[:2].copy(), np.zeros((2, C + 1), np.float32), None)
    del images
    with pytest.raises(ValueError, match="begin"):
        loop.next(f, s)
    # the loop still runs a new batch from the start
    images = rng.standard_normal((n, 3, S, S)).astype(np.float32)
    patches = loop.begin(images, f, s, np.zeros((n, C), np.float32), None)
    np.testing.assert_array_equal(patches, ops.crop_patches(images, loop.outputs()[3][0], P))


def test_patches_stay_readable_after_the_loop_needs_a_larger_buffer():
    """The patches begin() / next() return are a view of the loop's buffer; a later batch that
    needs more room gets a new buffer, and the earlier view keeps the memory it shows (it reads
    its own step's patches, not freed memory)."""
    rng = np.random.default_rng(6)
    actor, gru, _ = _heads("gru", rng)
    loop = _native(actor, gru, None, False)
    small = rng.standard_normal((1, 3, S, S)).astype(np.float32)
    first = loop.begin(small, np.zeros((1, F), np.float32), np.zeros((1, HS), np.float32), None, None)
    expected = ops.crop_patches(small, loop.outputs()[3][0], P)
    np.testing.assert_array_equal(first, expected)
    n = 300
    big = rng.standard_normal((n, 3, S, S)).astype(np.float32)
    for _ in range(3):
        second = loop.begin(big, rng.standard_normal((n, F)).astype(np.float32),
                            rng.standard_normal((n, HS)).astype(np.float32), None, None)
        filler = [np.full(first.size, -7.0, np.float32) for _ in range(50)]  # reuse freed memory
        np.testing.assert_array_equal(first, expected)
        np.testing.assert_array_equal(second, ops.crop_patches(big, loop.outputs()[3][0], P))
        del filler


_THREADS_SCRIPT = """
import threading, numpy as np
from gfnet_edge import ops
S, P, T, F, HS, HP, HC, C = 64, 16, 4, 64, 64, 64, 64, 50
rng = np.random.default_rng(0)
g = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)
actor = ops.ActorHead(g(3 * HP, HS), g(3 * HP, HP), g(3 * HP), g(3 * HP), g(2, HP) * 4, g(2))
gru = ops.GRUHead(g(3 * HC, F), g(3 * HC, HC), g(3 * HC), g(3 * HC), g(C, HC), g(C))
loop = ops.host_loop(actor, gru, T, S, P, False, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
unexpected, refused = [], [0]
def run(n):
    r = np.random.default_rng(n)
    imgs = r.standard_normal((n, 3, S, S)).astype(np.float32)
    fe, st = r.standard_normal((n, F)).astype(np.float32), r.standard_normal((n, HS)).astype(np.float32)
    for _ in range(150):
        try:
            p = loop.begin(imgs, fe, st, None, None)
            while p is not None:
                loop.active(); loop.logits(); loop.outputs()
                p = loop.next(fe[:p.shape[0]].copy(), st[:p.shape[0]].copy())
        except RuntimeError as e:
            refused[0] += "another thread" in str(e)
            if "another thread" not in str(e):
                unexpected.append(repr(e))
        except ValueError:
            pass  # another thread's batch replaced this one's: its sizes no longer fit
        except Exception as e:
            unexpected.append(repr(e))
ts = [threading.Thread(target=run, args=(n,)) for n in (1, 37, 200, 5)]
[t.start() for t in ts]
[t.join() for t in ts]
assert not unexpected, unexpected[:3]
print("refused", refused[0])
"""


def test_host_loop_used_from_several_threads_refuses_instead_of_racing():
    """Calls of one HostLoop from several threads (its calls release the GIL): a call while
    another runs raises RuntimeError instead of racing on the loop's buffers (which crashed the
    interpreter); run in a child process so that a crash fails the test, not the session."""
    r = child_python.run(_THREADS_SCRIPT, 300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.startswith("refused")


_HUGE_STEPS = """
import numpy as np
from gfnet_edge import ops
rng = np.random.default_rng(0)
g = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)
actor = ops.ActorHead(g(24, 10), g(24, 8), g(24), g(24), g(2, 8), g(2))
gru = ops.GRUHead(g(21, 6), g(21, 7), g(21), g(21), g(5, 7), g(5))
def begin(steps):
    loop = ops.host_loop(actor, gru, steps, 32, 12, False, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    loop.begin(g(4, 3, 32, 32), g(4, 6), g(4, 10), None, None)
"""


def test_a_step_count_whose_coordinate_buffer_overflows_is_refused():
    """steps so large that (steps - 1) x N x 2 overflows: begin() raises ValueError instead of
    sizing the coordinate buffer from the wrapped count and writing past it (which crashed;
    hence the child process)."""
    r = child_python.refusals(_HUGE_STEPS, ["begin(2 ** 62 + 1)", "begin(2 ** 63 - 1)"], "coordinate buffer", 120)
    assert r.returncode == 0 and r.stdout.strip() == "refused", (r.returncode, r.stderr[-2000:])


def test_host_loop_keeps_its_cascaded_layers_when_the_callers_dict_changes():
    """_C.HostLoop takes the cascaded layers in a dict the caller still holds; emptying it (and
    dropping the layers) afterwards changes nothing: the loop keeps the layers themselves and
    gives what ops.host_loop over the same weights gives."""
    import gc

    from gfnet_edge import _C

    rng = np.random.default_rng(8)
    g = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)  # noqa: E731
    aw = [g(3 * HP, HS), g(3 * HP, HP), g(3 * HP), g(3 * HP), g(2, HP) * 4, g(2)]
    cw = [(g(C, k * F), g(C)) for k in range(2, T + 1)]
    n = 5
    frames = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
    outs = [(g(n, F), g(n, HS), g(n, C)) for _ in range(T)]

    def run(loop):
        patches, t = loop.begin(frames, *outs[0], None), 0
        while patches is not None:
            t += 1
            patches = loop.next(outs[t][0], outs[t][1])
        return loop.outputs()

    ref = run(ops.host_loop(ops.ActorHead(*aw), ops.CascadedHead(cw), T, S, P, True, MEAN, STD, feature_dim=F))
    layers = {k: _C.Linear(w, b) for k, (w, b) in zip(range(2, T + 1), cw)}
    loop = _C.HostLoop(_C.GRUCell(*aw[:4]), _C.Linear(*aw[4:]), None, None, layers, T, S, P, True, list(MEAN),
                       list(STD))
    layers.clear()
    gc.collect()
    junk = [_C.Linear(g(C + 3, 2)) for _ in range(50)]  # noqa: F841  (reuses freed memory)
    for a, b in zip(run(loop), ref):
        np.testing.assert_array_equal(a, b)


def test_host_loop_times_its_parts_only_when_asked():
    """profile on: every call reports heads and exit test; policy and crop exactly when it cut
    patches (-1 otherwise); off: all -1. Timing changes nothing in the results."""
    rng = np.random.default_rng(3)
    n = 9
    actor, gru, _ = _heads("gru", rng)
    frames = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
    outs = [(rng.standard_normal((n, F)).astype(np.float32), rng.standard_normal((n, HS)).astype(np.float32))
            for _ in range(T)]
    thr = np.array([0.5, 0.6, 0.7, -1e8], np.float32)
    results = {}
    for profile in (False, True):
        loop = _native(actor, gru, None, False)
        assert loop.profile is False
        loop.profile = profile
        patches = loop.begin(frames, outs[0][0], outs[0][1], None, thr)
        parts, t = [loop.part_seconds()], 0
        while patches is not None:
            t += 1
            active = loop.active()
            patches = loop.next(outs[t][0][active], outs[t][1][active])
            parts.append(loop.part_seconds())
        results[profile] = (loop.outputs(), parts)
        for i, (heads, exit_test, policy, crop) in enumerate(parts):
            if not profile:
                assert (heads, exit_test, policy, crop) == (-1.0, -1.0, -1.0, -1.0)
                continue
            assert heads > 0 and exit_test > 0
            ran = i < len(parts) - 1  # every call but the last cut the next step's patches
            assert (policy > 0 and crop > 0) if ran else (policy == crop == -1.0)
        assert t >= 2  # the case ran focus steps after the first
    for a, b in zip(results[False][0], results[True][0]):
        np.testing.assert_array_equal(a, b)
