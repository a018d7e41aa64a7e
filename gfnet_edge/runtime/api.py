"""``gfnet_edge.Runtime``: classify images with a bundle, with early exit (never imports torch
unless the ``torch`` backend is asked for)."""
from __future__ import annotations

import collections
import numbers
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..argtypes import MAX_THREADS
from ..bundle import Bundle, BundleError
from ..errors import InputError, UnavailableError
from ..log import logger
from ..model_desc import ModelDesc, as_desc
from .backends import RunnerRequest
from .backends import choices as backend_choices
from .backends import get as get_backend
from .deadline import Deadline, StepCosts, StepTimes, check_deadline, step_costs_key
from .chunking import (OutputBuffer, channels_hint, check_batch, check_frames_given, chunk_size, device_chunks,
                       stream_batches)
from .driver import Driver, StepOutputs
from .heads import HEAD_DTYPES, HeadSet, load_head_arrays
from .profile import Profiler
from .types import check_cropped

#: Default ``deadline_margin`` of :meth:`Runtime.predict`.
DEFAULT_MARGIN = 0.05

#: The Runtimes open in this process.
_OPEN: "weakref.WeakSet[Runtime]" = weakref.WeakSet()
#: In a forked child: the Runtimes it inherited, held until it exits. Tearing down the parent's
#: ONNX Runtime sessions in the child hangs it (their worker threads do not exist there), and
#: GPU memory, streams and engines belong to the parent's CUDA context.
_INHERITED: List["Runtime"] = []


def _hold_inherited_runtimes() -> None:
    _INHERITED.extend(_OPEN)
    _OPEN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_hold_inherited_runtimes)


@dataclass
class Predictions:
    """Per-image results of :meth:`Runtime.predict`.

    Attributes:
        classes: predicted class (N,).
        confidence: max softmax probability at the exit step (N,).
        exit_step: exit step (N,), 0 = glance.
        coords: patch top-left (row, col) per focus step (T-1, N, 2), -1 after exit.
        patch_size: P (boxes are P x P at ``coords``, in the S x S input).
        deadline_stopped: (N,) bool, images whose steps were cut short by the call's deadline
            (their answer is that of ``exit_step``, the last step they ran); None without one.
        class_names: the model's class names (the bundle's ``model.class_names``), or None;
            with them each row also has its ``label``.
        frame_sizes: (N, 2) ``(height, width)`` of each frame the runtime resized and cropped
            itself, or None (normalised images, frames given as ``cropped``); with them each
            row also has its ``frame_boxes`` (see :meth:`frame_boxes`).
        image_size, crop_pct: the model's S and resize fraction (how frames became S x S).
    """

    classes: np.ndarray
    confidence: np.ndarray
    exit_step: np.ndarray
    coords: np.ndarray
    patch_size: int
    deadline_stopped: Optional[np.ndarray] = None
    class_names: Optional[Tuple[str, ...]] = None
    frame_sizes: Optional[np.ndarray] = None
    image_size: Optional[int] = None
    crop_pct: Optional[float] = None

    def __len__(self) -> int:
        return int(self.classes.shape[0])

    def _index(self, i: int) -> int:
        """``i`` as an index of an image (negative ones count from the end), checked."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"Predictions index must be an int, got {type(i).__name__} (to_list() gives every row)")
        if not -len(self) <= int(i) < len(self):
            raise IndexError(f"image {i} out of range for {len(self)} predictions")
        return int(i)

    def boxes(self, i: int) -> List[tuple]:
        """Patch boxes ``(top, left, bottom, right)`` of image ``i`` for the focus steps it ran,
        in pixels of the S x S input the model saw (after the resize and centre crop of
        :func:`gfnet_edge.data.load_images` / ``ops.resize_crop``); :meth:`frame_boxes` gives
        them on the original frame."""
        i = self._index(i)
        P = self.patch_size
        out = []
        for t in range(int(self.exit_step[i])):
            r, c = (int(v) for v in self.coords[t, i])
            out.append((r, c, r + P, c + P))
        return out

    def frame_boxes(self, i: int, frame_size: Optional[Tuple[int, int]] = None) -> List[tuple]:
        """The :meth:`boxes` of image ``i`` in pixels of its original frame (floats; a patch of
        P input pixels covers ``P x frame / resized`` frame pixels on each axis).

        Args:
            i: the image.
            frame_size: ``(height, width)`` of the frame image ``i`` was resized and cropped
                from. Known to the runtime for the frames it resized itself; needed for frames
                given as ``cropped`` (e.g. cut by ``ops.resize_crop`` on a capture thread, or
                read by :func:`gfnet_edge.data.load_images`).
        """
        i = self._index(i)
        return self._on_frame(i, self.boxes(i), frame_size)

    def _on_frame(self, i: int, boxes: List[tuple], frame_size: Optional[Tuple[int, int]]) -> List[tuple]:
        """``boxes`` of image ``i`` mapped onto its frame (see :meth:`frame_boxes`)."""
        if frame_size is None:
            if self.frame_sizes is None:
                raise InputError(f"image {i}: the runtime did not see its frame (normalised images or cropped "
                                 "frames): give frame_size=(height, width) of the original frame")
            frame_size = self.frame_sizes[i].tolist()
        if self.image_size is None or self.crop_pct is None:
            raise InputError("these predictions do not say how frames were resized (no image_size / crop_pct)")
        try:
            h, w = frame_size
        except (TypeError, ValueError):
            raise InputError(f"frame_size must be (height, width), got {frame_size!r}") from None
        if not boxes:
            return []
        from .. import ops

        return list(map(tuple, ops.crop_geometry(h, w, self.image_size, self.crop_pct).to_frame(boxes).tolist()))

    def __getitem__(self, i: int) -> Dict[str, Any]:
        """Image ``i``'s result as a dict (``class``, ``confidence``, ``exit_step``, ``boxes``,
        and ``label`` / ``deadline_stopped`` / ``frame_boxes`` when known)."""
        i = self._index(i)
        out = {"class": int(self.classes[i]), "confidence": float(self.confidence[i]),
               "exit_step": int(self.exit_step[i]), "boxes": self.boxes(i)}
        if self.frame_sizes is not None and self.image_size is not None:
            out["frame_boxes"] = self._on_frame(i, out["boxes"], None)
        if self.class_names is not None:
            out["label"] = self.class_names[int(self.classes[i])]
        if self.deadline_stopped is not None:
            out["deadline_stopped"] = bool(self.deadline_stopped[i])
        return out

    def to_list(self) -> List[Dict[str, Any]]:
        return [self[i] for i in range(len(self))]


@dataclass
class RuntimeTrace:
    """All steps on a batch: same fields as the reference ``GFNet.trace``.

    Attributes:
        probs: (T, N, classes) float32.
        coords: (T-1, N, 2) int32.
    """

    probs: np.ndarray
    coords: np.ndarray


def _tensorrt_usable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    from .. import ops

    return ops.cuda_device_count() > 0


class Runtime:
    """Runs a bundle.

    Args:
        bundle: bundle directory (or a loaded :class:`~gfnet_edge.bundle.Bundle`).
        backend: ``auto`` (TensorRT when it and a GPU are here, else ONNX Runtime),
            ``tensorrt``, ``onnxruntime`` or ``torch`` (the bundled checkpoint in PyTorch).
        precision: graph set (``fp32``, ``int8-cpu``, ``int8-tensorrt`` ...; ``auto`` picks the
            fastest this backend has: int8-cpu on ONNX Runtime, int8 engines on TensorRT).
        budget: named budget whose thresholds decide exits (``None``: the bundle's default; a
            bundle without budgets runs every step).
        threads: CPU threads for ONNX Runtime and the extension (``None``: their defaults). The
            extension's thread pool is one per process: this sets it for every Runtime and
            ``ops`` call in the process (``ops.set_num_threads``), also after :meth:`close`.
        profile: collect per-stage timings (see :attr:`profiler`).
        verify: check artifact hashes on load.
        device: where the ``torch`` backend runs (``"cpu"`` by default, or ``"cuda"``); the
            other backends have a fixed place (TensorRT: the GPU, ONNX Runtime: the CPU).
        dla_core: TensorRT only: run the engines built for this DLA core (``build-engine
            --dla-core N``) instead of the GPU engines (``None``).
        head_dtype: weights of the GRU / Linear heads in the extension: ``"float32"`` (default;
            matches the reference to 1e-5) or ``"float16"`` (half the bytes for the
            memory-bound GRU steps, about 1e-3 relative error in the heads' outputs; on the
            demo model's 1000 test images classes, exits and patch coordinates were unchanged,
            and so was the time per image on the CPU, whose heads are small: docs/kernels.md).
        cuda_graphs: when the loop runs on the GPU, capture each step as a CUDA graph per
            batch bucket and replay it with one launch (:mod:`~gfnet_edge.runtime.graphs`;
            default). A capture failure falls back to plain launches with a logged warning.
            ``False`` launches every kernel from Python.
        max_batch: the most images converted, normalised and run at once (``None``: the
            runner's max batch, a TensorRT engine's profile, else
            :data:`~gfnet_edge.runtime.chunking.DEFAULT_MAX_BATCH`). A call with more images
            is run chunk by chunk, so host and device memory are bounded by the chunk, not by
            the call (see :mod:`~gfnet_edge.runtime.chunking`).

    The loop is :class:`~gfnet_edge.runtime.driver.Driver`. When the runner can execute on
    device buffers (TensorRT; torch with ``device="cuda"``) its buffers live on the GPU
    (heads and pre-processing there too, one small read per step), otherwise in numpy arrays;
    :attr:`device_loop` says which.

    Calls are serialised with a lock, so one Runtime may be shared by threads; waiting calls
    run in the order they were made (:class:`FifoLock`), so a thread calling in a loop cannot
    keep another waiting for more than one call each of the other threads.

    A Runtime belongs to the process that opened it: in a process forked from that one every
    call raises InputError (open a Runtime in each process after the fork); there,
    :meth:`close` and the garbage collector release nothing of what it holds (the parent's
    sessions, engines and GPU memory).
    """

    def __init__(self, bundle: Union[str, Path, Bundle], backend: str = "auto", precision: str = "auto",
                 budget: Optional[str] = None, threads: Optional[int] = None, profile: bool = False,
                 verify: bool = True, device: Optional[str] = None, dla_core: Optional[int] = None,
                 head_dtype: str = "float32", cuda_graphs: bool = True, max_batch: Optional[int] = None) -> None:
        max_batch = check_batch(max_batch, "max_batch")
        for name, flag in (("profile", profile), ("verify", verify), ("cuda_graphs", cuda_graphs)):
            _check_flag(name, flag)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or not 1 <= threads <= MAX_THREADS):
            raise InputError(f"threads must be an int from 1 to {MAX_THREADS}, got {threads!r}")
        if head_dtype not in HEAD_DTYPES:
            raise InputError(f"head_dtype must be one of {', '.join(HEAD_DTYPES)}, got {head_dtype!r}")
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle, verify=verify)
        if backend not in backend_choices():
            raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(backend_choices())}")
        if dla_core is not None and (isinstance(dla_core, bool) or not isinstance(dla_core, int) or dla_core < 0):
            raise InputError(f"dla_core must be a DLA core number >= 0, got {dla_core!r}")
        if dla_core is not None and backend in ("onnxruntime", "torch"):
            raise InputError(f"dla_core applies to TensorRT engines, not the {backend} backend")
        self.dla_core = dla_core
        if device not in (None, "cpu", "cuda"):
            raise InputError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.device = device
        self.model = self.bundle.model
        self.threads = threads
        self.profiler = Profiler(profile)
        self._lock = FifoLock()
        self._pid = os.getpid()
        if backend == "auto":
            backend = self._auto_backend(precision)
        self.backend = backend
        fixed = get_backend(backend).device
        if device is not None and fixed is not None and device != fixed:
            raise InputError(f"the {backend} backend runs on {fixed}; device={device!r} applies to the torch backend")
        self.runner = self._make_runner(backend, precision)
        self.precision = self.runner.precision
        from .. import ops

        if threads is not None:
            ops.set_num_threads(int(threads))
        on_gpu = bool(self.runner.supports_device)  # the loop's place follows the heads' device
        if on_gpu and ops.cuda_device_count() < 1:
            reason = "it was built without CUDA" if not ops.has_cuda_build() else ops.cuda_device_error()
            raise UnavailableError(f"the {backend} backend runs the loop on the GPU, but gfnet_edge's extension "
                                   f"cannot use one here ({reason})")
        self.head_dtype = head_dtype
        self._closed = False
        self._released = False
        heads_path = self.bundle.heads_path
        arrays = load_head_arrays(heads_path)
        try:
            self.heads = HeadSet(arrays, self.model,
                                 device="cuda" if on_gpu else "cpu", weight_dtype=head_dtype)
        except (TypeError, ValueError) as exc:  # shapes, NaN / Inf: refused at load, not at the first call
            raise BundleError(f"{heads_path}: head weights cannot be used with this model: {exc}") from exc
        self.runner.activate()
        try:
            _check_graph_outputs(self.runner, self.model, arrays, heads_path)
            self.driver = Driver(self.model, self.runner, self.heads, self.profiler, cuda_graphs=cuda_graphs)
        except BundleError:  # names its file and problem already
            self.runner.deactivate()
            raise
        except (TypeError, ValueError) as exc:
            self.runner.deactivate()
            raise BundleError(f"{heads_path}: head weights do not fit this model: {exc}") from exc
        except BaseException:
            self.runner.deactivate()
            raise
        try:  # an unknown budget or malformed step costs: the loop's buffers and the runner are released
            self._budgets_checked: set = set()
            self.set_budget(budget)
            self.step_costs: Optional[StepCosts] = None
            self._step_costs_warning: Optional[str] = None  # logged at the first call with a deadline
            entry = (self.bundle.manifest.get("step_costs") or {}).get(step_costs_key(self.backend, self.precision))
            if entry is not None:
                self.step_costs = StepCosts.from_manifest(entry)
                if not on_gpu and "threads" in entry and entry["threads"] != threads:
                    self._step_costs_warning = (
                        f"runtime: the step costs deadlines plan with were measured with threads={entry['threads']}, "
                        f"this runtime runs with threads={threads}: deadlines may stop too early or late (calibrate "
                        f"with --threads {threads if threads else 'left out'})")
            self.max_batch = chunk_size(max_batch, self.runner.max_batch)
        except BaseException:
            self.close()
            raise
        _OPEN.add(self)
        logger.info("runtime: %s backend, %s graphs, %s loop, budget %s", self.backend, self.precision,
                    "device" if on_gpu else "host", self.budget)

    @property
    def model(self) -> ModelDesc:
        """The model description (the bundle's, unless replaced)."""
        return self._model

    @model.setter
    def model(self, model: "ModelDesc | Dict[str, Any]") -> None:
        """Replaces the description for this runtime and its loop (the bundle is left as it is);
        it is checked as a manifest's ``model`` entry is."""
        from ..manifest_schema import ManifestError, check_model

        desc = as_desc(model)
        try:
            check_model(desc.to_dict())
        except ManifestError as exc:
            raise InputError(str(exc)) from exc
        self._model = desc
        driver = self.__dict__.get("driver")
        if driver is not None:
            driver.model = self._model

    @property
    def device_loop(self) -> bool:
        """True when the loop's buffers live on the GPU, False for the host (numpy) place."""
        return self.driver.on_device

    # ------------------------------------------------------------------ setup
    def _auto_backend(self, precision: str) -> str:
        """TensorRT when it, a GPU and an engine built for them are here; else ONNX Runtime."""
        if not (_tensorrt_usable() and self.bundle.manifest.get("engines")):
            why = "TensorRT is not usable here" if not _tensorrt_usable() else "the bundle has no TensorRT engines"
            return self._onnxruntime_instead(why, warn=False)
        from .backends.tensorrt_engines import select_engine

        try:
            select_engine(self.bundle, precision, dla_core=self.dla_core)
        except InputError as exc:
            return self._onnxruntime_instead(str(exc), warn=True)
        return "tensorrt"

    def _onnxruntime_instead(self, why: str, warn: bool) -> str:
        """The automatic choice when TensorRT cannot run: ONNX Runtime (``warn``: say why), unless
        a DLA core was asked for (DLA exists only for TensorRT engines; elsewhere it would be ignored)."""
        if self.dla_core is not None:
            error = UnavailableError if not _tensorrt_usable() else InputError  # this machine, or the bundle
            raise error(f"dla_core {self.dla_core} needs TensorRT engines built for that DLA core: {why}")
        if warn:
            logger.warning("not using TensorRT: %s; running on ONNX Runtime", why)
        return "onnxruntime"

    def _make_runner(self, backend: str, precision: str):
        request = RunnerRequest(self.bundle, precision, threads=self.threads, device=self.device,
                                         dla_core=self.dla_core)
        return get_backend(backend).make_runner(request)

    def set_budget(self, budget: Optional[str]) -> None:
        """Selects the named budget whose thresholds decide the exits. A latency budget measured
        with another backend, precision, thread count (host loop), DLA core or head dtype than
        this runtime's is logged as a warning at the first call that uses it."""
        self._check_open()
        self.thresholds = self.bundle.thresholds(budget)
        self.budget = budget if budget is not None else self.bundle.manifest.get("default_budget")
        self._thresholds_budget = self.budget if self._thresholds is not None else None

    def budget_mismatch(self, budget: Optional[str] = None) -> Optional[str]:
        """How the settings a latency budget (default: the runtime's) was calibrated with differ
        from this runtime's (backend, precision, threads on the host loop, DLA core, head dtype),
        as one line; ``None`` when they agree, or for a budget without them (``macs-*`` budgets,
        which hold on any device)."""
        name = self.budget if budget is None else budget
        entry = self.bundle.budgets().get(name) if name is not None else None
        if not isinstance(entry, dict) or entry.get("unit") != "ms" or "backend" not in entry:
            return None
        here = {"backend": self.backend, "precision": self.precision, "dla_core": self.dla_core,
                "head_dtype": self.head_dtype}
        there = {"backend": entry.get("backend"), "precision": entry.get("precision"),
                 "dla_core": entry.get("dla_core"), "head_dtype": entry.get("head_dtype", "float32")}
        if not self.device_loop and "threads" in entry:  # the host loop's speed depends on its threads
            here["threads"], there["threads"] = self.threads, entry["threads"]
        keys = [k for k in here if here[k] != there[k]]
        if not keys:
            return None
        show = lambda d: ", ".join(f"{k} {d[k] if d[k] is not None else 'default'}" for k in keys)  # noqa: E731
        return (f"runtime: budget {name!r} was calibrated with {show(there)}; this runtime runs with {show(here)}: "
                f"its latency limit does not hold here (calibrate the bundle with these settings)")

    def _check_budget(self, name: Optional[str]) -> None:
        """Logs :meth:`budget_mismatch` of the budget ``name`` once per runtime."""
        if name is None or name in self._budgets_checked:
            return
        self._budgets_checked.add(name)
        line = self.budget_mismatch(name)
        if line is not None:
            logger.warning("%s", line)

    @property
    def thresholds(self) -> Optional[List[float]]:
        """The exit thresholds in use (one per step; ``None``: every image runs every step): a
        copy; assign a new list to change them (the assignment is checked)."""
        return None if self._thresholds is None else list(self._thresholds)

    @thresholds.setter
    def thresholds(self, value: Optional[Sequence[float]]) -> None:
        self._check_open()
        if value is None:
            self._thresholds = None
            self._thresholds_budget = None
            return
        T = self.model.steps
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError("a string is not a sequence of thresholds")
            thr = [float(t) for t in value]
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float range
            raise InputError(f"thresholds must be {T} finite numbers (one per step), got {value!r}") from None
        if len(thr) != T or not all(np.isfinite(t) for t in thr):
            raise InputError(f"thresholds must be {T} finite numbers (one per step), got {thr}")
        self._thresholds = thr
        self._thresholds_budget = None  # set by hand: no budget's settings apply

    def close(self) -> None:
        """Releases the backend's sessions / engines and the loop's GPU memory and graphs; the
        Runtime cannot be used afterwards (one dropped without close() is closed when its last
        reference goes). A call running in another thread finishes first, and close() returns
        once everything is released. Called from inside a call of this thread, or while this
        thread waits to make one (a signal handler, e.g. a service's shutdown handler), it
        returns at once and that call releases everything as it ends. In a process forked from
        the one that opened it, only marks it closed: what it holds belongs to the parent
        process."""
        if self.__dict__.get("_pid", os.getpid()) != os.getpid():
            self._closed = True
            return
        lock, me = self.__dict__.get("_lock"), threading.get_ident()
        if lock is None or lock.involves(me):  # opening failed before the lock; or inside (or waiting for) a call of ours
            self._closed = True
            return
        try:
            lock.acquire()
            self._closed = True
            self._release()
        finally:
            if lock.owner == me:  # no call before the store: see FifoLock
                lock.owner = None
                lock.wake()

    def __del__(self) -> None:
        # Dropped without close(): released now. The device place and its CUDA graphs refer to
        # each other, so their GPU memory and engines would otherwise wait for the cyclic
        # garbage collector.
        if self.__dict__.get("_released") is False:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - at interpreter exit what close() needs may be gone
                pass

    def _release(self) -> None:
        """Frees the loop's buffers and the runner's sessions / engines, once (lock held)."""
        if self.__dict__.get("_released", False):
            return
        _OPEN.discard(self)
        driver = self.__dict__.get("driver")
        if driver is not None:
            driver.close()
        self.runner.deactivate()
        self._released = True  # last: a release an exception cut short is done again by the next close()

    def _locked(self, call: Callable[[], Any]) -> Any:
        """Runs ``call`` holding the call lock (checked first: the process, and a call from
        inside another call of this thread, e.g. from a signal handler, which would wait for
        itself); releases the Runtime as the call ends when :meth:`close` was called during it.
        The lock is freed whatever a signal handler raises, wherever (see :class:`FifoLock`)."""
        self._check_process()
        lock, me = self._lock, threading.get_ident()
        if lock.involves(me):
            raise InputError("a Runtime cannot be called from inside a call of this Runtime on the same thread, "
                             "or while that thread waits to make one (a signal handler?): it would wait for itself")
        try:
            lock.acquire()
            try:
                return call()
            finally:
                if self._closed:
                    self._release()
        finally:
            if lock.owner == me:  # no call before the store: see FifoLock
                lock.owner = None
                lock.wake()

    def __copy__(self):
        raise TypeError("a Runtime cannot be copied: it owns sessions, engines and buffers; open another "
                        "Runtime(bundle) instead")

    def __deepcopy__(self, memo):
        self.__copy__()

    def __reduce__(self):
        raise TypeError("a Runtime cannot be pickled: open Runtime(bundle) in each process")

    def _check_process(self) -> None:
        """Raises InputError in a process forked from the one that opened this Runtime (checked
        before the call lock, which a thread of the parent may have held at the fork)."""
        pid = self.__dict__.get("_pid")
        if pid is not None and pid != os.getpid():
            raise InputError(f"this Runtime was opened in process {pid} and cannot run in process {os.getpid()} forked "
                             "from it (backend sessions, engines and GPU memory do not survive a fork): open a "
                             "Runtime in each process after the fork")

    def _check_open(self) -> None:
        self._check_process()
        if getattr(self, "_closed", False):
            raise InputError("this Runtime is closed (close() was called or its `with` block ended); "
                             "create a new Runtime")

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- inputs
    def _validate(self, inputs, cropped: bool = False) -> tuple:
        """``("images", float32 (N, 3, S, S))``, ``("frames", uint8 (N, H, W, 3) array or
        [uint8 HWC, ...])`` or ``("device", frames in GPU memory)`` (checked by the driver;
        host frames given as ``cropped`` are checked to be S x S here, device frames where
        :func:`device_chunks` parses them: once per call, before any chunk runs)."""
        from .cuda_arrays import is_device_array

        _check_flag("cropped", cropped)
        if is_device_array(inputs) or (isinstance(inputs, (list, tuple)) and inputs and is_device_array(inputs[0])):
            return "device", inputs
        S = self.model.image_size
        if isinstance(inputs, np.ndarray) and inputs.dtype == np.float32:
            if cropped:
                raise InputError("cropped=True is for uint8 frames already resized and centre-cropped; these are "
                                 "float32 images, which the runtime takes as normalised (drop cropped)")
            if inputs.ndim != 4 or inputs.shape[1:] != (3, S, S):
                raise InputError(f"normalised images must be float32 (N, 3, {S}, {S}), got {inputs.shape}")
            if inputs.shape[0] == 0:
                raise InputError(f"no images given (images of shape {inputs.shape})")
            return "images", inputs  # checked (NaN / Inf) and made contiguous chunk by chunk
        if isinstance(inputs, np.ndarray) and inputs.ndim == 4 and inputs.dtype == np.uint8 and inputs.shape[3] == 3:
            if inputs.shape[0] == 0:
                raise InputError(f"no images given (frames of shape {inputs.shape})")
            if inputs.shape[1] == 0 or inputs.shape[2] == 0:
                raise InputError(f"empty frames {inputs.shape}: a frame needs at least one pixel")
            if cropped:
                check_cropped([inputs.shape[1:3]], S)
            return "frames", inputs  # one array: no per-frame checks, no copy
        if isinstance(inputs, np.ndarray) and inputs.ndim == 4:  # a stack, of another dtype or layout
            hint = (" (convert it with .astype(np.float32))" if inputs.dtype.kind == "f" and inputs.shape[1:] == (3, S, S)
                    else " (frames are channels last: .transpose(0, 2, 3, 1))" if inputs.dtype == np.uint8
                    and inputs.shape[1] == 3 else channels_hint(inputs))
            raise InputError(f"expected uint8 frames (N, H, W, 3) or normalised float32 images (N, 3, {S}, {S}), "
                             f"got a {inputs.dtype} array {inputs.shape}{hint}")
        check_frames_given(inputs)
        frames = list(inputs) if not isinstance(inputs, np.ndarray) or inputs.ndim == 4 else [inputs]
        if not frames:
            raise InputError("no images given")
        for i, f in enumerate(frames):
            if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
                desc = f"{f.dtype} {f.shape}{channels_hint(f)}" if isinstance(f, np.ndarray) else type(f).__name__
                raise InputError(f"image {i}: expected a uint8 HWC RGB frame or float32 NCHW images, got {desc}")
            if f.size == 0:
                raise InputError(f"image {i}: empty frame {f.shape}: a frame needs at least one pixel")
        if cropped:
            check_cropped((f.shape[:2] for f in frames), S)
        return "frames", frames

    def _run(self, inputs, thresholds: Optional[Sequence[float]], deadline: Optional[Deadline] = None,
             cropped: bool = False) -> tuple:
        """Runs the driver on validated inputs, :attr:`max_batch` images at a time, into
        outputs allocated once; ``(StepOutputs, number of images, (N, 2) frame sizes or None)``
        (the sizes of the frames resized here; None for images and cropped frames). The chunks
        of a call share its deadline."""
        kind, data = self._validate(inputs, cropped)
        size = self.max_batch
        if kind == "device":
            n, chunks, sizes = device_chunks(data, size, self.model.image_size if cropped else None)
        else:
            n = len(data)
            chunks = (data[i:i + size] for i in range(0, n, size))
            if kind == "images" or cropped:  # cropped: the runtime did not see the frames they were cut from
                sizes = None
            elif isinstance(data, np.ndarray):
                sizes = np.full((n, 2), data.shape[1:3], np.int64)
            else:
                sizes = np.array([f.shape[:2] for f in data], np.int64)
        if n <= size:  # one chunk: its outputs are the call's
            return self._run_chunk(kind, next(iter(chunks)), 0, thresholds, deadline, cropped), n, sizes
        out = OutputBuffer(n)
        # on the GPU, the next chunk's upload overlaps the current chunk's steps
        prefetch = getattr(self.driver.place, "prefetch", None) if kind != "device" else None
        chunks = iter(chunks)
        chunk, k = next(chunks), 0
        while chunk is not None:
            following = next(chunks, None)
            if prefetch is not None and following is not None:
                prefetch(following)
            out.write(k * size, self._run_chunk(kind, chunk, k * size, thresholds, deadline, cropped))
            chunk, k = following, k + 1
        return out.result(), n, sizes

    def _run_chunk(self, kind: str, chunk, start: int, thresholds, deadline: Optional[Deadline] = None,
                   cropped: bool = False) -> StepOutputs:
        if kind == "images":  # the glance computed where the loop runs
            chunk = np.ascontiguousarray(chunk)
            flat = chunk.reshape(len(chunk), -1)  # one reduction each way: NaN and Inf propagate into both
            big = np.maximum(flat.max(axis=1), -flat.min(axis=1))
            bad = ~(big <= MAX_NORMALISED)
            if bad.any():
                i = int(np.argmax(bad))
                if not np.isfinite(big[i]):
                    raise InputError(f"images contain NaN or Inf (image {start + i})")
                raise InputError(f"image {start + i} holds values up to {big[i]:.3g}: normalised images ((pixel / 255 - "
                                 f"mean) / std) lie within a few units of zero, and values over {MAX_NORMALISED:g} "
                                 "overflow the network (pass uint8 frames to have them normalised)")
            return self.driver.run(chunk, None, thresholds, deadline)
        if kind == "device":
            return self.driver.run_device_frames(chunk, thresholds, deadline, cropped)
        return self.driver.run_frames(chunk, thresholds, deadline, cropped)

    def set_step_costs(self, costs: Optional[Union[StepCosts, Sequence[float]]]) -> None:
        """The per-step costs deadlines plan with: a :class:`~gfnet_edge.runtime.deadline.StepCosts`,
        per-image milliseconds of each step at batch 1 (the increment of step k), or None.
        By default they come from the bundle (``gfnet-edge calibrate`` records them for the
        backend and precision it measured)."""
        self._check_open()
        if costs is not None and not isinstance(costs, StepCosts):
            try:
                values = None if isinstance(costs, (str, bytes)) else list(costs)
            except TypeError:  # not iterable: a number, a 0-d array
                values = None
            if values is None or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in values):
                raise InputError(f"step costs must be a StepCosts or one number of ms per step, got {costs!r}")
            # StepCosts checks each with check_number: an int beyond the float range is named as such
            costs = StepCosts(tuple(values), source="set_step_costs")
        if costs is not None and costs.steps != self.model.steps:
            raise InputError(f"need a cost for each of the {self.model.steps} steps, got {costs.steps}")
        self.step_costs = costs
        self._step_costs_warning = None  # the bundle's costs (and their thread count) are not used

    def _deadline(self, deadline_ms: Optional[float], margin: float, start: float) -> Optional[Deadline]:
        if deadline_ms is None:
            return None
        if self.step_costs is None:
            check_deadline(deadline_ms, margin)  # a bad value is named before what the runtime lacks
            where = (f" --device {self.device}" if self.backend == "torch" and self.device == "cuda" else "") + (
                f" --dla-core {self.dla_core}" if self.dla_core is not None else "")  # where this runtime runs
            raise InputError(f"a deadline needs the step latencies of this device: run `gfnet-edge calibrate "
                             f"{self.bundle.root} --data IMAGES -o REPORT --backend {self.backend} --precision "
                             f"{self.precision}{where}` (IMAGES: a folder of labelled images, one subfolder a class), "
                             "or give them with Runtime.set_step_costs")
        deadline = Deadline(deadline_ms, self.step_costs, margin, start=start)  # checks the values once
        warning, self._step_costs_warning = self._step_costs_warning, None
        if warning is not None:
            logger.warning("%s", warning)
        return deadline

    # ------------------------------------------------------------------- run
    def predict(self, inputs, budget: Optional[str] = None, deadline_ms: Optional[float] = None,
                deadline_margin: float = DEFAULT_MARGIN, *, cropped: bool = False) -> Predictions:
        """Classifies images with early exit.

        Args:
            inputs: uint8 HWC RGB frames (one array, a list, or (N, H, W, 3)), pre-processed
                by the extension; or normalised float32 (N, 3, S, S). When the loop runs on the
                GPU, the frames may also be in GPU memory (any object with
                ``__cuda_array_interface__``, e.g. CuPy arrays or torch CUDA tensors; uint8,
                C-contiguous, (H, W, 3), (N, H, W, 3) or a list): they are pre-processed where
                they are, without a copy.
            budget: a named budget for this call only (default: the runtime's).
            deadline_ms: milliseconds from the start of this call (time spent waiting for a call
                of another thread sharing this Runtime counts): before each focus step, the
                images still running stop when that step is predicted to end later (from the
                step latencies ``gfnet-edge calibrate`` recorded for this backend and precision,
                :attr:`step_costs`); they keep the answer of the last step they ran and are
                marked in ``Predictions.deadline_stopped``. The glance step always runs, for
                every chunk of :attr:`max_batch` images: a deadline shorter than the
                pre-processing and glance returns that much late. A batch shares one deadline.
            deadline_margin: every predicted step cost is scaled by ``1 + deadline_margin``.
            cropped: the uint8 frames are already resized and centre-cropped to the model's
                S x S input (as :func:`gfnet_edge.data.load_images` and ``gfnet-edge predict``
                read them): the runtime only normalises them, fused with the glance (on the GPU,
                after uploading a quarter of the bytes of float32 images). Frames of another
                size are refused. ``ops.resize_crop(frames, m.image_size, m.crop_pct,
                m.dataset_interpolation)`` (``m = rt.model``) makes them from frames of any size,
                e.g. on a capture thread: the answers equal those on the original frames.
        """
        start = time.perf_counter()
        self._check_open()  # a forked child or a closed Runtime is told so before anything else
        deadline = self._deadline(deadline_ms, deadline_margin, start)  # before the lock
        return self._predict(inputs, budget, deadline, cropped)

    def time_steps(self, inputs, *, cropped: bool = False,
                   clock: Callable[[], float] = time.perf_counter) -> Tuple[Predictions, List[float]]:
        """:meth:`predict` at the runtime's budget, timed where a deadline decides: returns the
        predictions and the milliseconds from the call's start to each focus step's check (the
        point before a focus step where a deadline stops the images still running) and, last,
        to the call's end. From one check to the next is what running that step takes for a
        call a deadline may stop at the next check: ``gfnet-edge calibrate`` measures the step
        costs deadlines plan with this way, in calls that run every step (for a call of several
        chunks, the checks of every chunk in turn). ``clock``: seconds (e.g. ``time.thread_time``)."""
        probe = StepTimes(self.model.steps, clock)
        pred = self._predict(inputs, None, probe, cropped)
        return pred, probe.marks + [probe.elapsed_ms()]

    def _predict(self, inputs, budget: Optional[str], deadline, cropped: bool) -> Predictions:
        def call() -> tuple:
            t0 = time.perf_counter()
            thr = self._thresholds if budget is None else self.bundle.thresholds(budget)  # read, never written
            self._check_budget(self._thresholds_budget if budget is None else budget)
            if thr is None:
                thr = [2.0] * (self.model.steps - 1) + [-1e8]  # no budget: run every step
            self._check_open()
            out, n, sizes = self._run(inputs, thr, deadline, cropped)
            self.profiler.add_call(time.perf_counter() - t0, n)
            return out, sizes

        out, sizes = self._locked(call)
        _check_finite(out.confidence, "predict")
        m = self.model
        return Predictions(out.prediction, out.confidence, out.exit_step, out.coords, m.patch_size,
                           out.stopped, m.class_names, sizes, m.image_size, m.crop_pct)

    def trace(self, inputs, *, cropped: bool = False) -> RuntimeTrace:
        """Runs every step on every image; same fields as the reference model's trace
        (``inputs`` and ``cropped`` as in :meth:`predict`)."""
        def call() -> StepOutputs:
            self._check_open()
            return self._run(inputs, None, cropped=cropped)[0]

        out = self._locked(call)
        _check_finite(out.probs, "trace")
        return RuntimeTrace(out.probs, out.coords)

    def predict_iter(self, frames: Iterable[Any], batch_size: Optional[int] = None,
                     budget: Optional[str] = None, deadline_ms: Optional[float] = None,
                     deadline_margin: float = DEFAULT_MARGIN, *, cropped: bool = False) -> Iterator[Predictions]:
        """Classifies a stream of images (a video, a folder walk) batch by batch: reads the
        iterable only as far as the batch being filled, and yields that batch's results
        before reading on, so memory is bounded by one batch whatever the stream's length.

        Args:
            frames: uint8 (H, W, 3) RGB frames, normalised float32 (3, S, S) images, or stacks
                of either ((N, H, W, 3), (N, 3, S, S)); uint8 and float32 not mixed in a batch.
            batch_size: images per :meth:`predict` call (``None``: :attr:`max_batch`).
            budget: a named budget for these calls (default: the runtime's).
            deadline_ms, deadline_margin: a deadline for each batch's call (see :meth:`predict`).
            cropped: the frames are already the model's S x S input (see :meth:`predict`).

        Yields:
            :class:`Predictions` of each batch of ``batch_size`` images, in stream order (the
            last batch may be smaller).
        """
        self._check_open()  # a forked child or a closed Runtime is told so before anything else
        size = check_batch(batch_size, "batch_size") or self.max_batch
        _check_flag("cropped", cropped)
        if budget is not None:
            self.bundle.thresholds(budget)  # an unknown name fails here, not at the first batch
        check_frames_given(frames)
        batches = stream_batches(frames, size, self.model.image_size, bool(cropped))
        if deadline_ms is not None:
            self._deadline(deadline_ms, deadline_margin, time.perf_counter())  # bad values fail here
        return (self.predict(batch, budget, deadline_ms, deadline_margin, cropped=cropped) for batch in batches)


class FifoLock:
    """A non-reentrant lock that threads acquire in the order they asked for it. ``threading.Lock``
    lets the thread that releases it take it again at once: with two threads calling a Runtime in
    a loop (calls of 1.7 ms, 2-core CPU), one of them then waits up to 137 ms, 80 calls of the
    other, against 8 ms in call order.

    The holder is one attribute, :attr:`owner` (a thread ident, None when free), written last
    when the lock is taken: a caller that computed its ident before can tell, in a ``finally``
    that makes no call, whether it holds the lock and free it with one store (then
    :meth:`wake`), so an exception a signal handler raises anywhere in between never leaves it
    held. A waiter's place in the queue is its thread ident, removed whatever interrupts its wait
    (the queue's mutex is an ``RLock``, whose re-acquisition inside ``Condition.wait`` no exception
    can skip). Waiters re-check every :attr:`RECHECK_S` seconds, so a wake-up lost to such an
    exception delays them at most that long. ``with`` takes and frees it too.
    """

    #: Seconds between a waiter's checks when no release wakes it.
    RECHECK_S = 0.05

    def __init__(self) -> None:
        self._mutex = threading.RLock()
        self._cond = threading.Condition(self._mutex)
        self.owner: Optional[int] = None
        self._waiting: "collections.deque[int]" = collections.deque()

    @property
    def _held(self) -> bool:
        return self.owner is not None

    def involves(self, ident: int) -> bool:
        """Whether thread ``ident`` holds the lock or waits for it (a signal handler running on
        that thread would wait for itself). Reads without the mutex."""
        return self.owner == ident or ident in tuple(self._waiting)

    def acquire(self) -> None:
        """Waits for the lock in call order and takes it."""
        me = threading.get_ident()
        with self._mutex:
            if self.owner is None and not self._waiting:
                self.owner = me
                return
            try:
                self._waiting.append(me)
                while self.owner is not None or self._waiting[0] != me:
                    self._cond.wait(self.RECHECK_S)
                self._waiting.popleft()
            except BaseException:  # interrupted while waiting or leaving the queue: the threads behind go on
                if me in self._waiting:
                    self._waiting.remove(me)
                self._cond.notify_all()
                raise
            self.owner = me  # last: an exception before it leaves the lock free

    def wake(self) -> None:
        """Wakes the waiters after the holder set :attr:`owner` to None."""
        with self._mutex:
            if self._waiting:
                self._cond.notify_all()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc) -> None:
        self.owner = None
        self.wake()


def _check_flag(name: str, value: Any) -> None:
    """Raises InputError unless ``value`` is a boolean."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be True or False, got {value!r}")


def _check_graph_outputs(runner, model: ModelDesc, arrays: Dict[str, np.ndarray], heads_path: Path) -> None:
    """At load: the graphs' outputs (where the runner knows them) are the glance's and the focus's,
    and their widths fit the head weights and the class count (swapped or foreign graphs, or
    heads of another model, are refused here rather than failing at the first call)."""
    sessions = getattr(runner, "sessions", None)
    if not isinstance(sessions, dict) or not sessions:
        return
    widths = {}
    for g, sess in sessions.items():
        outs = {o.name: o.shape for o in sess.get_outputs()}
        has_logits = "logits" in outs
        if has_logits != (g == "glance" and model.step0_backbone) or not {"feature", "policy_state"} <= set(outs):
            raise BundleError(f"{runner.graphs[g]}: its outputs ({', '.join(outs)}) are not those of a {g} graph "
                              "(are the glance and focus graphs swapped in the manifest?)")
        widths[g] = {k: v[-1] if isinstance(v[-1], int) else None for k, v in outs.items()}
    want = {"policy_state": arrays.get("pol.w_ih", np.zeros((0, 0))).shape[-1],
            "feature": (arrays["cls.w_ih"].shape[-1] if "cls.w_ih" in arrays
                        else arrays["cls.fc_2.w"].shape[-1] // 2 if "cls.fc_2.w" in arrays else None),
            "logits": model.num_classes}
    for g, ws in widths.items():
        for name, width in ws.items():
            if width is not None and want.get(name) not in (None, width):
                raise BundleError(f"{heads_path}: head weights do not fit the {g} graph: its {name!r} output has "
                                  f"width {width}, the heads expect {want[name]}")


#: Largest magnitude accepted in normalised float32 images: a normalised pixel lies within a few
#: units of zero (ImageNet's mean and std: -2.2 .. 2.7); far larger values overflow float16
#: engines and, near float32's range, float32 ones.
MAX_NORMALISED = 1e4


def _check_finite(values: np.ndarray, call: str) -> None:
    """A NaN or infinite probability means corrupt weights in the bundle's graphs: refused, never
    returned as a classification."""
    finite = np.isfinite(values)
    if not finite.all():
        rows = np.flatnonzero(~finite.reshape(-1, values.shape[-1]).all(axis=1) if values.ndim > 1 else ~finite)
        raise BundleError(f"{call}: the model produced NaN or infinite probabilities ({rows.size} row(s)); "
                          "the bundle's graph weights are corrupt: rebuild it from a finite checkpoint")


def trace_graphs(model: "ModelDesc | Dict[str, Any]", graphs: Dict[str, Path], heads: Union[Path, Dict[str, np.ndarray]],
                 images: np.ndarray, threads: Optional[int] = None, batch_size: int = 64) -> RuntimeTrace:
    """Traces ONNX graphs + heads outside a bundle (used by quantization to score graphs).

    Args:
        model: the model description, or a manifest ``model`` entry
            (:func:`gfnet_edge.export.manifest_model`).
        graphs: ``{"glance": path, "focus": path}``.
        heads: ``heads.npz`` path or its arrays.
        images: normalised float32 (N, 3, S, S), or uint8 (N, S, S, 3) frames already resized
            and centre-cropped, normalised by the extension as :meth:`Runtime.predict` does with
            ``cropped=True`` (an INT8 graph rounds its input to its quantization grid, so the two
            ways in can give some images different results).
        threads: ONNX Runtime threads.
        batch_size: images per call.
    """
    from .. import ops
    from .backends.onnxruntime import OnnxRuntimeRunner

    model = as_desc(model)
    S = model.image_size
    if images.dtype == np.uint8 and (images.ndim != 4 or images.shape[1:] != (S, S, 3)):
        raise InputError(f"frames to trace must be uint8 (N, {S}, {S}, 3), already resized and centre-cropped to the "
                         f"model's input, got {images.shape}")
    arrays = heads if isinstance(heads, dict) else load_head_arrays(Path(heads))
    runner = OnnxRuntimeRunner(graphs, "custom", threads).activate()
    try:
        driver = Driver(model, runner, HeadSet(arrays, model), Profiler(False))
        probs, coords = [], []
        P = model.patch_size
        for i in range(0, images.shape[0], batch_size):
            if images.dtype == np.uint8:
                out = driver.run_frames(np.ascontiguousarray(images[i:i + batch_size]), None, cropped=True)
            else:
                x = np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32)
                out = driver.run(x, ops.glance(x, P, model.glance_interpolation), None)
            probs.append(out.probs)
            coords.append(out.coords)
    finally:
        runner.deactivate()
    return RuntimeTrace(np.concatenate(probs, axis=1), np.concatenate(coords, axis=1))
