"""Speed of the demo's frozen-glance stages with the glance outputs kept per image, against
recomputing them per batch, in one process.

Starts from the shipped demo GFNet (``gfnet_edge/assets/demo_gfnet.pth.tar``) on the train split
it was trained on (the generator config stored in the checkpoint), and runs each ``--stage``
(``bc`` and / or ``ppo``) for ``--iters`` batches of ``--batch`` images, alternately with
``glance_cache_mb=0`` (the baseline: the glance encoder runs on every drawn image) and with the
cache, ``--repeats`` times each (the order alternating between repeats). Reports each run's
training seconds (the batch loop, without the per-epoch validation), the ratio baseline / cached, and checks that both runs end with the same
policy weights (within 1e-5; the exit status is 1 otherwise).

    python bench/train_glance_cache.py --stage bc --iters 300 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT as REPO, machine as describe_machine  # noqa: E402  (also makes the checkout importable)


def _run(stage: str, cache_mb: float, args, train, val, state, dcfg) -> dict:
    import torch

    from gfnet_edge.train.config import TrainConfig
    from gfnet_edge.train.recipe import StagePlan
    from gfnet_edge.train.stages import Run

    plan = StagePlan(epochs=1, iters=args.iters, batch=args.batch, lr=1e-3 if stage == "bc" else 3e-4)
    cfg = TrainConfig(train_size=len(train), val_size=len(val), data_config=dcfg, eval_max=len(val),
                      glance_cache_mb=cache_mb, **{stage: plan})
    with tempfile.TemporaryDirectory() as out:
        run = Run(Path(out), cfg, train, val, progress=False, log=lambda s: None)
        run.model.load_state_dict(state)
        t0 = time.perf_counter()
        getattr(run, stage)(resume=False)
        wall = time.perf_counter() - t0
        rec = torch.load(run.stage_path(stage), map_location="cpu", weights_only=True)["history"][-1]
        policy = {k: v.clone() for k, v in run.model.policy.state_dict().items()}
    train_s = args.iters * args.batch / rec["images_per_s"]  # the batch loop (images_per_s excludes validation)
    return {"stage": stage, "glance_cache_mb": cache_mb, "train_s": round(train_s, 2), "wall_s": round(wall, 2),
            "images_per_s": rec["images_per_s"], "loss": rec["loss"], "policy": policy}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", action="append", choices=["bc", "ppo"], help="stage(s) to time (default: bc)")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train-size", type=int, default=5000)
    ap.add_argument("--val-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gfnet", default=str(REPO / "gfnet_edge/assets/demo_gfnet.pth.tar"))
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args(argv)
    import torch

    from gfnet_edge.models.checkpoint import load_checkpoint, read_checkpoint_dict
    from gfnet_edge.train.config import data_config_from_dict
    from gfnet_edge.train.data import load_split

    torch.set_num_threads(args.threads)
    stored = read_checkpoint_dict(args.gfnet)["demo_data"]["config"]
    dcfg = data_config_from_dict(stored)
    train = load_split("train", args.train_size, config=dcfg, progress=False)
    val = load_split("val", args.val_size, config=dcfg, progress=False)
    state = {k: v.float() for k, v in load_checkpoint(args.gfnet).state_dict().items()}
    rows = []
    for stage in args.stage or ["bc"]:
        for rep in range(args.repeats):
            # the order alternates between repeats: the first run of a process also pays one-time
            # costs (thread pool, allocator growth, first dispatch of each kernel)
            if rep % 2 == 0:
                base = _run(stage, 0.0, args, train, val, state, stored)
                cached = _run(stage, 1024.0, args, train, val, state, stored)
            else:
                cached = _run(stage, 1024.0, args, train, val, state, stored)
                base = _run(stage, 0.0, args, train, val, state, stored)
            diff = max((base["policy"][k] - cached["policy"][k]).abs().max().item() for k in base["policy"])
            same = diff <= 1e-5
            for r in (base, cached):
                r.pop("policy")
            rows.append({"base": base, "cached": cached, "same_weights": same, "max_weight_diff": diff,
                         "ratio": round(base["train_s"] / cached["train_s"], 2)})
            print(f"{stage}: {args.iters} x {args.batch} images, {len(train)} train images: recomputed "
                  f"{base['train_s']:.1f} s, kept {cached['train_s']:.1f} s -> {rows[-1]['ratio']:.2f}x "
                  f"(stage wall clock {base['wall_s']:.1f} / {cached['wall_s']:.1f} s); largest policy weight difference {diff:.1e}",
                  flush=True)
    machine = f"{describe_machine()}, torch {torch.__version__}, {args.threads} torch thread(s)"
    print(f"machine: {machine}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "args": vars(args), "runs": rows}, indent=1) + "\n")
    return 0 if all(r["same_weights"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
