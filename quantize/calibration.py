"""Calibration data the way GFNet sees images.

The glance encoder is calibrated on glance inputs (the full image resized to P x P), the focus
encoder on P x P patches cut at the locations the model's *own policy* picks for each image
(traced through the reference model), not on random crops: a learned policy looks at digits /
objects, whose activation statistics differ from those of random background patches.
:meth:`QuantCalibrationSet.random_crops` builds the random-crop alternative for comparison.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from gfnet_edge.log import logger

#: Fewest calibration images accepted: below this the activation ranges are noise.
MIN_CALIB_IMAGES = 16

SpecLike = Any  # GFNetSpec, GFNet, ModelDesc, or a manifest "model" dict


#: Demo splits a calibration source may name (``demo:train``); the test split is never calibrated on.
DEMO_CALIB_SPLITS = ("train", "val")


def demo_source(source: Any) -> Optional[str]:
    """The demo split a calibration source names: ``"demo"`` (the validation split) or
    ``"demo:SPLIT"`` (``train`` or ``val``); ``None`` for any other source (a path).

    Raises:
        ValueError: ``demo:`` followed by another split.
    """
    if not isinstance(source, str) or not (source == "demo" or source.startswith("demo:")):
        return None
    split = source.partition(":")[2] or "val"
    if split not in DEMO_CALIB_SPLITS:
        raise ValueError(f"calibration source {source!r}: the demo splits to calibrate on are "
                         f"{', '.join('demo:' + s for s in DEMO_CALIB_SPLITS)}")
    return split


def _spec_value(spec: SpecLike, key: str):
    """``key`` of a ``GFNet`` (its spec), a ``GFNetSpec``, a ``ModelDesc`` or a manifest entry."""
    if isinstance(spec, Mapping):
        from gfnet_edge.model_desc import as_desc

        spec = as_desc(spec)
    elif hasattr(spec, "spec") and hasattr(spec.spec, key):  # a GFNet
        spec = spec.spec
    return getattr(spec, key)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False)


def check_images(images: Any, image_size: int, min_images: int = MIN_CALIB_IMAGES,
                 what: str = "calibration images") -> np.ndarray:
    """Validates normalised images and returns them as C-contiguous float32 (N, 3, S, S).

    Raises:
        ValueError: not an array, wrong shape, NaN / Inf (after the cast to float32: a value
            beyond its range is Inf there), fewer than ``min_images`` images.
    """
    if hasattr(images, "detach"):  # torch tensor
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{what}: expected a float32 array (N, 3, {image_size}, {image_size}), "
                         f"got {type(images).__name__}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{what}: expected normalised float images, got dtype {images.dtype} "
                         "(uint8 frames must be normalised first)")
    if images.ndim != 4 or images.shape[1:] != (3, image_size, image_size):
        raise ValueError(f"{what}: expected shape (N, 3, {image_size}, {image_size}), got {tuple(images.shape)}")
    n = images.shape[0]
    if n == 0:
        raise ValueError(f"{what}: the set is empty")
    if n < min_images:
        raise ValueError(f"{what}: only {n} image(s); calibration needs at least {min_images}")
    images = _as_float32(images)
    finite = np.isfinite(images).reshape(n, -1).all(axis=1)
    if not finite.all():
        raise ValueError(f"{what}: {int((~finite).sum())} image(s) contain NaN or Inf, or values beyond float32's "
                         f"range (first: index {int(np.argmin(finite))})")
    return images


def _as_float32(a: np.ndarray) -> np.ndarray:
    """``a`` as C-contiguous float32; values beyond float32's range become Inf (no warning: the
    callers check for them)."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(a, dtype=np.float32)


def load_calibration_images(source: Union[str, os.PathLike], spec: SpecLike, n: int = 256, seed: int = 0,
                            min_images: int = MIN_CALIB_IMAGES, split: str = "val",
                            return_labels: bool = False, on_error=None, as_frames: bool = False,
                            progress: bool = True):
    """Loads calibration (or evaluation) images, normalised for ``spec``.

    Args:
        source: a folder of images (flat, or one subfolder per class), an ``.npz`` archive
            (see :func:`gfnet_edge.data.load_images`), or ``"demo"`` / ``"demo:SPLIT"`` for the
            cluttered-digits demo dataset (``demo`` alone: ``split``, default the validation
            split; ``demo:train`` the train split, whose first 5000 images trained the shipped demo model,
            see :func:`demo_source`), generated
            with the config the model was trained on when ``spec`` records one (a demo ``GFNet`` /
            manifest).
        spec: the model (``GFNet``), its spec (``GFNetSpec``) or a manifest ``model`` entry:
            image size, crop ratio, interpolation, mean and std.
        n: images wanted; a larger set is subsampled (seeded, so class-sorted folders are not
            cut to their first classes), a smaller one is used whole with a warning.
        seed: subsampling seed.
        min_images: fewer usable images than this is an error.
        split: demo split.
        return_labels: also return the labels (``None`` for unlabelled sources).
        on_error: for a folder, ``on_error(file, message)`` takes each unreadable image file,
            which is left out (see :func:`gfnet_edge.data.load_images`); without it the first
            one raises.
        as_frames: return the uint8 (N, S, S, 3) frames the normalised images are made of
            (:func:`gfnet_edge.ops.normalise_frames`), the input ``Runtime.predict`` takes.
        progress: a progress bar while demo images are rendered.

    Returns:
        float32 (N, 3, S, S) (uint8 (N, S, S, 3) with ``as_frames``) [, int64 labels (N,) or ``None``].

    Raises:
        ValueError: missing / empty / unreadable source, too few images, NaN, bad shapes.
    """
    S = int(_spec_value(spec, "image_size"))
    mean, std = _spec_value(spec, "mean"), _spec_value(spec, "std")
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    demo_split = demo_source(source)
    if demo_split is not None:
        from gfnet_edge.data import ClutteredDigits, demo_config

        split = demo_split if source != "demo" else split

        # the generator config the model was trained on (recorded in a demo checkpoint's metadata;
        # a bare spec gives the generator's defaults)
        config = demo_config(spec)
        if config is None and str(_spec_value(spec, "model_name")).startswith("demo"):
            logger.warning("demo images rendered with the generator's default config, not the one %s was trained "
                           "on: pass the model (or its manifest entry), which records it, not its spec",
                           _spec_value(spec, "model_name"))
        ds = ClutteredDigits(split, config=config)
        if ds.config.image_size != S:
            raise ValueError(f"demo dataset images are {ds.config.image_size}px, the model expects {S}px")
        if ds.cache_path().is_file() or int(n) >= len(ds):
            frames, labels = ds.arrays(progress=progress)  # the whole split (cached)
        else:  # render only what is needed (the split is in random order already)
            frames, labels = ds.arrays(int(n), progress=progress)
        frames, labels = frames[:int(n)], labels[:int(n)]
        where = f"demo dataset ({split} split)"
    else:
        from gfnet_edge.data import load_images

        path = Path(source)
        frames, labels = load_images(path, S, float(_spec_value(spec, "crop_pct")),
                                     str(_spec_value(spec, "dataset_interpolation")), on_error=on_error)
        where = str(path)
    total = int(frames.shape[0])
    if total == 0:
        raise ValueError(f"{where}: no images")
    if total < min_images:
        raise ValueError(f"{where}: only {total} image(s); calibration needs at least {min_images}")
    if total > n:
        idx = np.sort(np.random.default_rng(seed).choice(total, size=int(n), replace=False))
        frames = frames[idx]
        labels = labels[idx] if labels is not None else None
    elif total < n:
        logger.warning("%s: %d images available of the %d wanted; using all of them", where, total, n)
    from gfnet_edge import ops  # the runtime's own pre-processing: calibration images are inference's inputs

    # uint8 frames cannot hold NaN: with as_frames nothing is normalised here (the caller does it)
    images = frames if as_frames else check_images(ops.normalise_frames(frames, mean, std), S, min_images, where)
    return (images, labels) if return_labels else images


@dataclass
class QuantCalibrationSet:
    """Inputs of the two backbone graphs for calibration.

    Attributes:
        glance: glance inputs (N, 3, P, P) float32, one per image.
        focus: patches (M, 3, P, P) float32.
        focus_image: index of the source image of each patch (M,).
        source: ``"policy"`` (patches at the model's own policy locations), ``"random"``
            (uniformly random locations) or ``"arrays"`` (given directly).
        images: the source images (N, 3, S, S) when known (used to hold some out for scoring).
        labels: their labels, when known.
        coords: patch coordinates (T-1, N, 2) int32 when built from images.
    """

    glance: np.ndarray
    focus: np.ndarray
    focus_image: np.ndarray
    source: str = "arrays"
    images: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    coords: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        for name in ("glance", "focus"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.ndim != 4 or a.shape[1] != 3 or a.shape[2] != a.shape[3]:
                raise ValueError(f"calibration {name} inputs must be float32 (N, 3, P, P), "
                                 f"got {getattr(a, 'shape', type(a).__name__)}")
            if a.shape[0] == 0:
                raise ValueError(f"calibration {name} inputs are empty")
            a = _as_float32(a)
            if not np.isfinite(a).all():
                raise ValueError(f"calibration {name} inputs contain NaN or Inf, or values beyond float32's range")
            setattr(self, name, a)
        if self.glance.shape[1:] != self.focus.shape[1:]:
            raise ValueError(f"glance inputs {self.glance.shape[1:]} and patches {self.focus.shape[1:]} differ in size")
        self.focus_image = np.asarray(self.focus_image, dtype=np.int64).reshape(-1)
        if self.focus_image.shape[0] != self.focus.shape[0]:
            raise ValueError("focus_image must give one source image per patch")

    # ---------------------------------------------------------------- builders
    @classmethod
    def from_arrays(cls, glance: np.ndarray, focus: np.ndarray) -> "QuantCalibrationSet":
        """Calibration inputs given directly (no source images: nothing can be held out)."""
        glance, focus = np.asarray(glance), np.asarray(focus)
        return cls(glance, focus, np.arange(focus.shape[0]) % max(glance.shape[0], 1), source="arrays")

    @classmethod
    def from_model(cls, model, images: Any, labels: Optional[np.ndarray] = None, batch_size: int = 32,
                   progress: bool = True, min_images: int = MIN_CALIB_IMAGES) -> "QuantCalibrationSet":
        """Glance inputs, and patches at the locations the model's own policy picks.

        Args:
            model: a ``GFNet`` (torch reference).
            images: normalised float32 (N, 3, S, S) (numpy or torch).
            labels: optional labels (N,) (kept for held-out scoring).
            batch_size: images per traced batch.
            progress: tqdm progress bar.
            min_images: fewer images is an error.
        """
        return cls._build(model, images, labels, None, batch_size, progress, min_images)

    @classmethod
    def random_crops(cls, model, images: Any, labels: Optional[np.ndarray] = None, seed: int = 0,
                     batch_size: int = 32, progress: bool = True,
                     min_images: int = MIN_CALIB_IMAGES) -> "QuantCalibrationSet":
        """Glance inputs, and patches at uniformly random locations (T-1 per image), for comparison."""
        return cls._build(model, images, labels, np.random.default_rng(seed), batch_size, progress, min_images)

    @classmethod
    def _build(cls, model, images, labels, rng, batch_size, progress, min_images) -> "QuantCalibrationSet":
        import torch

        from gfnet_edge.models import crop_patches

        spec = model.spec
        S, P, T = spec.image_size, spec.patch_size, spec.steps
        images = check_images(images, S, min_images)
        n = images.shape[0]
        if labels is not None:
            labels = np.asarray(labels).reshape(-1).astype(np.int64)
            if labels.shape[0] != n:
                raise ValueError(f"{labels.shape[0]} labels for {n} calibration images")
        glance = np.empty((n, 3, P, P), np.float32)
        focus = np.empty((T - 1, n, 3, P, P), np.float32)
        coords = np.empty((T - 1, n, 2), np.int32)
        what = "policy" if rng is None else "random"
        bar = _progress(n, f"calibration data ({what} patches)", progress)
        model.eval()
        with torch.no_grad():
            for i in range(0, n, batch_size):
                x = torch.from_numpy(images[i:i + batch_size])
                m = x.shape[0]
                glance[i:i + m] = model.glance(x).numpy()
                if rng is None:
                    c = model.trace(x).coords.to(torch.int32)
                else:
                    c = torch.from_numpy(rng.integers(0, S - P + 1, size=(T - 1, m, 2)).astype(np.int32))
                for t in range(T - 1):
                    focus[t, i:i + m] = crop_patches(x, c[t], P).numpy()
                coords[:, i:i + m] = c.numpy()
                if bar is not None:
                    bar.update(m)
        if bar is not None:
            bar.close()
        focus_image = np.broadcast_to(np.arange(n), (T - 1, n)).reshape(-1)
        return cls(glance, focus.reshape(-1, 3, P, P), focus_image, source=what, images=images,
                   labels=labels, coords=coords)

    # ------------------------------------------------------------------- views
    @property
    def num_images(self) -> int:
        return int(self.glance.shape[0])

    def subset(self, image_indices: Sequence[int]) -> "QuantCalibrationSet":
        """The calibration inputs of some source images only."""
        idx = np.asarray(image_indices, dtype=np.int64)
        remap = np.full(self.num_images, -1, np.int64)
        remap[idx] = np.arange(idx.size)
        keep = remap[self.focus_image] >= 0
        return QuantCalibrationSet(
            self.glance[idx], self.focus[keep], remap[self.focus_image[keep]], self.source,
            None if self.images is None else self.images[idx],
            None if self.labels is None else self.labels[idx],
            None if self.coords is None else self.coords[:, idx],
        )

    def inputs(self, graph: str) -> np.ndarray:
        if graph == "glance":
            return self.glance
        if graph == "focus":
            return self.focus
        raise ValueError(f"graph must be 'glance' or 'focus', got {graph!r}")

    def sizes(self) -> Dict[str, int]:
        return {"images": self.num_images, "glance": int(self.glance.shape[0]), "focus": int(self.focus.shape[0])}

    def reader(self, graph: str, batch_size: int = 32, input_name: str = "image",
               progress: bool = True) -> "GraphDataReader":
        return GraphDataReader(self.inputs(graph), batch_size, input_name, f"calibrating {graph}", progress)


def even_batch(n: int, most: int) -> int:
    """The largest batch size <= ``most`` that divides ``n``."""
    for b in range(max(min(most, n), 1), 0, -1):
        if n % b == 0:
            return b
    return 1


class GraphDataReader:
    """An ``onnxruntime.quantization.QuantCalibrationSetReader`` over one array of inputs.

    Supports ``set_range`` / ``len`` in batches (``CalibStridedMinMax``), and shows a progress bar.
    """

    def __init__(self, data: np.ndarray, batch_size: int = 32, input_name: str = "image",
                 desc: str = "calibrating", progress: bool = True) -> None:
        self.data = data
        # equal batches: ONNX Runtime's histogram calibrators stack the outputs of all batches
        self.batch_size = even_batch(data.shape[0], int(batch_size))
        self.input_name = input_name
        self.desc = desc
        self.progress = progress
        self.num_batches = (data.shape[0] + self.batch_size - 1) // self.batch_size
        self.start, self.end = 0, self.num_batches
        self._iter: Optional[Iterator[Dict[str, np.ndarray]]] = None
        self._bar = None

    def __len__(self) -> int:
        return self.num_batches

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = int(start_index), min(int(end_index), self.num_batches)
        self._iter = None

    def _batches(self) -> Iterator[Dict[str, np.ndarray]]:
        for b in range(self.start, self.end):
            x = self.data[b * self.batch_size:(b + 1) * self.batch_size]
            if self._bar is None and self.progress:
                self._bar = _progress(self.data.shape[0], self.desc, True)
            yield {self.input_name: np.ascontiguousarray(x)}
            if self._bar is not None:
                self._bar.update(x.shape[0])
        if self.end >= self.num_batches and self._bar is not None:
            self._bar.close()
            self._bar = None

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter, None)

    def rewind(self) -> None:
        self.start, self.end = 0, self.num_batches
        self._iter = None

    def __iter__(self):
        self.rewind()
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item
