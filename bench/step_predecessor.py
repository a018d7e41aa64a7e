"""Does a step's latency depend on the call before it? Demo model, CPU, batch 1.

    python bench/step_predecessor.py [--rounds 6] [--calls 150] [--threads 1] [--precision fp32]
        [--out bench/results/step_predecessor.md]

A deployed GFNet's calls stop at different steps, so the call before a step-k call may have run
only the glance or every step (whose backbone runs evict more of the caches). For each pair
(predecessor j, step k), ``--calls`` timed calls of step k, each right after an untimed call of
step j, in ``--rounds`` rounds that rotate the order of the pairs (so drift of a shared machine
falls on all). Reports each step's p50 / p99 after each predecessor, pooled over rounds, and the
ratio of the slowest predecessor's figure to the fastest's (per round: median and range), next
to the calibration's interleaved order (step k after step k - 1, step 0 after step T - 1).
Writes ``--out`` and a ``.json``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (command_line, demo_step_calls, machine, step_bench_args, table,  # noqa: E402
                    write_report)


def main(argv: Optional[List[str]] = None) -> int:
    args = step_bench_args(__doc__, 6, "rounds, each timing every pair in a rotated order", 150,
                           "step_predecessor.md", argv)

    load0 = os.getloadavg()[0]
    with demo_step_calls(args.precision, args.threads) as (T, call):
        pairs = [(j, k) for k in range(T) for j in range(T)]
        ms = {p: [] for p in pairs}  # (j, k) -> per round, ms of each timed call
        for r in range(args.rounds):
            shift = r * len(pairs) // args.rounds
            for j, k in pairs[shift:] + pairs[:shift]:
                got = []
                for i in range(args.calls):
                    call(j, i)
                    got.append(call(k, i))
                ms[(j, k)].append(got)
            print(f"[step_predecessor] round {r + 1}/{args.rounds} done", flush=True)

    res = {"machine": machine(), "threads": args.threads, "precision": args.precision, "rounds": args.rounds,
           "calls": args.calls, "load_average": [round(load0, 1), round(os.getloadavg()[0], 1)], "steps": []}
    rows = []
    for k in range(T):
        entry = {"step": k, "calibration_predecessor": (k - 1) % T}
        for q in (50, 99):
            pooled = [float(np.percentile(np.concatenate(ms[(j, k)]), q)) for j in range(T)]
            per_round = [max(v) / min(v) for v in zip(*[[np.percentile(a, q) for a in ms[(j, k)]] for j in range(T)])]
            entry[f"p{q}_ms_after"] = [round(v, 4) for v in pooled]
            entry[f"p{q}_max_over_min_per_round"] = [round(float(v), 3) for v in per_round]
            rows.append([f"{k}" + (" (glance)" if k == 0 else ""), f"p{q}"]
                        + [f"{v:.3f}" + (" *" if j == (k - 1) % T else "") for j, v in enumerate(pooled)]
                        + [f"{max(pooled) / min(pooled):.3f}",
                           f"{np.median(per_round):.3f} ({min(per_round):.2f} - {max(per_round):.2f})"])
        res["steps"].append(entry)
    md = [f"# A step's latency after each kind of call (`bench/{Path(__file__).name}`)", "",
          f"Command: `{command_line(__file__, argv)}`", "",
          f"Machine: {machine()}; 1-minute load average {load0:.1f} -> {os.getloadavg()[0]:.1f} (start -> end).", "",
          f"Demo model, {args.precision.upper()} graphs, ONNX Runtime, {args.threads} thread(s), batch 1, frames "
          f"already S x S; {args.rounds} rounds x {args.calls} timed calls of step k per predecessor j, each after "
          "an untimed call of step j (a call that stops after step j), rounds rotating the order of the pairs. "
          "Milliseconds per call, pooled over rounds; `*`: the predecessor of interleaved calibration. "
          "Max / min: the slowest predecessor's figure over the fastest's (pooled; per round: median (range)).", "",
          table(["step", "stat"] + [f"after step {j} ms" for j in range(T)] + ["max / min", "max / min per round"],
                rows), ""]
    write_report(Path(args.out), "\n".join(md), res)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
