"""Per-step latency breakdown of ImageNet-shaped GFNets (random weights) through the runtime.

    python bench/imagenet_shapes.py [--threads 2] [--repeat 10]

Builds FP32 bundles for mobilenetv3_large_100 (P=96, T=3) and resnet50 (P=96, T=5), runs every
step for one image at a time with the per-stage profiler on, and prints where the time goes and
the share spent outside backbone inference (pre-process, policy, crop, heads, exit).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_results  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--models", default="mobilenetv3_large_100:96,resnet50:96")
    args = ap.parse_args(argv)

    import torch

    from gfnet_edge.build import BuildConfig, build_bundle
    from gfnet_edge.models import GFNet, save_checkpoint
    from gfnet_edge.runtime import Runtime
    from gfnet_edge.runtime.profile import STAGES, backbone_ms
    from gfnet_edge.variants import released_spec

    torch.set_num_threads(args.threads)
    rows, details = [], []
    rng = np.random.default_rng(0)
    for item in args.models.split(","):
        name, P = item.split(":")
        with tempfile.TemporaryDirectory() as td:
            torch.manual_seed(0)
            model = GFNet(released_spec(name, int(P)))
            ck = save_checkpoint(Path(td) / "m.pth.tar", model)
            bundle = build_bundle(ck, Path(td) / "bundle", BuildConfig(precision="fp32", backend="onnxruntime"), progress=False)
            rt = Runtime(bundle, backend="onnxruntime", precision="fp32", threads=args.threads, profile=True)
            S = rt.model.image_size
            frame = rng.integers(0, 256, (S + 32, S + 64, 3), dtype=np.uint8)
            for _ in range(2):
                rt.predict([frame])  # warm-up
            rt.profiler.reset()
            for _ in range(args.repeat):
                rt.predict([frame])  # no budget in the bundle: every step runs
            s = rt.profiler.summary()
            rt.close()
        per_image = s["per_image"]["mean_ms"]
        backbone = backbone_ms(s) / args.repeat
        stage_ms = {k: v["total_ms"] / args.repeat for k, v in s.items() if k != "per_image"}
        outside = per_image - backbone
        rows.append([f"{name} P={P} T={rt.model.steps}", per_image, backbone, outside, 100 * outside / per_image])
        details.append((name, stage_ms))
    t1 = table(["model", "per image ms", "backbone ms", "outside ms", "outside %"], rows)
    # The stages the loops reported, in the profiler's order (the host loop's heads, exit test,
    # policy and crop are one native call, stage "step", which also reports them as its parts).
    stages = [k for k in STAGES if any(k in d for _, d in details)]
    t2 = table(["model"] + [f"{k} ms" for k in stages], [[n] + [d.get(k, 0.0) for k in stages] for n, d in details])
    print(t1)
    print()
    print(t2)
    path = write_results("imagenet_shapes", "ImageNet-shaped GFNets: per-step latency breakdown (FP32, ONNX Runtime, batch 1)",
                         f"python bench/imagenet_shapes.py --threads {args.threads} --repeat {args.repeat}",
                         t1 + "\n\nPer stage (ms per image, all steps; `step` is the host loop's native call, "
                         "`heads`, `exit`, `policy` and `crop` are its parts, timed inside it):\n\n" + t2)
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
