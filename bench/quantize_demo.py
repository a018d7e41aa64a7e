"""Figures of the INT8 quantization on the demo GFNet (cluttered digits).

``python3 bench/quantize.py`` (which calls :func:`run` and :func:`markdown` here) reproduces them:

* ``tensorrt``-profile INT8 (run in ONNX Runtime) vs FP32 on the test split: anytime accuracy per
  step, final-step drop, and exit-step agreement at a mid budget (thresholds fitted on the FP32
  validation probabilities with ``exit_fractions(p=1)``: equal exit fractions per step, applied
  unchanged to both precisions);
* the same for the ``cpu`` profile, and the batch-1 latency of FP32 / INT8 backbones in ONNX
  Runtime, measured interleaved in the same run;
* policy-location calibration vs random-crop calibration (no mixed precision: all INT8 but the
  profile's patch guard, whose glance nodes are the same for both, so the calibration data is the
  only difference), for each calibration method.

Everything is scored through the runtime driver (``trace_graphs``): the C++ heads, the ONNX
Runtime backbones, the same code a deployment runs. ``inputs="frames"`` (the default, ``--input
frames``) traces the uint8 frames, normalised inside the runtime as ``Runtime.predict`` and
``gfnet-edge predict`` take them, and gives the mixed-precision search frames as ``build-engine``
does; ``"images"`` traces float images normalised beforehand, which an INT8 graph can round
differently near a quantization step. Calibration, the focus-patch fidelity and the FP32
stability reference use normalised images either way.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar"
GRAPHS = ("glance", "focus")


def _default_checkpoint() -> Path:
    try:
        import gfnet_edge

        p = Path(gfnet_edge.__file__).resolve().parent / "assets" / "demo_gfnet.pth.tar"
        if p.is_file():
            return p
    except Exception:  # noqa: BLE001
        pass
    return DEFAULT_CHECKPOINT


def _split(name: str, n: Optional[int], model=None):
    """A demo split's uint8 frames and labels, generated with the config the model was trained on
    (its checkpoint records it)."""
    from gfnet_edge.data import ClutteredDigits, demo_config

    frames, labels = ClutteredDigits(name, config=demo_config(model) if model is not None else None).arrays(progress=True)
    if n is not None:
        frames, labels = frames[:n], labels[:n]
    return frames, labels


def run(checkpoint: Path, out: Path, num_calib: int = 256, num_eval: int = 744, test_size: Optional[int] = None,
        method: str = "auto", profiles=("tensorrt", "cpu"), compare_methods=("entropy", "max", "percentile"),
        p: float = 1.0, threads: Optional[int] = 2, timing: bool = True, timing_rounds: int = 7,
        progress: bool = True, fidelity_images: int = 500, min_exit_agreement: Optional[float] = 98.0,
        max_float_nodes: int = 8, inputs: str = "frames") -> Dict[str, Any]:
    """Computes every figure; returns them as a JSON-serialisable dict. ``inputs``: what is
    traced and searched on, ``"frames"`` (uint8, normalised inside the runtime) or ``"images"``
    (normalised beforehand)."""
    import torch

    from gfnet_edge import evaluate as ev
    from gfnet_edge.data import normalize
    from gfnet_edge.export import export_model, manifest_model
    from gfnet_edge.models import load_checkpoint

    from gfnet_edge.model_desc import as_desc
    from gfnet_edge.quantize import QuantCalibrationSet, QuantizeOptions, quantize_model
    from gfnet_edge.quantize.scoring import compare, trace
    from gfnet_edge.quantize.timing import time_graphs

    t_start = time.perf_counter()
    torch.set_num_threads(threads or 2)
    out.mkdir(parents=True, exist_ok=True)
    model = load_checkpoint(checkpoint)
    man = as_desc(manifest_model(model))
    T = model.spec.steps
    paths = export_model(model, out / "fp32")
    fp32 = {g: paths[g] for g in ("glance", "focus")}
    heads = paths["heads"]

    if inputs not in ("frames", "images"):
        raise ValueError(f"inputs must be 'frames' or 'images', got {inputs!r}")
    val_f, val_y = _split("val", None, model)
    test_f, test_y = _split("test", test_size, model)
    if len(val_f) < num_calib + num_eval:
        raise ValueError(f"val split has {len(val_f)} images; {num_calib} + {num_eval} needed")
    # traced and searched on: uint8 frames (normalised inside the runtime) or normalised images
    val_x, test_x = (val_f, test_f) if inputs == "frames" else (normalize(val_f), normalize(test_f))
    test_img = test_x if inputs == "images" else normalize(test_f)
    cal_x, cal_y = normalize(val_f[:num_calib]), val_y[:num_calib]
    ev_x, ev_y = val_x[num_calib:num_calib + num_eval], val_y[num_calib:num_calib + num_eval]

    def tr(graphs, x):
        return trace(man, graphs, heads, x, threads, 64)

    ref_val = tr(fp32, val_x)
    ref_test = tr(fp32, test_x)
    ref_img = ref_test if inputs == "images" else tr(fp32, test_img)  # the stability reference
    costs = [float(c) for c in _macs(model)]
    thr = ev.fit_thresholds(ref_val.probs, ev.exit_fractions(p, T))
    from gfnet_edge.data import ClutteredDigits, demo_config

    res: Dict[str, Any] = {
        "checkpoint": str(checkpoint), "model": model.spec.model_name, "steps": T, "input": inputs,
        "data_config_key": ClutteredDigits("test", config=demo_config(model)).config.key(),
        "splits": {"calibration": f"val[0:{num_calib}]", "search": f"val[{num_calib}:{num_calib + num_eval}]",
                   "thresholds": f"val (all {len(val_x)}, FP32 probabilities)", "test": f"test ({len(test_x)})"},
        "mid_budget": {"p": p, "fractions": [float(q) for q in ev.exit_fractions(p, T)],
                       "thresholds": [float(t) for t in thr]},
        "fp32": {"test_accuracy": [round(float(a), 3) for a in ev.anytime_accuracy(ref_test.probs, test_y)],
                 "budget_accuracy": _budget(ref_test.probs, test_y, costs, thr)},
        "profiles": {}, "calibration_comparison": [],
    }
    # how stable is the FP32 model itself? (imperceptible input changes, same thresholds)
    rng = np.random.default_rng(0)
    std = float(np.mean(model.spec.std))
    perturb = {"gaussian noise, std 1/255 (one uint8 level)":
               test_img + (rng.standard_normal(test_img.shape) / 255.0 / std).astype(np.float32),
               "image shifted right by 1 px": np.roll(test_img, 1, axis=3)}
    res["fp32_stability"] = {}
    for name, xp in perturb.items():
        c = compare(ref_img, tr(fp32, xp), test_y, fit_probs=ref_val.probs, p=p)
        res["fp32_stability"][name] = {"prediction_agreement": c["prediction_agreement"], "exit_agreement":
                                       c["exit"]["agreement"], "coords_agreement": c["coords_agreement"],
                                       "kl_final": c["kl_final"], "accuracy": c["accuracy_int8"]}
    del perturb, ref_img
    policy = QuantCalibrationSet.from_model(model, cal_x, cal_y, progress=progress)
    random = QuantCalibrationSet.random_crops(model, cal_x, cal_y, seed=0, progress=progress)
    # what the focus graph sees in deployment: patches at the policy's locations on test images
    test_patches = QuantCalibrationSet.from_model(model, test_img[:fidelity_images], progress=progress).focus
    del test_img
    ref_patch_out = _run_graph(fp32, test_patches, threads)

    # ---- main results: each profile with the accuracy-driven mixed precision
    for prof in profiles:
        # the exit-agreement target applies to the tensorrt profile; the cpu profile is about
        # speed (a float graph there would cost the >= 1.3x), so it gets the accuracy target only
        opts = QuantizeOptions(profile=prof, method=method, num_calib=num_calib, max_accuracy_drop=0.5,
                               min_exit_agreement=min_exit_agreement if prof == "tensorrt" else None,
                               max_float_nodes=max_float_nodes, threads=threads)
        r = quantize_model(model, fp32, heads, policy, out / f"int8-{prof}", opts, eval_images=ev_x,
                           eval_labels=ev_y, progress=progress)
        q_test = tr(r.graphs, test_x)
        cmp = compare(ref_test, q_test, test_y, fit_probs=ref_val.probs, p=p)
        res["profiles"][prof] = {
            "graphs": {g: str(v) for g, v in r.graphs.items()},
            "test": cmp,
            "budget_accuracy_int8": _budget(q_test.probs, test_y, costs, thr),
            "search": {"held_out": r.report["held_out"], "all_int8": _brief(r.report.get("accuracy_all_int8")),
                       "final": _brief(r.report.get("accuracy")), "mixed_precision": r.report["mixed_precision"],
                       "rejected": r.report.get("rejected_candidates", []),
                       "float_nodes": r.report["float_nodes"], "top_sensitivity": r.report["sensitivity"][:8]},
            "checker": r.report["checker"],
            "quantize_seconds": r.report["seconds"],
        }
    # ---- policy-location vs random-crop calibration, all INT8 but the patch guard (the data is the only difference)
    for meth in compare_methods:
        for name, cal in (("policy", policy), ("random", random)):
            opts = QuantizeOptions(profile="tensorrt", method=meth, num_calib=num_calib, max_accuracy_drop=None,
                                   threads=threads)
            r = quantize_model(model, fp32, heads, cal, out / f"cmp-{meth}-{name}", opts, eval_images=ev_x[:64],
                               eval_labels=ev_y[:64], progress=progress)
            q_test = tr(r.graphs, test_x)
            c = compare(ref_test, q_test, test_y, fit_probs=ref_val.probs, p=p)
            fid = _fidelity(ref_patch_out, _run_graph(r.graphs, test_patches, threads))
            res["calibration_comparison"].append({
                "method": meth, "patches": name, "focus_fidelity": fid,
                "final_accuracy": c["accuracy_int8"][-1], "final_drop": c["final_drop"],
                "accuracy": c["accuracy_int8"], "kl_final": c["kl_final"], "prediction_agreement": c["prediction_agreement"],
                "coords_agreement": c["coords_agreement"], "exit_agreement": c["exit"]["agreement"],
            })
    # ---- calibration methods of the cpu profile (policy patches, all INT8): backs method="auto"
    for meth in compare_methods:
        opts = QuantizeOptions(profile="cpu", method=meth, num_calib=num_calib, max_accuracy_drop=None,
                               threads=threads)
        r = quantize_model(model, fp32, heads, policy, out / f"cmp-cpu-{meth}", opts, eval_images=ev_x[:64],
                           eval_labels=ev_y[:64], progress=progress)
        c = compare(ref_test, tr(r.graphs, test_x), test_y, fit_probs=ref_val.probs, p=p)
        res.setdefault("cpu_methods", []).append({
            "method": meth, "final_accuracy": c["accuracy_int8"][-1], "final_drop": c["final_drop"],
            "kl_final": c["kl_final"], "prediction_agreement": c["prediction_agreement"],
            "exit_agreement": c["exit"]["agreement"]})
    # ---- latency, batch 1, interleaved
    if timing:
        graphs = {"fp32/glance": fp32["glance"], "fp32/focus": fp32["focus"]}
        for prof in profiles:
            for g in ("glance", "focus"):
                graphs[f"int8-{prof}/{g}"] = Path(res["profiles"][prof]["graphs"][g])
        lat = time_graphs(graphs, model.spec.patch_size, batch=1, threads=1, rounds=timing_rounds)
        res["latency_batch1_threads1_ms"] = {k: round(v["median_ms"], 4) for k, v in lat.items()}
        res["latency_spread_ms"] = {k: [round(v["min_round_ms"], 4), round(v["max_round_ms"], 4)] for k, v in lat.items()}
        res["latency_p10_ms"] = {k: round(v["p10_ms"], 4) for k, v in lat.items()}
        speed = {}
        for prof in profiles:
            per = {g: lat[f"fp32/{g}"]["median_ms"] / lat[f"int8-{prof}/{g}"]["median_ms"] for g in ("glance", "focus")}
            full32 = lat["fp32/glance"]["median_ms"] + (T - 1) * lat["fp32/focus"]["median_ms"]
            full8 = lat[f"int8-{prof}/glance"]["median_ms"] + (T - 1) * lat[f"int8-{prof}/focus"]["median_ms"]
            p10_32 = lat["fp32/glance"]["p10_ms"] + (T - 1) * lat["fp32/focus"]["p10_ms"]
            p10_8 = lat[f"int8-{prof}/glance"]["p10_ms"] + (T - 1) * lat[f"int8-{prof}/focus"]["p10_ms"]
            speed[prof] = {**{g: round(v, 3) for g, v in per.items()}, "all_steps": round(full32 / full8, 3),
                           "all_steps_p10": round(p10_32 / p10_8, 3)}
        res["speedup_fp32_over_int8"] = speed
    res["cpu"] = _cpu_name()
    res["onnxruntime"] = _ort_version()
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def _run_graph(graphs: Dict[str, Path], x: np.ndarray, threads: Optional[int], batch: int = 64) -> Dict[str, np.ndarray]:
    """The focus graph's outputs on patches ``x``, run by the runtime's ONNX Runtime runner."""
    from gfnet_edge.runtime.backends.onnxruntime import OnnxRuntimeRunner

    outs: Dict[str, list] = {}
    with OnnxRuntimeRunner({g: Path(graphs[g]) for g in GRAPHS}, "custom", threads) as runner:
        for i in range(0, len(x), batch):
            for k, v in runner.run("focus", np.ascontiguousarray(x[i:i + batch])).items():
                outs.setdefault(k, []).append(np.array(v))
    return {k: np.concatenate(v) for k, v in outs.items()}


def _fidelity(ref: Dict[str, np.ndarray], out: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Relative L2 error and mean cosine similarity of each output vs FP32."""
    res = {}
    for k in ref:
        a = ref[k].reshape(len(ref[k]), -1).astype(np.float64)
        b = out[k].reshape(len(out[k]), -1).astype(np.float64)
        res[f"{k}_rel_error"] = float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-12))
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        res[f"{k}_cosine"] = float(cos.mean())
    return res


def _macs(model) -> List[int]:
    from gfnet_edge.models import count_step_macs

    return list(count_step_macs(model).cumulative)


def _budget(probs, labels, costs, thr) -> Dict[str, Any]:
    from gfnet_edge import evaluate as ev

    d = ev.dynamic_evaluate(probs, labels, costs, thr)
    return {"accuracy": round(d.accuracy, 3), "mean_macs": round(d.expected_cost), "exit_counts": d.exit_counts.tolist()}


def _brief(acc: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if acc is None:
        return None
    out = {k: acc[k] for k in ("n", "labels", "accuracy_fp32", "accuracy_int8", "final_drop", "kl_final")}
    out["exit_agreement"] = acc["exit"]["agreement"]
    return out


def _cpu_name() -> str:
    """The CPU with its speed-relevant vector flags and core count (``device_description``)."""
    from gfnet_edge.calibrate.latency import device_description

    d = device_description()
    flags = f", {', '.join(d['cpu_flags'])}" if d.get("cpu_flags") else ""
    return f"{d['cpu']} ({d['cores']} cores{flags})"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _float_summary(float_nodes: List[Dict[str, Any]]) -> str:
    if not float_nodes:
        return "none"
    return ", ".join(f["node"] if f["op_type"] == "graph" else f"{f['graph']}: `{f['node']}`" for f in float_nodes)


def markdown(res: Dict[str, Any]) -> str:
    """The results as a Markdown report."""
    from common import input_note

    T = res["steps"]
    L: List[str] = [f"# INT8 quantization of the demo GFNet ({res['model']})", ""]
    L.append(f"Cluttered-digits data generated with the model's own config (key {res.get('data_config_key')}). "
             f"Splits: calibration {res['splits']['calibration']}, mixed-precision search {res['splits']['search']}, "
             f"thresholds {res['splits']['thresholds']}, figures on {res['splits']['test']}. "
             f"ONNX Runtime {res['onnxruntime']} on {res['cpu']}. Run took {res['seconds']} s.")
    L.append("")
    L.append(f"Traced inputs (test and validation images, the search's held-out set): "
             f"{input_note(res.get('input', 'images'))}; the FP32 stability rows and the focus-patch errors use "
             "normalised images.")
    L.append("")
    L.append(f"Mid budget: p = {res['mid_budget']['p']} (exit fractions "
             f"{', '.join(f'{q:.3f}' for q in res['mid_budget']['fractions'])}), thresholds fitted on the FP32 "
             "validation probabilities and used unchanged for FP32 and INT8.")
    L.append("")
    L.append("## Accuracy (test split, evaluated with the runtime in ONNX Runtime)")
    L.append("")
    hdr = " | ".join(f"step {t}" for t in range(T))
    L.append(f"| graphs | {hdr} | final drop | exit agreement (mid budget) | budget accuracy | kept in float |")
    L.append("|---|" + "---|" * T + "---|---|---|---|")
    L.append(f"| FP32 | " + " | ".join(f"{a:.2f}" for a in res["fp32"]["test_accuracy"]) +
             f" | - | - | {res['fp32']['budget_accuracy']['accuracy']:.2f} | - |")
    for prof, r in res["profiles"].items():
        t = r["test"]
        L.append(f"| INT8 {prof} | " + " | ".join(f"{a:.2f}" for a in t["accuracy_int8"]) +
                 f" | {t['final_drop']:+.2f} | {t['exit']['agreement']:.2f}% | "
                 f"{r['budget_accuracy_int8']['accuracy']:.2f} | {_float_summary(r['search']['float_nodes'])} |")
    L.append("")
    for prof, r in res["profiles"].items():
        s = r["search"]
        a8 = s["all_int8"]
        L.append(f"**{prof}**: search on the held-out val images ({s['held_out']}): all-INT8 drop "
                 f"{a8['final_drop'] if a8 else 'n/a'} points, exit agreement {a8['exit_agreement'] if a8 else 'n/a'}% "
                 f"-> {s['mixed_precision']}.")
        for f in s["float_nodes"]:
            L.append(f"- kept in float: {f['graph']} `{f['node']}` ({f['op_type']}): drop {f['drop_before']} -> "
                     f"{f['drop_after']}, KL {f['kl_before']:.2e} -> {f['kl_after']:.2e}, exit agreement "
                     f"{f['exit_agreement_before']} -> {f['exit_agreement_after']} %")
        t = r["test"]
        fl = t["final_flips"]
        L.append(f"- test: {fl['lost']} images right in FP32 and wrong in INT8, {fl['gained']} the reverse "
                 f"(symmetric-noise scatter of the drop: ±{fl['drop_noise']:.2f} points)")
        L.append(f"- test: prediction agreement per step {t['prediction_agreement']} %, patch-location agreement "
                 f"{t['coords_agreement']} %, exit counts FP32 {t['exit']['fp32_exit_counts']} vs INT8 "
                 f"{t['exit']['int8_exit_counts']}; checker: "
                 + ", ".join(f"{g} {len(c['violations'])} violation(s)" for g, c in r["checker"].items()))
        L.append("")
    if res.get("fp32_stability"):
        L.append("## Reference: stability of the FP32 model itself (test split, same thresholds)")
        L.append("")
        L.append("| FP32 input change | prediction agreement per step | patch agreement | exit agreement | KL final |")
        L.append("|---|---|---|---|---|")
        for name, r in res["fp32_stability"].items():
            L.append(f"| {name} | {r['prediction_agreement']} % | {r['coords_agreement']} % | "
                     f"{r['exit_agreement']:.2f}% | {r['kl_final']:.2e} |")
        L.append("")
    if "latency_batch1_threads1_ms" in res:
        L.append("## Latency (ONNX Runtime, batch 1, 1 thread, median of interleaved rounds)")
        L.append("")
        L.append("| graph | median ms | round spread | 10th percentile ms |")
        L.append("|---|---|---|---|")
        for k, v in res["latency_batch1_threads1_ms"].items():
            lo, hi = res["latency_spread_ms"][k]
            L.append(f"| {k} | {v:.3f} | {lo:.3f} - {hi:.3f} | {res['latency_p10_ms'][k]:.3f} |")
        L.append("")
        for prof, s in res["speedup_fp32_over_int8"].items():
            L.append(f"- FP32 / INT8-{prof}: glance {s['glance']:.2f}x, focus {s['focus']:.2f}x, all {T} steps "
                     f"(glance + {T - 1} focus) {s['all_steps']:.2f}x (medians), {s['all_steps_p10']:.2f}x "
                     "(10th percentiles)")
        L.append("")
    L.append("## Calibration data: policy locations vs random crops (tensorrt profile, no search: all INT8 but the "
             "patch guard's glance nodes)")
    L.append("")
    L.append("Focus-graph error is measured on the patches the policy picks on test images (what the focus "
             "graph sees in deployment); the glance graphs of both rows are identical (same glance inputs).")
    L.append("")
    L.append("| method | patches | focus feature rel. error | focus policy-state rel. error | final accuracy | drop | "
             "KL(FP32 ‖ INT8) final | prediction agreement | patch agreement | exit agreement |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for c in res["calibration_comparison"]:
        f = c["focus_fidelity"]
        L.append(f"| {c['method']} | {c['patches']} | {f['feature_rel_error']:.4f} | {f['policy_state_rel_error']:.4f} | "
                 f"{c['final_accuracy']:.2f} | {c['final_drop']:+.2f} | "
                 f"{c['kl_final']:.2e} | {c['prediction_agreement'][-1]:.2f}% | "
                 f"{', '.join(f'{a:.1f}' for a in c['coords_agreement'])}% | {c['exit_agreement']:.2f}% |")
    L.append("")
    if res.get("cpu_methods"):
        L.append("## Calibration methods of the cpu profile (policy patches, all INT8)")
        L.append("")
        L.append("| method | final accuracy | drop | KL(FP32 ‖ INT8) final | prediction agreement | exit agreement |")
        L.append("|---|---|---|---|---|---|")
        for c in res["cpu_methods"]:
            L.append(f"| {c['method']} | {c['final_accuracy']:.2f} | {c['final_drop']:+.2f} | {c['kl_final']:.2e} | "
                     f"{c['prediction_agreement'][-1]:.2f}% | {c['exit_agreement']:.2f}% |")
        L.append("")
    return "\n".join(L)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/quantize_demo.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="demo checkpoint (default: the shipped one)")
    ap.add_argument("--out", type=Path, default=Path("runs/quantize_demo"), help="work / output folder")
    ap.add_argument("--md", type=Path, default=None, help="also write the Markdown report here")
    ap.add_argument("--num-calib", type=int, default=256)
    ap.add_argument("--num-eval", type=int, default=744,
                    help="held-out val images for the mixed-precision search (after the calibration ones)")
    ap.add_argument("--test-size", type=int, default=None, help="first N test images (default: the whole split)")
    ap.add_argument("--method", default="auto", choices=("auto", "entropy", "max", "percentile"))
    ap.add_argument("--compare-methods", default="entropy,max,percentile",
                    help="methods of the policy-vs-random calibration comparison ('' to skip)")
    ap.add_argument("--p", type=float, default=1.0, help="budget parameter of the mid budget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-exit-agreement", type=float, default=98.0,
                    help="second target of the mixed-precision search (percent of held-out images whose "
                         "mid-budget exit step matches FP32); negative: accuracy only")
    ap.add_argument("--max-float-nodes", type=int, default=8)
    from common import INPUT_HELP, INPUTS

    ap.add_argument("--input", choices=INPUTS, default="frames",
                    help=INPUT_HELP + "; the mixed-precision search's held-out images are given the same way")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    ckpt = a.checkpoint or _default_checkpoint()
    if not Path(ckpt).is_file():
        print(f"error: {ckpt}: no such checkpoint", file=sys.stderr)
        return 2
    res = run(Path(ckpt), a.out, a.num_calib, a.num_eval, a.test_size, a.method,
              compare_methods=tuple(m for m in a.compare_methods.split(",") if m), p=a.p, threads=a.threads,
              timing=not a.no_timing, progress=not a.quiet,
              min_exit_agreement=a.min_exit_agreement if a.min_exit_agreement >= 0 else None,
              max_float_nodes=a.max_float_nodes, inputs=a.input)
    md = markdown(res)
    (a.out / "results.md").write_text(md)
    if a.md:
        a.md.parent.mkdir(parents=True, exist_ok=True)
        a.md.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
