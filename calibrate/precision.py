"""Comparing the precisions a bundle holds (FP32 vs INT8): accuracy, agreement, latency."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from gfnet_edge.evaluate import anytime_accuracy, dynamic_evaluate

from .latency import predict_frames


def comparable_precisions(manifest: Dict[str, Any], backend: str) -> List[str]:
    """Precisions the backend can run from this bundle, FP32 first.

    ONNX Runtime runs every graph set but the TensorRT-profile INT8 graphs (those are meant for
    TensorRT; ONNX Runtime runs them slowly); TensorRT runs the engines it has; torch runs FP32 only.
    """
    if backend == "onnxruntime":
        sets = [g for g in manifest.get("graphs", {}) if g != "int8-tensorrt"]
    elif backend == "tensorrt":
        # Named as the TensorRT runner names its precision (``int8-tensorrt``, ``fp32-tensorrt``).
        sets = sorted({f"{e['precision']}-tensorrt" for e in manifest.get("engines", []) if e.get("precision")})
    else:
        sets = []
    return sorted(sets, key=lambda g: (not g.startswith("fp32"), g))


def trace_frames(rt, frames: np.ndarray, batch: int = 32, progress=None):
    """``Runtime.trace`` over uint8 S x S ``frames`` in batches: ``(probs (T, N, K), coords (T-1, N, 2))``.

    The frames reach the runtime as the timed calls give them (:func:`~.latency.predict_frames`):
    an INT8 graph rounds its input to its quantization grid, so normalising a frame on the way in
    or before the call (equal to about 1e-6) can move an activation by a quantization step and an
    image's probabilities by much more; the traced exits are then the runtime's own."""
    probs, coords = [], []
    for i in range(0, len(frames), batch):
        tr = predict_frames(rt, frames[i:i + batch], trace=True)
        probs.append(tr.probs)
        coords.append(tr.coords)
        if progress:
            progress(min(batch, len(frames) - i))
    return np.concatenate(probs, axis=1), np.concatenate(coords, axis=1)


def compare(results: Dict[str, Dict[str, Any]], labels: np.ndarray, budgets: Dict[str, Sequence[float]],
            reference: Optional[str] = None) -> Dict[str, Any]:
    """Per-precision accuracy and agreement with the reference precision.

    Args:
        results: ``{precision: {"probs": (T, N, K), "cost_ms": (T,)}}`` on the same held-out images;
            an optional ``"budget_cost_ms": {budget: (T,)}`` gives a budget its own step latency.
        labels: (N,) labels.
        budgets: ``{name: thresholds}`` applied to every precision.
        reference: precision others are compared with (default ``fp32`` if present).

    Returns:
        ``{"reference": name, "rows": [{precision, anytime_accuracy, step_agreement,
        cost_ms, budgets: {name: {accuracy, expected_ms, exit_agreement, prediction_agreement}}}]}``.
    """
    names = list(results)
    if not names:
        return {"reference": None, "rows": []}
    fp32 = [n for n in names if n.split("-")[0] == "fp32"]  # fp32, or fp32-tensorrt
    ref = reference if reference in results else (fp32[0] if fp32 else names[0])
    ref_probs = results[ref]["probs"]
    ref_pred = ref_probs.argmax(axis=2)
    ref_exits = {b: dynamic_evaluate(ref_probs, labels, results[ref]["cost_ms"], thr) for b, thr in budgets.items()}
    rows = []
    for name in names:
        probs, cost = results[name]["probs"], results[name]["cost_ms"]
        pred = probs.argmax(axis=2)
        row: Dict[str, Any] = {
            "precision": name,
            "anytime_accuracy": anytime_accuracy(probs, labels).tolist(),
            "step_agreement": (100.0 * (pred == ref_pred).mean(axis=1)).tolist(),
            "max_prob_abs_diff": np.abs(probs.max(axis=2) - ref_probs.max(axis=2)).max(axis=1).tolist(),
            "cost_ms": [float(c) for c in cost],
            "budgets": {},
        }
        for b, thr in budgets.items():
            r = dynamic_evaluate(probs, labels, results[name].get("budget_cost_ms", {}).get(b, cost), thr)
            ref_r = ref_exits[b]
            row["budgets"][b] = {
                "accuracy": r.accuracy, "expected_ms": r.expected_cost,
                "exit_agreement": 100.0 * float((r.exit_step == ref_r.exit_step).mean()),
                "prediction_agreement": 100.0 * float((r.prediction == ref_r.prediction).mean()),
            }
        rows.append(row)
    return {"reference": ref, "rows": rows}
