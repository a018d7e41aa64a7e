"""CUDA availability, device memory, streams, events and graphs.

Device pointers are ints or objects exposing one (:class:`DeviceBuffer`, torch tensors, CuPy
arrays, pycuda allocations); a ``stream`` is a :class:`Stream`, an int handle, a torch / CuPy
stream, or None for the legacy default stream. A CUDA call without a usable GPU, or in a build
without CUDA, raises RuntimeError (raised by the extension itself).
"""
from __future__ import annotations

import numbers
from collections import Counter
from typing import Any, Dict, Sequence, Union

import numpy as np

from ._args import ndarray, to_int
from ._ext import _C


# ------------------------------------------------------------------------ availability ----
def has_cuda_build() -> bool:
    """True when the CUDA kernels were compiled into the extension."""
    return bool(_C.has_cuda_build())


def cuda_device_count() -> int:
    """Usable CUDA devices (0 without a build, a driver or a device; never raises)."""
    return int(_C.cuda_device_count())


def cuda_device_error() -> str:
    """Why :func:`cuda_device_count` is 0 (``""`` when it is not)."""
    return str(_C.cuda_device_error())


def cuda_archs() -> str:
    """The CUDA architectures compiled into the extension (``","``-separated; ``""`` without CUDA)."""
    return str(_C.cuda_archs())


def require_cuda() -> None:
    """Raises RuntimeError unless the extension has CUDA kernels and a usable device."""
    if not _C.has_cuda_build():
        raise RuntimeError("gfnet_edge._C was built without CUDA (nvcc not found or GFNET_EDGE_CUDA=0)")
    if _C.cuda_device_count() < 1:
        raise RuntimeError(f"no usable CUDA device ({_C.cuda_device_error()})")


def cuda_device_properties(index: int = 0) -> dict:
    """``{"name", "major", "minor", "total_memory", "multiprocessors", "integrated"}``."""
    return dict(_C.cuda.device_properties(to_int(index, "index", 0)))


def device_synchronize() -> None:
    """Waits for all work on the current device."""
    _C.cuda.synchronize()


# --------------------------------------------------------------------- pointers, streams ----
def device_pointer(obj: Any, name: str = "pointer") -> int:
    """A non-null device address from an int, :class:`DeviceBuffer`, torch tensor, CuPy array
    or pycuda allocation."""
    if obj is None:
        raise ValueError(f"{name} must be a device pointer, got None")
    if isinstance(obj, bool):
        raise TypeError(f"{name} must be a device pointer, got bool")
    if isinstance(obj, numbers.Integral):
        value = int(obj)
    elif isinstance(obj, DeviceBuffer):
        value = obj.ptr
    elif hasattr(obj, "__cuda_array_interface__"):
        value = int(obj.__cuda_array_interface__["data"][0])
    elif hasattr(obj, "data_ptr"):
        value = int(obj.data_ptr())
    elif hasattr(obj, "ptr"):
        value = int(obj.ptr)
    else:
        try:
            value = int(obj)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a device pointer (int or buffer), got {type(obj).__name__}") from exc
    if value <= 0:
        raise ValueError(f"{name} must be a non-null device pointer")
    return value


def optional_pointer(obj: Any, name: str = "pointer") -> int:
    """:func:`device_pointer`, or 0 for None (an output the kernel skips)."""
    return 0 if obj is None else device_pointer(obj, name)


def stream_handle(stream: Any) -> int:
    """A ``cudaStream_t`` as an int, from None (the legacy default stream, 0), an int, a
    :class:`Stream`, or a torch / CuPy stream."""
    if stream is None:
        return 0
    if isinstance(stream, bool):
        raise TypeError("stream must be a stream or an int handle, got bool")
    if isinstance(stream, numbers.Integral):
        return int(stream)
    for attr in ("handle", "cuda_stream", "ptr"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    try:
        return int(stream)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"stream must be a stream or an int handle, got {type(stream).__name__}") from exc


def stream_synchronize(stream: Any) -> None:
    """Waits for the work enqueued on ``stream``."""
    _C.cuda.stream_synchronize(stream_handle(stream))


class Stream:
    """Owning non-blocking CUDA stream; ``handle`` is the cudaStream_t as an int."""

    def __init__(self) -> None:
        self._stream = _C.cuda.Stream()

    @property
    def handle(self) -> int:
        return self._stream.handle

    def __int__(self) -> int:
        return self._stream.handle

    def synchronize(self) -> None:
        self._stream.synchronize()


# ---------------------------------------------------------------------------- memory ----
def _host(array: Any) -> np.ndarray:
    array = ndarray(array, "array")
    if not array.flags.c_contiguous:
        raise ValueError("array must be C-contiguous (use numpy.ascontiguousarray)")
    return array


class DeviceBuffer:
    """Owning device allocation; ``ptr`` is its address as an int.

    Args:
        nbytes: size in bytes, or a numpy array to allocate for and copy in (the copy has
            landed when the constructor returns, so any stream may read the buffer).
    """

    def __init__(self, nbytes: Union[int, np.ndarray]) -> None:
        if isinstance(nbytes, np.ndarray):
            arr = np.ascontiguousarray(nbytes)
            self._buf = _C.cuda.DeviceBuffer(max(arr.nbytes, 1))
            self.copy_from_host(arr)
            stream_synchronize(None)
        else:
            self._buf = _C.cuda.DeviceBuffer(to_int(nbytes, "nbytes", 0))

    @property
    def ptr(self) -> int:
        return self._buf.ptr

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes

    def __int__(self) -> int:
        return self._buf.ptr

    def copy_from_host(self, array: np.ndarray, stream: Any = None, offset: int = 0) -> None:
        """Copies a C-contiguous array in (asynchronous on ``stream``). An ordinary (pageable)
        array is staged before the call returns and may be reused at once; a page-locked one
        (:func:`pinned_empty`) is read when the stream reaches the copy: leave it unchanged until
        then (synchronize the stream, or wait for an event recorded after the copy)."""
        self._buf.copy_from_host(array, stream_handle(stream), to_int(offset, "offset", 0))

    def copy_to_host(self, array: np.ndarray, stream: Any = None, offset: int = 0) -> None:
        """Fills a C-contiguous writeable array from the buffer; synchronizes ``stream``."""
        self._buf.copy_to_host(array, stream_handle(stream), to_int(offset, "offset", 0))

    def zero(self, stream: Any = None) -> None:
        self._buf.zero(stream_handle(stream))


def to_device(array: np.ndarray, stream: Any = None) -> DeviceBuffer:
    """Allocates a buffer and enqueues the copy of ``array`` (C-contiguous) into it on ``stream``
    (``None``: the default stream). Use the buffer on that stream, or synchronize it first: a
    non-blocking stream (:class:`Stream`) is not ordered after the default stream. A page-locked
    ``array`` (:func:`pinned_empty`) must stay unchanged until the copy has run
    (:meth:`DeviceBuffer.copy_from_host`)."""
    array = _host(array)
    buf = DeviceBuffer(max(array.nbytes, 1))
    buf.copy_from_host(array, stream)
    return buf


def from_device(buf: DeviceBuffer, shape: Sequence[int], dtype: Any, stream: Any = None) -> np.ndarray:
    """Copies a buffer's leading bytes into a new array (synchronizes ``stream``)."""
    out = np.empty(tuple(shape), dtype=dtype)
    if out.nbytes > buf.nbytes:
        raise ValueError(f"buffer holds {buf.nbytes} bytes, {out.nbytes} requested")
    buf.copy_to_host(out, stream)
    return out


def pinned_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """A numpy array in page-locked host memory (device -> host copies into it need no
    staging); it keeps its allocation alive."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape)) if len(shape) else 1
    raw = _C.cuda.PinnedBuffer(max(count * dtype.itemsize, 1)).array()
    return raw[:count * dtype.itemsize].view(dtype).reshape(tuple(shape))


# -------------------------------------------------------------------- graphs, events ----
class CudaGraph:
    """A CUDA graph captured from the work enqueued on a stream, replayed with one launch
    (``cudaStreamBeginCapture`` / ``EndCapture`` / ``GraphInstantiate`` / ``GraphLaunch``).

    Every address the captured work used is baked into the graph: the buffers must stay
    allocated, at the same addresses, for as long as the graph is replayed.
    """

    def __init__(self) -> None:
        self._g = _C.cuda.Graph()

    def begin_capture(self, stream: Any) -> None:
        self._g.begin_capture(stream_handle(stream))

    def end_capture(self) -> None:
        self._g.end_capture()

    def abort_capture(self) -> None:
        self._g.abort_capture()

    def launch(self, stream: Any) -> None:
        self._g.launch(stream_handle(stream))

    @property
    def nodes(self) -> int:
        return int(self._g.nodes)

    @property
    def handle(self) -> int:
        """The captured ``cudaGraph_t`` as an int (0 before :meth:`end_capture`)."""
        return int(self._g.handle)

    @property
    def node_kinds(self) -> Dict[str, int]:
        """How many top-level nodes of each kind the captured graph holds (``kernel``,
        ``memcpy``, ``memset``, ``mem_alloc``, ``mem_free``, ``graph``, ...). A graph with
        ``mem_alloc`` / ``mem_free`` nodes cannot be nested in another graph."""
        return dict(Counter(self._g.node_kinds))


class CudaEvent:
    """A timing CUDA event: :meth:`record` on a stream, :meth:`elapsed_ms` between two."""

    def __init__(self) -> None:
        self._e = _C.cuda.Event()

    def record(self, stream: Any) -> None:
        self._e.record(stream_handle(stream))

    def wait(self, stream: Any) -> None:
        """Makes the work enqueued on ``stream`` from now on wait for this event (no host wait)."""
        self._e.wait(stream_handle(stream))

    def synchronize(self) -> None:
        """Waits on the host until the event has completed."""
        self._e.synchronize()

    def elapsed_ms(self, start: "CudaEvent") -> float:
        """Milliseconds from ``start`` to this event (waits for this one to complete)."""
        return float(self._e.elapsed_since(start._e))
