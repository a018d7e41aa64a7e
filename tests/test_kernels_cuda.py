"""CUDA kernels against the CPU path (skipped with a reason where no GPU is usable)."""
from __future__ import annotations

import numpy as np
import pytest

from gfnet_edge import ops, selftest

HAVE_GPU = ops.has_cuda_build() and ops.cuda_device_count() > 0
REASON = ("gfnet_edge._C built without CUDA" if not ops.has_cuda_build()
          else f"no usable CUDA device ({ops.cuda_device_error()})")
requires_gpu = pytest.mark.skipif(not HAVE_GPU, reason=REASON)
pytestmark = pytest.mark.gpu


def test_selftest_without_gpu_exits_with_status_2(capsys):
    if HAVE_GPU:
        pytest.skip("a GPU is present")
    assert selftest.main(["--gpu", "--quick"]) == 2
    assert "cannot run the GPU checks" in capsys.readouterr().err


@requires_gpu
def test_selftest_checks_pass():
    failed = [r for r in selftest.run_checks(quick=True) if not r.ok]
    assert not failed, "\n".join(f"{r.name}: err {r.max_err:.3g} > tol {r.tol:.3g} {r.note}" for r in failed)


@requires_gpu
@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_cuda_preprocess_bit_exact_into_batch_slot(interp):
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(360, 640), (500, 375)]]
    ref = ops.preprocess(frames, 224, interpolation=interp)
    stream = ops.Stream()
    batch = ops.DeviceBuffer(3 * 3 * 224 * 224 * 4)
    batch.zero(stream)  # on the stream the kernels run on (a non-blocking one)
    keep = []
    for i, f in enumerate(frames):
        fb = ops.to_device(f, stream)
        keep.append(fb)
        ops.cuda_preprocess(fb, f.shape[0], f.shape[1], 224, batch.ptr + (i + 1) * 3 * 224 * 224 * 4,
                            interpolation=interp, stream=stream)
    got = ops.from_device(batch, (3, 3, 224, 224), np.float32, stream)
    assert not got[0].any()
    assert np.array_equal(got[1:], ref)


@requires_gpu
@pytest.mark.parametrize("n, hw, S, crop_pct, out_dtype, glance_dtype, interp, bgr", [
    (6, (360, 480), 224, 0.875, "float32", "float32", "bilinear", False),
    (3, (101, 77), 56, 0.875, "float16", "float16", "bicubic", True),
    (65535 + 3, (5, 4), 2, 0.875, "float32", "float32", "bicubic", False),  # more frames than one launch's grid.y
    (4, (9, 700), 12, 0.875, "float32", "float32", "bicubic", False),  # thin frames, 9 x 700 -> 13 x 1011: both axes upsampled
    (3, (3, 2), 9, 0.5, "float32", "float16", "bilinear", False),  # smaller than the crop: both axes upsampled
])
def test_cuda_preprocess_of_n_contiguous_frames_equals_frame_by_frame_and_cpu(n, hw, S, crop_pct, out_dtype,
                                                                              glance_dtype, interp, bgr):
    """One call for n frames of one size (one launch of each pass): bit for bit the images and
    glance of cuda_preprocess frame by frame, the CPU's images (float16: the CPU's values rounded
    to float16, exactly) and glance (within 1e-5; float16 within its rounding), and nothing
    written past the n frames."""
    rng = np.random.default_rng(11)
    frames = rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8)
    P = max(1, S // 2)
    dt = np.float32 if out_dtype == "float32" else np.float16
    gdt = np.float32 if glance_dtype == "float32" else np.float16
    stream = ops.Stream()
    fb = ops.to_device(frames, stream)
    sentinel = np.full((n + 1, 3, S, S), 7.0, dt), np.full((n + 1, 3, P, P), 7.0, gdt)
    out, gl = ops.to_device(sentinel[0], stream), ops.to_device(sentinel[1], stream)
    kw = dict(crop_pct=crop_pct, interpolation=interp, bgr=bgr, out_dtype=out_dtype, glance_size=P,
              glance_dtype=glance_dtype, stream=stream)
    ops.cuda_preprocess(fb, hw[0], hw[1], S, out, glance=gl, n=n, **kw)
    got = ops.from_device(out, (n + 1, 3, S, S), dt, stream)
    got_gl = ops.from_device(gl, (n + 1, 3, P, P), gdt, stream)
    assert (got[n] == 7.0).all() and (got_gl[n] == 7.0).all()
    images, glance = ops.preprocess(frames, S, crop_pct=crop_pct, interpolation=interp, bgr=bgr, glance_size=P)
    assert np.array_equal(got[:n], images.astype(dt))  # float16: rounded to nearest even, as numpy does
    tol = 1e-5 if glance_dtype == "float32" else 1e-5 + 2e-3  # + a float16 step for |v| < 4
    np.testing.assert_allclose(got_gl[:n].astype(np.float32), glance, rtol=0, atol=tol)
    k = min(n, 3)  # frame by frame, for the first few
    one, one_gl = ops.DeviceBuffer(k * 3 * S * S * dt().itemsize), ops.DeviceBuffer(k * 3 * P * P * gdt().itemsize)
    for i in range(k):
        ops.cuda_preprocess(fb.ptr + i * hw[0] * hw[1] * 3, hw[0], hw[1], S, one.ptr + i * 3 * S * S * dt().itemsize,
                            glance=one_gl.ptr + i * 3 * P * P * gdt().itemsize, **kw)
    assert np.array_equal(ops.from_device(one, (k, 3, S, S), dt, stream), got[:k])
    assert np.array_equal(ops.from_device(one_gl, (k, 3, P, P), gdt, stream), got_gl[:k])


@requires_gpu
def test_cuda_kernels_refuse_misaligned_outputs():
    """An output pointer not aligned to its element size is refused with ValueError (the kernel
    would fault with a sticky misaligned-address error that ends the CUDA context)."""
    stream = ops.Stream()
    fb = ops.to_device(np.zeros((8, 8, 3), np.uint8), stream)
    buf = ops.DeviceBuffer(4 * 3 * 8 * 8 + 16)
    with pytest.raises(ValueError, match="aligned"):
        ops.cuda_preprocess(fb, 8, 8, 8, buf.ptr + 2, crop_pct=1.0, stream=stream)
    with pytest.raises(ValueError, match="aligned"):
        ops.cuda_normalise_frames(fb, 1, 8, buf.ptr + 2, stream=stream)
    ops.cuda_preprocess(fb, 8, 8, 8, buf.ptr + 2, crop_pct=1.0, out_dtype="float16", stream=stream)  # 2-byte aligned
    stream.synchronize()


@requires_gpu
def test_every_cuda_kernel_refuses_pointers_misaligned_for_their_elements():
    """Not only the pre-processing: the glance, the crop, the gather's indices, the softmax
    statistics and the device heads refuse a pointer that is not a multiple of its element size
    (ValueError, nothing launched), and the context stays usable."""
    stream = ops.Stream()
    buf = ops.DeviceBuffer(1 << 16)
    images = ops.to_device(np.zeros((1, 3, 8, 8), np.float32), stream)
    odd = buf.ptr + 2  # 2-byte aligned: fine for float16, not for float32 / int32
    cases = [
        lambda: ops.cuda_glance(images, 1, 8, odd, 4, stream=stream),
        lambda: ops.cuda_glance(odd, 1, 8, buf.ptr, 4, stream=stream),
        lambda: ops.cuda_crop_patches(images, 1, 8, odd, buf.ptr + 4096, 4, stream=stream),
        lambda: ops.cuda_crop_patches(images, 1, 8, ops.to_device(np.zeros((1, 2), np.int32), stream), odd, 4,
                                      stream=stream),
        lambda: ops.cuda_gather_rows(images, 1, odd, buf.ptr + 4096, 16, n=1, stream=stream),
        lambda: ops.cuda_softmax_stats(buf.ptr, 1, 4, odd, buf.ptr + 64, stream=stream),
        lambda: ops.cuda_softmax_stats(buf.ptr, 1, 4, buf.ptr + 64, buf.ptr + 130, stream=stream),
        lambda: ops.Linear(np.ones((2, 4), np.float32), device="cuda").forward_device(buf.ptr, odd, 1, stream=stream),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(ValueError, match="aligned"):
            case()
    ops.cuda_glance(images, 1, 8, odd, 4, out_dtype="float16", stream=stream)  # 2 bytes suffice for float16
    stream.synchronize()


def test_cuda_preprocess_checks_n_before_any_cuda_call():
    for n in (0, -1):
        with pytest.raises(ValueError, match="n"):
            ops.cuda_preprocess(1, 8, 8, 4, 1, n=n)


@requires_gpu
def test_cuda_softmax_stats_of_more_rows_than_one_grid_equals_the_cpu():
    """More rows than the kernel's blocks (65535): each block takes several rows, and every row
    gets the CPU's max probability, argmax and logits copy (NaN and tied rows included)."""
    rng = np.random.default_rng(5)
    n, c = 3 * 65535 + 7, 10
    logits = rng.standard_normal((n, c)).astype(np.float32) * 3
    logits[[0, 65535, n - 1], 4] = np.nan
    logits[[1, 65536, n - 2]] = 1.0
    stream = ops.Stream()
    lb, mp, am, copy = (ops.to_device(logits, stream), ops.DeviceBuffer(n * 4), ops.DeviceBuffer(n * 4),
                        ops.DeviceBuffer(logits.nbytes))
    ops.cuda_softmax_stats(lb, n, c, mp, am, logits_out=copy, stream=stream)
    ref_mp, ref_am = ops.softmax_stats(logits)
    np.testing.assert_allclose(ops.from_device(mp, (n,), np.float32, stream), ref_mp, rtol=1e-6)
    assert np.array_equal(ops.from_device(am, (n,), np.int32, stream), ref_am)
    assert np.array_equal(ops.from_device(copy, logits.shape, np.float32, stream), logits, equal_nan=True)


@requires_gpu
def test_cuda_softmax_stats_reaches_rows_past_2_to_the_32():
    """2^32 + 3 rows of one class (17 GB of logits): the rows past 2^32 get their statistics too
    (a row index of 32 bits would have covered 3 rows). One class: every max probability is 1."""
    n = 2 ** 32 + 3
    if ops.cuda_device_properties()["total_memory"] < 2 * n * 4 + 2 ** 33:
        pytest.skip("needs about 43 GB of device memory")
    stream = ops.Stream()
    logits, mp = ops.DeviceBuffer(n * 4), ops.DeviceBuffer(n * 4)
    logits.zero(stream)
    mp.zero(stream)
    ops.cuda_softmax_stats(logits, n, 1, mp, None, stream=stream)
    for first in (0, 2 ** 31 - 2, 2 ** 32 - 2):
        got = np.zeros(5, np.float32)
        mp.copy_to_host(got, stream, offset=first * 4)
        assert np.array_equal(got, np.ones(5, np.float32)), (first, got)


@requires_gpu
def test_cuda_heads_of_more_batch_tiles_than_one_grid_equal_the_cpu():
    """65535 * 8 + 9 rows: more batch tiles of 8 than a grid's y holds (a grid of one block per
    tile fails to launch). The GRU, its classifier head and the actor stride over the tiles and
    give every row the CPU's values, the last rows included."""
    rng = np.random.default_rng(11)
    n, H, I, C = 65535 * 8 + 9, 8, 4, 3
    w = [rng.standard_normal(s).astype(np.float32) * 0.5 for s in [(3 * H, I), (3 * H, H), (3 * H,), (3 * H,)]]
    x, h = rng.standard_normal((n, I)).astype(np.float32), rng.standard_normal((n, H)).astype(np.float32)
    cls = [rng.standard_normal((C, H)).astype(np.float32), rng.standard_normal(C).astype(np.float32)]
    cpu, gpu = ops.GRUHead(*w, *cls).step(x, h), ops.GRUHead(*w, *cls, device="cuda").step(x, h)
    for a, b in zip(cpu[:3], gpu[:3]):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)
    assert (gpu[3] == cpu[3]).mean() > 0.999  # argmax: equal except near-ties within float error
    act = [rng.standard_normal((2, H)).astype(np.float32), rng.standard_normal(2).astype(np.float32)]
    cpu_a = ops.ActorHead(*w, *act).step(x, h, 64, 16)
    gpu_a = ops.ActorHead(*w, *act, device="cuda").step(x, h, 64, 16)
    np.testing.assert_allclose(gpu_a[1], cpu_a[1], atol=1e-4)
    assert (gpu_a[2] == cpu_a[2]).mean() > 0.999


@requires_gpu
def test_cuda_element_kernels_past_one_capped_grid_equal_the_cpu():
    """More elements than 65535 blocks of 256 threads: the crop, the normalisation, the glance
    and the float16 store of a linear layer stride over the rest, and the last elements get the
    CPU's values."""
    rng = np.random.default_rng(12)
    stream = ops.Stream()
    n, S, P = 70000, 12, 10  # 70000 * 3 * 10 * 10 = 21e6 patch elements
    images = rng.standard_normal((n, 3, S, S)).astype(np.float32)
    coords = rng.integers(0, S - P + 1, (n, 2)).astype(np.int32)
    out = ops.DeviceBuffer(n * 3 * P * P * 4)
    ops.cuda_crop_patches(ops.to_device(images, stream), n, S, coords, out, P, stream=stream)
    assert np.array_equal(ops.from_device(out, (n, 3, P, P), np.float32, stream), ops.crop_patches(images, coords, P))
    n, S, P = 1200, 128, 64  # 1200 * 128 * 128 = 19.7e6 pixels; 1200 * 3 * 64 * 64 = 14.7e6 glance values
    frames = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
    out, gl = ops.DeviceBuffer(n * 3 * S * S * 4), ops.DeviceBuffer(n * 3 * P * P * 4)
    ops.cuda_normalise_frames(ops.to_device(frames, stream), n, S, out, glance=gl, glance_size=P, stream=stream)
    got = ops.from_device(out, (n, 3, S, S), np.float32, stream)
    assert np.array_equal(got, ops.normalise_frames(frames))
    np.testing.assert_allclose(ops.from_device(gl, (n, 3, P, P), np.float32, stream), ops.glance(got, P), atol=1e-5)
    big = ops.DeviceBuffer(n * 3 * 112 * 112 * 4)  # 45e6 glance values
    ops.cuda_glance(out, n, S, big, 112, stream=stream)
    np.testing.assert_allclose(ops.from_device(big, (n, 3, 112, 112), np.float32, stream), ops.glance(got, 112),
                               atol=1e-5)
    nb, k, rows = 17000, 8, 1000  # 17e6 float16 outputs
    wt, b = rng.standard_normal((rows, k)).astype(np.float32), rng.standard_normal(rows).astype(np.float32)
    x = rng.standard_normal((nb, k)).astype(np.float32)
    y = ops.DeviceBuffer(nb * rows * 2)
    ops.Linear(wt, b, device="cuda").forward_device(ops.to_device(x, stream), y, nb, out_dtype="float16",
                                                    stream=stream)
    np.testing.assert_allclose(ops.from_device(y, (nb, rows), np.float16, stream).astype(np.float32),
                               ops.linear(x, wt, b), rtol=2e-3, atol=2e-3)


@requires_gpu
def test_cuda_preprocess_refuses_a_resize_that_enlarges_the_frame_too_much():
    """The device tables come from the CPU's plan: a tiny crop_pct is refused at once, as on the CPU."""
    stream = ops.Stream()
    fb, out = ops.DeviceBuffer(480 * 640 * 3), ops.DeviceBuffer(3 * 224 * 224 * 4)
    with pytest.raises(ValueError, match="enlarges the 480 x 640 frame more than 65536 times"):
        ops.cuda_preprocess(fb, 480, 640, 224, out, crop_pct=1e-7, stream=stream)


@requires_gpu
@pytest.mark.parametrize("n, S, P, bgr, glance_interp, norm", [
    (5, 97, 45, False, "bicubic", {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}),
    (3, 96, 48, True, "bilinear", {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}),
    (1, 33, 17, False, "bicubic", {}),  # the default ImageNet mean / std
])
def test_cuda_normalise_frames_equals_per_frame_preprocess_and_cpu(n, S, P, bgr, glance_interp, norm):
    """One batched launch (+ the glance) over contiguous S x S frames: bit for bit the images and
    glance of cuda_preprocess frame by frame at crop_pct 1, and the CPU images; sizes that are no
    multiple of the block size, and nothing written past the n frames."""
    rng = np.random.default_rng(8)
    frames = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
    stream = ops.Stream()
    fb = ops.to_device(frames, stream)
    sentinel = np.full((n + 1, 3, S, S), 7.0, np.float32), np.full((n + 1, 3, P, P), 7.0, np.float32)
    out, gl = ops.to_device(sentinel[0], stream), ops.to_device(sentinel[1], stream)
    ops.cuda_normalise_frames(fb, n, S, out, bgr=bgr, glance=gl, glance_size=P, glance_interpolation=glance_interp,
                              stream=stream, **norm)
    got = ops.from_device(out, (n + 1, 3, S, S), np.float32, stream)
    got_gl = ops.from_device(gl, (n + 1, 3, P, P), np.float32, stream)
    assert (got[n] == 7.0).all() and (got_gl[n] == 7.0).all()
    one, one_gl = ops.DeviceBuffer(n * 3 * S * S * 4), ops.DeviceBuffer(n * 3 * P * P * 4)
    for i in range(n):
        ops.cuda_preprocess(fb.ptr + i * S * S * 3, S, S, S, one.ptr + i * 3 * S * S * 4, crop_pct=1.0,
                            bgr=bgr, glance=one_gl.ptr + i * 3 * P * P * 4, glance_size=P,
                            glance_interpolation=glance_interp, stream=stream, **norm)
    want = ops.from_device(one, (n, 3, S, S), np.float32, stream)
    want_gl = ops.from_device(one_gl, (n, 3, P, P), np.float32, stream)
    assert np.array_equal(got[:n], want) and np.array_equal(got_gl[:n], want_gl)
    assert np.array_equal(got[:n], ops.preprocess(frames, S, crop_pct=1.0, bgr=bgr, **norm))


def test_cuda_normalise_frames_checks_its_arguments_before_any_cuda_call():
    """Sizes, mean / std and the glance size are refused by the extension before it needs a GPU."""
    for kw, match in [({"n": 0}, "n"), ({"std": (1.0, 0.0, 1.0)}, "std values must be non-zero"),
                      ({"mean": (0.5, 0.5)}, "mean"), ({"glance": 1, "glance_size": 9}, "glance_size"),
                      ({"glance": 1, "glance_size": 0}, "glance_size"),
                      ({"glance": 1, "glance_size": 4, "glance_interpolation": "nearest"}, "interpolation")]:
        args = {"frames": 1, "n": 2, "image_size": 8, "out": 1, **kw}
        with pytest.raises(ValueError, match=match):
            ops.cuda_normalise_frames(**args)


@requires_gpu
def test_cuda_heads_numpy_convenience_match_cpu():
    rng = np.random.default_rng(4)
    H, I, C = 64, 96, 10
    w = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in [(3 * H, I), (3 * H, H), (3 * H,), (3 * H,), (C, H), (C,)]]
    x, h = rng.standard_normal((5, I)).astype(np.float32), rng.standard_normal((5, H)).astype(np.float32)
    cpu, gpu = ops.GRUHead(*w), ops.GRUHead(*w, device="cuda")
    for a, b in zip(cpu.step(x, h), gpu.step(x, h)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    feats = rng.standard_normal((5, 3, 16)).astype(np.float32)
    layers = [(rng.standard_normal((C, k * 16)).astype(np.float32), rng.standard_normal(C).astype(np.float32))
              for k in (2, 3)]
    for a, b in zip(ops.CascadedHead(layers).step(feats, 3), ops.CascadedHead(layers, device="cuda").step(feats, 3)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@requires_gpu
def test_cuda_heads_and_crop_take_float16_inputs_as_the_cpu_takes_their_float32_values():
    """float16 features (what float16 backbones hand the loop) into the Linear layer, the
    classifier GRU step (float16 and float32 logits) and the policy step without an action
    buffer, and float16 images into the crop: each equals the CPU path run on the same values
    in float32 (the kernels widen float16 on load and compute in float32)."""
    rng = np.random.default_rng(21)
    stream = ops.Stream()
    H, I, C, n = 48, 80, 10, 7
    x16 = rng.standard_normal((n, I)).astype(np.float16)
    x = x16.astype(np.float32)  # the values the kernels see
    h = rng.standard_normal((n, H)).astype(np.float32)
    xd, hd = ops.to_device(x16, stream), ops.to_device(h, stream)
    wt, b = rng.standard_normal((C, I)).astype(np.float32) * 0.1, rng.standard_normal(C).astype(np.float32)
    y = ops.DeviceBuffer(n * C * 4)
    ops.Linear(wt, b, device="cuda").forward_device(xd, y, n, x_dtype="float16", stream=stream)
    np.testing.assert_allclose(ops.from_device(y, (n, C), np.float32, stream), ops.linear(x, wt, b),
                               rtol=1e-5, atol=1e-5)
    w = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in [(3 * H, I), (3 * H, H), (3 * H,), (3 * H,)]]
    h_ref, logits_ref, maxprob_ref, argmax_ref = ops.GRUHead(*w, wt[:, :H].copy(), b).step(x, h)
    gpu = ops.GRUHead(*w, wt[:, :H].copy(), b, device="cuda")
    for logits_dtype, dt, tol in (("float32", np.float32, 1e-5), ("float16", np.float16, 2e-3)):
        h_out, logits = ops.DeviceBuffer(n * H * 4), ops.DeviceBuffer(n * C * np.dtype(dt).itemsize)
        maxprob, argmax = ops.DeviceBuffer(n * 4), ops.DeviceBuffer(n * 4)
        gpu.step_device(xd, hd, h_out, n, logits, maxprob, argmax, x_dtype="float16", logits_dtype=logits_dtype,
                        stream=stream)
        np.testing.assert_allclose(ops.from_device(h_out, (n, H), np.float32, stream), h_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ops.from_device(logits, (n, C), dt, stream).astype(np.float32), logits_ref,
                                   rtol=tol, atol=tol)
        np.testing.assert_allclose(ops.from_device(maxprob, (n,), np.float32, stream), maxprob_ref, rtol=tol, atol=tol)
        assert np.array_equal(ops.from_device(argmax, (n,), np.int32, stream), argmax_ref)
    S, P = 64, 24
    actor_w = rng.standard_normal((2, H)).astype(np.float32) * 0.3  # coordinates spread, not at the edges
    h_a, _, coords_ref = ops.ActorHead(*w, actor_w, b[:2].copy()).step(x, h, S, P)
    h_out, coords = ops.DeviceBuffer(n * H * 4), ops.DeviceBuffer(n * 8)
    ops.ActorHead(*w, actor_w, b[:2].copy(), device="cuda").step_device(xd, hd, h_out, n, None, coords, S, P,
                                                                        x_dtype="float16", stream=stream)
    np.testing.assert_allclose(ops.from_device(h_out, (n, H), np.float32, stream), h_a, rtol=1e-5, atol=1e-5)
    got = ops.from_device(coords, (n, 2), np.int32, stream)
    # floor(sigmoid(.) * (S - P)) may land on the other side of an integer by a float32 rounding
    assert np.abs(got - coords_ref).max() <= 1 and (got == coords_ref).mean() > 0.9, (got, coords_ref)
    images16 = rng.standard_normal((n, 3, S, S)).astype(np.float16)
    where = rng.integers(0, S - P + 1, (n, 2)).astype(np.int32)
    out = ops.DeviceBuffer(n * 3 * P * P * 2)
    ops.cuda_crop_patches(ops.to_device(images16, stream), n, S, where, out, P, dtype="float16", stream=stream)
    want = np.stack([images16[i, :, y:y + P, x:x + P] for i, (y, x) in enumerate(where)])
    assert np.array_equal(ops.from_device(out, (n, 3, P, P), np.float16, stream), want)


@requires_gpu
def test_cuda_crop_rejects_bad_coordinates_without_reading_out_of_bounds():
    images = ops.to_device(np.ones((2, 3, 32, 32), np.float32))
    out = ops.DeviceBuffer(2 * 3 * 8 * 8 * 4)
    with pytest.raises(ValueError, match="out of range|lie in"):
        ops.cuda_crop_patches(images, 2, 32, np.array([[0, 0], [30, 0]], np.int32), out, 8)
    with pytest.raises(ValueError, match="out of range"):
        ops.cuda_crop_patches(images, 2, 32, ops.to_device(np.array([[0, 0], [-5, 0]], np.int32)), out, 8)


@requires_gpu
def test_device_buffer_copies_refuse_offsets_past_the_buffer_even_when_offset_plus_size_wraps():
    buf = ops.DeviceBuffer(64)
    buf.copy_from_host(np.arange(16, dtype=np.float32))
    four = np.zeros(4, np.uint8)
    for offset in (61, 2**64 - 1, 2**64 - 3):  # the last two wrap offset + 4 to a small number
        with pytest.raises(ValueError, match="overflows|overruns"):
            buf.copy_from_host(np.full(4, 255, np.uint8), offset=offset)
        with pytest.raises(ValueError, match="overflows|overruns"):
            buf.copy_to_host(four, offset=offset)
    back = np.zeros(16, np.float32)
    buf.copy_to_host(back)
    np.testing.assert_array_equal(back, np.arange(16, dtype=np.float32))


@requires_gpu
def test_cuda_rejects_host_pointers():
    host = np.zeros(16, np.float32)
    with pytest.raises(ValueError, match="host memory|not a valid"):
        ops.cuda_glance(host.ctypes.data, 1, 4, host.ctypes.data, 2, "bilinear", channels=1)


@requires_gpu
def test_cuda_accepts_torch_tensors_and_streams():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    images = torch.randn(2, 3, 64, 64, device="cuda")
    out = torch.empty(2, 3, 16, 16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were written on torch's current stream
    ops.cuda_glance(images, 2, 64, out, 16, "bicubic", stream=stream)
    stream.synchronize()
    ref = ops.glance(images.cpu().numpy(), 16, "bicubic")
    np.testing.assert_allclose(out.cpu().numpy(), ref, atol=1e-5)
