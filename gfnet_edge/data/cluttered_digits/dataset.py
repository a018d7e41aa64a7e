"""The cluttered-digits splits as datasets (rendered on demand, cached as ``.npz``), and the
array helpers training uses (ImageNet normalisation, crops around the digit)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from gfnet_edge.variants import IMAGENET_MEAN, IMAGENET_STD

from .config import ClutteredDigitsConfig, split_code
from .render import render_sample



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
        split_code(split)
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


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm progress bar (a no-op one when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled)
