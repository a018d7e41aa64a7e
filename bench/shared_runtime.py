"""Call latency of one ``Runtime`` shared by threads, against the same ``Runtime`` called by one
thread, in one run.

    python bench/shared_runtime.py [--bundle DIR] [--precision fp32] [--callers 2] [--seconds 4]
                                   [--rounds 2] [--threads 1] [--out bench/results/shared_runtime.md]

A ``Runtime`` serialises its calls with a lock and lets waiting calls in in the order they were
made, so with ``--callers`` threads calling ``predict`` back to back each call waits for about
one call of every other thread. Per round, a block with one calling thread and a block with
``--callers`` threads, ``--seconds`` each, on one uint8 demo test frame at batch 1 (the bundle's
default budget; ONNX Runtime with ``--threads``). Reported per block: calls, and per call the
median, p99 and largest wall-clock ms of every calling thread, with the shared median over the
single-thread median (about ``--callers`` when the lock hands calls round the threads evenly),
and the calls each thread made (even: every thread gets its turn). Without ``--bundle`` an INT8
bundle of the demo checkpoint (with its fp32 graphs) is built in a temporary folder.

Writes the markdown report and a JSON beside it, with the 1-minute load average at the start
and end of the run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, demo_int8_bundle, machine, table, write_report  # noqa: E402


def calls_for(rt, frame: np.ndarray, callers: int, seconds: float) -> List[List[float]]:
    """Per calling thread, the wall-clock seconds of each ``predict`` it made in ``seconds``
    (all threads start together and stop making calls at the same moment)."""
    times: List[List[float]] = [[] for _ in range(callers)]
    start = threading.Barrier(callers + 1)
    stop = [0.0]

    def caller(i: int) -> None:
        start.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= stop[0]:
                return
            rt.predict(frame)
            times[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    stop[0] = time.perf_counter() + seconds
    start.wait()
    for t in threads:
        t.join()
    return times


def summary(times: List[List[float]]) -> Dict[str, Any]:
    per = []
    for t in times:
        ms = np.asarray(t) * 1e3
        per.append({"calls": len(ms), "p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
                    "max_ms": float(ms.max())})
    every = np.concatenate([np.asarray(t) for t in times]) * 1e3
    return {"threads": per, "p50_ms": float(np.median(every)), "p99_ms": float(np.percentile(every, 99)),
            "max_ms": float(every.max()), "calls": int(every.size)}


def render(results: Dict[str, Any], command: str) -> str:
    rows = []
    for r, rnd in enumerate(results["rounds"], 1):
        one, shared = rnd["one"], rnd["shared"]
        rows.append([r, "1 thread", one["calls"], f"{one['p50_ms']:.3f}", f"{one['p99_ms']:.3f}",
                     f"{one['max_ms']:.2f}", "", ""])
        for i, t in enumerate(shared["threads"], 1):
            rows.append([r, f"shared, thread {i}", t["calls"], f"{t['p50_ms']:.3f}", f"{t['p99_ms']:.3f}",
                         f"{t['max_ms']:.2f}", f"{t['p50_ms'] / one['p50_ms']:.2f}",
                         f"{t['calls'] / max(x['calls'] for x in shared['threads']):.2f}"])
    lines = [f"# One Runtime shared by {results['callers']} threads", "",
             f"Command: `{command}`", "",
             f"Machine: {results['machine']}; 1-minute load average {results['load'][0]:.1f} -> "
             f"{results['load'][1]:.1f} (start -> end).", "",
             f"Bundle: {results['bundle']}, ONNX Runtime {results['precision']}, {results['ort_threads']} ONNX "
             f"Runtime thread(s), batch 1, one uint8 demo test frame, the bundle's default budget; "
             f"{results['seconds']:g} s a block.", "",
             table(["round", "block", "calls", "p50 ms", "p99 ms", "max ms", "p50 / 1-thread p50",
                    "calls / most calls"], rows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="a bundle folder (default: the demo checkpoint built into a temporary one)")
    ap.add_argument("--precision", default="fp32", help="graphs the Runtime runs (default fp32)")
    ap.add_argument("--callers", type=int, default=2, help="threads sharing the Runtime (default 2)")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each block (default 4)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of a 1-thread and a shared block (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    ap.add_argument("--out", type=Path, default=RESULTS / "shared_runtime.md", help="report file (.md; a .json beside)")
    args = ap.parse_args(argv)
    if args.callers < 2 or args.rounds < 1 or not args.seconds > 0 or args.threads < 1:
        ap.error("--callers needs at least 2, --rounds at least 1, --seconds and --threads more than 0")
    from gfnet_edge.bundle import Bundle
    from gfnet_edge.data import ClutteredDigits, demo_config
    from gfnet_edge.runtime import Runtime

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = demo_int8_bundle(Path(tmp) / "bundle", args.bundle, threads=args.threads, progress=False)
        frame = ClutteredDigits("test", config=demo_config(Bundle.load(bundle).model)).frames([0])
        rounds = []
        with Runtime(bundle, backend="onnxruntime", precision=args.precision, threads=args.threads) as rt:
            calls_for(rt, frame, 1, 0.5)  # settle (calibrate's warm-up, bench/warmup.py)
            for r in range(args.rounds):
                one = summary(calls_for(rt, frame, 1, args.seconds))
                shared = summary(calls_for(rt, frame, args.callers, args.seconds))
                rounds.append({"one": one, "shared": shared})
                print(f"[shared-runtime] round {r + 1}: 1 thread p50 {one['p50_ms']:.3f} ms; shared p50 "
                      f"{shared['p50_ms']:.3f}, p99 {shared['p99_ms']:.3f}, max {shared['max_ms']:.2f} ms", flush=True)
    results = {"callers": args.callers, "seconds": args.seconds, "precision": args.precision,
               "ort_threads": args.threads, "bundle": args.bundle or "the demo checkpoint, built for this run",
               "machine": machine(), "load": [load0, os.getloadavg()[0]], "rounds": rounds}
    command = command_line(__file__, argv)
    md = render(results, command)
    write_report(args.out, md, results)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
