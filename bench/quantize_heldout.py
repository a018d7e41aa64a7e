#!/usr/bin/env python3
"""Quantization settings of the demo GFNet scored on held-out demo images from generator seeds
the build never uses: final-step and budget accuracy vs FP32, exit agreement, KL, INT8 share.

    python3 bench/quantize_heldout.py 'auto=' 'bc={"bias_correction": 64}' --seeds 101,202 --n 1000

Each positional argument is ``name=JSON`` of :class:`gfnet_edge.quantize.QuantizeOptions`
fields (profile ``tensorrt``, no mixed-precision search and no patch guard unless given:
``"patch_guard_share": 0.02`` is the profile's patch guard). Calibration and the
search's held-out set are what ``build-engine`` uses: the first ``num_calib`` (default 256)
images of the validation split (generator seed of the checkpoint) and the 256 after them (so
``num_calib`` is at most 744); with ``--calib-split train`` the calibration images are the train
split's and the search's held-out set the first 256 of the validation split. Figures: the test split rendered with each of ``--seeds``
(``ClutteredDigitsConfig.seed``), traced through the runtime on ONNX Runtime; the budget is the
bundle's default (``macs-mid``, thresholds from the checkpoint). Each row is one INT8 graph pair
against the FP32 pair on the same images; with ``--per-graph`` each variant also scores its
INT8 glance graph with the FP32 focus graph and the FP32 glance graph with its INT8 focus graph
(KL per step, to see which graph carries the error). ``--md FILE`` also writes the table, with
the command, the machine and the 1-minute load average at the start and end, to FILE.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help="name=JSON of QuantizeOptions fields")
    ap.add_argument("--seeds", default="101,202", help="generator seeds of the held-out test images")
    ap.add_argument("--n", type=int, default=1000, help="images per seed")
    ap.add_argument("--calib-split", choices=("val", "train"), default="val",
                    help="demo split the calibration images come from (default val, as build-engine; train: "
                         "num_calib may exceed 744, the search's 256 held-out images are the validation split's first)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: temporary)")
    ap.add_argument("--per-graph", action="store_true",
                    help="also score each graph in INT8 alone (the other FP32): KL per step")
    ap.add_argument("--md", type=Path, default=None, help="also write the table (with command and machine) here")
    a = ap.parse_args()
    load0 = os.getloadavg()[0]
    sys.path.insert(0, str(ROOT / "bench"))
    from common import demo_fp32, demo_test_images, machine, use_checkout

    use_checkout()
    import torch

    import gfnet_edge.quantize as gq
    from gfnet_edge.evaluate import anytime_accuracy, dynamic_evaluate
    from gfnet_edge.quantize.scoring import kl_divergence, trace

    torch.set_num_threads(a.threads)
    variants = []
    for v in a.variants:
        name, sep, js = v.partition("=")
        if not sep:
            print(f"error: variant {v!r} is not name=JSON", file=sys.stderr)
            return 2
        try:
            kw = json.loads(js) if js else {}
            opts = gq.QuantizeOptions(**{"profile": "tensorrt", "max_accuracy_drop": None, "patch_guard_share": 0.0,
                                         "threads": a.threads, **kw}).validate()
        except (TypeError, ValueError) as exc:
            print(f"error: variant {name!r}: {exc}", file=sys.stderr)
            return 2
        variants.append((name, opts))
    tmp = tempfile.TemporaryDirectory(prefix="gfnet-heldout-") if a.out is None else None
    work = Path(tmp.name) if tmp else a.out
    demo = demo_fp32(work)
    model, desc, paths, fp32, costs, thr = demo.model, demo.desc, demo.paths, demo.fp32, demo.costs, demo.thresholds
    # build-engine's split of the validation images: the first num_calib calibrate, the next
    # 256 are the search's held-out set
    max_cal = max(opts.num_calib for _, opts in variants)
    if a.calib_split == "train":  # calibration from the train split, the search's 256 from the validation split
        cx = gq.load_calibration_images("demo", model, max_cal, split="train")
        x, y = gq.load_calibration_images("demo", model, 256, return_labels=True)
        held_at = 0
    else:
        x, y = gq.load_calibration_images("demo", model, max_cal + 256, return_labels=True)
        if len(x) < max_cal + 256:
            print(f"error: num_calib {max_cal} + 256 held-out images exceed the validation split ({len(x)} images)",
                  file=sys.stderr)
            return 2
        cx, held_at = x[:max_cal], None
    calib = gq.QuantCalibrationSet.from_model(model, cx, progress=False)
    held = []
    for seed in (int(s) for s in a.seeds.split(",")):
        images, labels = demo_test_images(model, seed, a.n)
        held.append((seed, images, labels, trace(desc, fp32, paths["heads"], images, a.threads, 50).probs))
    lines = ["| settings | seed | final drop | budget drop | exit agreement | KL final | INT8 MACs | quantize s |",
             "|---|---|---|---|---|---|---|---|"]
    graph_lines = ["| settings | INT8 graph (other FP32) | seed | KL per step | exit agreement |", "|---|---|---|---|---|"]
    print("\n".join(lines))
    for name, opts in variants:
        t0 = time.perf_counter()
        nc = opts.num_calib if held_at is None else held_at
        r = gq.quantize_model(model, fp32, paths["heads"], calib, work / name, opts,
                              eval_images=x[nc:nc + 256], eval_labels=y[nc:nc + 256], progress=False)
        secs = time.perf_counter() - t0
        for seed, images, labels, p32 in held:
            p8 = trace(desc, r.graphs, paths["heads"], images, a.threads, 50).probs
            d32, d8 = dynamic_evaluate(p32, labels, costs, thr), dynamic_evaluate(p8, labels, costs, thr)
            final = anytime_accuracy(p32, labels)[-1] - anytime_accuracy(p8, labels)[-1]
            agree = 100.0 * float((d32.exit_step == d8.exit_step).mean())
            kl = float(kl_divergence(p32[-1], p8[-1]).mean())
            lines.append(f"| {name} | {seed} | {final:+.2f} | {d32.accuracy - d8.accuracy:+.2f} | {agree:.1f}% | "
                         f"{kl:.4f} | {100 * r.report.get('int8_mac_share', 1.0):.1f}% | {secs:.0f} |")
            print(lines[-1], flush=True)
            if a.per_graph:
                for g in ("glance", "focus", "both"):
                    graphs = dict(r.graphs) if g == "both" else {**fp32, g: r.graphs[g]}
                    pg = p8 if g == "both" else trace(desc, graphs, paths["heads"], images, a.threads, 50).probs
                    agree_g = 100.0 * float((d32.exit_step == dynamic_evaluate(pg, labels, costs, thr).exit_step).mean())
                    kls = " / ".join(f"{float(kl_divergence(p32[k], pg[k]).mean()):.4f}" for k in range(len(p32)))
                    graph_lines.append(f"| {name} | {g} | {seed} | {kls} | {agree_g:.1f}% |")
                    print(graph_lines[-1], flush=True)
    if a.md:
        cmd = "python3 bench/quantize_heldout.py " + " ".join(
            f"'{v}'" if ("{" in v or v.endswith("=")) else v for v in sys.argv[1:])
        text = "\n".join(["# INT8 settings on held-out demo images (`bench/quantize_heldout.py`)", "",
                          f"Command: `{cmd}`", "",
                          f"Machine: {machine()}; 1-minute load average {load0:.1f} -> {os.getloadavg()[0]:.1f} "
                          "(start -> end).", "",
                          "Drops are FP32 minus INT8 in points at the final step and at the default budget; exit "
                          "agreement at the default budget; KL(FP32 || INT8) of the final step's probabilities.", "",
                          *lines, ""] + (["One graph in INT8, the other FP32 (KL(FP32 || mixed) per step):", "",
                                          *graph_lines, ""] if a.per_graph else []))
        a.md.parent.mkdir(parents=True, exist_ok=True)
        a.md.write_text(text, encoding="utf-8")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
