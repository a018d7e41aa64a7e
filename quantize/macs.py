"""Multiply-adds of the weighted nodes of a backbone graph, and the share run in INT8.

GFNet runs the glance graph once per image and the focus graph up to T-1 times, so the share of
backbone multiply-adds in INT8 weighs the focus graph's nodes T-1 times (:func:`int8_mac_share`).
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Mapping, Optional

import numpy as np

from .profiles import WEIGHTED_OP_TYPES


def _shapes(model) -> Dict[str, tuple]:
    """Static shapes of the graph's tensors (batch and other symbolic dims as 1)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    out: Dict[str, tuple] = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = tuple(d.dim_value if d.dim_value > 0 else 1 for d in dims)
    for t in g.initializer:
        out[t.name] = tuple(t.dims)
    return out


def node_macs(model) -> Dict[str, int]:
    """Multiply-adds per image of each weighted node (Conv, ConvTranspose, Gemm, MatMul) with a
    constant operand (an initializer, or its DequantizeLinear in a Q/DQ graph); nodes whose
    shapes cannot be inferred count 0."""
    shapes = _shapes(model)
    inits = {t.name for t in model.graph.initializer}
    # a quantized graph's weights reach the node through a DequantizeLinear of an initializer
    # (integer weights) or of a QuantizeLinear of one (float weights quantized in the graph, as
    # ModelOpt writes them); either has the initializer's shape
    for n in model.graph.node:  # graph order: a QuantizeLinear comes before its DequantizeLinear
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] in inits:
            inits.add(n.output[0])
            if n.output[0] not in shapes and n.input[0] in shapes:
                shapes[n.output[0]] = shapes[n.input[0]]
    out: Dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type not in WEIGHTED_OP_TYPES or len(n.input) < 2:
            continue
        w_name = n.input[1] if n.input[1] in inits else (n.input[0] if n.input[0] in inits else None)
        w, y = shapes.get(w_name or ""), shapes.get(n.output[0])
        if w is None or y is None or not y:
            out[n.name] = 0
            continue
        if n.op_type == "Conv":  # (Cout, Cin/g, k...) -> every output element costs prod(w[1:])
            macs = int(np.prod(y[1:])) * int(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":  # every input element is spread over Cout/g * k...
            x = shapes.get(n.input[0], ())
            macs = int(np.prod(x[1:])) * int(np.prod(w[1:])) if x else 0
        else:  # Gemm / MatMul: K multiply-adds per output element
            k = w[0] if n.op_type == "MatMul" or not _trans_b(n) else w[-1]
            macs = int(np.prod(y[1:])) * int(k)
        out[n.name] = macs
    return out


def _trans_b(node) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)


def int8_mac_share(macs: Mapping[str, Mapping[str, int]], float_nodes: Mapping[str, FrozenSet[str]],
                   runs: Mapping[str, int], quantized: Optional[Mapping[str, FrozenSet[str]]] = None) -> float:
    """Share (0..1) of backbone multiply-adds per image that run in INT8.

    Args:
        macs: per graph, :func:`node_macs`.
        float_nodes: per graph, the weighted nodes kept in float.
        runs: per graph, how many times it runs per image (glance 1, focus T-1).
        quantized: per graph, the weighted nodes the profile quantizes at all (default: all).
    """
    total = int8 = 0.0
    for g, per in macs.items():
        for name, m in per.items():
            total += runs[g] * m
            in_int8 = name not in float_nodes.get(g, frozenset())
            if quantized is not None:
                in_int8 = in_int8 and name in quantized.get(g, frozenset())
            int8 += runs[g] * m if in_int8 else 0.0
    return int8 / total if total else 1.0
