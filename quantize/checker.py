"""Static TensorRT-compatibility checker for quantized (Q/DQ) ONNX graphs.

:func:`check_tensorrt_compat` returns a list of human-readable violations (empty = OK). It
needs only ``onnx`` and ``numpy``, so it also runs where TensorRT is not installable. Rules
(``profile="tensorrt"``):

* the model passes ``onnx.checker``; default-domain opset within what the TensorRT 10.3 parser
  reads; every op in its supported set (:mod:`.tensorrt_ops`); no QOperator / integer ops
  (QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger, ONNX Runtime contrib ops);
* every QuantizeLinear / DequantizeLinear has initializer scale and zero-point, the zero-point
  is int8 and exactly 0 (symmetric; uint8 means asymmetric activations TensorRT cannot run),
  scales are positive and finite; activations are quantized per tensor; a QuantizeLinear feeds
  only DequantizeLinear nodes with the same scale;
* DequantizeLinear of a weight reads an int8 initializer (no INT32 bias DQ); Conv weights are
  quantized per channel on axis 0 (ConvTranspose: axis 1; Gemm / MatMul: the output-channel
  axis when per channel); a weighted op has either both its activation and weight quantized or
  neither;
* a DequantizeLinear of an activation only feeds ops TensorRT can run or fuse in INT8.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple, Union

import numpy as np

from gfnet_edge.errors import GFNetEdgeError

from .profiles import WEIGHTED_OP_TYPES, CheckerRules, Profile, get_profile
from .tensorrt_ops import (
    INT8_CONSUMERS, MAX_OPSET, MIN_OPSET, PER_CHANNEL_AXIS, SUPPORTED_OPS, TENSORRT_VERSION,
    UNSUPPORTED_REASONS,
)


class TensorRTCompatError(GFNetEdgeError, ValueError):
    """A quantized graph breaks TensorRT's rules; ``violations`` lists them."""

    def __init__(self, where: str, violations: List[str]) -> None:
        self.violations = list(violations)
        shown = "\n  ".join(self.violations[:20])
        more = f"\n  ... and {len(self.violations) - 20} more" if len(self.violations) > 20 else ""
        super().__init__(f"{where}: {len(self.violations)} TensorRT compatibility violation(s):\n  {shown}{more}")


def _load(model) -> Tuple["onnx.ModelProto", str]:  # noqa: F821
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "model"
    path = Path(model)
    if not path.is_file():
        raise ValueError(f"{path}: no such ONNX file")
    return onnx.load(str(path)), path.name


class _Graph:
    """Producers, consumers and constants of a graph."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        g = model.graph
        self.nodes = list(g.node)
        self.producer: Dict[str, object] = {}
        self.consumers: Dict[str, List[object]] = {}
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.const: Dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in self.nodes:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        self.const[n.output[0]] = numpy_helper.to_array(a.t)
        self.outputs: Set[str] = {o.name for o in g.output}
        self.inputs = {i.name: i for i in g.input if i.name not in self.const}

    def is_const(self, name: str) -> bool:
        return name in self.const


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper

            return helper.get_attribute_value(a)
    return default


def _name(node) -> str:
    return f"node {node.name or '<unnamed>'!r} ({node.op_type})"


def check_tensorrt_compat(model: Union[str, Path, "onnx.ModelProto"],  # noqa: F821
                          profile: Union[str, Profile] = "tensorrt") -> List[str]:
    """Checks a (quantized) ONNX graph against the rules of a profile (:attr:`Profile.checker`).

    Args:
        model: ONNX file path or ``ModelProto``.
        profile: a profile name or :class:`~.profiles.Profile`: ``tensorrt`` applies every rule
            (TensorRT's parser and Q/DQ rules); ``cpu`` (an ONNX Runtime CPU model, never run by
            TensorRT) only ``onnx.checker`` and well-formed Q/DQ parameters.

    Returns:
        Violations, one string each (empty list: compatible).
    """
    import onnx

    rules = get_profile(profile).checker
    proto, where = _load(model)
    out: List[str] = []
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001 - any checker failure is a violation
        out.append(f"onnx.checker rejects the model: {str(exc).splitlines()[0]}")
    g = _Graph(proto)
    if rules is CheckerRules.QDQ_PARAMS:
        for n in g.nodes:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                for k, what in ((1, "scale"), (2, "zero-point")):
                    if len(n.input) > k and n.input[k] and not g.is_const(n.input[k]):
                        out.append(f"{_name(n)}: {what} is not an initializer")
        return out

    # ---- opset and op support
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx") and not MIN_OPSET <= imp.version <= MAX_OPSET:
            out.append(f"default-domain opset {imp.version} is outside the opsets TensorRT {TENSORRT_VERSION} "
                       f"parses ({MIN_OPSET}..{MAX_OPSET})")
    for n in g.nodes:
        if n.domain not in ("", "ai.onnx"):
            out.append(f"{_name(n)}: custom domain {n.domain!r} is not parsed by TensorRT "
                       f"{TENSORRT_VERSION} (no plugin is registered for it)")
        elif n.op_type not in SUPPORTED_OPS:
            reason = UNSUPPORTED_REASONS.get(n.op_type, f"not in the TensorRT {TENSORRT_VERSION} ONNX parser's supported ops")
            out.append(f"{_name(n)}: unsupported by TensorRT: {reason}")
    for name, vi in g.inputs.items():
        et = vi.type.tensor_type.elem_type
        if et not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            out.append(f"graph input {name!r}: element type {onnx.TensorProto.DataType.Name(et)}; "
                       "a quantized engine takes float input")

    # ---- Q/DQ parameters
    qparams: Dict[str, Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[int]]] = {}
    for n in g.nodes:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = zp = None
        if len(n.input) < 2 or not g.is_const(n.input[1]):
            out.append(f"{_name(n)}: scale must be an initializer")
        else:
            scale = np.asarray(g.const[n.input[1]])
            if not np.issubdtype(scale.dtype, np.floating) or not np.isfinite(scale).all() or (scale <= 0).any():
                out.append(f"{_name(n)}: scale must be positive and finite")
        if len(n.input) < 3 or not n.input[2]:
            if n.op_type == "QuantizeLinear":
                out.append(f"{_name(n)}: no zero-point, so it quantizes to uint8; TensorRT needs int8 with zero-point 0")
        elif not g.is_const(n.input[2]):
            out.append(f"{_name(n)}: zero-point must be an initializer")
        else:
            zp = np.asarray(g.const[n.input[2]])
            if zp.dtype == np.uint8:
                out.append(f"{_name(n)}: uint8 zero-point (asymmetric uint8 quantization); TensorRT needs signed int8")
            elif zp.dtype != np.int8:
                out.append(f"{_name(n)}: zero-point type {zp.dtype}; TensorRT's INT8 Q/DQ needs int8")
            if zp.size and np.any(zp != 0):
                out.append(f"{_name(n)}: non-zero zero-point {zp.reshape(-1)[:4].tolist()}; TensorRT needs "
                           "symmetric quantization (zero-point exactly 0)")
        if scale is not None and zp is not None and zp.shape != scale.shape:
            out.append(f"{_name(n)}: scale {scale.shape} and zero-point {zp.shape} differ in shape")
        qparams[n.output[0]] = (scale, zp, _attr(n, "axis", 1))

    for n in g.nodes:
        if n.op_type == "QuantizeLinear":
            x = n.input[0]
            if g.is_const(x):
                continue  # a constant quantized at build time (weights kept as Q/DQ pairs)
            scale = qparams[n.output[0]][0]
            if scale is not None and scale.size != 1:
                out.append(f"{_name(n)}: per-channel quantization of an activation; TensorRT quantizes "
                           "activations per tensor")
            cons = g.consumers.get(n.output[0], [])
            if n.output[0] in g.outputs:
                out.append(f"{_name(n)}: quantized tensor {n.output[0]!r} is a graph output; "
                           "TensorRT needs every QuantizeLinear followed by a DequantizeLinear")
            for c in cons:
                if c.op_type != "DequantizeLinear":
                    out.append(f"{_name(n)}: feeds {_name(c)}; a QuantizeLinear must feed DequantizeLinear only")
                else:
                    qs, qz, _ = qparams[n.output[0]]
                    ds, dz, _ = qparams[c.output[0]]
                    if qs is not None and ds is not None and (qs.shape != ds.shape or not np.allclose(qs, ds, rtol=1e-6)):
                        out.append(f"{_name(c)}: scale differs from its QuantizeLinear {n.name!r} "
                                   "(a requantization TensorRT cannot fuse)")
        elif n.op_type == "DequantizeLinear":
            x = n.input[0]
            p = g.producer.get(x)
            if g.is_const(x):
                w = g.const[x]
                if w.dtype == np.int32:
                    out.append(f"{_name(n)}: INT32 DequantizeLinear (a quantized bias); TensorRT has no INT32 "
                               "DequantizeLinear, keep biases in float")
                elif w.dtype == np.uint8:
                    out.append(f"{_name(n)}: uint8 weights; TensorRT needs signed int8")
                elif w.dtype != np.int8:
                    out.append(f"{_name(n)}: weights of type {w.dtype}; TensorRT's INT8 path needs int8")
            elif p is None or p.op_type != "QuantizeLinear":
                out.append(f"{_name(n)}: input {x!r} does not come from a QuantizeLinear or an initializer")
            else:
                for c in g.consumers.get(n.output[0], []):
                    if c.op_type not in INT8_CONSUMERS:
                        out.append(f"{_name(n)}: feeds {_name(c)}, which TensorRT cannot run or fuse in INT8 "
                                   "(the Q/DQ pair only adds a float round trip)")

    # ---- weighted ops
    for n in g.nodes:
        if n.op_type not in WEIGHTED_OP_TYPES or len(n.input) < 2:
            continue
        a_name, w_name = n.input[0], n.input[1]
        if n.op_type == "MatMul" and g.is_const(a_name) and not g.is_const(w_name):
            a_name, w_name = w_name, a_name
        a_dq = _dq_of(g, a_name)
        w_dq = _dq_of(g, w_name)
        w_const = g.is_const(w_name) or (w_dq is not None and g.is_const(w_dq.input[0]))
        if n.op_type in ("Conv", "ConvTranspose") and not w_const:
            out.append(f"{_name(n)}: weights are not an initializer (TensorRT needs constant Conv weights)")
        if (a_dq is None) != (w_dq is None) and w_const:
            half = "weights" if w_dq is not None else "input activation"
            out.append(f"{_name(n)}: only its {half} is quantized; TensorRT needs both the input and the "
                       "weights of a weighted op quantized, or neither")
        if len(n.input) > 2 and n.input[2] and _dq_of(g, n.input[2]) is not None:
            out.append(f"{_name(n)}: quantized bias; TensorRT takes the bias in float")
        if w_dq is None or not g.is_const(w_dq.input[0]):
            continue
        w = g.const[w_dq.input[0]]
        scale, _, axis = qparams.get(w_dq.output[0], (None, None, 1))
        if scale is None:
            continue
        if n.op_type in PER_CHANNEL_AXIS:
            want = PER_CHANNEL_AXIS[n.op_type]
            if scale.size == 1:
                out.append(f"{_name(n)}: per-tensor weight scale; the TensorRT profile requires per-channel "
                           f"weight scales on axis {want}")
                continue
        elif n.op_type == "Gemm":
            want = 0 if _attr(n, "transB", 0) else 1
        else:  # MatMul with constant B (K, N): output channels on the last axis
            want = w.ndim - 1
        if scale.size > 1:
            ax = axis if axis >= 0 else axis + w.ndim
            if ax != want or w.ndim <= want or scale.size != w.shape[want]:
                out.append(f"{_name(n)}: per-channel weight scales on axis {axis} ({scale.size} scales for weights "
                           f"{tuple(w.shape)}); TensorRT needs them on the output-channel axis {want}")
    return _dedupe(out)


def _dq_of(g: _Graph, name: str):
    p = g.producer.get(name)
    return p if p is not None and p.op_type == "DequantizeLinear" else None


def _dedupe(items: List[str]) -> List[str]:
    seen, out = set(), []
    for s in items:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def assert_tensorrt_compat(model, profile: Union[str, Profile] = "tensorrt", where: Optional[str] = None) -> None:
    """Raises :class:`TensorRTCompatError` when :func:`check_tensorrt_compat` finds violations."""
    v = check_tensorrt_compat(model, profile)
    if v:
        raise TensorRTCompatError(where or (str(model) if not hasattr(model, "graph") else "model"), v)
