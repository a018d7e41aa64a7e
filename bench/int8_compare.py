#!/usr/bin/env python3
"""INT8 graphs of gfnet-edge's quantization profiles against NVIDIA ModelOpt's ONNX PTQ, on the
same FP32 graphs and the same calibration data, evaluated through the runtime.

    python3 bench/int8_compare.py --modelopt-python VENV/bin/python     # full run (resumable)
    python3 bench/int8_compare.py --quick --work /tmp/q --results /tmp/q/r.md  # seconds, no ModelOpt

For each model (the demo GFNet; an ImageNet-shaped GFNet with random weights and synthetic
images):

1. one bundle from ``build_bundle(BuildConfig(precision="int8"))`` (what ``gfnet-edge build-engine
   --precision int8`` writes): FP32 graphs and the ``int8-cpu`` / ``int8-tensorrt`` graph sets;
2. the calibration inputs the build uses (glance inputs and patches at the policy's locations
   of the first ``num_calib`` images of the build's calibration source), exported to ``.npz``;
3. ModelOpt ``quantize(quantize_mode="int8", calibration_method=max|entropy)`` of the bundle's
   own FP32 graphs on those arrays, in a separate Python environment (``bench/modelopt_ptq.py``;
   the arm is skipped with the reason when that environment is missing or fails);
4. a copy of the bundle with the ModelOpt graphs added as graph sets ``int8-modelopt-<method>``
   (manifest entries and SHA-256 artifacts), so every arm runs through the same ``Runtime``
   (ONNX Runtime, CPU);
5. every graph set on held-out images: demo images rendered with generator seeds the build and
   training never used (``--seeds``), synthetic images for the ImageNet-shaped model.
   ``Runtime.trace`` gives every step's probabilities, ``Runtime.predict`` the answer and exit
   step at the bundle's default budget.

Columns: per-step accuracy, final-step and budget accuracy minus FP32's with paired flip counts
(FP32 right -> INT8 wrong, and back), exit agreement with FP32 at the default budget, and the
share of backbone multiply-adds (Conv / Gemm / MatMul) not run in INT8, weighted by how often
each graph ran. Without labels (synthetic images) "accuracy" is agreement with FP32's final-step
argmax.

Every finished piece (bundle, calibration arrays, ModelOpt graphs, each trace, keyed by the
graphs' SHA-256) is kept under ``--work`` and reused, so an interrupted run resumes and the FP32
traces are computed once. The bundle is rebuilt when its build settings or the source of the
quantizer and the build change.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, demo_test_images, machine  # noqa: E402
from gfnet_edge.bundle import write_json_atomic  # noqa: E402
from int8_metrics import ArmTrace, compare_arm, float_share, graph_macs, weighted_float_share  # noqa: E402

DEMO_CHECKPOINT = ROOT / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar"
MODELOPT_SCRIPT = Path(__file__).resolve().parent / "modelopt_ptq.py"
#: Generator seeds of the held-out demo images (the demo model was trained on seed 0).
DEFAULT_SEEDS = (101, 202, 303)
#: Budget written into the comparison copy of a bundle that has none: equal exit fractions
#: (``exit_fractions(p=1)``), thresholds fitted on FP32 probabilities of separate images.
FITTED_BUDGET = "bench-mid"


class Source(enum.Enum):
    GFNET_EDGE = "gfnet-edge"
    MODELOPT = "modelopt"


@dataclass(frozen=True)
class Arm:
    """One graph set of the comparison."""

    graph_set: str
    label: str
    source: Source
    method: Optional[str] = None


FP32 = Arm("fp32", "FP32", Source.GFNET_EDGE)
GFNET_ARMS = (FP32, Arm("int8-tensorrt", "gfnet-edge `tensorrt` profile", Source.GFNET_EDGE),
              Arm("int8-cpu", "gfnet-edge `cpu` profile", Source.GFNET_EDGE))
MODELOPT_ARMS = (Arm("int8-modelopt-entropy", "ModelOpt ONNX PTQ, entropy", Source.MODELOPT, "entropy"),
                 Arm("int8-modelopt-max", "ModelOpt ONNX PTQ, max", Source.MODELOPT, "max"))


class Kind(enum.Enum):
    DEMO = "demo"          # the shipped demo checkpoint, cluttered-digits images with labels
    IMAGENET = "imagenet"  # a released variant with random weights, synthetic unlabelled images


@dataclass(frozen=True)
class Case:
    """A model of the comparison and its image sets."""

    name: str
    kind: Kind
    seeds: Tuple[int, ...]
    per_seed: int
    num_calib: int = 256
    num_eval: int = 256
    #: the demo's calibration source (``demo``: its validation split; ``demo:train``)
    demo_calib: str = "demo"
    patch_size: int = 96
    #: the profiles' accuracy-driven mixed-precision search (off: every layer the profile
    #: quantizes stays INT8; ``BuildConfig(max_accuracy_drop=None)``)
    search: bool = True

    @property
    def labelled(self) -> bool:
        return self.kind is Kind.DEMO


@dataclass
class Settings:
    work: Path
    threads: int
    modelopt_python: Optional[str]
    quick: bool = False


def _log(msg: str) -> None:
    print(f"[int8_compare] {msg}", file=sys.stderr, flush=True)


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- images
def synthetic_frames(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size, 3) images with structure at several scales: smooth random colour
    fields (bilinear up-sampling of 4x4 to 28x28 grids) plus pixel noise."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    img = np.zeros((n, 3, size, size), np.float32)
    for cells, amp in ((4, 90.0), (12, 50.0), (28, 30.0)):
        grid = torch.from_numpy(rng.uniform(-amp, amp, (n, 3, cells, cells)).astype(np.float32))
        img += F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False).numpy()
    img += 128.0 + rng.normal(0.0, 8.0, img.shape).astype(np.float32)
    return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))


def eval_images(case: Case, desc, seed: int, cache: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Held-out images of one seed: normalised float32 (N, 3, S, S) and labels (None: synthetic)."""
    if case.kind is Kind.DEMO:
        images, labels = demo_test_images(desc, int(seed), case.per_seed, cache=cache)
        return images, np.asarray(labels)
    from gfnet_edge import ops

    return ops.normalise_frames(synthetic_frames(case.per_seed, desc.image_size, seed), desc.mean, desc.std), None


# ----------------------------------------------------------------------------- build
def _checkpoint(case: Case, cdir: Path) -> Tuple[Path, Optional[str]]:
    """The checkpoint and the build's ``calib_data`` (None: the demo data) of a case."""
    if case.kind is Kind.DEMO:
        return DEMO_CHECKPOINT, case.demo_calib
    ckpt, calib = cdir / "checkpoint.pth.tar", cdir / "calibration_images.npz"
    if not ckpt.is_file():
        import torch

        from gfnet_edge.models import GFNet, save_checkpoint
        from gfnet_edge.variants import released_spec

        torch.manual_seed(0)
        save_checkpoint(ckpt, GFNet(released_spec(case.name, case.patch_size)))
    if not calib.is_file():
        from gfnet_edge.variants import released_spec

        size = released_spec(case.name, case.patch_size).image_size
        np.savez(calib.with_name("calibration_images.tmp.npz"),
                 images=synthetic_frames(case.num_calib + case.num_eval, size, seed=0))
        calib.with_name("calibration_images.tmp.npz").replace(calib)
    return ckpt, str(calib)


@functools.lru_cache(maxsize=None)
def build_code_key() -> str:
    """SHA-256 of the Python sources a bundle's INT8 graphs and calibration arrays depend on (the
    quantizer and the whole package: build, export, models, runtime): a cached bundle or array
    file made by other code is made again."""
    h = hashlib.sha256()
    files = sorted((ROOT / "quantize").glob("*.py")) + sorted((ROOT / "gfnet_edge").rglob("*.py"))
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build(case: Case, cdir: Path, times: Dict[str, Any]):
    """The case's INT8 bundle (built once; reused while its build settings are unchanged)."""
    from gfnet_edge.build import BuildConfig, build_bundle
    from gfnet_edge.bundle import Bundle, BundleError

    ckpt, calib_data = _checkpoint(case, cdir)
    kw: Dict[str, Any] = {"precision": "int8", "backend": "onnxruntime", "calib_data": calib_data,
                          "num_calib": case.num_calib, "num_eval": case.num_eval,
                          "int8_profiles": ("cpu", "tensorrt"), "force": True}
    if not case.search:
        kw["max_accuracy_drop"] = None
    cfg = BuildConfig(**kw)
    key = json.dumps({**{k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()},
                      "code": build_code_key()}, sort_keys=True)
    out = cdir / "bundle"
    stamp = _read_json(cdir / "build.json")
    if stamp.get("config") == key:
        try:
            return ckpt, calib_data, Bundle.load(out)
        except BundleError as exc:
            _log(f"{case.name}: cached bundle unusable ({exc}); rebuilding")
    _log(f"{case.name}: building the INT8 bundle (build_bundle, profiles cpu + tensorrt)")
    t0 = time.perf_counter()
    bundle = build_bundle(ckpt, out, cfg, progress=False)
    times["build_s"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(cdir / "build.json", {"config": key, "seconds": times["build_s"]})
    return ckpt, calib_data, bundle


def calibration_arrays(case: Case, cdir: Path, ckpt: Path, calib_data: Optional[str]) -> Path:
    """The build's calibration inputs as ``.npz`` (``glance``, ``focus``).

    Same images as ``build_bundle``: the first ``num_calib`` of ``load_calibration_images(source,
    model, num_calib + num_eval)``; glance inputs, and patches at the locations the model's own
    policy picks (``QuantCalibrationSet.from_model``), as the quantizer calibrates on them.
    """
    tag = "" if calib_data in (None, "demo") or case.kind is not Kind.DEMO else f"_{calib_data.replace(':', '-')}"
    path = cdir / f"calibration_arrays_{case.num_calib}_{case.num_eval}{tag}_{build_code_key()}.npz"
    if path.is_file():
        return path
    from gfnet_edge.build import calibration_split
    from gfnet_edge.models import load_checkpoint
    from gfnet_edge.quantize import QuantCalibrationSet, load_calibration_images

    model = load_checkpoint(ckpt)
    images = load_calibration_images(calib_data or "demo", model, case.num_calib + case.num_eval)
    n_cal = calibration_split(len(images), case.num_calib, case.num_eval)  # as build_bundle splits them
    cal = QuantCalibrationSet.from_model(model, images[:n_cal], progress=False)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, glance=cal.glance, focus=cal.focus)
    tmp.replace(path)
    return path


def _calibration_mismatch(bundle, calib: Path) -> Optional[str]:
    """A message when the profiles' reports name calibration sizes other than the exported arrays'."""
    with np.load(calib) as z:
        have = {g: int(z[g].shape[0]) for g in ("glance", "focus")}
    for prof, rep in (bundle.manifest.get("quantization") or {}).items():
        c = rep.get("calibration") or {}
        used = {g: c.get(g) for g in ("glance", "focus")}
        if used != have:
            return (f"the {prof} profile calibrated on {used['glance']} glance inputs / {used['focus']} patches, "
                    f"ModelOpt on {have['glance']} / {have['focus']}")
    return None


def _modelopt_key(bundle, calib: Path) -> Dict[str, Any]:
    """What ModelOpt's graphs of a case depend on: the calibration arrays (their contents) and
    the FP32 graphs."""
    from gfnet_edge.bundle import sha256_file

    arts, fp32 = bundle.manifest["artifacts"], bundle.manifest["graphs"]["fp32"]
    return {"calibration": sha256_file(calib), "fp32": [arts[fp32[g]]["sha256"] for g in ("glance", "focus")]}


def modelopt_graphs(arm: Arm, bundle, cdir: Path, calib: Path, st: Settings,
                    times: Dict[str, Any]) -> Tuple[Optional[Dict[str, Path]], Optional[str]]:
    """ModelOpt's graphs of one arm (quantized once per FP32 graph pair and calibration set), or
    (None, why they are missing)."""
    out = cdir / arm.graph_set
    graphs = {g: out / f"{g}.onnx" for g in ("glance", "focus")}
    info = out / "modelopt.json"
    key = None  # hashes the calibration arrays: at most once per arm
    if all(p.is_file() for p in graphs.values()):
        key = _modelopt_key(bundle, calib)
        if _read_json(info).get("key") == key:
            return graphs, None
    if not st.modelopt_python:
        return None, "no ModelOpt environment given (--modelopt-python PYTHON, a Python with nvidia-modelopt[onnx])"
    if not Path(st.modelopt_python).is_file():
        return None, f"--modelopt-python {st.modelopt_python}: no such file"
    out.mkdir(parents=True, exist_ok=True)
    fp32 = bundle.graph_paths("fp32")
    cmd = [st.modelopt_python, str(MODELOPT_SCRIPT), "--calib", str(calib), "--method", arm.method]
    for g in ("glance", "focus"):
        cmd += ["--graph", f"{g}:{fp32[g]}:{graphs[g]}"]
    _log(f"ModelOpt {arm.method}: {' '.join(cmd)}")
    env = dict(os.environ, OMP_NUM_THREADS=str(st.threads), CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    (out / "modelopt.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else "no output"
        return None, f"ModelOpt exited with {proc.returncode}: {last} (log: {out / 'modelopt.log'})"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    summary["key"] = key or _modelopt_key(bundle, calib)
    times[f"{arm.graph_set}_s"] = summary["wall_s"]
    write_json_atomic(info, summary)
    return graphs, None


def comparison_bundle(bundle, cdir: Path, extra: Dict[str, Dict[str, Path]], budget: Optional[List[float]]):
    """A copy of ``bundle`` with ``extra`` graph sets (and ``budget`` as its default budget when
    given), written through the bundle's update API so every artifact carries its SHA-256."""
    from gfnet_edge.bundle import Bundle

    dst = cdir / "compare"
    tmp = cdir / ".compare.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(bundle.root, tmp)
    copy = Bundle.load(tmp)
    rels = {}
    for name, graphs in extra.items():
        rels[name] = {}
        for g, src in graphs.items():
            rel = f"graphs/{g}.{name}.onnx"
            shutil.copyfile(src, tmp / rel)
            rels[name][g] = rel

    def upd(m: Dict[str, Any]) -> None:
        for name, entry in rels.items():
            m["graphs"][name] = entry
            for rel in entry.values():
                copy.add_artifact(m, rel)
        if budget is not None:
            m["budgets"][FITTED_BUDGET] = {"thresholds": [float(t) for t in budget], "unit": "fraction",
                                           "source": "bench/int8_compare.py: exit_fractions(p=1) fitted on "
                                                     "FP32 probabilities of separate synthetic images"}
            m["default_budget"] = FITTED_BUDGET

    copy.update_manifest(upd)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.replace(dst)
    return Bundle.load(dst)


# ----------------------------------------------------------------------------- traces
def _graph_key(bundle, graph_set: str) -> str:
    arts = bundle.manifest["artifacts"]
    h = hashlib.sha256()
    for g in ("glance", "focus"):
        h.update(arts[bundle.manifest["graphs"][graph_set][g]]["sha256"].encode())
    budget = bundle.thresholds(None)
    h.update(json.dumps(budget).encode())
    return h.hexdigest()[:16]


def run_arm(bundle, arm: Arm, x: np.ndarray, threads: int) -> ArmTrace:
    """Every step's probabilities (``Runtime.trace``); the default budget's answers and exit
    steps follow from them by the runtime's exit rule (checked against ``Runtime.predict`` on
    the first chunk)."""
    from gfnet_edge.evaluate import exit_steps
    from gfnet_edge.runtime import Runtime

    probs = []
    with Runtime(bundle.root, backend="onnxruntime", precision=arm.graph_set, threads=threads) as rt:
        thresholds = rt.thresholds
        for i in range(0, x.shape[0], 250):
            probs.append(rt.trace(x[i:i + 250]).probs)
            if i == 0:
                p = rt.predict(x[:250])
                want = exit_steps(probs[0], thresholds)
                if not np.array_equal(p.exit_step, want):  # float ties at a threshold only
                    _log(f"{arm.graph_set}: Runtime.predict exits differ from the trace's on "
                         f"{int((p.exit_step != want).sum())} of {len(want)} images")
    probs = np.concatenate(probs, axis=1)
    exits = exit_steps(probs, thresholds).astype(np.int64)
    classes = probs[exits, np.arange(probs.shape[1])].argmax(axis=1).astype(np.int64)
    return ArmTrace(probs, classes, exits)


def trace_cached(bundle, arm: Arm, set_name: str, x_fn, cdir: Path, threads: int, times: Dict[str, Any]) -> ArmTrace:
    path = cdir / "traces" / f"{arm.graph_set}.{set_name}.{_graph_key(bundle, arm.graph_set)}.npz"
    if path.is_file():
        return ArmTrace.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tr = run_arm(bundle, arm, x_fn(), threads)
    times.setdefault("traces_s", {})[f"{arm.graph_set}.{set_name}"] = round(time.perf_counter() - t0, 1)
    tr.save(path)
    return tr


# ----------------------------------------------------------------------------- one case
def run_case(case: Case, st: Settings) -> Dict[str, Any]:
    cdir = st.work / case.name
    cdir.mkdir(parents=True, exist_ok=True)
    times = _read_json(cdir / "times.json")
    ckpt, calib_data, bundle = build(case, cdir, times)
    desc = bundle.model
    skipped: Dict[str, str] = {}
    extra: Dict[str, Dict[str, Path]] = {}
    modelopt_info: Dict[str, Any] = {}
    calib_note = "no ModelOpt arms (--quick)"
    if not st.quick:
        calib = calibration_arrays(case, cdir, ckpt, calib_data)
        mismatch = _calibration_mismatch(bundle, calib)
        if mismatch:
            _log(f"{case.name}: {mismatch}")
        calib_note = mismatch or "same sizes"
        for arm in MODELOPT_ARMS:
            graphs, why = modelopt_graphs(arm, bundle, cdir, calib, st, times)
            if graphs is None:
                skipped[arm.graph_set] = why
                _log(f"{case.name}: {arm.label} skipped: {why}")
            else:
                extra[arm.graph_set] = graphs
                modelopt_info[arm.graph_set] = _read_json(cdir / arm.graph_set / "modelopt.json")
    budget = None
    if bundle.manifest.get("default_budget") is None:
        from gfnet_edge.evaluate import exit_fractions, fit_thresholds

        fit = trace_cached(bundle, FP32, "fit-seed7", lambda: eval_images(
            dataclasses.replace(case, per_seed=max(case.per_seed // 2, 16)), desc, 7, False)[0], cdir, st.threads, times)
        budget = fit_thresholds(fit.probs, exit_fractions(1.0, desc.steps)).tolist()
    cmp_bundle = comparison_bundle(bundle, cdir, extra, budget)
    arms = [a for a in GFNET_ARMS + MODELOPT_ARMS if a.graph_set in cmp_bundle.manifest["graphs"]]

    per_set: Dict[str, Dict[str, ArmTrace]] = {a.graph_set: {} for a in arms}
    labels: Dict[str, np.ndarray] = {}
    for seed in case.seeds:
        name = f"seed{seed}-n{case.per_seed}"
        cache: Dict[str, Any] = {}

        def images(seed=seed, cache=cache):
            if "x" not in cache:
                cache["x"], cache["y"] = eval_images(case, desc, seed, cache=not st.quick)
            return cache["x"]

        for arm in arms:
            _log(f"{case.name}: {arm.graph_set} on {name}")
            per_set[arm.graph_set][name] = trace_cached(cmp_bundle, arm, name, images, cdir, st.threads, times)
            write_json_atomic(cdir / "times.json", times)
        if case.labelled:
            if "y" not in cache:
                images()
            labels[name] = cache["y"]
        else:  # agreement with FP32's final-step answer
            labels[name] = per_set["fp32"][name].probs[-1].argmax(axis=1)

    def pooled(g: str) -> ArmTrace:
        ts = [per_set[g][s] for s in labels]
        return ArmTrace(np.concatenate([t.probs for t in ts], axis=1), np.concatenate([t.classes for t in ts]),
                        np.concatenate([t.exit_step for t in ts]))

    y_all = np.concatenate(list(labels.values()))
    ref_all = pooled("fp32")
    rows = []
    for arm in arms:
        glance, focus = (graph_macs(p) for p in (cmp_bundle.graph_paths(arm.graph_set)[g] for g in ("glance", "focus")))
        res = compare_arm(ref_all, pooled(arm.graph_set), y_all)
        rows.append({
            "graph_set": arm.graph_set, "label": arm.label, "source": arm.source.value, "method": arm.method,
            "pooled": res,
            "per_seed": {s: compare_arm(per_set["fp32"][s], per_set[arm.graph_set][s], labels[s]) for s in labels},
            "macs": {"glance": sum(n.macs for n in glance), "focus": sum(n.macs for n in focus),
                     "glance_float_pct": float_share(glance), "focus_float_pct": float_share(focus),
                     "float_pct_at_budget": weighted_float_share(glance, focus, len(y_all), res["focus_runs"]),
                     "float_pct_all_steps": weighted_float_share(glance, focus, 1, desc.steps - 1),
                     "float_nodes": {g: [n.name for n in nodes if not n.int8] for g, nodes in
                                     (("glance", glance), ("focus", focus))}},
        })
    q = bundle.manifest.get("quantization") or {}
    return {
        "case": case.name, "kind": case.kind.value, "model": desc.model_name, "steps": desc.steps,
        "labels": "true labels" if case.labelled else "FP32 final-step argmax (synthetic images have no labels)",
        "image_sets": list(labels), "images": int(len(y_all)),
        "default_budget": cmp_bundle.manifest.get("default_budget"),
        "budget_thresholds": cmp_bundle.thresholds(None),
        "calibration": {"images": case.num_calib, "glance_inputs": case.num_calib,
                        "focus_patches": case.num_calib * (desc.steps - 1),
                        "source": (f"demo {'train' if case.demo_calib == 'demo:train' else 'validation'} split"
                                   if case.labelled else "synthetic images, seed 0"),
                        "profiles_vs_modelopt": calib_note},
        "profiles": {p: {"method": r.get("method"), "mixed_precision": r.get("mixed_precision"),
                         "float_nodes": [f.get("node") for f in r.get("float_nodes", [])],
                         "patch_guard": [k.get("tensor") for k in (r.get("patch_guard") or {}).get("kept_in_float", [])]}
                     for p, r in q.items()},
        "modelopt": modelopt_info, "skipped": skipped, "rows": rows, "times": times,
    }


# ----------------------------------------------------------------------------- report
def _pm(v: float) -> str:
    return f"{v:+.2f}"


def case_markdown(r: Dict[str, Any]) -> str:
    sets = r["image_sets"]
    lines = [f"## {r['case']} ({r['model']}, T={r['steps']})", "",
             f"{r['images']} held-out images ({', '.join(sets)}); accuracy against {r['labels']}. "
             f"Default budget `{r['default_budget']}` (thresholds {', '.join(f'{t:.4g}' for t in r['budget_thresholds'])}). "
             f"Calibration: {r['calibration']['glance_inputs']} glance inputs + {r['calibration']['focus_patches']} "
             f"patches at the policy's locations ({r['calibration']['source']}); the profiles' own calibration "
             f"against ModelOpt's: {r['calibration']['profiles_vs_modelopt']}.", "",
             "| graph set | accuracy per step (pooled) | final-step Δ per seed | final-step Δ pooled [lost/gained] "
             "| budget Δ per seed | budget Δ pooled [lost/gained] | exit agreement per seed (pooled) "
             "| backbone MACs in float (at budget) | glance graph in float |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        p, ps, m = row["pooled"], row["per_seed"], row["macs"]
        acc = " / ".join(f"{a:.2f}" for a in p["step_accuracy"])
        if row["graph_set"] == "fp32":
            lines.append(f"| {row['label']} | {acc} | - | final {p['final_accuracy']:.2f} | - | budget "
                         f"{p['budget_accuracy']:.2f} | - | {m['float_pct_at_budget']:.1f}% | {m['glance_float_pct']:.0f}% |")
            continue
        fin = " / ".join(_pm(ps[s]["final_delta"]) for s in sets)
        bud = " / ".join(_pm(ps[s]["budget_delta"]) for s in sets)
        ex = " / ".join(f"{ps[s]['exit_agreement']:.1f}" for s in sets)
        lines.append(f"| {row['label']} | {acc} | {fin} | **{_pm(p['final_delta'])}** [{p['final_flips']['lost']}/"
                     f"{p['final_flips']['gained']}] | {bud} | **{_pm(p['budget_delta'])}** [{p['budget_flips']['lost']}/"
                     f"{p['budget_flips']['gained']}] | {ex} ({p['exit_agreement']:.1f}%) | "
                     f"{m['float_pct_at_budget']:.1f}% | {m['glance_float_pct']:.0f}% |")
    lines += ["", "Exit disagreements by the step whose exit decision differs (pooled; images that left at that "
              "step in one graph set and not the other / images both reached it):", ""]
    for row in r["rows"]:
        if row["graph_set"] != "fp32" and "exit_decision_flips" in row["pooled"]:
            lines.append(f"- {row['label']}: " + ", ".join(f"step {d['step']}: {d['flips']} / {d['reached']}"
                                                           for d in row["pooled"]["exit_decision_flips"]))
    lines.append("")
    for name, why in r["skipped"].items():
        lines.append(f"- `{name}` skipped: {why}")
    for name, info in r["modelopt"].items():
        lines.append(f"- `{name}`: ModelOpt {info.get('modelopt')}, calibration_method={info.get('method')}, "
                     f"calibration_eps={info.get('calibration_eps')}, other settings default; "
                     f"{info.get('seconds')} s per graph")
    for prof, info in r["profiles"].items():
        guard = info.get("patch_guard") or []
        lines.append(f"- gfnet-edge `{prof}` profile: method {info['method']}; {info['mixed_precision']}; "
                     f"kept in float by the search: {', '.join(map(str, info['float_nodes'])) or 'nothing'}"
                     + (f"; by the patch guard, the readers of {len(guard)} glance tensors: {', '.join(guard)}"
                        if guard else ""))
    return "\n".join(lines) + "\n"


def markdown(results: Dict[str, Any]) -> str:
    head = ["# INT8: gfnet-edge quantization profiles vs NVIDIA ModelOpt ONNX PTQ", "",
            f"Command: `{results['command']}`", "", f"Machine: {results['machine']}; ONNX Runtime "
            f"{results['onnxruntime']} (CPU) runs every graph set through `gfnet_edge.Runtime`.", "",
            f"Wall time: {results['wall_s']:.0f} s for this invocation; {results['compute_s']:.0f} s to compute "
            "every cached piece it used (builds, ModelOpt, traces) when they were first made.", "",
            "Δ = graph set minus FP32, in points, on the same images (negative: INT8 is worse); "
            "[lost/gained] = images FP32 classified right and the graph set wrong / the reverse. "
            "Exit agreement: share of images leaving at the same step as FP32 at the default budget. "
            "Backbone MACs in float: multiply-adds of Conv / Gemm / MatMul nodes whose data input or "
            "weight is not fed by a DequantizeLinear, weighted by how often each graph ran at the budget.", ""]
    return "\n".join(head) + "\n" + "\n".join(case_markdown(r) for r in results["cases"])


# ----------------------------------------------------------------------------- CLI
def _seeds(text: str) -> Tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 1:
        raise argparse.ArgumentTypeError(f"--seeds: distinct integers >= 1 needed (seed 0 made the training "
                                         f"and calibration images), got {text!r}")
    return seeds


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "gfnet_edge" / "int8_compare",
                    help="folder of the cached pieces (bundles, ModelOpt graphs, traces)")
    ap.add_argument("--results", type=Path, default=None,
                    help="markdown report (default bench/results/int8_compare.md; JSON beside it)")
    ap.add_argument("--modelopt-python", default=os.environ.get("MODELOPT_PYTHON"),
                    help="Python of an environment with nvidia-modelopt[onnx] (default $MODELOPT_PYTHON); "
                         "without it the ModelOpt arms are skipped")
    ap.add_argument("--seeds", type=_seeds, default=DEFAULT_SEEDS, help="demo generator seeds of the held-out sets")
    ap.add_argument("--per-seed", type=_positive, default=1000, help="demo images per seed")
    ap.add_argument("--imagenet-model", default="mobilenetv3_large_100",
                    help="released variant for the random-weight run ('none' to leave it out)")
    ap.add_argument("--imagenet-per-seed", type=_positive, default=250, help="synthetic images per seed")
    ap.add_argument("--imagenet-search", action="store_true",
                    help="run the profiles' mixed-precision search on the random-weight model too")
    ap.add_argument("--demo-calib", choices=("demo", "demo:train"), default="demo",
                    help="the demo's calibration images: its validation split (default, as build-engine) or its "
                         "train split (10000 images: room for --num-calib up to 9744; the model trained on the first 5000)")
    ap.add_argument("--num-calib", type=_positive, default=256,
                    help="demo calibration images, the same for every arm (default 256; the tensorrt profile "
                         "fine-tunes from 2000)")
    ap.add_argument("--threads", type=_positive, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="demo model only, gfnet-edge arms only, tiny image counts, no mixed-precision search")
    return ap.parse_args(argv)


def cases(a: argparse.Namespace) -> List[Case]:
    if a.quick:
        return [Case("demo", Kind.DEMO, a.seeds[:2], min(a.per_seed, 12), num_calib=32, num_eval=0, search=False)]
    out = [Case("demo", Kind.DEMO, a.seeds, a.per_seed, num_calib=a.num_calib, demo_calib=a.demo_calib)]
    if a.imagenet_model != "none":
        # random weights give near-uniform outputs: an accuracy-driven search would chase noise
        # (and take hours on 2 cores), so the profiles run with every layer they quantize in INT8
        out.append(Case(a.imagenet_model, Kind.IMAGENET, a.seeds[:2], a.imagenet_per_seed, search=a.imagenet_search))
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.imagenet_model != "none":
        from gfnet_edge.variants import released_spec

        try:
            released_spec(a.imagenet_model, 96)
        except (KeyError, ValueError) as exc:
            print(f"error: --imagenet-model {a.imagenet_model!r}: {exc}", file=sys.stderr)
            return 2
    results_md = a.results or (a.work / "int8_compare.md" if a.quick else ROOT / "bench" / "results" / "int8_compare.md")
    st = Settings(a.work, a.threads, a.modelopt_python, a.quick)
    try:
        import torch

        torch.set_num_threads(a.threads)
        a.work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: --work {a.work}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out = [run_case(c, st) for c in cases(a)]
    import onnxruntime

    def compute_s(times: Dict[str, Any]) -> float:
        return sum(v if isinstance(v, (int, float)) else sum(v.values()) for v in times.values())

    cmd = "python3 bench/int8_compare.py" + (" --quick" if a.quick else "") + (
        " --modelopt-python PYTHON" if a.modelopt_python else "") + (
        f" --seeds {','.join(map(str, a.seeds))} --per-seed {a.per_seed}" if not a.quick else "") + (
        f" --demo-calib {a.demo_calib}" if a.demo_calib != "demo" else "") + (
        f" --num-calib {a.num_calib}" if a.num_calib != 256 else "") + (
        f" --imagenet-model {a.imagenet_model}" if a.imagenet_model != "mobilenetv3_large_100" else "")
    results = {"command": cmd, "machine": machine(), "onnxruntime": onnxruntime.__version__,
               "wall_s": round(time.perf_counter() - t0, 1),
               "compute_s": round(sum(compute_s(c["times"]) for c in out), 1), "cases": out}
    md = markdown(results)
    results_md.parent.mkdir(parents=True, exist_ok=True)
    results_md.write_text(md)
    results_md.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(md)
    _log(f"wrote {results_md} and {results_md.with_suffix('.json')} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
