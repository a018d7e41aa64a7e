"""Measuring a bundle's latency on this device with the real :class:`~gfnet_edge.runtime.Runtime`.

Per-step cost ``cost[k]`` is the mean wall-clock time of ``Runtime.predict`` per image when
*every* image exits at step ``k``: the runtime runs with thresholds ``2.0`` (unreachable, a
probability is at most 1) before ``k`` and ``-1e8`` (always reached) from ``k`` on, so it does
exactly the work of an image that exits at ``k`` — pre-processing of the uint8 frame, glance,
``k`` policy/crop/focus steps, heads and the exit checks.

Calibration frames are already the network's S x S input (the validation resize and centre crop
were applied when they were loaded), so they go to ``Runtime.predict`` as uint8 frames with
``cropped=True``: its ``preprocess`` stage normalises them and computes the glance in one
extension call (on a GPU after uploading the uint8 frames). The timed call thus covers the whole
path from uint8 frames. A deployment that also resizes camera frames pays that resize on top
(reported separately). The steps are measured interleaved
(``k = 0..T-1`` within each repetition) so background load affects all of them alike. The
measurement the step costs come from goes on within a time box: a step whose p99 takes in one
or two stalls of the device (calls far above its median) is timed alone until they lie beyond
it (each of its calls right after an untimed call of the step before it, as when interleaved),
then all steps interleaved up to a number of calls (:func:`measure_steps`). The
profiler's per-stage timings are collected in a separate pass (profiling adds a little overhead).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from gfnet_edge.model_desc import ModelDesc, as_desc

from .budgets import tail_quantile

#: A model description, or a manifest ``model`` entry (parsed with :func:`~gfnet_edge.model_desc.as_desc`).
ModelLike = Union[ModelDesc, Mapping[str, Any]]

#: Wall-clock seconds the timed calls of one step-latency measurement may take when they are
#: extended beyond ``repeats`` (:func:`measure_steps` ``extend_to``; ``calibrate --latency-seconds``).
EXTEND_SECONDS = 5.0

#: A timed call of a step is a *stall* when it took more than this many times the step's median
#: call: far outside the spread of a CPU- or GPU-bound step (on the 2-core EPYC VM the demo
#: model's p99 call is 1.3x its median), the mark of the device pausing (another process, a
#: clock change) while that one call ran.
STALL_FACTOR = 1.5
#: At most this many stalls among a step's calls are *lone* stalls: timing that step alone until
#: they lie outside its p99 (:func:`calls_to_outvote`) takes at most 201 calls. More are a tail
#: of the device (3 % or more of 60 calls), which the p99 keeps.
LONE_STALLS = 2
#: The percentile deadlines plan with (``gfnet_edge.runtime.deadline.DEFAULT_STAT``).
PLAN_PERCENTILE = 99.0

UNREACHABLE = 2.0
ALWAYS = -1e8

#: Clocks a calibration can time with: ``wall`` (the latency a caller sees) or ``cpu`` (CPU time
#: of the calling thread: with one thread, where ONNX Runtime and the extension run every kernel on
#: the caller, it is the latency of an otherwise idle device, unaffected by other processes' load).
CLOCKS: Dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}

#: Default minimum warm-up time (ms of wall clock) before a latency measurement. Devices need time,
#: not a number of calls, to settle (clocks ramping up, allocator and thread-pool growth): see
#: ``bench/warmup.py`` and docs/calibration.md for what it buys. trtexec's default warm-up is also 200 ms.
WARMUP_MS = 200.0


def warm_up(call: Callable[[int], Any], count: int, min_ms: float = WARMUP_MS,
            clock: Callable[[], float] = time.perf_counter) -> int:
    """Calls ``call(i)`` for ``i = 0, 1, ...``: at least ``count`` times, and until ``min_ms``
    milliseconds of ``clock`` (wall clock by default) have passed since the first call started.

    Returns:
        The number of calls made.
    """
    t0 = clock()
    i = 0
    while i < count or (clock() - t0) * 1e3 < min_ms:
        call(i)
        i += 1
    return i


@dataclass
class LatencyStats:
    """Summary of per-image latencies (milliseconds).

    Attributes:
        n: number of measurements.
        mean_ms, std_ms, p50_ms, p90_ms, p95_ms, p99_ms, min_ms: statistics; the percentiles are
            numpy's interpolated ones (:meth:`of`: step latency, which deadlines plan with), or
            those tail budgets limit (:meth:`per_image`: :func:`calibrate.budgets.tail_quantile`).
    """

    n: int
    mean_ms: float
    std_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float

    @classmethod
    def of(cls, ms: Sequence[float], percentile: Optional[Callable[[np.ndarray, float], float]] = None) -> "LatencyStats":
        """The statistics of ``ms``; ``percentile(a, q)`` (q in percent) gives the percentiles
        (default: numpy's interpolated one)."""
        a = np.asarray(ms, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no latency samples")
        pct = percentile or (lambda x, q: float(np.percentile(x, q)))
        p50, p90, p95, p99 = (pct(a, q) for q in (50, 90, 95, 99))
        return cls(int(a.size), float(a.mean()), float(a.std()), p50, p90, p95, p99, float(a.min()))

    @classmethod
    def per_image(cls, ms: Sequence[float]) -> "LatencyStats":
        """:meth:`of` with the percentiles a tail budget limits: ``p95_ms`` is the smallest of
        ``ms`` with at most 5 % of them above it (:func:`calibrate.budgets.tail_quantile`)."""
        return cls.of(ms, lambda a, q: tail_quantile([a], q / 100.0))

    def to_dict(self) -> Dict[str, float]:
        return dict(self.__dict__)


def stall_count(ms: Sequence[float]) -> int:
    """How many of ``ms`` are stalls (above :data:`STALL_FACTOR` times their median)."""
    a = np.asarray(ms, dtype=np.float64)
    return int((a > STALL_FACTOR * np.median(a)).sum())


def lone_stall(ms: Sequence[float], q: float = PLAN_PERCENTILE) -> bool:
    """True when one or two stalls (at most :data:`LONE_STALLS`) enter the ``q``-th percentile
    of ``ms``: they are its slowest calls, and too few calls were timed to put them beyond it
    (:func:`calls_to_outvote`), so more calls of the step can. More stalls are a tail of the
    device, which the percentile keeps."""
    s = stall_count(ms)
    return 0 < s <= LONE_STALLS and len(ms) < calls_to_outvote(s, q)


def calls_to_outvote(stalls: int, q: float = PLAN_PERCENTILE) -> int:
    """The fewest calls whose ``q``-th percentile (numpy's linear interpolation, position
    ``q / 100 * (n - 1)``) lies at or below the largest call that is not one of ``stalls`` slowest:
    ``stalls * 100 / (100 - q) + 1`` (101 for one stall and the p99)."""
    return int(np.ceil(stalls * 100.0 / (100.0 - q) - 1e-9)) + 1


@dataclass
class StepLatency:
    """Per-step latency at one batch size.

    Attributes:
        batch: images per ``predict`` call.
        steps: per-image stats of "every image exits at step k", k = 0..T-1.
        stages: profiler summary per exit step (``{k: {stage: {mean_ms ...}}}``), per call.
        samples: per step, every timed call's ms per image (what tail budgets are fitted with).
        retimed: per step, how many of its timed calls were timed alone, after the interleaved
            ones, because a lone stall decided its p99 (:func:`measure_steps`).
        increments: per-image stats of the timed calls of step T - 1 (every step run) cut at
            the focus steps' checks (``Runtime.time_steps``): entry 0 from the call's start to
            the first check, entry k from the check before focus step k to the next check (the
            call's end after the last step); empty when the runtime cannot time its checks.
    """

    batch: int
    steps: List[LatencyStats]
    stages: Dict[int, Dict[str, Dict[str, float]]] = field(default_factory=dict)
    samples: List[np.ndarray] = field(default_factory=list, repr=False)
    retimed: List[int] = field(default_factory=list)
    increments: List[LatencyStats] = field(default_factory=list)

    def lone_stall_steps(self) -> List[int]:
        """The steps whose p99 a lone stall still enters (:func:`lone_stall`)."""
        return [k for k, ms in enumerate(self.samples) if len(ms) and lone_stall(ms)]

    @property
    def cost(self) -> np.ndarray:
        """Cumulative per-image mean latency of steps 0..k (ms), shape (T,)."""
        return np.asarray([s.mean_ms for s in self.steps], dtype=np.float64)

    def to_dict(self) -> dict:
        return {"batch": self.batch, "cost_ms": self.cost.tolist(), "steps": [s.to_dict() for s in self.steps],
                "increments": [s.to_dict() for s in self.increments],
                "retimed_calls": list(self.retimed or [0] * len(self.steps)),
                "lone_stall_steps": self.lone_stall_steps(),
                "stages": {str(k): v for k, v in self.stages.items()}}


def stall_warning(latencies: Sequence[StepLatency], seconds: float) -> Optional[str]:
    """One line naming each step whose p99 a lone stall still enters (the calls of the time box
    ``seconds`` did not outvote it), and what to do; None when there is none."""
    parts = []
    for lat in latencies:
        for k in lat.lone_stall_steps():
            ms = lat.samples[k]
            p99, med = float(np.percentile(ms, PLAN_PERCENTILE)), float(np.median(ms))
            parts.append(f"step {k} at batch {lat.batch}: {stall_count(ms)} of {len(ms)} calls over "
                         f"{STALL_FACTOR:g}x their median, p99 {p99:.3f} ms = {p99 / med:.1f}x the median")
    if not parts:
        return None
    return ("a lone stall of the device is in the step latency's p99 (" + "; ".join(parts) + "): deadlines stop "
            "before those steps earlier than needed; calibrate on an idle device or allow more calls with "
            f"--latency-seconds (more than {seconds:g})")


def forced_exit_thresholds(steps: int, k: int) -> List[float]:
    """Thresholds under which every image exits exactly at step ``k``."""
    if not 0 <= k < steps:
        raise ValueError(f"step {k} out of range for {steps} steps")
    return [UNREACHABLE] * k + [ALWAYS] * (steps - k)


@contextmanager
def using_thresholds(rt, thresholds: Sequence[float]) -> Iterator[None]:
    """Temporarily runs ``rt`` with the given thresholds, restored when the block ends, unless
    the block closed ``rt`` (a closed Runtime has nothing to restore). Thresholds that were a
    budget's come back as that budget's (:meth:`~gfnet_edge.runtime.Runtime.set_budget`), so its
    calls still check the settings the budget was calibrated with. An error raised in the block
    is the one the caller sees: a restore that fails then is left out."""
    old, budget = rt.thresholds, getattr(rt, "_thresholds_budget", None)

    def restore() -> None:
        if budget is not None:
            rt.set_budget(budget)
        else:
            rt.thresholds = old

    rt.thresholds = [float(t) for t in thresholds]
    try:
        yield
    except BaseException:
        try:
            restore()
        except Exception:  # e.g. the block closed rt: its own error says what went wrong
            pass
        raise
    if not getattr(rt, "_closed", False):
        restore()


def check_frames(model: ModelLike, frames: np.ndarray) -> int:
    """S, after checking that ``frames`` are uint8 (N, S, S, 3).

    Raises:
        ValueError: they are not.
    """
    S = as_desc(model).image_size
    if frames.ndim != 4 or frames.shape[1:] != (S, S, 3) or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (N, {S}, {S}, 3), got {frames.dtype} {frames.shape}")
    return S


def prepare_frames(model: ModelLike, frames: np.ndarray) -> np.ndarray:
    """Normalised float32 (N, 3, S, S) of uint8 S x S frames (no resize, no crop)."""
    from gfnet_edge import ops

    model = as_desc(model)
    check_frames(model, frames)
    return ops.normalise_frames(frames, model.mean, model.std)


def predict_frames(rt, frames: np.ndarray, trace: bool = False):
    """A timed call: ``rt.predict`` (``rt.trace`` with ``trace``) of uint8 (N, S, S, 3) frames
    already resized and centre-cropped (``cropped=True``: the runtime only normalises them, and
    refuses frames of another size or dtype)."""
    return rt.trace(frames, cropped=True) if trace else rt.predict(frames, cropped=True)


def _batch_at(frames: np.ndarray, batch: int, start: int) -> np.ndarray:
    """``batch`` frames from index ``start`` on, cycling."""
    n = len(frames)
    return frames[[(start + b) % n for b in range(batch)]]


def _batches(frames: np.ndarray, batch: int, count: int, start: int = 0) -> Iterator[np.ndarray]:
    for i in range(count):
        yield _batch_at(frames, batch, start + i * batch)


def time_predict(rt, batch_frames: np.ndarray, clock: Callable[[], float] = time.perf_counter) -> float:
    """Milliseconds per image of one ``predict`` call (normalisation included)."""
    t0 = clock()
    predict_frames(rt, batch_frames)
    return (clock() - t0) * 1e3 / len(batch_frames)


def measure_steps(rt, frames: np.ndarray, batch: int = 1, repeats: int = 60, warmup: int = 5,
                  stage_calls: int = 20, progress=None, clock: Callable[[], float] = time.perf_counter,
                  warmup_ms: float = WARMUP_MS, extend_to: int = 0,
                  extend_seconds: float = EXTEND_SECONDS, retime_stalls: bool = True,
                  timer: Callable[[], float] = time.perf_counter) -> StepLatency:
    """Measures per-step latency of ``rt`` (see the module docstring).

    Args:
        rt: an open Runtime (its thresholds are restored afterwards).
        frames: uint8 (N, S, S, 3) frames cycled through.
        batch: images per call.
        repeats: timed calls per step.
        extend_to: more timed calls per step, up to this many in all, while the timed calls
            (all steps) have taken under ``extend_seconds`` of wall-clock time and one more
            repetition is expected to fit: cheap steps get a tail percentile that a single
            slow call does not decide (the p99 of 60 calls is about their slowest).
        retime_stalls: with ``extend_to`` > 0, a step whose p99 takes in a lone stall
            (:func:`lone_stall`: one or two calls above 1.5x its median) is first timed alone
            (several such steps one after the other, the earliest first), within the same time
            box, until the stalls lie beyond its p99 (:func:`calls_to_outvote`: 101 calls for one
            stall) or turn out to be a tail; :attr:`StepLatency.retimed` counts those calls. Each
            follows an untimed call of the step before it (step T - 1 before step 0), the call
            that precedes it when interleaved: back-to-back calls of one step run with warmer
            caches (``bench/step_alone.py``).
        warmup: untimed calls per step first (steps interleaved).
        warmup_ms: and untimed calls until this much wall-clock time has passed (:func:`warm_up`).
        stage_calls: profiled calls per step for the stage breakdown (0: none).
        progress: optional callable ``progress(n)`` called after each call (a tqdm ``update``).
        clock: the timer of the calls (:data:`CLOCKS`); the stage breakdown is always wall-clock.
        timer: the wall clock of the time box (seconds).

    Returns:
        The :class:`StepLatency`.
    """
    T = rt.model.steps
    thr = [forced_exit_thresholds(T, k) for k in range(T)]
    was = rt.profiler.enabled
    rt.profiler.enabled = False
    samples: List[List[float]] = [[] for _ in range(T)]
    wall: List[List[float]] = [[] for _ in range(T)]  # seconds of each timed call, for the time box
    retimed = [0] * T
    incs: List[List[float]] = []  # per timed call of step T - 1: ms per image between its step checks
    checks = hasattr(rt, "time_steps")
    try:
        def untimed(i: int) -> None:
            k = i % T
            with using_thresholds(rt, thr[k]):
                time_predict(rt, _batch_at(frames, batch, k + (i // T) * batch))
            if progress and i < warmup * T:
                progress(1)

        def timed(k: int, b: np.ndarray) -> None:
            w0 = timer()
            with using_thresholds(rt, thr[k]):
                if checks and k == T - 1:  # every step runs: also timed at each focus step's check
                    t0 = clock()
                    _, marks = rt.time_steps(b, cropped=True, clock=clock)
                    samples[k].append((clock() - t0) * 1e3 / len(b))
                    if len(marks) == T:
                        incs.append([(m - p) / len(b) for m, p in zip(marks, [0.0] + marks[:-1])])
                else:
                    samples[k].append(time_predict(rt, b, clock))
            wall[k].append(timer() - w0)

        def fits(steps: Sequence[int]) -> bool:  # one more call of each of ``steps`` within the time box
            return timer() - t0 + sum(float(np.median(wall[k])) for k in steps) <= extend_seconds

        warm_up(untimed, warmup * T, warmup_ms)
        t0 = timer()
        for rep in range(repeats):
            b = _batch_at(frames, batch, rep * batch)
            for k in range(T):
                timed(k, b)
                if progress:
                    progress(1)
        rep, alone = repeats, 0
        while extend_to > 0 and repeats > 0:
            # the earliest step a lone stall decides first, until it no longer does: a deadline
            # that stops before step k never runs the steps after it
            lone = next((k for k in range(T) if lone_stall(samples[k])), None) if retime_stalls else None
            if lone is not None:
                # each call after one of the step before it, untimed: the call that precedes it
                # when interleaved, so the caches hold what they held then (back to back, the
                # glance step measured about 0.8x its interleaved p50: bench/step_alone.py)
                before = (lone - 1) % T
                if not fits([lone, before]):
                    break
                b = _batch_at(frames, batch, alone * batch)
                with using_thresholds(rt, thr[before]):
                    predict_frames(rt, b)
                timed(lone, b)
                retimed[lone] += 1
                alone += 1
            elif rep < extend_to and fits(range(T)):
                b = _batch_at(frames, batch, rep * batch)
                for k in range(T):
                    timed(k, b)
                rep += 1
            else:
                break
        stages: Dict[int, Dict[str, Dict[str, float]]] = {}
        if stage_calls:
            rt.profiler.enabled = True
            for k in range(T):
                rt.profiler.reset()
                with using_thresholds(rt, thr[k]):
                    for b in _batches(frames, batch, stage_calls, start=k):
                        predict_frames(rt, b)
                        if progress:
                            progress(1)
                stages[k] = dict(rt.profiler.summary())
            rt.profiler.reset()
    finally:
        rt.profiler.enabled = was
    return StepLatency(batch, [LatencyStats.of(s) for s in samples], stages, [np.asarray(s) for s in samples],
                       retimed, [LatencyStats.of(col) for col in np.asarray(incs).T] if incs else [])


@dataclass
class CallRun:
    """One timed pass of the runtime over a set of frames.

    Attributes:
        stats: per-image latency summary (:meth:`LatencyStats.per_image`: its percentiles are
            those tail budgets limit).
        ms: per-image latency of each frame (a batch's time is shared by its images).
        classes, exit_step: runtime outputs (N,).
        coords: patch top-left per focus step (T-1, N, 2), -1 after exit.
    """

    stats: LatencyStats
    ms: np.ndarray
    classes: np.ndarray
    exit_step: np.ndarray
    coords: np.ndarray


def measure_calls(rt, frames: np.ndarray, thresholds: Sequence[float], batch: int = 1, warmup: int = 5,
                  progress=None, clock: Callable[[], float] = time.perf_counter,
                  warmup_ms: float = WARMUP_MS) -> CallRun:
    """Runs ``rt`` with ``thresholds`` over every frame once, timing each call.

    Args:
        rt: an open Runtime.
        frames: uint8 (N, S, S, 3).
        thresholds: per-step thresholds to use.
        batch: images per call (the last call may be smaller).
        warmup: untimed calls first (on the first frames).
        warmup_ms: and untimed calls until this much wall-clock time has passed (:func:`warm_up`).
        progress: optional ``progress(n)`` callable.
        clock: the timer (:data:`CLOCKS`).
    """
    was = rt.profiler.enabled
    rt.profiler.enabled = False
    ms: List[float] = []
    classes, exits, coords = [], [], []
    try:
        with using_thresholds(rt, thresholds):
            warm_up(lambda i: predict_frames(rt, _batch_at(frames, batch, i * batch)), warmup, warmup_ms)
            for i in range(0, len(frames), batch):
                chunk = frames[i:i + batch]
                t0 = clock()
                pr = predict_frames(rt, chunk)
                dt = (clock() - t0) * 1e3
                ms.extend([dt / len(chunk)] * len(chunk))
                classes.append(pr.classes)
                exits.append(pr.exit_step)
                coords.append(pr.coords)
                if progress:
                    progress(len(chunk))
    finally:
        rt.profiler.enabled = was
    return CallRun(LatencyStats.per_image(ms), np.asarray(ms), np.concatenate(classes), np.concatenate(exits),
                   np.concatenate(coords, axis=1))


def camera_resize_ms(model: ModelLike, size: tuple = (480, 640), repeats: int = 30) -> float:
    """Mean ms to resize + centre-crop + normalise one ``size`` uint8 camera frame (``ops.preprocess``)."""
    from gfnet_edge import ops

    model = as_desc(model)
    S = model.image_size
    frame = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    args = dict(crop_pct=model.crop_pct, interpolation=model.dataset_interpolation, mean=model.mean, std=model.std)
    ops.preprocess([frame], S, **args)
    t0 = time.perf_counter()
    for _ in range(repeats):
        ops.preprocess([frame], S, **args)
    return (time.perf_counter() - t0) * 1e3 / repeats


#: CPU flags (``/proc/cpuinfo``) that change what ONNX Runtime and the extension run: wider
#: vectors and the INT8 dot-product instructions (VNNI on x86, dotprod on Arm).
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "asimd", "asimddp", "i8mm")


def timed_on(device: Dict[str, object], gpu: bool) -> str:
    """What a calibration's latencies were measured on, in words: the GPU (and its host CPU) when
    the runtime runs its backbones there (TensorRT, torch on CUDA) and
    :func:`device_description` found one, else the CPU."""
    if gpu and device.get("gpu"):
        return f"{device['gpu']} (host {device['cpu']})"
    return str(device["cpu"])


def device_description() -> Dict[str, object]:
    """CPU model and speed-relevant flags, core count and platform of this machine (for the
    report and manifest)."""
    import os
    import platform

    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    have = set((fields.get("flags") or fields.get("Features") or "").split())
    flags = [x for x in SPEED_FLAGS if x in have]
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    out: Dict[str, object] = {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "platform": platform.platform(),
                              "python": platform.python_version(), "load_average": load}
    try:  # the GPU too, when the extension sees one (TensorRT / CUDA runs are timed on it)
        from gfnet_edge import ops

        if ops.cuda_device_count() > 0:
            props = ops.cuda_device_properties(0)
            out["gpu"] = props["name"]
            out["compute_capability"] = f"{props['major']}.{props['minor']}"
    except Exception:  # no extension / no driver: a CPU-only description
        pass
    return out
