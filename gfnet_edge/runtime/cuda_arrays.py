"""Frames already in GPU memory: reading objects that expose ``__cuda_array_interface__``
(CuPy arrays, torch CUDA tensors, Numba device arrays) without copying them.

:func:`device_frames` turns such an object (or a list of them) into :class:`DeviceFrame`
records -- address, size and the producer's stream -- that the device place pre-processes where
they are (:meth:`~gfnet_edge.runtime.device_place.DevicePlace.device_frames`).
"""
from __future__ import annotations

from typing import Any, List, NamedTuple, Optional

import numpy as np

from ..errors import InputError


class DeviceFrame(NamedTuple):
    """A uint8 HWC RGB frame in GPU memory: its address, size and producer stream."""

    ptr: int
    height: int
    width: int
    stream: Optional[int]  #: the producer's stream to synchronize first (None: nothing to wait for)


def is_device_array(obj: Any) -> bool:
    """True for an object exposing CUDA memory through ``__cuda_array_interface__`` (CuPy
    arrays, torch CUDA tensors, Numba device arrays, ...)."""
    return not isinstance(obj, np.ndarray) and hasattr(obj, "__cuda_array_interface__")


def device_frames(inputs: Any) -> List[DeviceFrame]:
    """Reads the frames of a device array (``(H, W, 3)`` or ``(N, H, W, 3)`` uint8,
    C-contiguous) or of a list of ``(H, W, 3)`` ones, through ``__cuda_array_interface__``
    (version 2 or 3; its ``stream``, when given, is synchronized before the frames are read).

    Raises:
        InputError: a dtype, shape, layout or mask the loop cannot read in place.
    """
    items = [inputs] if is_device_array(inputs) else list(inputs)
    if not items:
        raise InputError("no images given")
    out: List[DeviceFrame] = []
    for i, obj in enumerate(items):
        if not is_device_array(obj):
            raise InputError(f"image {i}: a list of device frames must hold only device arrays, got "
                             f"{type(obj).__name__}")
        cai = obj.__cuda_array_interface__
        shape = tuple(int(d) for d in cai.get("shape", ()))
        where = f"image {i} (device array of shape {shape})"
        if cai.get("typestr") not in ("|u1", "<u1", ">u1"):
            raise InputError(f"{where}: device frames must be uint8 (typestr '|u1'), got {cai.get('typestr')!r}")
        if len(shape) not in (3, 4) or shape[-1] != 3 or 0 in shape:
            raise InputError(f"{where}: device frames must be uint8 (H, W, 3) or (N, H, W, 3) RGB")
        contiguous = tuple(int(np.prod(shape[k + 1:])) for k in range(len(shape)))
        strides = cai.get("strides")
        if strides is not None and tuple(int(v) for v in strides) != contiguous:
            raise InputError(f"{where}: device frames must be C-contiguous (strides {tuple(strides)}); "
                             "make a contiguous copy on the device first")
        if cai.get("mask") is not None:
            raise InputError(f"{where}: masked device arrays are not supported")
        ptr = int(cai["data"][0])
        if ptr == 0:
            raise InputError(f"{where}: null device pointer")
        stream = cai.get("stream")
        h, w = shape[-3], shape[-2]
        for k in range(shape[0] if len(shape) == 4 else 1):
            out.append(DeviceFrame(ptr + k * h * w * 3, h, w, None if stream is None else int(stream)))
    return out
