#!/usr/bin/env python3
"""INT8 quantization benchmark on the demo GFNet: accuracy (FP32 vs INT8 per profile), exit
agreement at a mid budget, batch-1 latency of FP32 vs INT8 backbones in ONNX Runtime (measured
interleaved in this same run), and policy-location vs random-crop calibration.

    python3 bench/quantize.py                   # full run, writes bench/results/quantize.md
    python3 bench/quantize.py --latency-only    # export + all-INT8 quantization + latency only,
                                                # writes bench/results/quantize_latency.md

Prints the FP32 / INT8 latency ratio of each profile. See docs/quantization.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _import_quantize():
    sys.path.insert(0, str(ROOT / "bench"))
    from common import use_checkout

    use_checkout()  # an uninstalled checkout: map quantize/ as setup.py does
    import gfnet_edge.quantize as gq

    return gq


def latency_only(checkpoint: Path, out: Path, rounds: int, num_calib: int) -> str:
    import torch

    from gfnet_edge.data import ClutteredDigits, demo_config, normalize
    from gfnet_edge.export import export_model
    from gfnet_edge.models import load_checkpoint

    gq = _import_quantize()
    from gfnet_edge.quantize.timing import time_graphs

    torch.set_num_threads(2)
    model = load_checkpoint(checkpoint)
    paths = export_model(model, out / "fp32")
    frames, _ = ClutteredDigits("val", config=demo_config(model)).arrays(progress=False)
    calib = gq.QuantCalibrationSet.from_model(model, normalize(frames[:num_calib]), progress=False)
    graphs = {"fp32/glance": paths["glance"], "fp32/focus": paths["focus"]}
    for prof in ("cpu", "tensorrt"):
        opts = gq.QuantizeOptions(profile=prof, method="auto", num_calib=num_calib, max_accuracy_drop=None)
        r = gq.quantize_model(model, {g: paths[g] for g in ("glance", "focus")}, paths["heads"],
                              calib, out / f"int8-{prof}", opts, progress=False)
        for g in ("glance", "focus"):
            graphs[f"int8-{prof}/{g}"] = r.graphs[g]
    lat = time_graphs(graphs, model.spec.patch_size, batch=1, threads=1, rounds=rounds)
    T = model.spec.steps
    lines = ["# INT8 latency (ONNX Runtime, batch 1, 1 thread, all-INT8 graphs)", "",
             "| graph | median ms | round spread | 10th percentile ms |", "|---|---|---|---|"]
    for k, v in lat.items():
        lines.append(f"| {k} | {v['median_ms']:.3f} | {v['min_round_ms']:.3f} - {v['max_round_ms']:.3f} | {v['p10_ms']:.3f} |")
    lines.append("")

    def total(prefix: str, key: str) -> float:
        return lat[f"{prefix}/glance"][key] + (T - 1) * lat[f"{prefix}/focus"][key]

    for prof in ("cpu", "tensorrt"):
        lines.append(f"- FP32 / INT8-{prof}: glance {lat['fp32/glance']['median_ms'] / lat[f'int8-{prof}/glance']['median_ms']:.2f}x, "
                     f"focus {lat['fp32/focus']['median_ms'] / lat[f'int8-{prof}/focus']['median_ms']:.2f}x, "
                     f"all {T} steps {total('fp32', 'median_ms') / total(f'int8-{prof}', 'median_ms'):.2f}x (medians), "
                     f"{total('fp32', 'p10_ms') / total(f'int8-{prof}', 'p10_ms'):.2f}x (10th percentiles)")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--results", type=Path, default=None,
                    help="markdown report (default bench/results/quantize.md, JSON beside it; with "
                         "--latency-only bench/results/quantize_latency.md)")
    ap.add_argument("--latency-only", action="store_true")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--num-calib", type=int, default=256)
    ap.add_argument("--num-eval", type=int, default=744)
    ap.add_argument("--test-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-exit-agreement", type=float, default=98.0,
                    help="second target of the mixed-precision search (negative: accuracy only)")
    _import_quantize()
    from common import INPUT_HELP, INPUTS

    ap.add_argument("--input", choices=INPUTS, default="frames",
                    help=INPUT_HELP + "; the mixed-precision search's held-out images are given the same way")
    a = ap.parse_args()
    import quantize_demo

    ckpt = a.checkpoint or quantize_demo._default_checkpoint()
    if not Path(ckpt).is_file():
        print(f"error: {ckpt}: no demo checkpoint (train it or pass --checkpoint)", file=sys.stderr)
        return 2
    tmp = None
    out = a.out
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="gfnet-bench-quant-")
        out = Path(tmp.name)
    if a.results is None:
        a.results = ROOT / "bench" / "results" / ("quantize_latency.md" if a.latency_only else "quantize.md")
    t0 = time.perf_counter()
    if a.latency_only:
        md = latency_only(Path(ckpt), out, a.rounds, a.num_calib)
    else:
        res = quantize_demo.run(Path(ckpt), out, a.num_calib, a.num_eval, a.test_size, threads=a.threads,
                                timing_rounds=a.rounds, inputs=a.input,
                                min_exit_agreement=a.min_exit_agreement if a.min_exit_agreement >= 0 else None)
        md = quantize_demo.markdown(res)
        a.results.parent.mkdir(parents=True, exist_ok=True)
        a.results.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(md)
    print(md)
    print(f"wrote {a.results} ({time.perf_counter() - t0:.0f} s)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
