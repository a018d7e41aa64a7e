"""PyTorch backend: runs the bundle's checkpoint with the reference modules (build side; for
debugging and parity). Needs torch and a bundle built with ``--include-checkpoint``.

With ``device="cuda"`` the graphs run on the GPU in float32 (TF32 off while they run), and
the runner also offers device-resident execution (:meth:`TorchRunner.run_device`): the input
is a raw device pointer wrapped as a tensor through ``__cuda_array_interface__``, the graph
runs on a :class:`torch.cuda.ExternalStream` made from the caller's stream handle, and the
outputs stay in torch-allocated device memory that the runner keeps alive until its next call
for the same graph.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Tuple

import numpy as np

from ...errors import InputError, UnavailableError
from ..graphs import no_collection
from .base import GRAPHS, Runner

if TYPE_CHECKING:  # pragma: no cover
    from . import RunnerRequest

DEVICES = ("cpu", "cuda")


class _CudaArray:
    """A borrowed float32 C-contiguous device array, exposed through ``__cuda_array_interface__``
    (version 2: no stream field, the consumer runs on the producer's stream)."""

    def __init__(self, ptr: int, shape: Tuple[int, ...]) -> None:
        self.__cuda_array_interface__ = {
            "shape": tuple(int(d) for d in shape), "typestr": "<f4", "data": (int(ptr), False),
            "strides": None, "version": 2,
        }


@contextlib.contextmanager
def _ieee_fp32(torch) -> Iterator[None]:
    """Full float32 convolutions / matmuls (no TF32) for the duration, restoring the settings.

    Uses the ``fp32_precision`` API where torch has it (mixing it with the legacy
    ``allow_tf32`` flags makes torch raise), the legacy flags otherwise.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        saved = (conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = False, False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


def load_runner(request: "RunnerRequest") -> "TorchRunner":
    """The runner of the bundle's checkpoint on ``request.device`` (default CPU): ``fp16`` runs
    the backbones in half precision (CUDA), ``auto`` / ``fp32`` in float32."""
    if request.precision not in ("auto", "fp32", "fp16"):
        raise InputError(f"the torch backend runs the checkpoint in fp32 or fp16 (CUDA), not {request.precision!r}")
    return TorchRunner(request.bundle, request.threads, device=request.device or "cpu",
                       dtype="float16" if request.precision == "fp16" else "float32")


class TorchRunner(Runner):
    """Runs the bundle's checkpoint (glance / focus backbone graphs) in PyTorch.

    Args:
        bundle: the loaded bundle (with its checkpoint).
        threads: torch CPU threads (``None``: torch's default).
        device: ``"cpu"`` or ``"cuda"`` (the graphs on the current CUDA device; enables
            :meth:`run_device`).
        dtype: ``"float32"`` (no TF32) or ``"float16"`` (CUDA only: the backbones' weights and
            activations in half precision; inputs and outputs stay float32).
    """

    name = "torch"

    def __init__(self, bundle, threads: Optional[int] = None, device: str = "cpu", dtype: str = "float32") -> None:
        if device not in DEVICES:
            raise InputError(f"torch device must be one of {', '.join(DEVICES)}, got {device!r}")
        if dtype not in ("float32", "float16"):
            raise InputError(f"torch dtype must be float32 or float16, got {dtype!r}")
        if dtype == "float16" and device != "cuda":
            raise InputError("the torch backend runs float16 on CUDA only (device='cuda')")
        super().__init__("fp16-torch" if dtype == "float16" else "fp32-torch")
        self.dtype = dtype
        ck = bundle.manifest.get("checkpoint")
        if not ck:
            raise InputError(
                f"{bundle.root}: the torch backend needs the checkpoint inside the bundle; "
                "rebuild with `gfnet-edge build-engine CKPT -o BUNDLE --include-checkpoint`"
            )
        self.path = bundle.path(ck)
        self.patch_size = bundle.model.patch_size
        self.threads = threads
        self.device = device
        self.supports_device = device == "cuda"
        self.graphs = {}
        self._kept: Dict[str, tuple] = {}  # graph -> (input view, outputs) of the last run_device
        self._streams: Dict[int, Any] = {}

    def _activate(self) -> None:
        try:
            import torch
        except ImportError as exc:
            raise UnavailableError("the torch backend needs PyTorch: pip install 'gfnet-edge[build]'") from exc
        from ...export import BackboneGraph
        from ...models.checkpoint import load_checkpoint

        if self.device == "cuda" and not torch.cuda.is_available():
            raise UnavailableError("the torch backend was asked for device='cuda' but this torch has no usable "
                                   "CUDA device (torch.cuda.is_available() is False)")
        if self.threads:
            torch.set_num_threads(int(self.threads))
        from ...models.checkpoint import CheckpointError

        try:
            model = load_checkpoint(self.path)
        except CheckpointError as exc:
            raise InputError(f"the bundle's checkpoint cannot be used: {exc}") from exc
        self.graphs = {g: BackboneGraph(model, g).eval().to(self.device) for g in GRAPHS}
        if self.dtype == "float16":
            self.graphs = {g: m.half() for g, m in self.graphs.items()}

    def activate(self) -> "TorchRunner":
        was_active = self.active
        super().activate()
        if self.device == "cuda" and not was_active:
            import torch

            # The weights were just moved (and cast) on torch's default stream; the loop's
            # streams are non-blocking and would not wait for that.
            torch.cuda.synchronize()
        return self

    def _deactivate(self) -> None:
        if self.device == "cuda" and (self._kept or self._streams):
            import torch

            for s in self._streams.values():
                s.synchronize()
            torch.cuda.synchronize()
        self._kept.clear()
        self._streams.clear()
        self.graphs = {}

    def _math(self):
        import torch

        return _ieee_fp32(torch) if self.device == "cuda" else contextlib.nullcontext()

    def _run(self, graph: str, image: np.ndarray) -> Dict[str, np.ndarray]:
        import torch

        g = self.graphs[graph]
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(self.device)
        if self.dtype == "float16":
            x = x.half()
        with torch.no_grad(), self._math():
            outs = g(x)
        return {n: o.float().cpu().numpy() for n, o in zip(g.output_names, outs)}

    def _stream(self, handle: int):
        import torch

        s = self._streams.get(handle)
        if s is None:
            s = torch.cuda.default_stream() if handle == 0 else torch.cuda.ExternalStream(handle)
            self._streams[handle] = s
        return s

    def _run_device(self, graph: str, image: int, batch: int, stream: int) -> Dict[str, Tuple[int, Tuple[int, ...]]]:
        import torch

        g = self.graphs[graph]
        P = self.patch_size
        ts = self._stream(stream)
        with torch.no_grad(), torch.cuda.stream(ts), self._math():
            x = torch.as_tensor(_CudaArray(image, (batch, 3, P, P)), device="cuda")
            outs = [o.float().contiguous() for o in g(x.half() if self.dtype == "float16" else x)]
        # Keep the outputs (and the borrowed input view) alive until the next call for this
        # graph; torch's allocator reuses their memory in stream order on the same stream.
        self._kept[graph] = (x, outs)
        return {n: (int(o.data_ptr()), tuple(o.shape)) for n, o in zip(g.output_names, outs)}

    def graph_capture(self, stream: Any) -> Optional["TorchCapture"]:
        """``torch.cuda.CUDAGraph`` capture on ``stream`` (CUDA device only): torch's
        allocator must take part in a capture that contains torch modules."""
        if self.device != "cuda":
            return None
        from ... import ops

        return TorchCapture(self, ops.stream_handle(stream))


class TorchCapture:
    """Captures work on a stream with ``torch.cuda.CUDAGraph`` (the torch modules' kernels and
    the extension's, launched on the same stream). All graphs of a runner share one memory
    pool: they are replayed one at a time on one stream, and what a step graph leaves for the
    next one is copied into the device place's own buffers before the graph ends.

    Args:
        runner: the torch runner (its :meth:`TorchRunner.run_device` outputs captured in a
            graph are kept alive with the graph), or ``None`` for work that keeps its own
            buffers (``stream`` is then a ``torch.cuda.Stream``).
        stream: the stream handle the work is enqueued on (with a runner).
        keep_graph: keep each capture's ``cudaGraph_t`` (``CUDAGraph(keep_graph=True)``) and
            give it as the replay's ``cuda_graph``, so that a larger graph can hold it as a
            child graph node; a torch without ``keep_graph`` captures as without it.
    """

    name = "torch.cuda.CUDAGraph"

    def __init__(self, runner: "TorchRunner", stream: int, keep_graph: bool = False) -> None:
        if stream == 0:
            raise ValueError("CUDA graph capture needs a created stream, not the legacy default stream")
        self.runner, self.stream, self.keep_graph = runner, stream, keep_graph and _torch_keeps_graphs()
        self.pool = None

    def capture(self, fn):
        import torch

        ts = self.runner._stream(self.stream) if self.runner is not None else self.stream
        graph = torch.cuda.CUDAGraph(keep_graph=True) if self.keep_graph else torch.cuda.CUDAGraph()
        with torch.cuda.stream(ts), no_collection():
            # thread-local: an unsafe CUDA call from another thread (a second runtime, a data
            # loader's pinning thread) must not invalidate this capture
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                fn()
            except BaseException:
                # End the capture without letting its own error ("a previous error during
                # capture") replace the cause, which is what the fallback logs.
                try:
                    graph.capture_end()
                except Exception:  # noqa: BLE001
                    pass
                raise
            graph.capture_end()
        if self.pool is None:
            self.pool = graph.pool()
        kept = dict(self.runner._kept) if self.runner is not None else {}  # captured outputs, kept with the graph

        def replay() -> None:
            with torch.cuda.stream(ts):
                graph.replay()

        replay.graph, replay.kept = graph, kept  # type: ignore[attr-defined]
        if self.keep_graph:
            graph.instantiate()
            replay.cuda_graph = int(graph.raw_cuda_graph())  # type: ignore[attr-defined]
        return replay

    def release(self) -> None:
        """Every graph captured so far was dropped: the next capture starts a new memory pool
        (torch refuses to capture into a pool whose graphs are all gone)."""
        self.pool = None


def _torch_keeps_graphs() -> bool:
    """Whether this torch's ``CUDAGraph`` takes ``keep_graph`` (a torch without it captures as
    usual; its replays then carry no graph)."""
    import inspect

    import torch

    try:
        return "keep_graph" in inspect.signature(torch.cuda.CUDAGraph).parameters
    except (TypeError, ValueError):  # a signature torch does not expose
        return False
