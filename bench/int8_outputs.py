#!/usr/bin/env python3
"""Which INT8 graph output moves the demo GFNet's exits: each output of the INT8 glance graph
(``feature``, ``policy_state``, ``logits``) and the INT8 focus graph put alone into the FP32
pair, scored on held-out demo images like bench/quantize_heldout.py.

    python3 bench/int8_outputs.py --seeds 101,202 --n 1000

The INT8 graphs are the ``tensorrt`` profile's, all INT8 (no mixed-precision search and no
patch guard unless ``--options`` asks for them: ``QuantizeOptions`` fields as JSON), calibrated
on the first ``num_calib`` (256) validation images, all of them when nothing is searched (the
graphs of bench/quantize_heldout.py's all-INT8 row). A mixed glance graph holds both graphs side
by side (one input) and takes each output from the one named. ``--input frames`` (the default)
traces the uint8 test frames, normalised inside the runtime as ``Runtime.predict`` and
``gfnet-edge predict`` take them; ``--input images`` traces float images normalised beforehand
(``ops.normalise_frames``), which an INT8 graph can round differently near a quantization step.
Columns: exit agreement with FP32 at the bundle's default budget, KL(FP32 || mixed) per step,
budget-accuracy drop (points). ``--md FILE`` also writes the table, with the command and the
machine, to FILE.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parent.parent


def mixed_graph(fp32_path: Path, int8_path: Path, from_int8: Iterable[str], out: Path) -> Path:
    """One graph computing both ``fp32_path`` and ``int8_path`` on the same input; outputs named
    in ``from_int8`` come from the INT8 graph, the others from the FP32 graph."""
    import onnx
    from onnx import compose, helper

    a = onnx.load(str(fp32_path))
    b = compose.add_prefix(onnx.load(str(int8_path)), "i8_")
    from_int8 = set(from_int8)
    inner = {o.name: f"{o.name}__fp32" for o in a.graph.output}
    for n in a.graph.node:
        n.output[:] = [inner.get(x, x) for x in n.output]
        n.input[:] = [inner.get(x, x) for x in n.input]
    inp = a.graph.input[0].name
    pick = [helper.make_node("Identity", [f"i8_{o.name}" if o.name in from_int8 else inner[o.name]], [o.name])
            for o in a.graph.output]
    nodes = list(a.graph.node) + [helper.make_node("Identity", [inp], [f"i8_{inp}"])] + list(b.graph.node) + pick
    g = helper.make_graph(nodes, "mixed", list(a.graph.input), list(a.graph.output),
                          list(a.graph.initializer) + list(b.graph.initializer))
    m = helper.make_model(g, opset_imports=a.opset_import)
    m.ir_version = a.ir_version
    onnx.save(m, str(out))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="101,202", help="generator seeds of the held-out test images")
    ap.add_argument("--n", type=int, default=1000, help="images per seed")
    ap.add_argument("--options", default="{}", help="QuantizeOptions fields as JSON")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--md", type=Path, default=None, help="also write the table (with command and machine) here")
    sys.path.insert(0, str(ROOT / "bench"))
    from common import INPUT_HELP, INPUTS, demo_fp32, demo_test_images, input_note, report_head, traced_input, \
        use_checkout

    ap.add_argument("--input", choices=INPUTS, default="frames", help=INPUT_HELP)
    a = ap.parse_args()
    load0 = os.getloadavg()[0]

    use_checkout()
    import torch

    import gfnet_edge.quantize as gq
    from gfnet_edge.evaluate import dynamic_evaluate
    from gfnet_edge.quantize.scoring import kl_divergence, trace

    torch.set_num_threads(a.threads)
    opts = gq.QuantizeOptions(**{"profile": "tensorrt", "max_accuracy_drop": None, "patch_guard_share": 0.0,
                                 "threads": a.threads, **json.loads(a.options)}).validate()
    with tempfile.TemporaryDirectory(prefix="gfnet-int8-outputs-") as tmp:
        work = Path(tmp)
        demo = demo_fp32(work)
        model, desc, paths, fp32, costs, thr = demo.model, demo.desc, demo.paths, demo.fp32, demo.costs, demo.thresholds
        x = gq.load_calibration_images("demo", model, opts.num_calib)
        calib = gq.QuantCalibrationSet.from_model(model, x, progress=False)
        # without a search every calibration image calibrates (none held out for it): the graphs
        # of bench/quantize_heldout.py's all-INT8 row
        searches = any(t is not None for t in (opts.max_accuracy_drop, opts.max_budget_drop, opts.min_exit_agreement))
        q = gq.quantize_model(model, fp32, paths["heads"], calib, work / "int8", opts,
                              eval_images=None if searches else x[:0], progress=False).graphs
        arms = {"glance INT8 (all outputs)": {"glance": q["glance"], "focus": fp32["focus"]}}
        for outs in (("feature",), ("policy_state",), ("logits",), ("feature", "logits")):
            f = mixed_graph(fp32["glance"], q["glance"], outs, work / f"glance.{'+'.join(outs)}.onnx")
            arms[f"glance INT8 {' + '.join(outs)} only"] = {"glance": f, "focus": fp32["focus"]}
        arms["focus INT8"] = {"glance": fp32["glance"], "focus": q["focus"]}
        arms["both INT8"] = dict(q)
        lines = ["| INT8 part | seed | exit agreement | KL per step | budget drop |", "|---|---|---|---|---|"]
        print("\n".join(lines))
        for seed in (int(s) for s in a.seeds.split(",")):
            frames, labels = demo_test_images(model, seed, a.n, as_frames=True)
            images = traced_input(a.input, frames, model.spec)
            p32 = trace(desc, fp32, paths["heads"], images, a.threads, 50).probs
            d32 = dynamic_evaluate(p32, labels, costs, thr)
            for name, graphs in arms.items():
                p8 = trace(desc, graphs, paths["heads"], images, a.threads, 50).probs
                d8 = dynamic_evaluate(p8, labels, costs, thr)
                agree = 100.0 * float((d32.exit_step == d8.exit_step).mean())
                kl = " / ".join(f"{float(kl_divergence(p32[t], p8[t]).mean()):.4f}" for t in range(len(p32)))
                lines.append(f"| {name} | {seed} | {agree:.1f}% | {kl} | {d32.accuracy - d8.accuracy:+.2f} |")
                print(lines[-1], flush=True)
    if a.md:
        text = "\n".join([*report_head("Which INT8 graph output moves the exits (`bench/int8_outputs.py`)", __file__,
                                       load0),
                          f"Traced test inputs: {input_note(a.input)}.", "",
                          "Exit agreement with FP32 at the bundle's default budget; KL(FP32 || mixed) per step; "
                          "budget-accuracy drop in points (FP32 minus mixed).", "", *lines, ""])
        a.md.parent.mkdir(parents=True, exist_ok=True)
        a.md.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
