"""``gfnet-edge demo``: the shipped demo model end to end, on whatever this machine has.

1. ``build-engine``: the demo checkpoint -> INT8 bundle (TensorRT when it and a GPU are here,
   ONNX Runtime otherwise);
2. ``calibrate``: measures the steps' latency here, fits exit thresholds for a default budget
   and makes it the bundle's default;
3. classifies held-out demo test images with the runtime and prints a summary table;
4. the report (report.html / report.json) is written next to the bundle.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .argtypes import THREADS, float_range, int_range
from .calibrate.config import AUTO_DEFAULT
from .calibrate.report import DEFAULT_BUDGET_SLACK, suggest_budget
from .bundle import finite_or_null, json_object, write_json_atomic
from .errors import BUILD_MODULES, InputError, UnavailableError, installed, writing

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_CHECKPOINT = ASSETS / "demo_gfnet.pth.tar"
DEMO_STATIC = ASSETS / "demo_static.pth.tar"

#: ``D/summary.json``: the demo's results, marked with this format (the demo replaces only a
#: summary.json it wrote itself: one with this format, or every field of its summary and no format).
SUMMARY = "summary.json"
SUMMARY_FORMAT = "gfnet-edge-demo"
SUMMARY_FIELDS = ("bundle", "report", "backend", "precision", "budget", "test_images", "accuracy",
                  "mean_latency_ms", "exit_histogram", "profile", "minutes")
#: How the demo words its refusals to replace an output that is not its own (it has no --force).
_REFUSAL = dict(replacer="the demo", advice="choose another -o folder")


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(out: Path, precision: str = "int8", backend: str = "auto", budget_ms: Optional[float] = None,
             num_test: int = 500, threads: Optional[int] = None, quick: bool = False) -> Dict[str, Any]:
    """Runs the demo pipeline into ``out`` (replacing an earlier demo there: ``out/bundle``,
    ``out/report`` and ``out/summary.json`` only when the demo wrote them, else nothing is done).

    Returns:
        The summary (also written to ``out/summary.json``, atomically).

    Raises:
        InputError: ``out`` holds a bundle, report or summary.json that is not an earlier demo's.
    """
    from .build import BuildConfig, build_bundle, resolve_backend
    from .calibrate.pipeline import CalibrationConfig, run_calibration
    from .calibrate.report import summary as calib_summary
    from .data import ClutteredDigits, demo_config
    from .runtime import Runtime

    out = Path(out)
    if not DEMO_CHECKPOINT.is_file():
        raise InputError(f"{DEMO_CHECKPOINT}: the demo checkpoint is missing from this installation")
    # before the build: only an earlier demo's outputs are replaced
    _check_earlier_demo(out / "bundle")
    from .bundle import check_replace
    from .calibrate.pipeline import REPORT_OUTPUT

    check_replace(out / "report", True, **REPORT_OUTPUT, **_REFUSAL)
    _check_earlier_summary(out / SUMMARY)
    t0 = time.perf_counter()
    _say(f"1/4 build-engine {DEMO_CHECKPOINT.name} -> {out / 'bundle'} ({precision}, backend {backend})")
    # Only the INT8 graph set the chosen backend runs (build-engine's default writes both).
    profiles = ("tensorrt",) if resolve_backend(backend) == "tensorrt" else ("cpu",)
    cfg = BuildConfig(precision=precision, backend=backend, calib_data="demo", force=True, threads=threads,
                      num_calib=64 if quick else 256, num_eval=64 if quick else 256, int8_profiles=profiles)
    bundle = build_bundle(DEMO_CHECKPOINT, out / "bundle", cfg)
    _say(f"   graphs: {', '.join(bundle.manifest['graphs'])}; engines: {len(bundle.manifest['engines'])}")

    _say("2/4 calibrate: step latency on this machine, thresholds for the budget, report")
    ccfg = CalibrationConfig(
        bundle=str(bundle.root), data="demo", output=str(out / "report"),
        budgets_ms=[budget_ms] if budget_ms else [], backend=backend, threads=threads,
        num_images=200 if quick else 600, repeats=15 if quick else 40, static=[str(DEMO_STATIC)],
        default=str(budget_ms) if budget_ms else AUTO_DEFAULT, force=True, gallery=8 if quick else 12,
    )
    report = run_calibration(ccfg)
    print(calib_summary(report))
    if not budget_ms:
        rule = suggest_budget(report["budgets"], report["full_network_accuracy"]).rule
        _say(f"   default budget: {report['manifest']['default_budget']} ({rule})")

    _say(f"3/4 classify {num_test} demo test images with the default budget")
    rt = Runtime(bundle.root, backend=backend, threads=threads, profile=True)
    ds = ClutteredDigits("test", config=demo_config(bundle.manifest))
    frames, labels = ds.arrays(num_test, progress=True)
    preds = []
    t1 = time.perf_counter()
    for i in range(len(frames)):
        preds.append(rt.predict(frames[i]))
    wall = time.perf_counter() - t1
    classes = np.array([p.classes[0] for p in preds])
    steps = np.array([p.exit_step[0] for p in preds])
    T = rt.model.steps
    res = {
        "format": SUMMARY_FORMAT, "bundle": str(bundle.root), "report": str(out / "report" / "report.html"),
        "backend": rt.backend, "precision": rt.precision, "budget": rt.budget,
        "test_images": int(len(frames)), "accuracy": float(100.0 * (classes == labels).mean()),
        "mean_latency_ms": float(1e3 * wall / len(frames)),
        "exit_histogram": [int((steps == k).sum()) for k in range(T)],
        "profile": rt.profiler.summary(), "minutes": (time.perf_counter() - t0) / 60,
    }
    rt.close()
    _say("4/4 summary")
    rows = [("bundle", res["bundle"]), ("runtime", f"{res['backend']} / {res['precision']} / budget {res['budget']}"),
            ("test accuracy", f"{res['accuracy']:.2f}% on {res['test_images']} images"),
            ("mean latency", f"{res['mean_latency_ms']:.2f} ms per image (batch 1, incl. pre-processing)"),
            ("exit steps", ", ".join(f"step {k}: {n}" for k, n in enumerate(res["exit_histogram"]))),
            ("report", res["report"]), ("total time", f"{res['minutes']:.1f} min")]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    with writing(out, "the demo's summary"):
        write_json_atomic(out / SUMMARY, finite_or_null(res))
    return res


def _check_earlier_demo(path: Path) -> None:
    """The demo replaces ``path`` only when it is an earlier demo's bundle (built from the demo
    checkpoint) holding nothing a bundle does not; any other file or folder there is the user's
    and is left alone."""
    from .bundle import Bundle, BundleError, check_replace

    if not (path.exists() or path.is_symlink()):
        return
    try:
        source = Bundle.load(path, verify=False).manifest.get("source_checkpoint") or {}
    except BundleError:
        source = {}
    if path.is_symlink() or source.get("name") != DEMO_CHECKPOINT.name:
        raise InputError(f"{path}: exists and is not an earlier demo's bundle; the demo will not replace it "
                         "(choose another -o folder)")
    check_replace(path, True, **_REFUSAL)


def _check_earlier_summary(path: Path) -> None:
    """The demo replaces ``path`` only when it is a summary.json an earlier demo wrote (a JSON
    object of format :data:`SUMMARY_FORMAT`, or, from before the format field, with every field
    of :data:`SUMMARY_FIELDS`); any other file or folder there is the user's and is left alone."""
    if not (path.exists() or path.is_symlink()):
        return
    data = None if path.is_symlink() else json_object(path)
    earlier = data is not None and (data.get("format") == SUMMARY_FORMAT
                                    or ("format" not in data and set(SUMMARY_FIELDS) <= set(data)))
    if not earlier:
        raise InputError(f"{path}: exists and is not an earlier demo's summary; the demo will not replace it "
                         "(choose another -o folder)")


#: What the demo imports beyond the device side: it builds the bundle from the checkpoint (torch, onnx ...),
#: generates the demo images (scipy, scikit-learn) and draws the report's figures (matplotlib).
DEMO_MODULES = BUILD_MODULES + ("matplotlib",)


def missing_demo_modules() -> List[str]:
    """The modules of :data:`DEMO_MODULES` that are not installed here."""
    return [name for name in DEMO_MODULES if not installed(name)]


def cmd_demo(args: argparse.Namespace) -> int:
    missing = missing_demo_modules()
    if missing:
        raise UnavailableError(
            "`gfnet-edge demo` builds the demo bundle from its checkpoint, so it needs the build side and the report "
            f"figures; missing here: {', '.join(missing)}. Install them with "
            'pip install "gfnet-edge[build,report]" (from a source checkout: pip install ".[build,report]"); on a '
            "device-side install, run `gfnet-edge predict` / `calibrate` on a bundle built elsewhere")
    run_demo(Path(args.output), precision=args.precision, backend=args.backend, budget_ms=args.budget_ms,
             num_test=args.num_test, threads=args.threads, quick=args.quick)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the shipped demo model end to end: build, calibrate, classify, report",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-o", "--output", default="gfnet-edge-demo", help="output folder (default ./gfnet-edge-demo)")
    p.add_argument("--precision", choices=["int8", "fp32"], default="int8",
                   help="precision of the bundle built, calibrated and run (default int8)")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime"], default="auto",
                   help="auto (default): TensorRT when it and a GPU are here, else ONNX Runtime")
    p.add_argument("--budget-ms", type=float_range(0.0, 1e6, lo_open=True),
                   help="latency budget per image in ms (default: three budgets are fitted on this machine and "
                        f"the fastest within {DEFAULT_BUDGET_SLACK:g} point of the full network's held-out accuracy "
                        "is used, else the cheapest within a point of the best budget's)")
    p.add_argument("--num-test", type=int_range(1, 2000), default=500, help="demo test images to classify (default 500)")
    p.add_argument("--threads", type=THREADS,
                   help="CPU threads of the build, calibration and runtime (default: ONNX Runtime's own choice, "
                        "and one extension thread per CPU core)")
    p.add_argument("--quick", action="store_true", help="smaller calibration sets (a faster, rougher run)")
    p.set_defaults(func=cmd_demo)
