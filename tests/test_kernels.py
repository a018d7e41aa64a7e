"""CPU kernels of gfnet_edge._C against their torch references (torchvision, F.interpolate,
nn.GRUCell, nn.Linear)."""
from __future__ import annotations

import functools
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gfnet_edge import ops

torch = pytest.importorskip("torch")
tvf = pytest.importorskip("torchvision.transforms.v2.functional")
F = torch.nn.functional

MEAN, STD = ops.IMAGENET_MEAN, ops.IMAGENET_STD
ONE_LEVEL = 1.0 / 255.0 / min(STD)  # one uint8 step after normalisation


def torch_preprocess(frame, S, crop_pct=0.875, interpolation="bilinear", bgr=False, mean=MEAN, std=STD):
    """The reference chain: torchvision resize (antialias, uint8) -> centre crop -> /255 -> normalize."""
    if bgr:
        frame = np.ascontiguousarray(frame[..., ::-1])
    mode = {"bilinear": tvf.InterpolationMode.BILINEAR, "bicubic": tvf.InterpolationMode.BICUBIC}[interpolation]
    t = torch.from_numpy(frame).permute(2, 0, 1)
    r = tvf.resize(t, [int(S / crop_pct)], interpolation=mode, antialias=True)
    c = tvf.center_crop(r, [S, S])
    return tvf.normalize(c.float() / 255, list(mean), list(std)).numpy()


def torch_glance(images, P, mode):
    return F.interpolate(torch.from_numpy(images), size=(P, P), mode=mode, align_corners=True).numpy()


def assert_preprocess_close(ours, ref):
    d = np.abs(ours - ref)
    assert (d <= 1.0 / 255.0).mean() >= 0.999, f"only {(d <= 1 / 255).mean():.5f} within 1/255"
    assert d.max() <= ONE_LEVEL + 1e-5


@pytest.fixture(autouse=True)
def _threads(torch_mod):
    ops.set_num_threads(2)
    yield
    ops.set_num_threads(2)


@pytest.fixture(params=["avx2", "generic"])
def simd(request):
    """Runs a test with the AVX2 kernels and with the portable fallback."""
    if request.param == "avx2" and ops.simd_level() != "avx2":
        ops.set_simd_enabled(True)
        if ops.simd_level() != "avx2":
            pytest.skip("this CPU has no AVX2/FMA/F16C")
    ops.set_simd_enabled(request.param == "avx2")
    yield request.param
    ops.set_simd_enabled(True)


# ---------------------------------------------------------------------- preprocess ----
@pytest.mark.parametrize("hw", [(1080, 1920), (480, 640), (640, 480), (257, 311), (100, 150), (224, 224)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_preprocess_matches_torchvision(rng, simd, hw, interpolation):
    frame = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    ours = ops.preprocess(frame, 224, interpolation=interpolation)
    ref = torch_preprocess(frame, 224, interpolation=interpolation)
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == np.float32
    assert_preprocess_close(ours[0], ref)
    assert np.array_equal(ours[0], ref), "expected a bit-exact match with torchvision"


@pytest.mark.parametrize("bgr", [False, True])
def test_preprocess_of_an_s_by_s_frame_without_crop_is_exact(rng, bgr):
    """The S x S, crop_pct=1 fast path (normalisation only) equals torchvision bit for bit."""
    frame = rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
    for interp in ("bilinear", "bicubic"):
        ours, g = ops.preprocess(frame, 96, crop_pct=1.0, interpolation=interp, bgr=bgr, glance_size=32)
        ref = torch_preprocess(frame, 96, crop_pct=1.0, interpolation=interp, bgr=bgr)
        assert np.array_equal(ours[0], ref)
        np.testing.assert_allclose(g, torch_glance(ref[None], 32, "bicubic"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("S,crop_pct,interp", [(260, 0.875, "bicubic"), (300, 0.904, "bicubic"), (224, 0.875, "bilinear")])
def test_preprocess_variant_sizes(rng, S, crop_pct, interp):
    frame = rng.integers(0, 256, size=(375, 500, 3), dtype=np.uint8)
    ours = ops.preprocess(frame, S, crop_pct=crop_pct, interpolation=interp)
    assert_preprocess_close(ours[0], torch_preprocess(frame, S, crop_pct, interp))


def test_preprocess_natural_image_is_exact():
    # Smooth content (many equal neighbours) stresses the rounding of the fixed-point path.
    y, x = np.mgrid[0:720, 0:1280]
    frame = np.stack([(x * 255 // 1279), (y * 255 // 719), ((x + y) // 8) % 256], -1).astype(np.uint8)
    for interp in ("bilinear", "bicubic"):
        assert np.array_equal(ops.preprocess(frame, 224, interpolation=interp)[0],
                              torch_preprocess(frame, 224, interpolation=interp))


def test_preprocess_bgr_and_custom_norm(rng):
    frame = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    ours = ops.preprocess(frame[..., ::-1].copy(), 128, bgr=True, mean=mean, std=std)
    ref = torch_preprocess(frame, 128, mean=mean, std=std)
    assert np.array_equal(ours[0], ref)


def test_preprocess_batch_list_out_slot_and_glance(rng):
    frames = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(300, 400, 3), (256, 256, 3), (500, 333, 3)]]
    batch = np.full((5, 3, 224, 224), 7.0, np.float32)
    glance_out = np.zeros((3, 3, 96, 96), np.float32)
    images, glance = ops.preprocess(frames, 224, glance_size=96, out=batch[1:4], glance_out=glance_out)
    assert images.base is not None and np.shares_memory(images, batch)
    assert glance is glance_out
    assert np.all(batch[0] == 7.0) and np.all(batch[4] == 7.0)
    for i, f in enumerate(frames):
        ref = torch_preprocess(f, 224)
        assert np.array_equal(batch[1 + i], ref)
        np.testing.assert_allclose(glance[i], torch_glance(ref[None], 96, "bicubic")[0], atol=1e-5, rtol=0)


def test_preprocess_stacked_array_input(rng):
    frames = rng.integers(0, 256, size=(2, 120, 160, 3), dtype=np.uint8)
    out = ops.preprocess(frames, 64)
    assert out.shape == (2, 3, 64, 64)
    assert np.array_equal(out[1], ops.preprocess(frames[1], 64)[0])


def test_preprocess_large_batch_one_frame_per_task_equals_frame_by_frame(rng):
    """Batches of >= 2x the thread count run one frame per task; results are the same."""
    assert ops.get_num_threads() == 2
    sizes = [(300, 400, 3), (224, 224, 3), (500, 333, 3), (120, 160, 3)] * 3
    frames = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in sizes]
    images, glance = ops.preprocess(frames, 224, glance_size=96)
    for i, f in enumerate(frames):
        one_img, one_gl = ops.preprocess(f, 224, glance_size=96)
        assert np.array_equal(images[i], one_img[0]) and np.array_equal(glance[i], one_gl[0])
    assert np.array_equal(images[0], torch_preprocess(frames[0], 224))


def test_preprocess_thread_count_does_not_change_results(rng):
    frame = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    two = ops.preprocess(frame, 224, glance_size=96)
    ops.set_num_threads(1)
    one = ops.preprocess(frame, 224, glance_size=96)
    assert np.array_equal(two[0], one[0]) and np.array_equal(two[1], one[1])


# -------------------------------------------------------------------------- glance ----
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("S,P", [(224, 96), (224, 128), (260, 128), (300, 144), (17, 5), (8, 8), (10, 1), (5, 12)])
def test_glance_matches_interpolate(rng, simd, mode, S, P):
    images = rng.standard_normal((2, 3, S, S)).astype(np.float32)
    np.testing.assert_allclose(ops.glance(images, P, mode), torch_glance(images, P, mode), atol=1e-5, rtol=0)


@pytest.mark.parametrize("S,P", [(224, 96), (300, 144), (37, 13), (9, 9), (6, 3), (4, 11)])
def test_glance_identical_with_and_without_avx2(rng, S, P):
    """The AVX2 bicubic pass (8 outputs at a time) and the plain code sum in the same order."""
    if ops.simd_level() != "avx2":
        pytest.skip("this CPU has no AVX2/FMA/F16C")
    images = (rng.standard_normal((2, 3, S, S)) * 3).astype(np.float32)
    fast = ops.glance(images, P, "bicubic")
    ops.set_simd_enabled(False)
    try:
        plain = ops.glance(images, P, "bicubic")
    finally:
        ops.set_simd_enabled(True)
    assert np.array_equal(fast, plain)


def test_glance_out_and_channels(rng):
    images = rng.standard_normal((1, 5, 32, 32)).astype(np.float32)
    out = np.empty((1, 5, 8, 8), np.float32)
    assert ops.glance(images, 8, "bicubic", out=out) is out
    np.testing.assert_allclose(out, torch_glance(images, 8, "bicubic"), atol=1e-5, rtol=0)


# --------------------------------------------------- uint8 frames kept until cropped ----
def torch_resize_crop(frame, S, crop_pct, interpolation):
    """torchvision's uint8 resize (antialias) + centre crop, as (S, S, 3) uint8."""
    mode = {"bilinear": tvf.InterpolationMode.BILINEAR, "bicubic": tvf.InterpolationMode.BICUBIC}[interpolation]
    r = tvf.resize(torch.from_numpy(frame).permute(2, 0, 1), [int(S / crop_pct)], interpolation=mode, antialias=True)
    return tvf.center_crop(r, [S, S]).permute(1, 2, 0).contiguous().numpy()


def torch_normalise(frames, mean=MEAN, std=STD):
    """uint8 (N, S, S, 3) -> normalised (N, 3, S, S) the way torchvision does it."""
    t = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    return tvf.normalize(t, list(mean), list(std)).numpy()


@pytest.mark.parametrize("hw", [(480, 640), (257, 311), (224, 224), (100, 150)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_resize_crop_is_torchvisions_uint8_resize_and_crop(rng, simd, hw, interpolation, crop_pct):
    frames = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for _ in range(2)]
    out = ops.resize_crop(frames, 96, crop_pct, interpolation)
    assert out.dtype == np.uint8 and out.shape == (2, 96, 96, 3)
    for i, f in enumerate(frames):
        assert np.array_equal(out[i], torch_resize_crop(f, 96, crop_pct, interpolation))
    # ... and normalising it is preprocess, bit for bit
    assert np.array_equal(ops.preprocess(out, 96, crop_pct=1.0),
                          ops.preprocess(frames, 96, crop_pct=crop_pct, interpolation=interpolation))


@pytest.mark.parametrize("hw", [(1, 700), (700, 2), (3, 1500)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resize_crop_of_long_thin_frames_is_torchvisions(rng, simd, hw, interpolation):
    """Only the crop's taps are kept; their int16 precision is the full resize's (bit-exact)."""
    frame = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    assert np.array_equal(ops.resize_crop([frame], 96, 0.875, interpolation)[0],
                          torch_resize_crop(frame, 96, 0.875, interpolation))


def test_resize_plans_are_kept_for_the_most_recently_used_frame_sizes(rng):
    """The plan cache drops the least recently used size when full: its hits and misses over a
    random sequence of frame sizes are those of functools.lru_cache with the same capacity, and
    a size used between every other keeps its plan however many others pass through."""
    capacity = ops.resize_plan_cache_info().maxsize
    sizes = [(40 + i, 53) for i in range(capacity + 4)]  # sizes no other test uses, at S = 37
    hot = sizes[0]
    seq = [sizes[i] for i in rng.integers(0, len(sizes), 300)]
    seq += [s for i in range(1, len(sizes)) for s in (hot, sizes[i])]

    reference = functools.lru_cache(maxsize=capacity)(lambda hw: None)
    before = ops.resize_plan_cache_info()
    for hw in seq:
        ops.resize_crop([np.zeros((*hw, 3), np.uint8)], 37, 0.875, "bilinear")
        reference(hw)
    after, ref = ops.resize_plan_cache_info(), reference.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (ref.hits, ref.misses)
    assert after.currsize == capacity
    hits = after.hits
    ops.resize_crop([np.zeros((*hot, 3), np.uint8)], 37, 0.875, "bilinear")
    assert ops.resize_plan_cache_info().hits == hits + 1


def _layouts(a: np.ndarray) -> dict:
    """Views of `a`'s values in other memory layouts (none C-contiguous): Fortran order, a
    transposed view of a transposed copy, and negative strides (a reversed copy seen reversed)."""
    views = {"fortran": np.asfortranarray(a),
             "transposed": np.ascontiguousarray(np.swapaxes(a, 0, 1)).swapaxes(0, 1),
             "negative_strides": a[::-1].copy()[::-1]}
    for name, v in views.items():
        assert not v.flags.c_contiguous and np.array_equal(v, a), name
    return views


def test_image_ops_take_frames_in_any_layout_as_their_contiguous_copy(rng):
    """preprocess / resize_crop / glance / crop_patches (and normalise_frames through preprocess)
    give a frame or image in Fortran order, a transposed view or with negative strides the
    result of its C-contiguous copy: one frame, a stacked array, a list, uint8 frames and float
    images, and crop_patches' coordinates and index likewise."""
    frame = rng.integers(0, 256, (37, 52, 3), dtype=np.uint8)
    stacked = rng.integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    images = rng.standard_normal((2, 3, 24, 24)).astype(np.float32)
    for name, view in _layouts(frame).items():
        assert np.array_equal(ops.preprocess(view, 32), ops.preprocess(frame.copy(), 32)), name
        assert np.array_equal(ops.resize_crop([view, frame], 32, interpolation="bicubic"),
                              ops.resize_crop([frame.copy(), frame], 32, interpolation="bicubic")), name
    for name, view in _layouts(stacked).items():
        want, want_gl = ops.preprocess(stacked.copy(), 16, glance_size=8)
        got, got_gl = ops.preprocess(view, 16, glance_size=8)
        assert np.array_equal(got, want) and np.array_equal(got_gl, want_gl), name
        assert np.array_equal(ops.resize_crop(view, 16), ops.resize_crop(stacked.copy(), 16)), name
        assert np.array_equal(ops.glance(view, 8, mean=MEAN, std=STD),
                              ops.glance(stacked.copy(), 8, mean=MEAN, std=STD)), name
        assert np.array_equal(ops.normalise_frames(view), ops.normalise_frames(stacked.copy())), name
        coords = np.array([[0, 16], [3, 5], [16, 0]], np.int32)  # frames of 24 x 24, patches of 8
        assert np.array_equal(ops.crop_patches(view, coords, 8, mean=MEAN, std=STD),
                              ops.crop_patches(stacked.copy(), coords, 8, mean=MEAN, std=STD)), name
    coords = np.array([[1, 16], [16, 0], [9, 4]], np.int32)
    index = np.array([1, 0, 1], np.int64)
    want = ops.crop_patches(images.copy(), coords, 8, index=index)
    for name, view in _layouts(images).items():
        assert np.array_equal(ops.glance(view, 8, "bilinear"), ops.glance(images.copy(), 8, "bilinear")), name
        assert np.array_equal(ops.crop_patches(view, coords, 8, index=index), want), name
    for name, view in _layouts(coords).items():  # the coordinates and the index of any layout too
        assert np.array_equal(ops.crop_patches(images, view, 8, index=index[::-1].copy()[::-1]), want), name
    assert frame.flags.c_contiguous and images.flags.c_contiguous  # the inputs themselves are left as they are


def test_long_thin_frame_is_preprocessed_in_bounded_memory():
    """A 1 x 400 000 frame (1.2 MB): the taps of its whole resize (224 x 9 * 10^7) would take
    gigabytes; those of the crop take kilobytes, under a 300 MB address-space ceiling."""
    code = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import numpy as np
from gfnet_edge import ops
ops.set_num_threads(1)  # worker threads reserve address space of their own, more on machines with more cores
frame = np.full((1, 400_000, 3), 200, np.uint8)
vm = int([l for l in open('/proc/self/status') if l.startswith('VmSize:')][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (300 << 20),) * 2)
out = ops.resize_crop([frame], 224, 0.875, "bilinear")
assert out.shape == (1, 224, 224, 3) and (out == 200).all()
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_long_thin_frame_is_planned_without_visiting_its_whole_resize(interpolation):
    """A 1 x 10^7 frame resized to a shorter side of 256 has 2.6 x 10^9 output columns; computing
    the taps of each (to find the largest weight) took about 19 s. The plan computes the
    positions the image border cuts and the crop's, so the first call is as quick as the next."""
    frame = np.full((1, 10_000_000, 3), 200, np.uint8)
    t0 = time.perf_counter()
    out = ops.resize_crop([frame], 224, 0.875, interpolation)
    assert time.perf_counter() - t0 < 2.0
    assert out.shape == (1, 224, 224, 3) and (out == 200).all()


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("S,P", [(224, 96), (300, 144), (17, 5), (8, 8), (10, 1), (5, 12)])
def test_glance_of_uint8_frames_matches_interpolate_of_normalised(rng, simd, mode, S, P):
    frames = rng.integers(0, 256, (2, S, S, 3), dtype=np.uint8)
    ref = torch_glance(torch_normalise(frames), P, mode)
    np.testing.assert_allclose(ops.glance(frames, P, mode, mean=MEAN, std=STD), ref, atol=1e-5, rtol=0)
    # BGR frames give the same (RGB) glance
    bgr = np.ascontiguousarray(frames[..., ::-1])
    np.testing.assert_allclose(ops.glance(bgr, P, mode, mean=MEAN, std=STD, bgr=True), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("S,P", [(224, 96), (300, 144), (37, 13)])
def test_glance_of_uint8_frames_identical_with_and_without_avx2(rng, mode, S, P):
    """Same operations in the same order on both paths (the build keeps multiplies and adds
    unfused: with contraction the AVX2 vertical pass differed in the last bit at 224 -> 96)."""
    if ops.simd_level() != "avx2":
        pytest.skip("this CPU has no AVX2/FMA/F16C")
    frames = rng.integers(0, 256, (2, S, S, 3), dtype=np.uint8)
    fast = ops.glance(frames, P, mode, mean=MEAN, std=STD)
    ops.set_simd_enabled(False)
    try:
        plain = ops.glance(frames, P, mode, mean=MEAN, std=STD)
    finally:
        ops.set_simd_enabled(True)
    assert np.array_equal(fast, plain)


@pytest.mark.parametrize("bgr", [False, True])
def test_crop_patches_of_uint8_frames_is_exact_normalised_slicing(rng, bgr):
    frames = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    rgb = np.ascontiguousarray(frames[..., ::-1]) if bgr else frames
    coords = np.array([[0, 0], [40, 40], [13, 7], [40, 0]], np.int32)
    mean, std = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)
    patches = ops.crop_patches(frames, coords, 24, mean=mean, std=std, bgr=bgr)
    ref = torch_normalise(rgb, mean, std)
    for i, (r, c) in enumerate(coords):
        assert np.array_equal(patches[i], ref[i, :, r:r + 24, c:c + 24])


def test_uint8_frames_bad_arguments(rng):
    frames = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    coords = np.zeros((2, 2), np.int32)
    with pytest.raises(TypeError, match="need mean and std"):
        ops.glance(frames, 8)
    with pytest.raises(TypeError, match="need mean and std"):
        ops.crop_patches(frames, coords, 8, mean=MEAN)
    with pytest.raises(ValueError, match="uint8 frames only"):
        ops.glance(frames.astype(np.float32), 8, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"\(N, S, S, 3\)"):
        ops.glance(rng.integers(0, 256, (2, 32, 30, 3), dtype=np.uint8), 8, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"\(N, S, S, 3\)"):
        ops.crop_patches(rng.integers(0, 256, (2, 32, 32, 4), dtype=np.uint8), coords, 8, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="out of range"):
        ops.crop_patches(frames, np.array([[0, 0], [25, 0]], np.int32), 8, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="non-zero"):
        ops.crop_patches(frames, coords, 8, mean=MEAN, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="crop_pct"):
        ops.resize_crop(frames[0], 16, crop_pct=1.5)


# ---------------------------------------------------------------------------- crop ----
def test_crop_patches_matches_slicing(rng):
    images = rng.standard_normal((4, 3, 64, 64)).astype(np.float32)
    coords = np.array([[0, 0], [40, 40], [13, 7], [40, 0]], np.int32)
    patches = ops.crop_patches(images, coords, 24)
    for i, (r, c) in enumerate(coords):
        assert np.array_equal(patches[i], images[i, :, r:r + 24, c:c + 24])


@pytest.mark.parametrize("kind", ["float32", "uint8"])
def test_crop_patches_by_index_picks_the_images_without_copying_them(rng, kind):
    """index[i] names the image patch i is cut from: the loop's running images, any order,
    repeats allowed."""
    frames = rng.integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
    images = ops.preprocess(frames, 40, crop_pct=1.0)
    index = np.array([4, 0, 4, 2], np.int64)
    coords = np.array([[0, 0], [24, 24], [3, 17], [24, 0]], np.int32)
    src, kw = (images, {}) if kind == "float32" else (frames, dict(mean=MEAN, std=STD))
    patches = ops.crop_patches(src, coords, 16, index=index, **kw)
    assert patches.shape == (4, 3, 16, 16)
    for i, (k, (r, c)) in enumerate(zip(index, coords)):
        assert np.array_equal(patches[i], images[k, :, r:r + 16, c:c + 16])
    with pytest.raises(ValueError, match=r"index\[1\] = 5 is out of range"):
        ops.crop_patches(src, coords, 16, index=np.array([0, 5, 1, 1], np.int64), **kw)
    with pytest.raises(ValueError, match=r"index\[0\] = -1 is out of range"):
        ops.crop_patches(src, coords, 16, index=np.array([-1, 0, 1, 1], np.int64), **kw)
    with pytest.raises(ValueError, match=r"coords must have shape \(3, 2\)"):
        ops.crop_patches(src, coords, 16, index=np.array([0, 1, 2], np.int64), **kw)
    with pytest.raises(TypeError, match="dtype"):
        ops.crop_patches(src, coords, 16, index=index.astype(np.int32), **kw)


@pytest.mark.parametrize("bad", [[-1, 0], [0, -1], [41, 0], [0, 41], [2**31 - 1, 0]])
def test_crop_patches_rejects_out_of_range(rng, bad):
    images = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    coords = np.array([[0, 0], bad], np.int32)
    with pytest.raises(ValueError, match="out of range"):
        ops.crop_patches(images, coords, 24)


# ----------------------------------------------------------------------- GRU heads ----
def _gru(I, H, seed=0):
    torch.manual_seed(seed)
    cell = torch.nn.GRUCell(I, H)
    return cell, [p.detach().numpy() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)]


@pytest.mark.parametrize("I,H,B", [(2048, 1024, 1), (2048, 1024, 3), (256, 256, 64), (37, 19, 5), (1, 1, 1)])
def test_gru_cell_matches_torch(rng, simd, I, H, B):
    cell, w = _gru(I, H)
    x = rng.standard_normal((B, I)).astype(np.float32)
    h = rng.standard_normal((B, H)).astype(np.float32)
    with torch.no_grad():
        ref = cell(torch.from_numpy(x), torch.from_numpy(h)).numpy()
        ref0 = cell(torch.from_numpy(x)).numpy()
    ours = ops.GRUCell(*w)
    np.testing.assert_allclose(ours.step(x, h), ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ours.step(x, None), ref0, atol=1e-5, rtol=1e-5)
    half = ops.GRUCell(*w, weight_dtype="float16")
    np.testing.assert_allclose(half.step(x, h), ref, atol=3e-3, rtol=0)


def test_gru_matches_multistep_nn_gru(rng):
    torch.manual_seed(1)
    gru = torch.nn.GRU(64, 32)
    xs = rng.standard_normal((5, 3, 64)).astype(np.float32)
    with torch.no_grad():
        ref, _ = gru(torch.from_numpy(xs))
    cell = ops.GRUCell(gru.weight_ih_l0.detach().numpy(), gru.weight_hh_l0.detach().numpy(),
                       gru.bias_ih_l0.detach().numpy(), gru.bias_hh_l0.detach().numpy())
    h = None
    for t in range(5):
        h = cell.step(xs[t], h)
        np.testing.assert_allclose(h, ref[t].numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B", [1, 4, 64])
def test_gru_classifier_head(rng, simd, B):
    cell, w = _gru(96, 48)
    fc = torch.nn.Linear(48, 10)
    head = ops.GRUHead(*w, fc.weight.detach().numpy(), fc.bias.detach().numpy())
    x = rng.standard_normal((B, 96)).astype(np.float32)
    h = rng.standard_normal((B, 48)).astype(np.float32)
    h_new, logits, maxprob, argmax = head.step(x, h)
    with torch.no_grad():
        rh = cell(torch.from_numpy(x), torch.from_numpy(h))
        rl = fc(rh)
        rp = torch.softmax(rl, 1)
    np.testing.assert_allclose(h_new, rh.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits, rl.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(maxprob, rp.max(1).values.numpy(), atol=1e-6, rtol=1e-5)
    assert argmax.dtype == np.int32 and np.array_equal(argmax, rl.argmax(1).numpy())


@pytest.mark.parametrize("S,P", [(224, 96), (224, 128), (300, 144)])
def test_actor_head_coordinates(rng, S, P):
    cell, w = _gru(256, 256)
    actor = torch.nn.Linear(256, 2)
    with torch.no_grad():
        actor.weight.mul_(8)  # spread the actions over (0, 1)
    head = ops.ActorHead(*w, actor.weight.detach().numpy(), actor.bias.detach().numpy())
    x = rng.standard_normal((32, 256)).astype(np.float32)
    h_new, action, coords = head.step(x, None, S, P)
    with torch.no_grad():
        rh = cell(torch.from_numpy(x))
        ra = torch.sigmoid(actor(rh))
        rc = torch.floor(ra * (S - P)).int()
    np.testing.assert_allclose(h_new, rh.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(action, ra.numpy(), atol=1e-6, rtol=0)
    assert coords.dtype == np.int32 and coords.shape == (32, 2)
    # floor() may differ only where action * (S - P) is within float error of an integer.
    scaled = ra.numpy() * (S - P)
    near_int = np.abs(scaled - np.round(scaled)) < 1e-3
    assert np.array_equal(coords[~near_int], rc.numpy()[~near_int])
    assert np.abs(coords - rc.numpy()).max() <= 1
    assert coords.min() >= 0 and coords.max() <= S - P


@pytest.mark.parametrize("layout", ["ntf", "tnf"])
def test_cascaded_head(rng, simd, layout):
    T, N, Fd, C = 4, 6, 40, 11
    torch.manual_seed(2)
    fcs = {k: torch.nn.Linear(k * Fd, C) for k in range(2, T + 1)}
    head = ops.CascadedHead([(fcs[k].weight.detach().numpy(), fcs[k].bias.detach().numpy()) for k in range(2, T + 1)])
    feats = rng.standard_normal((N, T, Fd)).astype(np.float32)
    buf = feats if layout == "ntf" else np.ascontiguousarray(feats.transpose(1, 0, 2))
    for k in range(2, T + 1):
        logits, maxprob, argmax = head.step(buf, k, layout=layout)
        with torch.no_grad():
            ref = fcs[k](torch.from_numpy(feats[:, :k].reshape(N, -1)))
        np.testing.assert_allclose(logits, ref.numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(maxprob, torch.softmax(ref, 1).max(1).values.numpy(), rtol=1e-5, atol=1e-6)
        assert np.array_equal(argmax, ref.argmax(1).numpy())
    with pytest.raises(ValueError, match="no layer takes k=1"):
        head.step(buf, 1, layout=layout)


@pytest.mark.parametrize("relu", [False, True])
def test_linear_and_linear_class(rng, simd, relu):
    lin = torch.nn.Linear(300, 70)
    x = rng.standard_normal((9, 300)).astype(np.float32)
    with torch.no_grad():
        ref = lin(torch.from_numpy(x))
        ref = torch.relu(ref) if relu else ref
    w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    np.testing.assert_allclose(ops.linear(x, w, b, relu=relu), ref.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ops.Linear(w, b)(x, relu=relu), ref.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ops.Linear(w, b, weight_dtype="float16")(x, relu=relu), ref.numpy(), atol=2e-3)
    np.testing.assert_allclose(ops.linear(x, w, None), (x @ w.T), atol=1e-4)


def test_softmax_stats(rng):
    logits = rng.standard_normal((7, 1000)).astype(np.float32) * 5
    logits[3, 10] = logits[3, 20] = 100.0  # ties: the first index wins, as torch.argmax
    maxprob, argmax = ops.softmax_stats(logits)
    t = torch.from_numpy(logits)
    np.testing.assert_allclose(maxprob, torch.softmax(t, 1).max(1).values.numpy(), rtol=1e-5)
    assert np.array_equal(argmax, t.argmax(1).numpy()) and argmax[3] == 10


def test_simd_and_generic_paths_agree(rng):
    if ops.simd_level() != "avx2":
        pytest.skip("no AVX2 on this CPU")
    _, w = _gru(333, 77)
    x = rng.standard_normal((3, 333)).astype(np.float32)
    frame = rng.integers(0, 256, size=(333, 444, 3), dtype=np.uint8)
    fast = ops.GRUCell(*w).step(x), ops.preprocess(frame, 200, interpolation="bicubic")
    ops.set_simd_enabled(False)
    try:
        slow = ops.GRUCell(*w).step(x), ops.preprocess(frame, 200, interpolation="bicubic")
    finally:
        ops.set_simd_enabled(True)
    np.testing.assert_allclose(fast[0], slow[0], atol=1e-6, rtol=1e-6)
    assert np.array_equal(fast[1], slow[1])


def test_thread_pool_back_to_back_jobs_stay_correct():
    """Many tiny parallel jobs in a row, more threads than cores: every result must be exact.
    (A worker leaving one job while the next is posted must never run the next job's tasks
    under the old generation; that once crashed a 16-core machine.)"""
    rng = np.random.default_rng(7)
    x = rng.random((2, 3, 40, 40), dtype=np.float32)
    coords = np.array([[1, 2], [3, 4]], np.int32)
    before = ops.get_num_threads()
    ops.set_num_threads(6)
    try:
        ref_g, ref_c = ops.glance(x, 16, "bicubic"), ops.crop_patches(x, coords, 8)
        for _ in range(3000):
            assert np.array_equal(ops.glance(x, 16, "bicubic"), ref_g)
            assert np.array_equal(ops.crop_patches(x, coords, 8), ref_c)
    finally:
        ops.set_num_threads(before)
