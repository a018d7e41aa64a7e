"""The host place of the loop: buffers are numpy arrays, the steps one native call each.

Between two backbone runs one extension call (:class:`gfnet_edge._C.HostLoop`,
csrc/cpu/host_loop.cpp) does the classifier step, the exit test, the compaction of the running
images' states, the policy step and the next patch crop, so Python only runs the backbones.
The profiler gets that call as stage ``step`` and, timed inside it, its parts
(:data:`~gfnet_edge.runtime.profile.HOST_STEP_PARTS`; ``step`` minus its parts is the cost of
the call itself).
"""
from __future__ import annotations

from typing import Any, ContextManager, Dict, List, Optional, Sequence, Union

import numpy as np

from .types import Chunk, LoopContext, StepOutputs, frame_crop_pct, softmax
from .profile import HOST_STEP_PARTS



class HostPlace:
    """Inputs and steps of the loop in host memory, for any runner.

    Args:
        ctx: the loop's model, runner, heads and profiler.
    """

    on_device = False

    def __init__(self, ctx: LoopContext) -> None:
        self.ctx = ctx
        self.loop = ctx.heads.host_loop(ctx.model)


    def close(self) -> None:
        """Nothing to free: the host place's buffers are numpy arrays."""
    def stage(self, name: str) -> ContextManager[None]:
        return self.ctx.prof.stage(name)

    # ------------------------------------------------------------------- inputs
    def inputs(self, images: np.ndarray, glance: Optional[np.ndarray]) -> List[Chunk]:
        """``[(images, glance, n)]``: the whole batch in one chunk (a runner with a max batch
        cuts each backbone call itself; :class:`~gfnet_edge.runtime.api.Runtime` hands the
        driver at most its ``max_batch`` images per call, so every buffer here is sized for that
        chunk); the glance computed when not given. uint8 (N, S, S, 3) frames stay uint8: the
        glance and the crops normalise them on the fly."""
        if glance is None:
            with self.stage("preprocess"):
                glance = self._glance(images)
        return [(images, glance, int(images.shape[0]))]

    def frames(self, frames: Union[np.ndarray, Sequence[np.ndarray]], cropped: bool = False) -> List[Chunk]:
        """Resized and centre-cropped to uint8 (N, S, S, 3) (skipped when they already are
        S x S and the model crops nothing, or they are given as ``cropped``) plus their glance:
        no normalised float copy of the images is made (a quarter of the bytes to write,
        compact and read back)."""
        from .. import ops

        m, S = self.ctx.model, self.ctx.S
        crop_pct = frame_crop_pct(self.ctx, cropped)
        with self.stage("preprocess"):
            square = (frames.shape[1:] == (S, S, 3) if isinstance(frames, np.ndarray)
                      else all(f.shape == (S, S, 3) for f in frames))
            if ops.resize_size(S, crop_pct) == S and square:
                # np.stack keeps the frames' layout (Fortran order, transposed views); the extension reads C order
                images = np.ascontiguousarray(frames if isinstance(frames, np.ndarray) else np.stack(frames))
            else:
                images = ops.resize_crop([np.ascontiguousarray(f) for f in frames], S, crop_pct,
                                         m.dataset_interpolation)
            glance = self._glance(images)
        return [(images, glance, int(images.shape[0]))]

    def _glance(self, images: np.ndarray) -> np.ndarray:
        from .. import ops

        m = self.ctx.model
        norm = {"mean": m.mean, "std": m.std} if images.dtype == np.uint8 else {}
        return ops.glance(images, self.ctx.P, m.glance_interpolation, **norm)

    def device_inputs(self, images: int, glance: int, n: int) -> List[Chunk]:
        raise ValueError("inputs in GPU memory need the device place (heads built with device='cuda')")

    def device_frames(self, frames: Sequence[Any], cropped: bool = False) -> List[Chunk]:
        raise ValueError("frames in GPU memory need the device place (heads built with device='cuda')")

    # -------------------------------------------------------------------- steps
    def steps(self, images: np.ndarray, n: int, thresholds: Optional[np.ndarray], glance: Any = None) -> "HostSteps":
        return HostSteps(self, images, thresholds)


class HostSteps:
    """One run of the loop over a host batch (see :class:`~gfnet_edge.runtime.driver.Driver`)."""

    def __init__(self, place: HostPlace, images: np.ndarray, thresholds: Optional[np.ndarray]) -> None:
        d = place.ctx
        self.loop, self.prof, self.runner = place.loop, d.prof, d.runner
        self.images, self.thr = images, thresholds
        self.step0_backbone, self.T = d.step0_backbone, d.T
        self.parts = self.prof.enabled
        self.loop.profile = self.parts
        self.probs: Optional[np.ndarray] = None
        self.t = 0
        self.stopped_rows: Optional[np.ndarray] = None

    def backbone(self, graph: str, x: np.ndarray) -> Dict[str, np.ndarray]:
        return self.runner.run(graph, x)

    def begin(self, g: Dict[str, np.ndarray]) -> Optional[np.ndarray]:
        """Step 0 from the glance outputs; the first patches, or None when every image exited."""
        loop = self.loop
        with self.prof.stage("step"):
            patches = loop.begin(self.images, g["feature"], g["policy_state"],
                                 g["logits"] if self.step0_backbone else None, self.thr)
        if self.parts:
            self._record_parts()
        if self.thr is None:  # trace: every step's probabilities
            logits = loop.logits()
            self.probs = np.zeros((self.T, logits.shape[0], logits.shape[1]), np.float32)
            self.probs[0] = softmax(logits)
        return patches

    def next(self, f: Dict[str, np.ndarray]) -> Optional[np.ndarray]:
        """The step of a focus backbone's outputs; the next patches, or None when done."""
        self.t += 1
        loop = self.loop
        with self.prof.stage("step"):
            patches = loop.next(f["feature"], f["policy_state"])
        if self.parts:
            self._record_parts()
        if self.probs is not None:
            self.probs[self.t, loop.active()] = softmax(loop.logits())
        return patches

    def running(self) -> tuple:
        return self.t + 1, int(len(self.loop.active()))

    def stop(self) -> None:
        self.stopped_rows = np.asarray(self.loop.active(), np.int64)

    def outputs(self) -> StepOutputs:
        prediction, confidence, exit_step, coords = self.loop.outputs()
        stopped = None
        if self.stopped_rows is not None:
            rows = self.stopped_rows
            exit_step, coords = np.array(exit_step), np.array(coords)
            exit_step[rows] = self.t  # the last step they ran
            if self.t < self.T - 1:
                coords[self.t, rows] = -1  # the patch of the step that did not run
            stopped = np.zeros(exit_step.shape[0], bool)
            stopped[rows] = True
        return StepOutputs(prediction, confidence, exit_step, coords, self.probs, stopped)

    def _record_parts(self) -> None:
        for name, seconds in zip(HOST_STEP_PARTS, self.loop.part_seconds()):
            if seconds >= 0.0:  # -1: the call did not run this part
                self.prof.record(name, seconds)

