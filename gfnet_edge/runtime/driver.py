"""The glance/focus loop with early exit, written once for every backend.

A backend only runs a backbone graph (:class:`~gfnet_edge.runtime.backends.base.Runner`); the
extension does the glance resize, the patch crop and the GRU/Linear heads
(:class:`~gfnet_edge.runtime.heads.HeadSet`). Samples that exit are compacted away between
steps (their states and features; patches are cut from the whole batch by index), so no
backbone work is spent on them.
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


def _max_argmax(logits: np.ndarray):
    """Softmax maximum and argmax per row, by the extension: the kernel the heads use for the
    later steps, so every step's exit test sees the same arithmetic."""
    from .. import ops

    return ops.softmax_stats(np.ascontiguousarray(logits, dtype=np.float32))


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


class Driver(LoopBase):
    """Runs GFNet steps on host arrays with a backend runner and the extension's CPU heads
    (constructor arguments: :class:`LoopBase`)."""

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
        from .. import ops

        T, S, P, prof, heads = self.T, self.S, self.P, self.prof, self.heads
        n = images.shape[0]
        trace = thresholds is None
        thr = None if trace else np.asarray(thresholds, dtype=np.float32)
        prediction, confidence, exit_step, coords_all = self._outputs(n)
        probs_all = None
        norm = {"mean": tuple(self.model["mean"]), "std": tuple(self.model["std"])} if images.dtype == np.uint8 else {}

        with prof.stage("glance"):
            g = self.runner.run("glance", glance)
        feature, state = g["feature"], g["policy_state"]
        with prof.stage("heads"):
            h_cls = None
            if heads.kind == "gru":
                h_cls = np.zeros((n, heads.cls_hidden), np.float32)
                h_cls, logits, mp, am = heads.classify_gru(feature, h_cls)
            else:
                feats = np.zeros((n, T, feature.shape[1]), np.float32)
                feats[:, 0] = feature
            if self.step0_backbone:
                logits = g["logits"]
                mp, am = _max_argmax(logits)
        if trace:
            probs_all = np.zeros((T, n, logits.shape[1]), np.float32)
            probs_all[0] = softmax(logits)

        active = np.arange(n, dtype=np.int64)
        # While no image has exited, whole-array slices instead of fancy indexing (cheaper numpy
        # paths, and at batch 1 the usual case).
        sel: Any = slice(None)
        h_pol = np.zeros((n, heads.pol_hidden), np.float32)
        for t in range(T):
            if t > 0:
                with prof.stage("policy"):
                    h_pol, _action, coords = heads.act(state, h_pol)
                coords_all[t - 1, sel] = coords
                with prof.stage("crop"):
                    # patches of the images still running, cut from the whole batch (no copy of it)
                    patches = ops.crop_patches(images, coords, P, index=None if active.size == n else active, **norm)
                with prof.stage("focus"):
                    f = self.runner.run("focus", patches)
                state = f["policy_state"]
                with prof.stage("heads"):
                    if heads.kind == "gru":
                        h_cls, logits, mp, am = heads.classify_gru(f["feature"], h_cls)
                    else:
                        feats[:, t] = f["feature"]
                        logits, mp, am = heads.classify_cascaded(feats, t + 1)
                if trace:
                    probs_all[t, sel] = softmax(logits)
            with prof.stage("exit"):
                prediction[sel] = am
                confidence[sel] = mp
                if trace or t == T - 1:
                    continue
                done = mp >= thr[t]
                if done.any():
                    exit_step[active[done]] = t
                    keep = ~done
                    active = sel = active[keep]
                    if active.size == 0:
                        break
                    state = np.ascontiguousarray(state[keep])
                    h_pol = np.ascontiguousarray(h_pol[keep])
                    if h_cls is not None:
                        h_cls = np.ascontiguousarray(h_cls[keep])
                    else:
                        feats = np.ascontiguousarray(feats[keep])
        return StepOutputs(prediction, confidence, exit_step, coords_all, probs_all)
