"""CUDA image and batch kernels on device buffers; every call only enqueues work on ``stream``
unless noted. Sizes, dtype names and interpolation modes are validated by the extension
before anything is launched (ValueError); see :mod:`gfnet_edge.ops.cuda` for pointers and
streams."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ._args import to_int, triple
from ._ext import _C
from .cuda import device_pointer, optional_pointer, stream_handle, stream_synchronize, to_device
from .image import IMAGENET_MEAN, IMAGENET_STD, _interp, resize_size


def _name(value: Any, what: str) -> str:
    """A dtype name as a str (its value is checked by the extension)."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    return value


def cuda_preprocess(frame: Any, height: int, width: int, image_size: int, out: Any,
                    crop_pct: float = 0.875, interpolation: str = "bilinear", bgr: bool = False,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    out_dtype: str = "float32", glance: Any = None, glance_size: int = 0,
                    glance_interpolation: str = "bicubic", glance_dtype: str = "float32",
                    stream: Any = None, n: int = 1) -> None:
    """Enqueues the pre-processing of ``n`` device-resident uint8 HWC frames of ``height`` x
    ``width``, contiguous from ``frame`` (a camera's frames uploaded together).

    Writes (n, 3, S, S) to ``out`` (offset the pointer for a batch slot) in ``out_dtype`` and,
    when ``glance`` is given, the (n, 3, P, P) glance computed from the float32 values: one
    launch of each pass for the batch. The resize is bit-identical to the CPU path.
    """
    g = 0 if glance is None else to_int(glance_size, "glance_size")
    _C.cuda.preprocess(device_pointer(frame, "frame"), to_int(height, "height"), to_int(width, "width"),
                       to_int(image_size, "image_size"), resize_size(image_size, crop_pct), _interp(interpolation),
                       bool(bgr), triple(mean, "mean"), triple(std, "std"), device_pointer(out, "out"),
                       _name(out_dtype, "out_dtype"), optional_pointer(glance, "glance"), g,
                       _interp(glance_interpolation, "glance_interpolation"), _name(glance_dtype, "glance_dtype"),
                       stream_handle(stream), to_int(n, "n"))


def cuda_normalise_frames(frames: Any, n: int, image_size: int, out: Any, mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD, bgr: bool = False, glance: Any = None,
                          glance_size: int = 0, glance_interpolation: str = "bicubic", stream: Any = None) -> None:
    """Enqueues the normalisation of ``n`` contiguous device-resident uint8 (S, S, 3) frames that
    need no resize into float32 (n, 3, S, S) ``out`` and, when ``glance`` is given, their float32
    (n, 3, P, P) glance: two launches for the batch, equal bit for bit to :func:`cuda_preprocess`
    of each frame with ``crop_pct=1``."""
    g = 0 if glance is None else to_int(glance_size, "glance_size")
    _C.cuda.normalise_frames(device_pointer(frames, "frames"), to_int(n, "n"), to_int(image_size, "image_size"),
                             bool(bgr), triple(mean, "mean"), triple(std, "std"), device_pointer(out, "out"),
                             optional_pointer(glance, "glance"), g,
                             _interp(glance_interpolation, "glance_interpolation"), stream_handle(stream))


def cuda_glance(images: Any, n: int, image_size: int, out: Any, patch_size: int,
                interpolation: str = "bicubic", in_dtype: str = "float32", out_dtype: str = "float32",
                channels: int = 3, stream: Any = None) -> None:
    """Enqueues the glance (n, C, S, S) -> (n, C, P, P) on device buffers."""
    _C.cuda.glance(device_pointer(images, "images"), _name(in_dtype, "in_dtype"), to_int(n, "n"),
                   to_int(channels, "channels"), to_int(image_size, "image_size"), device_pointer(out, "out"),
                   _name(out_dtype, "out_dtype"), to_int(patch_size, "patch_size"), _interp(interpolation),
                   stream_handle(stream))


def cuda_crop_patches(images: Any, n: int, image_size: int, coords: Any, out: Any, patch_size: int,
                      dtype: str = "float32", channels: int = 3, error_flag: Any = None,
                      stream: Any = None, rows: Any = None, image_rows: Optional[int] = None) -> None:
    """Gathers patches at device int32 (n, 2) coordinates.

    ``coords`` may also be a host numpy array: it is then validated before the launch.
    Without ``error_flag`` the call synchronizes and raises ValueError on an out-of-range
    coordinate; with a zeroed device int32 ``error_flag`` it stays asynchronous and sets the
    flag to 1 instead (bad samples get zero patches; nothing is read out of bounds). A call
    without ``error_flag`` while ``stream`` is captured is refused (ValueError), as it would wait
    for the stream; so is one with host ``coords`` (their upload allocates a buffer and waits for
    it): capture the call with device coordinates and a flag (docs/kernels.md).

    With ``rows`` (a device int32 array (n,)), patch i is cut from image ``rows[i]`` of the
    ``image_rows`` images at ``images`` (so survivors of an early exit need not be moved); a
    row outside ``[0, image_rows)`` is handled like a bad coordinate.
    """
    n, S, P = to_int(n, "n"), to_int(image_size, "image_size"), to_int(patch_size, "patch_size")
    keep = None
    if isinstance(coords, np.ndarray):  # host coordinates: checked here, where they can be read
        if coords.dtype != np.int32:
            raise TypeError(f"coords must be int32, got {coords.dtype}")
        if coords.shape != (n, 2):
            raise ValueError(f"coords must have shape ({n}, 2), got {coords.shape}")
        if P > S or coords.min() < 0 or coords.max() > S - P:
            raise ValueError(f"patch coordinates must lie in [0, {S - P}]")
        if _C.cuda.stream_capturing(stream_handle(stream)):  # before the upload, so the capture stays valid
            raise ValueError("crop_patches: host coords are uploaded to a buffer the call allocates and waits for, "
                             "which a stream being captured does not allow: pass the coordinates in device memory")
        keep = to_device(coords, stream)
        coords = keep
    _C.cuda.crop_patches(device_pointer(images, "images"), dtype, n, to_int(channels, "channels"), S,
                         device_pointer(coords, "coords"), device_pointer(out, "out"), P,
                         optional_pointer(error_flag, "error_flag"), stream_handle(stream),
                         optional_pointer(rows, "rows"), 0 if rows is None else to_int(image_rows, "image_rows"))
    if keep is not None:
        stream_synchronize(stream)  # the temporary coordinate buffer must outlive the kernel


def cuda_gather_rows(src: Any, src_rows: int, idx: Any, dst: Any, row_bytes: int, n: Optional[int] = None,
                     error_flag: Any = None, stream: Any = None) -> None:
    """Enqueues the row gather ``dst[i] = src[idx[i]]`` (``numpy`` fancy indexing on rows).

    Used to compact the surviving samples of a batch on the device. Rows are ``row_bytes``
    bytes (any size; copied 16 or 4 bytes at a time when sizes and pointers allow it).

    Args:
        src: device pointer to ``src_rows`` rows.
        src_rows: number of rows in ``src`` (indices must lie in ``[0, src_rows)``).
        idx: a host integer numpy array (n,) -- validated here, converted to int32 and uploaded
            on ``stream`` into stream-ordered scratch memory, so the call stays asynchronous --
            or a device pointer to n int32 indices.
        dst: device pointer to n rows; must not overlap ``src``.
        row_bytes: bytes per row.
        n: number of rows to gather; required with device indices, ``len(idx)`` by default with
            host indices.
        error_flag: with device indices, a zeroed device int32 that is set to 1 when an index
            is out of range (that row of ``dst`` is zero-filled, nothing is read out of
            bounds); without it the call synchronizes ``stream`` and raises ValueError.
            Ignored with host indices (validated before the launch). While ``stream`` is
            captured, a call with host indices or without ``error_flag`` is refused
            (ValueError): give device indices and a flag.
        stream: the stream (see :mod:`gfnet_edge.ops.cuda`).

    Raises:
        TypeError: ``idx`` is neither an integer array nor a device pointer; bad argument types.
        ValueError: bad sizes, an out-of-range host index, overlapping ``src`` / ``dst``.
        RuntimeError: no CUDA build or no usable GPU.
    """
    # Every check below runs before the extension is called, so that a bad call is refused in
    # the same way on machines without a GPU (where the extension refuses any CUDA call first).
    src_rows = to_int(src_rows, "src_rows")
    row_bytes = to_int(row_bytes, "row_bytes")
    if isinstance(idx, np.ndarray):
        if idx.dtype.kind not in "iu":
            raise TypeError(f"idx must be an integer array, got dtype {idx.dtype}")
        if idx.ndim != 1:
            raise ValueError(f"idx must be 1-D, got shape {idx.shape}")
        count = int(idx.shape[0])
        if n is not None and to_int(n, "n") != count:
            raise ValueError(f"n = {n} but idx has {count} entries")
        if count < 1:
            raise ValueError("idx must not be empty")
        if idx.min() < 0 or idx.max() >= src_rows:
            raise ValueError(f"row indices must lie in [0, {src_rows - 1}], got [{idx.min()}, {idx.max()}]")
        index: Any = np.ascontiguousarray(idx, dtype=np.int32)
    else:
        if n is None:
            raise ValueError("n is required with device indices")
        count = to_int(n, "n")
        index = device_pointer(idx, "idx")
    src_ptr, dst_ptr = device_pointer(src, "src"), device_pointer(dst, "dst")
    if src_ptr < dst_ptr + count * row_bytes and dst_ptr < src_ptr + src_rows * row_bytes:
        raise ValueError("src and dst overlap (the gather is not in place)")
    flag = optional_pointer(error_flag, "error_flag") if not isinstance(idx, np.ndarray) else 0
    _C.cuda.gather_rows(src_ptr, src_rows, index, dst_ptr, count, row_bytes, flag, stream_handle(stream))


def cuda_copy(dst: Any, src: Any, nbytes: int, stream: Any = None) -> None:
    """Enqueues a device -> device copy of ``nbytes`` bytes."""
    _C.cuda.memcpy_dtod(device_pointer(dst, "dst"), device_pointer(src, "src"), to_int(nbytes, "nbytes", 0),
                        stream_handle(stream))


def cuda_softmax_stats(logits: Any, n: int, classes: int, maxprob: Any, argmax: Any, logits_out: Any = None,
                       out_dtype: str = "float32", stream: Any = None) -> None:
    """Enqueues softmax max probability (float32 (n,)) and argmax (int32 (n,), first maximum,
    NaN counting as the maximum) of float32 device logits (n, classes); ``logits_out`` also
    receives a copy of the logits in ``out_dtype``. ``maxprob`` / ``argmax`` may be None to
    skip them. More than 2^31 - 1 ``classes`` (more than an int32 argmax indexes) raise
    ValueError before any CUDA call."""
    _C.cuda.softmax_stats(device_pointer(logits, "logits"), to_int(n, "n"), to_int(classes, "classes"),
                          optional_pointer(maxprob, "maxprob"), optional_pointer(argmax, "argmax"),
                          optional_pointer(logits_out, "logits_out"), out_dtype, stream_handle(stream))
