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
then run in float), up to a share of the backbone multiply-adds. On the demo's ResNet-18 this
picks the residual streams at the ends of stages 1-3, which feed cheap strided convolutions, and
the inputs of the policy's ``state_encoder``.
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
        rms_px: RMS location error (pixels) on the measurement inputs: all INT8, weights only
            (activations float), and with the ``kept`` tensors in float (``with_guard``).
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
    input) whose every dequantized copy is read by weighted nodes only, those nodes: keeping
    them in float takes the tensor's rounding out of the graph. (A tensor also read in INT8 by
    another op, e.g. the skip input of a residual Add with ``residual_int8``, is not offered.)"""
    from .profiles import WEIGHTED_OP_TYPES
    from .qdq import _activation_qdq

    pairs = _activation_qdq(qdq)
    readers: Dict[str, set] = {}
    other = set()
    for n in qdq.graph.node:
        for i in n.input:
            if i in pairs:
                tensor = pairs[i][2]
                if n.op_type in WEIGHTED_OP_TYPES and n.input[0] == i:
                    readers.setdefault(tensor, set()).add(n.name)
                else:
                    other.add(tensor)
    outputs = {o.name for o in qdq.graph.output}
    other |= {pairs[o][2] for o in outputs if o in pairs}
    return {t: frozenset(r) for t, r in readers.items() if t not in other}


def keep_activations(qdq, keep: Sequence[str]):
    """A copy of ``qdq`` whose activation ``QuantizeLinear -> DequantizeLinear`` pairs are
    removed (their readers get the float tensor) except on the tensors ``keep``; weights stay
    quantized."""
    import onnx

    from .qdq import _activation_qdq, remove_dangling_qdq

    m = onnx.ModelProto()
    m.CopyFrom(qdq)
    keep = set(keep)
    rename = {dq_out: x for dq_out, (_, _, x) in _activation_qdq(m).items() if x not in keep}
    for n in m.graph.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
    remove_dangling_qdq(m)
    return m


class LocationProbe:
    """Mean squared error (pixels^2) of the first patch's location of a graph against the FP32
    graph's, on fixed inputs.

    Args:
        fp32: the FP32 glance graph (``ModelProto``).
        x: glance inputs (N, 3, P, P).
        location: the first patch's location in pixels (N, 2) from a graph's outputs.
        threads: ONNX Runtime threads.
        batch: inputs per ONNX Runtime call.
    """

    def __init__(self, fp32, x: np.ndarray, location: Callable[[Dict[str, np.ndarray]], np.ndarray],
                 threads: Optional[int] = None, batch: int = 64) -> None:
        self.x, self.location, self.threads, self.batch = x, location, threads, batch
        self.ref = location(outputs(fp32, x, batch, threads))

    def mse(self, model) -> float:
        got = self.location(outputs(model, self.x, self.batch, self.threads))
        return float(((got - self.ref) ** 2).mean())


def measure(qdq, probe: LocationProbe, node_macs: Mapping[str, int], progress: bool = False):
    """Each offered activation tensor's added location error (see the module).

    Args:
        qdq: the calibrated all-INT8 glance graph (``ModelProto``).
        probe: the location error against the FP32 graph.
        node_macs: multiply-adds per image of each weighted node.
        progress: a progress bar.

    Returns:
        ``(candidates most added error first, {"all_int8": mse, "weights_only": mse})``.
    """
    readers = activation_readers(qdq)
    totals = {"all_int8": probe.mse(qdq), "weights_only": probe.mse(keep_activations(qdq, ()))}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(readers), desc="patch location sensitivity", leave=False)
    cands = []
    for tensor, nodes in readers.items():
        added = probe.mse(keep_activations(qdq, (tensor,))) - totals["weights_only"]
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
    for c in sorted(cands, key=lambda c: -c.added_mse / max(c.macs, 1)):
        if total_added <= 0 or c.added_mse < min_fraction * total_added:
            continue
        trial = nodes | c.nodes
        if float_share(trial) > max_share + 1e-12:
            continue
        nodes = trial
        guard.kept.append(c)
    guard.nodes = nodes
    guard.float_mac_share = float_share(nodes) if nodes else 0.0
    guard.rms_px = {k: round(float(np.sqrt(v)), 4) for k, v in totals.items()}
    return guard


def guarded_mse(qdq, probe: LocationProbe, guard: PatchGuard) -> float:
    """The location error of ``qdq`` with the guard's tensors in float (their readers' weights
    still INT8: at most the error of the graph the guard's placement writes)."""
    from .qdq import _activation_qdq

    kept = {c.tensor for c in guard.kept}
    return probe.mse(keep_activations(qdq, {x for _, _, x in _activation_qdq(qdq).values()} - kept))


def first_patch_pixels(heads: Mapping[str, np.ndarray], image_size: int, patch_size: int):
    """``location(outputs)`` for :func:`measure`: the policy's first patch location in pixels,
    ``action * (S - P)`` before the runtime floors it, from the runtime's own policy head
    (:func:`gfnet_edge.runtime.heads.actor_head`, zero state) on the glance graph's ``policy_state``."""
    from gfnet_edge.runtime.heads import actor_head

    actor = actor_head({k: np.ascontiguousarray(v, np.float32) for k, v in heads.items()})
    span = np.float32(image_size - patch_size)

    def location(outs: Dict[str, np.ndarray]) -> np.ndarray:
        return actor.step(outs["policy_state"], None, image_size, patch_size)[1] * span

    return location
