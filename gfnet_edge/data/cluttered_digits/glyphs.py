"""Handwritten-looking glyphs from 8x8 digit bitmaps: a cubic-spline resample through a random
affine + elastic warp, and the ridge lines of the result drawn with an anti-aliased pen."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
from PIL import Image
from scipy import ndimage

from .config import ClutteredDigitsConfig



def smoothstep(x: np.ndarray) -> np.ndarray:
    """``3x^2 - 2x^3`` of ``x`` clipped to [0, 1]: a smooth ramp from 0 to 1."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def render_glyph(digit8: np.ndarray, height: float, rng: np.random.Generator,
                 config: ClutteredDigitsConfig, fragment: Optional[float] = None) -> np.ndarray:
    """Renders an 8x8 digit as thin, anti-aliased pen strokes about ``height`` pixels tall.

    The 8x8 bitmap is sampled with a cubic spline through a random rotation, shear, aspect
    change and smooth elastic warp, lightly smoothed, and the ridge lines of that intensity
    field (the stroke centres) are drawn with a pen of random width (see :func:`ridge_strokes`).

    Args:
        digit8: float (8, 8) intensities in [0, 1].
        height: glyph height in output pixels (the 8x8 extent before rotation).
        rng: the sample's generator.
        config: generator config (jitter ranges).
        fragment: if given, render only a window of about ``fragment * height`` pixels per side
            centred on a random ink pixel, with feathered edges (a distractor piece).

    Returns:
        float32 (H, W) alpha mask in [0, 1], trimmed to the ink's bounding box (at least 1x1).
    """
    aspect = rng.uniform(*config.aspect)
    theta = math.radians(rng.uniform(-config.max_rotation, config.max_rotation))
    shear = rng.uniform(-config.max_shear, config.max_shear)
    pen = max(config.scaled(rng.uniform(*config.pen_width)), height * rng.uniform(*config.pen_ratio))
    # Inverse map (canvas glyph units -> unwarped glyph units): undo rotation, then shear/aspect.
    cos, sin = math.cos(theta), math.sin(theta)
    rot_inv = np.array([[cos, -sin], [sin, cos]])
    shear_inv = np.array([[1.0, 0.0], [-shear / aspect, 1.0 / aspect]])
    inverse = shear_inv @ rot_inv
    side = int(math.ceil(height * 1.35 + pen)) + 4
    rows = cols = (np.arange(side, dtype=np.float64) + 0.5 - side / 2.0) / height
    if fragment is not None:
        rows, cols = _fragment_window(digit8, inverse, height, fragment, rng)
    yy, xx = np.meshgrid(rows, cols, indexing="ij")
    src_y = (inverse[0, 0] * yy + inverse[0, 1] * xx) * 8.0 + 3.5 + 2.0  # +2: padded bitmap
    src_x = (inverse[1, 0] * yy + inverse[1, 1] * xx) * 8.0 + 3.5 + 2.0
    if config.elastic > 0:
        src_y = src_y + _smooth_field(rng, yy.shape, config.elastic)
        src_x = src_x + _smooth_field(rng, yy.shape, config.elastic)
    padded = np.pad(np.asarray(digit8, dtype=np.float64), 2)
    values = ndimage.map_coordinates(padded, [src_y, src_x], order=3, mode="constant", cval=0.0)
    values = ndimage.gaussian_filter(values, sigma=height / 16.0)
    alpha = ridge_strokes(values, pen).astype(np.float32)
    if fragment is not None:
        alpha *= _feather(alpha.shape, max(2.0, pen))
    return _trim(alpha)


def _fragment_window(digit8: np.ndarray, inverse: np.ndarray, height: float, fraction: float,
                     rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (glyph units) of a fragment window around a random ink pixel."""
    ys, xs = np.nonzero(np.asarray(digit8) > 0.5)
    if ys.size == 0:
        ys, xs = np.array([3]), np.array([3])
    k = int(rng.integers(ys.size))
    unwarped = np.array([(ys[k] - 3.5) / 8.0, (xs[k] - 3.5) / 8.0])
    centre = np.linalg.solve(inverse, unwarped)
    n = max(3, int(round(height * fraction)))
    offsets = (np.arange(n, dtype=np.float64) + 0.5 - n / 2.0) / height
    return centre[0] + offsets, centre[1] + offsets


def _feather(shape: Tuple[int, int], width: float) -> np.ndarray:
    """A mask that ramps from 0 at the border to 1 at ``width`` pixels inside."""
    ramp_y = np.minimum(np.arange(shape[0]) + 0.5, np.arange(shape[0])[::-1] + 0.5)
    ramp_x = np.minimum(np.arange(shape[1]) + 0.5, np.arange(shape[1])[::-1] + 0.5)
    return np.minimum(np.minimum.outer(ramp_y, ramp_x) / width, 1.0).astype(np.float32)


def ridge_strokes(values: np.ndarray, pen: float, level: float = 0.3, peak: float = 0.45) -> np.ndarray:
    """Draws the ridge lines of a smooth intensity field with a pen of width ``pen`` pixels.

    A pixel's distance to the ridge is estimated by a Newton step across it: ``|g.n| / |l|``,
    where ``l < 0`` is the most negative Hessian eigenvalue and ``n`` its eigenvector. Only
    ridges whose (extrapolated) peak exceeds ``peak`` and pixels above ``level`` are inked.

    Args:
        values: float (H, W) smooth intensities in about [0, 1].
        pen: stroke width in pixels.
        level: minimum intensity of an inked pixel.
        peak: minimum ridge height.

    Returns:
        float64 (H, W) alpha in [0, 1].
    """
    gy, gx = np.gradient(values)
    hyy, hyx = np.gradient(gy)
    hxy, hxx = np.gradient(gx)
    hxy = 0.5 * (hxy + hyx)
    half_trace = 0.5 * (hyy + hxx)
    lam = half_trace - np.sqrt(np.maximum(half_trace ** 2 - (hyy * hxx - hxy ** 2), 0.0))
    ny, nx = hxy, lam - hyy
    flat = (np.abs(ny) + np.abs(nx)) < 1e-12
    ny, nx = np.where(flat, lam - hxx, ny), np.where(flat, hxy, nx)
    norm = np.sqrt(ny ** 2 + nx ** 2) + 1e-12
    slope = (gy * ny + gx * nx) / norm
    curv = np.maximum(-lam, 1e-9)
    dist = np.abs(slope) / curv
    ridge_height = values + slope ** 2 / (2.0 * curv)
    alpha = np.clip(pen / 2.0 + 0.5 - dist, 0.0, 1.0)
    alpha *= (lam < 0) & (dist < pen)
    alpha *= np.clip((values - level) / 0.1, 0.0, 1.0) * np.clip((ridge_height - peak) / 0.1, 0.0, 1.0)
    return alpha


def _smooth_field(rng: np.random.Generator, shape: Tuple[int, int], std: float) -> np.ndarray:
    """A smooth random displacement field of the given shape with the given std."""
    low = rng.normal(0.0, std, size=(4, 4)).astype(np.float32)
    return upsample(low, shape[0], shape[1]).astype(np.float64)


def _trim(alpha: np.ndarray, level: float = 0.05) -> np.ndarray:
    rows = np.flatnonzero(alpha.max(axis=1) > level)
    cols = np.flatnonzero(alpha.max(axis=0) > level)
    if rows.size == 0 or cols.size == 0:
        return np.zeros((1, 1), dtype=np.float32)
    return np.ascontiguousarray(alpha[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])


def upsample(low: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic upsampling of a small float32 2-D array with Pillow (mode ``F``)."""
    img = Image.fromarray(np.ascontiguousarray(low, dtype=np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.BICUBIC), dtype=np.float32)
