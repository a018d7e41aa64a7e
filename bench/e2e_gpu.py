"""End to end on a CUDA GPU: the device-resident GFNet loop against the static baseline on the
same GPU, demo model.

    python bench/e2e_gpu.py [--num-test 1000] [--batches 1,32] [--out bench/results/e2e_gpu.md]

Builds a float32 bundle of the shipped demo checkpoint with the checkpoint inside, then runs
:class:`gfnet_edge.Runtime` with the torch backend on CUDA, which runs the loop with its buffers on the GPU
(:mod:`~gfnet_edge.runtime.device_steps`: the frames uploaded once, pre-process,
glance, crops, the backbone graphs, GRU heads and compaction on one CUDA stream, one small
read back per step). The baseline is the shipped static model (``demo_static.pth.tar``) in
torch on the same GPU, fed the same uint8 frames (upload, normalise on the GPU, forward,
argmax read back). Both run float32 without TF32.

This is the GPU counterpart of ``bench/e2e.py`` (same operating-point sweep, same
"fewest steps at equal accuracy" choice, same alternating-block head to head). It measures the
loop's orchestration on a real GPU; the backbones run as eager torch modules, whose launch
overhead dominates at these sizes, so the absolute times are not those of TensorRT engines on
a Jetson.

Needs torch with CUDA, timm, onnx and onnxruntime (for the bundle build) and the extension
built with CUDA. Prints the tables and writes ``--out`` and a ``.json`` beside it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, table, write_report  # noqa: E402
from e2e import alternating, operating_points  # noqa: E402


def _log(msg: str) -> None:
    print(f"[e2e-gpu] {msg}", flush=True)


class StaticTorch:
    """The static baseline in torch: uint8 (N, S, S, 3) frames -> class per image.

    Args:
        path: static checkpoint.
        model: the bundle's model section (mean, std).
        device: ``"cuda"`` or ``"cpu"``.
    """

    def __init__(self, path: Path, model: Dict[str, Any], device: str) -> None:
        import torch

        from gfnet_edge.train.static import load_static

        self.torch, self.device = torch, device
        net, _ = load_static(path)
        self.net = net.to(device).eval()
        self.mean = torch.tensor(model["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(model["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(frames).to(self.device)
            x = (x.permute(0, 3, 1, 2).float() - self.mean) * self.inv_std
            return self.net(x).argmax(1).cpu().numpy()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-test", type=int, default=1000, help="demo test images (default 1000)")
    ap.add_argument("--num-val", type=int, default=500, help="demo validation images for threshold fitting")
    ap.add_argument("--batches", default="1,32", help="batch sizes (default 1,32)")
    ap.add_argument("--tolerance", type=float, default=0.5,
                    help="'equal accuracy': within this many points of the static baseline (default 0.5)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a dry run of this script on a machine without a GPU (host loop, torch on the CPU)")
    ap.add_argument("--out", default=str(RESULTS / "e2e_gpu.md"))
    args = ap.parse_args(argv)

    import torch

    from gfnet_edge.calibrate.latency import measure_calls, runtime_input, using_thresholds
    from gfnet_edge import ops
    from gfnet_edge.build import BuildConfig, build_bundle
    from gfnet_edge.data import ClutteredDigits, demo_config
    from gfnet_edge.demo import DEMO_CHECKPOINT, DEMO_STATIC
    from gfnet_edge.runtime import Runtime
    from gfnet_edge.runtime.backends.torch import _ieee_fp32

    if args.device == "cuda" and (not torch.cuda.is_available() or ops.cuda_device_count() < 1):
        print("e2e_gpu: needs torch with CUDA and the extension built with CUDA, on a machine with a GPU", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gfnet-e2e-gpu-") as tmp:
        _log("building the float32 bundle of the demo checkpoint (checkpoint included)")
        try:
            import onnxsim  # noqa: F401
        except ImportError:  # the torch backend runs the checkpoint, not the ONNX graphs
            from gfnet_edge import export

            orig = export.export_model
            export.export_model = lambda m, out, opset=export.DEFAULT_OPSET, simplify=True: orig(m, out, opset, False)
            _log("onnxsim missing: bundle graphs left unsimplified (the torch backend does not run them)")
        bundle_dir = build_bundle(DEMO_CHECKPOINT, Path(tmp) / "bundle",
                                  BuildConfig(precision="fp32", backend="onnxruntime", include_checkpoint=True)).root
        rt = Runtime(bundle_dir, backend="torch", device=args.device)
        if rt.device_loop != (args.device == "cuda"):
            raise SystemExit(f"e2e_gpu: device {args.device} but device_loop={rt.device_loop}")
        model = rt.model
        cfg = demo_config(model)
        _log(f"demo data: {args.num_val} validation + {args.num_test} test images")
        val_x, _ = ClutteredDigits("val", config=cfg).arrays(args.num_val)
        test_x, test_y = ClutteredDigits("test", config=cfg).arrays(args.num_test)
        test_y = np.asarray(test_y, np.int64)
        static = StaticTorch(DEMO_STATIC, model, args.device)
        res: Dict[str, Any] = {"machine": machine(), "device": args.device,
                               "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "no GPU (dry run on the CPU)",
                               "torch": torch.__version__, "num_test": int(len(test_y)),
                               "tolerance": args.tolerance, "static": {}, "gfnet": [], "summary": {}}
        with _ieee_fp32(torch):
            for b in batches:
                pred = np.concatenate([static(test_x[i:i + b]) for i in range(0, len(test_x), b)])
                t = alternating({"s": static}, {"s": b}, test_x, blocks=4)
                res["static"][b] = {"accuracy": 100.0 * float((pred == test_y).mean()), "mean_ms": t["s"]}
                _log(f"static batch {b}: acc {res['static'][b]['accuracy']:.1f}%, {t['s']:.3f} ms/image")
            points = operating_points(rt, val_x)
            T = int(model["steps"])
            for pt in points:
                for b in batches:
                    run = measure_calls(rt, test_x, pt["thresholds"], batch=b)
                    res["gfnet"].append({
                        "point": pt["name"], "batch": b, "accuracy": 100.0 * float((run.classes == test_y).mean()),
                        **run.stats.to_dict(), "mean_steps": float(run.exit_step.mean() + 1),
                        "exit_histogram": [int((run.exit_step == k).sum()) for k in range(T)],
                        "thresholds": [float(v) for v in pt["thresholds"]]})
                _log(f"GFNet {pt['name']}: acc {res['gfnet'][-1]['accuracy']:.1f}%, "
                     + ", ".join(f"b{r['batch']} {r['mean_ms']:.2f} ms" for r in res["gfnet"][-len(batches):]))
            gfnet_call = lambda f: rt.predict(runtime_input(model, f))  # noqa: E731
            for b in batches:
                ok = [r for r in res["gfnet"] if r["batch"] == b and r["accuracy"] >= res["static"][b]["accuracy"] - args.tolerance]
                pick = min(ok, key=lambda r: (r["mean_steps"], r["mean_ms"])) if ok else None
                h2h = None
                if pick:
                    _log(f"head to head, batch {b}: GFNet {pick['point']} vs static")
                    with using_thresholds(rt, pick["thresholds"]):
                        t = alternating({"gfnet": gfnet_call, "static": static}, {"gfnet": b, "static": b}, test_x)
                    h2h = {"gfnet_ms": t["gfnet"], "static_ms": t["static"], "ratio": t["gfnet"] / t["static"]}
                res["summary"][f"b{b}"] = {"point": pick["point"] if pick else None,
                                           "accuracy": pick["accuracy"] if pick else None,
                                           "mean_steps": pick["mean_steps"] if pick else None, "head_to_head": h2h}
            if 1 in batches and 32 in batches and res["summary"]["b1"]["point"]:
                thr = next(r["thresholds"] for r in res["gfnet"] if r["point"] == res["summary"]["b1"]["point"])
                _log("head to head: batch 32 vs batch 1")
                with using_thresholds(rt, thr):
                    t = alternating({"b1": gfnet_call, "b32": gfnet_call}, {"b1": 1, "b32": 32}, test_x)
                res["summary"]["throughput"] = {"b1_ms": t["b1"], "b32_ms": t["b32"], "ratio": t["b1"] / t["b32"]}
                rt.profiler.enabled = True
                rt.profiler.reset()
                with using_thresholds(rt, thr):
                    for i in range(200):
                        gfnet_call(test_x[i % len(test_x)][None])
                res["summary"]["profile"] = rt.profiler.summary()
                rt.profiler.enabled = False
        rt.close()
    res["minutes"] = (time.perf_counter() - t_start) / 60
    md = render(res, batches, "python bench/e2e_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(md)
    write_report(Path(args.out), md, res)
    _log(f"wrote {args.out} ({res['minutes']:.1f} min)")
    return 0


def render(res: Dict[str, Any], batches: List[int], cmd: str) -> str:
    lines = ["# End to end on a GPU: device-resident GFNet loop vs the static baseline (demo task)", "",
             f"Command: `{cmd.strip()}`", "",
             f"Machine: {res['machine']}; {res['gpu']}, torch {res['torch']}; {res['num_test']} demo test images; "
             "thresholds fitted on the validation split; float32, TF32 off.", "",
             "Per-image latency from uint8 S x S frames on the host to classes on the host. GFNet: torch "
             + ("backend on CUDA, device-resident loop. Static: the same frames uploaded, normalised on the GPU, "
                "forward, argmax read back. Backbones are eager torch modules (launch-bound at these sizes), "
                "not TensorRT engines." if res["device"] == "cuda" else
                "backend on the CPU, host loop (a dry run of the script). Static: torch on the CPU."), "",
             f"## Summary (equal accuracy = within {res['tolerance']} points of the static baseline)", ""]
    rows = []
    for b in batches:
        s, st = res["summary"].get(f"b{b}", {}), res["static"][b]
        h = s.get("head_to_head") or {}
        rows.append([b, f"{st['accuracy']:.1f}", s.get("point") or "(none reaches it)",
                     f"{s['accuracy']:.1f}" if s.get("accuracy") is not None else "–",
                     f"{s['mean_steps']:.2f}" if s.get("mean_steps") else "–",
                     f"{h['static_ms']:.3f}" if h else "–", f"{h['gfnet_ms']:.3f}" if h else "–",
                     f"**{h['ratio']:.2f}x**" if h else "–"])
    lines += [table(["batch", "static acc %", "GFNet point", "GFNet acc %", "mean steps", "static ms", "GFNet ms",
                     "GFNet / static"], rows), "",
              "Head to head: alternating blocks of the same 64 images (8 blocks).", ""]
    tp = res["summary"].get("throughput")
    if tp:
        lines += [f"Batch 32 over batch 1 at the batch-1 point, head to head: {tp['b1_ms']:.3f} vs "
                  f"{tp['b32_ms']:.3f} ms per image, **{tp['ratio']:.2f}x** throughput.", ""]
    prof = res["summary"].get("profile")
    if prof:
        n = 200
        lines += ["## Stages at batch 1 (profiler on, 200 calls; ms per image)", "",
                  table(["stage", "ms per image"], [[k, f"{v['total_ms'] / n:.3f}"] for k, v in prof.items()
                                                   if k != "per_image"]), ""]
    lines += ["## Every operating point", "",
              table(["point", "batch", "accuracy %", "mean ms", "p95 ms", "mean steps", "exits per step"],
                    [[r["point"], r["batch"], f"{r['accuracy']:.1f}", f"{r['mean_ms']:.3f}", f"{r['p95_ms']:.3f}",
                      f"{r['mean_steps']:.2f}", "/".join(map(str, r["exit_histogram"]))] for r in res["gfnet"]]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
