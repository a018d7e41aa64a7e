#!/usr/bin/env python3
"""How sensitive the demo GFNet's exits are to small weight changes: exit agreement with the
FP32 graphs at the default budget when every weight tensor of both graphs is rounded to FP16 or
multiplied by (1 + r * N(0, 1)) (independent per weight), on held-out demo images.

    python3 bench/exit_sensitivity.py --seeds 101,202,303 --n 1000 --noise 0.005,0.01,0.02

A reference scale for the INT8 figures of docs/quantization.md: INT8 graphs have to keep the
exits of the FP32 graphs through perturbations of about this size. Columns: exit agreement per
seed and pooled, final-step accuracy change (points).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Dict

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_fp32, demo_test_images, machine  # noqa: E402


def perturb_weights(src: Path, dst: Path, noise: float, seed: int = 0) -> Path:
    """``src`` with every float weight tensor (an initializer of more than 16 values) rounded to
    FP16 (``noise`` 0) or scaled elementwise by ``1 + noise * N(0, 1)``; written to ``dst``."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype != np.float32 or a.size <= 16:
            continue
        b = a.astype(np.float16).astype(np.float32) if noise == 0 else a * (1.0 + noise * rng.standard_normal(a.shape))
        t.CopyFrom(numpy_helper.from_array(b.astype(np.float32), t.name))
    onnx.save(m, str(dst))
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="101,202,303", help="generator seeds of the held-out test images")
    ap.add_argument("--n", type=int, default=1000, help="images per seed")
    ap.add_argument("--noise", default="0.005,0.01,0.02", help="relative weight noise levels (r)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from gfnet_edge.evaluate import anytime_accuracy, exit_steps
    from gfnet_edge.quantize.scoring import trace

    levels = [0.0] + [float(v) for v in a.noise.split(",") if v]
    with tempfile.TemporaryDirectory(prefix="gfnet-sensitivity-") as tmp:
        work = Path(tmp)
        demo = demo_fp32(work)
        sets: Dict[str, Dict[str, Path]] = {}
        for r in levels:
            name = "FP16 weights" if r == 0 else f"weights x (1 + {r:g} N(0,1))"
            sets[name] = {g: perturb_weights(demo.fp32[g], work / f"{g}.{r:g}.onnx", r) for g in ("glance", "focus")}
        held = []
        for seed in (int(s) for s in a.seeds.split(",")):
            x, y = demo_test_images(demo.model, seed, a.n)
            p32 = trace(demo.desc, demo.fp32, demo.paths["heads"], x, a.threads, 50).probs
            held.append((x, y, p32, exit_steps(p32, demo.thresholds)))
        print(f"Machine: {machine()}. Command: python3 bench/exit_sensitivity.py --seeds {a.seeds} --n {a.n} "
              f"--noise {a.noise}\n")
        print("| weights | exit agreement per seed | pooled | final-step Δ (pooled, points) |")
        print("|---|---|---|---|")
        for name, graphs in sets.items():
            agree, delta = [], []
            for x, y, p32, e32 in held:
                p = trace(demo.desc, graphs, demo.paths["heads"], x, a.threads, 50).probs
                agree.append(100.0 * float((exit_steps(p, demo.thresholds) == e32).mean()))
                delta.append(float(anytime_accuracy(p, y)[-1] - anytime_accuracy(p32, y)[-1]))
            print(f"| {name} | {' / '.join(f'{v:.1f}' for v in agree)} | {np.mean(agree):.2f} % | "
                  f"{np.mean(delta):+.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
