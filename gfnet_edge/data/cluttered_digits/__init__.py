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

from .config import (GENERATOR_VERSION, REFERENCE_SIZE, SPLITS, ClutteredDigitsConfig, config_from_dict,
                     demo_config, load_digit_source, sample_rng, split_pool)
from .dataset import ClutteredDigits, default_cache_dir, digit_crops, normalize
from .glyphs import render_glyph, ridge_strokes
from .render import render_sample

__all__ = ["GENERATOR_VERSION", "REFERENCE_SIZE", "SPLITS", "ClutteredDigits", "ClutteredDigitsConfig",
           "config_from_dict", "default_cache_dir", "demo_config", "digit_crops", "load_digit_source", "normalize",
           "render_glyph", "render_sample", "ridge_strokes", "sample_rng", "split_pool"]
