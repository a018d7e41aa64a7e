"""Demo data in memory: uint8 frames of the cluttered-digits splits, normalised per batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from ..data.cluttered_digits import ClutteredDigits, ClutteredDigitsConfig, normalize


@dataclass
class Split:
    """One split held in memory.

    Attributes:
        frames: uint8 (N, S, S, 3).
        labels: int64 (N,).
        boxes: int32 (N, 4) digit ink box (row, col, h, w).
        large: bool (N,) size class.
    """

    frames: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    large: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def centres(self, idx: np.ndarray) -> np.ndarray:
        """Digit centres (row, col) as float (n, 2)."""
        b = self.boxes[idx].astype(np.float32)
        return np.stack([b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)


def load_split(split: str, n: int, config: Optional[ClutteredDigitsConfig] = None, workers: int = 2,
               progress: bool = True) -> Split:
    """The first ``n`` samples of ``split`` (generated once, then read from the ``.npz`` cache)."""
    ds = ClutteredDigits(split, size=n, config=config)
    frames, labels = ds.arrays(workers=workers, progress=progress)  # a larger cached set is reused
    boxes, large = ds.boxes(workers=workers, progress=progress)
    return Split(frames, labels, boxes, large)


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float32 (N, 3, H, W) (the dataset's ``normalize``)."""
    return torch.from_numpy(normalize(frames))


def crop_uint8(frames: np.ndarray, coords: np.ndarray, patch: int) -> np.ndarray:
    """P x P windows of uint8 frames at integer top-left ``coords`` (n, 2) (row, col)."""
    out = np.empty((len(frames), patch, patch, 3), dtype=np.uint8)
    for k, (r, c) in enumerate(coords):
        out[k] = frames[k, r:r + patch, c:c + patch]
    return out


def centred_coords(centres: np.ndarray, image_size: int, patch: int) -> np.ndarray:
    """Top-left of P x P windows around ``centres``, inside the image."""
    return np.clip(np.rint(centres - patch / 2), 0, image_size - patch).astype(np.int64)


def target_actions(centres: np.ndarray, image_size: int, patch: int) -> np.ndarray:
    """The action (fractions of S - P) whose patch is centred on the digit, clipped to [0, 1]."""
    return np.clip((centres - patch / 2) / (image_size - patch), 0.0, 1.0).astype(np.float32)


class SplitDataset(torch.utils.data.Dataset):
    """A :class:`Split` as trainer items ``(uint8 (3, S, S), label, index)`` (no augmentation)."""

    def __init__(self, split: Split) -> None:
        self.split = split
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.split.frames[i]).permute(2, 0, 1), int(self.split.labels[i]), i


def split_source(train: Split, val: Split):
    """The demo splits as the trainer's :class:`~gfnet_edge.train.folder_data.DataSource`."""
    from .folder_data import DataSource

    return DataSource(SplitDataset(train), SplitDataset(val), val.labels.astype(np.int64))


class Batches:
    """An endless, seeded stream of index batches (a fresh permutation per pass).

    The generator state is part of the training checkpoint, so a resumed run draws the same
    batches as an uninterrupted one.
    """

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch = n, batch
        self.rng = np.random.default_rng(seed)
        self.perm = self.rng.permutation(n)
        self.pos = 0

    def next(self) -> np.ndarray:
        if self.pos + self.batch > self.n:
            self.perm = self.rng.permutation(self.n)
            self.pos = 0
        b = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return np.sort(b)

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "perm": self.perm.tolist(), "pos": self.pos}

    def load(self, s: dict) -> None:
        self.rng.bit_generator.state = s["rng"]
        self.perm = np.asarray(s["perm"], dtype=np.int64)
        self.pos = int(s["pos"])


class EpochBatches(torch.utils.data.Sampler):
    """A batch sampler: epoch ``e`` of :class:`Batches`' stream, ``iters`` batches.

    The stream is replayed from its seed up to epoch ``e`` (:meth:`set_epoch`), so an epoch's
    batches depend only on (seed, epoch) and a resumed stage draws what an uninterrupted one
    draws. ``batches`` holds the global batch of each epoch (the last entry repeats); each of
    ``world`` processes takes rows ``rank::world`` of every batch.
    """

    def __init__(self, n: int, batches: List[int], iters: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batches, self.iters, self.seed = n, list(batches), iters, seed
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batch(self, epoch: int) -> int:
        return min(self.batches[min(epoch, len(self.batches) - 1)], self.n)

    def __iter__(self):
        stream = Batches(self.n, self._batch(0), self.seed)
        for e in range(self.epoch):
            stream.batch = self._batch(e)
            for _ in range(self.iters):
                stream.next()
        stream.batch = self._batch(self.epoch)
        for _ in range(self.iters):
            yield stream.next()[self.rank::self.world].tolist()

    def __len__(self) -> int:
        return self.iters
