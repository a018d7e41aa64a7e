"""The cluttered-digits generator's configuration, its splits and the source digits.

Every sample is a pure function of ``(config, split, index)`` (:func:`sample_rng`); the splits
draw from disjoint, contiguous blocks of scikit-learn's 8x8 digits (:func:`split_pool`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Dict

import numpy as np

#: Bumped whenever the rendering changes (part of the cache key).
GENERATOR_VERSION = 1
#: Split name -> code mixed into each sample's seed.
SPLITS = {"train": 0, "val": 1, "test": 2}
#: Sizes in the config are given in pixels at this image size and scaled linearly otherwise.
REFERENCE_SIZE = 224


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
    code = split_code(split)
    cfg = config or ClutteredDigitsConfig()
    n = len(load_digit_source()[1])
    edges = np.round(np.cumsum((0.0,) + tuple(cfg.split_fractions)) * n).astype(int)
    return np.arange(edges[code], edges[code + 1], dtype=np.int64)


def split_code(split: str) -> int:
    """The code of ``split`` mixed into its samples' seeds (raises ``ValueError`` for an unknown split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


def sample_rng(config: ClutteredDigitsConfig, split: str, index: int) -> np.random.Generator:
    """The random generator of one sample (independent of every other sample)."""
    seq = np.random.SeedSequence([int(config.seed), split_code(split), int(index)])
    return np.random.Generator(np.random.PCG64(seq))


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
