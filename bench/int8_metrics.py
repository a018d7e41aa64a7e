"""Metrics of bench/int8_compare.py: accuracy and exits of a quantized graph set against FP32 on
the same images, and the share of a graph's multiply-adds that runs in float.

The metrics are plain numpy, so the test can check them against a plain recomputation; multiply-adds
are counted by the quantizer's own counter (``gfnet_edge.quantize.macs``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np


@dataclass
class ArmTrace:
    """One graph set on one image set, as the runtime returned it.

    Attributes:
        probs: every step's probabilities, ``Runtime.trace`` (T, N, K).
        classes: the answer at the bundle's default budget, ``Runtime.predict`` (N,).
        exit_step: the step each image exited at under that budget (N,), 0 = glance.
    """

    probs: np.ndarray
    classes: np.ndarray
    exit_step: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.probs.shape[0])

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, probs=self.probs, classes=self.classes, exit_step=self.exit_step)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "ArmTrace":
        with np.load(path) as z:
            return cls(z["probs"], z["classes"], z["exit_step"])


def flips(ref_ok: np.ndarray, test_ok: np.ndarray) -> Dict[str, int]:
    """Paired flips: images the reference got right and the test wrong (``lost``), and the reverse."""
    return {"lost": int((ref_ok & ~test_ok).sum()), "gained": int((~ref_ok & test_ok).sum())}


def decision_flips(ref_exit: np.ndarray, test_exit: np.ndarray, steps: int) -> List[Dict[str, int]]:
    """Where two exit-step vectors part: for each step k but the last, the images both runs
    reached (``reached``) and those of them that one run left at k and the other did not
    (``flips``). Every image whose exit steps differ is counted once, at the first decision that
    differs, so the flips add up to the exit disagreements."""
    out = []
    for k in range(steps - 1):
        reached = (ref_exit >= k) & (test_exit >= k)
        flips = reached & ((ref_exit == k) != (test_exit == k))
        out.append({"step": k, "flips": int(flips.sum()), "reached": int(reached.sum())})
    return out


def compare_arm(ref: ArmTrace, test: ArmTrace, labels: np.ndarray) -> Dict[str, Any]:
    """Accuracy of ``test`` and ``ref`` (percent), its difference (test - ref, points) with the
    paired flip counts, at the final step and at the default budget, and exit agreement.

    Args:
        ref: the FP32 graph set's trace; test: the quantized one, on the same images.
        labels: true labels, or FP32's final-step predictions when the images have none.
    """
    labels = np.asarray(labels).reshape(-1)
    pred_ref, pred_test = ref.probs.argmax(axis=2), test.probs.argmax(axis=2)
    step_ref = 100.0 * (pred_ref == labels[None]).mean(axis=1)
    step_test = 100.0 * (pred_test == labels[None]).mean(axis=1)
    fin_ref, fin_test = pred_ref[-1] == labels, pred_test[-1] == labels
    bud_ref, bud_test = ref.classes == labels, test.classes == labels
    n = int(labels.shape[0])
    return {
        "n": n,
        "step_accuracy": [float(a) for a in step_test],
        "final_accuracy": float(step_test[-1]),
        "final_delta": float(step_test[-1] - step_ref[-1]),
        "final_flips": flips(fin_ref, fin_test),
        "budget_accuracy": float(100.0 * bud_test.mean()),
        "budget_delta": float(100.0 * (bud_test.mean() - bud_ref.mean())),
        "budget_flips": flips(bud_ref, bud_test),
        "exit_agreement": float(100.0 * (ref.exit_step == test.exit_step).mean()),
        "exit_decision_flips": decision_flips(ref.exit_step, test.exit_step, test.steps),
        "exit_counts": np.bincount(test.exit_step, minlength=test.steps).tolist(),
        "prediction_agreement": [float(100.0 * a) for a in (pred_ref == pred_test).mean(axis=1)],
        "focus_runs": int(test.exit_step.sum()),
    }


# --------------------------------------------------------------------------- multiply-adds
@dataclass
class NodeMacs:
    """Multiply-adds of one weighted node for one image, and whether it runs in INT8."""

    name: str
    op_type: str
    macs: int
    int8: bool


def graph_macs(path: Path) -> List[NodeMacs]:
    """Per-image multiply-adds of every weighted node of an ONNX graph (counted by
    :func:`gfnet_edge.quantize.macs.node_macs`, the count the quantizer's report uses), and
    whether both its data input and its weight come from a DequantizeLinear (the node runs in INT8).

    Raises:
        ValueError: a weighted node whose shapes shape inference cannot tell.
    """
    import onnx

    from gfnet_edge.quantize.macs import node_macs

    model = onnx.load(str(path))
    macs = node_macs(model)
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    out: List[NodeMacs] = []
    for node in model.graph.node:
        if node.name not in macs:
            continue
        if not macs[node.name]:
            raise ValueError(f"{path}: shapes of {node.op_type} node {node.name!r} unknown after shape inference")
        int8 = all(producer.get(i) == "DequantizeLinear" for i in node.input[:2])
        out.append(NodeMacs(node.name, node.op_type, macs[node.name], int8))
    return out


def float_share(nodes: Sequence[NodeMacs]) -> float:
    """Percent of the multiply-adds of ``nodes`` in nodes that do not run in INT8."""
    return _float_share({"graph": nodes}, {"graph": 1})


def weighted_float_share(glance: Sequence[NodeMacs], focus: Sequence[NodeMacs], glance_runs: int,
                         focus_runs: int) -> float:
    """Percent of the backbone multiply-adds run in float when the glance graph runs
    ``glance_runs`` times and the focus graph ``focus_runs`` times."""
    return _float_share({"glance": glance, "focus": focus}, {"glance": glance_runs, "focus": focus_runs})


def _float_share(graphs: Mapping[str, Sequence[NodeMacs]], runs: Mapping[str, int]) -> float:
    """Percent of the multiply-adds of ``graphs`` (each run ``runs[g]`` times) not in INT8: the
    complement of the quantizer's :func:`gfnet_edge.quantize.macs.int8_mac_share` (0 when there
    are none)."""
    from gfnet_edge.quantize.macs import int8_mac_share

    # keyed by position: a node counts once even where a graph repeats a node name
    macs = {g: {str(i): n.macs for i, n in enumerate(nodes)} for g, nodes in graphs.items()}
    in_float = {g: frozenset(str(i) for i, n in enumerate(nodes) if not n.int8) for g, nodes in graphs.items()}
    return 100.0 * (1.0 - int8_mac_share(macs, in_float, runs))
