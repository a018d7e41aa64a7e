"""``gfnet-edge calibrate``: measure, fit, verify, compare, report, write budgets."""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from gfnet_edge.bundle import Bundle, BundleError, check_replace, staging_dir
from gfnet_edge.errors import InputError
from gfnet_edge.evaluate import anytime_accuracy, budgeted_curve
from gfnet_edge.log import logger
from gfnet_edge.runtime.deadline import step_costs_entry, step_costs_key

from . import gallery as gal
from . import plots
from .budgets import Budget
from .compare import compare_precisions, static_int8, static_results
from .config import AUTO_DEFAULT, CalibrationConfig
from .data import load_calibration_data
from .fit import default_budgets
from .latency import (CLOCKS, StepLatency, camera_resize_ms, device_description, measure_steps, stall_warning,
                      timed_on)
from .precision import trace_frames
from .progress import Progress
from .report import pick_default_budget, write_report
from .static import check_static_meta
from .static_runners import StaticPlan, check_static_sources
from .sweep import SWEEP_PAD, DeadlineSweep, deadline_sweep, sweep_deadlines
from .verify import BudgetResult, Measurement, check_budget_feasible, fit_and_verify, pool, starting_latency, stability

__all__ = ["CalibrationConfig", "run_calibration", "static_int8"]


def _where(rt) -> str:
    return f"on this device ({rt.backend} {rt.precision}, threads {rt.threads or 'default'})"


def _measure(rt, frames: np.ndarray, batch: int, cfg: CalibrationConfig, desc: str, stage_calls: int = 20,
             extend: bool = False) -> StepLatency:
    """The step latency at ``batch``; ``extend``: up to ``cfg.latency_calls`` timed calls per step
    while they fit the time box (the measurements the manifest's step costs come from)."""
    total = rt.model.steps * (cfg.warmup + cfg.repeats + stage_calls)
    with Progress(cfg.progress, total, desc) as bar:
        return measure_steps(rt, frames, batch=batch, repeats=cfg.repeats, warmup=cfg.warmup, stage_calls=stage_calls,
                             progress=bar, clock=CLOCKS[cfg.clock], warmup_ms=cfg.warmup_ms,
                             extend_to=cfg.latency_calls if extend else 0, extend_seconds=cfg.latency_seconds)


def _manifest_entry(b: BudgetResult, rt: "_RtInfo", cfg: CalibrationConfig, device: Dict[str, Any]) -> Dict[str, Any]:
    m = b.run.stats
    tail = ({"quantile": b.budget.kind.quantile, "measured_quantile_ms": b.measured_ms,
             "over_budget_pct": b.over_budget_pct} if b.budget.kind.is_tail else {})
    return {
        "thresholds": b.thresholds, "unit": "ms", "kind": b.budget.kind.value, "budget_ms": b.budget_ms, **tail,
        "expected_ms": b.holdout.expected_ms, "measured_ms": m.mean_ms,
        "measured_p95_ms": m.p95_ms, "measured_p99_ms": m.p99_ms, "accuracy": b.accuracy,
        "exit_fractions": b.exit_fractions, "method": cfg.method,
        "backend": rt.backend, "precision": rt.precision, "threads": rt.threads, "batch": cfg.batch, "clock": cfg.clock,
        "device": device["timed_on"], "data": cfg.data,
        **({"dla_core": cfg.dla_core} if cfg.dla_core is not None else {}),
        **({"head_dtype": cfg.head_dtype} if cfg.head_dtype != "float32" else {}),
        "calibrated": _now(),
        "source": "gfnet-edge calibrate",
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _resolve_default(cfg: CalibrationConfig, names: List[str]) -> Optional[str]:
    """The name ``--default`` means: a budget's name, a number of ms (a mean budget) or ``KIND:MS``."""
    return cfg.default_name(names)


@dataclass
class _Measured:
    """What the runtime measured: step latency, traces of both splits, the held-out accuracy at
    each step (every image run to that step: its last is the full network's) and the verified
    budgets."""

    lat1: StepLatency
    latN: Optional[StepLatency]
    history: List[Measurement]
    fit_probs: np.ndarray
    hold_probs: np.ndarray
    hold_coords: np.ndarray
    hold_anytime: List[float]
    results: List[BudgetResult]
    default: Optional[str]
    rt: "_RtInfo"

    @property
    def full_accuracy(self) -> float:
        """The full network's held-out accuracy (percent, every step run)."""
        return self.hold_anytime[-1]


def _run_budgets(rt, data, cfg: CalibrationConfig, timed: str) -> _Measured:
    """Measures the step latency, traces both splits, fits and verifies every budget with ``rt``."""
    fit_x, fit_y = data.part("fit")
    hold_x, hold_y = data.part("holdout")
    lat_frames = fit_x[: min(len(fit_x), 32)]
    # 1. latency of each step on this device (timed more often for tail budgets)
    timed = replace(cfg, repeats=cfg.timed_calls())
    lat1 = _measure(rt, lat_frames, cfg.batch, timed, f"latency b={cfg.batch}", extend=True)
    cost = lat1.cost
    budgets = cfg.given_budgets() or [Budget.mean(b) for b in default_budgets(cost)]
    for b in budgets:  # infeasible budgets and a bad --default fail before any long work
        check_budget_feasible(b, lat1, _where(rt))
    default = _resolve_default(cfg, [b.name for b in budgets])
    latN = None
    if cfg.batch_size and cfg.batch_size != cfg.batch:
        latN = _measure(rt, lat_frames, cfg.batch_size, cfg, f"latency b={cfg.batch_size}", stage_calls=5,
                        extend=True)
    # 2. trace, fit, verify
    with Progress(cfg.progress, len(data.labels), "trace") as bar:
        fit_probs, _ = trace_frames(rt, fit_x, progress=bar)
        hold_probs, hold_coords = trace_frames(rt, hold_x, progress=bar)
    hold_anytime = anytime_accuracy(hold_probs, hold_y).tolist()
    history = [Measurement("start", cost.tolist(), len(lat1.samples[0]), lat1.samples)]
    quick = timed.quick()

    def remeasure(why: str):
        lat = _measure(rt, lat_frames, cfg.batch, quick, why, stage_calls=0)
        history.append(Measurement(why, lat.cost.tolist(), quick.repeats, lat.samples))
        return pool(history)

    results = []
    for b in budgets:  # each budget starts from all step-latency measurements so far, pooled
        start, note = starting_latency(b, history)
        if note:
            logger.warning("%s: %s", b.name, note)
        results.append(fit_and_verify(rt, b, fit_probs, fit_y, hold_probs, hold_y, hold_x, start, cfg, remeasure,
                                      note=note))
    remeasure("end")  # for the stability check only
    if cfg.default == AUTO_DEFAULT:  # the budget the report suggests, as it suggests it
        default = pick_default_budget([r.to_dict() for r in results], hold_anytime[-1])
    info = _RtInfo(rt.backend, rt.precision, cfg.threads)
    return _Measured(lat1, latN, history, fit_probs, hold_probs, hold_coords, hold_anytime, results, default, info)


def _open_runtime(bundle: Bundle, cfg: CalibrationConfig):
    """The runtime calibration measures: the bundle on ``cfg``'s backend, precision and threads."""
    from gfnet_edge.runtime import Runtime

    return Runtime(bundle, backend=cfg.backend, precision=cfg.precision, threads=cfg.threads, profile=True,
                   dla_core=cfg.dla_core, head_dtype=cfg.head_dtype, device=cfg.device)


def _run_sweep(bundle: Bundle, cfg: CalibrationConfig, m: _Measured, statics: Sequence[Any], timed: str,
               hold_x: np.ndarray, hold_y: np.ndarray) -> Optional[DeadlineSweep]:
    """The deadline sweep of the featured budget, planned with the step costs written to the manifest.

    It runs after the static baselines, so that its deadlines reach past their p99 call as well as
    past GFNet's full model (:func:`calibrate.sweep.sweep_deadlines`); a runtime of its own runs it.
    """
    if not cfg.deadlines:
        return None
    from gfnet_edge.runtime.api import DEFAULT_MARGIN
    from gfnet_edge.runtime.deadline import StepCosts

    r = _featured(m.results, m.default)
    deadlines = sweep_deadlines(m.lat1, cfg.deadlines, DEFAULT_MARGIN, [s.call_ms for s in statics])
    rt = _open_runtime(bundle, cfg)
    try:
        costs = StepCosts.from_manifest(_step_costs(m.lat1, m.latN, m.rt, timed))
        rt.set_step_costs(costs)
        sweep = deadline_sweep(rt, hold_x, hold_y, r.thresholds, r.name, deadlines, batch=cfg.batch,
                               margin=DEFAULT_MARGIN, no_deadline_accuracy=r.accuracy, progress=cfg.progress,
                               warmup_ms=cfg.warmup_ms)
    finally:
        rt.close()
    sweep.planned_with = costs.describe()
    for s in statics:
        sweep.add_static(s.name, s.call_ms)
    return sweep


def _featured(results: Sequence[BudgetResult], default: Optional[str]) -> BudgetResult:
    """The budget the gallery and the deadline sweep show: the default one, else the middle one."""
    return next((x for x in results if x.name == default), results[len(results) // 2])


def _step_costs(lat1: StepLatency, latN: Optional[StepLatency], rt: "_RtInfo", timed: str) -> Dict[str, Any]:
    """The manifest ``step_costs`` entry of the measured step latency (smallest batch first)."""
    lats = sorted([lat for lat in (lat1, latN) if lat is not None], key=lambda lat: lat.batch)
    costs = step_costs_entry(lats, rt.backend, rt.precision, rt.threads, timed)
    costs["calibrated"] = _now()
    return costs


def _inputs(cfg: CalibrationConfig) -> List[Path]:
    """The paths calibration reads, which ``--force`` may not delete with an earlier report: the
    bundle, the ``--data`` folder or file (``demo`` names none) and every ``--static`` file."""
    data = [Path(cfg.data)] if cfg.data != "demo" else []
    return [Path(cfg.bundle)] + data + [Path(s) for s in cfg.static]


def run_calibration(cfg: CalibrationConfig) -> Dict[str, Any]:
    """Runs the whole calibration and writes the report (and the budgets into the manifest).

    Returns:
        The report's JSON content.

    Raises:
        InputError: bad bundle, data, options or an infeasible budget (nothing is written).
        UnavailableError: a backend or dependency is missing.
    """
    cfg.validate()
    out = Path(cfg.output)
    inputs = _inputs(cfg)
    check_replace(out, cfg.force, **REPORT_OUTPUT, protect=inputs)
    from gfnet_edge.data.images import check_output_outside

    check_output_outside(out, cfg.data if cfg.data != "demo" else None, "--data")
    try:
        bundle = Bundle.load(cfg.bundle)
    except BundleError as exc:
        raise InputError(str(exc)) from exc
    model = bundle.model
    check_static_meta(cfg.static, model)  # a wrong --static file is named before the data is read
    data = load_calibration_data(cfg.data, model, cfg.num_images, cfg.holdout, cfg.seed, cfg.skip_unreadable)
    device = device_description()
    fit_x, fit_y = data.part("fit")
    hold_x, hold_y = data.part("holdout")

    rt = _open_runtime(bundle, cfg)
    device["timed_on"] = timed_on(device, rt.backend == "tensorrt" or rt.device_loop or cfg.device == "cuda")
    try:
        check_static_sources(cfg.static, StaticPlan.of_runtime(rt))  # before any long work
        m = _run_budgets(rt, data, cfg, device["timed_on"])
        plan = StaticPlan.of_runtime(rt)  # the GFNet loop's capture state after its runs
    finally:
        rt.close()
    results, cost, main_precision = m.results, m.lat1.cost, m.rt.precision

    curve = budgeted_curve(m.fit_probs, m.hold_probs, hold_y, cost)
    anytime = {f"{main_precision} (held-out)": m.hold_anytime,
               f"{main_precision} (fit)": anytime_accuracy(m.fit_probs, fit_y).tolist()}

    # 3. precisions, the static baseline and the deadline sweep
    prec = compare_precisions(bundle, m.rt.backend, main_precision, hold_x, hold_y, m.hold_probs, cost,
                              fit_x[: min(len(fit_x), 32)], {r.name: r.thresholds for r in results}, cfg, _measure,
                              {r.name: r.cost_ms for r in results})
    for r in prec["rows"]:
        if r["precision"] != main_precision:
            anytime[f"{r['precision']} (held-out)"] = r["anytime_accuracy"]
    statics = static_results(cfg, main_precision, hold_x, hold_y, fit_x, model, plan)
    static = [s.to_dict() for s in statics]
    sweep = _run_sweep(bundle, cfg, m, statics, device["timed_on"], hold_x, hold_y)

    names = [r.name for r in results]
    res: Dict[str, Any] = {
        "format": "gfnet-edge-calibration", "version": 1, "created": _now(), "command": cfg.argv,
        "bundle": {"path": str(bundle.root), "model_name": model.model_name, "image_size": model.image_size,
                   "patch_size": model.patch_size, "steps": model.steps, "num_classes": model.num_classes,
                   "class_names": list(model.class_names) if model.class_names is not None else None,
                   "backend": m.rt.backend, "precision": main_precision, "threads": cfg.threads,
                   "macs_cumulative": bundle.manifest.get("costs", {}).get("macs", {}).get("cumulative")},
        "device": device, "data": data.describe(),
        "settings": {"clock": cfg.clock, "batch": cfg.batch, "batch_size": cfg.batch_size, "repeats": cfg.repeats,
                     "warmup": cfg.warmup, "warmup_ms": cfg.warmup_ms, "latency_calls": cfg.latency_calls,
                     "latency_seconds": cfg.latency_seconds, "method": cfg.method, "margin": cfg.margin,
                     "tolerance": list(cfg.tolerance), "attempts": cfg.attempts, "holdout": cfg.holdout,
                     "seed": cfg.seed, "default": cfg.default},
        "latency": {"budget_batch": m.lat1.to_dict(), "other_batch": m.latN.to_dict() if m.latN else None,
                    "camera_resize_ms": camera_resize_ms(model), "history": [h.to_dict() for h in m.history],
                    "stability": stability(m.history, cfg.clock),
                    "stall_warning": stall_warning([x for x in (m.lat1, m.latN) if x is not None],
                                                   cfg.latency_seconds)},
        "anytime": anytime, "full_network_accuracy": m.full_accuracy,
        "reference_curve": {"ps": curve.ps, "ms": curve.cost, "accuracy": curve.accuracy,
                            "note": "thresholds fitted on the fitting split per p, evaluated on the held-out split; "
                                    "ms = exit-model expectation with the measured step latency"},
        "budgets": [r.to_dict() for r in results],
        "precisions": prec, "static": static,
        "technology": {"gfnet": plan.gfnet.to_dict(),
                       "static": [s["technology"] for s in static] or [plan.static.to_dict()]},
        "deadline_sweep": sweep.to_dict() if sweep is not None else None,
        "manifest": {"write": cfg.write_manifest, "budgets": names, "default_budget": m.default,
                     "status": ("budgets " + ", ".join(names) + " written to the bundle manifest; " +
                                (f"default budget {m.default}" if m.default else _default_kept(bundle)))
                     if cfg.write_manifest else "not written (--no-write)"},
        "method_notes": _method_notes(cfg, model.steps),
    }
    res["device"]["load_average_end"] = device_description()["load_average"]
    if plots.available():
        figures = _figures(res, results, cost)
    else:  # a device-side install: the report's tables only
        figures, res["figures_note"] = {}, plots.MISSING_NOTE
    cards = _gallery(results, hold_x, hold_y, data.part_files("holdout"), m.hold_coords, m.hold_probs, model, cfg,
                     m.default)
    res["gallery"] = [c.to_dict() for c in cards]

    with staging_dir(out, force=cfg.force, **REPORT_OUTPUT, protect=inputs) as tmp:
        write_report(tmp, res, figures, cards)
        if cfg.write_manifest:
            _write_manifest(cfg, m, device)
    return res


def _default_kept(bundle: Bundle) -> str:
    """What a calibration without ``--default`` leaves as the bundle's default budget, and how
    to use the budgets it wrote."""
    kept = bundle.manifest.get("default_budget")
    return ((f"the default budget stays {kept}" if kept else "the bundle has no default budget (no early exit)")
            + " (--default auto makes the suggested one the default; predict --budget NAME picks one)")


def _write_manifest(cfg: CalibrationConfig, m: _Measured, device: Dict[str, Any]) -> None:
    """Stores the budgets (and the measured step costs deadlines plan with) in the bundle's manifest."""
    entries = {r.name: _manifest_entry(r, m.rt, cfg, device) for r in m.results}
    costs = _step_costs(m.lat1, m.latN, m.rt, device["timed_on"])

    def upd(man: Dict[str, Any]) -> None:
        man.setdefault("budgets", {}).update(entries)
        man.setdefault("step_costs", {})[step_costs_key(m.rt.backend, m.rt.precision)] = costs
        if m.default:
            man["default_budget"] = m.default

    Bundle.load(cfg.bundle, verify=False).update_manifest(upd)


#: A calibration report as ``--force`` judges one: its marker file and format, and the entries
#: :func:`calibrate.report.write_report` writes (a report folder holding anything else is not replaced).
REPORT_OUTPUT = dict(marker="report.json", fmt="gfnet-edge-calibration", what="calibration report",
                     owned=("report.json", "report.html"))


@dataclass
class _RtInfo:
    backend: str
    precision: str
    threads: Optional[int]


def _figures(res: Dict[str, Any], results: Sequence[BudgetResult], cost: np.ndarray) -> Dict[str, bytes]:
    b = res["bundle"]
    main_any = res["anytime"][f"{b['precision']} (held-out)"]
    figs = {
        "accuracy_latency": plots.accuracy_latency(
            {"ms": res["reference_curve"]["ms"], "accuracy": res["reference_curve"]["accuracy"]},
            [{"name": r.name, "budget_ms": r.budget_ms, "expected_ms": r.holdout.expected_ms,
              "measured_ms": r.run.stats.mean_ms, "accuracy": r.accuracy} for r in results],
            main_any, cost.tolist(),
            [{"name": s["name"], "ms": s["latency"]["mean_ms"], "accuracy": s["accuracy"]} for s in res["static"]],
            f"{b['model_name']} · {b['backend']} {b['precision']} · {res['device']['timed_on']}", res["settings"]["batch"]),
        "anytime": plots.anytime(dict(res["anytime"])),
        "exit_histogram": plots.exit_histogram({r.name: r.exit_fractions for r in results}),
        "stage_breakdown": plots.stage_breakdown({int(k): v for k, v in res["latency"]["budget_batch"]["stages"].items()},
                                                 cost.tolist(), res["settings"]["batch"], res["settings"]["clock"]),
        "latency_histogram": plots.latency_histogram({r.name: r.run.ms for r in results},
                                                     {r.name: r.budget_ms for r in results}),
        "latency_cdf": plots.latency_cdf({r.name: r.run.ms for r in results}, {r.name: r.budget for r in results}),
    }
    sweep = res.get("deadline_sweep")
    if sweep and sweep["rows"]:
        figs["deadline_sweep"] = plots.deadline_sweep(sweep["rows"], sweep["no_deadline_accuracy"], sweep["budget"])
    return figs


def _gallery(results: Sequence[BudgetResult], hold_x, hold_y, hold_files: Optional[List[str]], hold_coords, hold_probs,
             model, cfg: CalibrationConfig, default: Optional[str]) -> List[gal.GalleryCard]:
    if not cfg.gallery or not results:
        return []
    r = _featured(results, default)
    run = r.run
    idx = gal.pick(hold_y, run.classes, run.exit_step, model.steps, cfg.gallery, cfg.seed)
    cards = []
    for i in idx:
        e = int(run.exit_step[i])
        cards.append(gal.GalleryCard(
            index=int(i), label=int(hold_y[i]), pred=int(run.classes[i]), confidence=float(hold_probs[e, i].max()),
            exit_step=e, budget=r.name, correct=bool(run.classes[i] == hold_y[i]), coords=hold_coords[:, i].tolist(),
            png=gal.card(hold_x[i], hold_coords[:, i], e, model.patch_size),
            file=hold_files[i] if hold_files is not None else None))
    return cards


def _method_notes(cfg: CalibrationConfig, T: int) -> List[str]:
    """The report's "How this was measured" paragraphs: those of the parts this run has (tail
    budgets, the deadline sweep) only."""
    tail = any(b.kind.is_tail for b in cfg.given_budgets())
    notes = [
        f"Step latency: cost[k] is the mean {'wall-clock' if cfg.clock == 'wall' else 'calling-thread CPU'} time "
        "per image of Runtime.predict when every image exits at "
        f"step k (thresholds 2.0 before k, -1e8 from k), at batch {cfg.batch}, {cfg.timed_calls()} timed calls per step "
        f"after at least {cfg.warmup} warm-up calls per step and {cfg.warmup_ms:g} ms of warm-up calls, steps "
        "interleaved within each repetition. " + (
            "The first measurement at each batch size (the manifest's step costs, "
            f"whose p99 deadlines plan with) goes on within {cfg.latency_seconds:g} s of timed calls: a step whose p99 "
            "takes in one or two stalls (calls over 1.5x its median) is timed alone (each call right after an untimed "
            "call of the step before it, as when interleaved) until they lie beyond it (101 "
            f"calls for one), then every step up to {cfg.latency_calls} calls. " if cfg.latency_calls > 0 else
            "The first measurement at each batch size (the manifest's step costs, whose p99 deadlines plan with) "
            "was not extended (--latency-calls 0): a lone stall of the device stays in its p99. ") +
        "The call takes the uint8 frames at the model's input size as already cropped "
        "(Runtime.predict(frames, cropped=True): normalised in the runtime, no second resize/crop), so the time "
        "covers the whole path from them (normalisation and glance, backbone graphs, policy, crops, heads, exit "
        "checks). The stage breakdown comes from a separate profiled pass.",
        "Thresholds: the exit-step model expected_ms = sum_k frac_k * cost[k]. The 'search' method maximises the "
        "number of correct fitting images under expected_ms <= budget * (1 - margin) by coordinate ascent over the "
        "per-step thresholds, started from the best solutions of the reference p sweep (q_k proportional to p^k), so "
        "it is never worse than the reference method on the fitting split; ties go to the solution spending more of "
        "the budget. The reference method's held-out accuracy is reported next to it.",
        "Verification: the runtime runs the held-out images with the chosen thresholds, one call per "
        f"{cfg.batch} image(s); 'measured ms' is the mean per-image time of those calls (its percentile, for a tail "
        "budget) and 'accuracy' the runtime's own predictions. When the measurement lies outside the tolerance "
        f"(-{100 * cfg.tolerance[0]:g}%/+{100 * cfg.tolerance[1]:g}% of the budget), the step latency is measured "
        "again (the load may have changed) and the thresholds refitted with the per-step median of all "
        "measurements so far; a refit that picks the same thresholds, or a glance that no longer meets the budget, "
        f"ends the rounds; at most {cfg.attempts} rounds, every round in report.json. Each budget starts from that "
        "median; all measurements are listed under latency.history, and "
        "a spread of more than 10% between their full-model median calls is reported as a warning (another "
        "process used the device, or its clocks changed).",
    ]
    if tail:
        notes.append(
            "Tail budgets (p90, p95, p99): an image exiting at step k takes as long as a call whose images all exit at "
            "k, so the share of images slower than a limit L is sum_k frac_k * e_k(L), where e_k(L) is the share of "
            "step k's timed calls (all step-latency measurements so far) above L. The same threshold search keeps that "
            "share within 1 - q for L = budget * (1 - margin); verification measures the percentile itself, defined "
            "as the fit defines it: the smallest per-image latency with at most 1 - q of the images slower. With tail "
            f"budgets each step is timed at least 10 / (1 - q) times ({cfg.timed_calls()} here).")
    if cfg.deadlines > 0:
        notes.append(
            "Deadline sweep: every held-out image runs through Runtime.predict(..., deadline_ms=D) with the thresholds "
            "of the default budget (else the middle one), the runtime planning each step with the measured p99 step latency; the static "
            "baseline's miss rate at D is the share of its timed calls slower than D (both wall-clock, whatever the "
            "clock of the latency statistics). The deadlines run from the "
            f"glance's p50 ({cfg.deadlines} of them) to {100 * SWEEP_PAD:g}% past the full model's p99 scaled by the "
            f"deadline margin, then, up to as many again, to {100 * SWEEP_PAD:g}% past the slowest static baseline's "
            "p99 call when that is later.")
    notes.append("Budgets are per-image means or percentiles at the stated batch size on this device, backend, "
                 "precision and thread count; recalibrate when any of them changes.")
    return notes
