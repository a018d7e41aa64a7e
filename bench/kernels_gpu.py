"""Benchmark of the CUDA kernels against their torch CUDA equivalents, same GPU, same run.

    python bench/kernels_gpu.py [--reps R] [--out bench/results/kernels_gpu.md]

Cases: pre-process + glance of a 1920x1080 uint8 frame already on the GPU (one fused kernel pair
against torch's float antialiased resize, crop, normalise and bicubic glance); glance and patch
crop of a batch; the GRU classifier step 2048 -> 1024 -> 1000 fused with its Linear head, softmax
max and argmax (ours) against ``nn.GRUCell`` + ``nn.Linear`` + ``softmax().max()`` (torch), at
batch 1 and 32, float32 and float16 weights. For scale, the same run times a torch ResNet-50 and
MobileNet-V3 forward on 96x96 patches (float16, channels-last): the backbone one GFNet step runs.

Every case is timed with CUDA events on one stream, over ``reps`` back-to-back calls (so launch
overhead counts, as it does at batch 1), in interleaved rounds; medians are reported. Needs torch
with CUDA and a CUDA build of the extension; exits with status 2 otherwise.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gfnet_edge import ops  # noqa: E402

MEAN, STD = ops.IMAGENET_MEAN, ops.IMAGENET_STD
Row = Tuple[str, float, float, str]


def cuda_ms(fns: Dict[str, Callable[[], object]], reps: int, stream: "torch.cuda.Stream",
            rounds: int = 5) -> Dict[str, float]:
    """Median over interleaved rounds of the mean milliseconds per call (CUDA events)."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    with torch.cuda.stream(stream):
        for fn in fns.values():
            for _ in range(3):
                fn()
        stream.synchronize()
        for _ in range(rounds):
            for k, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                for _ in range(reps):
                    fn()
                end.record(stream)
                end.synchronize()
                times[k].append(start.elapsed_time(end) / reps)
    return {k: float(np.median(v)) for k, v in times.items()}


def bench_preprocess(reps: int, stream) -> List[Row]:
    rng = np.random.default_rng(0)
    frame_np = rng.integers(0, 256, size=(1080, 1920, 3), dtype=np.uint8)
    frame = torch.from_numpy(frame_np).cuda()
    rows = []
    for interp, S, pct, P in [("bilinear", 224, 0.875, 96), ("bicubic", 300, 0.904, 144)]:
        size = int(S / pct)
        h, w = 1080, 1920
        new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        top, left = int(round((new[0] - S) / 2.0)), int(round((new[1] - S) / 2.0))
        scale = torch.tensor([1 / (255 * s) for s in STD], device="cuda").view(1, 3, 1, 1)
        shift = torch.tensor([m / s for m, s in zip(MEAN, STD)], device="cuda").view(1, 3, 1, 1)
        out32 = torch.empty(3, S, S, device="cuda")
        g32 = torch.empty(3, P, P, device="cuda")
        out16 = torch.empty(3, S, S, device="cuda", dtype=torch.float16)
        g16 = torch.empty(3, P, P, device="cuda", dtype=torch.float16)

        def torch_chain():
            x = frame.permute(2, 0, 1)[None].float()
            r = F.interpolate(x, size=new, mode=interp, antialias=True)
            x = r[:, :, top:top + S, left:left + S] * scale - shift
            return x, F.interpolate(x, size=(P, P), mode="bicubic", align_corners=True)

        def ours(out=out32, g=g32, dtype="float32"):
            ops.cuda_preprocess(frame, h, w, S, out, crop_pct=pct, interpolation=interp, out_dtype=dtype,
                                glance=g, glance_size=P, glance_dtype=dtype, stream=stream)

        t = cuda_ms({"torch": torch_chain, "f32": ours,
                     "f16": lambda: ours(out16, g16, "float16")}, reps, stream)
        rows.append((f"pre-process + glance 1920x1080 {interp} S={S} P={P}, float32 out", t["torch"], t["f32"],
                     "torch: float antialiased interpolate, crop, normalise, bicubic glance"))
        rows.append((f"pre-process + glance 1920x1080 {interp} S={S} P={P}, float16 out", t["torch"], t["f16"],
                     "same torch chain (float32)"))
    n, S, P = 8, 224, 96  # a batch of camera frames: one call against one call per frame
    frames = torch.from_numpy(rng.integers(0, 256, size=(n, 1080, 1920, 3), dtype=np.uint8)).cuda()
    out, g = torch.empty(n, 3, S, S, device="cuda"), torch.empty(n, 3, P, P, device="cuda")
    frame_bytes, out_bytes, g_bytes = 1080 * 1920 * 3, 3 * S * S * 4, 3 * P * P * 4

    def per_frame():
        for i in range(n):
            ops.cuda_preprocess(frames.data_ptr() + i * frame_bytes, 1080, 1920, S, out.data_ptr() + i * out_bytes,
                                glance=g.data_ptr() + i * g_bytes, glance_size=P, stream=stream)

    t = cuda_ms({"per_frame": per_frame,
                 "batch": lambda: ops.cuda_preprocess(frames, 1080, 1920, S, out, glance=g, glance_size=P,
                                                      stream=stream, n=n)}, reps, stream)
    rows.append((f"pre-process + glance {n} x 1920x1080 bilinear S={S} P={P}, one call (n={n})", t["per_frame"],
                 t["batch"], "baseline: cuda_preprocess called once per frame"))
    return rows


def bench_crop_glance(reps: int, stream) -> List[Row]:
    rows = []
    S, P = 224, 96
    for n in (1, 32):
        images = torch.randn(n, 3, S, S, device="cuda")
        coords = torch.randint(0, S - P + 1, (n, 2), device="cuda", dtype=torch.int32)
        out = torch.empty(n, 3, P, P, device="cuda")
        flag = torch.zeros(1, device="cuda", dtype=torch.int32)
        ii = torch.arange(P, device="cuda")
        ar, ch = torch.arange(n, device="cuda"), torch.arange(3, device="cuda")

        def torch_gather():
            c = coords.long()
            r = (c[:, 0, None] + ii)[:, None, :, None]
            q = (c[:, 1, None] + ii)[:, None, None, :]
            return images[ar[:, None, None, None], ch[None, :, None, None], r, q]

        t = cuda_ms({"torch": torch_gather,
                     "ours": lambda: ops.cuda_crop_patches(images, n, S, coords, out, P, error_flag=flag,
                                                           stream=stream)}, reps, stream)
        rows.append((f"crop_patches N={n} {S}->{P} (device coords)", t["torch"], t["ours"],
                     "torch advanced-index gather"))
        g = torch.empty(n, 3, P, P, device="cuda")
        t = cuda_ms({"torch": lambda: F.interpolate(images, size=(P, P), mode="bicubic", align_corners=True),
                     "ours": lambda: ops.cuda_glance(images, n, S, g, P, "bicubic", stream=stream)}, reps, stream)
        rows.append((f"glance N={n} {S}->{P} bicubic", t["torch"], t["ours"], "F.interpolate"))
    return rows


def bench_gru(reps: int, stream) -> List[Row]:
    torch.manual_seed(0)
    I, H, C = 2048, 1024, 1000
    cell = torch.nn.GRUCell(I, H).cuda().eval()
    fc = torch.nn.Linear(H, C).cuda().eval()
    w = [p.detach().cpu().numpy() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh,
                                             fc.weight, fc.bias)]
    cell16, fc16 = torch.nn.GRUCell(I, H).cuda().half().eval(), torch.nn.Linear(H, C).cuda().half().eval()
    cell16.load_state_dict(cell.state_dict())
    fc16.load_state_dict(fc.state_dict())
    rows = []
    wbytes = sum(a.nbytes for a in w)
    for B in (1, 32):
        x, h = torch.randn(B, I, device="cuda"), torch.randn(B, H, device="cuda")
        x16, h16 = x.half(), h.half()
        hout = torch.empty(B, H, device="cuda")
        logits = torch.empty(B, C, device="cuda")
        mp = torch.empty(B, device="cuda")
        am = torch.empty(B, device="cuda", dtype=torch.int32)
        heads = {dt: ops.GRUHead(*w, weight_dtype=dt, device="cuda") for dt in ("float32", "float16")}

        @torch.no_grad()
        def torch_step(c=cell, f=fc, x=x, h=h):
            hn = c(x, h)
            lg = f(hn)
            return hn, lg, lg.softmax(-1).max(-1)

        def ours(dt):
            heads[dt].step_device(x, h, hout, B, logits, mp, am, stream=stream)

        t = cuda_ms({"t32": torch_step, "t16": lambda: torch_step(cell16, fc16, x16, h16),
                     "o32": lambda: ours("float32"), "o16": lambda: ours("float16")}, reps, stream)
        for key, tkey, name, nbytes in [("o32", "t32", "float32", wbytes), ("o16", "t16", "float16", wbytes // 2)]:
            rows.append((f"GRU {I}->{H} + Linear->{C} + max/argmax B={B}, {name} weights", t[tkey], t[key],
                         f"torch GRUCell+Linear+softmax.max ({name}); ours {nbytes / (t[key] * 1e-3) / 1e9:.0f} GB/s"
                         f" of weights"))
    return rows


def bench_backbones(reps: int, stream) -> List[str]:
    """Context: a torch float16 backbone forward on one 96x96 patch batch."""
    lines = []
    try:
        import timm
    except ImportError:
        return ["(timm not installed: no backbone timings)"]
    for name in ("resnet50", "mobilenetv3_large_100"):
        model = timm.create_model(name, pretrained=False).cuda().half().eval().to(memory_format=torch.channels_last)
        for B in (1, 32):
            x = torch.randn(B, 3, 96, 96, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
            with torch.no_grad():
                t = cuda_ms({"fwd": lambda: model.forward_features(x)}, max(5, reps // 5), stream)
            lines.append(f"| torch {name} forward_features 96x96 B={B} float16 | {t['fwd']:.3f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=50, help="calls per timed round")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernels_gpu.md"))
    args = ap.parse_args()
    if not torch.cuda.is_available() or ops.cuda_device_count() < 1 or not ops.has_cuda_build():
        print("bench/kernels_gpu.py needs torch with CUDA and a CUDA build of gfnet_edge._C", file=sys.stderr)
        return 2
    props = ops.cuda_device_properties(0)
    machine = (f"{props['name']} (sm_{props['major']}{props['minor']}, {props['multiprocessors']} SMs); "
               f"torch {torch.__version__}; extension archs [{ops.cuda_archs()}]")
    print(machine, flush=True)
    stream = torch.cuda.Stream()
    rows = bench_preprocess(args.reps, stream) + bench_crop_glance(args.reps, stream) + bench_gru(args.reps, stream)
    lines = ["| case | baseline ms | ours ms | speed-up | baseline |", "|---|---:|---:|---:|---|"]
    lines += [f"| {n} | {a:.4f} | {b:.4f} | {a / b:.2f}x | {note} |" for n, a, b, note in rows]
    table = "\n".join(lines)
    print(table, flush=True)
    bb = ["| backbone (context) | ms per forward |", "|---|---:|"] + bench_backbones(args.reps, stream)
    print("\n".join(bb), flush=True)
    Path(args.out).write_text(
        "# CUDA kernels against torch CUDA\n\n"
        f"Command: `python bench/kernels_gpu.py --reps {args.reps}`\n\nMachine: {machine}\n\n"
        "Milliseconds per call on one stream (CUDA events, median of 5 interleaved rounds of back-to-back "
        "calls, launch overhead included).\n\n" + table + "\n\n" + "\n".join(bb) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
