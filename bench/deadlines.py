"""Per-frame deadlines on the CPU, demo model, batch 1: how often a call overruns its deadline,
the accuracy GFNet keeps, and how often the static network would miss the same deadline.

    python bench/deadlines.py [--images 300] [--threads 1] [--out bench/results/deadlines.md]
        [--deadline-ms MS ...] [--latency-calls 300] [--latency-seconds 5]
        [--stall-ms MS [--stall-step K] [--stall-at 20]] [--no-retime] [--no-step-checks]

Builds an FP32 bundle of the shipped demo checkpoint, measures its per-step latency the way
``gfnet-edge calibrate`` does (every image forced to exit at step k, interleaved), and plans
deadlines with the p99 of those measurements (the step costs calibration records in the
manifest). ``--stall-ms`` stalls that measurement once, as the device pausing would: the
``--stall-at``-th timed call of step ``--stall-step`` sleeps that long before its end is read;
``--no-retime`` leaves a step whose p99 takes in a lone stall as its interleaved calls measured
it (calibrate times it alone until the stall lies beyond its p99). Then for deadlines spread
from just above the glance step's p99 to the full model's p99 (or those of ``--deadline-ms``)
it runs each held-out test frame alone through ``Runtime.predict(frame, deadline_ms=D)`` at the
bundle's default budget and records the wall-clock time of every call. The static baseline
(the shipped static network, exported to ONNX, on the same threads) is timed on the same frames:
its miss rate at D is the share of its calls slower than D.

Then ``gfnet-edge calibrate`` (the Python API, same bundle and threads) fits tail budgets
(``--tail p95 p99``) whose limit is the full model's median step latency (on ``--tail-clock``),
and verifies them on held-out demo test images, ``--tail-runs`` times with different fit /
held-out splits: the measured percentile is reported next to the budget for every run. Writes
``--out`` and a ``.json``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, machine, table, write_report  # noqa: E402


def _load() -> float:
    """The machine's 1-minute load average (other processes sharing the cores)."""
    import os

    return round(os.getloadavg()[0], 1)


def _log(msg: str) -> None:
    print(f"[deadlines] {msg}", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300, help="held-out demo test frames, one per call")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--deadlines", type=int, default=6, help="deadlines between the glance p50 and the full p99")
    ap.add_argument("--deadline-ms", type=float, nargs="+", metavar="MS",
                    help="these deadlines instead (the same in runs that measure the step latency differently)")
    ap.add_argument("--margin", type=float, default=None, help="deadline margin (default: the runtime's)")
    ap.add_argument("--plan-stat", choices=["p99", "p95", "p50"], default="p99",
                    help="step-latency percentile the deadlines plan with (default p99, the runtime's)")
    ap.add_argument("--tail", nargs="*", default=["p95", "p99"],
                    help="tail budgets to calibrate at the full model's p50 step latency (none: skip)")
    ap.add_argument("--calib-images", type=int, default=600, help="demo test images of the tail calibration")
    ap.add_argument("--tail-runs", type=int, default=3, help="tail calibrations, each with its own fit/held-out split")
    ap.add_argument("--tail-clock", choices=["wall", "cpu"], default="wall",
                    help="clock of the tail calibration (cpu: calling-thread CPU time, for a loaded shared machine)")
    ap.add_argument("--latency-calls", type=int, default=300, help="as calibrate --latency-calls")
    ap.add_argument("--latency-seconds", type=float, default=5.0, help="as calibrate --latency-seconds")
    ap.add_argument("--stall-ms", type=float, default=0.0, help="one stall of this many ms in the step latency")
    ap.add_argument("--stall-step", type=int, default=None,
                    help="the step whose timed call stalls (default: the last, whose calls also give the focus "
                         "steps' costs between step checks; with --no-step-checks, step 1)")
    ap.add_argument("--stall-at", type=int, default=20, help="which of its timed calls stalls (0-based, < 60)")
    ap.add_argument("--no-retime", action="store_true",
                    help="do not time a step alone whose p99 takes in a lone stall")
    ap.add_argument("--no-step-checks", action="store_true",
                    help="plan the focus steps with the increments of the cumulative latency, not with their "
                         "time from one step check to the next (as entries calibrated without it)")
    ap.add_argument("--out", default=str(RESULTS / "deadlines.md"))
    args = ap.parse_args(argv)
    if args.tail_clock == "cpu" and args.threads != 1:
        ap.error("--tail-clock cpu times the calling thread only: use it with --threads 1")
    if not (args.latency_seconds > 0 and np.isfinite(args.latency_seconds)) or args.latency_calls < 0:
        ap.error("--latency-seconds must be a finite number > 0 and --latency-calls >= 0")
    if args.deadline_ms and not all(np.isfinite(d) and d > 0 for d in args.deadline_ms):
        ap.error("--deadline-ms values must be finite numbers > 0")
    if args.stall_ms < 0 or not 0 <= args.stall_at < 60:
        ap.error("--stall-ms must be >= 0 and --stall-at in [0, 60)")

    from gfnet_edge.build import BuildConfig, build_bundle
    from gfnet_edge.calibrate.latency import measure_steps
    from gfnet_edge.calibrate.static import evaluate_static, export_static
    from gfnet_edge.data import ClutteredDigits, demo_config
    from gfnet_edge.demo import DEMO_CHECKPOINT, DEMO_STATIC
    from gfnet_edge.runtime import Runtime
    from gfnet_edge.runtime.api import DEFAULT_MARGIN
    from gfnet_edge.runtime.deadline import StepCosts, step_costs_entry

    margin = DEFAULT_MARGIN if args.margin is None else args.margin
    t_start = time.perf_counter()
    res: Dict[str, Any] = {"machine": machine(), "threads": args.threads, "margin": margin, "rows": [],
                           "plan_stat": args.plan_stat, "stall_ms": args.stall_ms, "retime": not args.no_retime,
                           "step_checks": not args.no_step_checks,
                           "load_average": [_load()]}
    with tempfile.TemporaryDirectory(prefix="gfnet-deadlines-") as tmp:
        bundle = build_bundle(DEMO_CHECKPOINT, Path(tmp) / "bundle", BuildConfig(precision="fp32", backend="onnxruntime"),
                              progress=False).root
        rt = Runtime(bundle, backend="onnxruntime", precision="fp32", threads=args.threads)
        model = rt.model
        cfg = demo_config(model)
        lat_x, _ = ClutteredDigits("val", config=cfg).arrays(64, progress=False)
        x, y = ClutteredDigits("test", config=cfg).arrays(args.images, progress=False)
        y = np.asarray(y)
        _log("measuring the per-step latency (as gfnet-edge calibrate does)")
        if args.stall_step is None:
            args.stall_step = 1 if args.no_step_checks else model.steps - 1
        if not 0 <= args.stall_step < model.steps:
            ap.error(f"--stall-step must be in [0, {model.steps})")
        clock = _stalling_clock(model.steps, args.stall_step, args.stall_at, args.stall_ms)
        res["stall_step"], res["stall_at"] = args.stall_step, args.stall_at
        lat = measure_steps(rt, lat_x, batch=1, repeats=60, stage_calls=0, extend_to=args.latency_calls,  # as calibrate
                            extend_seconds=args.latency_seconds, retime_stalls=not args.no_retime, clock=clock)
        entry = step_costs_entry([lat], "onnxruntime", rt.precision, args.threads, "cpu")
        if args.no_step_checks:
            entry["batches"][0].pop("increments", None)
        costs = StepCosts.from_manifest(entry, stat=f"{args.plan_stat}_ms")
        rt.set_step_costs(costs)
        res["step_latency"] = entry
        res["plan_ms"] = list(costs.step_ms)
        steps = [s.to_dict() for s in lat.steps]
        # from just above the glance step's p99 (below it the glance alone, which always runs,
        # overruns) to the full model's p99
        lo, hi = 1.05 * steps[0]["p99_ms"], steps[-1]["p99_ms"]
        if lo >= hi:  # a glance tail longer than the full model's (a loaded machine): from the glance's p50
            lo = steps[0]["p50_ms"]
        deadlines = args.deadline_ms or np.linspace(lo, max(hi, lo), args.deadlines).tolist()
        res["glance_ms"] = {"p50": steps[0]["p50_ms"], "p99": steps[0]["p99_ms"]}
        res["full_ms"] = {"p50": steps[-1]["p50_ms"], "p99": steps[-1]["p99_ms"]}
        _log(f"budget {rt.budget}; deadlines {', '.join(f'{d:.2f}' for d in deadlines)} ms")

        (Path(tmp) / "static").mkdir()
        onnx_path, _ = export_static(DEMO_STATIC, Path(tmp) / "static")
        static = evaluate_static(onnx_path, "static fp32", x, y, model, args.threads, x[:8], repeats=1, batch=1)
        static_ms = _static_latencies(onnx_path, model, x, args.threads)
        res["static"] = {"accuracy": static.accuracy, "p50_ms": float(np.percentile(static_ms, 50)),
                         "p99_ms": float(np.percentile(static_ms, 99))}
        free = rt.predict(x)
        res["no_deadline"] = {"accuracy": 100.0 * float((free.classes == y).mean()),
                              "mean_steps": float(free.exit_step.mean() + 1)}
        for d in deadlines:
            ms, classes, exits, stopped = [], [], [], []
            for i in range(len(x)):
                f = x[i:i + 1]
                t0 = time.perf_counter()
                p = rt.predict(f, deadline_ms=d, deadline_margin=margin)
                ms.append((time.perf_counter() - t0) * 1e3)
                classes.append(int(p.classes[0]))
                exits.append(int(p.exit_step[0]))
                stopped.append(bool(p.deadline_stopped[0]))
            ms_a = np.asarray(ms)
            row = {"deadline_ms": d, "accuracy": 100.0 * float((np.asarray(classes) == y).mean()),
                   "over_10pct": 100.0 * float((ms_a > 1.1 * d).mean()), "over": 100.0 * float((ms_a > d).mean()),
                   "p50_ms": float(np.percentile(ms_a, 50)), "p99_ms": float(np.percentile(ms_a, 99)),
                   "max_ms": float(ms_a.max()), "stopped": 100.0 * float(np.mean(stopped)),
                   "mean_steps": float(np.mean(exits) + 1),
                   "static_miss": 100.0 * float((static_ms > d).mean())}
            res["rows"].append(row)
            _log(f"deadline {d:.2f} ms: accuracy {row['accuracy']:.1f}%, over +10% {row['over_10pct']:.1f}%, "
                 f"stopped {row['stopped']:.0f}%, static misses {row['static_miss']:.0f}%")
        limit = steps[-1]["p50_ms"]
        if args.tail and args.tail_clock == "cpu":  # the limit on the clock the calibration times with
            cpu = measure_steps(rt, lat_x, batch=1, repeats=60, stage_calls=0, clock=time.thread_time)
            limit = cpu.steps[-1].p50_ms
        rt.close()
        if args.tail:
            res["tail"] = _tail_budgets(bundle, Path(tmp), limit, args)
    res["load_average"].append(_load())
    res["minutes"] = (time.perf_counter() - t_start) / 60
    md = render(res, command_line(__file__, argv))
    print(md)
    write_report(Path(args.out), md, res)
    return 0


def _stalling_clock(steps: int, step: int, at: int, stall_ms: float):
    """``time.perf_counter``, but the read that ends the ``at``-th timed call of ``step`` first
    sleeps ``stall_ms``: repetitions in order, steps interleaved within them (``measure_steps``);
    a timed call reads the clock twice, one of the last step ``steps + 3`` times (it is also
    timed at its ``steps - 1`` step checks, ``Runtime.time_steps``, from a start of its own, and
    the stall then comes before that timing's end, so its last step takes it in too)."""
    reads = [0]
    per = [2] * (steps - 1) + [steps + 3]
    target = at * sum(per) + sum(per[:step]) + per[step] - (2 if step == steps - 1 else 1)

    def clock() -> float:
        if stall_ms > 0 and reads[0] == target:
            time.sleep(stall_ms / 1e3)
        reads[0] += 1
        return time.perf_counter()

    return clock


def _tail_budgets(bundle: Path, tmp: Path, limit_ms: float, args: argparse.Namespace) -> Dict[str, Any]:
    """Calibrates ``args.tail`` budgets at ``limit_ms`` ``args.tail_runs`` times (split seeds 0, 1 ...)
    and returns what each verification measured."""
    from gfnet_edge.calibrate import CalibrationConfig, run_calibration
    from gfnet_edge.calibrate.budgets import Budget, BudgetKind
    from gfnet_edge.demo import DEMO_STATIC

    budgets = [Budget(BudgetKind(k), round(limit_ms, 2)) for k in args.tail]
    rows, static, spread, held_out = [], [], [], 0
    for run in range(args.tail_runs):
        _log(f"run {run + 1}/{args.tail_runs}: calibrating {', '.join(b.name for b in budgets)} on "
             f"{args.calib_images} demo test images")
        rep = run_calibration(CalibrationConfig(
            bundle=str(bundle), data="demo", output=str(tmp / f"report{run}"), budgets=budgets, backend="onnxruntime",
            precision="fp32", threads=args.threads, num_images=args.calib_images, static=[str(DEMO_STATIC)],
            compare_precisions=False, gallery=0, deadlines=0, clock=args.tail_clock, seed=run, progress=False))
        for b in rep["budgets"]:
            m = b["measured"]
            rows.append({"run": run + 1, "name": b["name"], "kind": b["kind"], "budget_ms": b["budget_ms"],
                         "measured_ms": m["statistic_ms"],
                         "deviation_pct": 100.0 * (m["statistic_ms"] / b["budget_ms"] - 1.0),
                         "within": bool(b["within_tolerance"]), "over_budget_pct": m["distribution"]["over_budget_pct"],
                         "mean_ms": m["mean_ms"], "accuracy": m["accuracy"], "exit_fractions": m["exit_fractions"],
                         "images": m["images"], "fit_exceedance": b["fit"]["fit_exceedance"]})
            _log(f"{b['name']}: measured {b['kind']} {m['statistic_ms']:.3f} ms ({rows[-1]['deviation_pct']:+.1f} %), "
                 f"accuracy {m['accuracy']:.1f} %")
        static = [{"name": s["name"], "accuracy": s["accuracy"], "p50_ms": s["latency"]["p50_ms"],
                   "p95_ms": s["latency"]["p95_ms"]} for s in rep["static"]]
        spread.append(rep["latency"]["stability"]["spread_pct"])
        held_out = rep["data"]["holdout"]
    return {"rows": rows, "clock": args.tail_clock, "static": static, "held_out": held_out, "spread_pct": spread}


def _static_latencies(onnx_path: Path, model: Dict[str, Any], frames: np.ndarray, threads: int) -> np.ndarray:
    """Wall-clock ms of each static call on one uint8 frame (normalisation + forward), in order."""
    from gfnet_edge.calibrate.latency import prepare_frames
    from gfnet_edge.runtime.backends.onnxruntime import load_session

    sess = load_session(onnx_path, threads)
    name = sess.get_inputs()[0].name
    for i in range(5):
        sess.run(None, {name: prepare_frames(model, frames[i:i + 1])})
    out = []
    for i in range(len(frames)):
        t0 = time.perf_counter()
        sess.run(None, {name: prepare_frames(model, frames[i:i + 1])})
        out.append((time.perf_counter() - t0) * 1e3)
    return np.asarray(out)


def _calls(block: Dict[str, Any]) -> str:
    """How many calls each step's latency came from, and how many of them were timed alone."""
    calls = block.get("step_calls") or [block.get("calls", 60)]
    alone = block.get("retimed_calls") or [0]
    text = (f"{calls[0]} calls per step" if len(set(calls)) == 1 else
            f"{' / '.join(map(str, calls))} calls for steps 0..{len(calls) - 1}")
    return text + (f", of them {' / '.join(map(str, alone))} timed alone for a lone stall" if any(alone) else "")


def render(res: Dict[str, Any], cmd: str) -> str:
    st = res["static"]
    nd = res["no_deadline"]
    lines = ["# Per-frame deadlines (demo model, CPU, batch 1)", "", f"Command: `{cmd.strip()}`", "",
             f"Machine: {res['machine']}; ONNX Runtime, FP32 graphs, {res['threads']} thread(s); deadlines planned "
             f"with the {res.get('plan_stat', 'p99')} step latency measured in the same run "
             f"({_calls(res['step_latency']['batches'][0])}), margin "
             f"{res['margin']}; 1-minute load average "
             f"{' at start, '.join(str(x) for x in res['load_average'])} at the end (other jobs on the machine).", "",
             f"Without a deadline: accuracy {nd['accuracy']:.1f} %, {nd['mean_steps']:.2f} mean steps. Static network: "
             f"accuracy {st['accuracy']:.1f} %, latency p50 {st['p50_ms']:.2f} ms, p99 {st['p99_ms']:.2f} ms. "
             f"GFNet step latency: glance p50 {res['glance_ms']['p50']:.2f} / p99 {res['glance_ms']['p99']:.2f} ms, "
             f"every step p50 {res['full_ms']['p50']:.2f} / p99 {res['full_ms']['p99']:.2f} ms (the glance always "
             "runs, so no deadline below its latency can be met).", "",
             *([f"One stall of {res['stall_ms']:g} ms injected into the step-latency measurement (timed call "
                f"{res.get('stall_at', 20)} of step {res.get('stall_step', 1)}, 0-based); "
                f"{'steps whose p99 takes in a lone stall timed alone' if res.get('retime', True) else 'no step timed alone (--no-retime)'}."
                , ""] if res.get("stall_ms") else []),
             "Step costs planned with (ms per step, " + res.get("plan_stat", "p99") + ", never below the mean; "
             + ("focus steps from one step check to the next" if res.get("step_checks") else
                "increments of the cumulative latency") + "): "
             + ", ".join(f"{x:.2f}" for x in res.get("plan_ms", [])) + ".", "",
             table(["deadline ms", "GFNet accuracy %", "calls > deadline + 10 %", "calls > deadline", "p50 ms",
                    "p99 ms", "max ms", "stopped by the deadline", "mean steps", "static calls > deadline"],
                   [[f"{r['deadline_ms']:.2f}", f"{r['accuracy']:.1f}", f"**{r['over_10pct']:.1f} %**",
                     f"{r['over']:.1f} %", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['max_ms']:.2f}",
                     f"{r['stopped']:.0f} %", f"{r['mean_steps']:.2f}", f"{r['static_miss']:.0f} %"]
                    for r in res["rows"]]), ""]
    tail = res.get("tail")
    if tail:
        lines += ["## Tail budgets (gfnet-edge calibrate)", "",
                  f"Limit: the full model's p50 step latency (measured on the same clock); {tail['clock']} clock "
                  f"({'wall-clock' if tail['clock'] == 'wall' else 'CPU time of the calling thread'}); "
                  "fitted on the fitting half and verified "
                  f"on {tail['held_out']} held-out demo test images, one image per call. The budget is met within "
                  "tolerance when the measured percentile lies in [-10 %, +5 %] of it. Spread of the full model's "
                  "latency between the step-latency measurements of each run: "
                  f"{', '.join(f'{x:.0f} %' for x in tail['spread_pct'])}.", "",
                  table(["run", "budget", "limit ms", "measured percentile ms", "vs budget", "images over the limit",
                         "mean ms", "accuracy %", "exits % per step"],
                        [[r["run"], r["name"], f"{r['budget_ms']:.2f}", f"{r['measured_ms']:.3f}",
                          f"**{r['deviation_pct']:+.1f} %**", f"{r['over_budget_pct']:.1f} %", f"{r['mean_ms']:.3f}",
                          f"{r['accuracy']:.1f}", " / ".join(f"{100 * f:.0f}" for f in r["exit_fractions"])]
                         for r in tail["rows"]]), "",
                  "Within [-10 %, +5 %]: " + "; ".join(
                      f"{k} {sum(r['within'] for r in tail['rows'] if r['kind'] == k)} of "
                      f"{sum(r['kind'] == k for r in tail['rows'])} runs"
                      for k in dict.fromkeys(r["kind"] for r in tail["rows"])) + ".", "",
                  "Static baseline in the last calibration: " + "; ".join(
                      f"{s['name']} accuracy {s['accuracy']:.1f} %, p50 {s['p50_ms']:.2f} ms, p95 {s['p95_ms']:.2f} ms"
                      for s in tail["static"]) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
