"""CUDA-graph bookkeeping of the device loop: batch buckets, capturers, and the cache of
captured step graphs.

A step of the loop on the GPU is a few dozen small kernels around a backbone run; launched one
by one from Python, their launch cost exceeds their work at small batches. The captured loop
(:mod:`~gfnet_edge.runtime.graph_steps`) records each step once as a CUDA graph and replays it
with a single launch. A graph bakes in its shapes and addresses, so:

* batches are padded to a *bucket* (:func:`buckets`: powers of two up to the largest batch);
  one graph is captured per step kind, bucket and step;
* every buffer a graph touches lives at a fixed address for the life of the graph (the
  workspace of :mod:`~gfnet_edge.runtime.graph_steps`); reallocating it drops the graphs.

How the work is captured depends on the runner (:meth:`Runner.graph_capture
<gfnet_edge.runtime.backends.base.Runner.graph_capture>`): the extension's stream capture
(:class:`NativeCapture`, for runners whose kernels are plain launches on the stream, such as
TensorRT's ``enqueueV3``) or ``torch.cuda.CUDAGraph`` (torch modules need torch's allocator
to know about the capture).
"""
from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any, Callable, Dict, Hashable, Iterator, Optional, Protocol, Tuple

logger = logging.getLogger("gfnet_edge")

#: A captured graph: calling it enqueues one replay on the stream it was captured from.
Replay = Callable[[], None]


def buckets(max_batch: int) -> Tuple[int, ...]:
    """The padded batch sizes graphs are captured for: powers of two below ``max_batch``,
    then ``max_batch`` itself (``buckets(12) == (1, 2, 4, 8, 12)``)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(int(max_batch))
    return tuple(out)


def bucket_for(n: int, max_batch: Optional[int]) -> int:
    """The bucket a batch of ``n`` runs in: the smallest of :func:`buckets` holding ``n``
    (with no max batch, the next power of two)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_batch is not None and n > max_batch:
        raise ValueError(f"batch {n} exceeds the max batch {max_batch}")
    b = 1
    while b < n:
        b *= 2
    return b if max_batch is None else min(b, int(max_batch))


class Capture(Protocol):
    """Captures the work a callable enqueues on one stream as a replayable graph."""

    name: str

    def capture(self, fn: Callable[[], Any]) -> Replay:
        """Runs ``fn`` while capturing (nothing executes) and returns the replay. Raises when
        the work cannot be captured; the stream is then no longer capturing."""


@contextlib.contextmanager
def no_collection() -> Iterator[None]:
    """No cyclic garbage collection inside: entered before a stream capture opens and left
    after it closes. Objects in reference cycles are freed by the collector whenever it runs,
    and a cudaFree while a capture is open invalidates it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class NativeCapture:
    """Stream capture through the extension (:class:`gfnet_edge.ops.CudaGraph`, thread-local
    capture mode). For runners that only enqueue kernels and copies on the given stream."""

    name = "cuda-graph"

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def capture(self, fn: Callable[[], Any]) -> Replay:
        from .. import ops

        graph = ops.CudaGraph()
        with no_collection():
            graph.begin_capture(self.stream)
            try:
                fn()
            except BaseException:
                graph.abort_capture()
                raise
            graph.end_capture()
        stream = self.stream

        def replay() -> None:
            graph.launch(stream)

        replay.graph = graph  # type: ignore[attr-defined]  # keeps the graph alive with the replay
        # The cudaGraph_t, for adding the step as a child graph node (graph_loop); None for a
        # graph object that exposes none.
        replay.cuda_graph = getattr(graph, "handle", None)  # type: ignore[attr-defined]
        return replay


class GraphCache:
    """The captured graphs of one workspace, by key.

    :meth:`run` runs a step: the first time a key is seen the step runs as plain launches (the
    runner sees each shape once before it is captured, as cuDNN, cuBLAS and TensorRT need) and
    is then captured; later runs of the key replay the graph. When a capture fails, capture is
    switched off for this cache with the reason logged once, and every step runs as plain
    launches from then on (same results, more launch overhead).

    Args:
        capture: the runner's capturer, or None to run every step as plain launches.
    """

    def __init__(self, capture: Optional[Capture]) -> None:
        self.capture = capture
        self.graphs: Dict[Hashable, Replay] = {}
        self.disabled: Optional[str] = None if capture is not None else "the runner offers no graph capture"
        self.captures = 0
        self.replays = 0
        self.eager = 0

    @property
    def active(self) -> bool:
        """True while steps are captured and replayed."""
        return self.disabled is None

    def run(self, key: Hashable, step: Callable[[], Any]) -> None:
        """Runs ``step`` (enqueues its work on the stream): replayed when captured, else run
        and then captured."""
        graph = self.graphs.get(key)
        if graph is not None:
            graph()
            self.replays += 1
            return
        step()
        self.eager += 1
        if self.disabled is not None:
            return
        try:
            self.graphs[key] = self.capture.capture(step)  # type: ignore[union-attr]
            self.captures += 1
        except Exception as exc:  # noqa: BLE001 -- any capture failure falls back to plain launches
            self.disabled = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self.graphs.clear()
            logger.warning("CUDA graph capture failed (%s); the device loop runs its steps as plain kernel "
                           "launches from now on", self.disabled)

    def clear(self) -> None:
        """Drops every graph (the buffers they address are about to be reallocated)."""
        self.graphs.clear()
        release = getattr(self.capture, "release", None)
        if release is not None:
            release()
