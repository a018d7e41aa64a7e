"""``gfnet-edge info``: describe a GFNet checkpoint, a static baseline checkpoint or a bundle."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import List, Optional

from ..argtypes import int_range
from ..bundle import json_text
from ..errors import InputError


def fmt_macs(x: float) -> str:
    """Multiply-adds with a unit: ``41.8M``, ``1.23G``."""
    if x >= 1e9:
        return f"{x / 1e9:,.2f}G"
    if x >= 1e5:
        return f"{x / 1e6:,.1f}M"
    return f"{x / 1e3:,.1f}K"


def _describe_bundle(args: argparse.Namespace) -> int:
    """``gfnet-edge info BUNDLE``: the bundle's manifest, without torch."""
    from ..bundle_info import describe_bundle, info_rows

    if args.model_name or args.patch_size:
        raise InputError(f"{args.checkpoint} is a bundle: --model-name and --patch-size apply to checkpoints")
    info = describe_bundle(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = info_rows(info, fmt_macs)
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0


def _numbers(meta: dict, key: str, path: str) -> Optional[List[float]]:
    """The checkpoint's ``key`` metadata as floats (None: absent or empty).

    Raises:
        InputError: it is not a list of numbers.
    """
    try:
        return [float(x) for x in meta.get(key, [])] or None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: checkpoint {key} is not a list of numbers ({exc})") from exc


def trained_line(config: Optional[dict]) -> Optional[str]:
    """How ``gfnet-edge train`` made a checkpoint, from its ``train_config``, in one line: the
    image folder and backbone, and where the GFNet's encoders started; ``None`` for a
    checkpoint that does not record it (the released ones)."""
    if not isinstance(config, dict):
        return None
    if "data_config" in config and "data" not in config:
        return "by the demo trainer (the cluttered-digits task)"
    start = start_text(config.get("gfnet_init") or config.get("pretrained"))
    return f"on {config.get('data') or '?'} ({config.get('backbone') or '?'}); encoders started from {start}"


def start_text(start: object) -> str:
    """Where ``gfnet-edge train`` started a network, as recorded (``gfnet_init``, a static
    baseline's ``started_from``: a weights file, ``timm`` or ``random``), in words."""
    if not isinstance(start, str):
        return "not recorded" if start is None else str(start)
    return {"timm": "timm's pretrained weights", "random": "random weights"}.get(start, start)


def _recorded_number(meta: dict, key: str) -> Optional[float]:
    """The metadata ``key`` as a finite number; ``None`` when absent or not a number."""
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _describe_static(args: argparse.Namespace, meta: dict) -> int:
    """``gfnet-edge info STATIC``: a static baseline's metadata (``RUN/static.pth.tar``), read
    without building its network."""
    from ..bundle_info import class_names_text, one_line

    path = str(args.checkpoint)
    if args.model_name or args.patch_size:
        raise InputError(f"{path} is a static baseline: --model-name and --patch-size apply to GFNet checkpoints")
    names = meta.get("classes")
    names = [str(c) for c in names] if isinstance(names, (list, tuple)) and names else None
    accuracy = {split: _recorded_number(meta, f"{split}_accuracy") for split in ("val", "test")}
    use = f"gfnet-edge calibrate BUNDLE --data DATA -o REPORT --static {path}"
    info = {
        "checkpoint": path,
        "kind": "static_baseline",
        "model_name": meta.get("model_name"),
        "backbone": meta.get("backbone"),
        "backbone_kwargs": meta.get("backbone_kwargs") or {},
        "image_size": meta.get("image_size"),
        "classes": meta.get("num_classes"),
        "class_names": names,
        "mean": meta.get("mean"),
        "std": meta.get("std"),
        "crop_pct": meta.get("crop_pct"),
        "dataset_interpolation": meta.get("dataset_interpolation"),
        "macs": _recorded_number(meta, "macs"),
        "val_accuracy": accuracy["val"],
        "test_accuracy": accuracy["test"],
        "started_from": meta.get("started_from"),
        "demo_data": meta.get("demo_data"),
        "use": use,
    }
    if args.json:
        print(json_text(info, indent=2, default=str))
        return 0

    def listed(values: object) -> str:
        return ", ".join(map(str, values)) if isinstance(values, (list, tuple)) else "not recorded"

    kwargs = info["backbone_kwargs"]
    rows = [("model", f"{info['model_name'] or '(unnamed)'} (static baseline: {info['backbone']} on whole images)")]
    if kwargs:  # the timm backbone's construction arguments (the demo's quarter-width resnet18)
        rows.append(("backbone args", ", ".join(f"{k}={v}" for k, v in kwargs.items()) if isinstance(kwargs, dict)
                     else str(kwargs)))
    rows.append(("sizes", f"S={info['image_size']} classes={info['classes']}"))
    if names:
        rows.append(("class names", class_names_text(names)))
    crop = (f"crop {info['crop_pct']}, {info['dataset_interpolation']} resize"
            if info["crop_pct"] is not None or info["dataset_interpolation"] is not None else "crop not recorded")
    rows += [
        ("pre-processing", f"mean {listed(info['mean'])}; std {listed(info['std'])}; {crop}"),
        ("MACs per image", fmt_macs(info["macs"]) if info["macs"] is not None else "not recorded"),
        ("accuracy", "; ".join(f"{a:.2f}% on {split}" for split, a in accuracy.items() if a is not None)
                     or "not recorded"),
    ]
    if isinstance(info["demo_data"], dict):
        rows.append(("trained", "by the demo trainer (the cluttered-digits task)"))
    rows += [("started from", start_text(info["started_from"])),
             ("use", f"{use} (the report compares the GFNet of BUNDLE, of the same classes and image size, "
                     "with this baseline)")]
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {one_line(v)}")
    return 0


def _static_meta(path: str) -> Optional[dict]:
    """A static baseline's metadata, or ``None`` for a file that is none."""
    from ..train.static import CheckpointError, load_static_meta

    try:
        return load_static_meta(path)
    except CheckpointError:
        return None


def run(args: argparse.Namespace) -> int:
    """Describes a checkpoint (needs torch) or a bundle (does not)."""
    if Path(args.checkpoint).is_dir():
        return _describe_bundle(args)
    from ..bundle_info import class_names_text, one_line
    from ..models.checkpoint import CheckpointError, load_checkpoint
    from ..models.macs import count_step_macs

    try:
        model = load_checkpoint(args.checkpoint, model_name=args.model_name, patch_size=args.patch_size)
    except CheckpointError as exc:
        static = _static_meta(args.checkpoint)  # RUN/static.pth.tar, the baseline for calibrate --static
        if static is None:
            raise InputError(str(exc)) from exc
        return _describe_static(args, static)
    spec, meta = model.spec, model.meta
    costs = count_step_macs(model)
    info = {
        "checkpoint": str(args.checkpoint),
        "model_name": spec.model_name,
        "family": spec.family,
        "backbone": spec.backbone or "torchvision",
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "steps": spec.steps,
        "classes": spec.num_classes,
        "class_names": list(meta["classes"]) if meta.get("classes") else None,
        "glance_interpolation": spec.glance_interpolation,
        "classifier": spec.classifier,
        "policy_encoder": "conv" if spec.policy_conv else "linear",
        "macs": costs.as_dict(),
        "checkpoint_flops": _numbers(meta, "flops", args.checkpoint),
        "anytime_classification": _numbers(meta, "anytime_classification", args.checkpoint),
        "missing_metadata": meta["missing_metadata"],
        "train_config": meta.get("train_config"),
    }
    if args.json:
        print(json_text(info, indent=2))
        return 0
    rows = [
        ("model", f"{spec.model_name} ({spec.family}, {info['backbone']})"),
        ("sizes", f"S={spec.image_size} P={spec.patch_size} T={spec.steps} classes={spec.num_classes}"),
    ]
    if info["class_names"]:  # a model trained on an image folder: the names its bundle will carry
        rows.append(("class names", one_line(class_names_text(info["class_names"]))))
    rows += [
        ("glance", f"{spec.glance_interpolation}, align_corners=True"),
        ("heads", f"classifier={spec.classifier}, policy encoder={info['policy_encoder']}, step-0 logits from {spec.step0}"),
        ("backbone MACs", fmt_macs(costs.backbone)),
        ("policy MACs", fmt_macs(costs.policy)),
        ("classifier MACs", ", ".join(fmt_macs(c) for c in costs.classifier)),
        ("cumulative MACs", ", ".join(fmt_macs(c) for c in costs.cumulative)),
    ]
    trained = trained_line(info["train_config"])
    if trained is not None:
        rows.append(("trained", one_line(trained)))
    if info["anytime_classification"]:
        rows.append(("anytime acc (%)", ", ".join(f"{a:.2f}" for a in info["anytime_classification"])))
    rows.append(("missing metadata", ", ".join(meta["missing_metadata"]) or "none"))
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``info``."""
    p = sub.add_parser(
        "info",
        help="describe a GFNet checkpoint, static baseline or bundle",
        description="Print the variant, sizes, per-step multiply-adds and the metadata a GFNet checkpoint lacks; "
                    "for a static baseline (RUN/static.pth.tar): its backbone, classes, pre-processing, "
                    "multiply-adds, accuracy and start; "
                    "for a bundle directory: its model, graphs, engines and budgets (no torch needed).",
    )
    p.add_argument("checkpoint", metavar="checkpoint_or_bundle",
                   help="GFNet checkpoint (.pth.tar), released or training-script format; a static baseline "
                        "(RUN/static.pth.tar, for calibrate --static); or a bundle "
                        "directory (its graphs, engines with their device and DLA layer placement, budgets)")
    p.add_argument("--model-name", help="variant name when the checkpoint does not store it (e.g. resnet50); "
                                        "checked against one that does")
    p.add_argument("--patch-size", type=int_range(1, 1 << 16),
                   help="patch size P when the checkpoint does not store it; checked against one that does")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
