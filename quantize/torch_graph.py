"""A Q/DQ ONNX graph as a torch module whose quantizers are differentiable (fake quantization).

Used by :mod:`.finetune` to adjust a graph's float weights so that the INT8 graph made from them
matches the FP32 graph. The module runs the Q/DQ graph's nodes in order with torch operators:

* ``QuantizeLinear -> DequantizeLinear`` on an activation becomes fake quantization with the
  graph's fixed scale and zero point (round half to even as ONNX does, saturation to the integer
  type's range); the rounding passes gradients straight through, the saturation passes none;
* ``DequantizeLinear`` of a constant integer weight becomes a trainable float weight (initialised
  from the FP32 graph's weight of the same name where there is one) fake-quantized the way
  ONNX Runtime quantizes weights: symmetric, scale ``max|w| / qmax`` per output channel (or per
  tensor), on the integer range the graph's weight uses (``qmax`` = the largest |q| of its
  integers: 127 for int8 weights, 64 for ONNX Runtime's 7-bit ``reduce_range`` weights), so that
  quantizing the trained weights afterwards reproduces the training-time graph;
* float biases of Conv / Gemm are trainable; everything else is a constant.

Only the op types in :data:`OPS` are supported (those of the CNN backbones gfnet-edge exports);
:class:`UnsupportedGraph` names the first other one. ONNX Runtime's converter libraries
(onnx2torch and the like) do not map ``QuantizeLinear`` / ``DequantizeLinear``, which is why
this small interpreter exists.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import functools

import numpy as np

#: weight range of ONNX Runtime's symmetric int8 weights (``get_qmin_qmax_for_qType``); a graph's
#: own range is read from its integer weights (:func:`weight_qmax`)
WEIGHT_QMAX = 127
_QRANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


class UnsupportedGraph(ValueError):
    """The graph holds an op type or a pattern this interpreter does not run."""


def _attrs(node) -> Dict[str, object]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _round_ste(x):
    return x + (x.round() - x).detach()


def fake_quant(x, scale, zero_point, qmin: int, qmax: int):
    """``DequantizeLinear(QuantizeLinear(x))`` with straight-through rounding (``scale`` and
    ``zero_point`` broadcast against ``x``)."""
    import torch

    q = _round_ste(x / scale) + zero_point
    inside = (q >= qmin) & (q <= qmax)  # the integer range, ends included
    q = torch.where(inside, q, q.detach().clamp(qmin, qmax))
    return (q - zero_point) * scale


def weight_scale(w, axis: Optional[int], qmax: int = WEIGHT_QMAX):
    """ONNX Runtime's symmetric weight scale: ``max|w| / qmax`` per channel on ``axis`` (``None``:
    one scale), shaped to broadcast against ``w``; never 0."""
    a = w.detach().abs()
    if axis is None:
        m = a.max()
    else:
        dims = [d for d in range(w.dim()) if d != axis]
        m = a.amax(dim=dims, keepdim=True) if dims else a
    return (m / qmax).clamp_min(1e-12)


def weight_qmax(q: np.ndarray) -> int:
    """The integer range ``[-qmax, qmax]`` of a symmetric quantized weight: ONNX Runtime maps each
    channel's largest |w| to ``qmax`` (127 for int8, 64 with ``reduce_range``'s 7 bits), so it is
    the largest |q|; :data:`WEIGHT_QMAX` for an all-zero weight, which shows none."""
    m = int(np.abs(np.asarray(q, np.int64)).max()) if np.size(q) else 0
    return m if m > 0 else WEIGHT_QMAX


def _pads(p: Sequence[int], n: int) -> Tuple[List[int], bool]:
    """ONNX pads (begin..., end...) -> (torch F.pad list, symmetric?)."""
    p = list(p) if p else [0] * (2 * n)
    begin, end = p[:n], p[n:]
    torch_pad: List[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        torch_pad += [b, e]
    return torch_pad, begin == end


def _conv(node, x, w, b=None):
    import torch.nn.functional as F

    a = _attrs(node)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedGraph(f"Conv {node.name!r}: auto_pad is not supported")
    n = w.dim() - 2
    pad, sym = _pads(a.get("pads"), n)
    if not sym:
        x = F.pad(x, pad)
    padding = pad[::2][::-1] if sym else 0
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return conv(x, w, b, stride=a.get("strides", 1), padding=padding, dilation=a.get("dilations", 1),
                groups=a.get("group", 1))


def _pool(kind):
    def run(node, x):
        import torch.nn.functional as F

        a = _attrs(node)
        k = list(a["kernel_shape"])
        pad, sym = _pads(a.get("pads"), len(k))
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            if not sym:
                x = F.pad(x, pad, value=float("-inf"))
            return F.max_pool2d(x, k, a.get("strides", k), pad[::2][::-1] if sym else 0, ceil_mode=ceil)
        if not sym:
            raise UnsupportedGraph(f"AveragePool {node.name!r}: asymmetric pads are not supported")
        return F.avg_pool2d(x, k, a.get("strides", k), pad[::2][::-1], ceil_mode=ceil,
                            count_include_pad=bool(a.get("count_include_pad", 0)))
    return run


def _gemm(node, a_, b_, c=None):
    a = _attrs(node)
    if a.get("transA", 0):
        a_ = a_.t()
    if a.get("transB", 0):
        b_ = b_.t()
    y = a.get("alpha", 1.0) * (a_ @ b_)
    return y if c is None else y + a.get("beta", 1.0) * c


def _reduce_mean(node, x, axes=None):
    a = _attrs(node)
    ax = a.get("axes") if axes is None else [int(v) for v in axes.tolist()]
    keep = bool(a.get("keepdims", 1))
    return x.mean(dim=tuple(ax) if ax is not None else tuple(range(x.dim())), keepdim=keep)


def _flatten(node, x):
    axis = int(_attrs(node).get("axis", 1)) % max(x.dim(), 1)
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(lead, -1)


def _clip(node, x, lo=None, hi=None):
    a = _attrs(node)
    lo = a.get("min") if lo is None else lo
    hi = a.get("max") if hi is None else hi
    return x.clamp(min=lo, max=hi)


def _hard_sigmoid(node, x):
    a = _attrs(node)
    return (a.get("alpha", 0.2) * x + a.get("beta", 0.5)).clamp(0.0, 1.0)


def _reshape(node, x, shape):
    s = [int(v) for v in shape.tolist()]
    s = [x.shape[i] if v == 0 else v for i, v in enumerate(s)]
    return x.reshape(s)


def _concat(node, *xs):
    import torch

    return torch.cat(xs, dim=int(_attrs(node)["axis"]))


#: op type -> runner(node, *inputs)
OPS: Dict[str, Callable] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda n, a, b: a @ b,
    "Relu": lambda n, x: x.relu(),
    "Sigmoid": lambda n, x: x.sigmoid(),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": lambda n, x: x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
    "Clip": _clip,
    "Add": lambda n, a, b: a + b,
    "Mul": lambda n, a, b: a * b,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda n, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "ReduceMean": _reduce_mean,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Concat": _concat,
    "Identity": lambda n, x: x,
}


def QdqGraphModule(qdq, fp32):
    """A Q/DQ ``ModelProto`` as a trainable torch module (see :func:`_module_class`)."""
    return _module_class()(qdq, fp32)


@functools.lru_cache(maxsize=None)
def _module_class():
    """The module class, defined on first use (importing this module needs no torch)."""
    import torch

    class QdqGraphModule(torch.nn.Module):
        """A Q/DQ ``ModelProto`` as a trainable torch module.

        Args:
            qdq: the quantized graph (QDQ format, as :func:`~.qdq.quantize_graph` writes it).
            fp32: the FP32 graph it was quantized from (weights are initialised from it by name).

        Attributes:
            weights: trainable weights (fake-quantized in :meth:`forward`).
            weight_qmax: weight key -> the integer range ``[-qmax, qmax]`` its integers use in
                the graph (:func:`weight_qmax`), the grid it is fake-quantized to.
            biases: trainable float biases.
            param_names: parameter key -> initializer name in the FP32 graph.
        """

        def __init__(self, qdq, fp32) -> None:
            super().__init__()
            from onnx import numpy_helper

            g = qdq.graph
            inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
            fp32_inits = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
            consumers: Dict[str, List[object]] = {}
            for n in g.node:
                for i in n.input:
                    consumers.setdefault(i, []).append(n)
            for n in g.node:
                if n.op_type not in OPS and n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                    raise UnsupportedGraph(f"op type {n.op_type} (node {n.name!r}) is not supported by fine-tuning")
                if n.op_type == "QuantizeLinear" and any(c.op_type != "DequantizeLinear"
                                                         for c in consumers.get(n.output[0], [])):
                    raise UnsupportedGraph(f"QuantizeLinear {n.name!r} feeds an op other than DequantizeLinear")
            self.nodes = list(g.node)
            self.input_names = [i.name for i in g.input if i.name not in inits]
            self.output_names = [o.name for o in g.output]
            self.consts = {name: torch.from_numpy(np.array(a, dtype=np.float32) if a.dtype.kind == "f" else np.array(a))
                           for name, a in inits.items()}
            self.weights = torch.nn.ParameterDict()
            self.biases = torch.nn.ParameterDict()
            self.param_names: Dict[str, str] = {}
            self.weight_qmax: Dict[str, int] = {}
            self._weight_of: Dict[str, Tuple[str, Optional[int]]] = {}  # DQ output -> (key, channel axis)
            for n in g.node:
                if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype in (np.int8, np.uint8):
                    self._add_weight(n, inits, fp32_inits)
            self._bias_key: Dict[str, str] = {}
            for n in g.node:
                if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2] in inits \
                        and inits[n.input[2]].dtype.kind == "f" and n.input[2] not in self._bias_key:
                    key = f"b{len(self.biases)}"
                    self.biases[key] = torch.nn.Parameter(self.consts[n.input[2]].clone())
                    self.param_names[key] = n.input[2]
                    self._bias_key[n.input[2]] = key

        def _add_weight(self, node, inits, fp32_inits) -> None:
            q = inits[node.input[0]]
            scale = inits[node.input[1]].astype(np.float64)
            if len(node.input) > 2 and node.input[2] in inits and np.any(inits[node.input[2]] != 0):
                raise UnsupportedGraph(f"weight {node.input[0]!r} is not symmetric (zero point != 0)")
            axis = int(_attrs(node).get("axis", 1)) % q.ndim if np.size(scale) > 1 else None
            src = node.input[0][:-len("_quantized")] if node.input[0].endswith("_quantized") else node.input[0]
            if src in fp32_inits and fp32_inits[src].shape == q.shape:
                w = np.array(fp32_inits[src], dtype=np.float32)
            else:  # no FP32 weight of that name: start from the dequantized one
                shape = [1] * q.ndim
                if axis is not None:
                    shape[axis] = -1
                w = (q.astype(np.float64) * np.reshape(scale, shape)).astype(np.float32)
            key = f"w{len(self.weights)}"
            self.weights[key] = torch.nn.Parameter(torch.from_numpy(w))
            self.param_names[key] = src
            self.weight_qmax[key] = weight_qmax(q)
            self._weight_of[node.output[0]] = (key, axis)

        def _value(self, env, name: str):
            if name in env:
                return env[name]
            key = self._bias_key.get(name)
            return self.biases[key] if key is not None else self.consts[name]

        def forward(self, *inputs) -> List[torch.Tensor]:
            env: Dict[str, object] = dict(zip(self.input_names, inputs))
            pending: Dict[str, Tuple[object, str, Optional[str]]] = {}  # Q output -> (x, scale, zero point)
            for n in self.nodes:
                op = n.op_type
                if op == "DequantizeLinear" and n.output[0] in self._weight_of:
                    key, axis = self._weight_of[n.output[0]]
                    w, qmax = self.weights[key], self.weight_qmax[key]
                    env[n.output[0]] = fake_quant(w, weight_scale(w, axis, qmax), 0.0, -qmax, qmax)
                elif op == "QuantizeLinear":
                    pending[n.output[0]] = (self._value(env, n.input[0]), n.input[1],
                                            n.input[2] if len(n.input) > 2 and n.input[2] else None)
                elif op == "DequantizeLinear" and n.input[0] in pending:
                    x, s_name, z_name = pending[n.input[0]]
                    z = self.consts[z_name] if z_name else torch.zeros((), dtype=torch.int8)
                    qmin, qmax = _QRANGE[np.dtype(z.numpy().dtype)]
                    env[n.output[0]] = fake_quant(x, self.consts[s_name], z.to(torch.float32), qmin, qmax)
                elif op == "DequantizeLinear":  # a constant integer tensor that is not a weight (int32 bias)
                    q, s = self.consts[n.input[0]].double(), self.consts[n.input[1]].double()
                    z = self.consts[n.input[2]].double() if len(n.input) > 2 and n.input[2] else 0.0
                    env[n.output[0]] = ((q - z) * s).float()
                else:
                    env[n.output[0]] = OPS[op](n, *[self._value(env, i) if i else None for i in n.input])
            return [env[o] for o in self.output_names]

        def float_weights(self) -> Dict[str, np.ndarray]:
            """FP32-graph initializer name -> trained value (weights and biases)."""
            out = {self.param_names[k]: p.detach().numpy().copy() for k, p in self.weights.items()}
            out.update({self.param_names[k]: p.detach().numpy().copy() for k, p in self.biases.items()})
            return out

    return QdqGraphModule
