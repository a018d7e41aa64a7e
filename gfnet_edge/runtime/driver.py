"""The glance/focus loop with early exit, written once for every backend and place.

A backend only runs a backbone graph (:class:`~gfnet_edge.runtime.backends.base.Runner`); the
extension does the pre-processing, the glance resize, the patch crop and the GRU/Linear heads
(:class:`~gfnet_edge.runtime.heads.HeadSet`). :class:`Driver` runs the loop::

    glance backbone -> begin (heads, exit test, policy, crop) -> focus backbone -> next -> ...

and the only thing it chooses is where the buffers live (its *place*):

* host (:mod:`~gfnet_edge.runtime.host_place`): numpy arrays; between two backbone runs one
  extension call (``_C.HostLoop``) does the heads, the exit test, the compaction, the policy
  and the next crop. Any runner (ONNX Runtime, torch, TensorRT through host copies).
* device (:mod:`~gfnet_edge.runtime.device_place`): GPU memory; the same steps are kernels
  enqueued on one CUDA stream with one small device -> host read per step. Runners with
  device execution (TensorRT, torch on CUDA) and heads built with ``device="cuda"``.

Samples that exit are compacted away between steps (states, features and images), so no
backbone work is spent on them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..model_desc import ModelDesc, as_desc
from .backends.base import Runner
from .heads import HeadSet
from .profile import Profiler
from .types import Chunk, LoopContext, Place, StepOutputs, Steps, softmax  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # pragma: no cover
    from .deadline import Deadline


class Driver:
    """Runs GFNet steps with early exit for one model, runner and set of heads.

    The place follows the heads: heads built with ``device="cuda"`` put every buffer in GPU
    memory (the runner must have device execution), CPU heads keep them in numpy arrays.

    Args:
        model: the model description (a manifest ``model`` dict is parsed into one).
        runner: an active backend runner.
        heads: the bound heads.
        profiler: per-stage timer (read at every call, so it may be swapped).
        stream: device place only: the CUDA stream for everything (default: a new
            :class:`gfnet_edge.ops.Stream`).
        cuda_graphs: device place only: capture each step as a CUDA graph and replay it
            (:mod:`~gfnet_edge.runtime.graphs`) when the runner can be captured; False runs
            every kernel as a plain launch.
        conditional: device place only: whether batch-1 runs use the loop graph on conditional
            nodes (:class:`~gfnet_edge.runtime.graph_loop.ConditionalMode`; ``None``: from the
            environment variable ``GFNET_EDGE_CONDITIONAL_GRAPHS``).

    Raises:
        UnavailableError: device heads, but no CUDA build or no usable GPU.
        ValueError: device heads with a runner that has no device execution.
    """

    def __init__(self, model: "ModelDesc | Dict[str, Any]", runner: Runner, heads: HeadSet, profiler: Profiler,
                 stream: Any = None, cuda_graphs: bool = True, conditional: Any = None) -> None:
        self.ctx = LoopContext(model, runner, heads, profiler)
        self.runner, self.heads = runner, heads
        self.T, self.S, self.P, self.step0_backbone = self.ctx.T, self.ctx.S, self.ctx.P, self.ctx.step0_backbone
        if getattr(heads, "device", "cpu") == "cuda":
            from .device_place import DevicePlace

            self.place: Place = DevicePlace(self.ctx, stream, cuda_graphs=cuda_graphs, conditional=conditional)
        else:
            from .host_place import HostPlace

            self.place = HostPlace(self.ctx)

    @property
    def model(self) -> ModelDesc:
        """The model description the places read (assignable)."""
        return self.ctx.model

    @model.setter
    def model(self, model: "ModelDesc | Dict[str, Any]") -> None:
        self.ctx.model = as_desc(model)

    @property
    def prof(self) -> Profiler:
        """The profiler (assignable: the places read it at every stage)."""
        return self.ctx.prof

    @prof.setter
    def prof(self, profiler: Profiler) -> None:
        self.ctx.prof = profiler

    @property
    def on_device(self) -> bool:
        """True when the buffers live in GPU memory."""
        return self.place.on_device

    def close(self) -> None:
        """Frees the place's buffers (GPU memory, graphs) once its work has finished; the
        runner stays as it is (its owner deactivates it)."""
        self.place.close()

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
                   thresholds: Optional[Sequence[float]], deadline: Optional["Deadline"] = None,
                   cropped: bool = False) -> StepOutputs:
        """Runs the loop on uint8 HWC RGB frames of any size, pre-processed by the extension
        as the model was trained (resize, centre crop, normalisation: the manifest's
        ``crop_pct``, ``dataset_interpolation``, ``mean`` and ``std``; stage ``preprocess``).

        Args:
            frames: an (N, H, W, 3) uint8 array or a list of (H, W, 3) uint8 frames.
            thresholds, deadline: as in :meth:`run`.
            cropped: the frames are already resized and centre-cropped to S x S: only
                normalised (the pre-processing with ``crop_pct`` 1). Their size is the
                caller's to check (:meth:`Runtime.predict` does, naming the frame).
        """
        return self._loop(lambda: self.place.frames(frames, cropped), thresholds, deadline)

    def run_device_frames(self, frames: Any, thresholds: Optional[Sequence[float]],
                          deadline: Optional["Deadline"] = None, cropped: bool = False) -> StepOutputs:
        """Device place only: runs the loop on uint8 HWC RGB frames already in GPU memory,
        pre-processed where they are (no copy).

        Args:
            frames: a device array (any object with ``__cuda_array_interface__``, e.g. CuPy
                arrays or torch CUDA tensors) of shape (H, W, 3) or (N, H, W, 3), or a list of
                (H, W, 3) ones; C-contiguous uint8.
            thresholds: as in :meth:`run`.
            cropped: as in :meth:`run_frames`.
        """
        from .cuda_arrays import device_frames

        if not self.on_device:
            raise InputError(f"frames in GPU memory need a runtime whose loop runs on the GPU (TensorRT, or torch "
                             f"with device='cuda'); this one runs on the host with {self.runner.name}: copy the "
                             "frames to host memory, or use a GPU backend")
        return self._loop(lambda: self.place.device_frames(device_frames(frames), cropped), thresholds, deadline)

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
