"""Image-folder data for ``gfnet-edge train --data ROOT``.

``ROOT/train/CLASS/*.jpg`` and ``ROOT/val/CLASS/*.jpg`` (torchvision's ``ImageFolder`` layout,
classes sorted by name). :func:`scan_dataset` checks the layout once and decodes every image
(JPEGs in draft mode, so the check is cheap); unreadable files are skipped and counted, every
other problem is an :class:`~gfnet_edge.errors.InputError` naming the folder.

Images reach the trainer as uint8 ``(3, S, S)`` tensors (normalised on the training device).
Training augmentation is drawn from a generator seeded by ``(seed, epoch, image index)``, so a
resumed run, or the same run on another number of processes, sees the same crops.
"""
from __future__ import annotations

import functools

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..data.images import _RGB_MODES, IMAGE_EXTENSIONS, _some, lookalike_names, open_rgb, preprocess, resized_size
from ..errors import InputError

LAYOUT = "expected ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg"


@dataclass
class FolderSplit:
    """The readable images of one split.

    Attributes:
        root: the split's folder.
        classes: class names (sorted), index = label.
        samples: ``(path, label)`` of every readable image.
        skipped: unreadable files (not used).
    """

    root: Path
    classes: List[str]
    samples: List[Tuple[str, int]]
    skipped: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self) -> List[int]:
        return [lab for _, lab in self.samples]


def _readable(path: str) -> bool:
    """Whether training (and inference) can read the file: 8-bit modes are loaded cheaply (a JPEG
    at 1/8 scale still reads every byte); other modes are decoded as :func:`open_rgb` does,
    since their levels must lie in a known range."""
    try:
        with Image.open(path) as im:
            if im.mode not in _RGB_MODES:
                open_rgb(path)
                return True
            im.draft("RGB", (64, 64))
            im.load()
        return True
    except Exception:  # PIL raises many types for bad files
        return False


def _walk(top: Path, others: Sequence[Path]) -> Iterator[Tuple[str, List[str]]]:
    """``(folder, file names)`` under the class folder ``top``, sub-folders included and symbolic
    links to folders followed, each folder once; a link to a folder above ``top`` (a loop) or to
    one of the ``others`` (the split's other class folders) is not entered, so no image is listed
    twice or under another class. Hidden folders and files (``.ipynb_checkpoints/``, macOS's
    ``._x.jpg``) are left out, as the image loader of ``calibrate`` / ``build-engine`` does."""
    top_real = os.path.realpath(top)
    seen = {os.path.realpath(o) for o in others}
    for dp, dirs, fs in os.walk(top, followlinks=True):
        real = os.path.realpath(dp)
        if real in seen or (real != top_real and top_real.startswith(real.rstrip(os.sep) + os.sep)):
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        yield dp, [f for f in fs if not f.startswith(".")]


def _list_split(root: Path, split: str) -> Tuple[List[str], List[List[str]]]:
    d = root / split
    if not d.is_dir():
        folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if root.name in ("train", "val") and all((root.parent / s).is_dir() for s in ("train", "val")):
            hint = f"; it is one split of the image folder: pass --data {root.parent}"
        else:
            hint = f"; the folders in it: {_some(folders)}" if folders else ""
        raise InputError(f"{root}: no {split}/ folder ({LAYOUT}){hint}")
    classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise InputError(f"{d}: needs at least 2 class folders, found {found} ({LAYOUT})")
    files = []
    for c in classes:
        names = sorted(str(Path(dp) / f) for dp, fs in _walk(d / c, [d / o for o in classes if o != c])
                       for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise InputError(f"{d / c}: no images ({', '.join(IMAGE_EXTENSIONS[:4])} ...)")
        files.append(names)
    return classes, files


def scan_split(root: Path, split: str, workers: int = 8, check: bool = True,
               listed: Optional[Tuple[List[str], List[List[str]]]] = None, progress: bool = False) -> FolderSplit:
    """Lists (and, with ``check``, decodes) the images of ``root/split``; ``listed``: its
    listing, when already made (``(classes, files per class)``); ``progress``: a progress bar
    of the decoding on standard error.

    Raises:
        InputError: missing split folder, fewer than 2 classes, a class with no (readable) images.
    """
    classes, files = listed if listed is not None else _list_split(root, split)
    flat = [(f, k) for k, names in enumerate(files) for f in names]
    ok = [True] * len(flat)
    if check:
        from tqdm.auto import tqdm

        with ThreadPoolExecutor(max(1, workers)) as pool:
            ok = list(tqdm(pool.map(_readable, [f for f, _ in flat], chunksize=64), total=len(flat),
                           desc=f"reading {root / split}", unit="img", disable=not progress, leave=False,
                           mininterval=2.0))
    samples = [s for s, good in zip(flat, ok) if good]
    skipped = [f for (f, _), good in zip(flat, ok) if not good]
    have = {lab for _, lab in samples}
    for k, c in enumerate(classes):
        if k not in have:
            raise InputError(f"{root / split / c}: none of its {len(files[k])} images is readable")
    return FolderSplit(root / split, classes, samples, skipped)


def scan_dataset(root: os.PathLike, workers: int = 8, check: bool = True,
                 progress: bool = False) -> Tuple[FolderSplit, FolderSplit]:
    """``(train, val)`` of an image folder, with the same classes in both.

    Raises:
        InputError: see :func:`scan_split`; the class folders differ between train and val.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder ({LAYOUT})")
    listed = {split: _list_split(root, split) for split in ("train", "val")}  # before any image is decoded
    train_classes, val_classes = listed["train"][0], listed["val"][0]
    if train_classes != val_classes:
        only_t = sorted(set(train_classes) - set(val_classes))
        only_v = sorted(set(val_classes) - set(train_classes))
        hint = lookalike_names(only_t, only_v, "{!r} in train", "{!r} in val", "rename one")
        raise InputError(f"{root}: train and val have different classes (only in train: {only_t or 'none'}; "
                         f"only in val: {only_v or 'none'}){hint}")
    return (scan_split(root, "train", workers, check, listed["train"], progress),
            scan_split(root, "val", workers, check, listed["val"], progress))


class FolderTransform:
    """PIL image -> uint8 ``(3, S, S)`` tensor: the shorter side to ``int(S / crop_pct)``, then an
    S x S crop (the centre one, or a random one with ``random_crop``) and an optional random
    horizontal flip.

    The resize and crop are the image loader's (:func:`gfnet_edge.data.images.preprocess`), so
    validation sees exactly the frames ``gfnet-edge calibrate`` and ``evaluate`` read from the same
    files, and a very long image has only its crop resampled (bounded memory). Random crops and
    flips draw from torch's generator as torchvision's ``RandomCrop`` and ``RandomHorizontalFlip``
    do, so an image of ordinary shape gets the crop ``Resize`` + ``RandomCrop`` would cut.
    """

    def __init__(self, image_size: int, crop_pct: float, interpolation: str, random_crop: bool = False,
                 hflip: bool = False) -> None:
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation {interpolation!r}: expected bilinear or bicubic")
        self.image_size, self.crop_pct, self.interpolation = image_size, crop_pct, interpolation
        self.random_crop, self.hflip = random_crop, hflip

    def _offset(self, img: Image.Image) -> Optional[Tuple[int, int]]:
        if not self.random_crop:
            return None
        S = self.image_size
        new_w, new_h = resized_size(*img.size, int(S / self.crop_pct))
        if (new_w, new_h) == (S, S):  # torchvision draws nothing then
            return 0, 0
        top = int(torch.randint(0, new_h - S + 1, size=(1,)).item())
        return top, int(torch.randint(0, new_w - S + 1, size=(1,)).item())

    def __call__(self, img: Image.Image) -> torch.Tensor:
        frame = preprocess(img, self.image_size, self.crop_pct, self.interpolation, self._offset(img))
        x = torch.from_numpy(np.array(frame, copy=True)).permute(2, 0, 1)
        if self.hflip and torch.rand(1) < 0.5:
            x = x.flip(-1)
        return x


def build_transform(image_size: int, crop_pct: float, interpolation: str, train: bool, random_crop: bool = True,
                    hflip: bool = False) -> FolderTransform:
    """The transform of a split: for training (``train``) a random crop unless ``random_crop`` is
    false, and a random flip with ``hflip``; for validation the centre crop."""
    return FolderTransform(image_size, crop_pct, interpolation, train and random_crop, train and hflip)


class FolderDataset(torch.utils.data.Dataset):
    """Items ``(uint8 image (3, S, S), label, index)``; augmentation seeded per image and epoch.

    ``augmented``: whether ``transform`` draws random numbers (an item then differs between epochs).
    """

    def __init__(self, split: FolderSplit, transform: Callable, seed: int = 0, augmented: bool = True) -> None:
        self.samples = split.samples
        self.transform = transform
        self.seed = seed
        self.augmented = augmented
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = open_rgb(path)  # the levels inference sees (16-bit and float greys mapped to 0..255)
        with torch.random.fork_rng(devices=[]):
            # modulo 2**64, the seeds torch takes (it wraps a negative one the same way)
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i) % 2**64)
            x = self.transform(img)
        return x, label, i


@dataclass
class DataSource:
    """What a trainer reads: datasets of ``(uint8 (3, S, S), label, index)`` items.

    Attributes:
        train: the train split (its ``epoch`` attribute is set before every epoch).
        val: the val split, in a fixed order.
        val_labels: int64 (n,) labels of ``val``.
    """

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    val_labels: np.ndarray


def folder_source(train: FolderSplit, val: FolderSplit, spec, seed: int, random_crop: bool = True,
                  hflip: bool = False) -> DataSource:
    """The image folder's splits as a :class:`DataSource` (decoded and resized for ``spec``)."""
    args = (spec.image_size, spec.crop_pct, spec.dataset_interpolation)
    return DataSource(FolderDataset(train, build_transform(*args, True, random_crop, hflip), seed,
                                    augmented=random_crop or hflip),
                      FolderDataset(val, build_transform(*args, False), seed, augmented=False),
                      np.asarray(val.labels(), dtype=np.int64))


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + W, ...`` of ``range(n)`` in order, no padding (evaluation shards)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


def make_loader(dataset: FolderDataset, batch: int, sampler: torch.utils.data.Sampler, workers: int,
                pin: bool, drop_last: bool, start: Optional[str] = None) -> torch.utils.data.DataLoader:
    """A DataLoader of ``batch`` images drawn by ``sampler``, its processes as
    :func:`worker_options` says."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, pin_memory=pin,
                                       drop_last=drop_last, persistent_workers=False, **worker_options(workers, start))


def worker_options(workers: int, start: Optional[str]) -> Dict[str, Any]:
    """The DataLoader arguments of the trainer's worker processes: ``workers`` of them (0: the
    images are loaded in this process), which ignore SIGINT, started by the method ``start``
    (``"fork"``, ``"spawn"``, ``"forkserver"``; None: torch's default)."""
    from .folder_stages.sigint import worker_ignores_sigint

    return dict(num_workers=workers, worker_init_fn=worker_ignores_sigint,
                multiprocessing_context=start if workers else None)


@functools.lru_cache(maxsize=16)
def _channel_stats(device: torch.device, mean: tuple, std: tuple):
    """(mean, std) as (1, 3, 1, 1) float32 tensors on ``device`` (made once per device)."""
    return (torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1),
            torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1))


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 ``(x / 255 - mean) / std``."""
    m, s = _channel_stats(x.device, tuple(float(v) for v in mean), tuple(float(v) for v in std))
    return x.to(torch.float32, copy=True).div_(255.0).sub_(m).div_(s)  # in place on a copy: no temporaries


def split_summary(split: FolderSplit, limit: Optional[int] = 3) -> str:
    """One line: images, classes and the unreadable files skipped."""
    line = f"{split.root}: {len(split)} images, {len(split.classes)} classes"
    if split.skipped:
        shown = ", ".join(Path(f).name for f in split.skipped[:limit])
        line += f"; skipped {len(split.skipped)} unreadable ({shown}{' ...' if len(split.skipped) > (limit or 0) else ''})"
    return line
