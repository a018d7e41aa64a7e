"""How a freshly opened runtime settles: batch-1 call times over the first second after a
demo bundle is opened, in fresh processes (the rationale of ``calibrate --warmup-ms``).

    python bench/warmup.py [--bundle DIR] [--precision fp32] [--trials 6] [--seconds 1.0] [--threads 1]

Each trial is a new process that opens :class:`gfnet_edge.Runtime` (ONNX Runtime, ``--precision``,
``--threads`` (0: ONNX Runtime's default), the
bundle's default budget) on the demo bundle and calls ``predict`` on one uint8 demo test frame
back to back for ``--seconds``, timing every call twice: wall-clock time, and the calling
thread's CPU time (ONNX Runtime and the extension run on the calling thread at one thread), which
time spent descheduled by other jobs does not inflate, so the warm-up shows on a loaded machine
too. Reported per trial and clock, as ratios to the median call of the settled tail (the last
half of the run): the median call in the first 0.1 s; the
mean of calls 6-25 (what 20 timed calls after a 5-call warm-up measure); the mean of the 20
calls after the first 200 ms (after ``calibrate``'s default ``--warmup-ms``); and the median
call in each 0.05 s window. Without ``--bundle`` an fp32 bundle of the demo checkpoint is built.

Prints the table and writes ``bench/results/warmup.md`` and ``warmup.json``; the 1-minute load
average at the start and end of the run is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, command_line, machine, table, write_report  # noqa: E402


def worker(bundle: Path, seconds: float, threads: int, precision: str) -> None:
    """One trial (its own process): prints, per call, the seconds since opening, its wall-clock
    seconds and its thread CPU seconds."""
    from gfnet_edge.bundle import Bundle
    from gfnet_edge.data import ClutteredDigits, demo_config
    from gfnet_edge.runtime import Runtime

    frame = ClutteredDigits("test", config=demo_config(Bundle.load(bundle).model)).frames([0])
    with Runtime(bundle, backend="onnxruntime", precision=precision, threads=threads or None) as rt:
        start = time.perf_counter()
        calls = []
        while True:
            t0, c0 = time.perf_counter(), time.thread_time()
            rt.predict(frame)
            t1, c1 = time.perf_counter(), time.thread_time()
            calls.append((t0 - start, t1 - t0, c1 - c0))
            if t1 - start > seconds:
                break
    print(json.dumps(calls))


def summarise(calls: List[List[float]], seconds: float, clock: int, window: float = 0.05) -> Dict[str, Any]:
    at = np.array([c[0] for c in calls])
    ms = np.array([c[clock] for c in calls]) * 1e3
    tail = float(np.median(ms[at >= seconds / 2]))
    after = ms[at >= 0.2][:20]
    windows = [float(np.median(ms[(at >= w) & (at < w + window)])) if np.any((at >= w) & (at < w + window))
               else float("nan") for w in np.arange(0, seconds / 2, window)]
    return {"calls": len(ms), "tail_ms": tail, "first_100ms_ms": float(np.median(ms[at < 0.1])),
            "calls_6_25_ms": float(np.mean(ms[5:25])), "after_200ms_ms": float(np.mean(after)),
            "window_ms": windows}


def clock_table(trials: List[Dict[str, Any]], median: Dict[str, float]) -> str:
    rows = []
    for i, t in enumerate(trials):
        tail = t["tail_ms"]
        rows.append([i + 1, t["calls"], f"{tail:.3f}", f"{t['first_100ms_ms']:.3f} ({t['first_100ms_ms'] / tail:.2f})",
                     f"{t['calls_6_25_ms'] / tail:.2f}", f"{t['after_200ms_ms'] / tail:.2f}",
                     " ".join(f"{w / tail:.2f}" for w in t["window_ms"])])
    rows.append(["median", "", f"{median['tail_ms']:.3f}", f"({median['first']:.2f})",
                 f"**{median['calls_6_25']:.2f}**", f"**{median['after_200ms']:.2f}**", ""])
    return table(["trial", "calls", "tail ms", "first 0.1 s ms (ratio)", "calls 6-25 (5-call warm-up)",
                  "20 calls after 200 ms", "0.05 s windows up to half the run"], rows)


def render(res: Dict[str, Any], command: str) -> str:
    load = res["load"]
    return "\n".join([
        "# Warm-up of a freshly opened runtime (`bench/warmup.py`)", "", f"Command: `{command}`", "",
        f"Machine: {res['machine']}; 1-minute load average {load[0]:.1f} -> {load[-1]:.1f} (start -> end).", "",
        f"Each trial: a fresh process opens the demo bundle (ONNX Runtime {res.get('precision', 'fp32')}, "
        f"{res['threads'] or 'default'} thread(s), default "
        f"budget) and calls `predict` on one uint8 frame back to back for {res['seconds']:g} s. Ratios are to the "
        "median call of the run's second half (tail); windows are counted in wall-clock time since opening.", "",
        "Thread CPU time per call (not inflated by time spent descheduled):", "",
        clock_table(res["cpu"]["trials"], res["cpu"]["median"]), "",
        "Wall-clock time per call:", "",
        clock_table(res["wall"]["trials"], res["wall"]["median"]), ""])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="an fp32 ONNX Runtime bundle of the demo checkpoint (default: build one)")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="runtime threads (0: ONNX Runtime's default)")
    ap.add_argument("--precision", default="fp32", help="graph set of the bundle to run (fp32, int8-cpu ...)")
    ap.add_argument("--out", type=Path, default=RESULTS / "warmup.md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.bundle, args.seconds, args.threads, args.precision)
        return 0
    command = command_line(__file__, argv)
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="gfnet-warmup-") as tmp:
        bundle = args.bundle
        if bundle is None:
            from gfnet_edge.build import BuildConfig, build_bundle
            from gfnet_edge.demo import DEMO_CHECKPOINT

            bundle = build_bundle(DEMO_CHECKPOINT, Path(tmp) / "bundle",
                                  BuildConfig(precision="fp32", backend="onnxruntime"), progress=False).root
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        trials = []
        for i in range(args.trials):
            proc = subprocess.run([sys.executable, __file__, "--worker", "--bundle", str(bundle), "--seconds",
                                   str(args.seconds), "--threads", str(args.threads), "--precision", args.precision],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"warm-up trial failed:\n{proc.stderr[-2000:]}")
            trials.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"[warmup] trial {i + 1}: {len(trials[-1])} calls", flush=True)
    load.append(os.getloadavg()[0])
    res = {"machine": machine(), "threads": args.threads, "precision": args.precision, "seconds": args.seconds,
           "load": load}
    for name, clock in (("wall", 1), ("cpu", 2)):
        ts = [summarise(t, args.seconds, clock) for t in trials]
        median = {"tail_ms": float(np.median([t["tail_ms"] for t in ts])),
                  "first": float(np.median([t["first_100ms_ms"] / t["tail_ms"] for t in ts])),
                  "calls_6_25": float(np.median([t["calls_6_25_ms"] / t["tail_ms"] for t in ts])),
                  "after_200ms": float(np.median([t["after_200ms_ms"] / t["tail_ms"] for t in ts]))}
        res[name] = {"trials": ts, "median": median}
    text = render(res, command.strip())
    print(text)
    write_report(args.out, text, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
