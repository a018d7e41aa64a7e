"""The ``gfnet-edge`` command. Each subcommand is a thin call into a module.

Every user-facing error ends in one line ``gfnet-edge: error: ...`` and a non-zero exit:
2 for bad input, 3 for a missing requirement (TensorRT, GPU, torch), 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from . import __version__
from .errors import GFNetEdgeError, InputError, UnavailableError, missing_build_module, needs_build_side
from .log import setup_logging

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: Dict[str, Handler] = {}


def _fmt_macs(x: float) -> str:
    if x >= 1e9:
        return f"{x / 1e9:,.2f}G"
    if x >= 1e5:
        return f"{x / 1e6:,.1f}M"
    return f"{x / 1e3:,.1f}K"


def cmd_info_bundle(args: argparse.Namespace) -> int:
    """``gfnet-edge info BUNDLE``: the bundle's manifest, without torch."""
    from .bundle_info import describe_bundle, info_rows

    if args.model_name or args.patch_size:
        raise InputError(f"{args.checkpoint} is a bundle: --model-name and --patch-size apply to checkpoints")
    info = describe_bundle(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = info_rows(info, _fmt_macs)
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from pathlib import Path

    if Path(args.checkpoint).is_dir():
        return cmd_info_bundle(args)
    from .models.checkpoint import CheckpointError, load_checkpoint
    from .models.macs import count_step_macs

    try:
        model = load_checkpoint(args.checkpoint, model_name=args.model_name, patch_size=args.patch_size)
    except CheckpointError as exc:
        raise InputError(str(exc)) from exc
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
        "glance_interpolation": spec.glance_interpolation,
        "classifier": spec.classifier,
        "policy_encoder": "conv" if spec.policy_conv else "linear",
        "macs": costs.as_dict(),
        "checkpoint_flops": [float(x) for x in meta.get("flops", [])] or None,
        "anytime_classification": [float(x) for x in meta.get("anytime_classification", [])] or None,
        "missing_metadata": meta["missing_metadata"],
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("model", f"{spec.model_name} ({spec.family}, {info['backbone']})"),
        ("sizes", f"S={spec.image_size} P={spec.patch_size} T={spec.steps} classes={spec.num_classes}"),
        ("glance", f"{spec.glance_interpolation}, align_corners=True"),
        ("heads", f"classifier={spec.classifier}, policy encoder={info['policy_encoder']}, step-0 logits from {spec.step0}"),
        ("backbone MACs", _fmt_macs(costs.backbone)),
        ("policy MACs", _fmt_macs(costs.policy)),
        ("classifier MACs", ", ".join(_fmt_macs(c) for c in costs.classifier)),
        ("cumulative MACs", ", ".join(_fmt_macs(c) for c in costs.cumulative)),
    ]
    if info["anytime_classification"]:
        rows.append(("anytime acc (%)", ", ".join(f"{a:.2f}" for a in info["anytime_classification"])))
    rows.append(("missing metadata", ", ".join(meta["missing_metadata"]) or "none"))
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="describe a GFNet checkpoint or bundle",
        description="Print the variant, sizes, per-step multiply-adds and the metadata a GFNet checkpoint lacks; "
                    "for a bundle directory: its model, graphs, engines and budgets (no torch needed).",
    )
    p.add_argument("checkpoint", help="GFNet checkpoint (.pth.tar), released or training-script format; or a bundle "
                                      "directory (its graphs, engines with their device and DLA layer placement, budgets)")
    p.add_argument("--model-name", help="variant name when the checkpoint does not store it (e.g. resnet50)")
    p.add_argument("--patch-size", type=int, help="patch size P when the checkpoint does not store it")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gfnet-edge",
        description="Turn a trained GFNet checkpoint into a fast, quantized, measured deployment.",
    )
    parser.add_argument("--version", action="version", version=f"gfnet-edge {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_info(sub)
    for extra in _EXTRA_PARSERS:
        extra(sub)
    return parser


#: Other modules register subcommands here (``register(fn)`` with ``fn(subparsers)``).
_EXTRA_PARSERS: List[Callable[[argparse._SubParsersAction], None]] = []


def _load_extra_commands() -> None:
    import importlib

    _EXTRA_PARSERS.clear()
    for mod in ("gfnet_edge.commands",):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                continue
            raise
        _EXTRA_PARSERS.extend(getattr(m, "PARSERS", []))


def main(argv: Optional[List[str]] = None) -> int:
    _load_extra_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"gfnet-edge: error: {exc}", file=sys.stderr)
        return 2
    except UnavailableError as exc:
        print(f"gfnet-edge: error: {exc}", file=sys.stderr)
        return 3
    except GFNetEdgeError as exc:
        print(f"gfnet-edge: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:  # a build-side command on a device-side install
        missing = missing_build_module(exc)
        if missing is None:
            raise
        print(f"gfnet-edge: error: {needs_build_side(f'`gfnet-edge {args.command}`', missing)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("gfnet-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
