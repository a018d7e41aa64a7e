#!/usr/bin/env python3
"""What handing the runtime uint8 S x S frames (``Runtime.predict(frames, cropped=True)``, as
``gfnet-edge predict`` and ``gfnet-edge calibrate`` do) costs against normalising them to float32
beforehand (``ops.normalise_frames``, then ``Runtime.predict(images)``), on the host loop.

    python bench/cropped_input.py [--bundle BUNDLE] [--threads 1] [--blocks 8] [--clock cpu]

(default bundle: the shipped demo checkpoint built as an fp32 + int8-cpu ONNX Runtime bundle in a
temporary folder). Per graph set and batch size (1 and 32): the mean time per image of each way
in, timed in alternating blocks over the same demo test frames (``bench/e2e.py``'s
``alternating``), and the bytes per image handed to the runtime (on a GPU these are the bytes
that cross to the device: a quarter with uint8 frames). Writes ``bench/results/cropped_input.md``
and ``.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, command_line, machine, table, write_report  # noqa: E402
from e2e import alternating  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="a bundle with ONNX Runtime graphs (default: the demo model, built here)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime and extension threads (default 1)")
    ap.add_argument("--blocks", type=int, default=8, help="alternating blocks of 64 images (default 8)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall-clock time, or the calling thread's CPU time (with --threads 1 every kernel runs on "
                         "it, so other processes' load does not count)")
    ap.add_argument("--out", type=Path, default=RESULTS / "cropped_input.md")
    args = ap.parse_args(argv)

    from gfnet_edge import ops
    from gfnet_edge.calibrate.latency import CLOCKS
    from gfnet_edge.data import ClutteredDigits, demo_config
    from gfnet_edge.runtime import Runtime

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from gfnet_edge.build import BuildConfig, build_bundle

            bundle = build_bundle(ROOT / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar", Path(tmp) / "bundle",
                                  BuildConfig(precision="int8", backend="onnxruntime", num_calib=64),
                                  progress=False).root
        from gfnet_edge.bundle import Bundle

        rows, res = [], {"machine": machine(), "threads": args.threads, "clock": args.clock, "cases": []}
        sets = Bundle.load(bundle).manifest["graphs"]
        for prec in [s for s in ("fp32", "int8-cpu") if s in sets]:
            with Runtime(bundle, backend="onnxruntime", precision=prec, threads=args.threads) as rt:
                m = rt.model
                frames, _ = ClutteredDigits("test", config=demo_config(m)).arrays(512, progress=False)
                S = m.image_size
                calls = {"normalised": lambda f: rt.predict(ops.normalise_frames(f, m.mean, m.std)),
                         "cropped": lambda f: rt.predict(f, cropped=True)}
                for batch in (1, 32):
                    t = alternating(calls, {k: batch for k in calls}, frames, blocks=args.blocks,
                                    clock=CLOCKS[args.clock])
                    case = {"precision": prec, "batch": batch, "normalised_ms": t["normalised"],
                            "cropped_ms": t["cropped"], "ratio": t["cropped"] / t["normalised"],
                            "normalised_bytes": 3 * S * S * 4, "cropped_bytes": S * S * 3}
                    res["cases"].append(case)
                    rows.append([prec, batch, f"{case['normalised_ms']:.3f}", f"{case['cropped_ms']:.3f}",
                                 f"{case['ratio']:.2f}x", case["normalised_bytes"], case["cropped_bytes"]])
    res["load"] = [load0, os.getloadavg()[0]]
    md = "\n".join([
        "# uint8 frames given as cropped vs float32 images normalised beforehand",
        "",
        f"Command: `{command_line(__file__, argv)}`",
        "",
        f"Machine: {res['machine']}; {args.threads} thread(s); {args.clock} clock; 1-minute load average {load0:.2f} at the start, "
        f"{res['load'][1]:.2f} at the end.",
        "",
        "Time per image on the host loop (ONNX Runtime), demo test frames, alternating blocks of 64 images; "
        "the normalised column includes `ops.normalise_frames`. Bytes per image: what the call hands the "
        "runtime (on a GPU, what crosses to the device).",
        "",
        table(["graphs", "batch", "normalised beforehand, ms", "cropped frames, ms", "cropped / normalised",
               "bytes (float32)", "bytes (uint8)"], rows),
        "",
    ])
    write_report(args.out, md, res)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
