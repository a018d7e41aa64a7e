"""What every backend provides: run one backbone graph on a batch.

Backends follow a loader/runner split: a runner owns sessions, engines and buffers, and does
nothing on the device until :meth:`Runner.activate` (or ``with runner:``).

Two ways to run a graph:

* :meth:`Runner.run` -- numpy in, numpy out (every backend).
* :meth:`Runner.run_device` -- device memory in, device memory out, enqueued on a CUDA stream
  the caller gives (runners with ``supports_device``: TensorRT, and torch with CUDA). The
  loop's device place (:mod:`~gfnet_edge.runtime.device_place`) uses it so that nothing
  crosses the PCIe bus / unified-memory boundary except the exit test.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..graphs import Capture

GRAPHS = ("glance", "focus")

#: What :meth:`Runner.run_device` returns per output: (device pointer, shape); float32, C-contiguous.
DeviceOutput = Tuple[int, Tuple[int, ...]]


class Runner:
    """Base class. Subclasses implement :meth:`_activate`, :meth:`_run` and :meth:`_deactivate`.

    Attributes:
        name: backend name (``onnxruntime``, ``tensorrt``, ``torch``).
        precision: what the graphs run in (``fp32``, ``int8-cpu`` ...).
        max_batch: the largest batch one call accepts (``None``: unlimited).
        supports_device: :meth:`run_device` is available (device-resident execution).
    """

    name = "base"
    max_batch = None
    supports_device = False

    def __init__(self, precision: str) -> None:
        self.precision = precision
        self.active = False

    def activate(self) -> "Runner":
        if not self.active:
            self._activate()
            self.active = True
        return self

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def run(self, graph: str, image: np.ndarray) -> Dict[str, np.ndarray]:
        """Runs ``graph`` ("glance" or "focus") on ``image`` (N, 3, P, P) float32.

        Returns:
            ``{"feature": (N, F), "policy_state": (N, H)[, "logits": (N, classes)]}`` as float32.
        """
        if not self.active:
            raise RuntimeError(f"{self.name} runner is not active; call activate() first")
        if graph not in GRAPHS:
            raise ValueError(f"unknown graph {graph!r}")
        if self.max_batch is not None and image.shape[0] > self.max_batch:
            outs = [self._run(graph, image[i:i + self.max_batch]) for i in range(0, image.shape[0], self.max_batch)]
            return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        return self._run(graph, image)

    def run_device(self, graph: str, image: int, batch: int, stream: Any) -> Dict[str, DeviceOutput]:
        """Enqueues ``graph`` on a device-resident batch; no host copies, no synchronization.

        Args:
            graph: ``"glance"`` or ``"focus"``.
            image: device pointer (int) to (batch, 3, P, P) float32, C-contiguous; it must stay
                valid until the work enqueued on ``stream`` has run.
            batch: number of images, 1 <= batch <= :attr:`max_batch`.
            stream: CUDA stream: an int handle (0 = legacy default stream), a
                :class:`gfnet_edge.ops.Stream`, a torch / CuPy stream or None; the graph runs on
                it, ordered after the work already enqueued there.

        Returns:
            ``{"feature": (ptr, (batch, F)), "policy_state": (ptr, (batch, H))[, "logits": ...]}``:
            float32 C-contiguous device memory owned by the runner, valid (and unchanged) until
            the next call of this runner for the same ``graph``; read it only through work
            enqueued on ``stream`` (or after synchronizing it).

        Raises:
            NotImplementedError: the runner has no device execution (``supports_device`` is False).
        """
        if not self.active:
            raise RuntimeError(f"{self.name} runner is not active; call activate() first")
        if not self.supports_device:
            raise NotImplementedError(f"the {self.name} runner has no device execution (supports_device is False)")
        if graph not in GRAPHS:
            raise ValueError(f"unknown graph {graph!r}")
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if self.max_batch is not None and batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds the {self.name} runner's max batch {self.max_batch}")
        if isinstance(image, bool) or not isinstance(image, (int, np.integer)) or image <= 0:
            raise ValueError(f"image must be a non-null device pointer (int), got {image!r}")
        from ... import ops

        return self._run_device(graph, int(image), int(batch), ops.stream_handle(stream))

    #: Why :meth:`graph_capture` returns None for this runner (reports name it), or None.
    capture_refusal: Optional[str] = "the runner offers no graph capture"

    def graph_capture(self, stream: Any) -> Optional["Capture"]:
        """How the work this runner enqueues on ``stream`` is captured as a CUDA graph
        (:mod:`~gfnet_edge.runtime.graphs`), or None when it cannot be (the device loop then
        launches every kernel itself; :attr:`capture_refusal` says why). A captured
        :meth:`run_device` must leave its outputs at the same addresses on every replay:
        runners keep them alive for the life of the graph.
        """
        return None

    # to implement
    def _activate(self) -> None:
        raise NotImplementedError

    def _deactivate(self) -> None:
        pass

    def _run(self, graph: str, image: np.ndarray) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def _run_device(self, graph: str, image: int, batch: int, stream: int) -> Dict[str, DeviceOutput]:
        raise NotImplementedError(f"the {self.name} runner has no device execution")
