"""The device place of the loop: every tensor in GPU memory (TensorRT, or torch on CUDA).

Same contract and semantics as the host place (trace mode, early exit with compaction,
``step0 == "backbone"``, GRU or cascaded classifier, coordinates ``-1`` after exit), but
images, glance, features, hidden states, coordinates and logits stay in device memory and every
step -- policy, crop, backbone, classifier -- is enqueued on one CUDA stream:

* the backbone graphs run through :meth:`Runner.run_device
  <gfnet_edge.runtime.backends.base.Runner.run_device>` on the place's stream;
* the glance is ``ops.cuda_glance`` (or the fused ``ops.cuda_preprocess`` for uint8
  frames), the crop ``ops.cuda_crop_patches`` with a device error flag (no synchronization),
  the heads are built with ``device="cuda"`` and run through their ``step_device``;
* the step's max probability, argmax, patch coordinates and error flag are written side by
  side in one small device block, so the exit test costs exactly **one** device -> host copy
  of ``16 n + 4`` bytes per step (``n`` = images still running); in trace mode nothing is
  read until the end (that block for every step, and the logits);
* survivors are compacted on the device with ``ops.cuda_gather_rows`` (indices uploaded
  once per step that has exits, asynchronously).

With CUDA graphs on (the default when the runner can be captured: torch on CUDA, TensorRT),
the place runs :class:`~gfnet_edge.runtime.graph_steps.GraphSteps` instead: the same steps, each
captured once per batch bucket as a CUDA graph and replayed with one launch
(:mod:`~gfnet_edge.runtime.graphs`). :class:`DeviceSteps` below is the plain-launch version,
used when graphs are off or the runner cannot be captured.

Per-stage profiling records a pair of CUDA events on the stream around each device stage and
reads their times at the end of the chunk, so the stage times are device times and nothing
waits per stage; the ``exit`` stage (the per-step read and the host bookkeeping) is wall-clock
time. With the profiler off nothing waits except the per-step read.
"""
from __future__ import annotations

import logging
from typing import Any, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError, UnavailableError
from .cuda_arrays import DeviceFrame
from .types import (Chunk, DeviceRun, ExitBook, LoopContext, StepOutputs, check_step_flag as _check_flag,
                    frame_crop_pct, softmax)


logger = logging.getLogger("gfnet_edge")

F32 = 4  # bytes per float32 / int32


def contiguous_runs(frames: Sequence[Tuple[int, int, int]]) -> List[Tuple[int, int]]:
    """``(first index, count)`` of each maximal run of consecutive device frames
    ``(pointer, height, width)`` of one size that lie back to back in memory, in order."""
    runs: List[Tuple[int, int]] = []
    for i, (ptr, h, w) in enumerate(frames):
        if runs:
            first, count = runs[-1]
            p0, h0, w0 = frames[first]
            if (h, w) == (h0, w0) and ptr == p0 + count * h * w * 3:
                runs[-1] = (first, count + 1)
                continue
        runs.append((i, 1))
    return runs


class DevicePlace:
    """Inputs and steps of the loop in GPU memory, for a device-capable runner and CUDA heads.

    Args:
        ctx: the loop's model, runner, heads and profiler.
        stream: the CUDA stream for everything (default: a new :class:`gfnet_edge.ops.Stream`).
        cuda_graphs: capture each step as a CUDA graph when the runner can be captured
            (:meth:`Runner.graph_capture <gfnet_edge.runtime.backends.base.Runner.graph_capture>`).
        conditional: batch-1 runs on the loop graph (:class:`~.graph_loop.ConditionalMode`;
            ``None``: from the environment).

    Raises:
        UnavailableError: no CUDA build or no usable GPU.
        ValueError: the runner has no device execution.
    """

    on_device = True

    def __init__(self, ctx: LoopContext, stream: Any = None, cuda_graphs: bool = True, conditional: Any = None) -> None:
        from .. import ops

        if not ops.has_cuda_build() or ops.cuda_device_count() < 1:
            reason = "gfnet_edge._C was built without CUDA" if not ops.has_cuda_build() else \
                f"no usable CUDA device ({ops.cuda_device_error()})"
            raise UnavailableError(f"the device-resident loop needs a GPU: {reason}")
        if not getattr(ctx.runner, "supports_device", False):
            raise ValueError(f"the {ctx.runner.name} runner has no device execution (supports_device is False); "
                             "build the heads with device='cpu' to run it on the host")
        self.ctx = ctx
        self.stream = stream if stream is not None else ops.Stream()
        self._bufs: Dict[str, Any] = {}
        self._host_bufs: Dict[str, np.ndarray] = {}
        self._events: List[Any] = []  # free CUDA events for stage timing
        self._upload: Any = None  # the upload stream of prefetch()
        self._slot = 1
        self._pinned: List[Any] = [None, None]
        self._upload_events: List[Any] = [None, None]
        self._prefetched: Dict[int, tuple] = {}  # slot -> (host object, device buffer, event)
        self._pending: List[tuple] = []  # (stage, start event, end event) not read yet
        capture = ctx.runner.graph_capture(self.stream) if cuda_graphs else None
        #: The captured loop's buffers and graphs (None: plain launches, :class:`DeviceSteps`).
        self.graphs = None
        #: Why the loop runs as plain launches from the start (graphs switched off, or the
        #: runner's :attr:`~gfnet_edge.runtime.backends.base.Runner.capture_refusal`), else None.
        self.not_captured: Optional[str] = None
        if capture is None:
            self.not_captured = ("graphs switched off" if not cuda_graphs else
                                 getattr(ctx.runner, "capture_refusal", None) or "the runner offers no graph capture")
            if cuda_graphs:
                logger.info("the device loop runs as plain launches: %s", self.not_captured)
        if capture is not None:
            from .graph_steps import GraphWorkspace

            self.graphs = GraphWorkspace(self, capture, conditional=conditional)

    def close(self) -> None:
        """Waits for the place's streams, then frees its graphs, GPU buffers, page-locked
        buffers and events (they would otherwise wait for the garbage collector: the place and
        its graph workspace refer to each other)."""
        for stream in (self.stream, self._upload):
            if stream is not None:
                stream.synchronize()
        if self.graphs is not None:
            self.graphs.close()
        self._prefetched.clear()
        self._pending.clear()
        self._bufs.clear()
        self._host_bufs.clear()
        self._pinned = [None, None]
        self._upload_events = [None, None]
        self._events.clear()

    # ----------------------------------------------------------------- buffers
    def buf(self, name: str, nbytes: int):
        """A cached device buffer of at least ``nbytes`` (grown, never shrunk)."""
        from .. import ops

        buf = self._bufs.get(name)
        if buf is None or buf.nbytes < nbytes:
            self._bufs.pop(name, None)  # free first (cudaFree waits for pending work)
            buf = ops.DeviceBuffer(max(int(nbytes), 1))
            self._bufs[name] = buf
        return buf

    def host_words(self, name: str, words: int) -> np.ndarray:
        """A cached page-locked int32 host array of ``words`` (grown, never shrunk), for the
        loop's per-step reads: a device -> host copy into it needs no staging."""
        from .. import ops

        arr = self._host_bufs.get(name)
        if arr is None or arr.size < words:
            arr = self._host_bufs[name] = ops.pinned_empty((max(int(words), 1),), np.int32)
        return arr[:words]

    def _input_buffers(self, n: int) -> tuple:
        """Device buffers for ``n`` normalised images and their glance. With CUDA graphs they
        are the graph workspace's own (grown to hold ``n`` rows), so the captured steps read
        them where the pre-processing wrote them, with no copy."""
        S, P = self.ctx.S, self.ctx.P
        if self.graphs is not None and self.graphs.cache.active:
            from .graphs import bucket_for

            self.graphs.reserve(bucket_for(n, None))
            return self.graphs.buffer("images"), self.graphs.buffer("glance")
        return self.buf("input.images", n * 3 * S * S * F32), self.buf("input.glance", n * 3 * P * P * F32)

    def other(self, key: str, current: Optional[int], nbytes: int) -> int:
        """Pointer of whichever of the two ``key`` buffers does not hold ``current``."""
        first = self.buf(f"{key}.0", nbytes)
        return first.ptr if first.ptr != current else self.buf(f"{key}.1", nbytes).ptr

    def stage(self, name: str) -> ContextManager[None]:
        """A device stage: while the profiler is on, CUDA events recorded on the stream around
        it (read by :meth:`flush_profile`); off, the profiler's shared no-op (the loop enters
        ~8 stages per image, so nothing is made then)."""
        prof = self.ctx.prof
        return _EventStage(self, name) if prof.enabled else prof.stage(name)

    def host_stage(self, name: str) -> ContextManager[None]:
        """A stage timed on the host clock (the per-step read and the exit bookkeeping)."""
        return self.ctx.prof.stage(name)

    def _event(self) -> Any:
        from .. import ops

        return self._events.pop() if self._events else ops.CudaEvent()

    def flush_profile(self) -> None:
        """Adds the device times of the stages recorded so far to the profiler."""
        if not self._pending:
            return
        prof, pending, self._pending = self.ctx.prof, self._pending, []
        for name, start, end in pending:
            prof.record(name, end.elapsed_ms(start) / 1e3)
            self._events += [start, end]

    # ----------------------------------------------------------------- prefetch
    def prefetch(self, data: Union[np.ndarray, Sequence[np.ndarray]]) -> None:
        """Starts uploading the next chunk of a call (uint8 frames, or float32 (N, 3, S, S)
        images) on the place's upload stream, through page-locked memory, while the current
        chunk runs. The next :meth:`frames` / :meth:`inputs` call given the same object uses
        the upload (its stream waits for it on the device; the host does not wait). Two slots
        alternate, so the chunk running and the one uploading never share memory."""
        from .. import ops

        items = [data] if isinstance(data, np.ndarray) else list(data)
        if not items or not all(isinstance(a, np.ndarray) and a.dtype in (np.uint8, np.float32) for a in items):
            return  # what the upload paths would refuse: they say why
        nbytes = sum(int(a.nbytes) for a in items)
        if self._upload is None:
            self._upload = ops.Stream()
        slot = self._slot = 1 - self._slot
        pinned = self._pinned[slot]
        if pinned is None or pinned.nbytes < nbytes:
            pinned = self._pinned[slot] = ops.pinned_empty((nbytes,), np.uint8)
        offset = 0
        for a in items:
            pinned[offset:offset + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            offset += a.nbytes
        dev = self.buf(f"prefetch.{slot}", nbytes)
        dev.copy_from_host(pinned[:nbytes], self._upload)
        event = self._upload_events[slot] = self._upload_events[slot] or ops.CudaEvent()
        event.record(self._upload)
        self._prefetched[slot] = (data, dev, event)

    def _take_prefetched(self, data: Any) -> Optional[Any]:
        """The device copy of ``data`` if it was prefetched (the place's stream made to wait
        for its upload), else None."""
        for slot, entry in list(self._prefetched.items()):
            if entry[0] is data:
                del self._prefetched[slot]
                entry[2].wait(self.stream)
                return entry[1]
        return None

    # ------------------------------------------------------------------- inputs
    def inputs(self, images: np.ndarray, glance: Optional[np.ndarray]) -> List[Chunk]:
        """Uploads normalised float32 (N, 3, S, S) images once (or takes their prefetched
        upload), with their glance or computing it on the device (``ops.cuda_glance``, within
        1e-5 of the CPU glance)."""
        from .. import ops

        S, P, st = self.ctx.S, self.ctx.P, self.stream
        staged = self._take_prefetched(images)
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (3, S, S) or images.shape[0] < 1:
            raise ValueError(f"images must be float32 (N, 3, {S}, {S}), got {images.shape}")
        n = images.shape[0]
        img, gl = self._input_buffers(n)
        img = staged if staged is not None else img
        with self.stage("preprocess"):
            if staged is None:
                img.copy_from_host(images, st)
            if glance is None:
                ops.cuda_glance(img, n, S, gl, P, self.ctx.model.glance_interpolation, stream=st)
            else:
                glance = np.ascontiguousarray(glance, dtype=np.float32)
                if glance.shape != (n, 3, P, P):
                    raise ValueError(f"glance must be float32 ({n}, 3, {P}, {P}), got {glance.shape}")
                gl.copy_from_host(glance, st)
        return self.device_inputs(img.ptr, gl.ptr, n)

    def frames(self, frames: Union[np.ndarray, Sequence[np.ndarray]], cropped: bool = False) -> List[Chunk]:
        """One upload of all frames (or their prefetched upload), then the fused device
        pre-processing (:meth:`_preprocess`: one call per run of same-size frames, one batch
        normalisation for S x S frames that need no resize; ``cropped``: S x S frames only
        normalised, so a quarter of the bytes of float32 images cross to the GPU)."""
        staged = self._take_prefetched(frames)
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
        crop_pct = frame_crop_pct(self.ctx, cropped)
        if staged is not None:
            fb = staged
        else:
            if host is None:
                host = np.concatenate([np.ascontiguousarray(f).reshape(-1) for f in frame_list])
            fb = self.buf("input.frames", host.nbytes)
        with self.stage("preprocess"):
            if staged is None:
                fb.copy_from_host(host, self.stream)
            located, offset = [], 0
            for f in frame_list:
                h, w = int(f.shape[0]), int(f.shape[1])
                located.append((fb.ptr + offset, h, w))
                offset += h * w * 3
            return self._preprocess(located, crop_pct)

    def device_frames(self, frames: Sequence[DeviceFrame], cropped: bool = False) -> List[Chunk]:
        """uint8 HWC frames already in GPU memory (from :func:`device_frames`): pre-processed
        where they are, nothing copied (``cropped`` as in :meth:`frames`). Their producers'
        streams are synchronized first."""
        from .. import ops

        crop_pct = frame_crop_pct(self.ctx, cropped)
        for stream in dict.fromkeys(f.stream for f in frames if f.stream is not None):
            ops.stream_synchronize(stream)
        with self.stage("preprocess"):
            return self._preprocess([(f.ptr, f.height, f.width) for f in frames], crop_pct)

    def _preprocess(self, frames: Sequence[tuple], crop_pct: float) -> List[Chunk]:
        """Enqueues the fused pre-processing (resize, crop, normalise, glance:
        ``ops.cuda_preprocess``) of device frames ``(pointer, height, width)``: one call per run
        of consecutive frames of one size that lie back to back in memory (a camera's frames
        uploaded together: one call for the batch); contiguous S x S frames that need no resize
        are normalised as one batch (``ops.cuda_normalise_frames``)."""
        from .. import ops

        m, S, P, st = self.ctx.model, self.ctx.S, self.ctx.P, self.stream
        n = len(frames)
        img, gl = self._input_buffers(n)
        runs = contiguous_runs(frames)
        if ops.resize_size(S, crop_pct) == S and len(runs) == 1 and frames[0][1:] == (S, S):
            # contiguous S x S frames that need no resize (cropped, or a model that does not crop): two
            # launches for the batch, the same values as pre-processing them
            ops.cuda_normalise_frames(frames[0][0], n, S, img.ptr, mean=m.mean, std=m.std, glance=gl.ptr,
                                      glance_size=P, glance_interpolation=m.glance_interpolation, stream=st)
            return self.device_inputs(img.ptr, gl.ptr, n)
        for i, count in runs:
            ptr, h, w = frames[i]
            ops.cuda_preprocess(ptr, h, w, S, img.ptr + i * 3 * S * S * F32,
                                crop_pct=crop_pct, interpolation=m.dataset_interpolation,
                                mean=m.mean, std=m.std,
                                glance=gl.ptr + i * 3 * P * P * F32, glance_size=P,
                                glance_interpolation=m.glance_interpolation, stream=st, n=count)
        return self.device_inputs(img.ptr, gl.ptr, n)

    def device_inputs(self, images: int, glance: int, n: int) -> List[Chunk]:
        """Device-resident inputs cut into chunks of the runner's max batch (each chunk runs
        the whole loop)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        chunk = int(self.ctx.runner.max_batch or n)
        S, P = self.ctx.S, self.ctx.P
        return [(images + i * 3 * S * S * F32, glance + i * 3 * P * P * F32, min(chunk, n - i))
                for i in range(0, n, chunk)]

    # -------------------------------------------------------------------- steps
    def steps(self, images: int, n: int, thresholds: Optional[np.ndarray], glance: int = 0) -> Any:
        """The run over one chunk: captured (:class:`GraphSteps`) when graphs are on."""
        if self.graphs is not None and self.graphs.cache.active:
            from .graph_steps import GraphSteps

            return GraphSteps(self, self.graphs, images, glance, n, thresholds)
        return DeviceSteps(self, images, n, thresholds)


class _EventStage:
    """``with`` block of one device stage, timed by two CUDA events on the place's stream."""

    __slots__ = ("place", "name", "start")

    def __init__(self, place: DevicePlace, name: str) -> None:
        self.place, self.name = place, name

    def __enter__(self) -> None:
        self.start = self.place._event()
        self.start.record(self.place.stream)

    def __exit__(self, *exc) -> None:
        end = self.place._event()
        end.record(self.place.stream)
        self.place._pending.append((self.name, self.start, end))


class DeviceSteps(DeviceRun):
    """One run of the loop over a device chunk of ``n`` images (see
    :class:`~gfnet_edge.runtime.driver.Driver`): the steps between the backbones, enqueued on
    the place's stream, and the per-step exit test with compaction."""

    def __init__(self, place: DevicePlace, images: int, n: int, thresholds: Optional[np.ndarray]) -> None:
        d = place.ctx
        self.place, self.runner, self.heads, self.st = place, d.runner, d.heads, place.stream
        self.T, self.S, self.P, self.step0_backbone = d.T, d.S, d.P, d.step0_backbone
        self.images, self.n, self.N = images, n, n
        self.thr = thresholds
        self.trace = thresholds is None
        T, N = self.T, n
        self.book = ExitBook(N, T)
        self.C = int(self.heads.cls.out_features)
        self.gru = self.heads.kind == "gru"
        # Per-step result block (int32 words): maxprob[n] argmax[n] coords[n, 2] flag.
        self.slot_words = 4 * N + 1
        self.stats = place.buf("stats", T * self.slot_words * F32)
        self.host_stats = place.host_words("stats", T * self.slot_words)
        self.logits = place.buf("logits", (T if self.trace else 1) * N * self.C * F32)
        self.stats.zero(self.st)
        self.t = 0
        self.state: Optional[int] = None  # policy input of the next step (the backbone's policy_state)
        self.h_pol: Optional[int] = None
        self.h_cls: Optional[int] = None
        self.feats: Optional[int] = None  # cascaded: (T, n, F), step t at t * n * F
        self.F = self.Hs = 0  # feature and policy-state widths, from the glance outputs
        self.Hp, self.Hc = int(self.heads.pol_hidden), int(self.heads.cls_hidden)
        self.patches = place.buf("patches", N * 3 * self.P * self.P * F32)
        self.idx = place.buf("idx", N * F32)  # survivors' rows, uploaded at each compaction

    def slot(self, t: int) -> int:
        return self.stats.ptr + t * self.slot_words * F32

    def lg(self, t: int) -> int:
        return self.logits.ptr + (t * self.N * self.C * F32 if self.trace else 0)

    def backbone(self, graph: str, x: int) -> Dict[str, Any]:
        return self.runner.run_device(graph, x, self.n, self.st)

    # --------------------------------------------------------------------- steps
    def begin(self, g: Dict[str, Any]) -> Optional[int]:
        """Step 0 from the glance outputs; the first patches, or None when every image exited."""
        from .. import ops

        place, heads, st, n, N = self.place, self.heads, self.st, self.n, self.N
        feature, (_, F) = g["feature"][0], g["feature"][1]
        self.state, (_, Hs) = g["policy_state"][0], g["policy_state"][1]
        self.F, self.Hs = int(F), int(Hs)
        # Size every buffer for the whole chunk now: nothing is reallocated mid-run.
        for key, row in (("img", 3 * self.S * self.S), ("state", Hs), ("hpol", self.Hp), ("hcls", self.Hc),
                         ("feats", self.T * F)):
            if row and (key != "hcls" or self.gru) and (key != "feats" or not self.gru):
                for k in (0, 1):
                    place.buf(f"{key}.{k}", N * row * F32)
        with place.stage("heads"):
            if self.gru:
                self.h_cls = place.other("hcls", None, N * self.Hc * F32)
                heads.cls.step_device(feature, None, self.h_cls, n, self.lg(0), self.slot(0), self.slot(0) + n * F32,
                                      stream=st)
            else:
                self.feats = place.buf("feats.0", N * self.T * F * F32).ptr
                ops.cuda_copy(self.feats, feature, n * F * F32, st)
            if self.step0_backbone:
                lptr, lshape = g["logits"]
                if int(lshape[1]) != self.C:
                    raise InputError(f"the glance graph gives {lshape[1]} logits but the heads {self.C} classes")
                ops.cuda_softmax_stats(lptr, n, self.C, self.slot(0), self.slot(0) + n * F32,
                                       logits_out=self.lg(0) if self.trace else None, stream=st)
        return self._after_heads()

    def next(self, f: Dict[str, Any]) -> Optional[int]:
        """The classifier step of a focus backbone's outputs; the next patches, or None."""
        from .. import ops

        place, heads, st, n, t, F = self.place, self.heads, self.st, self.n, self.t, self.F
        self.state = f["policy_state"][0]
        with place.stage("heads"):
            if self.gru:
                h_new = place.other("hcls", self.h_cls, self.N * self.Hc * F32)
                heads.cls.step_device(f["feature"][0], self.h_cls, h_new, n, self.lg(t), self.slot(t),
                                      self.slot(t) + n * F32, stream=st)
                self.h_cls = h_new
            else:
                ops.cuda_copy(self.feats + t * n * F * F32, f["feature"][0], n * F * F32, st)
                heads.cls.step_device(self.feats, self.T, n, F, t + 1, self.lg(t), self.slot(t),
                                      self.slot(t) + n * F32, layout="tnf", stream=st)
        return self._after_heads()

    def _after_heads(self) -> Optional[int]:
        """Exit test of step t (not in trace mode), then the policy and crop of step t + 1."""
        if not self._advance():
            return None
        from .. import ops

        place, st, n, t = self.place, self.st, self.n, self.t
        coords = self.slot(t) + 2 * n * F32
        with place.stage("policy"):
            h_new = place.other("hpol", self.h_pol, self.N * self.Hp * F32)
            action = place.buf("action", 2 * n * F32).ptr  # no scratch memory per step
            self.heads.actor.step_device(self.state, self.h_pol, h_new, n, action, coords, self.S, self.P, stream=st)
            self.h_pol = h_new
        with place.stage("crop"):
            ops.cuda_crop_patches(self.images, n, self.S, coords, self.patches, self.P,
                                  error_flag=self.slot(t) + 4 * n * F32, stream=st)
        return self.patches.ptr

    def _exit_test(self) -> bool:
        """Reads step t's block (the one device -> host copy of the step), records the results
        and compacts the survivors; False when no image is left to run."""
        n, t = self.n, self.t
        with self.place.host_stage("exit"):
            words = self.host_stats[:4 * n + 1]
            self.stats.copy_to_host(words, self.st, offset=t * self.slot_words * F32)
            mp = words[:n].view(np.float32)
            _check_flag(int(words[4 * n]), t)
            self.book.record(t, mp, words[n:2 * n], words[2 * n:4 * n].reshape(n, 2))
            if t == self.T - 1:
                return False
            keep = self.book.exits(t, mp, self.thr[t])
            if keep is None:
                return True
            if keep.size == 0:
                return False
            self._compact(keep)
        return True

    def _compact(self, keep: np.ndarray) -> None:
        """Gathers the survivors' rows on the device (errors land in the next step's flag)."""
        from .. import ops

        place, st, n, N, S, F = self.place, self.st, self.n, self.N, self.S, self.F
        m, flag = int(keep.size), self.slot(self.t + 1) + 4 * int(keep.size) * F32
        self.idx.copy_from_host(keep, st)

        def gather(key: str, src: int, row_bytes: int) -> int:
            dst = place.other(key, src, N * row_bytes)
            ops.cuda_gather_rows(src, n, self.idx, dst, row_bytes, n=m, error_flag=flag, stream=st)
            return dst

        self.images = gather("img", self.images, 3 * S * S * F32)
        self.state = gather("state", self.state, self.Hs * F32)
        if self.h_pol is not None:
            self.h_pol = gather("hpol", self.h_pol, self.Hp * F32)
        if self.gru:
            self.h_cls = gather("hcls", self.h_cls, self.Hc * F32)
        else:
            dst = place.other("feats", self.feats, N * self.T * F * F32)
            for k in range(self.t + 1):
                ops.cuda_gather_rows(self.feats + k * n * F * F32, n, self.idx, dst + k * m * F * F32, F * F32, n=m,
                                     error_flag=flag, stream=st)
            self.feats = dst
        self.n = m

    def outputs(self) -> StepOutputs:
        probs_all = None
        if self.trace:
            T, N, C = self.T, self.N, self.C
            hs = self.host_stats
            with self.place.host_stage("exit"):
                self.stats.copy_to_host(hs, self.st)
                lg_host = np.empty((T, N, C), np.float32)
                self.logits.copy_to_host(lg_host, self.st)
            self.book.record_trace(hs.reshape(T, self.slot_words), N)
            probs_all = np.stack([softmax(lg_host[t]) for t in range(T)]).astype(np.float32, copy=False)
        self.place.flush_profile()
        return self.book.outputs(probs_all)
