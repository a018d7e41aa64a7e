"""``gfnet-edge train --data ROOT -o RUN --backbone TIMM_NAME``: a GFNet on your own image folder.

Runs stages 1-3 (and, with ``--static-epochs``, the static baseline), then writes
``RUN/gfnet.pth.tar``: a gfnet-edge checkpoint (released format plus ``gfnet_edge_config``) with
its anytime accuracy, 39 x T exit thresholds and budgeted curve measured on the val split, which
``gfnet-edge build-engine`` takes as it is. The same command under ``torchrun`` trains on every
process it starts (see ``docs/training.md``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..bundle import json_object, write_text_atomic
from ..errors import InputError

STAGE_ORDER = ("stage1", "stage2", "stage3", "static")
#: ``--stage`` choices of the folder trainer -> stages.
STAGE_CHOICES = {"all": STAGE_ORDER, "1": ("stage1",), "2": ("stage2",), "3": ("stage3",), "static": ("static",),
                 "export": ()}


def parse_epochs(text: str) -> List[int]:
    """``"N"`` (every stage) or ``"N1,N2,N3"`` -> epochs of stages 1, 2, 3."""
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--epochs takes N or N1,N2,N3 (integers), got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or min(vals) < 0:
        raise InputError(f"--epochs takes N or N1,N2,N3 (>= 0), got {text!r}")
    return vals


def apply_overrides(cfg, items: List[str]):
    """Applies ``--set KEY=JSON`` items to a config (:meth:`TrainSettings.set`); returns it.

    Raises:
        InputError: an item without ``=``, a value that is not JSON, an unknown field.
    """
    for item in items:
        key, eq, val = item.partition("=")
        if not eq:
            raise InputError(f"--set needs KEY=JSON, got {item!r}")
        try:
            cfg.set(key, json.loads(val))
        except json.JSONDecodeError:
            raise InputError(f"--set {key}: {val!r} is not JSON (strings need quotes)") from None
        except ValueError as exc:
            raise InputError(f"--set: {exc}") from None
    return cfg


def apply_args(cfg, args: argparse.Namespace):
    """``cfg`` with every option the command line gives set on it (paths resolved)."""
    cfg.data = str(Path(args.data).resolve())
    if args.backbone:
        cfg.backbone = args.backbone
    if args.pretrained is not None:
        cfg.pretrained = args.pretrained if args.pretrained == "timm" else str(Path(args.pretrained).resolve())
    for flag, key in (("image_size", "image_size"), ("patch_size", "patch_size"), ("steps", "steps"),
                      ("batch_size", "batch_size"), ("workers", "workers"), ("worker_start", "worker_start"),
                      ("seed", "seed")):
        v = getattr(args, flag, None)
        if v is not None:
            setattr(cfg, key, v)
    if args.epochs is not None:  # an empty value is refused, not taken for the default
        cfg.stage1.epochs, cfg.stage2.epochs, cfg.stage3.epochs = parse_epochs(args.epochs)
    if args.static_epochs is not None:
        cfg.static.epochs = args.static_epochs
    if args.no_amp:
        cfg.amp = False
    if args.hflip:
        cfg.hflip = True
    for key, what in (("gfnet_init", "the GFNet's encoders"), ("static_init", "the static baseline")):
        if any(item.partition("=")[0] == key for item in args.set):
            raise InputError(f"--set {key}: the trainer records where {what} started; choose their weights with "
                             "--pretrained FILE|timm")
    apply_overrides(cfg, args.set)
    return cfg


def _changed_on_resume(cfg, args: argparse.Namespace) -> List[str]:
    """The run settings (``config.json`` keys) the command line would change on ``--resume``."""
    from .recipe import FolderTrainConfig

    return changed_settings(cfg, apply_args(FolderTrainConfig.from_dict(json.loads(cfg.dumps())), args))


def changed_settings(before, after) -> List[str]:
    """The settings (``config.json`` keys, dotted for a stage's: ``stage1.epochs``) whose values
    differ between two run configs of one kind, sorted."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(json.loads(before.dumps())), flat(json.loads(after.dumps()))
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def config_from_args(args: argparse.Namespace):
    """A fresh :class:`FolderTrainConfig` from the command line (not yet resolved)."""
    from .recipe import FolderTrainConfig

    if not args.backbone:
        raise InputError("--data needs --backbone TIMM_NAME (e.g. resnet50, mobilenetv3_large_100)")
    return check_pretrained(apply_args(FolderTrainConfig(data="", backbone=args.backbone), args))


def check_pretrained(cfg):
    """``cfg`` with its ``--pretrained`` file checked and its path resolved (a run folder, a
    folder or a missing file is refused in one line); returns it."""
    if cfg.pretrained not in (None, "timm"):
        weights = Path(cfg.pretrained)
        if weights.is_dir() and (weights / "config.json").is_file() and (weights / "data_index.json").is_file():
            from .static import static_baseline_hint

            raise InputError(f"{cfg.pretrained}: a gfnet-edge train run folder, not a weights file: "
                             + static_baseline_hint(weights))
        if weights.is_dir():  # e.g. a model folder of the hub
            inside = sorted(f.name for f in weights.iterdir()
                            if f.suffix in (".safetensors", ".pth", ".pt", ".bin", ".tar"))
            raise InputError(f"{cfg.pretrained}: a folder, not a weights file: pass the file"
                             + (f" (in it: {', '.join(inside[:3])})" if inside else ""))
        if not weights.is_file():
            raise InputError(f"{cfg.pretrained}: pretrained weights file not found (or pass --pretrained timm)")
        cfg.pretrained = str(weights.resolve())
    return cfg


def check_layout(cfg) -> None:
    """The resolved config's sizes, before anything is built or written."""
    if int(cfg.steps) < 2:
        raise InputError(f"--steps must be at least 2 (the glance and one focus step), got {cfg.steps}")
    if not 0.0 < float(cfg.crop_pct) <= 1.0:
        raise InputError(f"crop_pct must be in (0, 1], got {cfg.crop_pct}")
    if not 0 < int(cfg.patch_size) <= int(cfg.image_size):
        raise InputError(f"--patch-size {cfg.patch_size} must be between 1 and --image-size {cfg.image_size}")


#: Settings ``--set`` may give any number: (name, lowest, lowest allowed, highest); plans of every stage.
_RANGES = (("seed", 0, True, (1 << 32) - 1), ("workers", 0, True, None), ("weight_decay", 0, True, None),
           ("warmup_iters", 0, True, None), ("gamma", 0, True, 1), ("clip", 0, False, None),
           ("action_std", 0, False, None), ("eval_max", 0, True, None), ("glance_cache_mb", 0, True, None),
           ("dsn_ratio", 0, True, None))
_PLAN_RANGES = (("lr", 0, False, None), ("iters", 0, True, None), ("batch", 0, True, None), ("minutes", 0, True, None))


def check_settings(cfg) -> None:
    """The run's numeric settings (which ``--set`` may give any value of their type), before
    anything is written: finite and in range, so a run does not stop at its first step (or train
    on NaN) with a run folder that then holds a config of settings that cannot work."""
    from .recipe import StagePlan

    plans = [k for k in cfg.__dataclass_fields__ if isinstance(getattr(cfg, k), StagePlan)]  # the demo's too
    items = [(name, getattr(cfg, name), *r) for name, *r in _RANGES]
    items += [(f"{stage}.{name}", getattr(getattr(cfg, stage), name), *r)
              for stage in plans for name, *r in _PLAN_RANGES]
    for name, value, lo, lo_ok, hi in items:
        if value is None:  # the backbone family's default
            continue
        if not math.isfinite(value) or value < lo or (value == lo and not lo_ok) or (hi is not None and value > hi):
            interval = f"{'[' if lo_ok else '('}{lo}, {'inf)' if hi is None else f'{hi}]'}"
            raise InputError(f"{name} must be in {interval}, got {value}")
    import multiprocessing

    start, methods = getattr(cfg, "worker_start", None), multiprocessing.get_all_start_methods()
    if start is not None and start not in methods:
        raise InputError(f"worker start method {start} (--worker-start, or the run's config.json on --resume): this "
                         f"platform cannot start processes by {start} (its start methods: {', '.join(methods)}); "
                         f"give --worker-start with one of them")


def check_epochs(cfg) -> None:
    """The stages' epochs, before the data is scanned: none negative, and stage 1 (which trains
    the classifier every later stage and the exported model use) at least one."""
    for name in STAGE_ORDER:
        if getattr(cfg, name).epochs < 0:
            raise InputError(f"{name}.epochs must be 0 or more, got {getattr(cfg, name).epochs}")
    if cfg.stage1.epochs < 1:
        raise InputError("stage 1 needs at least 1 epoch (--epochs N or N1,N2,N3 with N1 >= 1): it trains the "
                         "classifier that the later stages and the exported model use")


def build_models(cfg, num_classes: int, log, pretrained: bool = True,
                 baseline: Optional[Tuple[Dict[str, Any], str]] = None):
    """The GFNet (and the static network when asked for), pretrained weights loaded (unless
    ``pretrained`` is False: a resumed run takes its weights from its stage checkpoints); on the
    CPU. ``baseline``: the state dict of the run's own finished static baseline and its source
    for the log (:func:`_own_baseline`), where both encoders start when the run has no
    ``--pretrained``. One trial step on a blank image shows, before anything is written, that the
    backbone works as a GFNet encoder at the glance and patch sizes."""
    import torch

    from ..models.backbones import _create_timm
    from ..models.gfnet import GFNet
    from .pretrained import load_backbone, read_weights_file, static_kwargs_hint, timm_pretrained_state

    try:
        spec = cfg.spec(num_classes)
    except ValueError as exc:  # settings the GFNet cannot take (steps, patch size, classifier)
        raise InputError(f"--backbone {cfg.backbone}: {exc}") from exc
    try:
        torch.manual_seed(cfg.seed)
        model = GFNet(spec)
        with torch.no_grad():
            model.eval().trace(torch.zeros(1, 3, spec.image_size, spec.image_size))
        model.train()
    except InputError:
        raise
    except Exception as exc:  # timm models fail in many ways at sizes they cannot take
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), "")[:200]
        raise InputError(f"--backbone {cfg.backbone} does not work as a GFNet encoder at image size "
                         f"{spec.image_size} / patch size {spec.patch_size}: "
                         f"{type(exc).__name__}: {first}") from exc
    static = _create_timm(cfg.backbone, num_classes, **cfg.backbone_kwargs) if cfg.static.epochs > 0 else None
    if not pretrained:
        log("resuming: the weights come from the run's stage checkpoints")
        return model, static
    if cfg.pretrained is None and baseline is not None:
        sd, source = baseline
        for net in (model.model_prime.net, model.model.net):
            load_backbone(net, sd, source)
        log(f"pretrained weights: {source}")
        return model, static
    if cfg.pretrained is None:
        log("warning: no --pretrained weights: the backbone starts from random weights")
        return model, static
    if cfg.pretrained == "timm":
        sd, source, note = timm_pretrained_state(cfg.backbone, num_classes, **cfg.backbone_kwargs), \
            f"timm {cfg.backbone}", ""
    else:
        (sd, note), source = read_weights_file(cfg.pretrained, cfg.backbone), cfg.pretrained
    try:
        for net in [model.model_prime.net, model.model.net] + ([static] if static is not None else []):
            fresh = load_backbone(net, sd, source)
    except InputError as exc:
        hint = static_kwargs_hint(cfg.pretrained, cfg.backbone_kwargs) if cfg.pretrained != "timm" else ""
        raise InputError(f"{exc}{hint}") from exc
    log(f"pretrained weights: {source}{note}" + (f" (classifier re-initialised: {len(fresh)} tensors)" if fresh else ""))
    return model, static


def _scan(cfg, out: Path, ctx, log, reuse: bool, progress: bool = False):
    """Scans the data on rank 0 (or, with ``reuse``, reads ``RUN/data_index.json``) and shares it
    with every rank; ``progress``: a progress bar while the images are decoded."""
    from .folder_data import FolderSplit, scan_dataset, split_summary

    index = out / "data_index.json"
    result: Any = None
    if ctx.main:
        try:
            if reuse and index.exists():
                try:
                    d = json.loads(index.read_text())
                    result = {k: FolderSplit(Path(d[k]["root"]), list(d[k]["classes"]),
                                             [(str(f), int(lab)) for f, lab in d[k]["samples"]], list(d[k]["skipped"]))
                              for k in ("train", "val")}
                except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not the index a run writes
                    raise InputError(f"{index}: not a data index of gfnet-edge train ({type(exc).__name__}: {exc}); "
                                     f"move it away to list {cfg.data} again") from exc
                if any(Path(split.root).parent != Path(cfg.data) for split in result.values()):
                    result = {k: _moved(split, Path(cfg.data), index) for k, split in result.items()}
                gone = [f for split in result.values() for f, _ in split.samples if not Path(f).is_file()]
                if gone:  # deleted or moved since the run listed them: found here, not by a worker mid-epoch
                    raise InputError(f"{len(gone)} image(s) listed in {index} are no longer there (first: {gone[0]}); "
                                     f"put them back, or move {index.name} away to list {cfg.data} again (the run "
                                     "then goes on with the images there are)")
            else:
                tr, va = scan_dataset(cfg.data, workers=max(2, cfg.workers), progress=progress)
                result = {"train": tr, "val": va}
        except InputError as exc:
            result = exc
    result = ctx.broadcast_object(result)
    if isinstance(result, Exception):
        raise result
    for k in ("train", "val"):
        log(split_summary(result[k]))
    return result["train"], result["val"]


def _moved(split, root: Path, index: Path):
    """``split`` (read from ``index``) with its images under ``root`` (the run's data folder moved
    there: ``--data NEW --resume``), each at the same place relative to its split folder."""
    from .folder_data import FolderSplit

    old, new = Path(split.root), root / Path(split.root).name
    try:
        samples = [(str(new / Path(f).relative_to(old)), lab) for f, lab in split.samples]
    except ValueError:
        raise InputError(f"{index}: lists images outside its split folder {old}; move it away to list "
                         f"{root} again") from None
    for (was, _), (now, _) in zip(split.samples, samples):  # a copy, where the run's folder is still there
        try:
            same = os.path.getsize(was) == os.path.getsize(now)
        except OSError:  # gone from the old place (moved), or not in the new one (named by the caller)
            continue
        if not same:
            raise InputError(f"{root}: holds other images than the run's data folder {old.parent} ({now} and {was} "
                             "differ in size): --resume goes on with the run's own images; give their folder, or "
                             "start a new run in another -o folder")
    return FolderSplit(new, split.classes, samples, split.skipped)


def run_folder(args: argparse.Namespace) -> int:
    """The folder trainer's entry point (``gfnet-edge train --data ...``)."""
    from .recipe import LOADING_SETTINGS, FolderTrainConfig

    if not args.out:
        raise InputError("--data needs -o RUN (the run folder)")
    demo_only = [flag for flag, on in (("--tiny", getattr(args, "tiny", False)),
                                       ("--assets", getattr(args, "assets", None))) if on]
    if demo_only:
        raise InputError(f"{demo_only[0]} applies to the demo trainer (without --data); with --data make a small run "
                         "with --epochs, --batch-size and a small folder")
    stages = STAGE_CHOICES.get(args.stage)
    if stages is None:
        raise InputError(f"--stage {args.stage} is a demo stage; with --data use one of {', '.join(STAGE_CHOICES)}")
    cfg_path = Path(args.out) / "config.json"
    if args.resume and cfg_path.exists():
        try:
            cfg = FolderTrainConfig.from_dict(json.loads(cfg_path.read_text()))
        except (ValueError, TypeError) as exc:
            raise InputError(f"{cfg_path}: not a run config of gfnet-edge train --data ({exc})") from exc
        for key in LOADING_SETTINGS:  # how images are loaded, not what is trained: may change on resume
            if getattr(args, key) is not None:
                setattr(cfg, key, getattr(args, key))
        changed = _changed_on_resume(cfg, args)
        if changed == ["data"]:  # the same images in another place: the run goes on with them there
            cfg.data = str(Path(args.data).resolve())  # as apply_args resolves it
        elif changed and _adds_static(changed, stages, Path(args.out)):
            cfg = apply_args(FolderTrainConfig.from_dict(json.loads(cfg.dumps())), args)
        elif changed and _gives_pretrained(changed, cfg, Path(args.out)):
            cfg = check_pretrained(apply_args(FolderTrainConfig.from_dict(json.loads(cfg.dumps())), args))
        elif changed:
            hint = ("; the static baseline's settings may change only while the run has none (no static.pt)"
                    if "static" in stages and all(k.startswith("static.") for k in changed) else "")
            started = _gfnet_checkpoints(Path(args.out))
            if "pretrained" in changed and started:
                hint = (f"; --pretrained sets where the GFNet's encoders start, and this run's GFNet has started "
                        f"training ({started[0]})")
            if _saved_no_epoch(Path(args.out)):
                hint = "; this run saved no epoch yet, so without --resume it starts again with those options"
            raise InputError(f"--resume continues the run as {cfg_path} describes it, and the command line would "
                             f"change {', '.join(changed)}: leave those options out (or start a new run in "
                             f"another -o folder){hint}")
        else:
            changed = []
    else:
        cfg, changed = config_from_args(args), []
    if tuple(stages) == ("static",) and cfg.static.epochs <= 0:
        raise InputError("--stage static trains the static baseline, and this run has none: give its epochs with "
                         "--static-epochs N")
    train_folder(cfg, Path(args.out), stages, resume=args.resume, device=args.device,
                 progress=not args.no_progress, threads=args.threads, settings_changed=bool(changed))
    return 0


def _adds_static(changed: Sequence[str], stages: Sequence[str], out: Path) -> bool:
    """Whether a ``--resume`` whose command line changes the settings ``changed`` adds a static
    baseline to a run that has none: the static stage runs, only ``static.*`` settings change
    (and ``data``, the run's images in another place) and no static stage has started
    (``RUN/static.pt`` absent). The GFNet stages are untouched by those settings, so the run's
    other checkpoints stay valid."""
    return ("static" in stages and all(k.startswith("static.") or k == "data" for k in changed)
            and not (out / "static.pt").exists())


def _gfnet_checkpoints(out: Path) -> List[Path]:
    """The GFNet stages' checkpoints (``RUN/stage1.pt`` .. ``stage3.pt``) the run in ``out`` holds."""
    return [out / f"{s}.pt" for s in STAGE_ORDER if s != "static" and (out / f"{s}.pt").exists()]


def _gives_pretrained(changed: Sequence[str], cfg, out: Path) -> bool:
    """Whether a ``--resume`` whose command line changes the settings ``changed`` gives
    ``--pretrained`` to a run that recorded none and has trained only its static baseline
    (``RUN/static.pt``, no GFNet stage checkpoint): the GFNet has not started, so its encoders
    start from those weights (instead of the baseline); the baseline stays as it was trained."""
    return ("pretrained" in changed and all(k in ("pretrained", "data") for k in changed)
            and cfg.pretrained is None and (out / "static.pt").is_file() and not _gfnet_checkpoints(out))


def train_folder(cfg, out: Path, stages=STAGE_ORDER, resume: bool = False, device: str = "auto",
                 progress: bool = False, threads: Optional[int] = None,
                 settings_changed: bool = False) -> Dict[str, Any]:
    """Trains ``stages`` of the run in ``out`` (joining the ``torchrun`` process group if any).

    ``settings_changed``: ``cfg`` differs from a resumed run's ``config.json`` (a static baseline
    added to it), which is rewritten once the data and models check out.

    Returns the results written to ``RUN/results.json`` when the run was exported, or updated
    with a static baseline added to an exported run (else ``{}``).

    Raises:
        InputError: bad data, backbone, weights or run folder (nothing is written then), or
            another training process writing the same run folder.
    """
    out = Path(out)
    cfg_path = out / "config.json"
    check_epochs(cfg)
    check_settings(cfg)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    lock = _RunLock(out)  # one training process (group) per run folder at a time
    try:
        restart = not resume and cfg_path.exists() and _saved_no_epoch(out)
        if cfg_path.exists() and not resume and not restart:
            raise InputError(f"{out} already holds a run: pass --resume to continue it, or choose another -o folder")
        _check_out(out, Path(cfg.data))
        _check_earlier_stages(out, stages)
        _check_results(out, stages)
        return _train_locked(cfg, out, stages, resume, device, progress, threads, settings_changed, restart)
    finally:
        lock.release()


#: What a run writes before its ``config.json`` (a first try stopped there may be started again).
_BEFORE_CONFIG = ("train.txt", "data_index.json")


def _saved_no_epoch(out: Path) -> bool:
    """Whether the run in ``out`` stopped before it saved its first epoch (Ctrl-C in a long first
    epoch): the folder holds its ``config.json`` and nothing else but what a run writes before
    that. Nothing of it can be continued, so a command without ``--resume`` starts it again with
    its own settings."""
    names = {e.name for e in os.scandir(out) if not e.name.startswith(".")}
    return "config.json" in names and names <= {"config.json", *_BEFORE_CONFIG}


def _check_out(out: Path, data: Path) -> None:
    """The run folder lies outside the data folder, and one without a run in it (no
    ``config.json``) holds nothing but what a run writes before its config: training neither
    adds files to the user's images nor writes over files of theirs."""
    o, d = out.resolve(), data.resolve()
    if o == d or d in o.parents:
        raise InputError(f"{out}: the run folder is inside the data folder {data}; choose a -o folder outside it")
    if (out / "config.json").exists() or not out.is_dir():
        return
    other = sorted(e.name for e in os.scandir(out) if not e.name.startswith(".") and e.name not in _BEFORE_CONFIG)
    if other:
        raise InputError(f"{out}: holds {', '.join(other[:3])}{' ...' if len(other) > 3 else ''} and no gfnet-edge "
                         "run (config.json); choose a new or empty -o folder")


class _RunLock:
    """An exclusive lock on a run folder for this process (rank 0 under ``torchrun``), held while
    it trains: a second ``gfnet-edge train`` into the same folder is refused instead of mixing
    its stages into the first's. ``flock`` on a file in the temporary folder named after the
    run's absolute path, so the run folder itself gets nothing extra and a killed process
    releases it."""

    def __init__(self, out: Path) -> None:
        import hashlib
        import tempfile

        self._fd = None
        if int(os.environ.get("RANK", "0")) != 0:
            return
        try:
            import fcntl
        except ImportError:  # not on POSIX: no lock
            return
        key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
        path = Path(tempfile.gettempdir()) / f"gfnet-edge-train-{key}.lock"
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(f"{out}: another gfnet-edge train is writing this run folder; wait for it to end "
                             "or choose another -o folder") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:

            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def _train_locked(cfg, out: Path, stages, resume: bool, device: str, progress: bool,
                  threads: Optional[int], settings_changed: bool = False, restart: bool = False) -> Dict[str, Any]:
    import torch

    from ..data.images import shown_name
    from .dist import init_distributed
    from .recipe import LOADING_SETTINGS

    cfg_path = out / "config.json"
    if threads:
        torch.set_num_threads(max(1, threads))
    ctx = init_distributed(device)
    log_file = None
    early: List[str] = []  # lines logged before RUN/train.txt exists (the data scan, the weights)

    def log(msg: str) -> None:
        if not ctx.main:
            return
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        # a file name that is not UTF-8 (its bytes kept as surrogates) is shown as \xNN escapes
        line = shown_name(line)
        print(line, flush=True)
        if log_file is not None:
            log_file.write(line + "\n")
            log_file.flush()
        else:
            early.append(line)

    try:
        if not Path(cfg.data).is_dir():
            moved = (f"; if the run's images moved, give their new folder: --data NEW --resume"
                     if resume and cfg_path.exists() else "")
            raise InputError(f"{cfg.data}: no such folder (expected ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg)"
                             f"{moved}")
        fresh = restart or not cfg_path.exists()
        if fresh and resume:
            log(f"--resume: {out} holds no run yet, so a new one starts")
        elif restart:
            log(f"{out} holds a run that stopped before it saved an epoch: it starts again with these settings")
        if cfg.worker_start is not None and not cfg.workers:  # not refused: a later --resume may give --workers
            log(f"--worker-start {cfg.worker_start} has no effect: with --workers 0 the images are loaded in the "
                "training process")
        train, val = _scan(cfg, out, ctx, log, reuse=not fresh, progress=progress)
        if cfg.classes and cfg.classes != train.classes:
            raise InputError(f"{cfg.data}: classes {train.classes} differ from the run's {cfg.classes}")
        cfg.classes = list(train.classes)
        cfg = cfg.resolved()
        check_layout(cfg)
        if cfg.batch_size < 1 or cfg.batch_size % ctx.world:
            raise InputError(f"--batch-size {cfg.batch_size} must be a positive multiple of the {ctx.world} processes")
        if len(train) < cfg.batch_size:
            raise InputError(f"{cfg.data}: the train split has {len(train)} readable images, fewer than one batch "
                             f"({cfg.batch_size}); lower --batch-size")
        # a resumed run whose networks all have stage checkpoints needs no pretrained weights
        have = {s for s in STAGE_ORDER if (out / f"{s}.pt").is_file()}
        resuming = bool(have - {"static"}) and (cfg.static.epochs == 0 or "static" in have)
        starts = "stage1" in stages and not have - {"static"}  # the GFNet's encoders get their first weights
        baseline = _own_baseline(out) if cfg.pretrained is None and starts else None
        model, static = build_models(cfg, len(train.classes), log, pretrained=not resuming, baseline=baseline)
        recorded = None if fresh else json_object(cfg_path)
        for key in ("gfnet_init", "static_init"):  # where the run's networks started, as the run recorded it
            if recorded is not None and getattr(cfg, key) is None and recorded.get(key) is not None:
                setattr(cfg, key, recorded[key])
        init = (cfg.gfnet_init, cfg.static_init)
        if starts:  # recorded in config.json and the exported checkpoint's train_config
            cfg.gfnet_init = (cfg.pretrained if cfg.pretrained is not None
                              else str((out / "static.pt").resolve()) if baseline is not None else "random")
        if "static" in stages and cfg.static.epochs > 0 and "static" not in have:  # ... and RUN/static.pth.tar
            cfg.static_init = cfg.pretrained if cfg.pretrained is not None else "random"
        if ctx.main:
            out.mkdir(parents=True, exist_ok=True)
            log_file = open(out / "train.txt", "a")
            log_file.writelines(line + "\n" for line in early)
            if fresh or settings_changed:  # a new index, or the data folder moved (--data NEW --resume)
                write_text_atomic(out / "data_index.json", json.dumps(
                    {k: {"root": str(s.root), "classes": s.classes, "samples": s.samples, "skipped": s.skipped}
                     for k, s in (("train", train), ("val", val))}))
            loading = recorded is not None and any(recorded.get(k) != getattr(cfg, k) for k in LOADING_SETTINGS)
            # new settings, provenance, or workers / worker start that a --resume gave
            if fresh or settings_changed or (cfg.gfnet_init, cfg.static_init) != init or loading:
                write_text_atomic(cfg_path, cfg.dumps())  # whole or absent: --resume reads it
        ctx.barrier()
        spec = model.spec
        log(f"model {spec.model_name}: S={spec.image_size} P={spec.patch_size} T={spec.steps} "
            f"classifier={spec.classifier} classes={spec.num_classes}; {ctx.world} process(es) on {ctx.device}"
            + (f", autocast {cfg.amp}" if ctx.device.type == "cuda" else ""))
        from .folder_stages.sigint import SIGINT

        with SIGINT:  # Ctrl-C stops training wherever it comes
            return _train_and_export(out, cfg, ctx, train, val, model, static, stages, log, progress)
    except ValueError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(str(exc)) from exc
    finally:
        if log_file is not None:
            log_file.close()
        ctx.close()


def _own_baseline(out: Path) -> Optional[Tuple[Dict[str, Any], str]]:
    """The weights of the static baseline the run in ``out`` has finished (``RUN/static.pt``,
    done: a run that trained its baseline first, ``--stage static``), and their source for the
    log; ``None`` when it has none."""
    from ..models.checkpoint import is_stage_checkpoint, read_torch_file

    path = out / "static.pt"
    if not path.is_file():
        return None
    ck = read_torch_file(path, "stage checkpoint")  # a CheckpointError names the file
    if not (is_stage_checkpoint(ck) and ck["done"] and isinstance(ck["models"], dict)
            and isinstance(ck["models"].get("static"), dict)):
        return None  # an unfinished baseline (or not a stage checkpoint: the stage's own load names it)
    return ck["models"]["static"], (f"the run's static baseline {path} (the run has no --pretrained): both "
                                    "encoders start from it")


def _check_results(out: Path, stages: Sequence[str]) -> None:
    """A static baseline added to an exported run is written into ``RUN/results.json`` at the end:
    that file must read before anything trains (on every process, so none waits for a failed one)."""
    path = out / "results.json"
    if "static" not in stages or "stage3" in stages or not path.exists():
        return
    try:
        if not isinstance(json.loads(path.read_text()), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the run's results ({exc}); the static baseline's figures go "
                         "there") from exc


def _check_earlier_stages(out: Path, stages: Sequence[str]) -> None:
    """A run that starts after stage 1 (``--stage 2``, ``3`` or ``export``) needs the weights of
    an earlier GFNet stage in ``out``: without them it would train or export random weights."""
    first = STAGE_ORDER.index(stages[0]) if stages else len(STAGE_ORDER)
    earlier = [s for s in STAGE_ORDER[:first] if s != "static"]
    if earlier and tuple(stages[:1]) != ("static",) and not any((out / f"{s}.pt").is_file() for s in earlier):
        what = f"--stage {stages[0].replace('stage', '')}" if stages else "--stage export"
        raise InputError(f"{what} needs the weights of an earlier stage ({', '.join(earlier)}) in {out}, "
                         "and there are none: train --stage all (or the earlier stages) first")


def _train_and_export(out, cfg, ctx, train, val, model, static, stages, log, progress: bool) -> Dict[str, Any]:
    import torch

    # Fixed image sizes: cuDNN picks its fastest kernels once (restored for whatever runs next
    # in this process).
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = ctx.device.type == "cuda" or benchmark
    try:
        return _run_stages(out, cfg, ctx, train, val, model, static, stages, log, progress)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def _run_stages(out, cfg, ctx, train, val, model, static, stages, log, progress: bool) -> Dict[str, Any]:
    from .folder_data import folder_source
    from .folder_stages import FolderTrainer

    t0 = time.time()
    data = folder_source(train, val, model.spec, cfg.seed, cfg.random_crop, cfg.hflip)
    tr = FolderTrainer(out, cfg, ctx, data, model, static, log, progress)
    first = STAGE_ORDER.index(stages[0]) if stages else len(STAGE_ORDER)
    for name in reversed([s for s in STAGE_ORDER[:first] if s != "static"]):
        if tr.load_stage(name) is not None:
            log(f"weights after {name} loaded")
            break
    static_trained = "static" in stages  # the stage runs to its end, or raises
    if static is not None and "static" not in stages:
        ck = tr.load_stage("static")
        static_trained = ck is not None and bool(ck["done"])
    for name in stages:
        t = time.time()
        getattr(tr, "static_stage" if name == "static" else name)()
        if name in tr.timings and name not in tr.skipped:
            log(f"{name} finished in {(time.time() - t) / 60:.1f} min")
    tr.release_glance_cache()  # training is over: the evaluation and export need the memory
    res: Dict[str, Any] = {}
    asked = {s for s in stages if getattr(cfg, s).epochs > 0}  # a stage of 0 epochs never runs
    gfnet = asked - {"static"}
    # the GFNet's export, when it is the run's (newer than the stage checkpoints; one whose
    # results.json does not read is written again)
    results = (json_object(out / "results.json")
               if asked and gfnet <= tr.skipped and _exported_after(out, False) else None)
    planned = static is not None and cfg.static.epochs > 0
    if results is not None and asked <= tr.skipped and (not planned or _exported_after(out, True)):
        # every stage asked for had finished, and their export is there: the same checkpoint is
        # not written again (a bundle built from it keeps naming the run's file by its hash)
        log(f"{', '.join(sorted(asked, key=STAGE_ORDER.index))}: finished, and the run's export in {out} is newer: "
            "nothing to do (`--stage export` measures the trained models and writes it again)")
        return results
    # a baseline trained now, added to the GFNet export that stands
    added = results is not None and bool(gfnet) and "static" in asked and "static" not in tr.skipped
    if "stage3" in stages and not added or not stages:
        res = export(tr, out, log, (val, train), static_trained)
    elif "static" in stages and static is not None:
        # a baseline trained on its own, or added to a run whose GFNet export stands (its bytes kept)
        res = add_static_results(tr, out, log)
    log(f"total {(time.time() - t0) / 60:.1f} min")
    return res


def _exported_after(out: Path, static: bool) -> bool:
    """Whether the run in ``out`` holds its export (``gfnet.pth.tar`` and ``results.json``, with
    ``static``: ``static.pth.tar``) written after the stage checkpoints it comes from: the GFNet's
    after every ``RUN/stage*.pt``, the baseline's after ``RUN/static.pt``. An export of earlier
    weights (``--stage export`` before stage 3, then an export stopped part-way) is not the run's."""
    def mtime(name: str) -> float:
        path = out / name
        return path.stat().st_mtime_ns if path.is_file() else -1

    pairs = [("gfnet.pth.tar", [f"{s}.pt" for s in STAGE_ORDER if s != "static"])]
    pairs += [("static.pth.tar", ["static.pt"])] if static else []
    return mtime("results.json") >= 0 and all(
        mtime(made) >= 0 and all(mtime(made) >= mtime(src) for src in sources) for made, sources in pairs)


def build_command(checkpoint: Path, splits: Sequence) -> str:
    """The ``gfnet-edge build-engine`` command the log suggests for ``checkpoint``: INT8, calibrated
    on the first of ``splits`` (``FolderSplit``: val, then train) that holds the readable images
    calibration needs (``MIN_CALIB_IMAGES``), with ``--skip-unreadable`` when training skipped some
    of its files (build-engine would stop at them), else fp32, with a note on the images it lacked."""
    from ..quantize.calibration import MIN_CALIB_IMAGES

    base = f"gfnet-edge build-engine {checkpoint} -o BUNDLE"
    for split in splits:
        if len(split) >= MIN_CALIB_IMAGES:
            return f"{base} --calib-data {split.root}" + (" --skip-unreadable" if split.skipped else "")
    counts = ", ".join(f"{split.root} {len(split)}" for split in splits)
    return (f"{base} --precision fp32; for INT8, --calib-data a folder of the model's class folders with at least "
            f"{MIN_CALIB_IMAGES} images (readable images: {counts})")


def export(tr, out: Path, log, splits: Sequence, static_trained: bool = True) -> Dict[str, Any]:
    """Measures the trained GFNet on val and writes ``RUN/gfnet.pth.tar`` and ``RUN/results.json``;
    with the run's static baseline (``RUN/static.pth.tar`` and its figures) when it has finished
    training (``static_trained``): one the run has not trained yet is left to ``--stage static``.
    ``splits`` (val, then train) choose the calibration images of the build command the log ends
    with (:func:`build_command`)."""

    from .. import evaluate as ev
    from ..build import macs_budget_rows
    from ..models.checkpoint import save_checkpoint
    from ..models.gfnet import GFNet
    from ..models.macs import count_step_macs

    t = time.time()
    probs, labels = tr.val_probs(0, amp=False)
    planned = tr.static is not None and tr.cfg.static.epochs > 0
    static_acc = tr.evaluate_static()["val_acc"] if planned and static_trained else None
    if not tr.ctx.main:
        tr.ctx.barrier()
        return {}
    model = GFNet(tr.spec)  # plain float32 copy on the CPU (no SyncBatchNorm, no device tensors)
    model.load_state_dict({k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                           for k, v in tr.model.state_dict().items()})
    model.eval()
    costs = [float(c) for c in count_step_macs(model).cumulative]
    anytime = ev.anytime_accuracy(probs, labels)
    curve = ev.budgeted_curve(probs, probs, labels, costs)
    res: Dict[str, Any] = {
        "val_images": int(len(labels)), "classes": tr.cfg.classes, "step_macs_cumulative": costs,
        "anytime_accuracy": [round(float(a), 2) for a in anytime],
        "budgeted_batch_classification": curve.as_lists(), "budgeted_ps": [float(p) for p in curve.ps],
        "training_minutes": {k: round(v / 60, 2) for k, v in tr.timings.items()},
    }
    meta = {"anytime_classification": res["anytime_accuracy"],
            "dynamic_threshold": [[float(x) for x in row] for row in curve.thresholds],
            "budgeted_batch_classification": res["budgeted_batch_classification"],
            "classes": tr.cfg.classes, "train_config": json.loads(tr.cfg.dumps()),
            "train_results": {k: v for k, v in res.items() if k != "budgeted_batch_classification"}}
    path = save_checkpoint(out / "gfnet.pth.tar", model, metadata=meta)
    if static_acc is not None:
        res.update(_save_static(tr, out, static_acc))
    write_text_atomic(out / "results.json", json.dumps(res, indent=1) + "\n")
    curve_costs, curve_accs = curve.as_lists()
    pts = ", ".join(f"{name} {curve_accs[i]:.1f}% @ {curve_costs[i] / 1e6:.1f}M"
                    for name, i in macs_budget_rows().items())
    log(f"val anytime accuracy per step: {res['anytime_accuracy']} (MACs {', '.join(f'{c / 1e6:.1f}M' for c in costs)})")
    log(f"val budgeted (thresholds fit on val; the bundle's multiply-add budgets): {pts}"
        + (f"; static baseline {static_acc}%" if static_acc is not None else ""))
    if planned and not static_trained:
        log(f"the run's static baseline has not finished training ({out / 'static.pt'}): the export leaves it out; "
            f"gfnet-edge train -o {out} --resume --stage static trains it and adds it to {out / 'results.json'}")
    written = [path, out / "results.json"] + ([out / "static.pth.tar"] if static_acc is not None else [])
    log(f"wrote {', '.join(map(str, written))} ({(time.time() - t):.0f} s); "
        f"next: {build_command(path, splits)}")
    tr.ctx.barrier()
    return res


def _save_static(tr, out: Path, static_acc: float) -> Dict[str, Any]:
    """Writes ``RUN/static.pth.tar`` (rank 0); returns its ``results.json`` entries."""
    from ..models.macs import count_static_macs
    from .static import save_static

    net = tr.static.module if hasattr(tr.static, "module") else tr.static
    macs = count_static_macs(net.eval(), tr.spec.image_size)
    save_static(out / "static.pth.tar", net, tr.cfg.backbone, tr.cfg.backbone_kwargs, tr.spec.num_classes,
                tr.spec.image_size, metadata={"val_accuracy": static_acc, "classes": tr.cfg.classes, "macs": int(macs),
                                              "started_from": getattr(tr.cfg, "static_init", None),
                                              "crop_pct": float(tr.spec.crop_pct),
                                              "dataset_interpolation": tr.spec.dataset_interpolation},
                half=False)
    return {"static_accuracy": static_acc, "static_macs": float(macs)}


def add_static_results(tr, out: Path, log) -> Dict[str, Any]:
    """A static baseline trained on its own (``--stage static``): writes ``RUN/static.pth.tar``
    and, when the run has been exported, adds its val accuracy and MACs to ``RUN/results.json``
    (the GFNet checkpoint is unchanged)."""
    static_acc = tr.evaluate_static()["val_acc"]
    if not tr.ctx.main:
        tr.ctx.barrier()
        return {}
    path = out / "results.json"
    if not path.is_file():  # no GFNet exported yet: its export adds the baseline's figures
        _save_static(tr, out, static_acc)
        log(f"static baseline {static_acc}% on val; wrote {out / 'static.pth.tar'}")
        tr.ctx.barrier()
        return {}
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the run's results ({exc})") from exc
    res.update(_save_static(tr, out, static_acc))
    write_text_atomic(path, json.dumps(res, indent=1) + "\n")
    log(f"static baseline {static_acc}% on val; wrote {out / 'static.pth.tar'} and added it to {path}")
    tr.ctx.barrier()
    return res
