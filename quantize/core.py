"""``quantize_model``: calibrate, insert Q/DQ, check, and keep the most harmful layers in float.

Flow for one profile (:mod:`.profiles`):

1. both FP32 graphs go through ``quant_pre_process``;
2. ONNX Runtime calibrates each graph on its own inputs (glance inputs / policy patches) and
   inserts Q/DQ (:mod:`.qdq`); calibration ranges are cached, so later variants cost no
   calibration (:class:`~.session.QuantSession`);
3. every graph written is checked against the profile's rules
   (:func:`~.checker.check_tensorrt_compat`); a violation raises
   :class:`~.checker.TensorRTCompatError`;
4. the INT8 pair is traced through the runtime on held-out images and compared with the FP32
   pair; the mixed-precision search (:mod:`.search`) keeps the most harmful nodes in float
   until the target is met.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from gfnet_edge.bundle import staging_folder
from gfnet_edge.model_desc import ModelDesc, as_desc

from .calibration import MIN_CALIB_IMAGES, QuantCalibrationSet, check_images
from .checker import TensorRTCompatError, check_tensorrt_compat
from .options import QuantizeOptions
from .qdq import weighted_nodes
from .search import SearchResult, search_mixed_precision
from .session import GRAPHS, QuantSession


#: The report :func:`quantize_model` writes beside the graphs.
REPORT = "quantization.json"


@dataclass
class QuantizationResult:
    """Output of :func:`quantize_model`.

    Attributes:
        graphs: ``{"glance": path, "focus": path}`` of the quantized graphs.
        report: JSON-serialisable summary (also written to ``out_dir/quantization.json``).
    """

    graphs: Dict[str, Path]
    report: Dict[str, Any] = field(default_factory=dict)


def _desc(model) -> ModelDesc:
    """The :class:`ModelDesc` of a ``GFNet``, a manifest ``model`` entry or a description."""
    if isinstance(model, (ModelDesc, Mapping)):
        return as_desc(model)
    from gfnet_edge.export import model_desc

    return model_desc(model)


def _held_out(calib: QuantCalibrationSet, opts: QuantizeOptions, eval_images, eval_labels):
    """Returns (calibration set, eval images, eval labels, description)."""
    if eval_images is not None:
        if len(eval_images) == 0:
            return calib, None, None, "none (no held-out images given)"
        return calib, eval_images, eval_labels, "given"
    if calib.images is None:
        return calib, None, None, "none (calibration data has no source images)"
    n = calib.num_images
    k = int(round(n * opts.eval_fraction))
    if k < opts.min_eval or n - k < MIN_CALIB_IMAGES:
        return calib, None, None, (f"none ({n} calibration images are too few to hold out {opts.min_eval} "
                                   f"and keep {MIN_CALIB_IMAGES})")
    idx = np.random.default_rng(opts.seed).permutation(n)
    held, kept = np.sort(idx[:k]), np.sort(idx[k:])
    return (calib.subset(kept), calib.images[held], None if calib.labels is None else calib.labels[held],
            f"{k} of the {n} calibration images (not calibrated on)")


def quantize_model(model, fp32_graphs: Mapping[str, Union[str, Path]], heads_path, calib: QuantCalibrationSet,
                   out_dir: Union[str, Path], opts: Optional[QuantizeOptions] = None,
                   eval_images: Optional[np.ndarray] = None, eval_labels: Optional[np.ndarray] = None,
                   progress: bool = True) -> QuantizationResult:
    """INT8 post-training quantization of a GFNet's glance and focus graphs.

    Args:
        model: the ``GFNet`` (or its manifest ``model`` entry, see
            :func:`gfnet_edge.export.manifest_model`).
        fp32_graphs: ``{"glance": path, "focus": path}`` exported FP32 graphs.
        heads_path: ``heads.npz`` of the same model (or its arrays).
        calib: :class:`QuantCalibrationSet` (glance inputs and policy-location patches).
        out_dir: where ``glance.onnx``, ``focus.onnx`` and ``quantization.json`` are written
            (into a staging folder beside it first, then moved in, the report last: a run that
            fails leaves ``out_dir``'s files as they were).
        opts: :class:`QuantizeOptions`.
        eval_images: held-out images for the accuracy check and the mixed-precision search:
            normalised float32 (N, 3, S, S), or uint8 (N, S, S, 3) frames already resized and
            centre-cropped, which the runtime normalises as ``Runtime.predict(frames,
            cropped=True)`` does (the deployment path: an INT8 graph rounds
            its input to its quantization grid, so normalising beforehand can change some
            images' results); default: ``opts.eval_fraction`` of the calibration images; an
            empty array: none (no accuracy check, no search).
        eval_labels: their labels; without labels accuracy is measured against the FP32
            predictions (agreement), which is stricter.
        progress: progress bars.

    Returns:
        :class:`QuantizationResult`.

    Raises:
        TensorRTCompatError: a written graph breaks TensorRT's rules.
        ValueError: bad options or images.
    """
    opts = (opts or QuantizeOptions()).validate()
    t_start = time.perf_counter()
    desc = _desc(model)
    fp32 = {g: Path(fp32_graphs[g]) for g in GRAPHS}
    for g, p in fp32.items():
        if not p.is_file():
            raise ValueError(f"{g} graph {p}: no such file")
    if not isinstance(calib, QuantCalibrationSet):
        raise ValueError(f"calib must be a QuantCalibrationSet, got {type(calib).__name__}")
    calib, eval_x, eval_y, held_desc = _held_out(calib, opts, eval_images, eval_labels)
    if calib.num_images > int(opts.num_calib):  # a seeded sample (a class-sorted set keeps every class)
        calib = calib.subset(np.sort(np.random.default_rng(opts.seed).choice(calib.num_images, int(opts.num_calib),
                                                                             replace=False)))
    if eval_x is not None:
        S = desc.image_size
        if getattr(eval_x, "dtype", None) == np.uint8:  # frames, as Runtime.predict takes them
            if eval_x.ndim != 4 or eval_x.shape[1:] != (S, S, 3) or eval_x.shape[0] == 0:
                raise ValueError(f"evaluation frames: expected uint8 (N, {S}, {S}, 3), got {tuple(eval_x.shape)}")
            held_desc += "; uint8 frames, normalised by the runtime"
        else:
            eval_x = check_images(eval_x, S, min_images=1, what="evaluation images")
            held_desc += "; normalised float images"
        if eval_y is not None:
            eval_y = np.asarray(eval_y).reshape(-1)
            if eval_y.shape[0] != eval_x.shape[0]:
                raise ValueError(f"{eval_y.shape[0]} evaluation labels for {eval_x.shape[0]} images")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work" if opts.keep_work else Path(tempfile.mkdtemp(prefix="gfnet-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    # the outputs are staged beside out_dir (a folder clean_stale removes if the run is killed)
    # and moved in once complete
    stage = staging_folder(out_dir.resolve())
    try:
        try:
            sess = QuantSession(desc, fp32, heads_path, calib, work, opts, progress)
            found = search_mixed_precision(sess, eval_x, eval_y)
            report = _report(sess, found, held_desc)
            for g in GRAPHS:
                dst = stage / f"{g}.onnx"
                shutil.copyfile(found.graphs[g], dst)
                violations = check_tensorrt_compat(dst, sess.profile)
                if violations:  # pragma: no cover - the same file was checked when written
                    raise TensorRTCompatError(str(out_dir / dst.name), violations)
            # every graph passed the profile's rules just above: the report records that check
            checker = {g: {"file": f"{g}.onnx", "violations": [], "rules": opts.profile} for g in GRAPHS}
        finally:
            if not opts.keep_work:
                shutil.rmtree(work, ignore_errors=True)
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        report["checker"] = checker
        (stage / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        # the report goes last: until it is in place, out_dir holds no report of older graphs
        (out_dir / REPORT).unlink(missing_ok=True)
        for name in [f"{g}.onnx" for g in GRAPHS] + [REPORT]:
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return QuantizationResult({g: out_dir / f"{g}.onnx" for g in GRAPHS}, report)


def _report(sess: QuantSession, found: SearchResult, held_desc: str) -> Dict[str, Any]:
    opts = sess.opts
    report: Dict[str, Any] = {
        "profile": opts.profile,
        "method": sess.method.value,
        "percentile": opts.percentile if sess.method.value == "percentile" else None,
        "options": opts.to_dict(),
        "onnxruntime_settings": sess.settings.to_dict(),
        "calibration": {"source": sess.calib.source, **sess.calib.sizes(), "seconds": sess.calib_seconds},
        "preprocess": {g: ("quant_pre_process" if sess.pre_problems[g] is None else f"skipped: {sess.pre_problems[g]}")
                       for g in GRAPHS},
        "placement": {g: sess.info[sess.key(g)] for g in GRAPHS},
        "held_out": held_desc,
        "weighted_nodes": {g: len(weighted_nodes(_load(sess.pre[g]))) for g in GRAPHS},
    }
    if sess.finetuned:
        report["finetune"] = dict(sess.finetuned)
    if sess.patch_guard is not None:
        report["patch_guard"] = sess.patch_guard
    report.update(found.report())
    return report


def _load(path: Path):
    import onnx

    return onnx.load(str(path))
