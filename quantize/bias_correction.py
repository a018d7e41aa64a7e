"""Empirical bias correction of a quantized graph.

Quantizing a layer's weights and input shifts the mean of its output channels (rounding and
clipping errors do not average out over a few input channels). For each weighted node whose
weights are quantized, in graph order, the per-channel mean of its output on calibration inputs
is measured in the quantized graph and in the FP32 graph, and the float bias is moved by the
difference (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, empirical variant). Nodes are corrected one after the other, each
measured with the corrections before it in place, so that a shift is not corrected twice.

TensorRT keeps biases in float (its INT8 kernels add the bias after the integer
accumulation), so the corrected bias is used as is by an INT8 engine. ONNX Runtime's integer
kernels (the ``cpu`` profile) take the bias as int32 in steps of input scale x weight scale
(``DequantizeLinear`` of an int32 initializer): the correction is rounded to that step, far finer
than the output's own quantization step, and added to the int32 values.

The FP32 reference of a node is the output of the FP32 graph's node of the same name: where ONNX
Runtime folded a ReLU into the quantizer after a Conv (``cpu`` profile), the quantized Conv
writes the ReLU's tensor name, but its values are the Conv's.
"""
from __future__ import annotations

from dataclasses import dataclass
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


#: int32 range of a quantized bias
_INT32 = (-(2 ** 31), 2 ** 31 - 1)


@dataclass
class _Bias:
    """Where a weighted node's bias lives: a float initializer (``dq`` None), or an int32
    initializer read through the ``DequantizeLinear`` ``dq``."""

    init: str
    dq: Optional[object] = None


def _bias(node, producer, inits) -> Optional[_Bias]:
    """The constant bias of a Conv / Gemm: a float initializer, or an int32 initializer through a
    DequantizeLinear (ONNX Runtime's ``QuantizeBias``); ``None`` otherwise."""
    from onnx import TensorProto

    if len(node.input) < 3 or not node.input[2]:
        return None
    b = node.input[2]
    if b in inits:
        return _Bias(b) if inits[b].data_type == TensorProto.FLOAT else None
    dq = producer.get(b)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits \
            or inits[dq.input[0]].data_type != TensorProto.INT32 or dq.input[1] not in inits:
        return None
    if len(dq.input) > 2 and dq.input[2] and dq.input[2] not in inits:
        return None
    return _Bias(dq.input[0], dq)


def _targets(model) -> List[Tuple[object, int, _Bias]]:
    """(node, channel axis of its output, its bias) of weighted nodes with DequantizeLinear
    weights and a constant bias (Conv with 3 inputs, Gemm with C; float, or int32 through a
    DequantizeLinear), in graph order."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        w = producer.get(n.input[1])
        if w is None or w.op_type != "DequantizeLinear":
            continue
        bias = _bias(n, producer, inits)
        if bias is not None:
            out.append((n, 1, bias))
    return out


def correct_biases(quantized, fp32, x: np.ndarray, threads: Optional[int] = 2,
                   reference: Optional[MutableMapping[str, np.ndarray]] = None) -> Dict[str, float]:
    """Moves the bias of each weight-quantized Conv / Gemm of ``quantized`` (in place) so that its
    per-channel output mean on ``x`` equals the FP32 graph's: a float bias by the difference, an
    int32 one (``DequantizeLinear``) by the difference rounded to its scale (clipped to int32).

    Args:
        quantized: the Q/DQ ``ModelProto`` (edited in place).
        fp32: the FP32 ``ModelProto`` it was quantized from (same node names).
        x: calibration inputs of the graph.
        threads: ONNX Runtime threads (``None``: its default).
        reference: FP32 channel means by FP32 tensor name, measured on the same ``x``: used where
            present, the missing ones measured and added (the variants of one graph share them).

    Returns:
        node name -> largest absolute correction applied (for the report).
    """
    from onnx import helper, numpy_helper

    targets = _targets(quantized)
    if not targets:
        return {}
    fp32_out = {n.name: n.output[0] for n in fp32.graph.node if n.name}
    # the FP32 tensor of each node: the output of the FP32 node of the same name (else the tensor
    # of the same name)
    ref_of = {n.output[0]: fp32_out.get(n.name, n.output[0]) for n, _, _ in targets}
    axes = {n.output[0]: ax for n, ax, _ in targets}
    ref_axes = {ref_of[t]: ax for t, ax in axes.items()}
    ref = reference if reference is not None else {}
    missing = [r for r in dict.fromkeys(ref_of.values()) if r not in ref]
    if missing:
        ref.update(_channel_means(fp32, missing, ref_axes, x, threads))
    graph = quantized.graph
    inits = {t.name: t for t in graph.initializer}
    uses: Dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    done: Dict[str, float] = {}
    for node, _, bias in targets:
        t = node.output[0]
        cur = _channel_means(quantized, [t], axes, x, threads)[t]
        shift = cur - ref[ref_of[t]]
        values = numpy_helper.to_array(inits[bias.init])
        if values.shape != shift.shape:
            continue
        if bias.dq is None:  # float: moved by the shift
            new_values = (values.astype(np.float64) - shift).astype(values.dtype)
            applied = shift
        else:  # int32 in steps of its scale (input scale x weight scale)
            scale = numpy_helper.to_array(inits[bias.dq.input[1]]).astype(np.float64)
            if scale.size not in (1, shift.size) or not np.all(scale > 0):
                continue
            scale = scale.reshape(-1) if scale.size > 1 else scale.reshape(())
            steps = np.round(-shift / scale)
            q = np.clip(values.astype(np.float64) + steps, *_INT32)
            new_values = q.astype(np.int32)
            applied = (values.astype(np.float64) - q) * scale
        name = bias.init
        if uses[name] > 1 or (bias.dq is not None and uses[bias.dq.output[0]] > 1):
            name = f"{bias.init}_bias_corrected_{node.name}"
        new = numpy_helper.from_array(new_values, name)
        if name == bias.init:
            inits[name].CopyFrom(new)
        else:
            graph.initializer.append(new)
            if bias.dq is None:
                node.input[2] = name
            elif uses[bias.dq.output[0]] == 1:  # its DequantizeLinear reads the copy
                bias.dq.input[0] = name
            else:  # a DequantizeLinear of its own, just before the node
                dq = helper.make_node("DequantizeLinear", [name, *bias.dq.input[1:]],
                                      [f"{bias.dq.output[0]}_bias_corrected_{node.name}"],
                                      name=f"{bias.dq.name}_bias_corrected_{node.name}")
                dq.attribute.extend(bias.dq.attribute)
                at = next(i for i, n in enumerate(graph.node) if n is node)
                graph.node.insert(at, dq)
                node.input[2] = dq.output[0]
        done[node.name] = float(np.abs(applied).max())
    return done
