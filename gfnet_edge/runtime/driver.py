"""The glance/focus loop with early exit, written once for every backend and place.

A backend only runs a backbone graph (:class:`~gfnet_edge.runtime.backends.base.Runner`); the
extension does the pre-processing, the glance resize, the patch crop and the GRU/Linear heads
(:class:`~gfnet_edge.runtime.heads.HeadSet`). :class:`Driver` runs the loop::

    glance backbone -> begin (heads, exit test, policy, crop) -> focus backbone -> next -> ...

and the only thing it chooses is where the buffers live (its *place*):

* host (:mod:`~gfnet_edge.runtime.host_steps`): numpy arrays; between two backbone runs one
  extension call (``_C.HostLoop``) does the heads, the exit test, the compaction, the policy
  and the next crop. Any runner (ONNX Runtime, torch, TensorRT through host copies).
* device (:mod:`~gfnet_edge.runtime.device_steps`): GPU memory; the same steps are kernels
  enqueued on one CUDA stream with one small device -> host read per step. Runners with
  device execution (TensorRT, torch on CUDA) and heads built with ``device="cuda"``.

Samples that exit are compacted away between steps (states, features and images), so no
backbone work is spent on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError
from .backends.base import Runner
from .heads import HeadSet
from .profile import Profiler

if TYPE_CHECKING:  # pragma: no cover
    from .deadline import Deadline


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class StepOutputs:
    """What the loop produced for a batch of N images.

    Attributes:
        prediction: class at the exit step (N,).
        confidence: max softmax probability at the exit step (N,).
        exit_step: step at which each image exited (N,).
        coords: patch top-left (row, col) per focus step (T-1, N, 2); -1 after exit.
        probs: softmax per step (T, N, classes), only when every step ran (trace).
        stopped: images stopped by a deadline (N,) bool, or None when the call had none.
    """

    prediction: np.ndarray
    confidence: np.ndarray
    exit_step: np.ndarray
    coords: np.ndarray
    probs: Optional[np.ndarray] = None
    stopped: Optional[np.ndarray] = None

    @staticmethod
    def concat(parts: List["StepOutputs"]) -> "StepOutputs":
        """The outputs of consecutive chunks of one batch, as one."""
        if len(parts) == 1:
            return parts[0]
        return StepOutputs(
            np.concatenate([o.prediction for o in parts]), np.concatenate([o.confidence for o in parts]),
            np.concatenate([o.exit_step for o in parts]), np.concatenate([o.coords for o in parts], axis=1),
            None if parts[0].probs is None else np.concatenate([o.probs for o in parts], axis=1),
            None if parts[0].stopped is None else np.concatenate([o.stopped for o in parts]))


#: A chunk of a batch as a place holds it: ``(images, glance, n)`` (arrays or device pointers).
Chunk = Tuple[Any, Any, int]


class Steps(Protocol):
    """One run of the loop over a chunk, as a place does it (``HostSteps``, ``DeviceSteps``).
    Backbone inputs and outputs are in the place's form (arrays, or device pointers)."""

    def backbone(self, graph: str, x: Any) -> Dict[str, Any]:
        """Runs ``"glance"`` or ``"focus"`` on the images still running."""

    def begin(self, g: Dict[str, Any]) -> Optional[Any]:
        """Step 0 from the glance outputs: heads, exit test, compaction, policy and crop of
        step 1; the patches for the focus backbone, or None when the loop is over."""

    def next(self, f: Dict[str, Any]) -> Optional[Any]:
        """The same for the outputs of a focus run: the next patches, or None."""

    def outputs(self) -> "StepOutputs":
        """The results, in the chunk's image order."""

    def running(self) -> Tuple[int, int]:
        """``(next step, images still running)`` while a focus step is pending."""

    def stop(self) -> None:
        """Ends the run before the pending step: the images still running keep the prediction
        of the last step they ran (their exit step) and are marked as stopped."""


class Place(Protocol):
    """Where the loop's buffers live (``HostPlace``, ``DevicePlace``)."""

    on_device: bool

    def stage(self, name: str) -> ContextManager[None]:
        """Times a stage (on the device place: device time, from CUDA events on the stream)."""

    def inputs(self, images: np.ndarray, glance: Optional[np.ndarray]) -> List[Chunk]:
        """Host images (and glance, or None to compute it) as the place's chunks."""

    def frames(self, frames: Union[np.ndarray, Sequence[np.ndarray]]) -> List[Chunk]:
        """uint8 HWC frames of any size, pre-processed, as the place's chunks."""

    def steps(self, images: Any, n: int, thresholds: Optional[np.ndarray], glance: Any = None) -> Steps:
        """A run of the loop over one chunk (``thresholds`` None: trace; ``glance`` the chunk's
        glance, for a place that stages it before the first backbone run)."""


class Driver:
    """Runs GFNet steps with early exit for one model, runner and set of heads.

    The place follows the heads: heads built with ``device="cuda"`` put every buffer in GPU
    memory (the runner must have device execution), CPU heads keep them in numpy arrays.

    Args:
        model: the manifest's ``model`` entry.
        runner: an active backend runner.
        heads: the bound heads.
        profiler: per-stage timer (read at every call, so it may be swapped).
        stream: device place only: the CUDA stream for everything (default: a new
            :class:`gfnet_edge.ops.Stream`).
        cuda_graphs: device place only: capture each step as a CUDA graph and replay it
            (:mod:`~gfnet_edge.runtime.graphs`) when the runner can be captured; False runs
            every kernel as a plain launch.

    Raises:
        UnavailableError: device heads, but no CUDA build or no usable GPU.
        ValueError: device heads with a runner that has no device execution.
    """

    def __init__(self, model: Dict[str, Any], runner: Runner, heads: HeadSet, profiler: Profiler,
                 stream: Any = None, cuda_graphs: bool = True) -> None:
        self.model = model
        self.runner = runner
        self.heads = heads
        self.prof = profiler
        self.T = int(model["steps"])
        self.S = int(model["image_size"])
        self.P = int(model["patch_size"])
        self.step0_backbone = model["step0"] == "backbone"
        if getattr(heads, "device", "cpu") == "cuda":
            from .device_steps import DevicePlace

            self.place: Place = DevicePlace(self, stream, cuda_graphs=cuda_graphs)
        else:
            from .host_steps import HostPlace

            self.place = HostPlace(self)

    @property
    def on_device(self) -> bool:
        """True when the buffers live in GPU memory."""
        return self.place.on_device

    # -------------------------------------------------------------------- entry
    def run(self, images: np.ndarray, glance: Optional[np.ndarray],
            thresholds: Optional[Sequence[float]], deadline: Optional["Deadline"] = None) -> StepOutputs:
        """Runs the loop on host images.

        Args:
            images: normalised float32 (N, 3, S, S), C-contiguous; on the host place also uint8
                (N, S, S, 3) frames of S x S (patches are then normalised as they are cut,
                with the model's mean and std).
            glance: their glance (N, 3, P, P), normalised, or ``None`` to compute it (stage
                ``preprocess``; on the device place from the uploaded images).
            thresholds: exit threshold per step; ``None`` runs every step for every image and
                returns the full probabilities (trace).
            deadline: stop before a focus step predicted to end after it
                (:class:`~gfnet_edge.runtime.deadline.Deadline`; not with a trace).
        """
        return self._loop(lambda: self.place.inputs(images, glance), thresholds, deadline)

    def run_frames(self, frames: Union[np.ndarray, Sequence[np.ndarray]],
                   thresholds: Optional[Sequence[float]], deadline: Optional["Deadline"] = None) -> StepOutputs:
        """Runs the loop on uint8 HWC RGB frames of any size, pre-processed by the extension
        as the model was trained (resize, centre crop, normalisation: the manifest's
        ``crop_pct``, ``dataset_interpolation``, ``mean`` and ``std``; stage ``preprocess``).

        Args:
            frames: an (N, H, W, 3) uint8 array or a list of (H, W, 3) uint8 frames.
            thresholds, deadline: as in :meth:`run`.
        """
        return self._loop(lambda: self.place.frames(frames), thresholds, deadline)

    def run_device_frames(self, frames: Any, thresholds: Optional[Sequence[float]],
                          deadline: Optional["Deadline"] = None) -> StepOutputs:
        """Device place only: runs the loop on uint8 HWC RGB frames already in GPU memory,
        pre-processed where they are (no copy).

        Args:
            frames: a device array (any object with ``__cuda_array_interface__``, e.g. CuPy
                arrays or torch CUDA tensors) of shape (H, W, 3) or (N, H, W, 3), or a list of
                (H, W, 3) ones; C-contiguous uint8.
            thresholds: as in :meth:`run`.
        """
        from .device_steps import device_frames

        if not self.on_device:
            raise InputError(f"frames in GPU memory need a runtime whose loop runs on the GPU (TensorRT, or torch "
                             f"with device='cuda'); this one runs on the host with {self.runner.name}: copy the "
                             "frames to host memory, or use a GPU backend")
        return self._loop(lambda: self.place.device_frames(device_frames(frames)), thresholds, deadline)

    def run_device(self, images: int, glance: int, n: int, thresholds: Optional[Sequence[float]],
                   deadline: Optional["Deadline"] = None) -> StepOutputs:
        """Device place only: runs the loop on device-resident inputs.

        Args:
            images: device pointer to float32 (n, 3, S, S); read, never written.
            glance: device pointer to float32 (n, 3, P, P).
            n: number of images.
            thresholds: as in :meth:`run`.
        """
        if not self.on_device:
            raise ValueError("run_device needs the device place (heads built with device='cuda')")
        return self._loop(lambda: self.place.device_inputs(images, glance, n), thresholds, deadline)

    # --------------------------------------------------------------------- loop
    def _loop(self, stage: Callable[[], List[Chunk]], thresholds: Optional[Sequence[float]],
              deadline: Optional["Deadline"] = None) -> StepOutputs:
        """The loop itself, over the chunks of the batch that ``stage`` puts in the place (the
        thresholds are checked first, so bad ones cost no upload). With a deadline, before each
        focus step the images still running stop when the step would end after it."""
        if thresholds is not None and len(thresholds) != self.T:
            raise ValueError(f"need {self.T} thresholds, got {len(thresholds)}")
        if deadline is not None and thresholds is None:
            raise InputError("a deadline applies to predictions with early exit, not to a trace")
        if deadline is not None and deadline.costs.steps != self.T:
            raise InputError(f"the step costs have {deadline.costs.steps} steps but the model {self.T}")
        thr = None if thresholds is None else np.asarray(thresholds, dtype=np.float32)
        place = self.place
        outs = []
        for images, glance, n in stage():
            steps = place.steps(images, n, thr, glance=glance)
            with place.stage("glance"):
                g = steps.backbone("glance", glance)
            patches = steps.begin(g)
            while patches is not None:
                if deadline is not None and not deadline.allows(*steps.running()):
                    steps.stop()
                    break
                with place.stage("focus"):
                    f = steps.backbone("focus", patches)
                patches = steps.next(f)
            out = steps.outputs()
            if deadline is not None and out.stopped is None:
                out.stopped = np.zeros(out.prediction.shape[0], bool)
            outs.append(out)
        return StepOutputs.concat(outs)
