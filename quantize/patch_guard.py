"""Keeping in float the few glance-graph activations whose rounding moves the first patch most.

GFNet's policy reads the glance graph's ``policy_state`` and picks where the first patch is cut,
in whole pixels. A patch cut one pixel away changes the next step's features, and with them the
exit decision, far more than the rounding of the features themselves: on the demo model, INT8
rounding of the glance graph's activations moves the first patch by about 1.3 pixels (RMS),
and images whose patch moved disagree with FP32's exit step about twice as often as the others.

The rounding errors of different activation tensors are close to independent, so their effects
on the location add up in variance. :func:`measure` therefore quantizes one activation tensor at
a time (weights in INT8, every other activation in float) and records how much mean squared
location error that tensor adds, on calibration inputs. :func:`choose` then keeps in float the
tensors with the most error per multiply-add of the weighted nodes reading them (those nodes
then run in float), up to a share of the backbone multiply-adds. On ResNet backbones this picks
the residual streams at the ends of the stages, which feed cheap strided convolutions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence

import numpy as np

from .probe import outputs

#: calibration inputs the location errors are measured on (evenly spaced over the set)
MEASURE_INPUTS = 512


@dataclass
class Candidate:
    """One activation tensor's effect on the first patch's location.

    Attributes:
        tensor: the activation tensor (the float input of its ``QuantizeLinear``).
        nodes: the weighted nodes reading it through Q/DQ (kept in float together).
        macs: their multiply-adds per image.
        added_mse: mean squared location error (pixels^2) its rounding adds to the
            weights-only graph's.
    """

    tensor: str
    nodes: FrozenSet[str]
    macs: int
    added_mse: float

    def to_dict(self) -> Dict[str, Any]:
        return {"tensor": self.tensor, "nodes": sorted(self.nodes), "macs": self.macs,
                "added_rms_px": round(float(np.sqrt(max(self.added_mse, 0.0))), 4)}


@dataclass
class PatchGuard:
    """What :func:`choose` kept in float, and the figures it chose by (for the report).

    Attributes:
        nodes: weighted nodes of the glance graph kept in float.
        kept: the chosen tensors, in the order chosen.
        candidates: every measured tensor, most added error first.
        rms_px: RMS location error (pixels) on the measurement inputs: all INT8, weights only,
            and the estimate with ``kept`` in float.
        float_mac_share: share of the backbone multiply-adds per image the kept nodes run in float.
        inputs: calibration inputs measured on.
    """

    nodes: FrozenSet[str] = frozenset()
    kept: List[Candidate] = field(default_factory=list)
    candidates: List[Candidate] = field(default_factory=list)
    rms_px: Dict[str, float] = field(default_factory=dict)
    float_mac_share: float = 0.0
    inputs: int = 0

    def report(self) -> Dict[str, Any]:
        return {"kept_in_float": [c.to_dict() for c in self.kept], "nodes": sorted(self.nodes),
                "location_rms_px": self.rms_px, "float_mac_share": round(self.float_mac_share, 5),
                "inputs": self.inputs, "candidates": [c.to_dict() for c in self.candidates]}


def activation_readers(qdq) -> Dict[str, FrozenSet[str]]:
    """Per activation tensor quantized in ``qdq`` (a ``QuantizeLinear`` of a non-constant
    input), the weighted nodes that read it through its ``DequantizeLinear`` (s)."""
    from .qdq import weighted_nodes

    inits = {t.name for t in qdq.graph.initializer}
    weighted = {name for name, _ in weighted_nodes(qdq)} | _weighted_through_dq(qdq)
    source_of_q = {n.output[0]: n.input[0] for n in qdq.graph.node
                   if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    source_of_dq = {n.output[0]: source_of_q[n.input[0]] for n in qdq.graph.node
                    if n.op_type == "DequantizeLinear" and n.input[0] in source_of_q}
    readers: Dict[str, set] = {}
    for n in qdq.graph.node:
        if n.name in weighted:
            for i in n.input:
                if i in source_of_dq:
                    readers.setdefault(source_of_dq[i], set()).add(n.name)
    return {t: frozenset(r) for t, r in readers.items()}


def _weighted_through_dq(qdq) -> set:
    """Weighted nodes whose weight arrives through a ``DequantizeLinear`` of a constant."""
    from .profiles import WEIGHTED_OP_TYPES

    inits = {t.name for t in qdq.graph.initializer}
    dq_of_const = {n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return {n.name for n in qdq.graph.node
            if n.op_type in WEIGHTED_OP_TYPES and len(n.input) > 1 and n.input[1] in dq_of_const}


def keep_activations(qdq, keep: Sequence[str]):
    """A copy of ``qdq`` whose activation ``QuantizeLinear -> DequantizeLinear`` pairs are
    removed (the float tensor passed through) except on the tensors ``keep``; weights stay
    quantized."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(qdq)
    g = m.graph
    inits = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    keep = set(keep)
    rename: Dict[str, str] = {}
    dropped = set()
    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.input[0] in inits:
            continue
        q = producer.get(n.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in keep:
            rename[n.output[0]] = q.input[0]
            dropped.add(n.output[0])
            dropped.add(q.output[0])
    nodes = [n for n in g.node if n.output[0] not in dropped]
    for n in nodes:
        n.input[:] = [rename.get(i, i) for i in n.input]
    outs = {o.name for o in g.output}
    if outs & set(rename):  # pragma: no cover - exporters never end a graph on a DequantizeLinear
        raise ValueError("a graph output is the output of an activation DequantizeLinear")
    del g.node[:]
    g.node.extend(nodes)
    return m


def measure(qdq, fp32, x: np.ndarray, location: Callable[[Dict[str, np.ndarray]], np.ndarray],
            node_macs: Mapping[str, int], threads: Optional[int] = None, batch: int = 64,
            progress: bool = False):
    """Each quantized activation tensor's added location error (see the module).

    Args:
        qdq: the calibrated all-INT8 glance graph (``ModelProto``).
        fp32: the FP32 graph it was quantized from.
        x: glance inputs (N, 3, P, P).
        location: the first patch's location in pixels (N, 2) from the graph's outputs.
        node_macs: multiply-adds per image of each weighted node.
        threads: ONNX Runtime threads.
        batch: inputs per ONNX Runtime call.
        progress: a progress bar.

    Returns:
        ``(candidates most added error first, {"all_int8": mse, "weights_only": mse})``.
    """
    ref = location(outputs(fp32, x, batch, threads))

    def mse(model) -> float:
        return float(((location(outputs(model, x, batch, threads)) - ref) ** 2).mean())

    readers = activation_readers(qdq)
    totals = {"all_int8": mse(qdq), "weights_only": mse(keep_activations(qdq, ()))}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(readers), desc="patch location sensitivity", leave=False)
    cands = []
    for tensor, nodes in readers.items():
        added = mse(keep_activations(qdq, (tensor,))) - totals["weights_only"]
        cands.append(Candidate(tensor, nodes, int(sum(node_macs.get(n, 0) for n in nodes)), added))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    cands.sort(key=lambda c: -c.added_mse)
    return cands, totals


def choose(cands: Sequence[Candidate], totals: Mapping[str, float], float_share: Callable[[FrozenSet[str]], float],
           max_share: float, min_fraction: float = 0.05) -> PatchGuard:
    """Keeps tensors in float, most added error per multiply-add first, while the backbone's
    float share (``float_share(nodes)``, 0..1) stays within ``max_share``; tensors adding less
    than ``min_fraction`` of the summed added error are not worth it."""
    total_added = sum(max(c.added_mse, 0.0) for c in cands)
    guard = PatchGuard(candidates=list(cands))
    nodes: FrozenSet[str] = frozenset()
    removed = 0.0
    for c in sorted(cands, key=lambda c: -c.added_mse / max(c.macs, 1)):
        if total_added <= 0 or c.added_mse < min_fraction * total_added:
            continue
        trial = nodes | c.nodes
        if float_share(trial) > max_share + 1e-12:
            continue
        nodes = trial
        removed += c.added_mse
        guard.kept.append(c)
    guard.nodes = nodes
    guard.float_mac_share = float_share(nodes) if nodes else 0.0
    guard.rms_px = {"all_int8": round(float(np.sqrt(totals["all_int8"])), 4),
                    "weights_only": round(float(np.sqrt(totals["weights_only"])), 4),
                    "estimate_with_guard": round(float(np.sqrt(max(totals["all_int8"] - removed, 0.0))), 4)}
    return guard


def first_patch_pixels(heads: Mapping[str, np.ndarray], image_size: int, patch_size: int):
    """``location(outputs)`` for :func:`measure`: the policy's first patch location in pixels
    (the runtime's policy head on the glance graph's ``policy_state``)."""
    import torch

    from .finetune import first_patch_location

    derive = first_patch_location(dict(heads))
    span = float(image_size - patch_size)

    def location(outs: Dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return derive({"policy_state": torch.from_numpy(outs["policy_state"])})[0].numpy() * span

    return location
