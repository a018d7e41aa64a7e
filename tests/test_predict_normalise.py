"""The static baselines normalise S x S frames with the extension's pre-processing
(``ops.normalise_frames``: ``ops.preprocess`` with ``crop_pct=1``, the arithmetic of
``Runtime.predict(frames, cropped=True)``, which ``gfnet-edge predict`` uses): on random images the result equals
``(x / 255 - mean) / std`` computed in NumPy (channels first), for either interpolation and any
mean / std. (tests/test_cli_errors.py compares the CLI's predictions with the API fed that NumPy
normalisation.)"""
from __future__ import annotations

import numpy as np
import pytest

from gfnet_edge import ops
from gfnet_edge.calibrate.latency import prepare_frames
from gfnet_edge.model_desc import ModelDesc


def numpy_normalise(frames: np.ndarray, mean, std) -> np.ndarray:
    """The reference: float32 arithmetic in NumPy, NHWC -> NCHW."""
    x = (frames.astype(np.float32) / np.float32(255.0) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(0, 3, 1, 2)


def desc(size: int, interpolation: str, crop_pct: float, mean, std) -> ModelDesc:
    return ModelDesc(image_size=size, patch_size=size // 2, steps=3, num_classes=10, crop_pct=crop_pct,
                     dataset_interpolation=interpolation, glance_interpolation="bicubic", mean=tuple(mean),
                     std=tuple(std), classifier="gru", step0="classifier")


@pytest.mark.parametrize("size, interpolation, crop_pct, mean, std", [
    (32, "bilinear", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    (96, "bicubic", 0.875, (0.5, 0.25, 0.125), (0.3, 0.7, 1.9)),
    (57, "bicubic", 0.9, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
])
def test_predict_normalisation_equals_the_numpy_formula(size, interpolation, crop_pct, mean, std):
    """The model's own crop_pct does not matter: the frames are already S x S (no second crop)."""
    rng = np.random.default_rng(size)
    frames = rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    frames[0] = 0
    frames[1] = 255
    got = ops.normalise_frames(frames, mean, std)
    assert got.dtype == np.float32 and got.shape == (5, 3, size, size)
    np.testing.assert_allclose(got, numpy_normalise(frames, mean, std), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(prepare_frames(desc(size, interpolation, crop_pct, mean, std), frames), got)


def test_frames_of_another_size_are_refused():
    frames = np.zeros((2, 31, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"frames must be uint8 \(N, 32, 32, 3\)"):
        prepare_frames(desc(32, "bilinear", 1.0, (0.5,) * 3, (0.5,) * 3), frames)
    for bad in (frames, np.zeros((2, 32, 32, 3), np.float32), np.zeros((32, 32, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"frames must be uint8 \(N, S, S, 3\)"):
            ops.normalise_frames(bad)
