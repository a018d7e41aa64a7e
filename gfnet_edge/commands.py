"""Subcommands beyond ``info``: build-engine, predict (registered into ``gfnet-edge``)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .argtypes import NON_NEGATIVE, POSITIVE, THREADS, float_range, int_range
from .bundle import json_text
from .errors import InputError


def cmd_build_engine(args: argparse.Namespace) -> int:
    from .build import BuildConfig, build_bundle, build_engines
    from .runtime.backends.tensorrt import BuildOptions

    trt = BuildOptions(precision=args.precision, workspace_mb=args.workspace, opt_level=args.opt_level,
                       timing_cache=args.timing_cache, dla_core=args.dla_core, gpu_fallback=not args.no_gpu_fallback,
                       max_batch=args.max_batch, opt_batch=args.opt_batch).validate()
    cfg = BuildConfig(precision=args.precision, backend=args.backend, calib_data=args.calib_data,
                      num_calib=args.num_calib, calib_method=args.calib_method,
                      int8_profiles=tuple(p for p in args.int8_profiles.split(",") if p),
                      max_accuracy_drop=args.max_accuracy_drop, include_checkpoint=args.include_checkpoint,
                      force=args.force, trt=trt, threads=args.threads, model_name=args.model_name,
                      patch_size=args.patch_size)
    src = Path(args.source)
    if src.is_dir():
        if args.backend not in ("tensorrt", "auto"):
            raise InputError(f"{src} is a bundle: only `--backend tensorrt` adds engines to an existing bundle")
        cfg.backend = "tensorrt"
        bundle = build_engines(src, cfg)
    else:
        if not args.output:
            raise InputError("building from a checkpoint needs -o BUNDLE")
        bundle = build_bundle(src, Path(args.output), cfg, progress=not args.quiet)
    m = bundle.manifest
    print(f"bundle: {bundle.root}")
    print(f"  model: {m['model']['model_name']} S={m['model']['image_size']} P={m['model']['patch_size']} T={m['model']['steps']}")
    print(f"  graphs: {', '.join(m['graphs'])}")
    print(f"  engines: {', '.join(e['precision'] + '@' + e['gpu_name'] for e in m['engines']) or 'none (ONNX Runtime runs the graphs)'}")
    print(f"  budgets: {', '.join(m['budgets']) or 'none'} (default: {m.get('default_budget')})")
    return 0


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-engine", help="checkpoint -> ONNX -> INT8 -> engines, in one bundle",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Build a deployment bundle from a GFNet checkpoint, or add TensorRT engines to a bundle.\n\n"
            "  workstation:  gfnet-edge build-engine CKPT.pth.tar -o BUNDLE --precision int8 --calib-data DIR\n"
            "  device:       gfnet-edge build-engine BUNDLE --backend tensorrt\n\n"
            "The bundle holds the FP32 and quantized ONNX graphs, the head weights, budgets and (with TensorRT)\n"
            "engines for this GPU. A failed build leaves no half-written bundle."
        ),
    )
    p.add_argument("source", help="GFNet checkpoint (.pth.tar), or an existing bundle directory to add engines to")
    p.add_argument("-o", "--output", help="bundle directory to create")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="int8", help="graph/engine precision (default int8)")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime"], default="auto",
                   help="auto: TensorRT when it and a GPU are here, else a portable ONNX Runtime bundle")
    p.add_argument("--calib-data", help="INT8 calibration images: folder, .npz, or 'demo' (default for the demo model)")
    p.add_argument("--num-calib", type=POSITIVE, default=256, help="calibration images (default 256)")
    p.add_argument("--calib-method", choices=["auto", "entropy", "max", "percentile"], default="auto",
                   help="activation calibration (default auto: the method measured best per INT8 profile, "
                        "see docs/quantization.md)")
    p.add_argument("--int8-profiles", default="cpu,tensorrt",
                   help="INT8 graph sets for a portable bundle: cpu (ONNX Runtime x86), tensorrt (Q/DQ for TensorRT)")
    p.add_argument("--max-accuracy-drop", type=float_range(0.0, 100.0), default=0.5,
                   help="keep the most sensitive layers in float until the final-step accuracy drop is within this many points")
    p.add_argument("--include-checkpoint", action="store_true", help="copy the checkpoint into the bundle (torch backend)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--model-name", help="variant name when the checkpoint does not store it and it cannot be "
                                        "inferred (e.g. resnet50; see `gfnet-edge info`)")
    p.add_argument("--patch-size", type=int_range(1, 1 << 16), help="patch size P when the checkpoint does not store it")
    g = p.add_argument_group("TensorRT")
    g.add_argument("--workspace", type=int, default=1024, help="workspace limit in MiB (default 1024)")
    g.add_argument("--opt-level", type=int, help="builder optimisation level 0-5 (TensorRT default 3)")
    g.add_argument("--timing-cache", help="timing cache file (read and updated)")
    g.add_argument("--dla-core", type=int, help="build for this DLA core (Jetson), with GPU fallback")
    g.add_argument("--no-gpu-fallback", action="store_true", help="with --dla-core: fail on layers DLA cannot run")
    g.add_argument("--max-batch", type=int, default=32, help="largest batch of the optimisation profile (default 32)")
    g.add_argument("--opt-batch", type=int, default=1, help="batch the profile is tuned for (default 1)")
    p.add_argument("--threads", type=THREADS, help="CPU threads for export/quantization")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build_engine)


class _Stop(Exception):
    """``--on-error stop``: the first unreadable input ends the run."""


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from .data.images import iter_image_batches
    from .runtime import Runtime

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    failures = []

    def failed(name: str, message: str) -> None:
        failures.append(message)
        if args.on_error == "stop":
            raise _Stop()

    rows, names = [], []
    try:
        with Runtime(args.bundle, backend=args.backend, precision=args.precision, budget=args.budget,
                     threads=args.threads, dla_core=args.dla_core, head_dtype=args.head_dtype,
                     profile=args.profile) as rt:
            m = rt.model
            mean, std = np.asarray(m["mean"], np.float32), np.asarray(m["std"], np.float32)

            def images():  # read batch by batch; the frames are already resized and centre-cropped
                for batch_names, frames in iter_image_batches(args.images, int(m["image_size"]), float(m["crop_pct"]),
                                                              m["dataset_interpolation"], args.batch_size,
                                                              on_error=failed):
                    names.extend(batch_names)
                    yield ((frames.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)

            try:
                for preds in rt.predict_iter(images(), batch_size=args.batch_size, deadline_ms=args.deadline_ms,
                                             deadline_margin=args.deadline_margin):
                    start = len(rows)
                    rows.extend({"image": names[start + i], **preds[i]} for i in range(len(preds)))
            except _Stop:
                pass
            except ValueError as exc:
                raise InputError(str(exc)) from exc
            profile = rt.profiler.summary()
    finally:  # every result there is, also when a later batch failed
        if args.json:
            print(json_text(rows, indent=2))
        else:
            for r in rows:
                stopped = " (deadline)" if r.get("deadline_stopped") else ""
                print(f"{r['image']}: class {r['class']} ({r['confidence']:.3f}) exit at step {r['exit_step']}{stopped}")
        sys.stdout.flush()
    if args.profile:
        print(_profile_table(profile, len(rows)), file=sys.stderr)
    if len(failures) == 1 and not rows:
        raise InputError(failures[0])
    if failures:
        for message in failures:
            print(f"gfnet-edge: error: {message}", file=sys.stderr)
        stopped = " (stopped at the first: --on-error stop)" if args.on_error == "stop" else ""
        raise InputError(f"{len(failures)} input(s) could not be read{stopped}; {len(rows)} image(s) classified")
    return 0


def _profile_table(summary: dict, images: int) -> str:
    """The runtime's per-stage profile as a text table (ms)."""
    head = f"{'stage':<12}{'calls':>7}{'ms/image':>10}{'mean':>9}{'p50':>9}{'p95':>9}{'p99':>9}"
    lines = [f"per-stage profile over {images} images (ms; on the host loop `step` contains heads, exit, "
             "policy and crop)", head]
    for name, st in summary.items():
        per_image = st["total_ms"] / max(images, 1) if name != "per_image" else st["mean_ms"]
        lines.append(f"{name:<12}{st['count']:>7}{per_image:>10.3f}{st['mean_ms']:>9.3f}{st['p50_ms']:>9.3f}"
                     f"{st['p95_ms']:>9.3f}{st['p99_ms']:>9.3f}")
    return "\n".join(lines)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    from .runtime.api import DEFAULT_MARGIN
    from .runtime.heads import HEAD_DTYPES

    p = sub.add_parser("predict", help="classify images with a bundle (early exit)",
                       description="Classify image files (or folders, or .npz) with a bundle, with early exit. "
                                   "Each image is named by its file (FILE.npz[i] inside an archive).")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("images", nargs="+", help="image files, folders or .npz")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "torch"], default="auto")
    p.add_argument("--precision", default="auto", help="graph set: auto, fp32, int8-cpu, int8-tensorrt")
    p.add_argument("--budget", help="named budget (default: the bundle's default)")
    p.add_argument("--threads", type=THREADS, help="CPU threads")
    p.add_argument("--dla-core", type=NON_NEGATIVE, help="TensorRT: run the engines built for this DLA core (Jetson) "
                                                "instead of the GPU engines")
    p.add_argument("--head-dtype", choices=HEAD_DTYPES, default="float32",
                   help="weights of the GRU / Linear heads: float16 halves the bytes their memory-bound steps read "
                        "(about 1e-3 relative error; default float32, equal to the reference)")
    p.add_argument("--batch-size", type=int_range(1, 1 << 16), default=32,
                   help="images per runtime call (default 32); images are read batch by batch")
    p.add_argument("--profile", action="store_true",
                   help="print the runtime's per-stage timing (mean, p50, p95, p99) to stderr at the end")
    p.add_argument("--deadline-ms", type=float_range(0.0, 1e9, lo_open=True), metavar="MS",
                   help="per runtime call (one --batch-size batch): images still running stop before a step "
                        "predicted to end later than MS after the call began, keeping their last answer (needs "
                        "the step latencies `gfnet-edge calibrate` records for this backend and precision)")
    p.add_argument("--deadline-margin", type=float_range(0.0, 100.0), default=DEFAULT_MARGIN, metavar="F",
                   help=f"scale the predicted step costs by 1 + F (default {DEFAULT_MARGIN})")
    p.add_argument("--on-error", choices=["skip", "stop"], default="skip",
                   help="an unreadable image or input: report it and go on (skip, default) or stop there; "
                        "either way the results so far are printed and the exit code is 2")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=cmd_predict)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train.cli import add_parser

    add_parser(sub)


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    from .calibrate.cli import add_parser

    add_parser(sub)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .demo import add_parser

    add_parser(sub)


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    from .doctor import add_parser

    add_parser(sub)


PARSERS = [_add_build, _add_predict, _add_calibrate, _add_demo, _add_train, _add_doctor]
