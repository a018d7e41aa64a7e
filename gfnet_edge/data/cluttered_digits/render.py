"""One cluttered-digits sample: background, distractors, the digit, colour and noise jitter."""
from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import numpy as np

from .config import REFERENCE_SIZE, ClutteredDigitsConfig, load_digit_source, sample_rng, split_pool
from .glyphs import render_glyph, smoothstep, upsample

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)



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
            out[..., c] += upsample(low[..., c], size, size)
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
        line = np.maximum(smoothstep(width - (period / 2 - dy)), smoothstep(width - (period / 2 - dx)))
        return (line * 2.0 - 1.0).astype(np.float32)
    tex = np.full((size, size), -1.0, dtype=np.float32)  # dots
    for _ in range(int(rng.integers(10, 60))):
        cy, cx = rng.uniform(0, size, size=2)
        r = rng.uniform(1.5, 6.0) * size / REFERENCE_SIZE
        r0, r1 = int(max(cy - r - 2, 0)), int(min(cy + r + 3, size))
        c0, c1 = int(max(cx - r - 2, 0)), int(min(cx + r + 3, size))
        d = np.sqrt((yy[r0:r1, c0:c1] - cy) ** 2 + (xx[r0:r1, c0:c1] - cx) ** 2)
        np.maximum(tex[r0:r1, c0:c1], smoothstep(r + 0.5 - d) * 2.0 - 1.0, out=tex[r0:r1, c0:c1])
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
