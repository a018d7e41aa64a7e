"""Bad inputs raise TypeError / ValueError with a message, never crash; the build exposes CUDA
when nvcc exists; CUDA calls without a GPU raise RuntimeError."""
from __future__ import annotations

import mmap
import os
import shutil

import numpy as np
import pytest

import child_python
from gfnet_edge import _C, ops

F32 = np.float32


@pytest.fixture()
def images():
    return np.zeros((2, 3, 32, 32), F32)


@pytest.fixture()
def frame():
    return np.zeros((40, 50, 3), np.uint8)


# ------------------------------------------------------------------------ preprocess ----
@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(image_size=0), ValueError, "image_size"),
    (dict(image_size=1.5), TypeError, "image_size must be an int"),
    (dict(image_size=True), TypeError, "image_size must be an int"),
    (dict(crop_pct=0.0), ValueError, "crop_pct"),
    (dict(crop_pct=1.5), ValueError, "crop_pct"),
    (dict(interpolation="nearest"), ValueError, "interpolation"),
    (dict(interpolation=None), TypeError, "interpolation must be a str"),
    (dict(glance_interpolation=3, glance_size=8), TypeError, "glance_interpolation must be a str"),
    (dict(image_size=2 ** 40), ValueError, "image_size must be <= 2147483647"),
    (dict(glance_interpolation="area", glance_size=8), ValueError, "glance_interpolation"),
    (dict(mean=(0.5, 0.5)), ValueError, "mean must have 3"),
    (dict(std=(0.2, 0.0, 0.2)), ValueError, "non-zero"),
    (dict(glance_size=0), ValueError, "glance_size"),
    (dict(glance_size=64), ValueError, "glance_size"),
    (dict(out=np.zeros((1, 3, 16, 16), F32)), ValueError, "out must have shape"),
    (dict(out=np.zeros((1, 3, 32, 32), np.float64)), TypeError, "float32"),
    (dict(out=np.zeros((1, 3, 32, 64), F32)[..., ::2]), ValueError, "C-contiguous"),
])
def test_preprocess_bad_arguments(frame, kwargs, exc, msg):
    kwargs = {"image_size": 32, **kwargs}
    with pytest.raises(exc, match=msg):
        ops.preprocess(frame, **kwargs)


@pytest.mark.parametrize("bad,exc,msg", [
    (np.zeros((40, 50), np.uint8), ValueError, "HxWx3"),
    (np.zeros((40, 50, 4), np.uint8), ValueError, "HxWx3"),
    (np.zeros((0, 50, 3), np.uint8), ValueError, "empty"),
    (np.zeros((40, 50, 3), np.float32), TypeError, "uint8"),
    ([], ValueError, "empty"),
    ("frame.png", TypeError, "numpy"),
    ([np.zeros((4, 4, 3), np.uint8), "x"], TypeError, "numpy"),
])
def test_preprocess_bad_frames(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        ops.preprocess(bad, 16)


_HUGE_RESIZE = """
import numpy as np
from gfnet_edge import _C, ops
f = np.zeros((2, 3, 3), np.uint8)
"""


def test_a_resize_whose_size_overflows_is_refused():
    """A shorter side so large that resized_short * longer_side overflows int64 (crop_pct near 0
    through ops, or the size itself through _C) raises ValueError instead of overflowing (and
    planning ~10^18 positions). In a child process: before, the call did not return."""
    import subprocess

    calls = ["ops.preprocess([f], 2, crop_pct=1e-18)", "ops.resize_crop([f], 2, crop_pct=1e-18)",
             '_C.resize_crop([f], 2, 2 ** 62, "bilinear")',
             '_C.preprocess([f], 2, 2 ** 63 - 1, "bicubic", False, [0.5] * 3, [0.2] * 3)']
    try:
        r = child_python.refusals(_HUGE_RESIZE, calls[2:], "too large for a 2 x 3 frame", 60)
        r = r if r.returncode else child_python.refusals(_HUGE_RESIZE, calls[:2], "at most 2^53", 60)
    except subprocess.TimeoutExpired:
        pytest.fail("the resize was planned instead of refused")
    assert r.returncode == 0 and r.stdout.strip() == "refused", r.stderr[-2000:]


def test_a_resize_that_enlarges_the_frame_too_much_is_refused_at_once():
    """A tiny crop_pct enlarges the frame enormously (480 x 640 at crop_pct 1e-7: 2.24e9 x 2.99e9)
    and planning the resize costs time in proportion to the enlargement: refused, through ops
    and _C alike, with the limit (65536 times the frame's side) in the message; crop_geometry
    refuses the same sizes."""
    f = np.zeros((480, 640, 3), np.uint8)
    msg = "enlarges the 480 x 640 frame more than 65536 times"
    for call in (lambda: ops.resize_crop(f, 224, 1e-7), lambda: ops.preprocess(f, 224, crop_pct=1e-7),
                 lambda: ops.crop_geometry(480, 640, 224, 1e-7),
                 lambda: _C.resize_crop([f], 224, 65536 * 480 + 1, "bicubic")):
        with pytest.raises(ValueError, match=msg):
            call()


@pytest.mark.parametrize("crop_pct", [1e-300, 5e-324])
def test_a_crop_pct_whose_resize_size_no_frame_takes_is_refused_by_its_own_checks(crop_pct):
    """int(image_size / crop_pct) past 2^53 fits no frame (resize size x longer side must be at
    most 2^53, longer side >= 1): ValueError naming crop_pct from every caller, not the
    extension's TypeError listing its signature, nor an OverflowError for an infinite size."""
    f = np.zeros((4, 4, 3), np.uint8)
    for call in (lambda: ops.resize_size(224, crop_pct), lambda: ops.resize_crop(f, 224, crop_pct),
                 lambda: ops.preprocess(f, 224, crop_pct=crop_pct), lambda: ops.crop_geometry(4, 4, 224, crop_pct)):
        with pytest.raises(ValueError, match=r"crop_pct .* is too small for image_size 224: .*at most 2\^53"):
            call()
    assert ops.resize_size(2 ** 20, 2.0 ** -33) == 2 ** 53  # the largest size still taken


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_a_resize_that_enlarges_the_frame_up_to_the_limit_is_done(interpolation):
    """At 65536 times the frame's shorter side the resize is planned and done (a constant frame
    stays that constant) and crop_geometry gives the sizes torchvision's Resize(int) does; one
    more is refused by both."""
    f = np.full((1, 3, 3), 77, np.uint8)
    out = _C.resize_crop([f], 4, 65536, interpolation)
    assert out.shape == (1, 4, 4, 3) and np.all(out == 77)
    assert ops.crop_geometry(1, 3, 4, 4 / 65536).resized == (65536, 3 * 65536)
    with pytest.raises(ValueError, match="more than 65536 times"):
        _C.resize_crop([f], 4, 65537, interpolation)
    with pytest.raises(ValueError, match="more than 65536 times"):
        ops.image.resized_hw(1, 3, 65537)
    # resize size x longer side past 2^53 (a 2^20 x 2^21 frame resized to 2^33 - 4), whose long
    # side the kernels could not compute exactly as Python does: refused like the kernels do
    with pytest.raises(ValueError, match=r"too large for a 1048576 x 2097152 frame \(resize size x longer side"):
        ops.crop_geometry(2 ** 20, 2 ** 21, 2 ** 31 - 1, 0.25)


def test_preprocess_readonly_out(frame):
    out = np.zeros((1, 3, 16, 16), F32)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        ops.preprocess(frame, 16, out=out)


# ----------------------------------------------------------------------- glance / crop ----
@pytest.mark.parametrize("arr,P,exc,msg", [
    (np.zeros((3, 32, 32), F32), 8, ValueError, "4 dimensions"),
    (np.zeros((1, 3, 32, 30), F32), 8, ValueError, "square"),
    (np.zeros((1, 3, 32, 32), F32), 0, ValueError, "patch_size"),
    (np.zeros((1, 3, 32, 32), np.float64), 8, TypeError, "float32"),
    ([[1.0]], 8, TypeError, "numpy"),
])
def test_glance_bad_inputs(arr, P, exc, msg):
    with pytest.raises(exc, match=msg):
        ops.glance(arr, P)


def test_glance_bad_mode_and_out(images):
    with pytest.raises(ValueError, match="interpolation"):
        ops.glance(images, 8, "lanczos")
    with pytest.raises(ValueError, match="out must have shape"):
        ops.glance(images, 8, out=np.zeros((2, 3, 9, 9), F32))


@pytest.mark.parametrize("coords,P,exc,msg", [
    (np.zeros((2, 2), np.int64), 8, TypeError, "int32"),
    (np.zeros((3, 2), np.int32), 8, ValueError, r"shape \(2, 2\)"),
    (np.zeros((2, 3), np.int32), 8, ValueError, r"shape \(2, 2\)"),
    (np.zeros(4, np.int32), 8, ValueError, "2 dimensions"),
    (np.array([[0, 0], [25, 0]], np.int32), 8, ValueError, "out of range"),
    (np.array([[0, 0], [-1, 0]], np.int32), 8, ValueError, "out of range"),
    (np.zeros((2, 2), np.int32), 33, ValueError, "exceeds"),
    (np.zeros((2, 2), np.int32), -1, ValueError, "patch_size"),
])
def test_crop_bad_inputs(images, coords, P, exc, msg):
    with pytest.raises(exc, match=msg):
        ops.crop_patches(images, coords, P)


def _inside(buf, offset, shape):
    """A C-contiguous view of `shape` starting `offset` elements into the flat array `buf`."""
    return buf.reshape(-1)[offset:offset + int(np.prod(shape))].reshape(shape)


def test_outputs_overlapping_an_input_are_refused_and_disjoint_ones_agree():
    """An out= that shares memory with an input would have the kernel read values it already
    overwrote (results silently wrong); it is refused. The same call into separate memory gives
    the result of a fresh output."""
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal(6 * 3 * 32 * 32).astype(F32)
    imgs = _inside(f32, 0, (2, 3, 32, 32))
    with pytest.raises(ValueError, match="out must not overlap images"):
        ops.glance(imgs, 16, "bilinear", out=_inside(f32, 32 * 32, (2, 3, 16, 16)))
    with pytest.raises(ValueError, match="out must not overlap images"):
        ops.glance(imgs, 32, out=imgs)
    coords = np.array([[1, 2], [8, 0]], np.int32)
    with pytest.raises(ValueError, match="out must not overlap images"):
        ops.crop_patches(imgs, coords, 8, out=_inside(f32, 100, (2, 3, 8, 8)))
    u8 = rng.integers(0, 256, 4 * 32 * 32 * 3, dtype=np.uint8)
    frames = _inside(u8, 0, (2, 32, 32, 3))
    norm = dict(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="out must not overlap frames"):
        ops.glance(frames, 4, out=_inside(u8.view(F32), 10, (2, 3, 4, 4)), **norm)
    with pytest.raises(ValueError, match="out must not overlap frames"):
        ops.crop_patches(frames, coords, 4, out=_inside(u8.view(F32), 10, (2, 3, 4, 4)), **norm)
    with pytest.raises(ValueError, match=r"out must not overlap frames\[1\]"):
        ops.resize_crop([frames[0], frames[1]], 8, crop_pct=1.0, out=_inside(u8, 32 * 32 * 3 + 5, (2, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"out must not overlap frames\[0\]"):
        ops.preprocess([frames[0]], 8, crop_pct=1.0, out=_inside(u8.view(F32), 0, (1, 3, 8, 8)))
    out = np.zeros((1, 3, 8, 8), F32)
    with pytest.raises(ValueError, match="glance_out must not overlap out"):
        ops.preprocess([frames[0]], 8, crop_pct=1.0, glance_size=4, out=out, glance_out=_inside(out, 0, (1, 3, 4, 4)))
    # disjoint outputs inside one larger buffer agree with fresh outputs
    big = np.zeros(4 * 3 * 32 * 32, F32)
    np.testing.assert_array_equal(ops.glance(imgs, 16, "bilinear", out=_inside(big, 7, (2, 3, 16, 16))),
                                  ops.glance(imgs.copy(), 16, "bilinear"))
    np.testing.assert_array_equal(ops.crop_patches(imgs, coords, 8, out=_inside(big, 3 * 32 * 32 * 2, (2, 3, 8, 8))),
                                  ops.crop_patches(imgs.copy(), coords, 8))


# ------------------------------------------------------------------------------ heads ----
def _gru_weights(I=6, H=4):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(F32) for s in [(3 * H, I), (3 * H, H), (3 * H,), (3 * H,)]]


@pytest.mark.parametrize("mutate,exc,msg", [
    (lambda w: [w[0][:5]] + w[1:], ValueError, "w_ih must have shape"),
    (lambda w: [w[0], w[1][:, :3]] + w[2:], ValueError, "w_hh must have shape"),
    (lambda w: w[:2] + [w[2][:5], w[3]], ValueError, "b_ih must have shape"),
    (lambda w: [w[0][None]] + w[1:], ValueError, "w_ih must have 2 dimensions"),
    (lambda w: [w[0].astype(object)] + w[1:], TypeError, "real numeric"),
    (lambda w: [np.full_like(w[0], np.nan)] + w[1:], ValueError, "NaN"),
])
def test_gru_bad_weights(mutate, exc, msg):
    with pytest.raises(exc, match=msg):
        ops.GRUCell(*mutate(_gru_weights()))


def test_gru_bad_step_inputs():
    cell = ops.GRUCell(*_gru_weights())
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        cell.step(np.zeros((2, 5), F32))
    with pytest.raises(ValueError, match="rows"):
        cell.step(np.zeros((2, 6), F32), np.zeros((3, 4), F32))
    with pytest.raises(ValueError, match="C-contiguous"):
        cell.step(np.zeros((2, 12), F32)[:, ::2])
    with pytest.raises(TypeError, match="float32"):
        cell.step(np.zeros((2, 6)))
    with pytest.raises(ValueError, match="weight_dtype"):
        ops.GRUCell(*_gru_weights(), weight_dtype="bfloat16")


def test_heads_bad_shapes():
    w = _gru_weights()
    with pytest.raises(ValueError, match="head takes"):
        ops.GRUHead(*w, np.zeros((10, 5), F32), np.zeros(10, F32))
    with pytest.raises(ValueError, match=r"\(2, H\)"):
        ops.ActorHead(*w, np.zeros((3, 4), F32), np.zeros(3, F32))
    actor = ops.ActorHead(*w, np.zeros((2, 4), F32), np.zeros(2, F32))
    with pytest.raises(ValueError, match="patch_size"):
        actor.step(np.zeros((1, 6), F32), None, 96, 128)
    for S in (2 ** 31 + 5, 2 ** 40):  # coordinates are int32: a larger image is refused, not wrapped
        with pytest.raises(ValueError, match="image_size must be <= 2147483647"):
            actor.step(np.zeros((1, 6), F32), None, S, 1)
    x = np.random.default_rng(0).standard_normal((1, 6)).astype(F32)
    _, action, coords = actor.step(x, None, 2 ** 31 - 1, 1)  # the largest side still computes
    assert np.array_equal(coords, np.floor(action * np.float32(2 ** 31 - 2)).astype(np.int64))
    with pytest.raises(TypeError, match="weight_dtype must be a str"):
        ops.GRUHead(*w, np.zeros((10, 4), F32), None, weight_dtype=None)
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        ops.CascadedHead([(np.zeros((3, 10), F32), None)], weight_dtype="int8")
    with pytest.raises(ValueError, match="device"):
        ops.GRUHead(*w, np.zeros((10, 4), F32), None, device="tpu")
    with pytest.raises(RuntimeError, match="device='cuda'"):
        ops.GRUHead(*w, np.zeros((10, 4), F32), None).step_device(1, None, 1, 1, 1)


def test_cascaded_bad_inputs():
    head = ops.CascadedHead([(np.zeros((3, 10), F32), np.zeros(3, F32))])
    with pytest.raises(ValueError, match="no layer"):
        head.step(np.zeros((2, 2, 4), F32), 2)
    with pytest.raises(ValueError, match="k must be in"):  # the C++ layer checks k <= T itself
        ops.CascadedHead([(np.zeros((3, 10), F32), None)]).step(np.zeros((2, 1, 5), F32), 2)
    with pytest.raises(ValueError, match="layout"):
        head.step(np.zeros((2, 2, 5), F32), 2, layout="nft")
    with pytest.raises(ValueError, match="3 dimensions"):
        head.step(np.zeros((2, 10), F32), 2)
    with pytest.raises(ValueError, match="same number of outputs"):
        ops.CascadedHead([(np.zeros((3, 10)), None), (np.zeros((4, 15)), None)])
    with pytest.raises(ValueError, match="empty"):
        ops.CascadedHead([])
    with pytest.raises(TypeError, match="pair"):
        ops.CascadedHead([np.zeros((3, 10))])


def test_linear_bad_inputs():
    with pytest.raises(ValueError, match="columns|\\(N, 5\\)"):
        ops.linear(np.zeros((2, 4), F32), np.zeros((3, 5), F32))
    with pytest.raises(ValueError, match="b must have shape"):
        ops.linear(np.zeros((2, 5), F32), np.zeros((3, 5), F32), np.zeros(4, F32))
    with pytest.raises(TypeError, match="float32"):
        ops.linear(np.zeros((2, 5), F32), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="must be >= 1"):
        ops.set_num_threads(0)
    for n in (1025, 10 ** 6, 2 ** 40):  # one line, before any thread is made
        with pytest.raises(ValueError, match="n must be <= 1024"):
            ops.set_num_threads(n)
    with pytest.raises(TypeError, match="weight_dtype must be a str"):
        ops.Linear(np.zeros((2, 2), F32), weight_dtype=None)
    # the CUDA kernels' Python side checks argument types before anything is launched
    with pytest.raises(TypeError, match="interpolation must be a str"):
        ops.cuda_glance(1, 1, 32, 1, 16, interpolation=None)
    with pytest.raises(TypeError, match="out_dtype must be a str"):
        ops.cuda_glance(1, 1, 32, 1, 16, out_dtype=16)


def test_softmax_stats_refuses_more_classes_than_an_int32_argmax_indexes():
    """One row of 2^31 + 1 classes (8 GB of address space, mapped but never read: untouched
    anonymous pages cost no memory) with its maximum at index 2^31: an int32 argmax cannot
    name it, so the row is refused before it is read (not given a negative argmax)."""
    n = 2 ** 31 + 1
    buf = mmap.mmap(-1, n * 4)
    try:
        logits = np.frombuffer(buf, np.float32).reshape(1, n)
        assert logits.flags.c_contiguous
        logits[0, n - 1] = 1.0
        with pytest.raises(ValueError, match=f"^{n} classes: predictions are int32, so at most {2 ** 31 - 1} classes$"):
            ops.softmax_stats(logits)
    finally:
        del logits
        buf.close()


@pytest.mark.skipif(not ops.has_cuda_build(), reason="the extension is built without CUDA (its CUDA calls all say so "
                                                    "first); the check runs where CUDA is compiled, GPU or not")
def test_cuda_softmax_stats_refuses_more_classes_than_an_int32_argmax_indexes_before_any_cuda_call():
    """The declared class count is checked before the device is touched (so on a machine
    without a GPU too): ValueError, not a CUDA error and not a wrapped index."""
    for classes in (2 ** 31, 2 ** 40):
        with pytest.raises(ValueError, match=f"^{classes} classes: predictions are int32"):
            ops.cuda_softmax_stats(1 << 20, 1, classes, 1 << 21, 1 << 22)
    if ops.cuda_device_count() == 0:  # the most classes pass the check and reach the device
        with pytest.raises(RuntimeError, match="CUDA"):
            ops.cuda_softmax_stats(1 << 20, 1, 2 ** 31 - 1, 1 << 21, 1 << 22)


def test_classifier_heads_refuse_more_classes_than_an_int32_argmax_indexes_from_the_weights_shape():
    """A classifier weight of 2^31 + 1 rows (a broadcast view: a huge shape, 16 bytes of memory) is
    refused from its shape, before it is converted or copied."""
    rows = 2 ** 31 + 1
    huge = np.broadcast_to(np.zeros((1, 4), F32), (rows, 4))
    match = f"^{rows} classes: predictions are int32, so at most {2 ** 31 - 1} classes$"
    gru = _gru_weights()
    with pytest.raises(ValueError, match=match):
        ops.GRUHead(*gru, huge, None)
    with pytest.raises(ValueError, match=match):
        ops.CascadedHead([(np.broadcast_to(np.zeros((1, 8), F32), (rows, 8)), None)])


# ------------------------------------------------------------------------ build / CUDA ----
def test_cuda_compiled_when_nvcc_exists():
    nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    if not nvcc or os.environ.get("GFNET_EDGE_CUDA", "").strip() == "0":
        pytest.skip("no nvcc on this machine (or GFNET_EDGE_CUDA=0): the CPU-only build is expected")
    assert ops.has_cuda_build(), "nvcc is available but the CUDA kernels were not compiled"
    assert ops.cuda_archs(), "no CUDA architecture recorded"


def _no_gpu_here() -> bool:
    """True on a machine with no GPU: torch (when installed) sees none, and there is no NVIDIA
    device node (a discrete GPU's /dev/nvidia0, a Jetson's /dev/nvhost-ctrl-gpu or /dev/nvgpu)."""
    if any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu")):
        return False
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


def test_device_count_never_raises():
    n = ops.cuda_device_count()
    assert isinstance(n, int) and n >= 0
    err = ops.cuda_device_error()
    assert isinstance(err, str)
    if _no_gpu_here():
        # no device: the count is 0 and the error says why (no CUDA build, no driver, no device)
        assert n == 0
        assert err.strip(), "cuda_device_count() is 0 but cuda_device_error() gives no reason"
        with pytest.raises(RuntimeError, match="no usable CUDA device|built without CUDA"):
            ops.require_cuda()
    elif n > 0:
        assert err == ""


def test_cuda_calls_without_gpu_raise_runtime_error():
    if ops.cuda_device_count() > 0:
        pytest.skip("a GPU is present")
    w = _gru_weights()
    for call in (lambda: ops.DeviceBuffer(16), ops.Stream, lambda: ops.cuda_device_properties(0),
                 lambda: ops.GRUHead(*w, np.zeros((3, 4), F32), None, device="cuda"),
                 lambda: ops.cuda_glance(1, 1, 8, 1, 4), lambda: ops.stream_synchronize(0),
                 ops.device_synchronize):
        with pytest.raises(RuntimeError, match="CUDA"):
            call()
