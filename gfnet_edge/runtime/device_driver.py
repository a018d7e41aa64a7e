"""The glance/focus loop with every tensor in GPU memory (TensorRT, or torch on CUDA).

Same contract and semantics as :class:`~gfnet_edge.runtime.driver.Driver` (trace mode,
early exit with compaction, ``step0 == "backbone"``, GRU or cascaded classifier, coordinates
``-1`` after exit), but images, glance, features, hidden states, coordinates and logits stay
in device memory and every step -- policy, crop, backbone, classifier -- is enqueued on one
CUDA stream:

* the backbone graphs run through :meth:`Runner.run_device
  <gfnet_edge.runtime.backends.base.Runner.run_device>` on the driver's stream;
* the glance is ``ops.cuda_glance`` (or the fused ``ops.cuda_preprocess`` for uint8
  frames), the crop ``ops.cuda_crop_patches`` with a device error flag (no synchronization),
  the heads are built with ``device="cuda"`` and run through their ``step_device``;
* the step's max probability, argmax, patch coordinates and error flag are written side by
  side in one small device block, so the exit test costs exactly **one** device -> host copy
  of ``16 n + 4`` bytes per step (``n`` = images still running); in trace mode nothing is
  read until the end (that block for every step, and the logits);
* survivors are compacted on the device with ``ops.cuda_gather_rows`` (indices uploaded
  once per step that has exits, asynchronously).

Per-stage profiling synchronizes the stream at the end of each stage while the profiler is
enabled, so the stage times are device times; with the profiler off nothing waits except the
per-step read.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from ..errors import InputError, UnavailableError
from .backends.base import Runner
from .driver import LoopBase, StepOutputs, softmax
from .heads import HeadSet
from .profile import Profiler

F32 = 4  # bytes per float32 / int32


class DeviceDriver(LoopBase):
    """Runs GFNet steps on the GPU with a device-capable runner and CUDA heads.

    Args:
        model: the manifest's ``model`` entry.
        runner: an active runner with ``supports_device`` (TensorRT, torch on CUDA).
        heads: heads bound with ``device="cuda"``.
        profiler: per-stage timer.
        stream: the CUDA stream for everything (default: a new :class:`gfnet_edge.ops.Stream`).

    Raises:
        UnavailableError: no CUDA build or no usable GPU.
        ValueError: the runner has no device execution or the heads are not on the GPU.
    """

    def __init__(self, model: Dict[str, Any], runner: Runner, heads: HeadSet, profiler: Profiler,
                 stream: Any = None) -> None:
        from .. import ops

        if not ops.has_cuda_build() or ops.cuda_device_count() < 1:
            reason = "gfnet_edge._C was built without CUDA" if not ops.has_cuda_build() else \
                f"no usable CUDA device ({ops._C.cuda_device_error()})"
            raise UnavailableError(f"the device-resident loop needs a GPU: {reason}")
        if not getattr(runner, "supports_device", False):
            raise ValueError(f"the {runner.name} runner has no device execution (supports_device is False)")
        if getattr(heads, "device", "cpu") != "cuda":
            raise ValueError("DeviceDriver needs heads built with device='cuda' (HeadSet(..., device='cuda'))")
        super().__init__(model, runner, heads, profiler)
        self.stream = stream if stream is not None else ops.Stream()
        self._bufs: Dict[str, Any] = {}

    # ----------------------------------------------------------------- buffers
    def _buf(self, name: str, nbytes: int):
        """A cached device buffer of at least ``nbytes`` (grown, never shrunk)."""
        from .. import ops

        buf = self._bufs.get(name)
        if buf is None or buf.nbytes < nbytes:
            self._bufs.pop(name, None)  # free first (cudaFree waits for pending work)
            buf = ops.DeviceBuffer(max(int(nbytes), 1))
            self._bufs[name] = buf
        return buf

    def _other(self, key: str, current: Optional[int], nbytes: int) -> int:
        """Pointer of whichever of the two ``key`` buffers does not hold ``current``."""
        first = self._buf(f"{key}.0", nbytes)
        return first.ptr if first.ptr != current else self._buf(f"{key}.1", nbytes).ptr

    @contextlib.contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        with self.prof.stage(name):
            yield
            if self.prof.enabled:
                self.stream.synchronize()

    # -------------------------------------------------------------------- entry
    def run(self, images: np.ndarray, glance: Optional[np.ndarray], thresholds: Optional[Sequence[float]]) -> StepOutputs:
        """Runs the loop on host images (uploaded once).

        Args:
            images: normalised float32 (N, 3, S, S).
            glance: their glance (N, 3, P, P), or ``None`` to compute it on the device
                (``ops.cuda_glance``, within 1e-5 of the CPU glance).
            thresholds: exit threshold per step; ``None`` runs every step for every image and
                returns the full probabilities (trace).
        """
        from .. import ops

        S, P, st = self.S, self.P, self.stream
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (3, S, S) or images.shape[0] < 1:
            raise ValueError(f"images must be float32 (N, 3, {S}, {S}), got {images.shape}")
        n = images.shape[0]
        img = self._buf("input.images", images.nbytes)
        gl = self._buf("input.glance", n * 3 * P * P * F32)
        with self._stage("preprocess"):
            img.copy_from_host(images, st)
            if glance is None:
                ops.cuda_glance(img, n, S, gl, P, self.model["glance_interpolation"], stream=st)
            else:
                glance = np.ascontiguousarray(glance, dtype=np.float32)
                if glance.shape != (n, 3, P, P):
                    raise ValueError(f"glance must be float32 ({n}, 3, {P}, {P}), got {glance.shape}")
                gl.copy_from_host(glance, st)
        return self.run_device(img.ptr, gl.ptr, n, thresholds)

    def run_frames(self, frames: Union[np.ndarray, Sequence[np.ndarray]], thresholds: Optional[Sequence[float]],
                   crop_pct: float = 0.875, interpolation: str = "bilinear", mean: Sequence[float] = (0.485, 0.456, 0.406),
                   std: Sequence[float] = (0.229, 0.224, 0.225), bgr: bool = False) -> StepOutputs:
        """Runs the loop on uint8 HWC frames: one upload of all frames, then the fused device
        pre-processing (resize, crop, normalise, glance; ``ops.cuda_preprocess``) per frame.

        Args:
            frames: an (N, H, W, 3) uint8 array or a list of (H, W, 3) uint8 frames of any sizes.
            thresholds: as in :meth:`run`.
            crop_pct, interpolation, mean, std, bgr: pre-processing (see ``ops.preprocess``);
                the glance uses the model's ``glance_interpolation``.
        """
        from .. import ops

        S, P, st = self.S, self.P, self.stream
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            frame_list: List[np.ndarray] = [frames[i] for i in range(frames.shape[0])]
            host = np.ascontiguousarray(frames)
        else:
            frame_list = [frames] if isinstance(frames, np.ndarray) else list(frames)
            host = None
        if not frame_list:
            raise ValueError("no frames given")
        for i, f in enumerate(frame_list):
            if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3 or f.size == 0:
                desc = f"{f.dtype} {f.shape}" if isinstance(f, np.ndarray) else type(f).__name__
                raise ValueError(f"frame {i}: expected a uint8 (H, W, 3) frame, got {desc}")
        if host is None:
            host = np.concatenate([np.ascontiguousarray(f).reshape(-1) for f in frame_list])
        n = len(frame_list)
        fb = self._buf("input.frames", host.nbytes)
        img = self._buf("input.images", n * 3 * S * S * F32)
        gl = self._buf("input.glance", n * 3 * P * P * F32)
        with self._stage("preprocess"):
            fb.copy_from_host(host, st)
            offset = 0
            for i, f in enumerate(frame_list):
                h, w = int(f.shape[0]), int(f.shape[1])
                ops.cuda_preprocess(fb.ptr + offset, h, w, S, img.ptr + i * 3 * S * S * F32, crop_pct=crop_pct,
                                    interpolation=interpolation, bgr=bgr, mean=mean, std=std,
                                    glance=gl.ptr + i * 3 * P * P * F32, glance_size=P,
                                    glance_interpolation=self.model["glance_interpolation"], stream=st)
                offset += h * w * 3
        return self.run_device(img.ptr, gl.ptr, n, thresholds)

    def run_device(self, images: int, glance: int, n: int, thresholds: Optional[Sequence[float]]) -> StepOutputs:
        """Runs the loop on device-resident inputs (processed in chunks of the runner's max batch).

        Args:
            images: device pointer to float32 (n, 3, S, S); read, never written.
            glance: device pointer to float32 (n, 3, P, P).
            n: number of images.
            thresholds: as in :meth:`run`.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if thresholds is not None and len(thresholds) != self.T:
            raise ValueError(f"need {self.T} thresholds, got {len(thresholds)}")
        chunk = int(self.runner.max_batch or n)
        S, P = self.S, self.P
        outs = [self._run_chunk(images + i * 3 * S * S * F32, glance + i * 3 * P * P * F32, min(chunk, n - i),
                                thresholds) for i in range(0, n, chunk)]
        if len(outs) == 1:
            return outs[0]
        return StepOutputs(
            np.concatenate([o.prediction for o in outs]), np.concatenate([o.confidence for o in outs]),
            np.concatenate([o.exit_step for o in outs]), np.concatenate([o.coords for o in outs], axis=1),
            None if outs[0].probs is None else np.concatenate([o.probs for o in outs], axis=1))

    # --------------------------------------------------------------------- loop
    def _run_chunk(self, images: int, glance: int, n: int, thresholds: Optional[Sequence[float]]) -> StepOutputs:
        from .. import ops

        T, S, P, heads, runner, st = self.T, self.S, self.P, self.heads, self.runner, self.stream
        N = n
        trace = thresholds is None
        thr = None if trace else np.asarray(thresholds, dtype=np.float32)
        prediction, confidence, exit_step, coords_all = self._outputs(N)
        C = int(heads.cls.out_features)
        gru = heads.kind == "gru"

        # Per-step result block (int32 words): maxprob[n] argmax[n] coords[n, 2] flag.
        slot_words = 4 * N + 1
        stats = self._buf("stats", T * slot_words * F32)
        host_stats = np.empty(T * slot_words, np.int32)
        logits = self._buf("logits", (T if trace else 1) * N * C * F32)

        def slot(t: int) -> int:
            return stats.ptr + t * slot_words * F32

        def lg(t: int) -> int:
            return logits.ptr + (t * N * C * F32 if trace else 0)

        with self._stage("glance"):
            stats.zero(st)
            g = runner.run_device("glance", glance, n, st)
        feature, (_, F) = g["feature"][0], g["feature"][1]
        state, (_, Hs) = g["policy_state"][0], g["policy_state"][1]
        Hp, Hc = int(heads.pol_hidden), int(heads.cls_hidden)
        # Size every buffer for the whole chunk now: nothing is reallocated mid-run.
        for key, row in (("img", 3 * S * S), ("state", Hs), ("hpol", Hp), ("hcls", Hc), ("feats", T * F)):
            if row and (key != "hcls" or gru) and (key != "feats" or not gru):
                for k in (0, 1):
                    self._buf(f"{key}.{k}", N * row * F32)
        patches = self._buf("patches", N * 3 * P * P * F32)
        idx = self._buf("idx", N * F32)

        with self._stage("heads"):
            h_cls: Optional[int] = None
            feats: Optional[int] = None
            if gru:
                h_cls = self._other("hcls", None, N * Hc * F32)
                heads.cls.step_device(feature, None, h_cls, n, lg(0), slot(0), slot(0) + n * F32, stream=st)
            else:
                feats = self._buf("feats.0", N * T * F * F32).ptr  # (T, n, F), step t at t * n * F
                ops.cuda_copy(feats, feature, n * F * F32, st)
            if self.step0_backbone:
                lptr, lshape = g["logits"]
                if int(lshape[1]) != C:
                    raise InputError(f"the glance graph gives {lshape[1]} logits but the heads {C} classes")
                ops.cuda_softmax_stats(lptr, n, C, slot(0), slot(0) + n * F32,
                                       logits_out=lg(0) if trace else None, stream=st)

        active = np.arange(N)
        h_pol: Optional[int] = None
        for t in range(T):
            if t > 0:
                coords = slot(t) + 2 * n * F32
                with self._stage("policy"):
                    h_new = self._other("hpol", h_pol, N * Hp * F32)
                    heads.actor.step_device(state, h_pol, h_new, n, None, coords, S, P, stream=st)
                    h_pol = h_new
                with self._stage("crop"):
                    ops.cuda_crop_patches(images, n, S, coords, patches, P, error_flag=slot(t) + 4 * n * F32,
                                          stream=st)
                with self._stage("focus"):
                    f = runner.run_device("focus", patches.ptr, n, st)
                state = f["policy_state"][0]
                with self._stage("heads"):
                    if gru:
                        h_new = self._other("hcls", h_cls, N * Hc * F32)
                        heads.cls.step_device(f["feature"][0], h_cls, h_new, n, lg(t), slot(t), slot(t) + n * F32,
                                              stream=st)
                        h_cls = h_new
                    else:
                        ops.cuda_copy(feats + t * n * F * F32, f["feature"][0], n * F * F32, st)
                        heads.cls.step_device(feats, T, n, F, t + 1, lg(t), slot(t), slot(t) + n * F32,
                                              layout="tnf", stream=st)
            if trace:
                continue
            with self._stage("exit"):
                words = host_stats[:4 * n + 1]
                stats.copy_to_host(words, st, offset=t * slot_words * F32)  # the one read of the step
                mp, am = words[:n].view(np.float32), words[n:2 * n]
                _check_flag(int(words[4 * n]), t)
                prediction[active] = am
                confidence[active] = mp
                if t > 0:
                    coords_all[t - 1, active] = words[2 * n:4 * n].reshape(n, 2)
                if t == T - 1:
                    continue
                done = mp >= thr[t]
                if not done.any():
                    continue
                exit_step[active[done]] = t
                keep = np.flatnonzero(~done).astype(np.int32)
                active = active[keep]
                if active.size == 0:
                    break
                # Compact the survivors on the device (errors land in the next step's flag).
                m, flag = int(keep.size), slot(t + 1) + 4 * int(keep.size) * F32
                idx.copy_from_host(keep, st)

                def gather(key: str, src: int, row_bytes: int) -> int:
                    dst = self._other(key, src, N * row_bytes)
                    ops.cuda_gather_rows(src, n, idx, dst, row_bytes, n=m, error_flag=flag, stream=st)
                    return dst

                images = gather("img", images, 3 * S * S * F32)
                state = gather("state", state, Hs * F32)
                if h_pol is not None:
                    h_pol = gather("hpol", h_pol, Hp * F32)
                if gru:
                    h_cls = gather("hcls", h_cls, Hc * F32)
                else:
                    dst = self._other("feats", feats, N * T * F * F32)
                    for k in range(t + 1):
                        ops.cuda_gather_rows(feats + k * n * F * F32, n, idx, dst + k * m * F * F32, F * F32, n=m,
                                             error_flag=flag, stream=st)
                    feats = dst
                n = m

        probs_all = None
        if trace:
            with self._stage("exit"):
                stats.copy_to_host(host_stats, st)
                lg_host = np.empty((T, N, C), np.float32)
                logits.copy_to_host(lg_host, st)
            for t in range(T):
                words = host_stats[t * slot_words:(t + 1) * slot_words]
                _check_flag(int(words[4 * N]), t)
                if t > 0:
                    coords_all[t - 1] = words[2 * N:4 * N].reshape(N, 2)
            last = host_stats[(T - 1) * slot_words:]
            prediction[:] = last[N:2 * N]
            confidence[:] = last[:N].view(np.float32)
            probs_all = np.stack([softmax(lg_host[t]) for t in range(T)]).astype(np.float32, copy=False)
        return StepOutputs(prediction, confidence, exit_step, coords_all, probs_all)


def _check_flag(flag: int, step: int) -> None:
    if flag:
        raise RuntimeError(f"device loop, step {step}: a patch coordinate or a compaction index was out of range "
                           "(the affected rows were zero-filled)")
