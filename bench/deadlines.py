"""Per-frame deadlines on the CPU, demo model, batch 1: how often a call overruns its deadline,
the accuracy GFNet keeps, and how often the static network would miss the same deadline.

    python bench/deadlines.py [--images 300] [--threads 1] [--out bench/results/deadlines.md]

Builds an FP32 bundle of the shipped demo checkpoint, measures its per-step latency the way
``gfnet-edge calibrate`` does (every image forced to exit at step k, interleaved), and plans
deadlines with the p99 of those measurements (the step costs calibration records in the
manifest). Then for deadlines spread from just above the glance step's p99 to the full model's p99 it runs
each held-out test frame alone through ``Runtime.predict(frame, deadline_ms=D)`` at the
bundle's default budget and records the wall-clock time of every call. The static baseline
(the shipped static network, exported to ONNX, on the same threads) is timed on the same frames:
its miss rate at D is the share of its calls slower than D. Writes ``--out`` and a ``.json``.
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
from common import RESULTS, machine, table, write_report  # noqa: E402


def _log(msg: str) -> None:
    print(f"[deadlines] {msg}", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300, help="held-out demo test frames, one per call")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--deadlines", type=int, default=6, help="deadlines between the glance p50 and the full p99")
    ap.add_argument("--margin", type=float, default=None, help="deadline margin (default: the runtime's)")
    ap.add_argument("--out", default=str(RESULTS / "deadlines.md"))
    args = ap.parse_args(argv)

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
    res: Dict[str, Any] = {"machine": machine(), "threads": args.threads, "margin": margin, "rows": []}
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
        lat = measure_steps(rt, lat_x, batch=1, repeats=60, stage_calls=0)
        entry = step_costs_entry([lat], "onnxruntime", rt.precision, args.threads, "cpu")
        costs = StepCosts.from_manifest(entry)
        rt.set_step_costs(costs)
        res["step_latency"] = entry
        steps = [s.to_dict() for s in lat.steps]
        # from just above the glance step's p99 (below it the glance alone, which always runs,
        # overruns) to the full model's p99
        lo, hi = 1.05 * steps[0]["p99_ms"], steps[-1]["p99_ms"]
        deadlines = np.linspace(lo, max(hi, lo), args.deadlines).tolist()
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
        rt.close()
    res["minutes"] = (time.perf_counter() - t_start) / 60
    md = render(res, "python bench/deadlines.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(md)
    write_report(Path(args.out), md, res)
    return 0


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


def render(res: Dict[str, Any], cmd: str) -> str:
    st = res["static"]
    nd = res["no_deadline"]
    lines = ["# Per-frame deadlines (demo model, CPU, batch 1)", "", f"Command: `{cmd.strip()}`", "",
             f"Machine: {res['machine']}; ONNX Runtime, FP32 graphs, {res['threads']} thread(s); deadlines planned "
             f"with the p99 step latency measured in the same run, margin {res['margin']}.", "",
             f"Without a deadline: accuracy {nd['accuracy']:.1f} %, {nd['mean_steps']:.2f} mean steps. Static network: "
             f"accuracy {st['accuracy']:.1f} %, latency p50 {st['p50_ms']:.2f} ms, p99 {st['p99_ms']:.2f} ms. "
             f"GFNet step latency: glance p50 {res['glance_ms']['p50']:.2f} / p99 {res['glance_ms']['p99']:.2f} ms, "
             f"every step p50 {res['full_ms']['p50']:.2f} / p99 {res['full_ms']['p99']:.2f} ms (the glance always "
             "runs, so no deadline below its latency can be met).", "",
             table(["deadline ms", "GFNet accuracy %", "calls > deadline + 10 %", "calls > deadline", "p50 ms",
                    "p99 ms", "max ms", "stopped by the deadline", "mean steps", "static calls > deadline"],
                   [[f"{r['deadline_ms']:.2f}", f"{r['accuracy']:.1f}", f"**{r['over_10pct']:.1f} %**",
                     f"{r['over']:.1f} %", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['max_ms']:.2f}",
                     f"{r['stopped']:.0f} %", f"{r['mean_steps']:.2f}", f"{r['static_miss']:.0f} %"]
                    for r in res["rows"]]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
