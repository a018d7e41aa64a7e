"""ImageNet-shaped GFNets on a CUDA GPU: per-step backbone cost at patch size vs the static
network at full size, and the captured loop at a stated exit profile, batch 1 to 128.

    python bench/gpu_shapes.py [--models mobilenetv3_large_100:96,resnet50:96,efficientnet_b2:128]
                               [--batches 1,8,32,128] [--precisions fp16,fp32] [--profile-from e2e_gpu.json]

Random weights (no ImageNet checkpoints on this machine), so accuracy means nothing here; what
is measured is cost. Exits are forced to a stated profile: thresholds fitted (the reference
fit) on a trace of the same inputs so that the given fractions of images exit at each step.
The profile is the demo model's at equal accuracy (read from ``--profile-from``, the JSON
``bench/e2e_gpu.py`` wrote, or 16.5 / 27.5 / 56 % when absent), the last fraction spread
evenly over the extra steps of longer models.

Every timing starts from normalised images (and their glance) already in GPU memory, on both
sides: static = the GFNet's full-resolution encoder and its classifier at full size, captured as
one CUDA graph per batch; glance / focus = the GFNet's backbone graphs replayed alone at the
loop's batch; loop = the runtime's captured loop (``Driver.run_device``) at the profile, and
with every step run for the time outside the backbones. Same precision on both sides.

``--device cpu`` is a dry run on a machine without a GPU (tiny numbers of calls, eager torch).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ProgressiveReport, command_line, machine, run_label, table  # noqa: E402
from gpu_common import (DTYPES, Graphed, close_driver, forced_profile, gfnet_driver, per_call_ms,  # noqa: E402
                        profile_thresholds, replay_ms, run_loop, sync)

DEFAULT_PROFILE = (0.165, 0.275, 0.56)


def _log(msg: str) -> None:
    print(f"[gpu-shapes] {msg}", flush=True)


def demo_profile(path: Optional[str]) -> Dict[str, Any]:
    """The demo's exit fractions at equal accuracy from an e2e_gpu JSON (fp32 run), else the default."""
    if path and Path(path).is_file():
        try:
            res = json.loads(Path(path).read_text())
        except ValueError as exc:  # unreadable: the default profile, and say why
            _log(f"{path}: not readable JSON ({exc}); default exit profile")
            res = {}
        for prec in ("fp32", "fp16"):
            pick = (res.get("runs", {}).get(prec) or {}).get("pick")
            if pick:
                ex = np.asarray(pick["exits"], np.float64)
                return {"fractions": (ex / ex.sum()).tolist(), "source": f"{path} ({prec}, {pick['point']})"}
    return {"fractions": list(DEFAULT_PROFILE), "source": "default (demo model, H200 fp32, equal accuracy)"}


def static_net(model, device: str, dtype: str):
    """The GFNet's full-resolution encoder with its classifier, as a callable on images."""
    enc = copy.deepcopy(model.model).to(device).eval()
    if dtype == "float16":
        enc = enc.half()
    has_logits = hasattr(enc, "logits")

    def forward(x):
        pooled, _ = enc(x.half() if dtype == "float16" else x)
        return enc.logits(pooled) if has_logits else pooled

    return forward


def measure_model(name: str, P: int, prec: str, batches: List[int], fractions, device: str,
                  n_images: int, reps: int) -> Dict[str, Any]:
    import torch

    from gfnet_edge import ops
    from gfnet_edge.evaluate import LAST, NO_EXIT, exit_steps
    from gfnet_edge.models import GFNet
    from gfnet_edge.runtime.graphs import bucket_for
    from gfnet_edge.variants import released_spec

    dtype = DTYPES[prec]
    torch.manual_seed(0)
    model = GFNet(released_spec(name, P)).eval()
    spec = model.spec
    S, T = spec.image_size, spec.steps
    driver = gfnet_driver(model, device, dtype)
    x = torch.randn(n_images, 3, S, S, device=device)
    if device == "cuda":
        gl = torch.empty(n_images, 3, P, P, device=device)
        ops.cuda_glance(x.data_ptr(), n_images, S, gl.data_ptr(), P, spec.glance_interpolation,
                        stream=torch.cuda.current_stream().cuda_stream)
        sync(device)

        def inputs(i: int, b: int):
            return x[i].data_ptr(), gl[i].data_ptr(), b  # rows i .. i+b-1 (contiguous)
    else:
        xh = x.numpy()
        glh = ops.glance(xh, P, spec.glance_interpolation)

        def inputs(i: int, b: int):
            return xh[i:i + b], glh[i:i + b], b

    chunk = min(n_images, 128)
    probs = np.concatenate([run_loop(driver, *inputs(i, min(chunk, n_images - i)), None).probs
                            for i in range(0, n_images, chunk)], axis=1)
    prof = forced_profile(T, fractions)
    thr = profile_thresholds(probs, prof)
    ex = exit_steps(probs, thr)
    every = [float(NO_EXIT)] * (T - 1) + [float(LAST)]
    static = Graphed(static_net(model, device, dtype), device)
    out: Dict[str, Any] = {"model": name, "P": P, "S": S, "T": T, "precision": prec, "profile": prof.tolist(),
                           "mean_steps": float(ex.mean() + 1), "exits": [int((ex == k).sum()) for k in range(T)],
                           "batches": {}}
    for b in batches:
        if b > n_images:
            continue
        starts = list(range(0, n_images - b + 1, b))
        state = {"k": 0}

        def cycling(fn):
            def call():
                i = starts[state["k"] % len(starts)]
                state["k"] += 1
                return fn(i)
            return call

        xs = x[:b]
        for i in starts:  # every graph the timed calls need, captured first
            run_loop(driver, *inputs(i, b), thr)
        r: Dict[str, float] = {}
        r["static_ms"] = per_call_ms(lambda: static(xs), device, reps=reps)
        r["loop_profile_ms"] = per_call_ms(cycling(lambda i: run_loop(driver, *inputs(i, b), thr)), device,
                                           reps=max(reps, 2 * len(starts)))
        r["loop_every_ms"] = per_call_ms(lambda: run_loop(driver, *inputs(0, b), every), device, reps=reps)
        B = bucket_for(b, None)
        z = torch.randn(B, 3, P, P, device=device)
        half = dtype == "float16"
        for g in ("glance", "focus"):
            mod = driver.runner.graphs[g]
            gr = Graphed(lambda t, m=mod: m(t.half() if half else t), device)
            r[f"{g}_ms"] = replay_ms(gr, z, device)
        r["outside_per_step_ms"] = (r["loop_every_ms"] - r["glance_ms"] - (T - 1) * r["focus_ms"]) / T
        r["ratio"] = r["loop_profile_ms"] / r["static_ms"]
        out["batches"][b] = r
        _log(f"{name} P{P} {prec} batch {b}: static {r['static_ms'] / b:.4f}, GFNet {r['loop_profile_ms'] / b:.4f} "
             f"ms/img ({r['ratio']:.2f}x); focus step {r['focus_ms'] / b:.4f} ms/img; outside "
             f"{r['outside_per_step_ms'] * 1e3:.1f} us/step")
    ws = getattr(driver.place, "graphs", None)
    if ws is not None:
        out["graphs"] = {"captures": ws.cache.captures, "replays": ws.cache.replays, "disabled": ws.cache.disabled}
    close_driver(driver)
    del driver, static
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenetv3_large_100:96,resnet50:96,efficientnet_b2:128")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--precisions", default="fp16,fp32")
    ap.add_argument("--images", type=int, default=256, help="random images the exit profile is fitted and run on")
    ap.add_argument("--reps", type=int, default=30, help="timed calls per figure (at least 0.2 s of them)")
    ap.add_argument("--profile-from", default=str(RESULTS / "e2e_gpu.json"),
                    help="e2e_gpu.py's JSON to take the demo's exit profile from")
    ap.add_argument("--label", default="", help="a note on the machine's configuration for the report")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--out", default=str(RESULTS / "gpu_shapes.md"))
    args = ap.parse_args(argv)

    import torch

    from gfnet_edge import ops
    from gfnet_edge.runtime.backends.torch import _ieee_fp32

    if args.device == "cuda" and (not torch.cuda.is_available() or ops.cuda_device_count() < 1):
        print("gpu_shapes: needs torch with CUDA and the extension built with CUDA, on a machine with a GPU",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    batches = [int(b) for b in args.batches.split(",")]
    profile = demo_profile(args.profile_from)
    _log(f"exit profile {np.round(profile['fractions'], 3).tolist()} from {profile['source']}")
    dev = args.device
    res: Dict[str, Any] = {"machine": machine(), "label": args.label, "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "no GPU (dry run on the CPU)",
                           "sms": torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 0,
                           "profile": profile, "models": []}
    cmd = command_line(__file__, argv)
    report = ProgressiveReport(Path(args.out), render, res, cmd, t0)

    with _ieee_fp32(torch):
        for item in args.models.split(","):
            name, P = item.split(":")
            for prec in args.precisions.split(","):
                res["models"].append(measure_model(name, int(P), prec.strip(), batches, profile["fractions"], dev,
                                                   args.images, args.reps))
                report.write()
    return report.finish(_log)


def render(res: Dict[str, Any], cmd: str) -> str:
    label = run_label(res)
    prof = ", ".join(f"{100 * f:.1f} %" for f in res["profile"]["fractions"])
    lines = ["# ImageNet-shaped GFNets on a GPU: per-step cost vs the static network, and the captured loop", "",
             f"Command: `{cmd.strip()}`", "",
             f"Machine: {res['machine']}; {res['gpu']} ({res['sms']} SMs visible), torch {res['torch']}.{label}", "",
             "Random weights; inputs already in GPU memory on both sides; CUDA graphs on both sides, same precision "
             f"(torch modules, no TensorRT). Exit profile (fraction exiting after each step): {prof} "
             f"({res['profile']['source']}); models with more steps spread the last fraction over the extra steps. "
             "Static: the full-resolution encoder and classifier at full size. ms per image unless stated.", ""]
    rows = []
    for m in res["models"]:
        for b, r in m["batches"].items():
            b = int(b)
            rows.append([f"{m['model']} P{m['P']} T{m['T']}", m["precision"], b, f"{r['static_ms'] / b:.4f}",
                         f"{r['glance_ms'] / b:.4f}", f"{r['focus_ms'] / b:.4f}",
                         f"{r['focus_ms'] / r['static_ms']:.2f}", f"{m['mean_steps']:.2f}",
                         f"{r['loop_profile_ms'] / b:.4f}", f"**{r['ratio']:.2f}x**",
                         f"{r['outside_per_step_ms'] * 1e3:.1f}"])
    lines += [table(["model", "precision", "batch", "static", "glance step", "focus step", "focus / static",
                     "mean steps", "GFNet at the profile", "GFNet / static", "outside backbones us/step (per call)"],
                    rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
