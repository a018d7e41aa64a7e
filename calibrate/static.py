"""The static baseline: one backbone on the full S x S image, measured like the GFNet bundle.

Accepted inputs: an ONNX graph (one float32 (N, 3, S, S) input, logits as the first output), or a
gfnet-edge static checkpoint (``gfnet_edge/train/static.py`` format; exported to ONNX here where the
backend runs ONNX graphs, which needs torch). Latency per image at the calibration's batch size,
with the technology of the bundle's runtime (:mod:`calibrate.static_runners`): on ONNX Runtime
(CPU) normalising the uint8 S x S frame (as the GFNet runtime is timed; no resize, the frames are
already cropped) plus one session call on the same threads as the bundle; on a GPU the same
backend, precision and CUDA-graph capture as the GFNet loop, from uint8 frames on the host to
logits on the host. Optionally an INT8 copy is made (ONNX Runtime's static quantization with the
gfnet-edge ``cpu`` profile settings; on TensorRT an INT8 engine), so an INT8 GFNet can be compared
with an INT8 baseline.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from gfnet_edge.errors import InputError, UnavailableError
from gfnet_edge.model_desc import ModelDesc, as_desc
from gfnet_edge.runtime.backends.classifier import Classifier, OnnxRuntimeClassifier, Technology

from .latency import WARMUP_MS, LatencyStats, ModelLike, prepare_frames, warm_up
from .static_runners import ACCURACY_BATCH, SourceKind, StaticPlan, check_static_sources, extra_int8, open_classifier


@dataclass
class StaticResult:
    """One static-baseline point.

    Attributes:
        name: label (``static fp32``, ``static int8`` ...).
        source: the file given.
        accuracy: held-out top-1 accuracy (percent).
        latency: per-image latency at the calibration batch size (its percentiles are those
            tail budgets limit: :meth:`~calibrate.latency.LatencyStats.per_image`).
        macs: multiply-adds per image when known.
        meta: metadata of the checkpoint (no weights).
        technology: how it ran (backend, place, precision, capture).
        call_ms: every timed call's wall-clock latency (ms per call, not in ``to_dict``), whatever
            the clock of ``latency``: the deadline sweep compares it with GFNet's wall-clock calls.
    """

    name: str
    source: str
    accuracy: float
    latency: LatencyStats
    macs: Optional[int] = None
    meta: Dict[str, Any] = field(default_factory=dict)
    technology: Technology = field(default_factory=lambda: Technology("onnxruntime", "cpu", "fp32"))
    call_ms: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "accuracy": self.accuracy,
                "latency": self.latency.to_dict(), "macs": self.macs, "meta": self.meta,
                "technology": self.technology.to_dict()}


def load_static_checkpoint(path: Path, meta_only: bool = False) -> Any:
    """A static checkpoint -> ``(network, metadata)`` (``meta_only``: the metadata alone).

    Raises:
        UnavailableError: torch/timm missing.
        InputError: unreadable checkpoint.
    """
    try:
        from gfnet_edge.train.static import load_static, load_static_meta
    except ImportError as exc:
        raise UnavailableError(f"reading a static checkpoint needs torch and timm ({exc}); "
                               "pass the baseline as an ONNX file instead (--static MODEL.onnx)") from exc
    try:
        return load_static_meta(path) if meta_only else load_static(path)
    except Exception as exc:  # CheckpointError or anything torch.load raises
        msg = str(exc)  # a CheckpointError names the file first
        raise InputError(f"--static {msg}" if msg.startswith(f"{path}: ") else f"--static {path}: {msg}") from exc


def check_static_meta(sources: Sequence[str], model: ModelLike) -> None:
    """Refuses, before anything is measured, a ``--static`` checkpoint whose metadata does not fit
    the bundle (image size, classes, pre-processing: :func:`_checked_meta`)."""
    model = as_desc(model)
    for src in sources:
        p = Path(src)
        if SourceKind.of(p) is SourceKind.CHECKPOINT:
            _checked_meta(p, load_static_checkpoint(p, meta_only=True), model)


def export_static(path: Path, out_dir: Path) -> tuple:
    """Static checkpoint -> ``(onnx path, metadata)``.

    Raises:
        UnavailableError: torch/timm missing.
        InputError: unreadable checkpoint.
    """
    net, meta = load_static_checkpoint(path)  # UnavailableError without torch
    return export_network(net, meta, out_dir)


def export_network(net: Any, meta: Dict[str, Any], out_dir: Path) -> tuple:
    """A static network already read (:func:`load_static_checkpoint`) -> ``(onnx path,
    JSON-safe metadata)``: ``out_dir/static.fp32.onnx``, batch dimension dynamic."""
    from gfnet_edge.export import torchscript_export

    dst = out_dir / "static.fp32.onnx"
    torchscript_export(net, int(meta["image_size"]), str(dst), "image", ["logits"], opset=17)
    return dst, _json_safe(meta)


def quantize_static_int8(src: Path, dst: Path, calib: np.ndarray, input_name: Optional[str] = None,
                         settings: Any = None, method: Any = "entropy") -> Path:
    """INT8 copy of a static graph (QDQ; by default the gfnet-edge ``cpu`` profile settings and
    entropy calibration; ``settings`` / ``method``: another profile's)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    from gfnet_edge.quantize.options import QuantizeOptions, ort_settings
    from gfnet_edge.quantize.qdq import run_quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray, batch: int = 8) -> None:
            self.chunks = [x[i:i + batch] for i in range(0, len(x), batch)]
            self.i, self.end = 0, len(self.chunks)

        def get_next(self):
            if self.i >= self.end:
                return None
            self.i += 1
            return {input_name: self.chunks[self.i - 1]}

        def set_range(self, start_index: int, end_index: int) -> None:  # strided calibration
            self.i, self.end = start_index, min(end_index, len(self.chunks))

        def __len__(self) -> int:
            return len(self.chunks)

    if input_name is None:  # the graph's one input that is not a weight
        g = onnx.load(str(src), load_external_data=False).graph
        weights = {t.name for t in g.initializer}
        input_name = next(i.name for i in g.input if i.name not in weights)
    if settings is None:
        settings = ort_settings(QuantizeOptions(profile="cpu", method="entropy"))
    run_quantize_static(src, dst, Reader(calib), settings, method)
    return dst


def evaluate_classifier(clf: Classifier, name: str, frames: np.ndarray, labels: np.ndarray, latency_frames: np.ndarray,
                        repeats: int = 100, warmup: int = 10, meta: Optional[Dict[str, Any]] = None,
                        source: str = "", batch: int = 1,
                        clock: Callable[[], float] = time.perf_counter, warmup_ms: float = WARMUP_MS) -> StaticResult:
    """Accuracy on ``frames`` and per-image latency (``batch`` images per call) of one classifier.

    Args:
        clf: the classifier (uint8 frames -> logits).
        name: label for the report.
        frames, labels: held-out uint8 frames and labels.
        latency_frames: frames cycled for the latency measurement.
        repeats, warmup: timed and untimed calls.
        warmup_ms: untimed calls go on until this much wall-clock time has passed (``warm_up``).
        meta: checkpoint metadata.
        source: the file the user gave.
        batch: images per timed call.
        clock: the timer of the latency statistics (``calibrate.latency.CLOCKS``); each call's
            wall-clock time is recorded too (``call_ms``, for the deadline sweep).
    """
    S = clf.image_size
    try:
        preds = [np.asarray(clf(frames[i:i + ACCURACY_BATCH])).argmax(axis=1)
                 for i in range(0, len(frames), ACCURACY_BATCH)]
    except (InputError, UnavailableError):
        raise
    except Exception as exc:
        raise InputError(f"--static {source}: cannot run this network on {S}x{S} images "
                         f"({clf.technology.describe()}): {str(exc).splitlines()[0]}") from exc
    pred = np.concatenate(preds)
    if pred.shape[0] != labels.shape[0]:
        raise InputError(f"--static {source}: returned {pred.shape[0]} rows for {labels.shape[0]} images")
    acc = 100.0 * float((pred == labels).mean())
    n = len(latency_frames)

    def frames_of(i: int) -> np.ndarray:
        return latency_frames[[(i * batch + j) % n for j in range(batch)]]

    start = warm_up(lambda i: clf(frames_of(i)), warmup, warmup_ms)
    wall_only = clock is time.perf_counter
    ms: List[float] = []
    wall_ms: List[float] = []
    for i in range(start, start + repeats):
        f = frames_of(i)
        t0 = clock()
        w0 = t0 if wall_only else time.perf_counter()
        clf(f)
        w1 = time.perf_counter()
        t1 = w1 if wall_only else clock()
        ms.append((t1 - t0) * 1e3 / batch)
        wall_ms.append((w1 - w0) * 1e3)
    meta = meta or {}
    macs = meta.get("macs")
    return StaticResult(name, source, acc, LatencyStats.per_image(ms), int(macs) if macs else None, meta, clf.ran(),
                        np.asarray(wall_ms, dtype=np.float64))


def evaluate_static(path: Path, name: str, frames: np.ndarray, labels: np.ndarray, model: ModelLike,
                    threads: Optional[int], latency_frames: np.ndarray, repeats: int = 100, warmup: int = 10,
                    meta: Optional[Dict[str, Any]] = None, source: Optional[str] = None, batch: int = 1,
                    clock: Callable[[], float] = time.perf_counter, warmup_ms: float = WARMUP_MS) -> StaticResult:
    """Accuracy and per-image latency of one static ONNX graph on ONNX Runtime (CPU): the frames
    normalised by the extension, one session call (:func:`evaluate_classifier`).

    Args:
        path: the ONNX graph.
        model: the GFNet bundle's model entry (S, crop, interpolation, mean/std).
        threads: ONNX Runtime / extension threads.
        (the others as :func:`evaluate_classifier`)
    """
    try:
        clf = OnnxRuntimeClassifier(Path(path), as_desc(model), threads)
    except InputError as exc:
        raise InputError(f"--static {exc}") from exc
    with clf:
        return evaluate_classifier(clf, name, frames, labels, latency_frames, repeats=repeats, warmup=warmup,
                                   meta=meta, source=str(source or path), batch=batch, clock=clock,
                                   warmup_ms=warmup_ms)


def static_baselines(sources: List[str], frames: np.ndarray, labels: np.ndarray, calib_frames: np.ndarray,
                     model: ModelLike, threads: Optional[int], int8: bool, repeats: int = 100,
                     batch: int = 1, clock: Callable[[], float] = time.perf_counter,
                     plan: Optional[StaticPlan] = None, warmup_ms: float = WARMUP_MS) -> List[StaticResult]:
    """Evaluates each ``--static`` source (and its INT8 copy when ``int8``), timed at ``batch`` images
    per call, with the technology of ``plan`` (default: ONNX Runtime on the CPU).

    Raises:
        InputError: a missing or unusable file.
        UnavailableError: the plan's backend cannot run a source here.
    """
    model = as_desc(model)
    plan = plan or StaticPlan.host()
    # files and packages only: a graph onnx2torch cannot convert fails where it is converted
    # (``gfnet-edge calibrate`` tries the conversion before it measures anything)
    check_static_sources(sources, plan, convert=False)
    out: List[StaticResult] = []
    with tempfile.TemporaryDirectory(prefix="gfnet-edge-static-") as tmp:
        for k, src in enumerate(sources):
            p = Path(src)
            work = Path(tmp) / str(k)
            work.mkdir()
            meta: Dict[str, Any] = {}
            net: Any = None  # a checkpoint's network, read once for its metadata, export and torch module
            if SourceKind.of(p) is SourceKind.CHECKPOINT:
                net, raw_meta = load_static_checkpoint(p)
                meta = _checked_meta(p, raw_meta, model)
            exported: Dict[str, Path] = {}

            def onnx_path(p: Path = p, work: Path = work, exported: Dict[str, Path] = exported, net: Any = net,
                          meta: Dict[str, Any] = meta) -> Path:
                if net is None:
                    return p
                if "fp32" not in exported:
                    exported["fp32"] = export_network(net, meta, work)[0]
                return exported["fp32"]

            def calib() -> np.ndarray:
                return prepare_frames(model, calib_frames[:64])

            label = meta.get("model_name") or p.stem
            lat_frames = frames[: min(len(frames), 32)]
            kw = dict(repeats=repeats, meta=meta, source=src, batch=batch, clock=clock, warmup_ms=warmup_ms)
            with open_classifier(plan, p, onnx_path, model, threads, work, batch, calib=calib, network=net) as clf:
                out.append(evaluate_classifier(clf, f"{label} {plan.static.precision}", frames, labels, lat_frames,
                                               **kw))
            for prec in extra_int8(plan, int8):
                with open_classifier(plan, p, onnx_path, model, threads, work, batch, precision=prec,
                                     calib=calib, network=net) as clf:
                    out.append(evaluate_classifier(clf, f"{label} {prec}", frames, labels, lat_frames, **kw))
    return _unique_names(out)


def _unique_names(results: List[StaticResult]) -> List[StaticResult]:
    """Names the report, the comparisons and the deadline sweep can tell apart: a name two
    baselines share (two runs of the same backbone) gets each one's file, then its position."""
    for key in (lambda r, k: f"{r.name} ({r.source})", lambda r, k: f"{r.name} #{k + 1}"):
        counts = Counter(r.name for r in results)
        for k, r in enumerate(results):
            if counts[r.name] > 1:
                r.name = key(r, k)
    return results


def _checked_meta(path: Path, meta: Dict[str, Any], model: ModelDesc) -> Dict[str, Any]:
    """A static checkpoint's metadata (no weights) made JSON-safe and checked against the bundle's
    image size, classes (their number, and their names where both record them) and pre-processing
    (crop and interpolation, where the baseline records them)."""
    meta = _json_safe(meta)
    if int(meta.get("image_size", model.image_size)) != model.image_size:
        raise InputError(f"--static {path}: baseline image size {meta.get('image_size')} differs from the "
                         f"bundle's {model.image_size}")
    if model.num_classes and int(meta.get("num_classes", model.num_classes)) != model.num_classes:
        raise InputError(f"--static {path}: the baseline has {meta.get('num_classes')} classes, the bundle's model "
                         f"{model.num_classes}")
    for key, ours in (("crop_pct", model.crop_pct), ("dataset_interpolation", model.dataset_interpolation)):
        if key in meta and meta[key] != ours:  # recorded by gfnet-edge train --data
            raise InputError(f"--static {path}: the baseline was trained and validated with {key} {meta[key]}, the "
                             f"bundle's model with {ours}: it would be scored on frames it was not trained on; pass "
                             "the static.pth.tar of the run the bundle was built from")
    names = meta.get("classes")
    if names is not None and model.class_names is not None and list(names) != list(model.class_names):
        raise InputError(f"--static {path}: the baseline's classes ({', '.join(map(str, names))}) are not the "
                         f"bundle's ({', '.join(model.class_names)}): its accuracy would be scored against other "
                         "labels; pass the static.pth.tar of the run the bundle was built from")
    return meta


def _json_safe(meta: Dict[str, Any]) -> Dict[str, Any]:
    clean = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
            clean[k] = v
        except (TypeError, ValueError):
            clean[k] = str(v)
    return clean
