"""What ``head_dtype="float16"`` buys in the demo loop on the CPU: float16 against float32 head
weights inside one runtime, head to head.

    python bench/head_dtype.py [--bundle DIR] [--precision fp32] [--threads 1] [--blocks 24]

One :class:`gfnet_edge.Runtime` (ONNX Runtime, the bundle's default budget, batch 1) runs the
demo test images; its host loop (``_C.HostLoop``, the heads' one native call between two
backbone runs) is swapped between a float32 and a float16 build of the same heads
(``HeadSet(..., weight_dtype=...)``) in alternating blocks of 64 images, the order of the two
sides alternating too. Two runtimes side by side would compare their placement in memory as
well (an A/A test of two identical runtimes is not 1.00 on this kind of VM), so only the heads
change. Reported: the median and interquartile range of the per-block ratio float16 / float32
of the time per image, and whether classes, exits and patch coordinates agree on every test
image. Without ``--bundle`` an fp32 bundle of the demo checkpoint is built.

Prints the table and writes ``bench/results/head_dtype.md`` and ``head_dtype.json``; the
1-minute load average at the start and end of the run is recorded.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ProgressiveReport, command_line, machine, table  # noqa: E402


def _log(msg: str) -> None:
    print(f"[head_dtype] {msg}", flush=True)


def render(res: Dict[str, Any], command: str) -> str:
    rows = [[r["precision"], r["threads"], r["blocks"], f"{r['ms32']:.3f}", f"{r['ms16']:.3f}",
             f"**{r['median']:.3f}**", f"{r['q1']:.3f}-{r['q3']:.3f}", r["same"]] for r in res["rows"]]
    load = res.get("load", [])
    return "\n".join([
        "# Heads in float16 against float32, demo loop (`bench/head_dtype.py`)", "",
        f"Command: `{command}`", "", f"Machine: {res['machine']}; 1-minute load average "
        + " -> ".join(f"{v:.1f}" for v in load) + " (start -> end)." + ("" if res.get("complete", True) else
                                                                      " **Partial run.**"), "",
        "One runtime, batch 1, the bundle's default budget, uint8 demo test frames; its host loop "
        "swapped between float16 and float32 head weights in alternating blocks of 64 images "
        "(order alternating). Ratio: float16 / float32 time per image, per block pair.", "",
        table(["graphs", "threads", "block pairs", "float32 ms/image", "float16 ms/image",
               "median ratio", "IQR", "same classes / exits / coordinates"], rows), ""])


def measure(rt, frames: np.ndarray, loops: Dict[str, Any], blocks: int, per_block: int) -> Dict[str, Any]:
    place = rt.driver.place
    ms: Dict[str, List[float]] = {k: [] for k in loops}
    n = len(frames)
    for name, loop in loops.items():  # warm-up
        place.loop = loop
        for i in range(16):
            rt.predict(frames[i:i + 1])
    for blk in range(blocks):
        order = list(loops) if blk % 2 == 0 else list(loops)[::-1]
        idx = [(blk * per_block + j) % n for j in range(per_block)]
        for name in order:
            place.loop = loops[name]
            t0 = time.perf_counter()
            for i in idx:
                rt.predict(frames[i:i + 1])
            ms[name].append((time.perf_counter() - t0) * 1e3 / per_block)
    r = np.asarray(ms["float16"]) / np.asarray(ms["float32"])
    return {"blocks": blocks, "ms32": float(np.median(ms["float32"])), "ms16": float(np.median(ms["float16"])),
            "median": float(np.median(r)), "q1": float(np.percentile(r, 25)), "q3": float(np.percentile(r, 75)),
            "block_ms": ms}


def parity(rt, frames: np.ndarray, loops: Dict[str, Any]) -> str:
    out = {}
    for name, loop in loops.items():
        rt.driver.place.loop = loop
        out[name] = rt.predict(frames)
    a, b = out["float32"], out["float16"]
    same = [int(np.sum(a.classes == b.classes)), int(np.sum(a.exit_step == b.exit_step)),
            int(np.sum(np.all(a.coords == b.coords, axis=(0, 2))))]
    return f"{same[0]} / {same[1]} / {same[2]} of {len(frames)}"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="a bundle of the demo checkpoint (default: build an fp32 one)")
    ap.add_argument("--precision", default="fp32", help="graph sets to run, comma-separated (fp32, int8-cpu)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime / extension threads")
    ap.add_argument("--blocks", type=int, default=24, help="block pairs per graph set")
    ap.add_argument("--per-block", type=int, default=64)
    ap.add_argument("--num-test", type=int, default=1000, help="demo test images (parity checked on all)")
    ap.add_argument("--out", type=Path, default=RESULTS / "head_dtype.md")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from gfnet_edge.bundle import Bundle
    from gfnet_edge.runtime import Runtime
    from gfnet_edge.runtime.heads import HeadSet, load_head_arrays

    command = command_line(__file__, argv)
    results: Dict[str, Any] = {"machine": machine(), "load": [os.getloadavg()[0]], "rows": []}
    t0 = time.perf_counter()
    report = ProgressiveReport(args.out, render, results, command.strip(), t0)
    with tempfile.TemporaryDirectory(prefix="gfnet-head-dtype-") as tmp:
        bundle = args.bundle
        if bundle is None:
            from gfnet_edge.build import BuildConfig, build_bundle
            from gfnet_edge.demo import DEMO_CHECKPOINT

            _log("building an fp32 bundle of the demo checkpoint")
            bundle = build_bundle(DEMO_CHECKPOINT, Path(tmp) / "bundle",
                                  BuildConfig(precision="fp32", backend="onnxruntime"), progress=False).root
        loaded = Bundle.load(bundle)
        from gfnet_edge.data import ClutteredDigits, demo_config

        frames, _ = ClutteredDigits("test", config=demo_config(loaded.model)).arrays(args.num_test, progress=False)
        arrays = load_head_arrays(loaded.heads_path)
        for prec in args.precision.split(","):
            with Runtime(bundle, backend="onnxruntime", precision=prec, threads=args.threads) as rt:
                loops = {"float32": rt.driver.place.loop,
                         "float16": HeadSet(arrays, rt.model, weight_dtype="float16").host_loop(rt.model)}
                same = parity(rt, frames, loops)
                _log(f"{prec}: same classes / exits / coordinates {same}")
                r = measure(rt, frames, loops, args.blocks, args.per_block)
                r.update(precision=prec, threads=args.threads, same=same)
                results["rows"].append(r)
                _log(f"{prec}: float16 / float32 median {r['median']:.3f} (IQR {r['q1']:.3f}-{r['q3']:.3f})")
            results["load"] = results["load"][:1] + [os.getloadavg()[0]]
            report.write()
    results["load"] = results["load"][:1] + [os.getloadavg()[0]]
    return report.finish(_log)


if __name__ == "__main__":
    sys.exit(main())
