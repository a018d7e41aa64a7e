"""What skipping ``W_hh h`` at a zero hidden state buys (the first policy step, a GRU
classifier's step 0): a GRU step with ``h=None`` against the same step with an explicit zero
state, weights evicted from the caches before every call, as in the loop after a backbone run.

    python bench/gru_zero_state.py [--threads 1] [--pairs 200] [--sweep-mib 64]

Cases: a ResNet-50-sized GRU classifier step (``ops.GRUHead`` 2048 -> 1024 -> 1000, batch 1)
and the demo's policy GRU (``ops.GRUCell`` 256 -> 256, batch 1), random float32 weights. Each
pair of calls runs both variants (order alternating), each after a read of ``--sweep-mib`` MiB
that evicts the weights. Reported: median call time of each and the median per-pair ratio
``h=None`` / zero state.

Prints the table and writes ``bench/results/gru_zero_state.md`` and ``gru_zero_state.json``;
the 1-minute load average at the start and end of the run is recorded.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, machine, table, write_report  # noqa: E402


def pairs(fns: Dict[str, Callable[[], Any]], n: int, sweep: np.ndarray) -> Dict[str, List[float]]:
    names = list(fns)
    out: Dict[str, List[float]] = {k: [] for k in names}
    for fn in fns.values():
        fn()
    for i in range(n):
        for name in (names if i % 2 == 0 else names[::-1]):
            float(sweep.sum())  # evicts the weights
            t0 = time.perf_counter()
            fns[name]()
            out[name].append(time.perf_counter() - t0)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--sweep-mib", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS / "gru_zero_state.md")
    args = ap.parse_args(argv)
    from gfnet_edge import ops

    command = command_line(__file__, argv)
    load = [os.getloadavg()[0]]
    ops.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    sweep = np.ones(args.sweep_mib * 2 ** 20 // 8)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    cls = ops.GRUHead(w(3 * 1024, 2048), w(3 * 1024, 1024), w(3 * 1024), w(3 * 1024), w(1000, 1024), w(1000))
    pol = ops.GRUCell(w(3 * 256, 256), w(3 * 256, 256), w(3 * 256), w(3 * 256))
    cases = {"GRU classifier step 2048 -> 1024 -> 1000 (ResNet-50 size)": (cls, 2048, 1024),
             "policy GRU step 256 -> 256 (demo)": (pol, 256, 256)}
    rows, res = [], {"machine": machine(), "threads": args.threads, "pairs": args.pairs, "cases": {}}
    for name, (head, i, h) in cases.items():
        x, h0 = w(1, i), np.zeros((1, h), np.float32)
        t = pairs({"none": lambda head=head, x=x: head.step(x, None),
                   "zero": lambda head=head, x=x, h0=h0: head.step(x, h0)}, args.pairs, sweep)
        a, b = np.asarray(t["none"]), np.asarray(t["zero"])
        r = a / b
        res["cases"][name] = {"none_ms": float(np.median(a) * 1e3), "zero_ms": float(np.median(b) * 1e3),
                              "ratio": float(np.median(r)), "q1": float(np.percentile(r, 25)),
                              "q3": float(np.percentile(r, 75))}
        c = res["cases"][name]
        rows.append([name, f"{c['none_ms']:.3f}", f"{c['zero_ms']:.3f}", f"**{c['ratio']:.2f}**",
                     f"{c['q1']:.2f}-{c['q3']:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    load.append(os.getloadavg()[0])
    res["load"] = load
    text = "\n".join(["# GRU step at a zero hidden state: skipped W_hh h against an explicit zero state "
                      "(`bench/gru_zero_state.py`)", "", f"Command: `{command}`", "",
                      f"Machine: {res['machine']}; {args.threads} thread(s); 1-minute load average "
                      f"{load[0]:.1f} -> {load[1]:.1f} (start -> end).", "",
                      f"Batch 1, random float32 weights, a {args.sweep_mib} MiB read before every call (weights "
                      f"cold, as after a backbone run); {args.pairs} pairs, order alternating.", "",
                      table(["case", "h=None ms", "zero state ms", "median ratio", "IQR"], rows), ""])
    print(text)
    write_report(args.out, text, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
