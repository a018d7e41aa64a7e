"""One or two torch threads for a training step on a small CPU (the advice on ``train --threads``
in docs/training.md): the demo's local encoder trained at ``--threads`` 1 and 2 in alternating
blocks, in one process.

    python bench/train_threads.py [--size 32] [--batch 128] [--blocks 8] [--steps 4]

The shipped demo GFNet's local encoder (timm ``resnet18`` with channels 16-128, "r16") and its
head run forward, cross-entropy, backward and an AdamW step on random ``--size`` px crops of
``--batch`` images; ``torch.set_num_threads`` switches between 1 and 2 for each block of
``--steps`` steps, the order alternating between blocks. Reported: median seconds per step at
each thread count and the median per-block ratio 2 threads / 1 thread. Run it under the load
the advice is about (the 1-minute load average at the start and end is recorded).

Prints the table and writes ``bench/results/train_threads.md`` and ``train_threads.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, command_line, machine, table, write_report  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=32, help="crop size in px")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=8, help="blocks per thread count")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per block")
    ap.add_argument("--out", type=Path, default=RESULTS / "train_threads.md")
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from gfnet_edge.models import load_checkpoint

    command = command_line(__file__, argv)
    load = [os.getloadavg()[0]]
    enc = load_checkpoint(ROOT / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar").model
    enc.train()
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        pooled, _ = enc(x)
        F.cross_entropy(enc.logits(pooled), y).backward()
        opt.step()

    for t in (1, 2):  # warm-up at both thread counts
        torch.set_num_threads(t)
        step()
    sec: Dict[int, List[float]] = {1: [], 2: []}
    for blk in range(2 * args.blocks):
        t = (1, 2)[(blk // 2 + blk) % 2]  # 1 2 2 1 1 2 2 1 ...: each pair of blocks has both, order alternating
        torch.set_num_threads(t)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sec[t].append((time.perf_counter() - t0) / args.steps)
    load.append(os.getloadavg()[0])
    r = np.asarray(sec[2]) / np.asarray(sec[1])
    res: Dict[str, Any] = {"machine": machine(), "load": load, "size": args.size, "batch": args.batch,
                           "seconds": {str(k): v for k, v in sec.items()},
                           "one_thread_s": float(np.median(sec[1])), "two_threads_s": float(np.median(sec[2])),
                           "ratio": float(np.median(r)), "q1": float(np.percentile(r, 25)),
                           "q3": float(np.percentile(r, 75))}
    text = "\n".join([
        "# Training step at 1 and 2 torch threads (`bench/train_threads.py`)", "", f"Command: `{command}`", "",
        f"Machine: {res['machine']}; torch {torch.__version__}; 1-minute load average {load[0]:.1f} -> {load[1]:.1f} "
        "(start -> end).", "",
        f"The demo's local encoder (r16) + head, forward, cross-entropy, backward and AdamW on {args.batch} random "
        f"{args.size} px crops per step; {args.blocks} blocks of {args.steps} steps per thread count, alternating.", "",
        table(["1 thread s/step", "2 threads s/step", "median ratio 2 / 1 threads", "IQR"],
              [[f"{res['one_thread_s']:.3f}", f"{res['two_threads_s']:.3f}", f"**{res['ratio']:.2f}**",
                f"{res['q1']:.2f}-{res['q3']:.2f}"]]), ""])
    print(text)
    write_report(args.out, text, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
