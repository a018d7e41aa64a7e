"""CPU image kernels: pre-processing (resize, centre crop, normalise), glance and patch crop.

``preprocess`` reproduces torchvision exactly: ``resize(frame_uint8_tensor, int(S / crop_pct),
interpolation, antialias=True)`` (PyTorch's PIL-equivalent uint8 kernel), ``center_crop(S)``,
``/ 255``, ``normalize(mean, std)``; the glance is ``F.interpolate(images, (P, P), mode,
align_corners=True)``. Arrays are validated by the extension (TypeError for a wrong dtype,
ValueError for a wrong shape or an out-of-range value). The frames and images of
:func:`preprocess`, :func:`resize_crop`, :func:`normalise_frames`, :func:`glance` and
:func:`crop_patches` (its ``coords`` and ``index`` too) may have any memory layout (Fortran
order, a transposed view, negative strides): one that is not C-contiguous is copied to a
C-contiguous array first, as the runtime does. Output arrays (``out``) must be C-contiguous.
"""
from __future__ import annotations

import numbers
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from ._args import INT32_MAX, choice, ndarray, to_int, triple
from ._ext import _C

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

ArrayPair = Tuple[np.ndarray, np.ndarray]


def resize_size(image_size: int, crop_pct: float) -> int:
    """The shorter-side resize before the centre crop: ``int(image_size / crop_pct)``, at most
    2^53 (the kernels take resize size x longer frame side up to 2^53: a larger size fits no frame)."""
    image_size = to_int(image_size, "image_size")
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, numbers.Real):
        raise TypeError(f"crop_pct must be a number, got {type(crop_pct).__name__}")
    if not 0.0 < float(crop_pct) <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    size = image_size / float(crop_pct)
    if not size <= _C.RESIZE_MAX_PRODUCT:
        raise ValueError(f"crop_pct {crop_pct} is too small for image_size {image_size}: the resize size "
                         f"image_size / crop_pct = {size:.3g} fits no frame (resize size x longer side must be "
                         "at most 2^53)")
    return int(size)


def _c_order(a: Any) -> Any:
    """``a`` itself, or a C-contiguous copy of a numpy array that is not (the kernels read rows
    of contiguous pixels); anything else is passed on for the extension to check."""
    if isinstance(a, np.ndarray) and not a.flags.c_contiguous:
        return np.ascontiguousarray(a)
    return a


def _frame_list(frames: Any) -> List[Any]:
    """One frame, an (N, H, W, 3) array or a list of frames -> a list of C-contiguous frames
    (copies of those that are not; the extension checks each frame and that the list is not
    empty)."""
    if isinstance(frames, np.ndarray):
        frames = _c_order(frames)
        return [frames[i] for i in range(frames.shape[0])] if frames.ndim == 4 else [frames]
    if isinstance(frames, (list, tuple)):
        return [_c_order(f) for f in frames]
    raise TypeError(f"frames must be a numpy array or a list of arrays, got {type(frames).__name__}")


#: Resize filters of the image kernels.
INTERPOLATIONS = ("bilinear", "bicubic")


def _interp(value: Any, name: str = "interpolation") -> str:
    return choice(value, name, INTERPOLATIONS)


def _side(value: Any, name: str = "image_size") -> int:
    return to_int(value, name, 1, INT32_MAX)


def preprocess(
    frames: Union[np.ndarray, Sequence[np.ndarray]],
    image_size: int,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    bgr: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    glance_size: Optional[int] = None,
    glance_interpolation: str = "bicubic",
    out: Optional[np.ndarray] = None,
    glance_out: Optional[np.ndarray] = None,
) -> Union[np.ndarray, ArrayPair]:
    """Pre-processes uint8 HWC frames into normalised (N, 3, S, S) float32 images.

    Resize (antialiased, shorter side to ``int(S / crop_pct)``), centre crop, scale and
    normalise in one pass per frame, plus the glance in a second pass when ``glance_size``
    is given. Bit-identical to torchvision's uint8 path (see the module docstring).

    Args:
        frames: one (H, W, 3) uint8 frame, an (N, H, W, 3) array, or a list of frames of
            any sizes, in any memory layout (copied to C order where they are not).
        image_size: S, the crop size.
        crop_pct: resize the shorter side to ``int(S / crop_pct)``; in (0, 1].
        interpolation: ``"bilinear"`` or ``"bicubic"`` (PIL-style antialiased filters).
        bgr: the frames are B, G, R (output channels are always R, G, B).
        mean: per-channel mean (R, G, B) subtracted after scaling to [0, 1].
        std: per-channel standard deviation (non-zero).
        glance_size: P; also return the glance (align_corners=True resize of the images).
        glance_interpolation: ``"bilinear"`` or ``"bicubic"`` (a = -0.75).
        out: optional (N, 3, S, S) float32 C-contiguous array to write into (e.g. a slice
            of a larger batch).
        glance_out: optional (N, 3, P, P) float32 array for the glance.

    Returns:
        The images, or ``(images, glance)`` when ``glance_size`` is given.
    """
    frame_list = _frame_list(frames)
    size = resize_size(image_size, crop_pct)
    g = 0 if glance_size is None else to_int(glance_size, "glance_size")
    if g == 0 and glance_out is not None:
        raise ValueError("glance_out given without glance_size")
    images, gl = _C.preprocess(frame_list, _side(image_size), size, _interp(interpolation), bool(bgr),
                               triple(mean, "mean"), triple(std, "std"), out, g,
                               _interp(glance_interpolation, "glance_interpolation"), glance_out)
    return images if glance_size is None else (images, gl)


def resize_crop(
    frames: Union[np.ndarray, Sequence[np.ndarray]],
    image_size: int,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """The resize and centre crop of :func:`preprocess` without the normalisation.

    Returns uint8 (N, S, S, 3) frames in the input's channel order: the levels
    :func:`preprocess` normalises (``preprocess(resize_crop(f, S, c), S, crop_pct=1.0)`` equals
    ``preprocess(f, S, c)`` bit for bit). Keeping images as uint8 until a patch is cut (see
    :func:`glance` and :func:`crop_patches`) moves a quarter of the bytes.

    Args:
        frames: as for :func:`preprocess`.
        image_size: S.
        crop_pct: resize the shorter side to ``int(S / crop_pct)``; in (0, 1].
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        out: optional (N, S, S, 3) uint8 C-contiguous array to write into.
    """
    frame_list = _frame_list(frames)
    return _C.resize_crop(frame_list, _side(image_size), resize_size(image_size, crop_pct), _interp(interpolation), out)


class CropGeometry(NamedTuple):
    """Where the S x S input sits in a frame: the frame resized to ``resized`` (height, width),
    then cropped at ``(top, left)`` of the resized image (:func:`crop_geometry`)."""

    frame: Tuple[int, int]
    resized: Tuple[int, int]
    top: int
    left: int
    crop: int

    def to_frame(self, boxes: Any) -> np.ndarray:
        """``(..., 4)`` boxes ``(top, left, bottom, right)`` in pixels of the S x S input ->
        the same boxes in pixels of the frame (float64; edges map exactly: the resize scales
        each axis by frame / resized size, so a box's edges land where the pixels it covers came
        from)."""
        b = np.asarray(boxes, dtype=np.float64)
        if b.shape[-1:] != (4,):
            raise ValueError(f"boxes must have 4 values (top, left, bottom, right) in their last axis, got {b.shape}")
        sy = self.frame[0] / self.resized[0]
        sx = self.frame[1] / self.resized[1]
        offset = np.array([self.top, self.left, self.top, self.left], dtype=np.float64)
        scale = np.array([sy, sx, sy, sx], dtype=np.float64)
        return (b + offset) * scale


def crop_geometry(height: int, width: int, image_size: int, crop_pct: float = 0.875) -> CropGeometry:
    """The resize and centre crop :func:`preprocess` / :func:`resize_crop` apply to an
    ``height`` x ``width`` frame: the shorter side resized to ``int(S / crop_pct)``, the longer
    one to ``int(short * long / shorter)`` (torchvision's ``Resize(int)``), then the S x S crop at
    ``round((resized - S) / 2)`` (Python's rounding, half to even, as torchvision's ``CenterCrop``).
    ``crop_geometry(h, w, S, c).to_frame(boxes)`` maps patch boxes back onto the frame."""
    h, w = to_int(height, "height", 1, INT32_MAX), to_int(width, "width", 1, INT32_MAX)
    S = _side(image_size)
    short = resize_size(S, crop_pct)
    if short < S:
        raise ValueError(f"resize size {short} is smaller than the crop size {S}")
    rh, rw = resized_hw(h, w, short)
    return CropGeometry((h, w), (rh, rw), int(round((rh - S) / 2.0)), int(round((rw - S) / 2.0)), S)


def resized_hw(height: int, width: int, short: int) -> Tuple[int, int]:
    """``(height, width)`` after resizing the shorter side to ``short``, the longer side truncated
    as torchvision's ``Resize(int)`` computes it (``int(short * long / shorter)``).

    Refuses (ValueError) the sizes the kernels refuse: ``short`` times the longer side over 2^53
    (past which the kernels' long side would not be exactly this one), and ``short`` over 65536
    times the shorter side (planning the resize takes time in proportion to the enlargement)."""
    shorter, longer = min(height, width), max(height, width)
    frame = f"{height} x {width} frame"
    if short > _C.RESIZE_MAX_PRODUCT // longer:
        raise ValueError(f"resize size {short} is too large for a {frame} "
                         "(resize size x longer side must be at most 2^53)")
    if short > _C.RESIZE_MAX_ENLARGEMENT * shorter:
        raise ValueError(f"resize size {short} enlarges the {frame} more than {_C.RESIZE_MAX_ENLARGEMENT} times "
                         "(planning a resize takes time in proportion to the enlargement; a larger crop_pct "
                         "enlarges less)")
    long_side = int(short * longer / shorter)
    return (long_side, short) if width <= height else (short, long_side)


class CacheInfo(NamedTuple):
    """Statistics of the resize plan cache, as :func:`functools.lru_cache`'s ``cache_info()``."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


def resize_plan_cache_info() -> CacheInfo:
    """Lookups of the CPU resize plan cache since the extension was loaded.

    :func:`preprocess` and :func:`resize_crop` plan the filter taps once per frame size (and
    resize, crop size, interpolation) and keep the plans of the 16 most recently used sizes;
    a camera or folder with more sizes in turn than that replans (``misses`` grows on every
    call). Planning costs about the crop's taps: microseconds for camera frames.
    """
    return CacheInfo(*_C.resize_plan_cache_info())


def _normalisation(images: np.ndarray, mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                   bgr: bool) -> Optional[Tuple[list, list, bool]]:
    """``(mean, std, bgr)`` for uint8 frames (which need them), None for float images (which
    must not have them)."""
    if images.dtype == np.uint8:
        if mean is None or std is None:
            raise TypeError("images have dtype uint8: uint8 frames (N, S, S, 3) need mean and std (they are "
                            "normalised on the fly); normalised images must be float32")
        return triple(mean, "mean"), triple(std, "std"), bool(bgr)
    if mean is not None or std is not None or bgr:
        raise ValueError("mean, std and bgr apply to uint8 frames only; these images are "
                         f"{images.dtype} (already normalised)")
    return None


def glance(images: np.ndarray, patch_size: int, interpolation: str = "bicubic",
           out: Optional[np.ndarray] = None, mean: Optional[Sequence[float]] = None,
           std: Optional[Sequence[float]] = None, bgr: bool = False) -> np.ndarray:
    """Resizes square images to (N, C, P, P), align_corners=True.

    Matches ``torch.nn.functional.interpolate(images, (P, P), mode=interpolation,
    align_corners=True)`` within 1e-5 (bicubic uses a = -0.75 and clamped borders).

    Args:
        images: normalised float32 (N, C, S, S); or uint8 frames (N, S, S, 3) with ``mean`` and
            ``std``, whose glance is returned normalised (the glance of the normalised images
            up to float rounding: the levels are resampled, then normalised). Any memory
            layout (copied to C order where it is not).
        patch_size: P.
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        out: optional (N, C, P, P) float32 output.
        mean, std: per-channel normalisation of uint8 frames (R, G, B).
        bgr: the uint8 frames are B, G, R (the output is R, G, B).
    """
    norm = _normalisation(ndarray(images, "images"), mean, std, bgr)
    P = to_int(patch_size, "patch_size", minimum=None)
    images = _c_order(images)
    if norm is not None:
        return _C.glance_u8(images, P, _interp(interpolation), *norm, out)
    return _C.glance(images, P, _interp(interpolation), out)


def crop_patches(images: np.ndarray, coords: np.ndarray, patch_size: int,
                 out: Optional[np.ndarray] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, bgr: bool = False,
                 index: Optional[np.ndarray] = None) -> np.ndarray:
    """Cuts ``images[k, :, r:r+P, c:c+P]`` for each ``(r, c) = coords[i]``, with ``k = i`` or
    ``k = index[i]``.

    Args:
        images: (N, C, S, S) float32; or uint8 frames (N, S, S, 3) with ``mean``
            and ``std``, cut and normalised in one pass (bit-identical to cutting the
            normalised images of :func:`preprocess`).
        coords: (M, 2) int32 (row, col), each in [0, S - P]; anything else raises ValueError.
            M = N without ``index``.
        patch_size: P.
        out: optional (M, C, P, P) float32 output.
        mean, std, bgr: as for :func:`glance`.
        index: optional (M,) int64 image of each patch, each in [0, N) (the images still
            running, without compacting the batch).

    ``images``, ``coords`` and ``index`` may have any memory layout (copied to C order where
    they are not).
    """
    norm = _normalisation(ndarray(images, "images"), mean, std, bgr)
    P = to_int(patch_size, "patch_size", minimum=None)
    images, coords, index = _c_order(images), _c_order(coords), _c_order(index)
    if norm is not None:
        return _C.crop_patches_u8(images, coords, P, *norm, out, index)
    return _C.crop_patches(images, coords, P, out, index)


def normalise_frames(frames: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Normalised float32 (N, 3, S, S) of uint8 (N, S, S, 3) frames already at the model's input
    size (:func:`preprocess` with ``crop_pct=1``: no resize, no crop, so no interpolation; the same
    arithmetic as ``(frames / 255 - mean) / std``).

    Raises:
        ValueError: frames not uint8 (N, S, S, 3) with square S x S images.
    """
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[1] != frames.shape[2] \
            or frames.shape[3] != 3 or frames.dtype != np.uint8:
        got = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"frames must be uint8 (N, S, S, 3), got {got}")
    return preprocess(frames, frames.shape[1], crop_pct=1.0, mean=mean, std=std)
