#!/usr/bin/env python3
"""NVIDIA ModelOpt ONNX post-training quantization of FP32 graphs (one arm of bench/int8_compare.py).

Runs in its own environment (ModelOpt pulls ``onnxruntime-gpu``, which cannot share one with
``onnxruntime``); it needs numpy and ``nvidia-modelopt[onnx]`` only, nothing of gfnet-edge::

    /work/venv-modelopt/bin/python bench/modelopt_ptq.py --calib calib.npz --method entropy \\
        --graph glance:glance.fp32.onnx:glance.int8.onnx --graph focus:focus.fp32.onnx:focus.int8.onnx

``calib.npz`` holds one float32 (N, 3, P, P) array per graph, named as the graph (``glance``,
``focus``). Every ModelOpt setting is its default (``quantize_mode="int8"``, the
``calibration_method`` given) except ``calibration_eps``, which is ``cpu`` only when no CUDA
device is visible. The last line printed is a JSON summary (ModelOpt version, seconds per graph).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _cuda_visible() -> bool:
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return False
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:  # noqa: BLE001 - no driver / no NVML: no CUDA device
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib", required=True, help=".npz with one calibration array per graph")
    ap.add_argument("--method", required=True, choices=("max", "entropy"))
    ap.add_argument("--graph", action="append", required=True, metavar="NAME:IN:OUT",
                    help="graph name (key in --calib), FP32 input path, quantized output path")
    a = ap.parse_args(argv)
    jobs = []
    for item in a.graph:
        parts = item.split(":")
        if len(parts) != 3 or not all(parts):
            print(f"error: --graph {item!r}: expected NAME:IN:OUT", file=sys.stderr)
            return 2
        if not os.path.isfile(parts[1]):
            print(f"error: --graph {item!r}: {parts[1]}: no such file", file=sys.stderr)
            return 2
        jobs.append(parts)
    import numpy as np

    try:
        import modelopt
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        print(f"error: NVIDIA ModelOpt is not importable here ({exc}); pip install 'nvidia-modelopt[onnx]'",
              file=sys.stderr)
        return 3
    eps = ["cpu", "cuda:0", "trt"] if _cuda_visible() else ["cpu"]
    with np.load(a.calib) as z:
        calib = {k: np.ascontiguousarray(z[k], dtype=np.float32) for k in z.files}
    seconds = {}
    for name, src, dst in jobs:
        if name not in calib:
            print(f"error: {a.calib} has no array {name!r} (has: {', '.join(calib)})", file=sys.stderr)
            return 2
        tmp = dst + ".partial.onnx"
        t0 = time.perf_counter()
        quantize(src, quantize_mode="int8", calibration_method=a.method, calibration_data=calib[name],
                 calibration_eps=eps, output_path=tmp)
        os.replace(tmp, dst)
        seconds[name] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"modelopt": modelopt.__version__, "method": a.method, "calibration_eps": eps,
                      "calibration_sizes": {k: int(v.shape[0]) for k, v in calib.items()}, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
