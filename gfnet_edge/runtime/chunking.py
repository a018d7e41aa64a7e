"""How :class:`~gfnet_edge.runtime.api.Runtime` keeps its memory bounded by a working chunk.

A call of any size is cut into chunks of at most ``max_batch`` images. Each chunk is converted,
normalised and run through the loop on its own (host buffers, device uploads and backbone
activations sized for the chunk), and its results are written into outputs allocated once for
the whole call (:class:`OutputBuffer`). Nothing of the input is copied as a whole: slices of an
array are views, device frames are addressed in place (:func:`device_chunks`). On the device
place the next chunk's upload overlaps the current chunk's steps
(:meth:`~gfnet_edge.runtime.device_place.DevicePlace.prefetch`).

:func:`stream_batches` groups the items of an iterable (a video, a folder walk) into batches for
:meth:`Runtime.predict_iter <gfnet_edge.runtime.api.Runtime.predict_iter>`.
"""
from __future__ import annotations

import collections.abc

from typing import Any, ClassVar, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np

from ..errors import InputError
from .driver import StepOutputs
from .types import check_cropped

#: Images per chunk when neither the user nor the runner sets a max batch (the default max batch
#: of a TensorRT engine's profile too). On the demo model on ONNX Runtime, trace throughput was
#: the same for chunks of 8 to 128 images while the working memory grew by about 3 MB per
#: image of the chunk (docs/benchmarks.md).
DEFAULT_MAX_BATCH = 32


def check_batch(value: Any, name: str) -> Optional[int]:
    """``value`` as a positive int, or None when it is None.

    Raises:
        InputError: not a positive int.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def chunk_size(user: Optional[int], runner_max: Optional[int]) -> int:
    """Images per chunk: the user's ``max_batch``, else the runner's (a TensorRT engine's
    profile), else :data:`DEFAULT_MAX_BATCH`."""
    return int(user or runner_max or DEFAULT_MAX_BATCH)


class OutputBuffer:
    """The :class:`~gfnet_edge.runtime.driver.StepOutputs` of ``n`` images, written chunk by
    chunk into arrays allocated at the first chunk (shapes and dtypes taken from it).

    Args:
        n: images in the call.
    """

    #: StepOutputs fields and the axis along which images lie.
    AXES: ClassVar[Dict[str, int]] = {"prediction": 0, "confidence": 0, "exit_step": 0, "coords": 1, "probs": 1,
                                      "stopped": 0}

    def __init__(self, n: int) -> None:
        self.n = n
        self.arrays: Optional[Dict[str, Optional[np.ndarray]]] = None

    def write(self, start: int, part: StepOutputs) -> None:
        """Copies a chunk's outputs to images ``start .. start + len``."""
        if self.arrays is None:
            self.arrays = {}
            for name, axis in self.AXES.items():
                a = getattr(part, name)
                if a is None:
                    self.arrays[name] = None
                    continue
                shape = list(a.shape)
                shape[axis] = self.n
                self.arrays[name] = np.empty(shape, a.dtype)
        for name, axis in self.AXES.items():
            dst, src = self.arrays[name], getattr(part, name)
            if dst is None:
                continue
            index = [slice(None)] * dst.ndim
            index[axis] = slice(start, start + src.shape[axis])
            dst[tuple(index)] = src

    def result(self) -> StepOutputs:
        if self.arrays is None:
            raise RuntimeError("no chunk was written")
        return StepOutputs(**self.arrays)


class DeviceFrameView:
    """One uint8 (H, W, 3) frame inside a caller's device array, re-exposed through
    ``__cuda_array_interface__`` (version 3) so a chunk of frames can be handed on without
    slicing the caller's object."""

    def __init__(self, ptr: int, height: int, width: int, stream: Optional[int]) -> None:
        self.__cuda_array_interface__ = {
            "shape": (height, width, 3), "typestr": "|u1", "data": (ptr, False), "strides": None,
            "version": 3, "stream": stream}


def device_chunks(inputs: Any, size: int, cropped_size: Optional[int] = None
                  ) -> Tuple[int, Iterator[List[DeviceFrameView]], Optional[np.ndarray]]:
    """Frames in GPU memory (as :meth:`Runtime.predict` takes them), validated once:
    ``(number of frames, chunks of at most size frames, addressed where they are, (N, 2)
    frame heights and widths)``. A producer's stream is named only on its first frame, so it is
    synchronized once per call. ``cropped_size``: the frames are given as cropped and must be
    that size (S x S); their sizes are then None (not the sizes of the frames they were cut from)."""
    from .cuda_arrays import device_frames

    frames = device_frames(inputs)
    if cropped_size is not None:
        check_cropped(((f.height, f.width) for f in frames), cropped_size)
    first = {f.stream: i for i, f in reversed(list(enumerate(frames)))}
    views = [DeviceFrameView(f.ptr, f.height, f.width, f.stream if first[f.stream] == i else None)
             for i, f in enumerate(frames)]
    sizes = None if cropped_size is not None else \
        np.array([(f.height, f.width) for f in frames], np.int64).reshape(len(frames), 2)
    return len(views), (views[start:start + size] for start in range(0, len(views), size)), sizes


def channels_hint(frame: np.ndarray) -> str:
    """For a uint8 frame refused for its channels: how to make it RGB (else "")."""
    if frame.dtype != np.uint8 or not (frame.ndim == 2 or (frame.ndim in (3, 4) and frame.shape[-1] in (1, 2, 4))):
        return ""
    return " (a grey or RGBA frame: convert it to RGB first, e.g. PIL's Image.convert('RGB'))"


def _as_stack(item: Any, i: int, S: int, cropped: bool = False) -> np.ndarray:
    """An item of :func:`stream_batches` as a 4-D stack (a view; nothing copied)."""
    if isinstance(item, np.ndarray):
        if item.dtype == np.uint8 and item.ndim in (3, 4) and item.shape[-1] == 3 and item.size:
            if cropped:
                check_cropped([item.shape[-3:-1]], S, "item", i)
            return item if item.ndim == 4 else item[None]
        if item.dtype == np.float32 and item.ndim in (3, 4) and item.shape[-3:] == (3, S, S) and item.size:
            return item if item.ndim == 4 else item[None]
        desc = f"{item.dtype} {item.shape}{channels_hint(item)}"
    else:
        desc = type(item).__name__
    raise InputError(f"item {i}: expected a uint8 (H, W, 3) frame, a float32 (3, {S}, {S}) image, "
                     f"or a stack of either, got {desc}")


def check_frames_given(inputs: Any) -> None:
    """Refuses what cannot hold frames although Python can iterate it (an encoded image's bytes, a
    file name, a dict, a memoryview) or cannot iterate at all: one :class:`InputError` naming the
    type given, instead of a fault blamed on its first item."""
    if isinstance(inputs, np.ndarray) or (hasattr(inputs, "__iter__") and not isinstance(
            inputs, (str, bytes, bytearray, memoryview, collections.abc.Mapping))):
        return
    hint = (" (encoded image bytes are decoded first, e.g. with PIL)" if isinstance(inputs, (bytes, bytearray))
            else " (numpy.asarray gives the array it views)" if isinstance(inputs, memoryview) else "")
    raise InputError(f"expected uint8 HWC RGB frames (an array or a list of arrays) or float32 NCHW "
                     f"images, got {type(inputs).__name__}{hint}")


def stream_batches(items: Iterable[Any], size: int, S: int,
                   cropped: bool = False) -> Iterator[Union[np.ndarray, List[np.ndarray]]]:
    """Groups frames or images from an iterable into batches of ``size`` (the last may be
    smaller), reading the iterable only as far as the batch being filled.

    Args:
        items: uint8 (H, W, 3) frames, normalised float32 (3, S, S) images, or stacks of
            either ((N, H, W, 3), (N, 3, S, S)); one kind per batch.
        size: images per batch.
        S: the model's input size.
        cropped: uint8 frames must be S x S (they are given as already cropped).

    Yields:
        what :meth:`Runtime.predict` takes: a stack (a view when it comes from one item), a
        list of uint8 frames, or float32 images stacked for this batch only.

    Raises:
        InputError: an item of another type or shape (the item's index in the stream named), or
            uint8 frames and float32 images in one batch.
    """
    pending: List[np.ndarray] = []
    count = 0
    for i, item in enumerate(items):
        stack = _as_stack(item, i, S, cropped)
        if pending and stack.dtype != pending[0].dtype:
            raise InputError(f"item {i}: {stack.dtype} images in a batch of {pending[0].dtype} ones; "
                             "give uint8 frames or float32 images, not both")
        while stack.shape[0]:
            take = min(size - count, stack.shape[0])
            pending.append(stack[:take])
            count += take
            stack = stack[take:]
            if count == size:
                yield _join(pending)
                pending, count = [], 0
    if pending:
        yield _join(pending)


def _join(pieces: List[np.ndarray]) -> Union[np.ndarray, List[np.ndarray]]:
    if len(pieces) == 1:
        return pieces[0]
    if pieces[0].dtype == np.uint8:  # frames may differ in size: a list, no copy
        return [f for p in pieces for f in p]
    return np.concatenate(pieces)
