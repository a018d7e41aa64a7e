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

    augmented = False  # an item is the same in every epoch

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

    One stream runs through the stage: epoch ``e`` takes the ``iters`` batches after those of
    epochs ``0 .. e-1``, so an epoch's batches depend only on (seed, epoch). Epochs taken in
    order continue the stream where the last one ended; any other epoch (the first one after a
    resume, a repeated one) replays the stream from its seed up to that epoch, so a resumed
    stage draws what an uninterrupted one draws. ``batches`` holds the global batch of each
    epoch (the last entry repeats); each of ``world`` processes takes rows ``rank::world`` of
    every batch.
    """

    def __init__(self, n: int, batches: List[int], iters: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batches, self.iters, self.seed = n, list(batches), iters, seed
        self.rank, self.world = rank, world
        self.epoch = 0
        self._stream: Optional[Batches] = None  # positioned at the start of epoch ``self._at``
        self._at = -1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batch(self, epoch: int) -> int:
        return min(self.batches[min(epoch, len(self.batches) - 1)], self.n)

    def _draw(self, stream: Batches, epoch: int) -> List[np.ndarray]:
        stream.batch = self._batch(epoch)
        return [stream.next() for _ in range(self.iters)]

    def epoch_batches(self, epoch: int) -> List[np.ndarray]:
        """The global batches of ``epoch`` (continuing the stream when it is the next one)."""
        if self._stream is None or self._at != epoch:
            self._stream = Batches(self.n, self._batch(0), self.seed)
            for e in range(epoch):
                self._draw(self._stream, e)
        out = self._draw(self._stream, epoch)
        self._at = epoch + 1
        return out

    def __iter__(self):
        # drawn whole before the first batch is used: a loop that stops early (a time cap)
        # still leaves the stream at the start of the next epoch
        for b in self.epoch_batches(self.epoch):
            yield b[self.rank::self.world].tolist()

    def __len__(self) -> int:
        return self.iters
