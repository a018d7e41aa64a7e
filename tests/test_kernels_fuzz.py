"""Property-based fuzzing of the CPU kernels (sizes, batch, coordinates, dtypes) against torch."""
from __future__ import annotations

import numpy as np
import pytest

from gfnet_edge import ops

torch = pytest.importorskip("torch")
tvf = pytest.importorskip("torchvision.transforms.v2.functional")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

F = torch.nn.functional
FUZZ = settings(max_examples=30, deadline=None, derandomize=True)
MODES = st.sampled_from(["bilinear", "bicubic"])
WRONG_FLOATS = st.sampled_from([np.float64, np.float16, np.int32, np.uint8, np.int64])


@pytest.fixture(autouse=True, scope="module")
def _threads():
    torch.set_num_threads(2)
    ops.set_num_threads(2)


def _rng(seed):
    return np.random.default_rng(seed)


@FUZZ
@given(h=st.integers(8, 300), w=st.integers(8, 300), S=st.integers(4, 96),
       crop_pct=st.floats(0.5, 1.0), interp=MODES, bgr=st.booleans(), seed=st.integers(0, 2**31))
def test_preprocess_fuzz(h, w, S, crop_pct, interp, bgr, seed):
    frame = _rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    ours = ops.preprocess(frame, S, crop_pct=crop_pct, interpolation=interp, bgr=bgr)[0]
    rgb = frame[..., ::-1] if bgr else frame
    mode = tvf.InterpolationMode.BILINEAR if interp == "bilinear" else tvf.InterpolationMode.BICUBIC
    t = tvf.resize(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1), [int(S / crop_pct)],
                   interpolation=mode, antialias=True)
    ref = tvf.normalize(tvf.center_crop(t, [S, S]).float() / 255, list(ops.IMAGENET_MEAN), list(ops.IMAGENET_STD))
    d = np.abs(ours - ref.numpy())
    assert (d <= 1 / 255).mean() >= 0.999
    assert np.array_equal(ours, ref.numpy())


@settings(max_examples=60, deadline=None, derandomize=True)
@given(short=st.integers(1, 12), long=st.integers(40, 900), S=st.integers(8, 64), crop_pct=st.floats(0.5, 1.0),
       interp=MODES, tall=st.booleans(), seed=st.integers(0, 2**31))
def test_resize_crop_of_upsampled_thin_frames_fuzz(short, long, S, crop_pct, interp, tall, seed):
    """Frames whose shorter side is upsampled (their long side by as much), so the resize plan
    takes its int16 precision from the filter's border positions: bit for bit torchvision's."""
    hw = (long, short) if tall else (short, long)
    frame = _rng(seed).integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    mode = tvf.InterpolationMode.BILINEAR if interp == "bilinear" else tvf.InterpolationMode.BICUBIC
    t = tvf.resize(torch.from_numpy(frame).permute(2, 0, 1), [int(S / crop_pct)], interpolation=mode, antialias=True)
    ref = tvf.center_crop(t, [S, S]).permute(1, 2, 0).numpy()
    assert np.array_equal(ops.resize_crop([frame], S, crop_pct, interp)[0], ref)


@FUZZ
@given(n=st.integers(1, 3), c=st.integers(1, 4), S=st.integers(1, 80), P=st.integers(1, 80), mode=MODES,
       seed=st.integers(0, 2**31))
def test_glance_fuzz(n, c, S, P, mode, seed):
    images = _rng(seed).standard_normal((n, c, S, S)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(images), size=(P, P), mode=mode, align_corners=True).numpy()
    np.testing.assert_allclose(ops.glance(images, P, mode), ref, atol=1e-5, rtol=0)


@FUZZ
@given(n=st.integers(1, 3), S=st.integers(1, 80), P=st.integers(1, 80), mode=MODES, bgr=st.booleans(),
       seed=st.integers(0, 2**31))
def test_glance_of_uint8_frames_fuzz(n, S, P, mode, bgr, seed):
    frames = _rng(seed).integers(0, 256, size=(n, S, S, 3), dtype=np.uint8)
    rgb = frames[..., ::-1] if bgr else frames
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float() / 255
    norm = tvf.normalize(t, list(ops.IMAGENET_MEAN), list(ops.IMAGENET_STD))
    ref = F.interpolate(norm, size=(P, P), mode=mode, align_corners=True).numpy()
    ours = ops.glance(frames, P, mode, mean=ops.IMAGENET_MEAN, std=ops.IMAGENET_STD, bgr=bgr)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@FUZZ
@given(n=st.integers(1, 4), S=st.integers(1, 40), P=st.integers(1, 40), data=st.data())
def test_crop_of_uint8_frames_fuzz(n, S, P, data):
    frames = _rng(n * 1000 + S).integers(0, 256, size=(n, S, S, 3), dtype=np.uint8)
    coords = np.array(data.draw(st.lists(st.tuples(st.integers(-3, S + 3), st.integers(-3, S + 3)),
                                         min_size=n, max_size=n)), np.int32).reshape(n, 2)
    valid = P <= S and bool(np.all((coords >= 0) & (coords <= S - P)))
    kw = dict(mean=ops.IMAGENET_MEAN, std=ops.IMAGENET_STD)
    if not valid:
        with pytest.raises(ValueError):
            ops.crop_patches(frames, coords, P, **kw)
        return
    out = ops.crop_patches(frames, coords, P, **kw)
    images = ops.preprocess(frames, S, crop_pct=1.0)
    for i, (r, c) in enumerate(coords):
        assert np.array_equal(out[i], images[i, :, r:r + P, c:c + P])


@FUZZ
@given(n=st.integers(1, 6), S=st.integers(1, 48), P=st.integers(1, 48), data=st.data())
def test_crop_fuzz(n, S, P, data):
    images = np.arange(n * 3 * S * S, dtype=np.float32).reshape(n, 3, S, S)
    coords = np.array(data.draw(st.lists(st.tuples(st.integers(-3, S + 3), st.integers(-3, S + 3)),
                                         min_size=n, max_size=n)), np.int32).reshape(n, 2)
    valid = P <= S and bool(np.all((coords >= 0) & (coords <= S - P)))
    if not valid:
        with pytest.raises(ValueError):
            ops.crop_patches(images, coords, P)
        return
    out = ops.crop_patches(images, coords, P)
    for i, (r, c) in enumerate(coords):
        assert np.array_equal(out[i], images[i, :, r:r + P, c:c + P])


@FUZZ
@given(I=st.integers(1, 70), H=st.integers(1, 40), B=st.integers(1, 64), zero_h=st.booleans(),
       half=st.booleans(), seed=st.integers(0, 2**31))
def test_gru_fuzz(I, H, B, zero_h, half, seed):
    torch.manual_seed(seed % 10_000)
    cell = torch.nn.GRUCell(I, H)
    rng = _rng(seed)
    x = rng.standard_normal((B, I)).astype(np.float32)
    h = None if zero_h else rng.standard_normal((B, H)).astype(np.float32)
    with torch.no_grad():
        ref = cell(torch.from_numpy(x), None if h is None else torch.from_numpy(h)).numpy()
    w = [p.detach().numpy() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)]
    ours = ops.GRUCell(*w, weight_dtype="float16" if half else "float32").step(x, h)
    np.testing.assert_allclose(ours, ref, atol=3e-3 if half else 1e-5, rtol=0 if half else 1e-5)


@FUZZ
@given(T=st.integers(1, 5), N=st.integers(1, 20), Fd=st.integers(1, 50), C=st.integers(1, 30),
       layout=st.sampled_from(["ntf", "tnf"]), data=st.data())
def test_cascaded_fuzz(T, N, Fd, C, layout, data):
    k = data.draw(st.integers(1, T))
    rng = _rng(T * 1000 + N * 10 + Fd)
    W = rng.standard_normal((C, k * Fd)).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    feats = rng.standard_normal((N, T, Fd)).astype(np.float32)
    buf = feats if layout == "ntf" else np.ascontiguousarray(feats.transpose(1, 0, 2))
    logits, maxprob, argmax = ops.CascadedHead([(W, b)]).step(buf, k, layout=layout)
    ref = feats[:, :k].reshape(N, -1).astype(np.float64) @ W.T.astype(np.float64) + b
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)
    assert np.array_equal(argmax, np.argmax(logits, 1))


@FUZZ
@given(dtype=WRONG_FLOATS, which=st.sampled_from(["glance", "crop_images", "crop_coords", "gru_x", "gru_h",
                                                  "linear_x", "frame", "cascaded"]))
def test_wrong_dtypes_raise_type_error(dtype, which):
    rng = _rng(0)
    imgs = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    cell = ops.GRUCell(rng.standard_normal((12, 5)), rng.standard_normal((12, 4)))
    with pytest.raises(TypeError, match="dtype|must be"):
        if which == "glance":
            ops.glance(imgs.astype(dtype), 8)
        elif which == "crop_images":
            ops.crop_patches(imgs.astype(dtype), np.zeros((1, 2), np.int32), 8)
        elif which == "crop_coords":
            ops.crop_patches(imgs, np.zeros((1, 2), dtype if dtype != np.int32 else np.float32), 8)
        elif which == "gru_x":
            cell.step(np.zeros((2, 5), dtype))
        elif which == "gru_h":
            cell.step(np.zeros((2, 5), np.float32), np.zeros((2, 4), dtype))
        elif which == "linear_x":
            ops.linear(np.zeros((2, 5), dtype), np.zeros((3, 5), np.float32))
        elif which == "frame":
            ops.preprocess(np.zeros((20, 20, 3), dtype if dtype != np.uint8 else np.float32), 8)
        else:
            ops.CascadedHead([(np.zeros((3, 10)), np.zeros(3))]).step(np.zeros((2, 2, 5), dtype), 2)
