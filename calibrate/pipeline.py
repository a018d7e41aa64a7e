"""``gfnet-edge calibrate``: measure, fit, verify, compare, report, write budgets."""
from __future__ import annotations

import datetime as _dt
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from gfnet_edge.bundle import Bundle, BundleError, check_replace, staging_dir
from gfnet_edge.errors import InputError
from gfnet_edge.evaluate import anytime_accuracy, budgeted_curve, dynamic_evaluate
from gfnet_edge.log import logger
from gfnet_edge.runtime.deadline import step_costs_entry, step_costs_key

from . import gallery as gal
from . import plots
from .data import load_calibration_data
from .fit import budget_name, check_feasible, default_budgets, fit_budget
from .latency import CLOCKS, StepLatency, camera_resize_ms, device_description, measure_calls, measure_steps
from .precision import comparable_precisions, compare, trace_frames
from .report import write_report
from .static import static_baselines


@dataclass
class CalibrationConfig:
    """Options of one calibration (the CLI's flags).

    Attributes:
        bundle: bundle directory.
        data: ``demo``, a folder with class subfolders, or an ``.npz`` with labels.
        output: report directory (written atomically).
        budgets_ms: mean per-image latency budgets (ms); empty: three spread between the glance's and
            the full model's latency.
        backend, precision, threads, dla_core, head_dtype: how the runtime runs (as ``Runtime``).
        batch: images per ``predict`` call for which budgets are fitted and verified.
        batch_size: a second batch size whose step latency is measured (throughput; 0: none).
        num_images: calibration images used (``demo``: how many are generated).
        holdout: held-out fraction.
        method: ``search`` or ``reference`` threshold fitting.
        margin: safety margin of the fit (fraction of the budget).
        tolerance: (below, above) fractions of the budget the measured mean latency must lie in.
        attempts: fit/verify rounds per budget (a later round re-measures the step latency and
            refits when the previous round's measured latency was outside the tolerance).
        repeats, warmup: timed and untimed calls per step for the latency measurement.
        static: static baselines (checkpoint or ONNX), optional.
        static_int8: also quantize each static baseline to INT8 (ONNX Runtime, CPU profile).
        compare_precisions: trace the other precisions of the bundle.
        write_manifest: store the budgets in the bundle's manifest.
        default: make this budget (a name or a ms value) the bundle's default.
        force: replace an existing report directory.
        gallery: number of gallery images.
        seed: split seed.
        clock: ``wall`` (wall-clock latency) or ``cpu`` (CPU time of the calling thread; needs
            ``threads=1``; for shared machines whose other load would distort wall-clock times).
        progress: show progress bars.
    """

    bundle: str
    data: str
    output: str
    budgets_ms: Sequence[float] = ()
    backend: str = "auto"
    precision: str = "auto"
    threads: Optional[int] = None
    dla_core: Optional[int] = None
    head_dtype: str = "float32"
    batch: int = 1
    batch_size: int = 8
    num_images: Optional[int] = None
    holdout: float = 0.5
    method: str = "search"
    margin: float = 0.03
    tolerance: Tuple[float, float] = (0.10, 0.05)
    attempts: int = 3
    repeats: int = 60
    warmup: int = 5
    static: Sequence[str] = ()
    static_int8: bool = False
    compare_precisions: bool = True
    write_manifest: bool = True
    default: Optional[str] = None
    force: bool = False
    gallery: int = 12
    seed: int = 0
    clock: str = "wall"
    progress: bool = True
    argv: List[str] = field(default_factory=list)

    def validate(self) -> "CalibrationConfig":
        if self.batch < 1:
            raise InputError(f"--batch must be >= 1, got {self.batch}")
        if self.batch_size < 0:
            raise InputError(f"--batch-size must be >= 0, got {self.batch_size}")
        if self.repeats < 5 or self.warmup < 0:
            raise InputError(f"--repeats must be >= 5 and --warmup >= 0 (got {self.repeats}, {self.warmup})")
        if self.attempts < 1:
            raise InputError(f"--attempts must be >= 1, got {self.attempts}")
        for b in self.budgets_ms:
            if not np.isfinite(b) or b <= 0:
                raise InputError(f"--budget-ms values must be positive milliseconds, got {b}")
        if len({budget_name(b) for b in self.budgets_ms}) != len(self.budgets_ms):
            raise InputError(f"--budget-ms has duplicates: {list(self.budgets_ms)}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be >= 1, got {self.threads}")
        if self.clock not in CLOCKS:
            raise InputError(f"--clock must be one of {', '.join(CLOCKS)}, got {self.clock!r}")
        if self.clock == "cpu" and self.threads != 1:
            raise InputError("--clock cpu measures the calling thread only: use it with --threads 1")
        return self


class _Progress:
    """A tqdm bar (or nothing) with an ``update`` that accepts counts."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="call", leave=False, file=sys.stderr, dynamic_ncols=True)

    def __call__(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _where(rt) -> str:
    return f"on this device ({rt.backend} {rt.precision}, threads {rt.threads or 'default'})"


def _measure(rt, frames: np.ndarray, batch: int, cfg: CalibrationConfig, desc: str, stage_calls: int = 20) -> StepLatency:
    T = int(rt.model["steps"])
    total = T * (cfg.warmup + cfg.repeats + stage_calls)
    bar = _Progress(cfg.progress, total, desc)
    try:
        return measure_steps(rt, frames, batch=batch, repeats=cfg.repeats, warmup=cfg.warmup, stage_calls=stage_calls,
                             progress=bar, clock=CLOCKS[cfg.clock])
    finally:
        bar.close()


def _pooled(history: Sequence[Dict[str, Any]]) -> np.ndarray:
    """Per-step median of the step-latency measurements so far (robust to one taken under a load spike)."""
    return np.median(np.asarray([h["cost_ms"] for h in history], dtype=np.float64), axis=0)


def _starting_cost(budget: float, history: Sequence[Dict[str, Any]]) -> Tuple[np.ndarray, Optional[str]]:
    """The step latency a budget's fit starts from, and a note when it is not the pooled one.

    Normally the per-step median of all measurements so far. Every budget was checked against the
    first measurement, but when the device has slowed down since (another process took the CPU),
    the pooled glance latency can exceed a small budget, and no thresholds could be fitted. The fit
    then starts from the most recent measurement under which the budget can be met, and the note
    says so; the verification run measures what the device does now, and the tolerance check
    reports it.

    Args:
        budget: the budget (ms per image).
        history: the measurements, oldest first, each with ``cost_ms``; the first met ``budget``.

    Returns:
        ``(cost, note)``: the cumulative per-step latency (ms) and ``None`` or the note.
    """
    pooled = _pooled(history)
    if budget >= pooled[0]:
        return pooled, None
    feasible = [h for h in history if h["cost_ms"][0] <= budget]
    if not feasible:  # callers check every budget against the first measurement; this is a bug if reached
        raise RuntimeError(f"budget {budget} ms is below the glance latency of every measurement")
    h = feasible[-1]
    note = (f"the device slowed down during calibration: the glance now takes {pooled[0]:.3f} ms (median of "
            f"{len(history)} measurements), above this budget; thresholds were fitted with the step latency "
            f"measured at '{h['when']}' (glance {h['cost_ms'][0]:.3f} ms)")
    return np.asarray(h["cost_ms"], dtype=np.float64), note


def _fit_and_verify(rt, budget: float, fit_probs, fit_y, hold_probs, hold_y, hold_frames, cost: np.ndarray,
                    cfg: CalibrationConfig, remeasure: Callable[[str], np.ndarray],
                    note: Optional[str] = None) -> Dict[str, Any]:
    """Fits thresholds for one budget and verifies them by running the runtime on the held-out images.

    When the measured mean latency is outside the tolerance, the step latency is measured again
    (``remeasure``: the device's load may have changed since; it returns the per-step median of all
    measurements so far) and the thresholds refitted; a refit that picks the same thresholds ends
    the rounds.

    Args:
        note: why ``cost`` is not the pooled step latency (:func:`_starting_cost`), kept in the results.

    Returns:
        The budget's results; ``cost_ms`` is the step latency the final thresholds were fitted with.
    """
    lo, hi = cfg.tolerance
    T = len(cost)
    clock = CLOCKS[cfg.clock]
    c = cost
    fit = fit_budget(fit_probs, fit_y, c, budget, margin=cfg.margin, method=cfg.method)
    attempts = []
    for attempt in range(cfg.attempts):
        hold = dynamic_evaluate(hold_probs, hold_y, c, fit.thresholds)
        bar = _Progress(cfg.progress, len(hold_frames), f"verify {budget_name(budget)}")
        try:
            run = measure_calls(rt, hold_frames, fit.thresholds, batch=cfg.batch, warmup=cfg.warmup, progress=bar,
                                clock=clock)
        finally:
            bar.close()
        fr = np.bincount(run.exit_step, minlength=T) / len(run.exit_step)
        model_ms = float((fr * c).sum())
        measured = run.stats.mean_ms
        ok = (1 - lo) * budget <= measured <= (1 + hi) * budget
        attempts.append({"attempt": attempt, "cost_ms": [float(x) for x in c], "thresholds": fit.thresholds.tolist(),
                         "fit_expected_ms": fit.expected_ms, "holdout_expected_ms": hold.expected_cost,
                         "model_ms_of_run": model_ms, "measured_ms": measured, "within_tolerance": ok})
        if ok or attempt + 1 == cfg.attempts:
            break
        new_c = remeasure(f"re-measure {budget_name(budget)}")
        if budget < new_c[0]:
            break  # the glance alone now exceeds the budget: keep the verified result
        new_fit = fit_budget(fit_probs, fit_y, new_c, budget, margin=cfg.margin, method=cfg.method)
        if np.array_equal(new_fit.thresholds, fit.thresholds):
            break  # the step latency measured now gives the same thresholds: nothing to re-verify
        logger.info("%s: measured %.3f ms vs model %.3f ms; step latency re-measured (%s ms), refitting",
                    budget_name(budget), measured, model_ms, ", ".join(f"{x:.2f}" for x in new_c))
        c, fit = new_c, new_fit
    ref = fit_budget(fit_probs, fit_y, c, budget, margin=cfg.margin, method="reference") if cfg.method != "reference" \
        else fit
    ref_hold = dynamic_evaluate(hold_probs, hold_y, c, ref.thresholds)
    rt_acc = 100.0 * float((run.classes == hold_y).mean())
    return {
        "name": budget_name(budget), "budget_ms": float(budget), "thresholds": fit.thresholds.tolist(),
        "fit": fit.to_dict(),
        "holdout": {"accuracy": hold.accuracy, "expected_ms": hold.expected_cost,
                    "exit_fractions": (hold.exit_counts / hold.exit_counts.sum()).tolist()},
        "measured": {**run.stats.to_dict(), "accuracy": rt_acc,
                     "exit_fractions": fr.tolist(), "batch": cfg.batch, "images": int(len(hold_frames))},
        "consistent_with_trace": bool(np.array_equal(run.exit_step, hold.exit_step) and
                                      np.array_equal(run.classes, hold.prediction)),
        "within_tolerance": attempts[-1]["within_tolerance"],
        "cost_ms": [float(x) for x in c], "note": note,
        "attempts": attempts,
        "reference_method": {"thresholds": ref.thresholds.tolist(), "p": ref.p, "accuracy": ref_hold.accuracy,
                             "expected_ms": ref_hold.expected_cost, "fit_accuracy": ref.accuracy},
        "_run": run,
    }


def _stability(history: List[Dict[str, Any]], clock: str) -> Dict[str, Any]:
    """Spread of the full model's latency over the repeated step-latency measurements."""
    full = [h["cost_ms"][-1] for h in history]
    spread = 100.0 * (max(full) - min(full)) / min(full)
    out: Dict[str, Any] = {"full_model_ms": full, "spread_pct": spread, "warning": None}
    if spread > 10.0:
        out["warning"] = (f"the step latency changed by {spread:.0f}% during calibration ({min(full):.2f} to "
                          f"{max(full):.2f} ms for the full model): the device was not idle, so measured latencies "
                          "follow its load; calibrate on an idle device" +
                          (" (or use --clock cpu --threads 1)" if clock == "wall" else ""))
    return out


def _manifest_entry(b: Dict[str, Any], rt, cfg: CalibrationConfig, device: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "thresholds": b["thresholds"], "unit": "ms", "budget_ms": b["budget_ms"],
        "expected_ms": b["holdout"]["expected_ms"], "measured_ms": b["measured"]["mean_ms"],
        "measured_p95_ms": b["measured"]["p95_ms"], "accuracy": b["measured"]["accuracy"],
        "exit_fractions": b["measured"]["exit_fractions"], "method": cfg.method,
        "backend": rt.backend, "precision": rt.precision, "threads": rt.threads, "batch": cfg.batch, "clock": cfg.clock,
        "device": device["cpu"], "data": cfg.data,
        **({"dla_core": cfg.dla_core} if cfg.dla_core is not None else {}),
        **({"head_dtype": cfg.head_dtype} if cfg.head_dtype != "float32" else {}),
        "calibrated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": "gfnet-edge calibrate",
    }


def _resolve_default(cfg: CalibrationConfig, names: List[str]) -> Optional[str]:
    if cfg.default is None:
        return None
    d = cfg.default
    if d in names:
        return d
    try:
        n = budget_name(float(d))
    except ValueError:
        n = d
    if n in names:
        return n
    raise InputError(f"--default {d!r} is not one of the calibrated budgets ({', '.join(names)})")


def run_calibration(cfg: CalibrationConfig) -> Dict[str, Any]:
    """Runs the whole calibration and writes the report (and the budgets into the manifest).

    Returns:
        The report's JSON content.

    Raises:
        InputError: bad bundle, data, options or an infeasible budget (nothing is written).
        UnavailableError: a backend or dependency is missing.
    """
    from gfnet_edge.runtime import Runtime

    cfg.validate()
    out = Path(cfg.output)
    check_replace(out, cfg.force, **_REPORT_OUTPUT, protect=[Path(cfg.bundle)])
    try:
        bundle = Bundle.load(cfg.bundle)
    except BundleError as exc:
        raise InputError(str(exc)) from exc
    model = bundle.model
    T = int(model["steps"])
    data = load_calibration_data(cfg.data, model, cfg.num_images, cfg.holdout, cfg.seed)
    device = device_description()
    fit_x, fit_y = data.part("fit")
    hold_x, hold_y = data.part("holdout")
    lat_frames = fit_x[: min(len(fit_x), 32)]

    rt = Runtime(bundle, backend=cfg.backend, precision=cfg.precision, threads=cfg.threads, profile=True,
                 dla_core=cfg.dla_core, head_dtype=cfg.head_dtype)
    try:
        # 1. latency of each step on this device
        lat1 = _measure(rt, lat_frames, cfg.batch, cfg, f"latency b={cfg.batch}")
        cost = lat1.cost
        budgets = list(cfg.budgets_ms) or default_budgets(cost)
        for b in budgets:  # infeasible budgets and a bad --default fail before any long work
            check_feasible(b, cost, _where(rt))
        default = _resolve_default(cfg, [budget_name(b) for b in budgets])
        latN = None
        if cfg.batch_size and cfg.batch_size != cfg.batch:
            latN = _measure(rt, lat_frames, cfg.batch_size, cfg, f"latency b={cfg.batch_size}", stage_calls=5)
        # 2. trace, fit, verify
        bar = _Progress(cfg.progress, len(data.labels), "trace")
        try:
            fit_probs, fit_coords = trace_frames(rt, fit_x, progress=bar)
            hold_probs, hold_coords = trace_frames(rt, hold_x, progress=bar)
        finally:
            bar.close()
        history = [{"when": "start", "cost_ms": cost.tolist(), "calls": cfg.repeats}]
        quick = CalibrationConfig(**{**asdict(cfg), "repeats": max(10, cfg.repeats // 2)})

        def remeasure(why: str) -> np.ndarray:
            c = _measure(rt, lat_frames, cfg.batch, quick, why, stage_calls=0).cost
            history.append({"when": why, "cost_ms": c.tolist(), "calls": quick.repeats})
            return _pooled(history)

        results = []
        for b in budgets:  # each budget starts from all step-latency measurements so far, pooled
            start, note = _starting_cost(b, history)
            if note:
                logger.warning("%s: %s", budget_name(b), note)
            results.append(_fit_and_verify(rt, b, fit_probs, fit_y, hold_probs, hold_y, hold_x, start, cfg,
                                           remeasure, note=note))
        remeasure("end")  # for the stability check only
        main_precision = rt.precision
        backend = rt.backend
    finally:
        rt.close()

    curve = budgeted_curve(fit_probs, hold_probs, hold_y, cost)
    anytime = {f"{main_precision} (held-out)": anytime_accuracy(hold_probs, hold_y).tolist(),
               f"{main_precision} (fit)": anytime_accuracy(fit_probs, fit_y).tolist()}

    # 3. precisions and the static baseline
    prec = _compare_precisions(bundle, backend, main_precision, hold_x, hold_y, hold_probs, cost, lat_frames, results,
                               cfg)
    if prec.get("rows"):
        for r in prec["rows"]:
            if r["precision"] != main_precision:
                anytime[f"{r['precision']} (held-out)"] = r["anytime_accuracy"]
    static = ([s.to_dict() for s in static_baselines(list(cfg.static), hold_x, hold_y, fit_x, model, cfg.threads,
                                                    static_int8(cfg, main_precision), repeats=max(cfg.repeats, 50),
                                                    batch=cfg.batch, clock=CLOCKS[cfg.clock])]
              if cfg.static else [])

    names = [r["name"] for r in results]
    res: Dict[str, Any] = {
        "format": "gfnet-edge-calibration", "version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": cfg.argv,
        "bundle": {"path": str(bundle.root), "model_name": model["model_name"], "image_size": model["image_size"],
                   "patch_size": model["patch_size"], "steps": T, "num_classes": model.get("num_classes"),
                   "backend": backend, "precision": main_precision, "threads": cfg.threads,
                   "macs_cumulative": bundle.manifest.get("costs", {}).get("macs", {}).get("cumulative")},
        "device": device, "data": data.describe(),
        "settings": {"clock": cfg.clock, "batch": cfg.batch, "batch_size": cfg.batch_size, "repeats": cfg.repeats, "warmup": cfg.warmup,
                     "method": cfg.method, "margin": cfg.margin, "tolerance": list(cfg.tolerance),
                     "attempts": cfg.attempts, "holdout": cfg.holdout, "seed": cfg.seed},
        "latency": {"budget_batch": lat1.to_dict(), "other_batch": latN.to_dict() if latN else None,
                    "camera_resize_ms": camera_resize_ms(model), "history": history,
                    "stability": _stability(history, cfg.clock)},
        "anytime": anytime,
        "reference_curve": {"ps": curve.ps, "ms": curve.cost, "accuracy": curve.accuracy,
                            "note": "thresholds fitted on the fitting split per p, evaluated on the held-out split; "
                                    "ms = exit-model expectation with the measured step latency"},
        "budgets": [{k: v for k, v in r.items() if k != "_run"} for r in results],
        "precisions": prec, "static": static,
        "manifest": {"write": cfg.write_manifest, "budgets": names, "default_budget": default,
                     "status": ("budgets " + ", ".join(names) + " written to the bundle manifest" +
                                (f"; default budget {default}" if default else "")) if cfg.write_manifest
                     else "not written (--no-write)"},
        "method_notes": _method_notes(cfg, T),
    }
    res["device"]["load_average_end"] = device_description()["load_average"]
    if plots.available():
        figures = _figures(res, results, cost)
    else:  # a device-side install: the report's tables only
        figures, res["figures_note"] = {}, plots.MISSING_NOTE
    cards = _gallery(results, hold_x, hold_y, hold_coords, hold_probs, model, cfg, default)
    res["gallery"] = [{k: v for k, v in c.items() if k != "png"} for c in cards]

    with staging_dir(out, force=cfg.force, **_REPORT_OUTPUT, protect=[Path(cfg.bundle)]) as tmp:
        write_report(tmp, res, figures, cards)
        if cfg.write_manifest:
            entries = {r["name"]: _manifest_entry(r, _RtInfo(backend, main_precision, cfg.threads), cfg, device)
                       for r in results}
            lats = sorted([lat for lat in (lat1, latN) if lat is not None], key=lambda lat: lat.batch)
            costs = step_costs_entry(lats, backend, main_precision, cfg.threads, device["cpu"])
            costs["calibrated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

            def upd(m: Dict[str, Any]) -> None:
                m.setdefault("budgets", {}).update(entries)
                m.setdefault("step_costs", {})[step_costs_key(backend, main_precision)] = costs
                if default:
                    m["default_budget"] = default

            Bundle.load(cfg.bundle, verify=False).update_manifest(upd)
    return res


#: What ``--force`` may replace: an earlier report (its report.json says so) or an empty folder.
_REPORT_OUTPUT = dict(marker="report.json", fmt="gfnet-edge-calibration", what="calibration report")


def static_int8(cfg: CalibrationConfig, precision: str) -> bool:
    """Whether the static baselines are also measured in INT8: asked for (``--static-int8``), or
    the calibrated runtime runs INT8 graphs, so that INT8 GFNet is compared with an INT8 static
    network as well as the FP32 one."""
    return bool(cfg.static_int8) or str(precision).startswith("int8")


@dataclass
class _RtInfo:
    backend: str
    precision: str
    threads: Optional[int]


def _compare_precisions(bundle: Bundle, backend: str, main: str, hold_x, hold_y, hold_probs, cost, lat_frames,
                        results, cfg: CalibrationConfig) -> Dict[str, Any]:
    from gfnet_edge.runtime import Runtime

    sets = comparable_precisions(bundle.manifest, backend)
    if not cfg.compare_precisions or len(sets) < 2:
        return {"reference": None, "rows": [],
                "note": f"The bundle holds one precision for {backend} ({', '.join(sets) or main}); build it with "
                        "--precision int8 to compare INT8 with FP32." if len(sets) < 2 else "comparison skipped"}
    per: Dict[str, Dict[str, Any]] = {main: {"probs": hold_probs, "cost_ms": cost}}
    for p in sets:
        if p == main:
            continue
        rt = Runtime(bundle, backend=backend, precision=p, threads=cfg.threads, profile=True, dla_core=cfg.dla_core,
                     head_dtype=cfg.head_dtype)
        try:
            bar = _Progress(cfg.progress, len(hold_x), f"trace {p}")
            try:
                probs, _ = trace_frames(rt, hold_x, progress=bar)
            finally:
                bar.close()
            sub = CalibrationConfig(**{**asdict(cfg), "repeats": max(10, cfg.repeats // 2)})
            lat = _measure(rt, lat_frames, cfg.batch, sub, f"latency {p}", stage_calls=0)
        finally:
            rt.close()
        per[p] = {"probs": probs, "cost_ms": lat.cost}
    out = compare(per, hold_y, {r["name"]: r["thresholds"] for r in results})
    out["note"] = (f"Thresholds are the ones fitted for {main}; the other precision's expected ms uses its own "
                   "measured step latency.")
    return out


def _figures(res: Dict[str, Any], results, cost: np.ndarray) -> Dict[str, bytes]:
    b = res["bundle"]
    main_any = res["anytime"][f"{b['precision']} (held-out)"]
    figs = {
        "accuracy_latency": plots.accuracy_latency(
            {"ms": res["reference_curve"]["ms"], "accuracy": res["reference_curve"]["accuracy"]},
            [{"name": r["name"], "budget_ms": r["budget_ms"], "expected_ms": r["holdout"]["expected_ms"],
              "measured_ms": r["measured"]["mean_ms"], "accuracy": r["measured"]["accuracy"]} for r in results],
            main_any, cost.tolist(),
            [{"name": s["name"], "ms": s["latency"]["mean_ms"], "accuracy": s["accuracy"]} for s in res["static"]],
            f"{b['model_name']} · {b['backend']} {b['precision']} · {res['device']['cpu']}", res["settings"]["batch"]),
        "anytime": plots.anytime({k: v for k, v in res["anytime"].items()}),
        "exit_histogram": plots.exit_histogram({r["name"]: r["measured"]["exit_fractions"] for r in results}),
        "stage_breakdown": plots.stage_breakdown({int(k): v for k, v in res["latency"]["budget_batch"]["stages"].items()},
                                                 cost.tolist(), res["settings"]["batch"], res["settings"]["clock"]),
        "latency_histogram": plots.latency_histogram({r["name"]: r["_run"].ms for r in results},
                                                     {r["name"]: r["budget_ms"] for r in results}),
    }
    return figs


def _gallery(results, hold_x, hold_y, hold_coords, hold_probs, model, cfg: CalibrationConfig,
             default: Optional[str]) -> List[Dict[str, Any]]:
    if not cfg.gallery or not results:
        return []
    r = next((x for x in results if x["name"] == default), results[len(results) // 2])
    run = r["_run"]
    T = int(model["steps"])
    idx = gal.pick(hold_y, run.classes, run.exit_step, T, cfg.gallery, cfg.seed)
    cards = []
    for i in idx:
        e = int(run.exit_step[i])
        cards.append({"index": int(i), "label": int(hold_y[i]), "pred": int(run.classes[i]),
                      "confidence": float(hold_probs[e, i].max()), "exit_step": e, "budget": r["name"],
                      "correct": bool(run.classes[i] == hold_y[i]), "coords": hold_coords[:, i].tolist(),
                      "png": gal.card(hold_x[i], hold_coords[:, i], e, int(model["patch_size"]))})
    return cards


def _method_notes(cfg: CalibrationConfig, T: int) -> List[str]:
    return [
        f"Step latency: cost[k] is the mean {'wall-clock' if cfg.clock == 'wall' else 'calling-thread CPU'} time "
        "per image of Runtime.predict when every image exits at "
        f"step k (thresholds 2.0 before k, -1e8 from k), at batch {cfg.batch}, {cfg.repeats} timed calls per step "
        f"after {cfg.warmup} warm-up calls, steps interleaved within each repetition. The time covers normalising "
        "the uint8 S x S frame (ops.preprocess, no second resize/crop) and the whole predict call (glance resize, "
        "backbone graphs, policy, crops, heads, exit checks). The stage breakdown comes from a separate profiled pass.",
        "Thresholds: the exit-step model expected_ms = sum_k frac_k * cost[k]. The 'search' method maximises the "
        "number of correct fitting images under expected_ms <= budget * (1 - margin) by coordinate ascent over the "
        "per-step thresholds, started from the best solutions of the reference p sweep (q_k proportional to p^k), so "
        "it is never worse than the reference method on the fitting split; ties go to the solution spending more of "
        "the budget. The reference method's held-out accuracy is reported next to it.",
        "Verification: the runtime runs the held-out images with the chosen thresholds, one call per "
        f"{cfg.batch} image(s); 'measured ms' is the mean per-image time of those calls and 'accuracy' the runtime's "
        "own predictions. When the measurement differs from the exit-step model by more than 2% and lies outside the "
        "tolerance, the step latency is measured again (the load may have changed) and the thresholds refitted "
        f"with the per-step median of all measurements so far; at most {cfg.attempts} rounds, every round in "
        "report.json. Each budget starts from that median; all measurements are listed under latency.history, and "
        "a spread of more than 10% between them is reported as a warning (the device was not idle).",
        "Budgets are per-image means at the stated batch size on this device, backend, precision and thread count; "
        "recalibrate when any of them changes.",
    ]
