"""``gfnet-edge build-engine``: checkpoint -> ONNX -> (INT8 Q/DQ) -> engines, in one bundle.

Two phases are first class:

1. on a workstation (no GPU needed): :func:`build_bundle` exports the graphs, quantizes them and
   writes a portable bundle (ONNX Runtime runs it as is);
2. on the device: :func:`build_engines` adds TensorRT engines for that GPU and TensorRT version
   to an existing bundle.

Bundles are built in a temporary sibling directory and renamed into place, so a failed build
leaves nothing half-written.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .bundle import (Bundle, check_replace, finite_or_null, new_manifest, record_artifacts, safe_join,
                     sha256_file, staging_dir, write_json_atomic)
from .errors import InputError
from .log import logger
from .runtime.backends.tensorrt_build import BuildOptions

#: Named budgets written from the checkpoint's multiply-add thresholds (p of the reference sweep).
MACS_BUDGETS = {"macs-low": 0.25, "macs-mid": 1.0, "macs-high": 1.5}
DEFAULT_MACS_BUDGET = "macs-mid"
#: Images loaded beyond ``num_calib`` to check the INT8 accuracy on (``BuildConfig.num_eval``).
NUM_EVAL = 256


@dataclass
class BuildConfig:
    """Options of one build (the CLI's flags).

    Attributes:
        precision: ``fp32``, ``fp16`` or ``int8``.
        backend: ``auto`` / ``onnxruntime`` (portable bundle) / ``tensorrt`` (plus engines).
        calib_data: folder / .npz / ``demo`` / ``demo:train`` for INT8 calibration.
        num_calib: calibration images.
        skip_unreadable: leave out image files of a ``calib_data`` folder that cannot be read
            (each named in a warning) instead of stopping at the first.
        calib_method: ``auto`` (the profile's own, :attr:`gfnet_edge.quantize.Profile.auto_method`),
            ``entropy``, ``max`` or ``percentile``.
        int8_profiles: which INT8 graph sets to write (``cpu``, ``tensorrt``).
        max_accuracy_drop: accuracy-driven mixed precision limit (points, final step; a held-out
            drop counts as over it only beyond its noise, see ``QuantizeOptions.drop_noise_z``).
        finetune_epochs: quantization-aware fine-tuning of the INT8 graphs' weights against the
            FP32 graphs' outputs on the calibration images (epochs; ``None``: each profile's
            default, 0: off; see docs/quantization.md).
        patch_guard_share: share of the backbone multiply-adds each profile may keep in float to
            protect the first patch's location (``None``: the profile's; 0: off).
        num_eval: images loaded from ``calib_data`` after the calibration images, held out to
            check the INT8 accuracy and drive the mixed-precision search (0: no check). The
            check's standard error shrinks as one over the square root of this count.
        include_checkpoint: copy the checkpoint into the bundle (enables the torch backend).
        force: replace an existing bundle.
        trt: TensorRT builder options.
        threads: CPU threads of the build: torch's for the export and the INT8 fine-tuning, and
            the INT8 quantization's ONNX Runtime sessions (``QuantizeOptions.threads``; None:
            ONNX Runtime's and torch's own choice).
        model_name, patch_size: the variant and P when the checkpoint does not store them and they
            cannot be inferred from its weights (as ``gfnet-edge info --model-name``).
    """

    precision: str = "int8"
    backend: str = "auto"
    calib_data: Optional[str] = None
    num_calib: int = 256
    skip_unreadable: bool = False
    calib_method: str = "auto"
    int8_profiles: Sequence[str] = ("cpu", "tensorrt")
    max_accuracy_drop: float = 0.5
    finetune_epochs: Optional[int] = None
    patch_guard_share: Optional[float] = None
    num_eval: int = NUM_EVAL
    include_checkpoint: bool = False
    force: bool = False
    trt: BuildOptions = field(default_factory=BuildOptions)
    threads: Optional[int] = None
    model_name: Optional[str] = None
    patch_size: Optional[int] = None


def resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    from .runtime.api import _tensorrt_usable

    return "tensorrt" if _tensorrt_usable() else "onnxruntime"


def _budgets_from_checkpoint(meta: Dict[str, Any], steps: int) -> Dict[str, Dict[str, Any]]:
    thr = meta.get("dynamic_threshold")
    if thr is None:
        return {}
    try:
        arr = np.asarray(thr.numpy() if hasattr(thr, "numpy") else thr, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"checkpoint dynamic_threshold is not an array of numbers ({exc})") from exc
    if arr.ndim != 2 or arr.shape[1] != steps or arr.shape[0] != 39:
        logger.warning("checkpoint dynamic_threshold has shape %s, expected (39, %d); ignored", arr.shape, steps)
        return {}
    if not np.isfinite(arr).all():
        raise InputError(f"checkpoint dynamic_threshold holds {int((~np.isfinite(arr)).sum())} NaN or infinite "
                         "value(s); exit thresholds must be finite (the checkpoint is corrupt)")
    out = {}
    for name, i in macs_budget_rows().items():
        out[name] = {"thresholds": [float(x) for x in arr[i]],
                     "source": f"checkpoint dynamic_threshold p={MACS_BUDGETS[name]}", "unit": "macs"}
    return out


def macs_budget_rows() -> Dict[str, int]:
    """The row of a checkpoint's 39 x T ``dynamic_threshold`` (p = 0.05, 0.10, ... 1.95, the
    reference sweep ``evaluate.DEFAULT_PS``) that each of ``MACS_BUDGETS`` takes."""
    return {name: int(round(p * 20)) - 1 for name, p in MACS_BUDGETS.items()}


def _preload_native_modules() -> None:
    """Imports the native modules the build loads lazily (ONNX, its exporter in torch, ONNX
    Runtime) before anything is written: a SIGTERM / SIGINT turns into an exception at the next
    Python instruction, and one raised while a native extension module is being initialised
    can crash the interpreter instead of ending the build through its cleanup."""
    import importlib

    for name in ("onnx", "torch.onnx", "onnxruntime", "onnxsim"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the step that needs it says what is missing


def build_bundle(checkpoint: Path, out: Path, cfg: BuildConfig, progress: bool = True) -> Bundle:
    """Phase 1 (and 2 when TensorRT is here): checkpoint -> bundle. ``cfg.threads`` also
    bounds torch's threads for the whole build (the export, the INT8 fine-tuning).

    Raises:
        InputError: bad checkpoint, calibration data or options.
        UnavailableError: TensorRT asked for but absent.
    """
    from .quantize.finetune import torch_threads

    with torch_threads(cfg.threads):
        return _build_bundle(checkpoint, out, cfg, progress)


def _build_bundle(checkpoint: Path, out: Path, cfg: BuildConfig, progress: bool) -> Bundle:
    from .export import export_model, manifest_model
    from .models.checkpoint import CheckpointError, load_checkpoint
    from .models.macs import count_step_macs

    if cfg.precision not in ("fp32", "fp16", "int8"):
        raise InputError(f"precision must be fp32, fp16 or int8, got {cfg.precision!r}")
    if cfg.precision == "int8":
        _check_int8_options(cfg)
    inputs = ([Path(checkpoint)] + ([Path(cfg.calib_data)] if not _demo_calibration(cfg.calib_data) else [])
              + ([Path(cfg.trt.timing_cache)] if cfg.trt.timing_cache else []))
    check_replace(Path(out), cfg.force, protect=inputs)  # before any work: the output may not be replaced
    if not _demo_calibration(cfg.calib_data):
        from .data.images import check_output_outside

        check_output_outside(out, cfg.calib_data, "--calib-data")
    backend = resolve_backend(cfg.backend)
    if backend == "tensorrt":
        from .runtime.backends.tensorrt_util import gpu_info, import_tensorrt

        import_tensorrt()
        gpu_info()
    if cfg.precision == "fp16" and backend != "tensorrt":
        raise InputError("fp16 needs the TensorRT backend (ONNX Runtime on the CPU runs fp32 or int8)")
    try:
        model = load_checkpoint(checkpoint, model_name=cfg.model_name, patch_size=cfg.patch_size)
    except CheckpointError as exc:
        raise InputError(str(exc)) from exc
    calib = None
    if cfg.precision == "int8":
        calib = _calibration_images(model, cfg, progress)  # fail early, before anything is written
    _preload_native_modules()
    with staging_dir(Path(out), force=cfg.force, protect=inputs) as tmp:
        logger.info("exporting ONNX graphs of %s", model.spec.model_name)
        paths = export_model(model, tmp / "graphs")
        shutil.move(str(paths["heads"]), tmp / "heads.npz")
        for g in ("glance", "focus"):
            paths[g].rename(tmp / "graphs" / f"{g}.fp32.onnx")
        costs = count_step_macs(model)
        manifest = new_manifest(manifest_model(model), {"macs": costs.as_dict()})
        manifest["graphs"]["fp32"] = {g: f"graphs/{g}.fp32.onnx" for g in ("glance", "focus")}
        manifest["budgets"] = _budgets_from_checkpoint(model.meta, model.spec.steps)
        manifest["default_budget"] = DEFAULT_MACS_BUDGET if manifest["budgets"] else None
        hashed = {}  # the checkpoint's copy, hashed as it is copied: its hash is also the source's
        if cfg.include_checkpoint:
            hashed["checkpoint.pth.tar"] = sha256_file(Path(checkpoint), copy_to=tmp / "checkpoint.pth.tar")
            manifest["checkpoint"] = "checkpoint.pth.tar"
        manifest["source_checkpoint"] = {"name": Path(checkpoint).name,
                                         "sha256": hashed.get("checkpoint.pth.tar") or sha256_file(Path(checkpoint)),
                                         "missing_metadata": model.meta["missing_metadata"]}
        if cfg.precision == "int8":
            manifest["quantization"] = finite_or_null(_quantize(model, tmp, manifest, calib, cfg, backend, progress))
        record_artifacts(tmp, manifest, hashed)
        write_json_atomic(tmp / "manifest.json", manifest)
        if backend == "tensorrt":
            _add_engines(Bundle(tmp, manifest), cfg)
    return Bundle.load(out)


def _check_int8_options(cfg: BuildConfig) -> None:
    """The INT8 options that would otherwise fail after the export: at least one known profile,
    at least ``MIN_CALIB_IMAGES`` calibration images asked for, no held-out set too small to
    judge."""
    from .quantize import QuantizeOptions
    from .quantize.calibration import MIN_CALIB_IMAGES
    from .quantize.profiles import PROFILES

    if not cfg.int8_profiles or any(p not in PROFILES for p in cfg.int8_profiles):
        raise InputError(f"int8_profiles must be a non-empty selection of {', '.join(PROFILES)}, "
                         f"got {list(cfg.int8_profiles)}")
    if cfg.num_calib < MIN_CALIB_IMAGES:
        raise InputError(f"--num-calib must be at least {MIN_CALIB_IMAGES}, got {cfg.num_calib}")
    min_eval = QuantizeOptions().min_eval
    if cfg.num_eval != 0 and cfg.num_eval < min_eval:
        raise InputError(f"--num-eval must be 0 (no accuracy check) or at least {min_eval}, got {cfg.num_eval}")


def _demo_calibration(source: Optional[str]) -> bool:
    """Whether a ``calib_data`` names no file: unset or the demo dataset (``demo[:SPLIT]``)."""
    from .quantize.calibration import demo_source

    try:
        return source is None or demo_source(source) is not None
    except ValueError as exc:
        raise InputError(str(exc)) from exc


def _calibration_images(model, cfg: BuildConfig, progress: bool = True):
    from .quantize import load_calibration_images

    source = cfg.calib_data
    if source is None:
        if model.spec.model_name.startswith("demo"):
            source = "demo"
        else:
            raise InputError("--precision int8 needs calibration images: pass --calib-data FOLDER|FILE.npz")
    from .data.images import check_skip_source, unreadable_files

    if cfg.num_eval:
        _check_calib_class_folders(source, model)
    skipped: List[str] = []
    try:
        if cfg.skip_unreadable:
            check_skip_source(source, _demo_calibration(source), f"--calib-data {cfg.calib_data}" if cfg.calib_data
                              else "the demo model's default calibration data (demo)")
        images, labels = load_calibration_images(source, model, cfg.num_calib + cfg.num_eval, return_labels=True,
                                                 on_error=unreadable_files(cfg.skip_unreadable, skipped),
                                                 as_frames=True, progress=progress)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if skipped:
        logger.warning("INT8: %d unreadable image file(s) of %s left out", len(skipped), source)
    if not _demo_calibration(source):  # a folder lists its images class by class: mix them before the split
        order = np.random.default_rng(0).permutation(len(images))
        images, labels = images[order], (labels[order] if labels is not None else None)
    return images, labels


def _check_calib_class_folders(source: str, model) -> None:
    """The held-out accuracy check labels a class-folder ``--calib-data`` by its sorted folder
    names, so a model that records its classes (one trained on an image folder) needs a folder
    with exactly those class folders (e.g. ``ROOT/val``, not ``ROOT`` with ``train`` and ``val``)."""
    from .data.images import check_class_folders

    names = (getattr(model, "meta", None) or {}).get("classes")  # a model built in Python records none
    if names and not _demo_calibration(source):
        check_class_folders(source, names, subject="--calib-data ",
                            why="the INT8 accuracy check would score it against wrong labels: pass a folder of the "
                                "model's class folders, or --num-eval 0 to calibrate on these images without the check")


def calibration_split(n_images: int, num_calib: int, num_eval: int = NUM_EVAL) -> int:
    """How many of ``n_images`` loaded images calibrate (the first ones; the rest are the
    mixed-precision search's held-out set): ``num_calib``, keeping at least 16 held out when
    there are enough images, and never fewer than half, nor fewer than calibration needs
    (``MIN_CALIB_IMAGES``) when there are that many. A held-out set smaller than the search
    needs (``QuantizeOptions.min_eval``) is grown to that size while calibration keeps half the
    images, else its images calibrate too (up to ``num_calib``). With ``num_eval`` 0 (no
    accuracy check) nothing is held out."""
    from .quantize import QuantizeOptions
    from .quantize.calibration import MIN_CALIB_IMAGES

    if num_eval == 0:
        return min(num_calib, n_images)

    min_eval = QuantizeOptions().min_eval
    n_cal = min(num_calib, max(n_images - 16, n_images // 2))
    n_cal = max(n_cal, min(num_calib, n_images, MIN_CALIB_IMAGES))
    if n_images - n_cal < min_eval:
        if n_images - min_eval >= max(MIN_CALIB_IMAGES, n_images // 2):
            n_cal = n_images - min_eval
        else:
            n_cal = min(num_calib, n_images)
    return n_cal


def _quantize(model, tmp: Path, manifest: Dict[str, Any], images, cfg: BuildConfig, backend: str,
              progress: bool) -> Dict[str, Any]:
    from .quantize import QuantCalibrationSet, QuantizeOptions, quantize_model

    profiles = ["tensorrt"] if backend == "tensorrt" else list(cfg.int8_profiles)
    if isinstance(images, tuple):
        images, labels = images
    else:
        labels = None
    n_cal = calibration_split(len(images), cfg.num_calib, cfg.num_eval)
    if n_cal < cfg.num_calib:
        logger.warning("INT8: %d of the %d images found calibrate (--num-calib %d), %d are held out to check "
                       "the accuracy", n_cal, len(images), cfg.num_calib, len(images) - n_cal)
    from . import ops

    spec = model.spec
    calib_x = ops.normalise_frames(images[:n_cal], spec.mean, spec.std)
    # the held-out check takes the S x S frames the way a deployed runtime does (normalised inside
    # it, Runtime.predict(frames, cropped=True)): an INT8 graph rounds its input to its grid, so
    # frames normalised beforehand can score differently
    eval_x = images[n_cal:]
    eval_y = labels[n_cal:] if labels is not None else None
    min_eval = QuantizeOptions().min_eval
    if 0 < len(eval_x) < min_eval:  # too few to judge a drop of a fraction of a point: no search
        logger.warning("INT8: %d images are left for the accuracy check, fewer than the %d it needs; the graphs "
                       "are quantized without it (give more images with --calib-data)", len(eval_x), min_eval)
        eval_x, eval_y = eval_x[:0], None
    calib = QuantCalibrationSet.from_model(model, calib_x, progress=progress)
    fp32 = {g: tmp / "graphs" / f"{g}.fp32.onnx" for g in ("glance", "focus")}
    reports = {}
    for prof in profiles:
        opts = QuantizeOptions(profile=prof, method=cfg.calib_method, max_accuracy_drop=cfg.max_accuracy_drop,
                               finetune_epochs=cfg.finetune_epochs, num_calib=n_cal,
                               patch_guard_share=cfg.patch_guard_share, threads=cfg.threads)
        res = quantize_model(model, fp32, tmp / "heads.npz", calib, tmp / "graphs" / f"int8-{prof}", opts,
                             eval_images=eval_x, eval_labels=eval_y, progress=progress)  # empty: no check
        rel = {}
        for g, p in res.graphs.items():
            dst = tmp / "graphs" / f"{g}.int8-{prof}.onnx"
            Path(p).replace(dst)
            rel[g] = dst.relative_to(tmp).as_posix()
        shutil.rmtree(tmp / "graphs" / f"int8-{prof}", ignore_errors=True)
        manifest["graphs"][f"int8-{prof}"] = rel
        reports[prof] = res.report
    return reports


def _add_engines(bundle: Bundle, cfg: BuildConfig) -> None:
    """Builds the engines of ``cfg.trt.precision`` into ``bundle`` (updates its manifest)."""
    from .runtime.backends.tensorrt_build import build_engine, plan_build
    from .runtime.backends.tensorrt_engines import engine_dir_name, same_engine_slot
    from .runtime.backends.tensorrt_util import gpu_info, import_tensorrt

    trt = import_tensorrt()
    opts = BuildOptions(**{**asdict(cfg.trt), "precision": cfg.precision}).validate()
    plan = plan_build(trt.__version__, opts)
    graphs = bundle.graph_paths(plan.graph_set)
    sub = f"engines/{engine_dir_name(gpu_info(), trt.__version__, opts.dla_core)}"
    entry: Dict[str, Any] = {}
    built: Dict[str, Path] = {}
    made = [d for d in (bundle.root / sub, (bundle.root / sub).parent) if not d.exists()]  # folders this build adds
    try:  # both engines first, into temporary files: a failed build leaves the bundle as it was
        for g in ("glance", "focus"):
            rel = f"{sub}/{g}.{opts.precision}.engine"
            dst = safe_join(bundle.root, rel)  # an engines folder linked out of the bundle: refused, nothing written
            dst.parent.mkdir(parents=True, exist_ok=True)
            built[rel] = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            res = build_engine(graphs[g], built[rel], opts)
            placement = {k: res.pop(k) for k in ("device_map", "dla_layers", "gpu_layers") if k in res}
            if placement:  # DLA engines: where each graph's layers run, per the builder's report
                entry.setdefault("dla_placement", {})[g] = placement
            entry.update(res)
            entry[g] = rel
    except BaseException:
        for tmpf in built.values():
            tmpf.unlink(missing_ok=True)
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    for rel, tmpf in built.items():
        tmpf.replace(bundle.root / rel)

    def upd(m: Dict[str, Any]) -> None:
        m["engines"] = [e for e in m.get("engines", []) if not same_engine_slot(e, entry)]
        m["engines"].append(entry)
        for g in ("glance", "focus"):
            bundle.add_artifact(m, entry[g])

    bundle.update_manifest(upd)


def build_engines(bundle_dir: Path, cfg: BuildConfig) -> Bundle:
    """Phase 2: adds TensorRT engines to an existing bundle (on the target device)."""
    bundle = Bundle.load(bundle_dir)
    _add_engines(bundle, cfg)
    return Bundle.load(bundle_dir)
