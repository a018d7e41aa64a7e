"""``gfnet-edge calibrate``: register with ``add_parser(subparsers)``."""
from __future__ import annotations

import argparse
import os
import sys

from gfnet_edge.argtypes import NON_NEGATIVE, POSITIVE, float_range, int_range
from gfnet_edge.data.images import shown_name
from gfnet_edge.errors import InputError


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .pipeline import CalibrationConfig, run_calibration
    from .report import summary

    try:
        tol = tuple(float(x) for x in args.tolerance.split(","))
    except ValueError:
        tol = ()
    if len(tol) != 2:
        raise InputError(f"--tolerance must be BELOW,ABOVE fractions, e.g. 0.10,0.05; got {args.tolerance!r}")
    cfg = CalibrationConfig(
        bundle=args.bundle, data=args.data, output=args.output, budgets_ms=list(args.budget_ms or []),
        budgets=list(args.budget or []), deadlines=args.deadlines,
        backend=args.backend, precision=args.precision, threads=args.threads, dla_core=args.dla_core,
        head_dtype=args.head_dtype, device=args.device, batch=args.batch,
        batch_size=args.batch_size, num_images=args.num_images, holdout=args.holdout,
        skip_unreadable=args.skip_unreadable, method=args.method,
        margin=args.margin, tolerance=tol, attempts=args.attempts, repeats=args.repeats, warmup=args.warmup,
        latency_calls=args.latency_calls, latency_seconds=args.latency_seconds,
        warmup_ms=args.warmup_ms,
        static=list(args.static or []), static_int8=args.static_int8, compare_precisions=not args.no_compare,
        write_manifest=not args.no_write, default=args.default, force=args.force, gallery=args.gallery,
        seed=args.seed, clock=args.clock, progress=not args.quiet, argv=["gfnet-edge"] + sys.argv[1:],
    )
    res = run_calibration(cfg)
    print(shown_name(summary(res)))
    print(f"report: {shown_name(os.path.join(args.output, 'report.html'))}")
    bad = [b["name"] for b in res["budgets"] if not b["within_tolerance"]]
    if bad and args.strict:
        print(f"gfnet-edge: error: measured latency (the budget's mean or percentile) outside the tolerance for "
              f"{', '.join(bad)}", file=sys.stderr)
        return 4
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Adds the ``calibrate`` subcommand."""
    from gfnet_edge.cli.options import add_runtime_options

    from .budgets import parse_budget_arg
    from .data import ADVISED_SPLIT_IMAGES, MIN_IMAGES
    from .fit import MAX_MARGIN, METHODS
    from .latency import EXTEND_SECONDS, WARMUP_MS

    p = sub.add_parser(
        "calibrate", help="measure step latency, fit exit thresholds for ms budgets, verify, report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Measure each GFNet step's latency on this device with the real runtime, fit exit thresholds for\n"
            "budgets in milliseconds, verify them by running the runtime on held-out images, write them into\n"
            "the bundle's manifest as named budgets (ms-3.0, p95-1.2 ...) and write a report (report.json + report.html).\n\n"
            "  gfnet-edge calibrate BUNDLE --data demo --budget-ms 3 4 5 -o report/\n"
            "  gfnet-edge calibrate BUNDLE --data demo --budget p95:1.2 p99:1.5 -o report/\n"
            "  gfnet-edge calibrate BUNDLE --data val/ --static static.pth.tar --default 4 -o report/\n\n"
            "--budget-ms bounds the mean milliseconds per image at --batch (default 1); --budget p95:MS (p90, p99)\n"
            "bounds that percentile of per-image latency on the held-out images. A budget the glance alone cannot\n"
            "meet, unreadable data (see --skip-unreadable) or an existing report directory stop with an error before\n"
            "anything is written."
        ),
    )
    p.add_argument("bundle", help="bundle directory (gfnet-edge build-engine)")
    p.add_argument("--data", required=True, help="labelled images: 'demo', a folder with one subfolder per class, or an .npz")
    p.add_argument("-o", "--output", required=True, help="report directory to create (written atomically)")
    p.add_argument("--budget-ms", type=float_range(0.0, 1e6, lo_open=True), nargs="+", metavar="MS",
                   help="mean latency budgets in ms per image (default, without --budget: three between the glance's "
                        "and the full model's)")
    p.add_argument("--budget", type=parse_budget_arg, nargs="+", metavar="KIND:MS",
                   help="budgets of any kind: p95:1.2 (at most 5%% of images slower than 1.2 ms), p90:, p99:, mean:")
    add_runtime_options(p, verb="calibrate", budget=False)
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="where the torch backend runs (default cpu); the static baseline runs with the bundle's "
                        "backend, place and precision")
    p.add_argument("--batch", type=int_range(1, 1 << 16), default=1, help="images per call the budgets are for (default 1)")
    p.add_argument("--batch-size", type=int_range(0, 1 << 16), default=8, help="a second batch size to measure step latency at (default 8; 0: none)")
    p.add_argument("--num-images", type=int_range(MIN_IMAGES, 1 << 31),
                   help=f"use at most this many images (demo: how many; default 1000; at least {MIN_IMAGES}; a "
                        f"warning says when the fitting or held-out part has fewer than {ADVISED_SPLIT_IMAGES})")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out image files of a --data folder that cannot be read, naming each in a warning "
                        "(default: stop at the first)")
    p.add_argument("--holdout", type=float_range(0.0, 1.0, lo_open=True, hi_open=True), default=0.5, help="held-out fraction (default 0.5)")
    p.add_argument("--method", choices=list(METHODS), default="search",
                   help="threshold fitting: search (max accuracy under the budget; the default) or the reference p "
                        "sweep")
    p.add_argument("--margin", type=float_range(0.0, MAX_MARGIN, hi_open=True), default=0.03,
                   help=f"safety margin of the fit, fraction of the budget in [0, {MAX_MARGIN:g}) (default 0.03)")
    p.add_argument("--tolerance", default="0.10,0.05",
                   help="BELOW,ABOVE: the measured mean (or the percentile of a tail budget) must lie in "
                        "[budget*(1-BELOW), budget*(1+ABOVE)]; each in [0, 1) (default 0.10,0.05)")
    p.add_argument("--attempts", type=POSITIVE, default=3, help="fit/verify rounds per budget (default 3)")
    p.add_argument("--repeats", type=POSITIVE, default=60, help="timed calls per step (default 60)")
    p.add_argument("--latency-calls", type=NON_NEGATIVE, default=300, metavar="N",
                   help="the first step-latency measurement at each batch size goes on to N timed calls per step "
                        "while they fit --latency-seconds: deadlines plan with its p99, which from 60 calls "
                        "is about the slowest one (default 300; 0: --repeats only)")
    p.add_argument("--latency-seconds", type=float_range(0.0, None, lo_open=True), default=EXTEND_SECONDS,
                   metavar="S",
                   help="time box of those timed calls, in wall-clock seconds (default "
                        f"{EXTEND_SECONDS:g}): within it a step whose p99 takes in one or two stalls of the device "
                        "(calls over 1.5x its median) is first timed alone, each call right after an untimed "
                        "one of the step before it as when interleaved, until they lie beyond it (101 calls for "
                        "one stall), then every step up to --latency-calls; raise it for slow models or "
                        "devices, where --repeats calls per step already take longer")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=5, help="warm-up calls per step (default 5)")
    p.add_argument("--warmup-ms", type=float_range(0.0, 60000.0), default=WARMUP_MS, metavar="MS",
                   help="and warm-up calls until MS milliseconds have passed, before every latency measurement "
                        f"(default {WARMUP_MS:g}: devices settle in time, not in calls)")
    p.add_argument("--static", action="append", metavar="PATH",
                   help="static baseline: checkpoint (.pth.tar) or ONNX graph; repeatable")
    p.add_argument("--static-int8", action="store_true",
                   help="also quantize the static baseline to INT8 (CPU; done anyway when the runtime runs INT8 "
                        "graphs, so INT8 GFNet is compared with an INT8 static network)")
    p.add_argument("--no-compare", action="store_true", help="do not compare the bundle's other precisions")
    p.add_argument("--no-write", action="store_true", help="report only; leave the bundle's manifest unchanged")
    p.add_argument("--default", metavar="BUDGET",
                   help="make this budget (name, ms or KIND:MS) the bundle's default; auto: the budget the report "
                        "suggests (the fastest within a point of the full network's held-out accuracy, else the "
                        "cheapest within a point of the best budget's)")
    p.add_argument("--gallery", type=int_range(0, 1000), default=12, help="gallery images (default 12)")
    p.add_argument("--deadlines", type=int_range(0, 100), default=6,
                   help="deadlines of the report's deadline sweep, from the glance's p50 to past the full model's "
                        "p99, plus up to as many again to past a slower --static baseline's p99 (default 6; 0: none)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="fit/held-out split seed (default 0)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: wall-clock latency (default); cpu: CPU time of the calling thread, with --threads 1 "
                        "(the latency of an otherwise idle device, for machines shared with other jobs)")
    p.add_argument("--strict", action="store_true", help="exit 4 when a measured latency is outside the tolerance")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier report at -o (one holding nothing but report.json and report.html)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_calibrate)
