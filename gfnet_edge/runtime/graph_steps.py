"""The device loop with each step captured as a CUDA graph (see :mod:`.graphs`).

Same contract and results as :class:`~gfnet_edge.runtime.device_place.DeviceSteps` (trace mode,
early exit, GRU or cascaded classifier, ``step0 == "backbone"``, coordinates ``-1`` after exit),
organised so that each step is one graph:

* **glance graph** (bucket ``B``): glance backbone, classifier step 0 (or the backbone's
  step-0 logits), the policy state kept;
* **focus graph** (bucket ``B``, step ``t``, previous bucket when the survivors were
  compacted): compaction of the survivors' rows, policy GRU + actor, crop, focus backbone,
  classifier step ``t``, the policy state kept.

Between two graphs the host reads the step's result block (max probability, argmax, patch
coordinates and an error flag: ``16 B + 4`` bytes, the one device -> host read of the step),
applies the exit thresholds and, when images exited, uploads the survivors' indices; the next
graph starts by gathering their rows. Images never move: the crop reads them through a row
index (``rows``), which the compaction gathers like any other state. Batches are padded to
the bucket; padded rows compute on copies of valid rows and are never read.

Every buffer lives in a :class:`GraphWorkspace` at a fixed address. The device place
pre-processes a call's images straight into the workspace (``DevicePlace._input_buffers``);
inputs given as device pointers, later chunks of a call larger than the max batch and
prefetched float images are copied into it first (two device copies).

A run of one image with early exit goes through the workspace's loop graph instead when CUDA
conditional graph nodes are available (:mod:`.graph_loop`): the glance step graph, then one
graph whose exit tests run on the device, and a single read of the run's result at the end.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import numpy as np

from ..errors import InputError
from .types import DeviceRun, ExitBook, StepOutputs, check_step_flag as _check_flag, softmax
from .graph_loop import ConditionalLoop, ConditionalMode, keep_graphs, mode_from_env
from .graphs import Capture, GraphCache, bucket_for

if TYPE_CHECKING:  # pragma: no cover
    from .device_place import DevicePlace

F32 = 4


class GraphWorkspace:
    """The fixed-address device buffers of the captured loop and the graphs captured over
    them.

    Buffers hold ``capacity`` rows (the largest bucket seen so far); growing them, or a model
    whose feature widths differ, drops every graph.

    Args:
        place: the device place (its loop context and stream).
        capture: the runner's capturer (None: plain launches, same bookkeeping).
        conditional: whether batch-1 runs use the loop graph (:class:`~.graph_loop.ConditionalMode`;
            default from ``GFNET_EDGE_CONDITIONAL_GRAPHS``).
    """

    def __init__(self, place: "DevicePlace", capture: Optional[Capture],
                 conditional: Optional[ConditionalMode] = None) -> None:
        d = place.ctx
        self.place, self.stream = place, place.stream
        self.T, self.S, self.P = d.T, d.S, d.P
        self.C = int(d.heads.cls.out_features)
        self.Hp, self.Hc = int(d.heads.pol_hidden), int(d.heads.cls_hidden)
        self.gru = d.heads.kind == "gru"
        mode = mode_from_env() if conditional is None else conditional
        if capture is not None and mode is not ConditionalMode.OFF:
            capture = keep_graphs(capture)
        self.cache = GraphCache(capture)
        #: The batch-1 loop graph (:mod:`.graph_loop`).
        self.loop = ConditionalLoop(self, mode)
        self.capacity = 0
        self.F = self.Hs = 0  # feature and policy-state widths (from the first glance run)
        self._b: Dict[str, Any] = {}

    # ----------------------------------------------------------------- buffers
    def bucket(self, n: int) -> int:
        """The padded batch a chunk of ``n`` images runs in (see :func:`~.graphs.bucket_for`)."""
        return bucket_for(n, self.place.ctx.runner.max_batch)

    def reserve(self, rows: int) -> None:
        """Buffers for at least ``rows`` rows (reallocated, and graphs dropped, when larger)."""
        if rows <= self.capacity:
            return
        self._allocate(rows, self.F, self.Hs)

    def widths(self, F: int, Hs: int) -> None:
        """The feature and policy-state widths the backbone gave (buffers follow them)."""
        if (F, Hs) != (self.F, self.Hs):
            self._allocate(self.capacity, F, Hs)

    def _allocate(self, rows: int, F: int, Hs: int) -> None:
        from .. import ops

        self.cache.clear()
        self.loop.clear()
        self.capacity, self.F, self.Hs = int(rows), int(F), int(Hs)
        T, S, P, C = self.T, self.S, self.P, self.C
        R = self.capacity
        sizes = {
            "images": R * 3 * S * S, "glance": R * 3 * P * P, "patches": R * 3 * P * P,
            "rows": R, "rows0": R, "idx": R, "stats": 4 * R + 1, "logits": R * C, "action": 2 * R,
            "state": R * max(Hs, 1), "hpol.0": R * self.Hp, "hpol.1": R * self.Hp,
            "scratch": R * max(T * max(F, 1), Hs, self.Hp, self.Hc, 1),
        }
        if self.gru:
            sizes.update({"hcls.0": R * self.Hc, "hcls.1": R * self.Hc})
        else:
            sizes["feats"] = T * R * max(F, 1)
        for name, words in sizes.items():
            nbytes = max(words, 1) * F32
            old = self._b.get(name)
            if old is not None and old.nbytes == nbytes:
                continue  # same size: kept with its contents (a width change keeps the inputs)
            self._b.pop(name, None)  # free first
            buf = ops.DeviceBuffer(nbytes)
            buf.zero(self.stream)  # padded rows read defined (finite) values
            self._b[name] = buf
            if name == "rows0":
                buf.copy_from_host(np.arange(R, dtype=np.int32), self.stream)

    def ptr(self, name: str) -> int:
        return self._b[name].ptr

    def close(self) -> None:
        """Drops the graphs, then the buffers they address."""
        self.cache.clear()
        self.loop.close()
        self._b.clear()
        self.capacity = 0


    def buffer(self, name: str):
        return self._b[name]


class GraphSteps(DeviceRun):
    """One run of the captured loop over a device chunk of ``n`` images (the
    :class:`~gfnet_edge.runtime.driver.Steps` of the device place when graphs are on).

    The driver's ``backbone`` call runs (replays) the whole step graph; ``begin`` / ``next``
    do the host side: the exit test and the survivors' indices for the next graph.
    """

    def __init__(self, place: "DevicePlace", ws: GraphWorkspace, images: int, glance: int, n: int,
                 thresholds: Optional[np.ndarray]) -> None:
        from .. import ops

        d = place.ctx
        self.place, self.ws, self.runner, self.heads, self.st = place, ws, d.runner, d.heads, place.stream
        self.T, self.S, self.P, self.step0_backbone = d.T, d.S, d.P, d.step0_backbone
        self.thr, self.trace = thresholds, thresholds is None
        self.N = self.n = n
        self.B = ws.bucket(n)
        ws.reserve(self.B)
        S, P, st = self.S, self.P, self.st
        if images != ws.ptr("images"):
            ops.cuda_copy(ws.ptr("images"), images, n * 3 * S * S * F32, st)
        if glance != ws.ptr("glance"):
            ops.cuda_copy(ws.ptr("glance"), glance, n * 3 * P * P * F32, st)
        T, N = self.T, n
        self.book = ExitBook(N, T)
        self.t = 0
        self.prev: int = 0  # bucket the survivors are gathered from at the next step (0: no compaction)
        self.host_stats = place.host_words("graph.stats", 4 * self.B + 1)  # the one read per step
        #: The loop graph when this run goes through it; ``_pending``: launched at the first focus
        #: step; ``_launched``: its result is read by the next :meth:`next`; ``_finished``: a
        #: deadline check found the run over (nothing left to stop).
        self._loop: Optional[ConditionalLoop] = ws.loop if ws.loop.wanted(self.B, self.trace) else None
        self._pending = self._launched = self._finished = False
        if self.trace:
            C = ws.C
            self.trace_stats = place.buf("trace.stats", T * (4 * self.B + 1) * F32)
            self.trace_logits = place.buf("trace.logits", T * self.B * C * F32)

    # --------------------------------------------------------------- the graphs
    def _slot(self, B: int) -> Dict[str, int]:
        s = self.ws.ptr("stats")
        return {"maxprob": s, "argmax": s + B * F32, "coords": s + 2 * B * F32, "flag": s + 4 * B * F32}

    def _glance_step(self, B: int) -> None:
        """Step 0 on bucket ``B``: glance backbone, classifier, policy state kept."""
        from .. import ops

        ws, st, heads, sl = self.ws, self.st, self.heads, self._slot(B)
        ws.buffer("stats").zero(st)
        ops.cuda_copy(ws.ptr("rows"), ws.ptr("rows0"), B * F32, st)
        g = self.runner.run_device("glance", ws.ptr("glance"), B, st)
        feature, (_, F) = g["feature"][0], g["feature"][1]
        state, (_, Hs) = g["policy_state"][0], g["policy_state"][1]
        ws.widths(int(F), int(Hs))  # allocates on the first (uncaptured) run only
        if self.gru:
            heads.cls.step_device(feature, None, ws.ptr("hcls.0"), B, ws.ptr("logits"), sl["maxprob"], sl["argmax"],
                                  stream=st)
        else:
            ops.cuda_copy(ws.ptr("feats"), feature, B * ws.F * F32, st)
        if self.step0_backbone:
            lptr, lshape = g["logits"]
            if int(lshape[1]) != ws.C:
                raise InputError(f"the glance graph gives {lshape[1]} logits but the heads {ws.C} classes")
            ops.cuda_softmax_stats(lptr, B, ws.C, sl["maxprob"], sl["argmax"], logits_out=ws.ptr("logits"), stream=st)
        if self.T > 1:
            ops.cuda_copy(ws.ptr("state"), state, B * ws.Hs * F32, st)

    def _focus_step(self, B: int, t: int, prev: int) -> None:
        """Step ``t`` on bucket ``B``: compaction from bucket ``prev`` (0: none), policy,
        crop, focus backbone, classifier, policy state kept."""
        from .. import ops

        ws, st, heads, sl = self.ws, self.st, self.heads, self._slot(B)
        F, Hs, S, P = ws.F, ws.Hs, self.S, self.P
        ws.buffer("stats").zero(st)
        if prev:
            self._compact(B, t, prev, sl["flag"])
        h_pol = None if t == 1 else ws.ptr(f"hpol.{(t - 1) % 2}")
        # The action buffer (and float32 logits below) keep the heads from allocating scratch:
        # a captured step must allocate nothing to be the body of a conditional graph node.
        heads.actor.step_device(ws.ptr("state"), h_pol, ws.ptr(f"hpol.{t % 2}"), B, ws.ptr("action"),
                                sl["coords"], S, P, stream=st)
        ops.cuda_crop_patches(ws.ptr("images"), B, S, sl["coords"], ws.ptr("patches"), P, error_flag=sl["flag"],
                              stream=st, rows=ws.ptr("rows"), image_rows=ws.capacity)
        f = self.runner.run_device("focus", ws.ptr("patches"), B, st)
        feature = f["feature"][0]
        if self.gru:
            heads.cls.step_device(feature, ws.ptr(f"hcls.{(t - 1) % 2}"), ws.ptr(f"hcls.{t % 2}"), B,
                                  ws.ptr("logits"), sl["maxprob"], sl["argmax"], stream=st)
        else:
            ops.cuda_copy(ws.ptr("feats") + t * B * F * F32, feature, B * F * F32, st)
            heads.cls.step_device(ws.ptr("feats"), self.T, B, F, t + 1, ws.ptr("logits"), sl["maxprob"],
                                  sl["argmax"], layout="tnf", stream=st)
        if t < self.T - 1:
            ops.cuda_copy(ws.ptr("state"), f["policy_state"][0], B * Hs * F32, st)

    def _compact(self, B: int, t: int, prev: int, flag: int) -> None:
        """Gathers rows ``idx[:B]`` of every state that survives step ``t - 1`` (held in
        bucket ``prev``'s layout) to the front, through the scratch buffer."""
        from .. import ops

        ws, st = self.ws, self.st
        idx, scratch = ws.buffer("idx"), ws.ptr("scratch")

        def gather(ptr: int, row_bytes: int) -> None:
            ops.cuda_gather_rows(ptr, prev, idx, scratch, row_bytes, n=B, error_flag=flag, stream=st)
            ops.cuda_copy(ptr, scratch, B * row_bytes, st)

        gather(ws.ptr("rows"), F32)
        gather(ws.ptr("state"), ws.Hs * F32)
        if t >= 2:
            gather(ws.ptr(f"hpol.{(t - 1) % 2}"), ws.Hp * F32)
        if self.gru:
            gather(ws.ptr(f"hcls.{(t - 1) % 2}"), ws.Hc * F32)
        else:
            F, feats = ws.F, ws.ptr("feats")
            for k in range(t):  # (t, prev, F) -> (t, B, F)
                ops.cuda_gather_rows(feats + k * prev * F * F32, prev, idx, scratch + k * B * F * F32, F * F32, n=B,
                                     error_flag=flag, stream=st)
            ops.cuda_copy(feats, scratch, t * B * F * F32, st)

    # ------------------------------------------------------------ Steps protocol
    @property
    def gru(self) -> bool:
        return self.ws.gru

    def backbone(self, graph: str, x: Any) -> Dict[str, Any]:
        """Runs the whole step graph of the current step (``x`` is unused: the step reads its
        inputs from the workspace)."""
        B, t, prev = self.B, self.t, self.prev
        if graph == "glance":
            self.ws.cache.run(("glance", B), lambda: self._glance_step(B))
            if self._loop is not None:
                self._prepare_loop()
        elif self._pending:
            self._pending, self._launched = False, True
            self._loop.launch(self.thr, self.st)  # type: ignore[union-attr]
        else:
            self.ws.cache.run(("focus", B, t, prev), lambda: self._focus_step(B, t, prev))
        if self.trace:
            from .. import ops

            words = 4 * B + 1
            ops.cuda_copy(self.trace_stats.ptr + t * words * F32, self.ws.ptr("stats"), words * F32, self.st)
            ops.cuda_copy(self.trace_logits.ptr + t * B * self.ws.C * F32, self.ws.ptr("logits"),
                          B * self.ws.C * F32, self.st)
        return {}

    def _prepare_loop(self) -> None:
        """Builds the loop graph if needed (after the glance ran: the step widths are known).
        Building runs the focus steps not captured yet, which overwrite the step's result
        block: the glance step graph then runs again. Falls back to the per-step loop."""
        cache = self.ws.cache
        eager = cache.eager
        if not self._loop.prepare(self):  # type: ignore[union-attr]
            self._loop = None
        if cache.eager != eager:  # also when a capture failed there: the next steps run as plain launches
            cache.run(("glance", self.B), lambda: self._glance_step(self.B))

    def begin(self, g: Dict[str, Any]) -> Optional[bool]:
        if self._loop is not None:
            self._pending = True  # the exit tests and focus steps run in the loop graph
            return True
        return self._after()

    def next(self, f: Dict[str, Any]) -> Optional[bool]:
        if self._launched:
            self._launched = False
            with self.place.host_stage("exit"):
                self._loop.read(self.st).record(self.book)  # type: ignore[union-attr]
            return None
        return self._after()

    def running(self) -> Tuple[int, int]:
        """``(next step, images running)``. Asked before a focus step when the call has a
        deadline: a run still headed for the loop graph goes step by step from here (step 0's
        exit test on the host); when it is over, ``(T, 0)``, which no deadline allows."""
        if self._pending:
            self._pending, self._loop = False, None
            if not self._advance():
                self._finished = True
                return self.T, 0
        return super().running()

    def stop(self) -> None:
        if not self._finished:
            super().stop()

    def _after(self) -> Optional[bool]:
        """Exit test of step t (not in trace mode); True when a focus step follows."""
        return True if self._advance() else None

    def _exit_test(self) -> bool:
        """Reads step t's result block, records the results and prepares the compaction of
        the survivors; False when no image is left to run."""
        n, B, t = self.n, self.B, self.t
        with self.place.host_stage("exit"):
            words = self.host_stats[:4 * B + 1]
            self.ws.buffer("stats").copy_to_host(words, self.st)
            mp = words[:n].view(np.float32)
            _check_flag(int(words[4 * B]), t)
            self.book.record(t, mp, words[B:B + n], words[2 * B:2 * B + 2 * n].reshape(n, 2))
            self.prev = 0
            if t == self.T - 1:
                return False
            keep = self.book.exits(t, mp, self.thr[t])
            if keep is None:
                return True
            m = int(keep.size)
            if m == 0:
                return False
            nb = self.ws.bucket(m)
            if nb != B or not np.array_equal(keep, np.arange(m)):
                idx = np.zeros(nb, np.int32)  # padded rows copy row 0
                idx[:m] = keep
                self.ws.buffer("idx").copy_from_host(idx, self.st)
                self.prev = B
            self.n, self.B = m, nb
        return True

    def outputs(self) -> StepOutputs:
        probs_all = None
        if self.trace:
            T, N, B, C = self.T, self.N, self.B, self.ws.C
            words = 4 * B + 1
            hs = np.empty(T * words, np.int32)
            lg = np.empty((T, B, C), np.float32)
            with self.place.host_stage("exit"):
                self.trace_stats.copy_to_host(hs, self.st)
                self.trace_logits.copy_to_host(lg, self.st)
            self.book.record_trace(hs.reshape(T, words), B)
            probs_all = np.stack([softmax(lg[t, :N]) for t in range(T)]).astype(np.float32, copy=False)
        self.place.flush_profile()
        return self.book.outputs(probs_all)

