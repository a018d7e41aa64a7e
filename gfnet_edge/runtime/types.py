"""The loop's shared types: what a place provides to the driver and what a run produces.

:class:`~gfnet_edge.runtime.driver.Driver` runs the loop over a :class:`Place`; the places
(:mod:`~gfnet_edge.runtime.host_place`, :mod:`~gfnet_edge.runtime.device_place`) import these
types from here, never the driver, so the runtime's modules form no import cycle.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ContextManager, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

from ..model_desc import ModelDesc, as_desc

if TYPE_CHECKING:  # pragma: no cover
    from .backends.base import Runner
    from .profile import Profiler


@dataclass
class LoopContext:
    """What a place needs of the loop: the model description, the runner, the heads and the
    profiler (read at every stage, so the driver may swap it), and the loop's sizes.

    Attributes:
        model: the :class:`~gfnet_edge.model_desc.ModelDesc` (a manifest ``model`` dict is parsed
            into one).
        T, S, P: steps, image size, patch size (from ``model``).
        step0_backbone: step 0's logits come from the glance graph (``model.step0_backbone``).
    """

    model: ModelDesc
    runner: "Runner"
    heads: Any
    prof: "Profiler"
    T: int = field(init=False)
    S: int = field(init=False)
    P: int = field(init=False)
    step0_backbone: bool = field(init=False)

    def __post_init__(self) -> None:
        self.model = as_desc(self.model)
        self.T = self.model.steps
        self.S = self.model.image_size
        self.P = self.model.patch_size
        self.step0_backbone = self.model.step0_backbone


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

    def frames(self, frames: Union[np.ndarray, Sequence[np.ndarray]], cropped: bool = False) -> List[Chunk]:
        """uint8 HWC frames of any size, pre-processed, as the place's chunks (``cropped``:
        S x S frames already resized and centre-cropped, only normalised)."""

    def steps(self, images: Any, n: int, thresholds: Optional[np.ndarray], glance: Any = None) -> Steps:
        """A run of the loop over one chunk (``thresholds`` None: trace; ``glance`` the chunk's
        glance, for a place that stages it before the first backbone run)."""

    def device_inputs(self, images: int, glance: int, n: int) -> List[Chunk]:
        """Device place: inputs already in GPU memory (pointers) as chunks; the host place
        raises ValueError."""

    def device_frames(self, frames: Sequence[Any], cropped: bool = False) -> List[Chunk]:
        """Device place: uint8 frames in GPU memory (:class:`~gfnet_edge.runtime.cuda_arrays.
        DeviceFrame`) pre-processed where they are (``cropped`` as in :meth:`frames`); the
        host place raises ValueError."""

    def close(self) -> None:
        """Frees what the place holds (device place: GPU buffers, graphs, page-locked memory,
        events), once the work enqueued on its streams has finished."""


def frame_crop_pct(ctx: LoopContext, cropped: bool) -> float:
    """The ``crop_pct`` a place pre-processes frames with: the model's, or 1 (normalisation
    only) for frames given as already cropped, which the caller has checked to be S x S
    (:meth:`Runtime.predict` does, for the whole call, before any chunk runs:
    :func:`check_cropped`)."""
    return 1.0 if cropped else ctx.model.crop_pct


def check_cropped(sizes: Iterable[Tuple[int, int]], S: int, what: str = "frame", start: int = 0) -> None:
    """Raises InputError naming the first (height, width) that is not S x S: frames given as
    already cropped must be the model's input. ``what`` and ``start`` name it (``frame 7``, or
    ``item 7`` of a stream)."""
    from ..errors import InputError

    for i, (h, w) in enumerate(sizes):
        if (int(h), int(w)) != (S, S):
            raise InputError(f"{what} {start + i} is {h} x {w}: frames given as cropped must be the model's input "
                             f"size, {S} x {S} (leave cropped off to have them resized and centre-cropped)")


def check_step_flag(flag: int, step: int) -> None:
    """Raises when a device step's error flag is set (a bad patch coordinate or row index)."""
    if flag:
        raise RuntimeError(f"device loop, step {step}: a patch coordinate or a compaction index was out of range "
                           "(the affected rows were zero-filled)")


class ExitBook:
    """The host's record of a run on the device: per image its prediction, confidence, exit
    step and patch coordinates, which images are still running (in their device row order),
    and which a deadline stopped. Both device runs (plain launches and CUDA graphs) keep one.
    """

    def __init__(self, n: int, steps: int) -> None:
        self.T = steps
        self.prediction, self.confidence = np.zeros(n, np.int64), np.zeros(n, np.float32)
        self.exit_step = np.full(n, steps - 1, np.int64)
        self.coords = np.full((max(steps - 1, 0), n, 2), -1, np.int32)
        self.active = np.arange(n)
        self.stopped: Optional[np.ndarray] = None

    def record(self, t: int, maxprob: np.ndarray, argmax: np.ndarray, coords: Optional[np.ndarray]) -> None:
        """Step ``t``'s results for the images still running (``coords``: their patches, t > 0)."""
        self.prediction[self.active] = argmax
        self.confidence[self.active] = maxprob
        if t > 0 and coords is not None:
            self.coords[t - 1, self.active] = coords

    def exits(self, t: int, maxprob: np.ndarray, threshold: float) -> Optional[np.ndarray]:
        """Applies step ``t``'s threshold: the rows (in the current order) of the images that go
        on, or None when none exited."""
        done = maxprob >= threshold
        if not done.any():
            return None
        self.exit_step[self.active[done]] = t
        keep = np.flatnonzero(~done).astype(np.int32)
        self.active = self.active[keep]
        return keep

    def record_trace(self, blocks: np.ndarray, rows: int) -> None:
        """A trace's per-step result blocks, int32 (T, 4 * rows + 1): max probability, argmax,
        patch coordinates (``rows`` >= n entries each) and the error flag. Every step's patches
        and the last step's answer are kept."""
        n = self.prediction.shape[0]
        for t in range(self.T):
            check_step_flag(int(blocks[t, 4 * rows]), t)
            if t > 0:
                self.coords[t - 1] = blocks[t, 2 * rows:2 * rows + 2 * n].reshape(n, 2)
        last = blocks[self.T - 1]
        self.prediction[:] = last[rows:rows + n]
        self.confidence[:] = last[:n].view(np.float32)

    def stop(self, last_step: int) -> None:
        """A deadline ends the run: the images still running keep step ``last_step``'s answer."""
        self.exit_step[self.active] = last_step
        self.stopped = np.zeros(self.prediction.shape[0], bool)
        self.stopped[self.active] = True

    def outputs(self, probs: Optional[np.ndarray] = None) -> "StepOutputs":
        return StepOutputs(self.prediction, self.confidence, self.exit_step, self.coords, probs, self.stopped)


class DeviceRun:
    """What the two device runs (plain launches, CUDA graphs) share: the step order, the count
    of images still running, and the deadline stop. Subclasses set ``t``, ``T``, ``n``,
    ``trace`` and ``book`` and implement ``_exit_test``."""

    t: int
    T: int
    n: int
    trace: bool
    book: ExitBook

    def _exit_test(self) -> bool:  # pragma: no cover - implemented by the runs
        raise NotImplementedError

    def _advance(self) -> bool:
        """Exit test of step t (not in trace mode); True when step t + 1 follows (t advanced)."""
        if not self.trace and not self._exit_test():
            return False
        if self.t == self.T - 1:
            return False
        self.t += 1
        return True

    def running(self) -> Tuple[int, int]:
        return self.t, self.n

    def stop(self) -> None:
        self.book.stop(self.t - 1)  # the pending step's policy / crop are never read
