"""Does timing a step alone change its latency percentiles? Demo model, CPU, batch 1.

    python bench/step_alone.py [--rounds 8] [--calls 150] [--threads 1] [--precision fp32]
        [--out bench/results/step_alone.md]

``gfnet-edge calibrate`` times every step with its calls interleaved (step 0, the glance only;
step 1; ... in turn, as a deadline-driven stream runs them) and times a step *alone* (back-to-back calls of
that step only) when one or two stalls decide its p99. If back-to-back calls ran faster (warm
caches and branch predictors for one code path), a plan made from them would underestimate the
step and deadlines would be overrun more often. This script measures both ways on the same
runtime, and a third way: each timed call of step k right after an untimed call of step k - 1
(the call before it when interleaved), in ``--rounds`` rounds that rotate which way goes first
(so drift of a shared machine falls on all), ``--calls`` timed calls per step and way in each
round, and reports each step's p50 / p99 each way, pooled over rounds, with the per-round
ratios against interleaved (median and range). Writes ``--out`` and a ``.json``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (command_line, demo_step_calls, machine, step_bench_args, table,  # noqa: E402
                    write_report)


def main(argv: Optional[List[str]] = None) -> int:
    args = step_bench_args(__doc__, 8, "rounds, alternating which way is timed first", 150, "step_alone.md", argv)

    load0 = os.getloadavg()[0]
    with demo_step_calls(args.precision, args.threads) as (T, call):
        ways_all = ("interleaved", "alone", "after")
        ms: Dict[str, List[List[List[float]]]] = {w: [[] for _ in range(T)] for w in ways_all}

        for r in range(args.rounds):
            for way in ways_all[r % 3:] + ways_all[:r % 3]:
                got: List[List[float]] = [[] for _ in range(T)]
                if way == "interleaved":
                    for i in range(args.calls):
                        for k in range(T):
                            got[k].append(call(k, i))
                elif way == "alone":
                    for k in range(T):
                        for i in range(args.calls):
                            got[k].append(call(k, i))
                else:  # each timed call after an untimed one of the step before it in the interleaved order
                    for k in range(T):
                        for i in range(args.calls):
                            call((k - 1) % T, i)
                            got[k].append(call(k, i))
                for k in range(T):
                    ms[way][k].append(got[k])
            print(f"[step_alone] round {r + 1}/{args.rounds} done", flush=True)

    res = {"machine": machine(), "threads": args.threads, "precision": args.precision, "rounds": args.rounds,
           "calls": args.calls, "load_average": [round(load0, 1), round(os.getloadavg()[0], 1)], "steps": []}
    rows = []
    for k in range(T):
        entry = {"step": k}
        for q in (50, 99):
            pooled = {w: float(np.percentile(np.concatenate(ms[w][k]), q)) for w in ms}
            entry[f"p{q}"] = {f"{w}_ms": round(v, 4) for w, v in pooled.items()}
            row = [f"{k}" + (" (glance)" if k == 0 else ""), f"p{q}", f"{pooled['interleaved']:.3f}"]
            for w in ("alone", "after"):
                per_round = [float(np.percentile(a, q) / np.percentile(b, q)) for a, b in zip(ms[w][k], ms["interleaved"][k])]
                entry[f"p{q}"][f"{w}_ratio_per_round"] = [round(v, 3) for v in per_round]
                row += [f"{pooled[w]:.3f}", f"{pooled[w] / pooled['interleaved']:.3f}",
                        f"{np.median(per_round):.3f} ({min(per_round):.2f} - {max(per_round):.2f})"]
            rows.append(row)
        res["steps"].append(entry)
    md = [f"# A step timed alone vs interleaved (`bench/{Path(__file__).name}`)", "",
          f"Command: `{command_line(__file__, argv)}`", "",
          f"Machine: {machine()}; 1-minute load average {load0:.1f} -> {os.getloadavg()[0]:.1f} (start -> end).", "",
          f"Demo model, {args.precision.upper()} graphs, ONNX Runtime, {args.threads} thread(s), batch 1, frames "
          f"already S x S; {args.rounds} rounds x {args.calls} timed calls per step and way, rounds rotating "
          "which way goes first. *Interleaved*: steps 0..T-1 in turn; *alone*: one step's calls back to back; "
          "*after*: each timed call of step k right after an untimed call of step k - 1 (step T - 1 before step 0), "
          "the call that precedes it when interleaved. Ratios against interleaved (below 1: measured faster); "
          "per round: median (range).", "",
          table(["step", "stat", "interleaved ms", "alone ms", "alone ratio", "alone ratio per round",
                 "after ms", "after ratio", "after ratio per round"], rows), ""]
    write_report(Path(args.out), "\n".join(md), res)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
