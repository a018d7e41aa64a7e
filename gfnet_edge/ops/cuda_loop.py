"""The batch-1 loop graph on CUDA conditional nodes (``_C.cuda.LoopGraph``) and its exit rule.

The exit rule and the exit step are written once in ``csrc/common/exit_rule.h`` and compiled
for the device (the loop graph's exit kernel) and the host; the host versions are bound here in
every build so that tests compare them with the Python loop's rule
(:meth:`gfnet_edge.runtime.types.ExitBook.exits`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ._ext import _C
from .cuda import device_pointer, stream_handle

#: Words (int32) of a step's result block at batch 1: max probability (float32 bits), argmax,
#: patch row, patch column, error flag.
STEP_BLOCK_WORDS = 5


def exits_at(maxprob: np.ndarray, threshold: float) -> np.ndarray:
    """The device loop's exit rule on the host: ``maxprob >= threshold`` in float32 (a NaN on
    either side never exits), per element of a 1-D float32 array."""
    return _C.cuda.exits_at(np.ascontiguousarray(maxprob, np.float32), float(threshold))


@functools.lru_cache(maxsize=None)  # read back after every batch-1 loop run
def loop_result_words(steps: int) -> int:
    """Words (int32) of the loop graph's result block for a model of ``steps`` steps."""
    return int(_C.cuda.loop_result_words(int(steps)))


def loop_exit_step(stats: np.ndarray, thresholds: np.ndarray, result: np.ndarray, t: int, steps: int) -> bool:
    """The loop graph's exit step ``t`` run on the host: records step ``t``'s block ``stats``
    (int32, :data:`STEP_BLOCK_WORDS`) in ``result`` (int32, :func:`loop_result_words`) and
    returns True when step ``t + 1`` runs. The arrays must be C-contiguous (``result`` is
    written in place)."""
    return bool(_C.cuda.loop_exit_step(stats, thresholds, result, int(t), int(steps)))


@dataclass(frozen=True)
class ConditionalSupport:
    """Whether CUDA conditional graph nodes can be used in this process.

    Attributes:
        compiled: the extension was built with a CUDA toolkit >= 12.4.
        driver, runtime: ``cudaDriverGetVersion`` / ``cudaRuntimeGetVersion`` (e.g. 12040; 0
            when unknown).
        error: why they cannot be used ("" when they can).
    """

    compiled: bool
    driver: int
    runtime: int
    error: str

    @property
    def usable(self) -> bool:
        return not self.error


def conditional_support() -> ConditionalSupport:
    """Checks the build, the driver and runtime versions and instantiates a probe graph (once
    per process; never raises)."""
    compiled, driver, runtime, error = _C.cuda.conditional_support()
    return ConditionalSupport(bool(compiled), int(driver), int(runtime), str(error))


class CudaLoopGraph:
    """Steps 0..T-1 of a batch-1 run after the glance step graph: the exit test of each step on
    the device, and each focus step in an IF conditional node the previous exit test sets.

    Args:
        focus: the captured focus step graphs of steps 1..T-1 (``cudaGraph_t`` handles; cloned
            into this graph).
        stats: the steps' result block (device, :data:`STEP_BLOCK_WORDS` words).
        thresholds: device float32 (T,) exit thresholds, read at every launch.
        result: device int32 result block (:func:`loop_result_words` words), written by every
            launch.

    Raises:
        RuntimeError: conditional nodes unavailable, or the graph does not instantiate.
    """

    def __init__(self, focus: Sequence[int], stats: Any, thresholds: Any, result: Any) -> None:
        self._g = _C.cuda.LoopGraph([int(g) for g in focus], device_pointer(stats, "stats"),
                                    device_pointer(thresholds, "thresholds"), device_pointer(result, "result"))

    def launch(self, stream: Any) -> None:
        """Enqueues one run on ``stream``."""
        self._g.launch(stream_handle(stream))

    @property
    def steps(self) -> int:
        return int(self._g.steps)
