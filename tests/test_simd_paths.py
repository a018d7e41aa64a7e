"""The SIMD kernels (AVX2 on x86-64, NEON on aarch64) against the portable loops, on shapes
chosen to reach every branch of the fast paths: resize filters of 1 to 8+ tap groups, row and
column counts that leave tails, batch sizes of every GEMV tile, float32 and float16 weights.

No torch: this runs on the device side too (under qemu-aarch64 in ``tools/aarch64_check.sh``).
The reference is the same extension with its SIMD kernels disabled. The resize and glance
kernels do the portable arithmetic in the same order on both instruction sets, so they must be
bit-identical; so must NEON's GEMV. AVX2's GEMV uses fused multiply-adds, which round once
instead of twice, so there the two are compared within float32's rounding bound of the sums
(GRU cells, whose outputs are squashed to (-1, 1), within 1e-6).
"""
from __future__ import annotations

import numpy as np
import pytest

from gfnet_edge import ops

#: GRU-cell tolerance of each SIMD level against the portable loops; None: bit-identical.
GEMV_TOL = {"avx2": 1e-6, "neon": None}


@pytest.fixture(scope="module")
def level():
    ops.set_simd_enabled(True)
    lvl = ops.simd_level()
    if lvl == "generic":
        pytest.skip("this build has no SIMD kernels for this CPU: nothing to compare")
    assert lvl in GEMV_TOL, f"unknown SIMD level {lvl}"
    return lvl


def both(fn):
    """``fn()`` with the SIMD kernels, then with the portable loops."""
    ops.set_simd_enabled(True)
    try:
        fast = fn()
        ops.set_simd_enabled(False)
        plain = fn()
    finally:
        ops.set_simd_enabled(True)
    return fast, plain


def assert_identical(fast, plain):
    for f, p in zip(fast if isinstance(fast, tuple) else (fast,), plain if isinstance(plain, tuple) else (plain,)):
        assert f.shape == p.shape and f.dtype == p.dtype
        bad = np.flatnonzero(f.ravel() != p.ravel())
        assert bad.size == 0, f"{bad.size} of {f.size} values differ, first at {bad[0]}"


# The horizontal pass filters groups of 4 taps, 2 * ceil(support) + 1 taps with support = f
# (bilinear) or 2 f (bicubic) for a downscale by f, 1 or 2 for an upscale. Groups: 224x224 ->
# 256 bilinear 1; 61x70 -> 69 bicubic, 57x91 -> 21 bilinear and 333x444 -> 228 bicubic 2;
# 1080x1920 -> 256 bilinear 3; 768x1024 -> 256 bicubic 4; 1080x1920 -> 256 (224) bicubic 5 (6),
# the loop for any count. resize_crop of 224x224 at 224 is a copy.
@pytest.mark.parametrize("hw,S,interpolation", [
    ((1080, 1920, 3), 224, "bicubic"), ((1080, 1920, 3), 224, "bilinear"), ((768, 1024, 3), 224, "bicubic"),
    ((333, 444, 3), 200, "bicubic"),
    ((57, 91, 3), 19, "bilinear"), ((61, 70, 3), 61, "bicubic"), ((224, 224, 3), 224, "bilinear"),
])
def test_preprocess_and_resize_crop_identical(level, rng, hw, S, interpolation):
    frame = rng.integers(0, 256, hw, dtype=np.uint8)
    assert_identical(*both(lambda: ops.preprocess(frame, S, 0.875, interpolation, glance_size=S // 2 + 1)))
    assert_identical(*both(lambda: ops.resize_crop(frame, S, 1.0, interpolation)))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("S,P", [(224, 96), (37, 13), (9, 9), (6, 3), (4, 11), (30, 7)])
def test_glance_identical(level, rng, mode, S, P):
    images = (rng.standard_normal((2, 3, S, S)) * 3).astype(np.float32)
    assert_identical(*both(lambda: ops.glance(images, P, mode)))
    frames = rng.integers(0, 256, (2, S, S, 3), dtype=np.uint8)
    assert_identical(*both(lambda: ops.glance(frames, P, mode, mean=ops.IMAGENET_MEAN, std=ops.IMAGENET_STD)))


# Rows: tails of every row tile (6, 4, 3, 2 rows and single rows); k: below, at and past one
# 8-column block; batch 1 to 5 and 9: every (rows x batch) tile and the leftover items.
@pytest.mark.parametrize("weight_dtype", ["float32", "float16"])
@pytest.mark.parametrize("out_f,in_f", [(1, 1), (7, 7), (13, 8), (6, 9), (23, 33), (70, 300)])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 9])
def test_linear_gemv(level, rng, weight_dtype, out_f, in_f, batch):
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    b = rng.standard_normal(out_f).astype(np.float32)
    x = rng.standard_normal((batch, in_f)).astype(np.float32)
    layer = ops.Linear(w, b, weight_dtype=weight_dtype)
    fast, plain = both(lambda: layer(x))
    ws = w.astype(np.float16).astype(np.float64) if weight_dtype == "float16" else w.astype(np.float64)
    # float32 rounding bound of these sums (8 partial sums of k / 8 terms, then 3 + 1 adds)
    bound = (in_f / 8 + 4) * 2.0 ** -23 * (np.abs(x.astype(np.float64)) @ np.abs(ws).T + np.abs(b))
    if GEMV_TOL[level] is None:
        assert_identical(fast, plain)
    else:  # fused and separate multiply-adds: both within the bound of the exact sums
        assert (np.abs(fast.astype(np.float64) - plain) <= 2 * bound).all()
    # and the result is the product it claims to be (float64 on the stored weights)
    assert (np.abs(fast - (x.astype(np.float64) @ ws.T + b)) <= bound).all()


@pytest.mark.parametrize("I,H,B", [(96, 48, 1), (256, 256, 2), (37, 19, 3)])
def test_gru_cell(level, rng, I, H, B):
    # torch.nn.GRUCell's initialisation: uniform in +-1/sqrt(H)
    w = [rng.uniform(-1, 1, s).astype(np.float32) / np.sqrt(H) for s in ((3 * H, I), (3 * H, H), (3 * H,), (3 * H,))]
    x = rng.standard_normal((B, I)).astype(np.float32)
    h = rng.standard_normal((B, H)).astype(np.float32)
    for dtype in ("float32", "float16"):
        cell = ops.GRUCell(*w, weight_dtype=dtype)
        fast, plain = both(lambda: cell.step(x, h))
        if GEMV_TOL[level] is None:
            assert_identical(fast, plain)
        else:
            np.testing.assert_allclose(fast, plain, atol=GEMV_TOL[level], rtol=GEMV_TOL[level])
