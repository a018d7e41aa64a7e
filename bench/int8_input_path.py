"""How much an INT8 bundle's answers depend on where a uint8 frame is normalised: inside the
runtime (``Runtime.predict`` / ``trace`` on the frames, as deployment runs) or beforehand
(float32 images, ``ops.normalise_frames``). The two agree to about 1e-6, but an INT8 graph
rounds its input to its quantization grid, so some images land on other grid points.

    python bench/int8_input_path.py --bundle gfnet-edge-demo/bundle --report gfnet-edge-demo/report/report.json

(the bundle and report `gfnet-edge demo` writes; any demo bundle with fp32 and int8-cpu graphs).

On the held-out half of ``calibrate --data demo``'s images (seed 0): per precision of the
bundle's ONNX Runtime graph sets, the images whose traced probabilities differ by more than
1e-6 between the two ways in and the largest difference. With ``--report`` (a calibration of
that bundle), per calibrated budget: the held-out images on which the runtime's own run (batch
1, the budget's thresholds) takes another exit step or class than a trace of the images
normalised beforehand, and than a trace of the frames.

Prints the table and writes ``bench/results/int8_input_path.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, machine, table, write_report  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="a demo bundle with fp32 and int8-cpu graphs")
    ap.add_argument("--report", help="report.json of a calibration of that bundle (its budgets are checked)")
    ap.add_argument("--num-images", type=int, default=1000, help="demo images, half held out (default 1000)")
    ap.add_argument("--out", type=Path, default=RESULTS / "int8_input_path.md")
    args = ap.parse_args(argv)

    from gfnet_edge.calibrate.data import load_calibration_data
    from gfnet_edge.calibrate.latency import measure_calls, prepare_frames
    from gfnet_edge.evaluate import dynamic_evaluate
    from gfnet_edge.runtime import Runtime

    res = {"machine": machine(), "precisions": [], "budgets": []}
    for prec in ("fp32", "int8-cpu"):
        with Runtime(args.bundle, backend="onnxruntime", precision=prec) as rt:
            x, y = load_calibration_data("demo", rt.model, args.num_images, 0.5, 0).part("holdout")
            before, frames = rt.trace(prepare_frames(rt.model, x)).probs, rt.trace(x).probs
            d = np.abs(before - frames).max(axis=(0, 2))
            res["precisions"].append({"precision": prec, "images": len(x), "moved": int((d > 1e-6).sum()),
                                      "max_dp": float(d.max())})
            if prec != "int8-cpu" or not args.report:
                continue
            for b in json.loads(Path(args.report).read_text())["budgets"]:
                thr = np.asarray(b["thresholds"])
                run = measure_calls(rt, x, thr, batch=1, warmup=1)
                row = {"budget": b["name"], "images": len(x)}
                for key, probs in (("vs_normalised_beforehand", before), ("vs_frames", frames)):
                    h = dynamic_evaluate(probs, y, np.ones(len(thr)), thr)
                    row[key] = int(((run.exit_step != h.exit_step) | (run.classes != h.prediction)).sum())
                res["budgets"].append(row)
    cmd = command_line(__file__, argv)
    text = (f"# INT8 answers and where a frame is normalised\n\nCommand: `{cmd}`\n\nMachine: {res['machine']}\n\n"
            + table(["precision", "held-out images", "probabilities moved > 1e-6", "largest probability change"],
                    [[p["precision"], p["images"], p["moved"], f"{p['max_dp']:.3g}"] for p in res["precisions"]]))
    if res["budgets"]:
        text += "\n\nThe runtime's own run against a trace (images whose exit step or class differ):\n\n" + table(
            ["budget", "held-out images", "trace of images normalised beforehand", "trace of the frames"],
            [[r["budget"], r["images"], r["vs_normalised_beforehand"], r["vs_frames"]] for r in res["budgets"]])
    print(text)
    write_report(args.out, text + "\n", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
