"""Accuracy-driven mixed precision: which weighted nodes stay in float.

While the held-out final-step accuracy drop exceeds ``max_accuracy_drop`` by more than
``drop_noise_z`` standard errors (or the exit agreement is under ``min_exit_agreement``),
:func:`search_mixed_precision` measures, for each weighted node (Conv / Gemm / MatMul) of either
graph and for each whole graph, the effect of keeping it alone in float, then keeps candidates in
float greedily, most harmful first, re-measuring after each, until the target is met (or
``max_float_nodes`` is reached).

The candidates are ranked first by a cheap local proxy when there are more than
``max_candidates``: the relative error of each weighted node's output in the all-INT8 graph
against FP32 on calibration inputs, collected with ONNX Runtime's ``qdq_loss_debug`` tools.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

import numpy as np

from gfnet_edge.log import logger

from .options import QuantizeOptions
from .qdq import quantized_node_names, weighted_nodes
from .scoring import Traced, compare
from .session import GRAPHS, QuantSession


@dataclass
class SearchResult:
    """Outcome of :func:`search_mixed_precision`.

    Attributes:
        graphs: the chosen quantized graphs, ``{"glance": path, "focus": path}`` (in the work folder).
        excluded: per graph, the node names kept in float.
        status: one line: whether the target was met, not needed, or the search was disabled.
        accuracy_all_int8: :func:`~.scoring.compare` of the starting pair: every node in INT8
            but the patch guard's (``None`` without held-out images).
        accuracy: the same for the chosen pair.
        float_nodes: the candidates kept in float, in the order chosen, with before / after figures.
        rejected: candidates tried and left in INT8, with the reason.
        sensitivity: every candidate's effect alone in float, most harmful first.
        int8_mac_share: share (0..1) of the backbone multiply-adds per image run in INT8 (the
            focus graph counted T-1 times).
    """

    graphs: Dict[str, Path]
    excluded: Dict[str, FrozenSet[str]]
    status: str
    accuracy_all_int8: Optional[Dict[str, Any]] = None
    accuracy: Optional[Dict[str, Any]] = None
    float_nodes: List[Dict[str, Any]] = field(default_factory=list)
    rejected: List[Dict[str, Any]] = field(default_factory=list)
    sensitivity: List[Dict[str, Any]] = field(default_factory=list)
    int8_mac_share: float = 1.0

    def report(self) -> Dict[str, Any]:
        """The JSON-ready part of the quantization report."""
        out: Dict[str, Any] = {"mixed_precision": self.status, "accuracy": self.accuracy,
                               "float_nodes": self.float_nodes, "sensitivity": self.sensitivity,
                               "int8_mac_share": round(self.int8_mac_share, 5)}
        if self.accuracy_all_int8 is not None:
            out["accuracy_all_int8"] = self.accuracy_all_int8
        if self.rejected:
            out["rejected_candidates"] = self.rejected
        return out


def goal(opts: QuantizeOptions) -> str:
    """The search's target in words."""
    z = f" + {opts.drop_noise_z:g} x its standard error" if opts.drop_noise_z else ""
    parts = []
    if opts.max_accuracy_drop is not None:
        parts.append(f"final-step drop <= {opts.max_accuracy_drop}{z}")
    if opts.max_budget_drop is not None:
        parts.append(f"mid-budget drop <= {opts.max_budget_drop}{z}")
    if opts.min_exit_agreement is not None:
        parts.append(f"mid-budget exit agreement >= {opts.min_exit_agreement}%")
    return " and ".join(parts)


def _within(drop: float, flips: Dict[str, Any], target: Optional[float], z: float) -> bool:
    """Whether a held-out drop is not above ``target`` by more than ``z`` standard errors."""
    return target is None or drop - z * float(flips["drop_noise"]) <= target


def _met(opts: QuantizeOptions, r: Dict[str, Any]) -> bool:
    z = opts.drop_noise_z
    ok = (_within(r["final_drop"], r["final_flips"], opts.max_accuracy_drop, z)
          and _within(r["budget_drop"], r["budget_flips"], opts.max_budget_drop, z))
    if opts.min_exit_agreement is not None:
        ok = ok and r["exit"]["agreement"] >= opts.min_exit_agreement
    return ok


def search_mixed_precision(sess: QuantSession, eval_x: Optional[np.ndarray],
                           eval_y: Optional[np.ndarray]) -> SearchResult:
    """Chooses the nodes kept in float (see the module doc); ``eval_x=None`` keeps everything INT8."""
    opts = sess.opts
    base = {g: sess.quantized(g) for g in GRAPHS}
    # the patch guard's nodes (chosen by the first quantized() call) are in float from the start
    excluded: Dict[str, FrozenSet[str]] = dict(sess.fixed)
    if eval_x is None:
        return SearchResult(base, excluded, "skipped: no held-out images", int8_mac_share=sess.int8_mac_share(excluded))
    ref = sess.score(sess.fp32, eval_x)
    cur = compare(ref, sess.score(base, eval_x), eval_y)
    res = SearchResult(base, excluded, "", accuracy_all_int8=cur, int8_mac_share=sess.int8_mac_share(excluded))
    searching = any(t is not None for t in (opts.max_accuracy_drop, opts.max_budget_drop, opts.min_exit_agreement))
    if not searching:
        res.status, res.accuracy = "disabled (max_accuracy_drop=None)", cur
        return res
    if _met(opts, cur):
        res.status, res.accuracy = (f"not needed: all-INT8{' (but the patch guard)' if any(excluded.values()) else ''} "
                                    f"within target ({goal(opts)})"), cur
        return res
    res.sensitivity = _sensitivity(sess, ref, cur, eval_x, eval_y)
    for cand in res.sensitivity:
        if _met(opts, cur) or len(res.float_nodes) >= opts.max_float_nodes:
            break
        g = cand["graph"]
        members = frozenset(cand.get("members") or [cand["node"]])
        if members <= excluded[g]:
            continue  # already in float (inside a graph kept in float)
        trial_ex = {**excluded, g: excluded[g] | members}
        limit = opts.float_mac_limit
        if limit is not None and 1.0 - sess.int8_mac_share(trial_ex) > limit + 1e-12:
            res.rejected.append({"graph": g, "node": cand["node"], "op_type": cand["op_type"], "kept": False,
                                 "reason": f"would keep {100 * (1 - sess.int8_mac_share(trial_ex)):.1f}% of the "
                                           f"backbone multiply-adds in float (limit {100 * limit:.1f}%)"})
            continue
        trial = compare(ref, sess.score({h: sess.quantized(h, trial_ex[h]) for h in GRAPHS}, eval_x), eval_y)
        helped = _score(trial) < _score(cur) or (trial["final_drop"] < cur["final_drop"]
                                                  and trial["budget_drop"] <= cur["budget_drop"])
        slow = None
        if helped and sess.profile.latency_guard:
            slow = _slowdown(sess, base[g], sess.quantized(g, trial_ex[g]))
            helped = slow <= opts.max_slowdown
        entry = {"graph": g, "node": cand["node"], "op_type": cand["op_type"],
                 **({"members": len(members)} if len(members) > 1 else {}),
                 "reason": (f"most harmful remaining node: alone in float it cut the KL to FP32 (final step + "
                            f"budget exit step) by {cand['kl_reduction']:.4g} and the accuracy drop by "
                            f"{cand['drop_reduction']:.3g} points"),
                 "drop_before": cur["final_drop"], "drop_after": trial["final_drop"],
                 "budget_drop_before": cur["budget_drop"], "budget_drop_after": trial["budget_drop"],
                 "kl_before": cur["kl_final"], "kl_after": trial["kl_final"],
                 "exit_agreement_before": cur["exit"]["agreement"], "exit_agreement_after": trial["exit"]["agreement"],
                 "kept": bool(helped), **({"latency_vs_all_int8": round(slow, 3)} if slow is not None else {})}
        if helped:
            sess.discard(g, excluded[g])
            excluded = trial_ex
            cur = trial
            res.float_nodes.append(entry)
        else:
            sess.discard(g, trial_ex[g])
            entry["reason"] = ("no gain when added to the nodes already in float; left in INT8" if slow is None
                               or slow <= opts.max_slowdown else
                               f"in float the {g} graph runs {slow:.2f}x the all-INT8 latency "
                               f"(> max_slowdown {opts.max_slowdown}); left in INT8")
            res.rejected.append(entry)
    met = _met(opts, cur)
    res.status = (f"target met ({goal(opts)})" if met else
                  f"target NOT met ({goal(opts)}): drop {cur['final_drop']} (standard error "
                  f"{cur['final_flips']['drop_noise']}), exit agreement "
                  f"{cur['exit']['agreement']}% with {len(res.float_nodes)} node(s) in float "
                  f"(max_float_nodes={opts.max_float_nodes})")
    if not met:
        logger.warning("INT8 %s: %s", sess.profile.name, res.status)
    res.accuracy, res.excluded = cur, excluded
    res.int8_mac_share = sess.int8_mac_share(excluded)
    res.graphs = {g: sess.quantized(g, excluded[g]) for g in GRAPHS}
    return res


def _score(r: Dict[str, Any]) -> float:
    """What the search minimises: KL(FP32 || INT8) at the final step plus at FP32's exit step of
    the mid budget (smoother than accuracy on a few hundred held-out images)."""
    return float(r["kl_final"]) + float(r["kl_budget"])


def _slowdown(sess: QuantSession, base: Path, trial: Path) -> float:
    """Batch-1 latency of ``trial`` over ``base`` (10th percentiles, interleaved, 1 thread)."""
    from .timing import time_graphs

    t = time_graphs({"base": base, "trial": trial}, sess.desc.patch_size, rounds=3, iters=20, warmup=5)
    return t["trial"]["p10_ms"] / t["base"]["p10_ms"]


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def _sensitivity(sess: QuantSession, ref: Traced, base: Dict[str, Any], eval_x, eval_y) -> List[Dict[str, Any]]:
    """Effect of keeping each candidate alone in float, most harmful first.

    Candidates: every weighted node of either graph, and each whole graph (all its quantized
    nodes: that graph then has no Q/DQ at all and runs in float / FP16). GFNet runs the glance
    graph once per image and the focus graph up to T-1 times, so keeping the glance graph in float
    costs at most 1/T of the INT8 speed-up.
    """
    opts = sess.opts
    cands = [(g, name, op, None) for g in GRAPHS for name, op in weighted_nodes(_load(sess.pre[g]))
             if name not in sess.fixed[g]]  # the patch guard's nodes are in float already
    proxy: Dict[Tuple[str, str], float] = {}
    if len(cands) > opts.max_candidates:
        proxy = local_errors(sess)
        cands.sort(key=lambda c: -proxy.get((c[0], c[1]), 0.0))
        cands = cands[:opts.max_candidates]
    for g in GRAPHS if opts.whole_graph_fallback else ():
        members = sorted(quantized_node_names(_load(sess.pre[g]), sess.settings.op_types_to_quantize, ()))
        cands.append((g, f"(whole {g} graph)", "graph", members))
    limit = opts.float_mac_limit
    if limit is not None:  # candidates that alone exceed the limit are not worth measuring
        cands = [c for c in cands
                 if 1.0 - sess.int8_mac_share({c[0]: frozenset(c[3] or [c[1]])}) <= limit + 1e-12]
    bar = None
    if sess.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cands), desc=f"layer sensitivity ({sess.profile.name})", leave=False)
    out = []
    for g, name, op, members in cands:
        ex = frozenset(members or [name])
        graphs = {h: sess.quantized(h, ex) if h == g else sess.quantized(h) for h in GRAPHS}
        r = compare(ref, sess.score(graphs, eval_x), eval_y)
        sess.discard(g, ex)
        out.append({"graph": g, "node": name, "op_type": op, **({"members": members} if members else {}),
                    "final_drop": r["final_drop"], "budget_drop": r["budget_drop"], "kl_final": r["kl_final"],
                    "kl_budget": r["kl_budget"],
                    "exit_agreement": r["exit"]["agreement"],
                    "drop_reduction": round(base["final_drop"] - r["final_drop"], 3),
                    "kl_reduction": _score(base) - _score(r),
                    **({"local_error": proxy[(g, name)]} if (g, name) in proxy else {})})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out.sort(key=lambda e: (-e["kl_reduction"], -e["drop_reduction"]))
    return out


def local_errors(sess: QuantSession, n: int = 32) -> Dict[Tuple[str, str], float]:
    """Relative error ``||int8 - fp32|| / ||fp32||`` of each weighted node's output (all-INT8 graph).

    The intermediate tensors of both graphs are collected with
    ``onnxruntime.quantization.qdq_loss_debug`` on ``n`` calibration inputs; the error is its
    signal-to-quantization-noise ratio turned back into a ratio of norms.
    """
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations,
                                                          compute_signal_to_quantization_noice_ratio,
                                                          modify_model_output_intermediate_tensors)

    from .calibration import GraphDataReader

    errs: Dict[Tuple[str, str], float] = {}
    ops = sorted({op for g in GRAPHS for _, op in weighted_nodes(_load(sess.pre[g]))})
    with tempfile.TemporaryDirectory(prefix="gfnet-quant-debug-", dir=sess.work) as tmp:
        for g in GRAPHS:
            x = sess.calib.inputs(g)[:n]
            acts = {}
            for tag, path in (("fp32", sess.reference[g]), ("int8", sess.quantized(g))):
                aug = Path(tmp) / f"{g}.{tag}.debug.onnx"
                modify_model_output_intermediate_tensors(str(path), str(aug), op_types_for_saving=ops)
                acts[tag] = collect_activations(str(aug), GraphDataReader(x, len(x), progress=False))
            pre = _load(sess.pre[g])
            out_of = {nd.name: nd.output[0] for nd in pre.graph.node}
            for name, _ in weighted_nodes(pre):
                a, b = acts["fp32"].get(out_of[name]), acts["int8"].get(out_of[name])
                if a is None or b is None or [t.shape for t in a] != [t.shape for t in b]:
                    continue
                errs[(g, name)] = float(10.0 ** (-compute_signal_to_quantization_noice_ratio(a, b) / 20.0))
    return errs
