"""Batch-1 runs of the captured device loop with no device -> host read per step, on CUDA
conditional graph nodes (CUDA 12.4+).

The per-step captured loop (:mod:`.graph_steps`) reads each step's result block on the host,
applies the exit threshold there and launches the next step's graph: at batch 1 that read and
its synchronisation are most of the time spent outside the backbones. Here, for a run of one
image (bucket 1, early exit, no trace), the glance step graph is followed by one *loop graph*
(:class:`gfnet_edge.ops.cuda_loop.CudaLoopGraph`)::

    exit(0) -> IF { focus(1) -> exit(1) -> IF { focus(2) -> exit(2) -> ... } }

where ``focus(t)`` is the already captured focus step graph (a child graph node) and
``exit(t)`` a one-thread kernel that applies step ``t``'s threshold on the device (the rule of
``csrc/common/exit_rule.h``, the host loop's ``maxprob >= threshold``), records the step's
class, probability and patch in a device result block and sets the next IF node's condition.
The thresholds live in a device buffer, so a new budget needs no new graph; the result block is
read once, at the end of the run.

Availability: the extension must be built with CUDA >= 12.4, the driver and runtime must be
12.4 or newer, a probe graph must instantiate (:func:`gfnet_edge.ops.cuda_loop.
conditional_support`), the runner's capture must keep its CUDA graphs (the extension's stream
capture; torch's with ``keep_graph=True``) and the loop graph must
instantiate. Otherwise batch-1 runs use the per-step captured loop, with the reason logged once
on the ``gfnet_edge`` logger. The environment variable ``GFNET_EDGE_CONDITIONAL_GRAPHS``
(``auto``, the default; ``on`` / ``1``; ``off`` / ``0``) selects the path; ``on`` logs the
fallback as a warning.

A run with a deadline goes step by step (the host decides before each focus step): the
driver's first deadline check switches the run to the per-step path.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Tuple

import numpy as np

from ..errors import InputError
from ..ops import cuda_loop
from .backends.torch import TorchCapture
from .types import ExitBook, check_step_flag

if TYPE_CHECKING:  # pragma: no cover
    from .graph_steps import GraphSteps, GraphWorkspace

logger = logging.getLogger("gfnet_edge")

#: The environment variable that selects the batch-1 path (:class:`ConditionalMode`).
ENV_VAR = "GFNET_EDGE_CONDITIONAL_GRAPHS"


class ConditionalMode(Enum):
    """Whether batch-1 runs use the loop graph: when available (``auto``), required with a
    warning when not (``on``), or never (``off``)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"

    @classmethod
    def parse(cls, value: Any) -> "ConditionalMode":
        """A mode from a :class:`ConditionalMode`, a bool, or ``auto`` / ``on`` / ``1`` /
        ``true`` / ``off`` / ``0`` / ``false`` (any case). Raises InputError otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            return cls.ON if value else cls.OFF
        mode = _WORDS.get(str(value).strip().lower())
        if mode is None:
            raise InputError(f"{ENV_VAR} must be auto, on (1) or off (0), got {value!r}")
        return mode


_WORDS = {"auto": ConditionalMode.AUTO, "on": ConditionalMode.ON, "1": ConditionalMode.ON,
          "true": ConditionalMode.ON, "off": ConditionalMode.OFF, "0": ConditionalMode.OFF,
          "false": ConditionalMode.OFF}


def mode_from_env(environ: Optional[Mapping[str, str]] = None) -> ConditionalMode:
    """The mode :data:`ENV_VAR` selects (``auto`` when unset)."""
    env = os.environ if environ is None else environ
    return ConditionalMode.parse(env.get(ENV_VAR, "auto"))


@dataclass(frozen=True)
class Decision:
    """Whether batch-1 runs may use the loop graph, and why not (``reason``, "" when they may)."""

    use: bool
    reason: str


def decide(mode: ConditionalMode,
           support: Optional[Callable[[], cuda_loop.ConditionalSupport]] = None) -> Decision:
    """The path a mode and the conditional-node support (default: this process's,
    :func:`~gfnet_edge.ops.cuda_loop.conditional_support`) give; the support is only probed
    when the mode is not ``off``."""
    if mode is ConditionalMode.OFF:
        return Decision(False, f"switched off ({ENV_VAR}=off)")
    s = (support or cuda_loop.conditional_support)()
    if not s.usable:
        return Decision(False, s.error)
    return Decision(True, "")


# ------------------------------------------------------------------------- result block
#: Word offsets of the result block (``csrc/common/exit_rule.h``, ``LoopResultWord``).
EXIT_STEP, PREDICTION, CONFIDENCE, FLAG_STEP, COORDS = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class LoopResult:
    """A batch-1 run as the loop graph's result block gives it.

    Attributes:
        exit_step: the last step run.
        prediction, confidence: argmax and max probability at that step.
        flag_step: the step whose error flag was set (-1: none).
        coords: (T - 1, 2) patch coordinates per focus step, -1 for steps not run.
    """

    exit_step: int
    prediction: int
    confidence: float
    flag_step: int
    coords: np.ndarray

    @classmethod
    def decode(cls, words: np.ndarray, steps: int) -> "LoopResult":
        """The result block (int32, :func:`~gfnet_edge.ops.cuda_loop.loop_result_words`) of a
        model of ``steps`` steps."""
        words = np.asarray(words)
        n = cuda_loop.loop_result_words(steps)
        if words.dtype != np.int32 or words.shape != (n,):
            raise ValueError(f"a result block of {steps} steps is int32 ({n},), got {words.dtype} {words.shape}")
        return cls(int(words[EXIT_STEP]), int(words[PREDICTION]),
                   float(words[CONFIDENCE:CONFIDENCE + 1].view(np.float32)[0]), int(words[FLAG_STEP]),
                   words[COORDS:].reshape(steps - 1, 2).copy())

    def record(self, book: ExitBook) -> None:
        """Writes the run into ``book`` (one image); raises like the per-step loop when a step's
        error flag was set."""
        if self.flag_step >= 0:
            check_step_flag(1, self.flag_step)
        book.prediction[0], book.confidence[0], book.exit_step[0] = self.prediction, self.confidence, self.exit_step
        book.coords[:, 0] = self.coords


# ----------------------------------------------------------------------------- capture
def child_graph(replay: Any) -> Optional[Any]:
    """The CUDA graph a replay launches, for adding it as a child graph node
    (``replay.cuda_graph``), or None when its capture did not keep it."""
    return getattr(replay, "cuda_graph", None)


def keep_graphs(capture: Any) -> Any:
    """The capturer to use when the loop graph may be built: one whose replays carry their
    CUDA graph (:func:`child_graph`). torch's capture is replaced by one with ``keep_graph``;
    the extension's keeps its graphs already."""
    if isinstance(capture, TorchCapture) and not capture.keep_graph:
        kept = TorchCapture(capture.runner, capture.stream, keep_graph=True)
        kept.pool = capture.pool
        return kept
    return capture


# -------------------------------------------------------------------------- the loop
class ConditionalLoop:
    """The batch-1 loop graph of one :class:`~gfnet_edge.runtime.graph_steps.GraphWorkspace`:
    built over the workspace's bucket-1 focus step graphs, its threshold and result buffers,
    and the decision whether it is used.

    Args:
        ws: the workspace (its graph cache, buffers and sizes).
        mode: :class:`ConditionalMode` (default: from :data:`ENV_VAR`).
    """

    def __init__(self, ws: "GraphWorkspace", mode: Optional[ConditionalMode] = None) -> None:
        self.ws = ws
        self.mode = mode_from_env() if mode is None else mode
        #: Why batch-1 runs go step by step (None: not decided yet, or the loop graph is used).
        self.disabled: Optional[str] = None
        self._decided = False
        self.graph: Any = None
        self._replays: Optional[Tuple[Any, ...]] = None
        self._thr: Any = None
        self._result: Any = None
        self._thr_bytes: Optional[bytes] = None
        self._host = np.zeros(cuda_loop.loop_result_words(max(ws.T, 1)), np.int32)
        self.builds = self.launches = 0

    def wanted(self, rows: int, trace: bool) -> bool:
        """True when a run of bucket ``rows`` goes through the loop graph (deciding once)."""
        if rows != 1 or trace or self.ws.T < 2 or not self.ws.cache.active:
            return False
        if not self._decided:
            self._decided = True
            d = decide(self.mode)
            if not d.use:
                self._fail(d.reason, expected=True)
        return self.disabled is None

    def _fail(self, reason: str, expected: bool = False) -> None:
        self.disabled, self.graph, self._replays = reason, None, None
        if self.mode is ConditionalMode.OFF:
            return  # asked for: nothing to report
        level = logging.INFO if expected and self.mode is ConditionalMode.AUTO else logging.WARNING
        logger.log(level, "batch-1 runs of the device loop go step by step (one read per step): the loop graph on "
                          "conditional CUDA graph nodes is unavailable (%s)", reason)

    def prepare(self, steps: "GraphSteps") -> bool:
        """Captures the bucket-1 focus step graphs not captured yet (running them once, as the
        cache does before a capture) and builds the loop graph over them when they changed.
        False, with the reason logged, when it cannot be built."""
        ws = self.ws
        keys = [("focus", 1, t, 0) for t in range(1, ws.T)]
        for t, key in enumerate(keys, start=1):
            if key not in ws.cache.graphs:
                ws.cache.run(key, lambda t=t: steps._focus_step(1, t, 0))
        if not ws.cache.active:
            return False  # the capture failed (the cache logged why)
        replays = tuple(ws.cache.graphs[k] for k in keys)
        if self.graph is not None and self._replays == replays:
            return True
        handles = [child_graph(r) for r in replays]
        if any(h is None for h in handles):
            self._fail(f"the {getattr(ws.cache.capture, 'name', 'runner')} capture does not keep its CUDA graphs")
            return False
        from .. import ops

        if self._thr is None:
            self._thr = ops.DeviceBuffer(4 * ws.T)
            self._result = ops.DeviceBuffer(4 * self._host.size)
            self._host = ops.pinned_empty(self._host.shape, np.int32)  # the run's one read: direct DMA
        try:
            self.graph = cuda_loop.CudaLoopGraph(handles, ws.ptr("stats"), self._thr, self._result)
        except Exception as exc:  # noqa: BLE001 -- any build failure falls back to the per-step loop
            self._fail(f"{type(exc).__name__}: {exc}".splitlines()[0])
            return False
        self._replays, self._thr_bytes = replays, None
        self.builds += 1
        return True

    def launch(self, thresholds: np.ndarray, stream: Any) -> None:
        """Enqueues the run after the glance step graph (thresholds uploaded when they changed)."""
        thr = np.ascontiguousarray(thresholds, np.float32)
        key = thr.tobytes()
        if key != self._thr_bytes:
            self._thr.copy_from_host(thr, stream)
            self._thr_bytes = key
        self.graph.launch(stream)
        self.launches += 1

    def read(self, stream: Any) -> LoopResult:
        """The run's result block (the one device -> host read of the run; waits for it)."""
        self._result.copy_to_host(self._host, stream)
        return LoopResult.decode(self._host, self.ws.T)

    def clear(self) -> None:
        """Drops the loop graph (the buffers its steps address are about to be reallocated)."""
        self.graph, self._replays = None, None

    def close(self) -> None:
        """Drops the loop graph and frees its threshold and result buffers."""
        self.clear()
        self._thr = self._result = None
        self._thr_bytes = None
        self._host = np.zeros(self._host.shape, np.int32)  # lets the page-locked one go
