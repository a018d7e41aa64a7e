"""``python -m gfnet_edge.train.cli``: trains the demo GFNet and its static baseline.

Example::

    python -m gfnet_edge.train.cli --out runs/demo                 # every stage, then export
    python -m gfnet_edge.train.cli --out runs/demo --resume        # continue an interrupted run
    python -m gfnet_edge.train.cli --out runs/demo --stage 2       # one stage (earlier ones must be done)

The run folder holds ``config.json``, one ``<stage>.pt`` per stage (rewritten after every epoch),
``epochs.jsonl`` (one record per epoch), ``timings.json`` and, after ``export``, the checkpoints
``demo_gfnet.pth.tar`` / ``demo_static.pth.tar`` and ``demo_results.json`` (copied to
``--assets`` when given).

With ``--data ROOT`` the same command trains a GFNet on an image folder instead
(:mod:`gfnet_edge.train.folder_cli`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import multiprocessing

from ..argtypes import NON_NEGATIVE, POSITIVE, SEED, THREADS
from ..bundle import json_object, write_text_atomic
from ..errors import GFNetEdgeError, InputError, writing

#: ``--stage`` choices -> internal stages, in order.
STAGE_GROUPS = {
    "pretrain": ("pre_local", "pre_glance"),
    "1": ("stage1",),
    "2": ("bc", "ppo"),
    "3": ("stage3",),
    "static": ("static",),
    "export": (),
}


#: The options of image-folder training (``--data``), in ``--help`` order: flag, ``add_argument``
#: keywords.
FOLDER_ARGUMENTS: Tuple[Tuple[str, Dict[str, Any]], ...] = (
    ("--pretrained", dict(default=None, metavar="FILE|timm",
                          help="backbone weights: a local file (state dict, .safetensors, static baseline) or 'timm' "
                               "(downloads) (default: random weights, with a warning; for the GFNet of a run that "
                               "trained its static baseline first, that baseline; such a run takes --resume "
                               "--pretrained until a GFNet stage has a checkpoint)")),
    ("--image-size", dict(type=POSITIVE, default=None, metavar="S", help="S (default: the backbone family's)")),
    ("--patch-size", dict(type=POSITIVE, default=None, metavar="P", help="P (default: the backbone family's)")),
    ("--steps", dict(type=POSITIVE, default=None, metavar="T", help="T (default: the backbone family's)")),
    ("--epochs", dict(default=None, metavar="N|N1,N2,N3", help="epochs of stages 1, 2, 3 (default 30,10,10)")),
    ("--static-epochs", dict(type=NON_NEGATIVE, default=None, metavar="N",
                             help="also train the static baseline for N epochs (a finished run without one gets it "
                                  "with --resume --stage static --static-epochs N)")),
    ("--batch-size", dict(type=POSITIVE, default=None, metavar="N",
                          help="global batch (split over torchrun processes; default 64)")),
    ("--workers", dict(type=NON_NEGATIVE, default=None, metavar="N",
                       help="DataLoader worker processes per process (default 4, or the CPUs available when fewer)")),
    ("--worker-start", dict(default=None, choices=["fork", "spawn", "forkserver"],
                            help="how the DataLoader workers start (default: the platform's, here "
                                 f"{multiprocessing.get_all_start_methods()[0]}; no effect with --workers 0)")),
    ("--device", dict(default="auto", choices=["auto", "cpu", "cuda"], help="default: a GPU when torch sees one")),
    ("--no-amp", dict(action="store_true", help="float32 on the GPU (default: autocast, bf16 or fp16)")),
    ("--hflip", dict(action="store_true", help="random horizontal flips in training")),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, metavar="ROOT",
                   help="train on an image folder ROOT/train/CLASS/*.jpg, ROOT/val/CLASS/*.jpg (without it: the demo task)")
    p.add_argument("-o", "--out", default=None, metavar="RUN", help="run folder (checkpoints, logs; demo default runs/demo)")
    p.add_argument("--stage", default="all", choices=["all", *STAGE_GROUPS],
                   help="stage to run: all, 1, 2, 3, static, export, or pretrain (demo trainer only) "
                        "(default: all)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoints")
    p.add_argument("--threads", type=THREADS, default=2, metavar="N", help="torch CPU threads (default 2)")
    p.add_argument("--backbone", default=None, metavar="NAME",
                   help="with --data (required there): a timm model name (resnet50, mobilenetv3_large_100, ...); "
                        "demo: r16, r24, r32 (default r16)")
    g = p.add_argument_group("image-folder training (--data)")
    for flag, kwargs in FOLDER_ARGUMENTS:
        g.add_argument(flag, **kwargs)
    p.add_argument("--seed", type=SEED, default=None, help="master seed, 0 to 4294967295 (default 0)")
    p.add_argument("--tiny", action="store_true",
                   help="demo trainer only (refused with --data): a few iterations on a handful of images, a smoke "
                        "test; for a small run on an image folder give --epochs 1,1,1 and a small folder")
    p.add_argument("--assets", default=None,
                   help="demo trainer only: copy the exported checkpoints and results here (e.g. gfnet_edge/assets)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override a config field, e.g. --set stage1.epochs=2 --set dsn_ratio=0.5")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``gfnet-edge train`` (listed in :func:`gfnet_edge.cli.subcommands`)."""
    p = subparsers.add_parser(
        "train", help="train a GFNet on an image folder (--data), or the demo GFNet",
        description="Train a GFNet: on an image folder (--data ROOT -o RUN --backbone TIMM_NAME; works under torchrun),"
                    " or the demo GFNet on the cluttered-digits task (pretrain, stages 1-3, static baseline, export).",
        epilog="With --data, RUN gets RUN/gfnet.pth.tar at the end (the checkpoint for `gfnet-edge build-engine`), "
               "RUN/results.json (val accuracy per step, budgeted curve, multiply-adds), the log RUN/train.txt and "
               "RUN/epochs.jsonl, and after every epoch RUN/<stage>.pt, which --resume continues from. Every image "
               "of ROOT is decoded once before training; a stage epoch is one pass over ROOT/train (default "
               "30, 10, 10 epochs: try --epochs 1 on a few images per class first). See docs/training.md.",
    )
    add_arguments(p)
    p.set_defaults(func=lambda args: run(args))
    return p


def _defaults(arguments: Tuple[Tuple[str, Dict[str, Any]], ...]) -> Dict[str, Any]:
    """``args`` attribute -> default of each option of ``arguments``, as argparse names them."""
    p = argparse.ArgumentParser(add_help=False)
    return {a.dest: a.default for a in (p.add_argument(flag, **kwargs) for flag, kwargs in arguments)}


#: Options of image-folder training (``--data``), by ``args`` attribute, with their defaults; the
#: demo trainer has none of them.
FOLDER_OPTIONS = _defaults(FOLDER_ARGUMENTS)


def check_demo_args(args: argparse.Namespace) -> None:
    """The demo trainer's command line, before anything is generated or written.

    Raises:
        InputError: an option of image-folder training (the user meant ``--data ROOT``), or a
            backbone that is not one of the demo's.
    """
    from .config import BACKBONES

    given = [name for name, default in FOLDER_OPTIONS.items() if getattr(args, name, default) != default]
    if given:
        raise InputError(f"--{given[0].replace('_', '-')} applies to training on an image folder: pass --data ROOT "
                         "(without --data the demo GFNet is trained on the cluttered-digits task)")
    if args.backbone and args.backbone not in BACKBONES:
        raise InputError(f"--backbone {args.backbone}: without --data the demo GFNet is trained, whose backbones are "
                         f"{', '.join(sorted(BACKBONES))}; a timm backbone trains on an image folder (--data ROOT)")


def folder_run_data(out: Path) -> Optional[str]:
    """The image folder (``--data``) of the run in ``out``; ``None`` when ``out`` holds none
    (no ``RUN/config.json``, or a demo run's)."""
    try:
        d = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return d["data"] if isinstance(d, dict) and isinstance(d.get("data"), str) else None


def run(args: argparse.Namespace) -> int:
    """``gfnet-edge train``. Ctrl-C ends it with one line that says how to continue the run (exit
    130); a full disk is reported naming the run folder. Checkpoints are written atomically, so
    the run continues with ``--resume`` from its last saved epoch in either case."""
    try:
        with writing(args.out or "runs/demo", "the run's files"):
            return _run(args)
    except KeyboardInterrupt:
        from ..cli import _report

        _report(f"gfnet-edge: interrupted; to continue the run in {args.out or 'runs/demo'} from its last saved "
                "epoch, give the same command with --resume", alike=False)
        return 130


def _run(args: argparse.Namespace) -> int:
    data = getattr(args, "data", None)
    if data == "":  # e.g. --data "$ROOT" with ROOT unset: not the demo task
        raise InputError("--data is empty: give the image folder ROOT (ROOT/train/CLASS/*.jpg, ROOT/val/CLASS/*.jpg)")
    if not data:
        data = folder_run_data(Path(args.out or "runs/demo"))
        if data and not args.resume:
            raise InputError(f"{args.out or 'runs/demo'} holds a run trained on the image folder {data}: continue it "
                             "with --resume, or give the demo trainer another -o folder")
        args.data = data  # --resume of an image-folder run: its settings come from its config.json
    if args.data:
        from .folder_cli import run_folder

        return run_folder(args)
    check_demo_args(args)
    import torch

    from .config import TrainConfig, tiny_config
    from .data import load_split
    from .folder_cli import apply_overrides, changed_settings, check_settings
    from .recipe import LOADING_SETTINGS
    from .stages import STAGES, Run

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out or "runs/demo")
    cfg_path = out / "config.json"
    # One stage (--stage other than all) takes the earlier stages' checkpoints: like --resume, it
    # runs with the settings the run recorded.
    continues = args.resume or args.stage != "all"
    if continues and cfg_path.exists():
        try:
            d = json_object(cfg_path)
            if d is None:
                raise ValueError("not a JSON object")
            cfg = TrainConfig.from_dict(d)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{cfg_path}: not a run config of gfnet-edge train ({exc}); give --data ROOT for a run "
                             "on an image folder, or another -o folder") from exc
        given = TrainConfig.from_dict(json.loads(cfg.dumps()))  # the settings the command line names
        if args.tiny:  # --tiny names the tiny run's settings (how images are loaded kept as recorded)
            given = tiny_config()
            for key in LOADING_SETTINGS:
                setattr(given, key, getattr(cfg, key))
            given.backbone, given.seed = cfg.backbone, cfg.seed
        given.backbone = args.backbone or given.backbone
        given.seed = given.seed if args.seed is None else args.seed
        given = apply_overrides(given, args.set)
        for key in LOADING_SETTINGS:  # how images are loaded, not what is trained: may change
            setattr(cfg, key, getattr(given, key))
        changed = changed_settings(cfg, given)
        if changed:
            how = "--resume continues" if args.resume else f"--stage {args.stage} continues"
            raise InputError(f"{how} the run as {cfg_path} describes it, and the command line would "
                             f"change {', '.join(changed)}: leave those options out{' (--tiny sets them)' if args.tiny else ''} "
                             "(or start a new run in another -o folder)")
    else:
        saved = [name for name in STAGES if (out / f"{name}.pt").exists()]
        if not continues and saved:  # a new run here would train over the run's checkpoints
            raise InputError(f"{out} already holds a run ({out / (saved[0] + '.pt')}): pass --resume to continue it, "
                             "or choose another --out folder")
        cfg = tiny_config() if args.tiny else TrainConfig()
        if args.backbone:
            cfg.backbone = args.backbone
        if args.seed is not None:
            cfg.seed = args.seed
        cfg = apply_overrides(cfg, args.set)
    check_settings(cfg)
    cfg.threads = args.threads
    out.mkdir(parents=True, exist_ok=True)  # only once the settings are known to be valid
    write_text_atomic(cfg_path, cfg.dumps())
    progress = not args.no_progress
    log_file = open(out / "train.txt", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    try:  # the log is closed however the run ends (an error, Ctrl-C)
        t0 = time.time()
        dcfg = cfg.data()
        write_text_atomic(cfg_path, cfg.dumps())
        train = load_split("train", cfg.train_size, config=dcfg, progress=progress)
        val = load_split("val", cfg.val_size, config=dcfg, progress=progress)
        test = (load_split("test", cfg.test_size, config=dcfg, progress=progress)
                if args.stage in ("all", "export") else None)
        log(f"data config key {dcfg.key()}")
        log(f"data: train {len(train)}, val {len(val)} ({time.time() - t0:.0f} s)")
        from .folder_stages.sigint import SIGINT

        with SIGINT:  # Ctrl-C stops training wherever it comes, as with --data
            runner = Run(out, cfg, train, val, progress=progress, log=log)
            stages = STAGES if args.stage == "all" else STAGE_GROUPS[args.stage]
            # Load the weights of the last finished stage before the requested ones.
            first = STAGES.index(stages[0]) if stages else len(STAGES)
            # The static baseline may be trained by a separate process in parallel with stages 1-3
            # (it only needs pre_local), so the GFNet comes from the last finished GFNet stage and the
            # static model from static.pt.
            for name in reversed([n for n in STAGES[:first] if n != "static"]):
                if runner.load_finished(name, only="gfnet"):
                    log(f"loaded weights after stage {name}")
                    break
            else:
                if first > 0 and args.stage != "all":
                    log(f"warning: no earlier stage finished in {out}; stage {args.stage} starts from random weights")
            if "static" in STAGES[:first] and runner.load_finished("static", only="static"):
                log("loaded the static baseline after stage static")
            if args.stage == "export":  # minutes of every finished stage (they may come from several processes)
                for name in STAGES:
                    p = runner.stage_path(name)
                    if p.exists():
                        ck = torch.load(p, map_location="cpu", weights_only=True)
                        if ck.get("done"):
                            runner.timings[name] = ck.get("elapsed", 0.0)
            resume = continues
            for name in stages:
                t = time.time()
                getattr(runner, "static_stage" if name == "static" else name)(resume=resume)
                log(f"stage {name} finished in {(time.time() - t) / 60:.1f} min (this process)")
            timings = {k: round(v / 60, 2) for k, v in runner.timings.items()}
            write_text_atomic(out / "timings.json", json.dumps(timings, indent=1))
            log(f"training minutes per stage: {timings}")
            if args.stage in ("all", "export"):
                export(runner, cfg, test, out, Path(args.assets) if args.assets else None, log, progress)
            log(f"total {(time.time() - t0) / 60:.1f} min")
    finally:
        log_file.close()
    return 0


def export(runner, cfg, test, out: Path, assets: Optional[Path], log, progress: bool) -> None:
    """Measures the trained models and writes the shipped checkpoints (+ results JSON)."""
    import torch

    from ..models.checkpoint import load_checkpoint, save_checkpoint
    from ..models.macs import count_static_macs
    from .config import BACKBONES
    from .demo_results import measure, table
    from .static import load_static, save_static

    t = time.time()
    runner.release_glance_cache()  # training is over: the measurement needs the memory
    model = runner.model.eval()
    name, kw = BACKBONES[cfg.backbone]
    data_info = {"task": "cluttered_digits", "config_key": cfg.data().key(), "config": cfg.data_config, "train_size": cfg.train_size,
                 "val_size": cfg.val_size, "test_size": cfg.test_size}
    # Measure on the fp16-rounded weights the files hold: write, reload, measure, rewrite with metadata.
    gpath, spath = out / "demo_gfnet.pth.tar", out / "demo_static.pth.tar"
    save_checkpoint(gpath, model, metadata={}, half=True)
    save_static(spath, runner.static, name, kw, model.spec.num_classes, model.spec.image_size, half=True)
    gm = load_checkpoint(gpath)
    sm, smeta = load_static(spath)
    res = measure(gm, sm, smeta["macs"], runner.val, test, seed=cfg.seed, progress=progress, log=log)
    res["gfnet_checkpoint"], res["static_checkpoint"] = gpath.name, spath.name
    res["training_minutes"] = {k: round(v / 60, 2) for k, v in runner.timings.items()}
    meta = {
        "anytime_classification": res["anytime_accuracy"],
        "dynamic_threshold": res["dynamic_threshold"],
        "budgeted_batch_classification": res["budgeted_batch_classification"],
        "demo_data": data_info,
        "demo_results": {k: v for k, v in res.items() if k not in ("dynamic_threshold", "budgeted_batch_classification")},
        "train_config": json.loads(cfg.dumps()),
    }
    save_checkpoint(gpath, gm, metadata=meta, half=True)
    save_static(spath, sm, name, kw, model.spec.num_classes, model.spec.image_size, half=True,
                metadata={"test_accuracy": res["static_accuracy"], "demo_data": data_info,
                          "macs": int(count_static_macs(sm, model.spec.image_size))})
    write_text_atomic(out / "demo_results.json", json.dumps(res, indent=1) + "\n")
    log("results:\n" + table(res))
    log(f"export + evaluation {(time.time() - t) / 60:.1f} min")
    if assets:
        assets.mkdir(parents=True, exist_ok=True)
        with writing(assets, "the copies of the checkpoints"):
            for f in (gpath, spath, out / "demo_results.json"):
                shutil.copy2(f, assets / f.name)
        log(f"copied checkpoints and results to {assets}")
    del torch


def main(argv: Optional[List[str]] = None) -> int:
    from ..cli import _Parser  # one-line option errors, reported once under torchrun

    ap = _Parser(prog="python -m gfnet_edge.train.cli", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        return run(args)
    except GFNetEdgeError as exc:  # bad input (2) or a missing resource (3): one line
        from ..cli import _exit_code

        return _exit_code(exc, "train")


if __name__ == "__main__":
    sys.exit(main())
