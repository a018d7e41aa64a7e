"""The static baseline: one backbone on the full S x S image, measured like the GFNet bundle.

Accepted inputs: an ONNX graph (one float32 (N, 3, S, S) input, logits as the first output), or a
gfnet-edge static checkpoint (``gfnet_edge/train/static.py`` format; exported to ONNX here, which
needs torch). Latency per image at the calibration's batch size, on the same threads as the bundle: normalising the
uint8 S x S frame (as the GFNet runtime is timed; no resize, the frames are already cropped) plus
one ONNX Runtime call. Optionally an INT8 copy is made with ONNX Runtime's static quantization and
the gfnet-edge ``cpu`` profile settings, so an INT8 GFNet can be compared with an INT8 baseline.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from gfnet_edge.errors import InputError, UnavailableError
from gfnet_edge.model_desc import as_desc

from .latency import LatencyStats, ModelLike, prepare_frames


@dataclass
class StaticResult:
    """One static-baseline point.

    Attributes:
        name: label (``static fp32``, ``static int8`` ...).
        source: the file given.
        accuracy: held-out top-1 accuracy (percent).
        latency: per-image latency at the calibration batch size.
        macs: multiply-adds per image when known.
        meta: metadata of the checkpoint (no weights).
        call_ms: every timed call's latency (ms per call, not in ``to_dict``).
    """

    name: str
    source: str
    accuracy: float
    latency: LatencyStats
    macs: Optional[int] = None
    meta: Dict[str, Any] = field(default_factory=dict)
    call_ms: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "accuracy": self.accuracy,
                "latency": self.latency.to_dict(), "macs": self.macs, "meta": self.meta}


def export_static(path: Path, out_dir: Path) -> tuple:
    """Static checkpoint -> ``(onnx path, metadata)``.

    Raises:
        UnavailableError: torch/timm missing.
        InputError: unreadable checkpoint.
    """
    try:
        import torch

        from gfnet_edge.train.static import load_static
    except ImportError as exc:
        raise UnavailableError(f"reading a static checkpoint needs torch and timm ({exc}); "
                               "pass the baseline as an ONNX file instead (--static MODEL.onnx)") from exc
    try:
        net, meta = load_static(path)
    except Exception as exc:  # CheckpointError or anything torch.load raises
        raise InputError(f"--static {path}: {exc}") from exc
    S = int(meta["image_size"])
    dst = out_dir / "static.fp32.onnx"
    with torch.no_grad():
        torch.onnx.export(net, (torch.zeros(1, 3, S, S),), str(dst), input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, do_constant_folding=True, dynamo=False)
    clean = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
            clean[k] = v
        except (TypeError, ValueError):
            clean[k] = str(v)
    return dst, clean


def quantize_static_int8(src: Path, dst: Path, calib: np.ndarray, input_name: str = "image") -> Path:
    """INT8 copy of a static graph (QDQ, gfnet-edge ``cpu`` profile settings, entropy calibration)."""
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

    settings = ort_settings(QuantizeOptions(profile="cpu", method="entropy"))
    run_quantize_static(src, dst, Reader(calib), settings, "entropy")
    return dst


def _session(path: Path, threads: Optional[int]):
    from gfnet_edge.runtime.backends.onnxruntime import load_session

    s = load_session(path, threads)
    inputs = s.get_inputs()
    if len(inputs) != 1:
        raise InputError(f"--static {path}: expected a graph with one image input, it has {len(inputs)}")
    return s, inputs[0].name


def evaluate_static(path: Path, name: str, frames: np.ndarray, labels: np.ndarray, model: ModelLike,
                    threads: Optional[int], latency_frames: np.ndarray, repeats: int = 100, warmup: int = 10,
                    meta: Optional[Dict[str, Any]] = None, source: Optional[str] = None, batch: int = 1,
                    clock: Callable[[], float] = time.perf_counter) -> StaticResult:
    """Accuracy on ``frames`` and per-image latency (``batch`` images per call) of one static ONNX graph.

    Args:
        path: the ONNX graph.
        name: label for the report.
        frames, labels: held-out uint8 frames and labels.
        model: the GFNet bundle's model entry (S, crop, interpolation, mean/std).
        threads: ONNX Runtime / extension threads.
        latency_frames: frames cycled for the latency measurement.
        repeats, warmup: timed and untimed calls.
        batch: images per timed call.
        clock: the timer (``calibrate.latency.CLOCKS``).
        meta: checkpoint metadata.
        source: the file the user gave.
    """
    model = as_desc(model)
    S = model.image_size
    sess, inp = _session(path, threads)

    def prep(f: np.ndarray) -> np.ndarray:
        return prepare_frames(model, f)

    try:
        preds = []
        for i in range(0, len(frames), 32):
            out = sess.run(None, {inp: prep(frames[i:i + 32])})[0]
            preds.append(np.asarray(out).argmax(axis=1))
    except Exception as exc:
        raise InputError(f"--static {source or path}: cannot run this graph on {S}x{S} images: "
                         f"{str(exc).splitlines()[0]}") from exc
    pred = np.concatenate(preds)
    if pred.shape[0] != labels.shape[0]:
        raise InputError(f"--static {source or path}: graph returned {pred.shape[0]} rows for {labels.shape[0]} images")
    acc = 100.0 * float((pred == labels).mean())
    ms: List[float] = []
    n = len(latency_frames)
    for i in range(warmup + repeats):
        f = latency_frames[[(i * batch + j) % n for j in range(batch)]]
        t0 = clock()
        sess.run(None, {inp: prep(f)})
        dt = (clock() - t0) * 1e3 / batch
        if i >= warmup:
            ms.append(dt)
    meta = meta or {}
    macs = meta.get("macs")
    return StaticResult(name, str(source or path), acc, LatencyStats.of(ms), int(macs) if macs else None, meta,
                        np.asarray(ms, dtype=np.float64) * batch)


def static_baselines(sources: List[str], frames: np.ndarray, labels: np.ndarray, calib_frames: np.ndarray,
                     model: ModelLike, threads: Optional[int], int8: bool, repeats: int = 100,
                     batch: int = 1, clock: Callable[[], float] = time.perf_counter) -> List[StaticResult]:
    """Evaluates each ``--static`` source (and its INT8 copy when ``int8``), timed at ``batch`` images per call.

    Raises:
        InputError: a missing or unusable file.
    """
    model = as_desc(model)
    out: List[StaticResult] = []
    with tempfile.TemporaryDirectory(prefix="gfnet-edge-static-") as tmp:
        for k, src in enumerate(sources):
            p = Path(src)
            if not p.is_file():
                raise InputError(f"--static {src}: no such file (give a static checkpoint .pth.tar or an .onnx graph)")
            work = Path(tmp) / str(k)
            work.mkdir()
            meta: Dict[str, Any] = {}
            if p.suffix.lower() == ".onnx":
                onnx_path = p
            else:
                onnx_path, meta = export_static(p, work)
                if int(meta.get("image_size", model.image_size)) != model.image_size:
                    raise InputError(f"--static {src}: baseline image size {meta.get('image_size')} differs from the "
                                     f"bundle's {model.image_size}")
            label = meta.get("model_name") or p.stem
            lat_frames = frames[: min(len(frames), 32)]
            out.append(evaluate_static(onnx_path, f"{label} fp32", frames, labels, model, threads, lat_frames,
                                       repeats=repeats, meta=meta, source=src, batch=batch,
                                           clock=clock))
            if int8:
                calib = prepare_frames(model, calib_frames[:64])
                q = quantize_static_int8(onnx_path, work / "static.int8.onnx", calib,
                                         _session(onnx_path, threads)[1])
                out.append(evaluate_static(q, f"{label} int8", frames, labels, model, threads, lat_frames,
                                           repeats=repeats, meta=meta, source=src, batch=batch,
                                           clock=clock))
    return out
