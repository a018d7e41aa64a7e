"""The glance/focus loop with early exit, written once for every backend.

A backend only runs a backbone graph (:class:`~gfnet_edge.runtime.backends.base.Runner`); the
extension does the glance resize, the patch crop and the GRU/Linear heads
(:class:`~gfnet_edge.runtime.heads.HeadSet`). Samples that exit are compacted away between
steps (their states and features; patches are cut from the whole batch by index), so no
backbone work is spent on them. On the host the whole between-backbones step is one extension
call (:class:`Driver`); on a GPU the device loop (``device_driver.py``) keeps it on one stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import numpy as np

from .backends.base import Runner
from .heads import HeadSet
from .profile import Profiler


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
    """

    prediction: np.ndarray
    confidence: np.ndarray
    exit_step: np.ndarray
    coords: np.ndarray
    probs: Optional[np.ndarray] = None


class LoopBase:
    """What every loop holds: the model entry, the runner, the heads, the profiler and S, P, T.

    Args:
        model: the manifest's ``model`` entry.
        runner: an active backend runner.
        heads: the bound heads.
        profiler: per-stage timer.
    """

    def __init__(self, model: Dict[str, Any], runner: Runner, heads: HeadSet, profiler: Profiler) -> None:
        self.model = model
        self.runner = runner
        self.heads = heads
        self.prof = profiler
        self.T = int(model["steps"])
        self.S = int(model["image_size"])
        self.P = int(model["patch_size"])
        self.step0_backbone = model["step0"] == "backbone"

    def _outputs(self, n: int):
        """Fresh ``(prediction, confidence, exit_step, coords)`` for ``n`` images: exit at the
        last step and no patch (-1) until the loop says otherwise."""
        return (np.zeros(n, np.int64), np.zeros(n, np.float32), np.full(n, self.T - 1, np.int64),
                np.full((max(self.T - 1, 0), n, 2), -1, np.int32))


#: The parts of the host loop's native ``step`` call, timed inside it while profiling.
HOST_STEP_PARTS = ("heads", "exit", "policy", "crop")


class Driver(LoopBase):
    """Runs GFNet steps on host arrays with a backend runner (constructor arguments:
    :class:`LoopBase`). Between two backbone runs, one extension call
    (:class:`gfnet_edge._C.HostLoop`, csrc/cpu/host_loop.cpp) does the classifier step, the exit
    test, the compaction of the running images' states, the policy step and the next patch
    crop: Python only runs the backbones. The profiler gets that call as stage ``step`` and,
    timed inside it, its parts ``heads``, ``exit``, ``policy`` and ``crop`` (so ``step`` minus
    its parts is the cost of the call itself)."""

    def __init__(self, model: Dict[str, Any], runner: Runner, heads: HeadSet, profiler: Profiler) -> None:
        super().__init__(model, runner, heads, profiler)
        self.loop = heads.host_loop(model)

    def run(self, images: np.ndarray, glance: np.ndarray, thresholds: Optional[Sequence[float]]) -> StepOutputs:
        """Runs the loop.

        Args:
            images: normalised float32 (N, 3, S, S), or uint8 (N, S, S, 3) frames of S x S
                (patches are then normalised as they are cut, with the model's mean and std);
                C-contiguous.
            glance: their glance (N, 3, P, P), normalised.
            thresholds: exit threshold per step; ``None`` runs every step for every image and
                returns the full probabilities (trace).
        """
        T, prof, loop = self.T, self.prof, self.loop
        n = images.shape[0]
        trace = thresholds is None
        thr = None if trace else np.asarray(thresholds, dtype=np.float32)
        parts = prof.enabled
        loop.profile = parts
        with prof.stage("glance"):
            g = self.runner.run("glance", glance)
        with prof.stage("step"):
            patches = loop.begin(images, g["feature"], g["policy_state"],
                                 g["logits"] if self.step0_backbone else None, thr)
        if parts:
            self._record_parts()
        probs_all = None
        if trace:
            logits = loop.logits()
            probs_all = np.zeros((T, n, logits.shape[1]), np.float32)
            probs_all[0] = softmax(logits)
        t = 0
        while patches is not None:
            t += 1
            with prof.stage("focus"):
                f = self.runner.run("focus", patches)
            with prof.stage("step"):
                patches = loop.next(f["feature"], f["policy_state"])
            if parts:
                self._record_parts()
            if trace:
                probs_all[t, loop.active()] = softmax(loop.logits())
        prediction, confidence, exit_step, coords = loop.outputs()
        return StepOutputs(prediction, confidence, exit_step, coords, probs_all)

    def _record_parts(self) -> None:
        for name, seconds in zip(HOST_STEP_PARTS, self.loop.part_seconds()):
            if seconds >= 0.0:  # -1: the call did not run this part
                self.prof.record(name, seconds)
