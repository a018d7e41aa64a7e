"""``quantize_model``: calibrate, insert Q/DQ, check, and keep the most harmful layers in float.

Flow for one profile:

1. both FP32 graphs go through ``quant_pre_process``;
2. ONNX Runtime calibrates each graph on its own inputs (glance inputs / policy patches) and
   inserts Q/DQ (:mod:`.qdq`); calibration ranges are cached, so later variants cost no
   calibration;
3. every graph written is checked (:func:`~.checker.check_tensorrt_compat`); a violation
   raises :class:`~.checker.TensorRTCompatError`;
4. the INT8 pair is traced through the runtime on held-out images and compared with the FP32
   pair; while the final-step accuracy drop exceeds ``max_accuracy_drop``, the mixed-precision
   search measures, for each weighted node (Conv / Gemm / MatMul) of either graph, the effect
   of keeping that node alone in float, then keeps nodes in float greedily, most harmful first,
   re-measuring after each, until the drop is within bounds (or ``max_float_nodes`` is reached).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple, Union

import numpy as np

from gfnet_edge.log import logger

from .calibration import CalibrationData, check_images
from .checker import TensorRTCompatError, check_tensorrt_compat
from .options import QuantizeOptions, ort_settings
from .qdq import preprocess, quantize_graph, quantized_node_names, weighted_nodes
from .scoring import Traced, compare, trace

GRAPHS = ("glance", "focus")


@dataclass
class QuantizationResult:
    """Output of :func:`quantize_model`.

    Attributes:
        graphs: ``{"glance": path, "focus": path}`` of the quantized graphs.
        report: JSON-serialisable summary (also written to ``out_dir/quantization.json``).
    """

    graphs: Dict[str, Path]
    report: Dict[str, Any] = field(default_factory=dict)


def _manifest(model) -> Dict[str, Any]:
    if isinstance(model, Mapping):
        return dict(model)
    from gfnet_edge.export import manifest_model

    return manifest_model(model)


class _Session:
    """Quantizes graph variants (cached by excluded set) and scores graph pairs."""

    def __init__(self, manifest, fp32: Dict[str, Path], heads, calib: CalibrationData, work: Path,
                 opts: QuantizeOptions, progress: bool) -> None:
        self.manifest, self.fp32, self.heads, self.calib = manifest, fp32, heads, calib
        self.work, self.opts, self.progress = work, opts, progress
        self.settings = ort_settings(opts)
        self.pre: Dict[str, Path] = {}
        self.pre_problems: Dict[str, Optional[str]] = {}
        self.variants: Dict[Tuple[str, FrozenSet[str]], Path] = {}
        self.info: Dict[Tuple[str, FrozenSet[str]], Dict[str, Any]] = {}
        self.checks: Dict[str, List[str]] = {}
        self.calib_seconds: Dict[str, float] = {}
        self._count = 0
        for g in GRAPHS:
            self.pre[g], self.pre_problems[g] = preprocess(Path(fp32[g]), work / f"{g}.pre.onnx")

    def quantized(self, graph: str, excluded: FrozenSet[str] = frozenset()) -> Path:
        key = (graph, frozenset(excluded))
        if key in self.variants:
            return self.variants[key]
        self._count += 1
        path = self.work / f"{graph}.int8.{self._count:03d}.onnx"
        cache = self.work / f"{graph}.calibration.json"
        first = not cache.is_file()
        reader = self.calib.reader(graph, self.opts.batch_size, progress=self.progress and first)
        t0 = time.perf_counter()
        self.info[key] = quantize_graph(self.pre[graph], path, reader, self.settings, self.opts.resolved_method,
                                        self.opts.profile, sorted(excluded), cache)
        if first:
            self.calib_seconds[graph] = round(time.perf_counter() - t0, 2)
        violations = check_tensorrt_compat(path, self.opts.profile)
        self.checks[path.name] = violations
        if violations:
            raise TensorRTCompatError(f"{graph} graph ({self.opts.profile} profile, {path})", violations)
        self.variants[key] = path
        return path

    def discard(self, graph: str, excluded: FrozenSet[str]) -> None:
        """Deletes a variant no longer needed (the all-INT8 one is kept); saves disk on big models."""
        key = (graph, frozenset(excluded))
        if key[1] and key in self.variants:
            self.variants.pop(key).unlink(missing_ok=True)

    def score(self, graphs: Dict[str, Path], images: np.ndarray) -> Traced:
        return trace(self.manifest, graphs, self.heads, images, self.opts.threads, self.opts.batch_size)


def _held_out(calib: CalibrationData, opts: QuantizeOptions, eval_images, eval_labels):
    """Returns (calibration set, eval images, eval labels, description)."""
    if eval_images is not None:
        return calib, eval_images, eval_labels, "given"
    if calib.images is None:
        return calib, None, None, "none (calibration data has no source images)"
    n = calib.num_images
    k = int(round(n * opts.eval_fraction))
    from .calibration import MIN_CALIB_IMAGES

    if k < opts.min_eval or n - k < MIN_CALIB_IMAGES:
        return calib, None, None, (f"none ({n} calibration images are too few to hold out {opts.min_eval} "
                                   f"and keep {MIN_CALIB_IMAGES})")
    idx = np.random.default_rng(opts.seed).permutation(n)
    held, kept = np.sort(idx[:k]), np.sort(idx[k:])
    return (calib.subset(kept), calib.images[held], None if calib.labels is None else calib.labels[held],
            f"{k} of the {n} calibration images (not calibrated on)")


def quantize_model(model, fp32_graphs: Mapping[str, Union[str, Path]], heads_path, calib: CalibrationData,
                   out_dir: Union[str, Path], opts: Optional[QuantizeOptions] = None,
                   eval_images: Optional[np.ndarray] = None, eval_labels: Optional[np.ndarray] = None,
                   progress: bool = True) -> QuantizationResult:
    """INT8 post-training quantization of a GFNet's glance and focus graphs.

    Args:
        model: the ``GFNet`` (or its manifest ``model`` entry, see
            :func:`gfnet_edge.export.manifest_model`).
        fp32_graphs: ``{"glance": path, "focus": path}`` exported FP32 graphs.
        heads_path: ``heads.npz`` of the same model (or its arrays).
        calib: :class:`CalibrationData` (glance inputs and policy-location patches).
        out_dir: where ``glance.onnx``, ``focus.onnx`` and ``quantization.json`` are written.
        opts: :class:`QuantizeOptions`.
        eval_images: held-out normalised images (N, 3, S, S) for the accuracy check and the
            mixed-precision search; default: ``opts.eval_fraction`` of the calibration images.
        eval_labels: their labels; without labels accuracy is measured against the FP32
            predictions (agreement), which is stricter.
        progress: progress bars.

    Returns:
        :class:`QuantizationResult`.

    Raises:
        TensorRTCompatError: a written graph breaks TensorRT's rules.
        ValueError: bad options or images.
    """
    opts = (opts or QuantizeOptions()).validate()
    t_start = time.perf_counter()
    manifest = _manifest(model)
    S = int(manifest["image_size"])
    fp32 = {g: Path(fp32_graphs[g]) for g in GRAPHS}
    for g, p in fp32.items():
        if not p.is_file():
            raise ValueError(f"{g} graph {p}: no such file")
    if not isinstance(calib, CalibrationData):
        raise ValueError(f"calib must be CalibrationData, got {type(calib).__name__}")
    calib, eval_x, eval_y, held_desc = _held_out(calib, opts, eval_images, eval_labels)
    if calib.num_images > opts.num_calib:
        calib = calib.subset(np.arange(opts.num_calib))
    if eval_x is not None:
        eval_x = check_images(eval_x, S, min_images=1, what="evaluation images")
        if eval_y is not None:
            eval_y = np.asarray(eval_y).reshape(-1)
            if eval_y.shape[0] != eval_x.shape[0]:
                raise ValueError(f"{eval_y.shape[0]} evaluation labels for {eval_x.shape[0]} images")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work" if opts.keep_work else Path(tempfile.mkdtemp(prefix="gfnet-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        sess = _Session(manifest, fp32, heads_path, calib, work, opts, progress)
        report = _run(sess, eval_x, eval_y, held_desc)
        graphs = {}
        for g in GRAPHS:
            dst = out_dir / f"{g}.onnx"
            shutil.copyfile(report.pop(f"_{g}_path"), dst)
            violations = check_tensorrt_compat(dst, opts.profile)
            if violations:  # pragma: no cover - the same file was checked when written
                raise TensorRTCompatError(str(dst), violations)
            graphs[g] = dst
    finally:
        if not opts.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["checker"] = {g: {"file": graphs[g].name, "violations": check_tensorrt_compat(graphs[g], opts.profile),
                             "rules": opts.profile} for g in GRAPHS}
    (out_dir / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
    return QuantizationResult(graphs, report)


def _run(sess: _Session, eval_x, eval_y, held_desc: str) -> Dict[str, Any]:
    opts = sess.opts
    base = {g: sess.quantized(g) for g in GRAPHS}
    report: Dict[str, Any] = {
        "profile": opts.profile,
        "method": opts.resolved_method,
        "percentile": opts.percentile if opts.resolved_method == "percentile" else None,
        "options": opts.to_dict(),
        "onnxruntime_settings": sess.settings.to_dict(),
        "calibration": {"source": sess.calib.source, **sess.calib.sizes(), "seconds": sess.calib_seconds},
        "preprocess": {g: ("quant_pre_process" if sess.pre_problems[g] is None else f"skipped: {sess.pre_problems[g]}")
                       for g in GRAPHS},
        "placement": {g: sess.info[(g, frozenset())] for g in GRAPHS},
        "held_out": held_desc,
        "weighted_nodes": {g: len(weighted_nodes(_load(sess.pre[g]))) for g in GRAPHS},
    }
    excluded: Dict[str, FrozenSet[str]] = {g: frozenset() for g in GRAPHS}
    if eval_x is None:
        report.update({"accuracy": None, "float_nodes": [], "sensitivity": [],
                       "mixed_precision": "skipped: no held-out images"})
        report.update({f"_{g}_path": str(base[g]) for g in GRAPHS})
        return report
    ref = sess.score(sess.fp32, eval_x)
    cur = compare(ref, sess.score(base, eval_x), eval_y)
    report["accuracy_all_int8"] = cur
    target = opts.max_accuracy_drop
    float_nodes: List[Dict[str, Any]] = []
    sensitivity: List[Dict[str, Any]] = []

    def met(r: Dict[str, Any]) -> bool:
        ok = target is None or r["final_drop"] <= target
        if opts.min_exit_agreement is not None:
            ok = ok and r["exit"]["agreement"] >= opts.min_exit_agreement
        return ok

    searching = target is not None or opts.min_exit_agreement is not None
    if searching and not met(cur):
        sensitivity = _sensitivity(sess, ref, cur, eval_x, eval_y)
        for cand in sensitivity:
            if met(cur) or len(float_nodes) >= opts.max_float_nodes:
                break
            g = cand["graph"]
            members = frozenset(cand.get("members") or [cand["node"]])
            if members <= excluded[g]:
                continue  # already in float (inside a graph kept in float)
            trial_ex = {**excluded, g: excluded[g] | members}
            trial = compare(ref, sess.score({h: sess.quantized(h, trial_ex[h]) for h in GRAPHS}, eval_x), eval_y)
            helped = trial["final_drop"] < cur["final_drop"] or trial["kl_final"] < cur["kl_final"]
            slow = None
            if helped and opts.profile == "cpu":
                slow = _slowdown(sess, base[g], sess.quantized(g, trial_ex[g]))
                helped = slow <= opts.max_slowdown
            entry = {"graph": g, "node": cand["node"], "op_type": cand["op_type"],
                     **({"members": len(members)} if len(members) > 1 else {}),
                     "reason": (f"most harmful remaining node: alone in float it cut the final-step KL to FP32 by "
                                f"{cand['kl_reduction']:.4g} and the accuracy drop by {cand['drop_reduction']:.3g} points"),
                     "drop_before": cur["final_drop"], "drop_after": trial["final_drop"],
                     "kl_before": cur["kl_final"], "kl_after": trial["kl_final"],
                     "exit_agreement_before": cur["exit"]["agreement"], "exit_agreement_after": trial["exit"]["agreement"],
                     "kept": bool(helped), **({"latency_vs_all_int8": round(slow, 3)} if slow is not None else {})}
            if helped:
                sess.discard(g, excluded[g])
                excluded = trial_ex
                cur = trial
                float_nodes.append(entry)
            else:
                sess.discard(g, trial_ex[g])
                entry["reason"] = ("no gain when added to the nodes already in float; left in INT8" if slow is None
                                   or slow <= opts.max_slowdown else
                                   f"in float the {g} graph runs {slow:.2f}x the all-INT8 latency "
                                   f"(> max_slowdown {opts.max_slowdown}); left in INT8")
                report.setdefault("rejected_candidates", []).append(entry)
        goal = _goal(opts)
        report["mixed_precision"] = (f"target met ({goal})" if met(cur) else
                                     f"target NOT met ({goal}): drop {cur['final_drop']}, exit agreement "
                                     f"{cur['exit']['agreement']}% with {len(float_nodes)} node(s) in float "
                                     f"(max_float_nodes={opts.max_float_nodes})")
        if not met(cur):
            logger.warning("INT8 %s: %s", opts.profile, report["mixed_precision"])
    else:
        report["mixed_precision"] = (f"not needed: all-INT8 within target ({_goal(opts)})" if searching
                                     else "disabled (max_accuracy_drop=None)")
    report["accuracy"] = cur
    report["float_nodes"] = float_nodes
    report["sensitivity"] = sensitivity
    report.update({f"_{g}_path": str(sess.quantized(g, excluded[g])) for g in GRAPHS})
    return report


def _slowdown(sess: _Session, base: Path, trial: Path) -> float:
    """Batch-1 latency of ``trial`` over ``base`` (10th percentiles, interleaved, 1 thread)."""
    from .timing import time_graphs

    t = time_graphs({"base": base, "trial": trial}, int(sess.manifest["patch_size"]), rounds=3, iters=20, warmup=5)
    return t["trial"]["p10_ms"] / t["base"]["p10_ms"]


def _goal(opts: QuantizeOptions) -> str:
    parts = []
    if opts.max_accuracy_drop is not None:
        parts.append(f"final-step drop <= {opts.max_accuracy_drop}")
    if opts.min_exit_agreement is not None:
        parts.append(f"mid-budget exit agreement >= {opts.min_exit_agreement}%")
    return " and ".join(parts)


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def _sensitivity(sess: _Session, ref: Traced, base: Dict[str, Any], eval_x, eval_y) -> List[Dict[str, Any]]:
    """Effect of keeping each candidate alone in float, most harmful first.

    Candidates: every weighted node of either graph, and each whole graph (all its quantized
    nodes: that graph then has no Q/DQ at all and runs in float / FP16). GFNet runs the glance
    graph once per image and the focus graph up to T-1 times, so keeping the glance graph in float
    costs at most 1/T of the INT8 speed-up and is often what its exit decisions need.
    """
    opts = sess.opts
    cands = [(g, name, op, None) for g in GRAPHS for name, op in weighted_nodes(_load(sess.pre[g]))]
    proxy: Dict[Tuple[str, str], float] = {}
    if len(cands) > opts.max_candidates:
        proxy = _local_errors(sess)
        cands.sort(key=lambda c: -proxy.get((c[0], c[1]), 0.0))
        cands = cands[:opts.max_candidates]
    for g in GRAPHS:
        pre = _load(sess.pre[g])
        members = sorted(quantized_node_names(pre, sess.settings.op_types_to_quantize, ()))
        cands.append((g, f"(whole {g} graph)", "graph", members))
    bar = None
    if sess.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cands), desc=f"layer sensitivity ({opts.profile})", leave=False)
    out = []
    for g, name, op, members in cands:
        ex = frozenset(members or [name])
        graphs = {h: sess.quantized(h, ex) if h == g else sess.quantized(h) for h in GRAPHS}
        r = compare(ref, sess.score(graphs, eval_x), eval_y)
        sess.discard(g, ex)
        out.append({"graph": g, "node": name, "op_type": op, **({"members": members} if members else {}),
                    "final_drop": r["final_drop"], "kl_final": r["kl_final"],
                    "exit_agreement": r["exit"]["agreement"],
                    "drop_reduction": round(base["final_drop"] - r["final_drop"], 3),
                    "kl_reduction": base["kl_final"] - r["kl_final"],
                    **({"local_error": proxy[(g, name)]} if (g, name) in proxy else {})})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out.sort(key=lambda e: (-e["kl_reduction"], -e["drop_reduction"]))
    return out


def _local_errors(sess: _Session, n: int = 32) -> Dict[Tuple[str, str], float]:
    """Cheap proxy: relative error of each weighted node's output in the all-INT8 graph vs FP32."""
    import onnx
    import onnxruntime as ort

    from gfnet_edge.runtime.backends.onnxruntime import session_options

    errs: Dict[Tuple[str, str], float] = {}
    for g in GRAPHS:
        x = sess.calib.inputs(g)[:n]
        nodes = weighted_nodes(_load(sess.pre[g]))
        outs = {}
        pre = _load(sess.pre[g])
        name_to_out = {nd.name: nd.output[0] for nd in pre.graph.node}
        tensors = [name_to_out[nm] for nm, _ in nodes]
        for tag, path in (("fp32", sess.pre[g]), ("int8", sess.quantized(g))):
            m = _load(path)
            have = {o.name for o in m.graph.output}
            produced = {o for nd in m.graph.node for o in nd.output}
            for t in tensors:
                if t not in have and t in produced:
                    m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
            s = ort.InferenceSession(m.SerializeToString(), session_options(sess.opts.threads),
                                     providers=["CPUExecutionProvider"])
            names = [o.name for o in s.get_outputs()]
            res = s.run(None, {"image": x})
            outs[tag] = dict(zip(names, res))
        for (nm, _), t in zip(nodes, tensors):
            a, b = outs["fp32"].get(t), outs["int8"].get(t)
            if a is None or b is None or a.shape != b.shape:
                continue
            errs[(g, nm)] = float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-12))
    return errs
