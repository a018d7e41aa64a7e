"""Empirical bias correction of a quantized graph.

Quantizing a layer's weights and input shifts the mean of its output channels (rounding and
clipping errors do not average out over a few input channels). For each weighted node whose
weights are quantized, in graph order, the per-channel mean of its output on calibration inputs
is measured in the quantized graph and in the FP32 graph, and the float bias is moved by the
difference (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, empirical variant). Nodes are corrected one after the other, each
measured with the corrections before it in place, so that a shift is not corrected twice.

TensorRT keeps biases in float (its INT8 kernels add the bias after the integer
accumulation), so the corrected bias is used as is by an INT8 engine.
"""
from __future__ import annotations

from typing import Dict, List, MutableMapping, Optional, Sequence, Tuple

import numpy as np

from .probe import probe


def _channel_means(model, names: Sequence[str], axes: Dict[str, int], x: np.ndarray, threads: Optional[int],
                   batch: int = 32) -> Dict[str, np.ndarray]:
    """Per-channel mean of each named tensor over the inputs ``x`` (channel axis per tensor)."""
    sums: Dict[str, np.ndarray] = {}
    count: Dict[str, int] = {}
    for res in probe(model, names, x, batch, threads):
        for n in names:
            a = np.asarray(res[n], np.float64)
            ax = axes[n] % a.ndim
            red = tuple(k for k in range(a.ndim) if k != ax)
            sums[n] = sums.get(n, 0.0) + a.sum(axis=red)
            count[n] = count.get(n, 0) + int(a.size // a.shape[ax])
    return {n: sums[n] / count[n] for n in names}


def _targets(model) -> List[Tuple[object, int]]:
    """(node, channel axis of its output) of weighted nodes with DequantizeLinear weights and a
    constant float bias (Conv with 3 inputs, Gemm with C), in graph order."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.input[2] not in inits:
            continue
        w = producer.get(n.input[1])
        if w is None or w.op_type != "DequantizeLinear":
            continue
        out.append((n, 1))
    return out


def correct_biases(quantized, fp32, x: np.ndarray, threads: Optional[int] = 2,
                   reference: Optional[MutableMapping[str, np.ndarray]] = None) -> Dict[str, float]:
    """Moves the float bias of each weight-quantized Conv / Gemm of ``quantized`` (in place) so
    that its per-channel output mean on ``x`` equals the FP32 graph's.

    Args:
        quantized: the Q/DQ ``ModelProto`` (edited in place).
        fp32: the FP32 ``ModelProto`` it was quantized from (same node and tensor names).
        x: calibration inputs of the graph.
        threads: ONNX Runtime threads (``None``: its default).
        reference: FP32 channel means by tensor name, measured on the same ``x``: used where
            present, the missing ones measured and added (the variants of one graph share them).

    Returns:
        node name -> largest absolute correction applied (for the report).
    """
    from onnx import numpy_helper

    targets = _targets(quantized)
    if not targets:
        return {}
    names = [n.output[0] for n, _ in targets]
    axes = {n.output[0]: ax for n, ax in targets}
    ref = reference if reference is not None else {}
    missing = [t for t in names if t not in ref]
    if missing:
        ref.update(_channel_means(fp32, missing, axes, x, threads))
    inits = {t.name: t for t in quantized.graph.initializer}
    uses: Dict[str, int] = {}
    for n in quantized.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    done: Dict[str, float] = {}
    for node, _ in targets:
        t = node.output[0]
        cur = _channel_means(quantized, [t], axes, x, threads)[t]
        shift = cur - ref[t]
        b_name = node.input[2]
        bias = numpy_helper.to_array(inits[b_name]).astype(np.float64)
        if bias.shape != shift.shape:
            continue
        new = numpy_helper.from_array((bias - shift).astype(np.float32), b_name if uses[b_name] == 1
                                      else f"{b_name}_bias_corrected_{node.name}")
        if uses[b_name] == 1:
            inits[b_name].CopyFrom(new)
        else:
            quantized.graph.initializer.append(new)
            node.input[2] = new.name
        done[node.name] = float(np.abs(shift).max())
    return done
