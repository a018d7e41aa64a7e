"""Cluttered digits: the demo task of gfnet-edge.

One handwritten digit (10 classes) at a random place and scale on a cluttered S x S RGB
background (smooth colour noise, gradients, stripes/grids/dots, stroke-like scribbles and
fragments cut from *other* digits), with colour, contrast, gamma and noise jitter. The digit
source is scikit-learn's ``load_digits`` (1797 8x8 bitmaps with 17 grey levels, shipped inside
the package, nothing is downloaded). Each glyph is resampled with a cubic spline through a
random affine + smooth elastic warp straight to its target size, and the ridge lines of that
smooth intensity field (the stroke centres) are drawn with an anti-aliased pen of random width,
so a digit looks handwritten at any size instead of like a blurred 8x8 bitmap.

A size mixture makes the task need GFNet's focus: a minority of large digits is readable in
the P x P glance of the whole image, the majority of small digits is only readable at full
resolution (i.e. in a P x P patch cut from the S x S image).

Every sample is a pure function of ``(config, split, index)``: its random generator is
``numpy.random.Generator(PCG64(SeedSequence([seed, split_code, index])))``, so any sample can
be generated alone, in any order, in any process, with identical bytes (for a given
numpy / scipy / Pillow version).

Splits use disjoint pools of source digits: ``load_digits`` has no writer ids, but its order
follows the writers' forms (a contiguous split is measurably harder than a random one), so the
pools are contiguous index blocks (default 70 / 10 / 20 %: train = [0, 1258),
val = [1258, 1438), test = [1438, 1797)). Test digits therefore come from handwriting samples
never used for training, and mostly from writers not seen in training.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from scipy import ndimage

from gfnet_edge.variants import IMAGENET_MEAN, IMAGENET_STD

#: Bumped whenever the rendering changes (part of the cache key).
GENERATOR_VERSION = 1
#: Split name -> code mixed into each sample's seed.
SPLITS = {"train": 0, "val": 1, "test": 2}
#: Sizes in the config are given in pixels at this image size and scaled linearly otherwise.
REFERENCE_SIZE = 224
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class ClutteredDigitsConfig:
    """Parameters of the cluttered-digits generator.

    Pixel sizes are given at ``image_size == 224`` and scaled by ``image_size / 224``.

    Attributes:
        image_size: side S of the square RGB images.
        seed: master seed; every sample's generator derives from (seed, split, index).
        train_size: default number of training images.
        val_size: default number of validation images.
        test_size: default number of test images.
        split_fractions: fractions of the 1797 source digits given to train / val / test
            (contiguous, disjoint index blocks).
        large_fraction: probability that a digit is "large" (readable in the glance).
        large_size: (min, max) glyph height of large digits, pixels at S = 224.
        small_size: (min, max) glyph height of small digits, pixels at S = 224.
        aspect: (min, max) glyph width / height.
        max_rotation: maximum absolute rotation of a glyph, degrees.
        max_shear: maximum absolute horizontal shear of a glyph.
        elastic: standard deviation of the smooth elastic warp, in 8x8 source pixels.
        pen_width: (min, max) stroke width in pixels at S = 224 (all digits).
        pen_ratio: (min, max) stroke width as a fraction of the glyph height (the larger of
            the two widths is used, so large digits get proportionally bold strokes).
        min_contrast: minimum luma difference between the digit ink and its local background.
        num_fragments: (min, max) number of distractor fragments of other digits.
        fragment_fraction: (min, max) side of a fragment as a fraction of its glyph.
        num_scribbles: (min, max) number of stroke-like distractor curves.
        distractor_opacity: (min, max) opacity of fragments and scribbles (the digit is opaque).
        texture_amplitude: (min, max) amplitude of the background texture layer.
        noise_std: (min, max) standard deviation of the additive pixel noise (0..1 scale).
    """

    image_size: int = 224
    seed: int = 0
    train_size: int = 10000
    val_size: int = 1000
    test_size: int = 2000
    split_fractions: Tuple[float, float, float] = (0.7, 0.1, 0.2)
    large_fraction: float = 0.3
    large_size: Tuple[float, float] = (56.0, 90.0)
    small_size: Tuple[float, float] = (16.0, 28.0)
    aspect: Tuple[float, float] = (0.8, 1.05)
    max_rotation: float = 15.0
    max_shear: float = 0.25
    elastic: float = 0.35
    pen_width: Tuple[float, float] = (2.0, 3.0)
    pen_ratio: Tuple[float, float] = (0.06, 0.09)
    min_contrast: float = 0.35
    num_fragments: Tuple[int, int] = (3, 8)
    fragment_fraction: Tuple[float, float] = (0.3, 0.5)
    num_scribbles: Tuple[int, int] = (2, 6)
    distractor_opacity: Tuple[float, float] = (0.25, 0.6)
    texture_amplitude: Tuple[float, float] = (0.02, 0.12)
    noise_std: Tuple[float, float] = (0.0, 0.03)

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        fr = self.split_fractions
        if len(fr) != 3 or min(fr) <= 0 or sum(fr) > 1.0 + 1e-9:
            raise ValueError(f"split_fractions must be 3 positive numbers summing to <= 1, got {fr}")
        if not 0.0 <= self.large_fraction <= 1.0:
            raise ValueError(f"large_fraction must be in [0, 1], got {self.large_fraction}")
        for name in ("large_size", "small_size"):
            lo, hi = getattr(self, name)
            if not 4 <= lo <= hi <= REFERENCE_SIZE * 0.75:
                raise ValueError(f"{name} must satisfy 4 <= min <= max <= 168, got {(lo, hi)}")

    def scaled(self, pixels: float) -> float:
        """Converts a size in pixels at S = 224 to pixels at ``image_size``."""
        return pixels * self.image_size / REFERENCE_SIZE

    def key(self) -> str:
        """Short hash of the config and generator version (cache key)."""
        blob = json.dumps({"v": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- source digits


@functools.lru_cache(maxsize=1)
def load_digit_source() -> Tuple[np.ndarray, np.ndarray]:
    """Loads scikit-learn's 8x8 digits.

    Returns:
        ``(images, labels)``: float32 (1797, 8, 8) in [0, 1] and int64 (1797,).

    Raises:
        ImportError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the cluttered-digits demo task needs scikit-learn (pip install scikit-learn)") from exc
    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0).copy()
    labels = np.asarray(bunch.target, dtype=np.int64).copy()
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def split_pool(split: str, config: Optional[ClutteredDigitsConfig] = None) -> np.ndarray:
    """Indices of the source digits a split may use (contiguous, disjoint blocks).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        config: generator config (defaults to ``ClutteredDigitsConfig()``).

    Returns:
        int64 array of indices into ``load_digit_source()``.
    """
    code = _split_code(split)
    cfg = config or ClutteredDigitsConfig()
    n = len(load_digit_source()[1])
    edges = np.round(np.cumsum((0.0,) + tuple(cfg.split_fractions)) * n).astype(int)
    return np.arange(edges[code], edges[code + 1], dtype=np.int64)


def _split_code(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


def sample_rng(config: ClutteredDigitsConfig, split: str, index: int) -> np.random.Generator:
    """The random generator of one sample (independent of every other sample)."""
    seq = np.random.SeedSequence([int(config.seed), _split_code(split), int(index)])
    return np.random.Generator(np.random.PCG64(seq))


# ----------------------------------------------------------------------------- glyphs


def _smoothstep(x: np.ndarray) -> np.ndarray:
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
    return _upsample(low, shape[0], shape[1]).astype(np.float64)


def _trim(alpha: np.ndarray, level: float = 0.05) -> np.ndarray:
    rows = np.flatnonzero(alpha.max(axis=1) > level)
    cols = np.flatnonzero(alpha.max(axis=0) > level)
    if rows.size == 0 or cols.size == 0:
        return np.zeros((1, 1), dtype=np.float32)
    return np.ascontiguousarray(alpha[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])


def _upsample(low: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic upsampling of a small float32 2-D array with Pillow (mode ``F``)."""
    img = Image.fromarray(np.ascontiguousarray(low, dtype=np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.BICUBIC), dtype=np.float32)


# ----------------------------------------------------------------------------- background


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3).astype(np.float32)


def _with_luma(colour: np.ndarray, luma: float) -> np.ndarray:
    """Shifts a colour so that its luma is ``luma`` (clipped to [0, 1])."""
    return np.clip(colour + (luma - float(colour @ _LUMA)), 0.0, 1.0).astype(np.float32)


def _noise_layer(rng: np.random.Generator, size: int) -> np.ndarray:
    """Multi-octave smooth colour noise, zero mean, roughly unit scale, (S, S, 3)."""
    out = np.zeros((size, size, 3), dtype=np.float32)
    mix = rng.normal(0.0, 1.0, size=(3, 3)).astype(np.float32) * 0.5 + np.eye(3, dtype=np.float32)
    for grid, amp in ((3, 1.0), (6, 0.6), (12, 0.35), (24, 0.2)):
        low = rng.normal(0.0, amp, size=(grid, grid, 3)).astype(np.float32) @ mix
        for c in range(3):
            out[..., c] += _upsample(low[..., c], size, size)
    return out / 2.0


def _texture_layer(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey texture in [-1, 1]: stripes, a grid, dots, or nothing, (S, S)."""
    kind = rng.choice(4, p=(0.2, 0.35, 0.2, 0.25))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == 0:
        return np.zeros((size, size), dtype=np.float32)
    if kind == 1:  # stripes
        theta = rng.uniform(0.0, math.pi)
        freq = rng.uniform(1 / 40, 1 / 6)
        phase = rng.uniform(0.0, 2 * math.pi)
        return np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
    if kind == 2:  # grid
        period = rng.uniform(8.0, 32.0)
        width = rng.uniform(1.0, 2.5)
        dy = np.abs(((yy + rng.uniform(0, period)) % period) - period / 2)
        dx = np.abs(((xx + rng.uniform(0, period)) % period) - period / 2)
        line = np.maximum(_smoothstep(width - (period / 2 - dy)), _smoothstep(width - (period / 2 - dx)))
        return (line * 2.0 - 1.0).astype(np.float32)
    tex = np.full((size, size), -1.0, dtype=np.float32)  # dots
    for _ in range(int(rng.integers(10, 60))):
        cy, cx = rng.uniform(0, size, size=2)
        r = rng.uniform(1.5, 6.0) * size / REFERENCE_SIZE
        r0, r1 = int(max(cy - r - 2, 0)), int(min(cy + r + 3, size))
        c0, c1 = int(max(cx - r - 2, 0)), int(min(cx + r + 3, size))
        d = np.sqrt((yy[r0:r1, c0:c1] - cy) ** 2 + (xx[r0:r1, c0:c1] - cx) ** 2)
        np.maximum(tex[r0:r1, c0:c1], _smoothstep(r + 0.5 - d) * 2.0 - 1.0, out=tex[r0:r1, c0:c1])
    return tex


def _background(rng: np.random.Generator, config: ClutteredDigitsConfig) -> np.ndarray:
    """Cluttered background without digit content, float32 (S, S, 3) in [0, 1]."""
    size = config.image_size
    base = _random_colour(rng)
    img = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    img = img + _noise_layer(rng, size) * rng.uniform(0.05, 0.25)
    # Linear gradient in a random direction.
    theta = rng.uniform(0.0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    ramp = (xx * math.cos(theta) + yy * math.sin(theta))[..., None]
    img = img + ramp * (rng.normal(0.0, 0.3, size=3).astype(np.float32))
    tex = _texture_layer(rng, size)[..., None]
    img = img + tex * rng.uniform(*config.texture_amplitude) * _random_colour(rng)
    return np.clip(img, 0.0, 1.0)


def _stroke_mask(rng: np.random.Generator, size: int, scale: float) -> Tuple[np.ndarray, int, int]:
    """An anti-aliased random quadratic curve (a scribble).

    Returns:
        ``(mask, top, left)``: float32 mask of the curve's bounding box and its position.
    """
    p0, p1, p2 = (rng.uniform(0, size, size=2) for _ in range(3))
    length = rng.uniform(10.0, 50.0) * scale
    p1 = p0 + (p1 - p0) / (np.linalg.norm(p1 - p0) + 1e-6) * length * 0.5
    p2 = p0 + (p2 - p0) / (np.linalg.norm(p2 - p0) + 1e-6) * length
    t = np.linspace(0.0, 1.0, 13)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    width = rng.uniform(1.0, 3.0) * scale
    lo = np.floor(pts.min(axis=0) - width - 2).astype(int).clip(0, size)
    hi = np.ceil(pts.max(axis=0) + width + 2).astype(int).clip(0, size)
    if (hi <= lo).any():
        return np.zeros((1, 1), dtype=np.float32), 0, 0
    yy, xx = np.mgrid[lo[0]:hi[0], lo[1]:hi[1]].astype(np.float32)
    dist = np.full(yy.shape, np.inf, dtype=np.float32)
    for a, b in zip(pts[:-1], pts[1:]):
        dist = np.minimum(dist, _segment_distance(yy, xx, a.astype(np.float32), b.astype(np.float32)))
    return np.clip(width / 2 + 0.5 - dist, 0.0, 1.0), int(lo[0]), int(lo[1])


def _segment_distance(yy: np.ndarray, xx: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = b - a
    denom = float(d @ d) + 1e-9
    t = np.clip(((yy - a[0]) * d[0] + (xx - a[1]) * d[1]) / denom, 0.0, 1.0)
    return np.sqrt((yy - a[0] - t * d[0]) ** 2 + (xx - a[1] - t * d[1]) ** 2)


# ----------------------------------------------------------------------------- composition


def _ink_colour(rng: np.random.Generator, background_luma: float, min_contrast: float) -> np.ndarray:
    """A random ink colour whose luma differs from the background's by >= min_contrast."""
    contrast = rng.uniform(min_contrast, max(min_contrast, 0.75))
    darker = background_luma - contrast >= 0.0
    lighter = background_luma + contrast <= 1.0
    if darker and lighter:
        sign = -1.0 if rng.random() < 0.5 else 1.0
    else:
        sign = -1.0 if darker or background_luma > 0.5 else 1.0
    luma = float(np.clip(background_luma + sign * contrast, 0.0, 1.0))
    return _with_luma(_random_colour(rng), luma)


def _paint(img: np.ndarray, alpha: np.ndarray, top: int, left: int, colour: np.ndarray) -> None:
    """Alpha-blends ``colour`` through ``alpha`` into ``img`` at (top, left), clipped, in place."""
    size_h, size_w = img.shape[:2]
    h, w = alpha.shape
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + h, size_h), min(left + w, size_w)
    if r1 <= r0 or c1 <= c0:
        return
    a = alpha[r0 - top:r1 - top, c0 - left:c1 - left, None]
    region = img[r0:r1, c0:c1]
    region *= 1.0 - a
    region += a * colour


def _glyph_height(rng: np.random.Generator, config: ClutteredDigitsConfig) -> Tuple[float, bool]:
    large = bool(rng.random() < config.large_fraction)
    lo, hi = config.large_size if large else config.small_size
    return config.scaled(rng.uniform(lo, hi)), large


def _overlaps(box: Tuple[int, int, int, int], top: int, left: int, h: int, w: int, margin: int) -> bool:
    r, c, bh, bw = box
    return not (top + h + margin <= r or r + bh + margin <= top or left + w + margin <= c or c + bw + margin <= left)


def _add_distractors(img: np.ndarray, rng: np.random.Generator, config: ClutteredDigitsConfig,
                     pool: np.ndarray, source: int, height: float, box: Tuple[int, int, int, int],
                     ink: np.ndarray) -> None:
    """Paints fragments of other digits and scribbles around (not over) the target box.

    Distractors are drawn with a partial opacity (``config.distractor_opacity``), so the
    digit stays the most contrasted object of the image: findable, but only readable at a
    sufficient resolution when it is small.
    """
    images, _ = load_digit_source()
    size = config.image_size
    luma = float(img.mean(axis=(0, 1)) @ _LUMA)
    n_frag = int(rng.integers(config.num_fragments[0], config.num_fragments[1] + 1))
    for _ in range(n_frag):
        other = int(pool[rng.integers(len(pool))])
        if other == source:
            other = int(pool[(np.searchsorted(pool, source) + 1) % len(pool)])
        frag_h = height * rng.uniform(0.7, 1.4)
        frag = render_glyph(images[other], frag_h, rng, config,
                            fragment=rng.uniform(*config.fragment_fraction))
        colour = ink if rng.random() < 0.5 else _ink_colour(rng, luma, config.min_contrast)
        frag *= rng.uniform(*config.distractor_opacity)
        _place_away(img, frag, rng, box, colour, margin=2)
    scale = size / REFERENCE_SIZE
    r, c, bh, bw = box
    for _ in range(int(rng.integers(config.num_scribbles[0], config.num_scribbles[1] + 1))):
        mask, top, left = _stroke_mask(rng, size, scale)
        colour = ink if rng.random() < 0.3 else _random_colour(rng)
        mask *= rng.uniform(*config.distractor_opacity)
        h, w = mask.shape
        if not _overlaps(box, top, left, h, w, 2):
            _paint(img, mask, top, left, colour)
            continue
        mask = mask.copy()  # clear the part over the digit's box
        mask[max(r - 2 - top, 0):max(r + bh + 2 - top, 0), max(c - 2 - left, 0):max(c + bw + 2 - left, 0)] = 0
        _paint(img, mask, top, left, colour)


def _place_away(img: np.ndarray, alpha: np.ndarray, rng: np.random.Generator,
                box: Tuple[int, int, int, int], colour: np.ndarray, margin: int) -> None:
    """Paints ``alpha`` at a random place that does not overlap ``box`` (up to 20 tries)."""
    size = img.shape[0]
    h, w = alpha.shape
    for _ in range(20):
        top = int(rng.integers(-h // 3, size - 2 * h // 3))
        left = int(rng.integers(-w // 3, size - 2 * w // 3))
        if not _overlaps(box, top, left, h, w, margin):
            _paint(img, alpha, top, left, colour)
            return


def _global_jitter(img: np.ndarray, rng: np.random.Generator, config: ClutteredDigitsConfig) -> np.ndarray:
    """Contrast, per-channel gain, gamma and additive noise; returns uint8 (S, S, 3)."""
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = (img - mean) * np.float32(rng.uniform(0.8, 1.15)) + mean
    img = img * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    gamma_lut = (np.linspace(0.0, 1.0, 4096, dtype=np.float64) ** rng.uniform(0.8, 1.25)).astype(np.float32)
    img = gamma_lut[np.rint(np.clip(img, 0.0, 1.0) * 4095.0).astype(np.int32)]
    std = rng.uniform(*config.noise_std)
    if std > 0:
        img += rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(std)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def render_sample(config: ClutteredDigitsConfig, split: str, index: int) -> Tuple[np.ndarray, int, Dict[str, Any]]:
    """Renders sample ``index`` of ``split`` (a pure function of its arguments).

    Args:
        config: generator config.
        split: ``"train"``, ``"val"`` or ``"test"``.
        index: sample index (any non-negative integer).

    Returns:
        ``(image, label, meta)``: uint8 (S, S, 3), the digit class, and a dict with ``box``
        (row, col, h, w) of the digit's ink, ``source`` (index into ``load_digit_source()``),
        ``large`` (size class), ``split`` and ``index``.
    """
    if index < 0:
        raise IndexError(f"sample index must be >= 0, got {index}")
    images, labels = load_digit_source()
    pool = split_pool(split, config)
    rng = sample_rng(config, split, index)
    size = config.image_size
    source = int(pool[rng.integers(len(pool))])
    height, large = _glyph_height(rng, config)
    glyph = render_glyph(images[source], height, rng, config)
    gh, gw = glyph.shape
    top = int(rng.integers(0, max(size - gh, 0) + 1))
    left = int(rng.integers(0, max(size - gw, 0) + 1))
    box = (top, left, min(gh, size - top), min(gw, size - left))
    img = _background(rng, config)
    ink = _ink_colour(rng, float(img[top:top + gh, left:left + gw].mean(axis=(0, 1)) @ _LUMA),
                      config.min_contrast)
    _add_distractors(img, rng, config, pool, source, height, box, ink)
    _paint(img, glyph, top, left, ink)
    frame = _global_jitter(img, rng, config)
    meta = {"box": box, "source": source, "large": large, "split": split, "index": int(index)}
    return frame, int(labels[source]), meta


# ----------------------------------------------------------------------------- dataset


def default_cache_dir() -> Path:
    """``$GFNET_EDGE_CACHE`` or ``~/.cache/gfnet_edge``."""
    env = os.environ.get("GFNET_EDGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gfnet_edge"


def normalize(frames: np.ndarray) -> np.ndarray:
    """ImageNet normalisation of uint8 frames (numpy only).

    Args:
        frames: uint8 (N, S, S, 3) or (S, S, 3).

    Returns:
        float32 (N, 3, S, S) (or (3, S, S)): ``(x / 255 - mean) / std`` per channel.
    """
    arr = np.asarray(frames)
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(f"normalize expects (N, H, W, 3) or (H, W, 3) frames, got shape {arr.shape}")
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    out = (arr.astype(np.float32) / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(np.moveaxis(out, -1, -3))


def digit_crops(frames: np.ndarray, boxes: np.ndarray, patch_size: int = 96, jitter: int = 0,
                seed: Optional[int] = None) -> np.ndarray:
    """Full-resolution ``P x P`` windows centred on each digit (clamped inside the image).

    Useful to pre-train a local encoder on readable digits, or to check that a patch at the
    right place suffices.

    Args:
        frames: uint8 (N, S, S, 3).
        boxes: int (N, 4) digit boxes (row, col, h, w), e.g. from :meth:`ClutteredDigits.boxes`.
        patch_size: window side P (<= S).
        jitter: maximum random shift of the window centre, pixels (0: exactly centred).
        seed: seed of the jitter generator.

    Returns:
        uint8 (N, P, P, 3).
    """
    frames = np.asarray(frames)
    n, size = frames.shape[0], frames.shape[1]
    if patch_size > size:
        raise ValueError(f"patch_size {patch_size} exceeds the image size {size}")
    boxes = np.asarray(boxes).reshape(n, 4)
    centre = boxes[:, :2] + boxes[:, 2:] // 2
    if jitter > 0:
        centre = centre + np.random.default_rng(seed).integers(-jitter, jitter + 1, size=(n, 2))
    corner = np.clip(centre - patch_size // 2, 0, size - patch_size)
    out = np.empty((n, patch_size, patch_size, frames.shape[3]), dtype=frames.dtype)
    for k, (top, left) in enumerate(corner):
        out[k] = frames[k, top:top + patch_size, left:left + patch_size]
    return out


_Arrays = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _render_chunk(args: Tuple[ClutteredDigitsConfig, str, List[int]]) -> _Arrays:
    """Renders a list of indices (runs in a worker process): frames, labels, boxes, large."""
    config, split, indices = args
    s = config.image_size
    frames = np.empty((len(indices), s, s, 3), dtype=np.uint8)
    labels = np.empty(len(indices), dtype=np.int64)
    boxes = np.empty((len(indices), 4), dtype=np.int32)
    large = np.empty(len(indices), dtype=bool)
    for k, i in enumerate(indices):
        frames[k], labels[k], meta = render_sample(config, split, i)
        boxes[k] = meta["box"]
        large[k] = meta["large"]
    return frames, labels, boxes, large


class ClutteredDigits(Sequence):
    """A split of the cluttered-digits task, generated on demand (sequence-like).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: number of samples (default: the config's size for the split). Indices beyond the
            default size are valid too: a training loop may ask for fresh samples forever.
        config: generator config (default ``ClutteredDigitsConfig()``).
        cache_dir: where :meth:`arrays` caches its ``.npz`` (default :func:`default_cache_dir`).

    Example:
        >>> ds = ClutteredDigits("test", size=8)
        >>> image, label, meta = ds[0]
        >>> frames, labels = ds.arrays()
    """

    def __init__(self, split: str, size: Optional[int] = None,
                 config: Optional[ClutteredDigitsConfig] = None,
                 cache_dir: Optional[os.PathLike] = None) -> None:
        _split_code(split)
        self.split = split
        self.config = config or ClutteredDigitsConfig()
        default = {"train": self.config.train_size, "val": self.config.val_size,
                   "test": self.config.test_size}[split]
        self.size = int(default if size is None else size)
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {self.size}")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Tuple[np.ndarray, int, Dict[str, Any]]:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("use frames(indices) or arrays() for several samples")
        index = int(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.split} split of size {self.size}")
        return render_sample(self.config, self.split, index)

    def frames(self, indices: Iterable[int]) -> np.ndarray:
        """Renders the given sample indices, uint8 (N, S, S, 3) (no size check, no cache)."""
        return self._render(list(indices), workers=1, progress=False)[0]

    def render(self, indices: Iterable[int], workers: int = 1,
               progress: bool = False) -> _Arrays:
        """Renders indices with optional processes and progress bar (no cache).

        Returns:
            ``(frames, labels, boxes, large)``: uint8 (N, S, S, 3), int64 (N,),
            int32 (N, 4) (row, col, h, w) and bool (N,).
        """
        return self._render(list(indices), workers=workers, progress=progress)

    def cache_path(self, n: Optional[int] = None) -> Path:
        """The ``.npz`` file :meth:`arrays` uses for the first ``n`` samples."""
        n = self.size if n is None else int(n)
        return self.cache_dir / f"cluttered_digits_{self.split}_{n}_{self.config.key()}.npz"

    def arrays(self, n: Optional[int] = None, workers: int = 1, progress: bool = True,
               cache: bool = True) -> Tuple[np.ndarray, np.ndarray]:
        """The first ``n`` samples as arrays, cached to an ``.npz`` keyed by the config hash.

        Args:
            n: number of samples (default ``len(self)``).
            workers: worker processes (``0``: one per CPU core; ``1``: in this process).
            progress: show a tqdm progress bar.
            cache: read / write the cache file.

        Returns:
            ``(frames, labels)``: uint8 (N, S, S, 3) and int64 (N,).
        """
        data = self._cached(n, workers, progress, cache, ("images", "labels"))
        return data["images"], data["labels"]

    def boxes(self, n: Optional[int] = None, workers: int = 1, progress: bool = True,
              cache: bool = True) -> Tuple[np.ndarray, np.ndarray]:
        """Digit boxes and size classes of the first ``n`` samples (same cache as :meth:`arrays`).

        Returns:
            ``(boxes, large)``: int32 (N, 4) (row, col, h, w) and bool (N,).
        """
        data = self._cached(n, workers, progress, cache, ("boxes", "large"))
        return data["boxes"], data["large"]

    def _cached(self, n: Optional[int], workers: int, progress: bool, cache: bool,
                keys: Sequence[str]) -> Dict[str, np.ndarray]:
        """Reads ``keys`` of the cache file, rendering and writing it first when missing."""
        n = self.size if n is None else int(n)
        path = self.cache_path(n)
        if cache and path.is_file():
            with np.load(path) as data:
                return {k: data[k] for k in keys}
        bigger = self._larger_cache(n) if cache else None
        if bigger is not None:  # samples are pure functions of their index: its first n are these
            with np.load(bigger) as data:
                return {k: np.ascontiguousarray(data[k][:n]) for k in keys}
        frames, labels, boxes, large = self._render(list(range(n)), workers, progress)
        result = {"images": frames, "labels": labels, "boxes": boxes, "large": large}
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **result)
            os.replace(tmp, path)
        return result

    def _larger_cache(self, n: int) -> Optional[Path]:
        """The smallest cached ``.npz`` of the same split and config holding at least ``n`` samples."""
        best: Optional[Tuple[int, Path]] = None
        for p in self.cache_dir.glob(f"cluttered_digits_{self.split}_*_{self.config.key()}.npz"):
            try:
                m = int(p.name.split("_")[3])
            except (IndexError, ValueError):
                continue
            if m >= n and (best is None or m < best[0]):
                best = (m, p)
        return best[1] if best else None

    def _render(self, indices: List[int], workers: int,
                progress: bool) -> _Arrays:
        workers = (os.cpu_count() or 1) if workers == 0 else max(int(workers), 1)
        chunk = 64
        jobs = [(self.config, self.split, indices[i:i + chunk]) for i in range(0, len(indices), chunk)]
        bar = _progress(len(indices), f"cluttered digits ({self.split})", progress)
        parts = []
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                parts.append(_render_chunk(job))
                bar.update(len(job[2]))
        else:
            from concurrent.futures import ProcessPoolExecutor
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for part, job in zip(pool.map(_render_chunk, jobs), jobs):
                    parts.append(part)
                    bar.update(len(job[2]))
        bar.close()
        s = self.config.image_size
        if not parts:
            return (np.zeros((0, s, s, 3), np.uint8), np.zeros(0, np.int64),
                    np.zeros((0, 4), np.int32), np.zeros(0, bool))
        return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img")


def config_from_dict(d: Dict[str, Any]) -> ClutteredDigitsConfig:
    """A :class:`ClutteredDigitsConfig` from its JSON form (lists back to tuples)."""
    return ClutteredDigitsConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def demo_config(source: Any) -> Optional[ClutteredDigitsConfig]:
    """The generator config a demo model was trained on, if ``source`` records one.

    Args:
        source: a loaded GFNet (``meta["demo_data"]``), a checkpoint dict (``demo_data``), or a
            bundle manifest / its ``model`` entry / a ``ModelDesc`` (``demo_data_config``).

    Returns:
        The config, or ``None`` (then the generator's defaults apply).
    """
    d = None
    meta = getattr(source, "meta", None)
    if isinstance(meta, dict):
        d = (meta.get("demo_data") or {}).get("config")
    elif isinstance(source, dict):
        d = (source.get("demo_data") or {}).get("config") if isinstance(source.get("demo_data"), dict) else None
        d = d or source.get("demo_data_config") or (source.get("model") or {}).get("demo_data_config")
    elif hasattr(source, "demo_data_config"):  # a ModelDesc
        d = source.demo_data_config
    return config_from_dict(d) if d else None
