"""Calibration images: the demo task's test split or any folder / ``.npz`` with labels."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from gfnet_edge.errors import InputError, missing_build_module, needs_build_side
from gfnet_edge.log import logger
from gfnet_edge.model_desc import ModelDesc, as_desc

#: Fewest labelled images calibration runs on (two to fit the thresholds on, two held out).
MIN_IMAGES = 4
#: Below this many images in the fitting or the held-out half, a warning says the budgets and
#: accuracies are rough (a held-out accuracy near 90 % on 50 images has a standard error of 4 points).
ADVISED_SPLIT_IMAGES = 50


@dataclass
class LabelledImages:
    """Labelled uint8 frames split into a fitting and a held-out part.

    Attributes:
        source: where they came from (a path or ``demo``).
        frames: uint8 (N, S, S, 3).
        labels: int64 (N,).
        fit_idx: indices of the fitting split.
        holdout_idx: indices of the held-out split.
        info: extra facts for the report (demo split and generator config key).
        files: for images read from files, each frame's file relative to the ``source`` folder
            (``cat/img_0042.jpg``; bytes of a name that are not UTF-8 as ``\\xNN`` escapes);
            ``None`` for ``demo`` and ``.npz`` data.
    """

    source: str
    frames: np.ndarray
    labels: np.ndarray
    fit_idx: np.ndarray
    holdout_idx: np.ndarray
    info: Dict[str, Any] = field(default_factory=dict)
    files: Optional[List[str]] = None

    def part(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
        idx = self.fit_idx if name == "fit" else self.holdout_idx
        return self.frames[idx], self.labels[idx]

    def part_files(self, name: str) -> Optional[List[str]]:
        """The files of :meth:`part` ``name``'s frames, in its order (``None`` without files)."""
        if self.files is None:
            return None
        return [self.files[i] for i in (self.fit_idx if name == "fit" else self.holdout_idx)]

    def describe(self) -> Dict[str, Any]:
        return {"source": self.source, "images": int(len(self.labels)), "fit": int(len(self.fit_idx)),
                "holdout": int(len(self.holdout_idx)), "classes_seen": int(len(np.unique(self.labels))), **self.info}


def _demo(n: int, model: ModelDesc) -> Tuple[np.ndarray, np.ndarray, str]:
    """First ``n`` images of the demo task's test split, generated with the config the model was
    trained on (``demo_data_config`` in the manifest; the generator's defaults otherwise). A larger
    cached set is reused."""
    try:
        from gfnet_edge.data.cluttered_digits import ClutteredDigits, ClutteredDigitsConfig, demo_config
    except ModuleNotFoundError as exc:
        missing = missing_build_module(exc)
        if missing is None:
            raise
        raise needs_build_side("--data demo (generating the demo task's images)", missing) from exc

    cfg = demo_config(model) or ClutteredDigitsConfig()
    if cfg.image_size != model.image_size:
        raise InputError(f"--data demo: the demo images are {cfg.image_size}px, the model expects "
                         f"{model.image_size}px")
    frames, labels = ClutteredDigits("test", size=n, config=cfg).arrays(n, progress=True)  # reuses a larger cache
    return frames, labels.astype(np.int64), cfg.key()


def load_calibration_data(source: str, model: "ModelDesc | Dict[str, Any]", limit: Optional[int] = None,
                          holdout: float = 0.5, seed: int = 0, skip_unreadable: bool = False) -> LabelledImages:
    """Loads labelled calibration images and splits them.

    Args:
        source: ``demo`` (the cluttered-digits test split, with the generator config recorded in
            the bundle), a folder with one subfolder per
            class, or an ``.npz`` with ``images`` and ``labels``.
        model: the bundle manifest's ``model`` entry (image size, crop, interpolation).
        limit: use at most this many images (``demo`` default 1000).
        holdout: fraction kept for held-out evaluation.
        seed: seed of the random split.
        skip_unreadable: leave out a folder's image files that cannot be read (each named in a
            warning; their number is in ``info["skipped_unreadable"]``) instead of stopping at
            the first.

    Raises:
        InputError: unreadable data, no labels, too few images, bad arguments.
    """
    model = as_desc(model)
    S = model.image_size
    info: Dict[str, Any] = {}
    files: Optional[List[str]] = None
    if not 0.0 < holdout < 1.0:
        raise InputError(f"--holdout must be between 0 and 1, got {holdout}")
    if limit is not None and limit < MIN_IMAGES:
        raise InputError(f"--num-images must be at least {MIN_IMAGES}, got {limit}")
    if skip_unreadable:
        from gfnet_edge.data.images import check_skip_source

        try:
            check_skip_source(source, source == "demo", f"--data {source}")
        except ValueError as exc:
            raise InputError(str(exc)) from None
    if source == "demo":
        if not model.is_demo:
            raise InputError(f"--data demo is the demo task's data; this bundle's model is "
                             f"{model.model_name!r}: pass --data FOLDER|FILE.npz with labelled images")
        frames, labels, key = _demo(limit or 1000, model)
        info = {"demo_split": "test", "demo_config_key": key}
    else:
        from gfnet_edge.data.images import load_images, shown_name, unreadable_files

        _check_class_folders(source, model)  # before reading every image
        skipped: List[str] = []
        try:
            frames, labels, files = load_images(source, S, model.crop_pct, model.dataset_interpolation,
                                                on_error=unreadable_files(skip_unreadable, skipped), with_files=True)
        except ValueError as exc:
            raise InputError(f"cannot read calibration data: {exc}") from exc
        if files is not None:
            files = [shown_name(f) for f in files]
        if skipped:
            info["skipped_unreadable"] = len(skipped)
        if labels is None:
            raise InputError(f"{source}: calibration needs labelled images (a folder with one subfolder per class, "
                             "or an .npz with a 'labels' array); these have no labels")
        if limit is not None and len(labels) > limit:
            pick = np.sort(np.random.default_rng(seed).permutation(len(labels))[:limit])
            frames, labels = frames[pick], labels[pick]
            files = [files[i] for i in pick] if files is not None else None
    n = len(labels)
    classes = model.num_classes
    if classes and labels.size and int(labels.max()) >= classes:
        raise InputError(f"{source}: label {int(labels.max())} is out of range for a model with {classes} classes")
    if n < MIN_IMAGES:
        raise InputError(f"{source}: {n} labelled image(s); calibration needs at least {MIN_IMAGES} (better a few "
                         "hundred)")
    order = np.random.default_rng(seed).permutation(n)
    n_hold = min(n - 2, max(2, int(round(n * holdout))))
    if min(n - n_hold, n_hold) < ADVISED_SPLIT_IMAGES:
        logger.warning("calibration: %d image(s) to fit the thresholds on and %d held out (of %d): budgets and "
                       "accuracies from fewer than %d each are rough (better a few hundred labelled images)",
                       n - n_hold, n_hold, n, ADVISED_SPLIT_IMAGES)
    return LabelledImages(str(source), np.ascontiguousarray(frames), labels.astype(np.int64),
                           np.sort(order[n_hold:]), np.sort(order[:n_hold]), info, files)


def _check_class_folders(source: str, model: ModelDesc) -> None:
    """A class-folder dataset gives labels by sorted folder name, so it must have the model's
    classes: the same names when the bundle records them, else as many folders as classes."""
    from gfnet_edge.data.images import check_class_folders

    if source != "demo":
        check_class_folders(source, model.class_names, model.num_classes)
