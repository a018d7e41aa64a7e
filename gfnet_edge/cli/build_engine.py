"""``gfnet-edge build-engine``: checkpoint -> ONNX -> INT8 -> engines, in one bundle."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Tuple

from ..argtypes import THREADS, float_range, int_range, zero_or_int_range
from ..bundle_info import one_line, quantization_summary
from ..errors import InputError
from ..quantize.calibration import MIN_CALIB_IMAGES
from ..quantize.options import QuantizeOptions
from ..quantize.profiles import TENSORRT
from ..runtime import backends
from .options import add_trt_build_options, trt_build_options

DESCRIPTION = (
    "Build a deployment bundle from a GFNet checkpoint, or add TensorRT engines to a bundle.\n\n"
    "  workstation:  gfnet-edge build-engine CKPT.pth.tar -o BUNDLE --precision int8 --calib-data DIR\n"
    "  device:       gfnet-edge build-engine BUNDLE --backend tensorrt\n\n"
    "The bundle holds the FP32 and quantized ONNX graphs, the head weights, budgets and (with TensorRT)\n"
    "engines for this GPU. A failed build leaves no half-written bundle."
)


def profile_list(text: str) -> Tuple[str, ...]:
    """``--int8-profiles``: a non-empty comma-separated list of known profiles (duplicates dropped)."""
    from ..quantize.profiles import PROFILES

    names = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"give at least one profile ({', '.join(PROFILES)})")
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown profile {unknown[0]!r}; choose from {', '.join(PROFILES)}")
    return tuple(names)


def _refuse_ignored_options(args: argparse.Namespace, src: Path) -> None:
    """Options this build would not use are refused rather than silently dropped: the INT8 data
    options outside an INT8 build from a checkpoint (a bundle's engines are built from its INT8
    graphs), the options of a new bundle (``-o``, ``--force`` ...) when engines are added to an
    existing one, and the TensorRT builder's options on a build that makes no engines."""
    from ..build import resolve_backend

    if src.is_dir() and not (src / "manifest.json").is_file() and (src / "gfnet.pth.tar").is_file():
        raise InputError(f"{src} is a training run folder, not a bundle: build from its checkpoint: use "
                         f"{src / 'gfnet.pth.tar'}")
    if src.is_dir() and not (src / "manifest.json").is_file():
        raise InputError(f"{src} is a folder but not a bundle (no manifest.json): build from a GFNet checkpoint file, "
                         "or pass a bundle folder to add TensorRT engines to it")
    int8_data = [flag for flag, given in (("--calib-data", args.calib_data is not None),
                                          ("--num-calib", args.num_calib is not None),
                                          ("--num-eval", args.num_eval is not None),
                                          ("--calib-method", args.calib_method is not None),
                                          ("--int8-profiles", args.int8_profiles is not None),
                                          ("--max-accuracy-drop", args.max_accuracy_drop is not None),
                                          ("--finetune-epochs", args.finetune_epochs is not None),
                                          ("--patch-guard", args.patch_guard is not None),
                                          ("--skip-unreadable", args.skip_unreadable)) if given]
    if int8_data and src.is_dir():
        raise InputError(f"{int8_data[0]} applies when building from a checkpoint; {src} is a bundle, whose "
                         "TensorRT engines are built from its INT8 graphs")
    new_bundle = [flag for flag, given in (("-o", args.output is not None), ("--force", args.force),
                                           ("--include-checkpoint", args.include_checkpoint),
                                           ("--model-name", args.model_name is not None),
                                           ("--patch-size", args.patch_size is not None)) if given]
    if new_bundle and src.is_dir():
        raise InputError(f"{new_bundle[0]} applies when building from a checkpoint; {src} is a bundle, to which "
                         "the engines are added in place (copy it first to keep it as it is)")
    if int8_data and args.precision != "int8":
        raise InputError(f"{int8_data[0]} applies to --precision int8 (this build is {args.precision})")
    if int8_data and not src.is_dir():
        _refuse_unused_profile_options(args)
    trt_only = [flag for flag, given in (("--dla-core", args.dla_core is not None),
                                         ("--opt-level", args.opt_level is not None),
                                         ("--timing-cache", args.timing_cache is not None),
                                         ("--workspace", args.workspace is not None),
                                         ("--max-batch", args.max_batch is not None),
                                         ("--opt-batch", args.opt_batch is not None),
                                         ("--no-gpu-fallback", args.no_gpu_fallback)) if given]
    if trt_only and not src.is_dir() and resolve_backend(args.backend) != "tensorrt":
        why = "--backend onnxruntime" if args.backend == "onnxruntime" else "TensorRT is not usable here"
        raise InputError(f"{trt_only[0]} applies to TensorRT engines, and this build makes none ({why}); add them "
                         "on the device with `gfnet-edge build-engine BUNDLE --backend tensorrt ...`")


def _refuse_unused_profile_options(args: argparse.Namespace) -> None:
    """``--int8-profiles`` on a TensorRT build (which writes the ``tensorrt`` set only), and a
    ``--patch-guard`` share none of the build's profiles can keep: the ``cpu`` profile quantizes
    ReLUs (folded into the quantizers), so it has no float activations to guard."""
    from ..build import BuildConfig, resolve_backend
    from ..quantize.profiles import PROFILES
    from ..quantize.qdq import REMOVABLE_ACTIVATIONS

    trt = resolve_backend(args.backend) == "tensorrt"
    if trt and args.int8_profiles not in (None, ("tensorrt",)):
        raise InputError("--int8-profiles applies to a portable bundle (--backend onnxruntime); a TensorRT build "
                         "writes the tensorrt graph set only")
    profiles = ("tensorrt",) if trt else args.int8_profiles or BuildConfig.int8_profiles
    if args.patch_guard:
        limits = {p: PROFILES[p].max_float_mac_share for p in profiles
                  if not set(PROFILES[p].op_types) & set(REMOVABLE_ACTIVATIONS)}
        if not limits:
            raise InputError(f"--patch-guard applies to the tensorrt profile; the {', '.join(profiles)} profile "
                             "quantizes ReLUs into its quantizers and has no patch guard")
        if all(lim is not None and args.patch_guard > lim for lim in limits.values()):
            raise InputError(f"--patch-guard {args.patch_guard:g} is more than the {', '.join(limits)} profile keeps "
                             f"in float at most ({max(limits.values()):g} of the backbone multiply-adds)")


def run(args: argparse.Namespace) -> int:
    """Builds the bundle (or its engines) and prints what it holds."""
    from ..build import BuildConfig, build_bundle, build_engines

    int8 = {k: v for k, v in (("num_calib", args.num_calib), ("num_eval", args.num_eval),
                              ("calib_method", args.calib_method),
                              ("int8_profiles", args.int8_profiles), ("max_accuracy_drop", args.max_accuracy_drop))
            if v is not None}  # left out: BuildConfig's defaults (None tells an option that was not given)
    cfg = BuildConfig(precision=args.precision, backend=args.backend, calib_data=args.calib_data,
                      skip_unreadable=args.skip_unreadable, **int8, finetune_epochs=args.finetune_epochs,
                      patch_guard_share=args.patch_guard,
                      include_checkpoint=args.include_checkpoint,
                      force=args.force, trt=trt_build_options(args), threads=args.threads,
                      model_name=args.model_name, patch_size=args.patch_size)
    src = Path(args.source)
    _refuse_ignored_options(args, src)
    if src.is_dir():
        if args.backend not in ("tensorrt", backends.AUTO):
            raise InputError(f"{src} is a bundle: only `--backend tensorrt` adds engines to an existing bundle")
        cfg.backend = "tensorrt"
        bundle = build_engines(src, cfg)
    else:
        if not args.output:
            raise InputError("building from a checkpoint needs -o BUNDLE")
        bundle = build_bundle(src, Path(args.output), cfg, progress=not args.quiet)
    m, model = bundle.manifest, bundle.model
    engines = ", ".join(f"{e['precision']}@{e.get('gpu_name') or '?'}" for e in m["engines"])
    budgets = f"{', '.join(m['budgets'])} (default: {m.get('default_budget') or 'none'})" if m["budgets"] else \
        "none (`gfnet-edge calibrate` fits them; until then every image runs every step)"
    lines = [f"bundle: {bundle.root}",
             f"  model: {model.model_name} S={model.image_size} P={model.patch_size} T={model.steps}",
             f"  graphs: {', '.join(m['graphs'])}",
             f"  engines: {engines or 'none (ONNX Runtime runs the graphs)'}",
             f"  budgets: {budgets}"] + [f"  {line}" for line in quantization_summary(m)]
    for line in lines:  # names from an earlier manifest may hold any character: one row, no escape sequences
        print(one_line(line))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``build-engine``."""
    from ..build import NUM_EVAL

    p = sub.add_parser("build-engine", help="checkpoint -> ONNX -> INT8 -> engines, in one bundle",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=DESCRIPTION)
    p.add_argument("source", help="GFNet checkpoint (.pth.tar), or an existing bundle directory to add engines to")
    p.add_argument("-o", "--output", help="bundle directory to create (from a checkpoint; engines are added to an "
                                          "existing bundle in place)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="int8", help="graph/engine precision (default int8)")
    p.add_argument("--backend", choices=backends.choices(builds=True), default=backends.AUTO,
                   help="auto (default): TensorRT when it and a GPU are here, else a portable ONNX Runtime bundle")
    p.add_argument("--calib-data", help="INT8 calibration images: folder, .npz, 'demo' (the demo's validation split, default for the demo "
                        "model) or 'demo:train' (its train split, whose first 5000 images the demo model was trained on)")
    p.add_argument("--num-calib", type=int_range(MIN_CALIB_IMAGES, 1_000_000), default=None,
                   help=f"calibration images (default 256, at least {MIN_CALIB_IMAGES}); {NUM_EVAL} more, "
                        "when the data has them, are held out to check the INT8 accuracy (--num-eval)")
    min_eval = QuantizeOptions().min_eval
    p.add_argument("--num-eval", type=zero_or_int_range(min_eval, 1_000_000), default=None, metavar="N",
                   help=f"images held out after the calibration images to check the INT8 accuracy and drive the "
                        f"search (default {NUM_EVAL}, at least {min_eval}; 0: no check). The check's standard error falls as 1/sqrt(N): on "
                        "the demo model 256 images tell drops of about 2 points, a 0.5-point target needs about "
                        "2,400 (docs/quantization.md)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out image files of a --calib-data folder that cannot be read, naming each in a "
                        "warning (default: stop at the first)")
    p.add_argument("--calib-method", choices=["auto", "entropy", "max", "percentile"], default=None,
                   help="activation calibration (default auto: the method measured best per INT8 profile, "
                        "see docs/quantization.md)")
    p.add_argument("--int8-profiles", type=profile_list, default=None, metavar="PROFILES",
                   help="INT8 graph sets for a portable bundle, comma-separated: cpu (ONNX Runtime x86), "
                        "tensorrt (Q/DQ for TensorRT) (default cpu,tensorrt)")
    p.add_argument("--max-accuracy-drop", type=float_range(0.0, 100.0), default=None,
                   help="keep the most sensitive layers in float while the final-step accuracy drop on the held-out "
                        f"images exceeds this many points by more than {QuantizeOptions.drop_noise_z:g} standard "
                        "errors of its measurement (default 0.5; see docs/quantization.md)")
    p.add_argument("--finetune-epochs", type=int_range(0, 1000), default=None, metavar="N",
                   help="quantization-aware fine-tuning: adjust the INT8 graphs' weights for N epochs so that their "
                        "outputs match the FP32 graphs' on the calibration images (needs torch; default: the "
                        f"tensorrt profile fine-tunes {TENSORRT.finetune_epochs} epochs when there are at least "
                        f"{TENSORRT.finetune_min_images} calibration images, fewer overfit; 0: off; see "
                        "docs/quantization.md)")
    p.add_argument("--patch-guard", type=float_range(0.0, 1.0), default=None, metavar="SHARE",
                   help="keep in float the glance layers whose INT8 rounding moves the policy's first patch most, "
                        "up to this share of the backbone multiply-adds (default: the tensorrt profile keeps up to "
                        f"{TENSORRT.patch_guard_share:g}; the cpu profile has no patch guard; 0: off; see "
                        "docs/quantization.md)")
    p.add_argument("--include-checkpoint", action="store_true", help="copy the checkpoint into the bundle (torch backend)")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier bundle at -o (one holding nothing but a bundle's files)")
    p.add_argument("--model-name", help="variant name when the checkpoint does not store it and it cannot be "
                                        "inferred (e.g. resnet50; see `gfnet-edge info`)")
    p.add_argument("--patch-size", type=int_range(1, 1 << 16),
                   help="patch size P when the checkpoint does not store it; checked against one that does")
    add_trt_build_options(p)
    p.add_argument("--threads", type=THREADS,
                   help="CPU threads of the build: torch's for the ONNX export and the INT8 fine-tuning, and the "
                        "INT8 quantization's ONNX Runtime sessions (default: their own choice)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
