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
against the FP32 pair on the same images.
"""
from __future__ import annotations

import argparse
import json
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
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from common import demo_fp32, demo_test_images, use_checkout

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
    print("| settings | seed | final drop | budget drop | exit agreement | KL final | INT8 MACs | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
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
            print(f"| {name} | {seed} | {final:+.2f} | {d32.accuracy - d8.accuracy:+.2f} | {agree:.1f}% | {kl:.4f} | "
                  f"{100 * r.report.get('int8_mac_share', 1.0):.1f}% | {secs:.0f} |", flush=True)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
