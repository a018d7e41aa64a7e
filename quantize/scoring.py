"""Scoring graph sets through the real runtime (``trace_graphs``): accuracy, agreement, exits."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from gfnet_edge.model_desc import ModelDesc
from gfnet_edge.evaluate import anytime_accuracy, exit_fractions, exit_steps, fit_thresholds

#: p of the "mid" budget: q_k ∝ p^k with p = 1 gives equal exit fractions at every step.
MID_BUDGET_P = 1.0


@dataclass
class Traced:
    """A graph set's trace on the evaluation images."""

    probs: np.ndarray  # (T, N, K)
    coords: np.ndarray  # (T-1, N, 2)


def trace(desc: ModelDesc, graphs: Mapping[str, Union[str, Path]], heads,
          images: np.ndarray, threads: Optional[int] = None, batch_size: int = 64) -> Traced:
    """Runs a glance/focus pair + heads of the model ``desc`` through the runtime driver (ONNX Runtime)."""
    from gfnet_edge.runtime.api import trace_graphs

    out = trace_graphs(desc, {g: Path(p) for g, p in graphs.items()}, heads, images,
                       threads=threads, batch_size=batch_size)
    return Traced(np.asarray(out.probs, np.float32), np.asarray(out.coords))


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """KL(p || q) per sample over the last axis."""
    p = np.clip(p.astype(np.float64), eps, 1.0)
    q = np.clip(q.astype(np.float64), eps, 1.0)
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def flips(ok_ref: np.ndarray, ok_test: np.ndarray) -> Dict[str, Any]:
    """Images FP32 got right and INT8 wrong (``lost``) and the reverse (``gained``), from the
    per-image correctness of each, with ``drop_noise``: the standard error of the accuracy drop
    (lost - gained) / n in points, 100 * sqrt(lost + gained) / n (a paired difference: only the
    images whose answer changed carry it)."""
    lost, gained = int((ok_ref & ~ok_test).sum()), int((~ok_ref & ok_test).sum())
    return {"lost": lost, "gained": gained,
            "drop_noise": round(100.0 * float(np.sqrt(lost + gained)) / max(int(ok_ref.shape[0]), 1), 3)}


def compare(ref: Traced, test: Traced, labels: Optional[np.ndarray] = None,
            fit_probs: Optional[np.ndarray] = None, p: float = MID_BUDGET_P) -> Dict[str, Any]:
    """Accuracy of both (per step), agreement, KL and exit agreement of ``test`` against ``ref``.

    Args:
        ref: the FP32 trace; test: the quantized one.
        labels: true labels; ``None`` scores against the FP32 final-step predictions (then the
            FP32 accuracy is 100 by definition and the drop is the disagreement).
        fit_probs: probabilities the exit thresholds are fitted on (default ``ref.probs``).
        p: budget parameter of the thresholds (``exit_fractions(p, T)``).
    """
    T = ref.probs.shape[0]
    lab = ref.probs[-1].argmax(axis=1) if labels is None else np.asarray(labels).reshape(-1)
    acc_ref = anytime_accuracy(ref.probs, lab)
    acc_test = anytime_accuracy(test.probs, lab)
    thr = fit_thresholds(ref.probs if fit_probs is None else fit_probs, exit_fractions(p, T))
    e_ref, e_test = exit_steps(ref.probs, thr), exit_steps(test.probs, thr)
    pred_ref, pred_test = ref.probs.argmax(axis=2), test.probs.argmax(axis=2)
    steps = np.arange(lab.shape[0])
    bud_ref = pred_ref[e_ref, steps] == lab
    bud_test = pred_test[e_test, steps] == lab
    coords_same = (ref.coords == test.coords).all(axis=2).mean(axis=1) if ref.coords.size else np.zeros(0)
    return {
        "labels": "true" if labels is not None else "fp32 predictions",
        "n": int(lab.shape[0]),
        "accuracy_fp32": [round(float(a), 3) for a in acc_ref],
        "accuracy_int8": [round(float(a), 3) for a in acc_test],
        "final_drop": round(float(acc_ref[-1] - acc_test[-1]), 3),
        "final_flips": flips(pred_ref[-1] == lab, pred_test[-1] == lab),
        "prediction_agreement": [round(float(a) * 100, 3) for a in (pred_ref == pred_test).mean(axis=1)],
        "coords_agreement": [round(float(a) * 100, 3) for a in coords_same],
        "kl_final": float(kl_divergence(ref.probs[-1], test.probs[-1]).mean()),
        "kl_mean": float(kl_divergence(ref.probs, test.probs).mean()),
        # at the step FP32 exits at (what a user sees at this budget)
        "kl_budget": float(kl_divergence(ref.probs[e_ref, steps], test.probs[e_ref, steps]).mean()),
        "budget_accuracy_fp32": round(100.0 * float(bud_ref.mean()), 3),
        "budget_accuracy_int8": round(100.0 * float(bud_test.mean()), 3),
        "budget_drop": round(100.0 * float(bud_ref.mean() - bud_test.mean()), 3),
        "budget_flips": flips(bud_ref, bud_test),
        "exit": {
            "p": p,
            "thresholds": [float(t) for t in thr],
            "fp32_exit_counts": np.bincount(e_ref, minlength=T).tolist(),
            "int8_exit_counts": np.bincount(e_test, minlength=T).tolist(),
            "agreement": round(float((e_ref == e_test).mean()) * 100, 3),
        },
    }
