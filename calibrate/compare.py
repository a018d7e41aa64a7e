"""The comparisons of a calibration: the bundle's other precisions (same thresholds, their own
step latency) and the static baselines (at the precision the runtime runs)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from gfnet_edge.bundle import Bundle

from .config import CalibrationConfig
from .latency import CLOCKS, StepLatency
from .precision import comparable_precisions, compare, trace_frames
from .progress import Progress
from .static import StaticResult, static_baselines
from .static_runners import StaticPlan

#: ``measure(rt, frames, batch, cfg, desc, stage_calls)``: the step latency of an open runtime.
Measure = Callable[..., StepLatency]


def static_int8(cfg: CalibrationConfig, precision: str) -> bool:
    """Whether the static baselines are also measured in INT8: asked for (``--static-int8``), or
    the calibrated runtime runs INT8 graphs, so that INT8 GFNet is compared with an INT8 static
    network as well as the FP32 one."""
    return bool(cfg.static_int8) or str(precision).startswith("int8")


def compare_precisions(bundle: Bundle, backend: str, main: str, hold_x: np.ndarray, hold_y: np.ndarray,
                       hold_probs: np.ndarray, cost: np.ndarray, lat_frames: np.ndarray,
                       budgets: Dict[str, Sequence[float]], cfg: CalibrationConfig,
                       measure: Measure, budget_cost: Optional[Dict[str, Sequence[float]]] = None) -> Dict[str, Any]:
    """Traces the held-out images with every other precision the backend can run from the bundle
    and scores the fitted thresholds (``budgets``: name -> thresholds) with each; ``main``'s expected
    ms uses the step latency each budget was fitted with (``budget_cost``: name -> cost), else ``cost``.

    Returns:
        :func:`calibrate.precision.compare`'s result with a ``note``, or rows ``[]`` and a note
        saying why there is nothing to compare.
    """
    from gfnet_edge.runtime import Runtime

    sets = comparable_precisions(bundle.manifest, backend)
    if not cfg.compare_precisions or len(sets) < 2:
        return {"reference": None, "rows": [],
                "note": f"The bundle holds one precision for {backend} ({', '.join(sets) or main}); build it with "
                        "--precision int8 to compare INT8 with FP32." if len(sets) < 2 else
                "The bundle's other precisions were not compared (--no-compare)."}
    per: Dict[str, Dict[str, Any]] = {main: {"probs": hold_probs, "cost_ms": cost, "budget_cost_ms": budget_cost or {}}}
    for p in sets:
        if p == main:
            continue
        rt = Runtime(bundle, backend=backend, precision=p, threads=cfg.threads, profile=True, dla_core=cfg.dla_core,
                     head_dtype=cfg.head_dtype, device=cfg.device)
        try:
            with Progress(cfg.progress, len(hold_x), f"trace {p}") as bar:
                probs, _ = trace_frames(rt, hold_x, progress=bar)
            lat = measure(rt, lat_frames, cfg.batch, cfg.quick(), f"latency {p}", stage_calls=0)
        finally:
            rt.close()
        per[p] = {"probs": probs, "cost_ms": lat.cost}
    out = compare(per, hold_y, budgets)
    out["note"] = (f"Thresholds are the ones fitted for {main}; {main}'s expected ms uses the step latency each "
                   "budget was fitted with (as in the budgets table), the other precision's its own measured step "
                   "latency. Accuracies here come from the traced probabilities; the budgets table's from the "
                   "runtime's own run.")
    return out


def static_results(cfg: CalibrationConfig, precision: str, hold_x: np.ndarray, hold_y: np.ndarray,
                   fit_x: np.ndarray, model, plan: Optional[StaticPlan] = None) -> List[StaticResult]:
    """The ``--static`` baselines measured like the bundle (same threads, batch and clock; with
    ``plan``, the same backend, place, precision and capture as the GFNet runtime)."""
    if not cfg.static:
        return []
    return static_baselines(list(cfg.static), hold_x, hold_y, fit_x, model, cfg.threads, static_int8(cfg, precision),
                            repeats=max(cfg.repeats, 50), batch=cfg.batch, clock=CLOCKS[cfg.clock], plan=plan,
                            warmup_ms=cfg.warmup_ms)
