"""ONNX export of the two backbone graphs and of the head weights (build side, needs torch).

Per model two graphs, each with a dynamic batch axis:

* ``glance.onnx``: ``image`` (N, 3, P, P) -> ``feature`` (N, F), ``policy_state`` (N, Hp)
  [, ``logits`` (N, classes) for families whose step-0 logits come from the backbone];
* ``focus.onnx``: ``image`` (N, 3, P, P) -> ``feature``, ``policy_state``.

``policy_state`` is the policy's state encoder applied to the feature map inside the graph, so
the feature map never leaves the engine (for ResNet/DenseNet this is the large Linear that must
run in INT8). The GRU and Linear heads go to ``heads.npz`` for the extension.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn

from .bundle import write_bytes_atomic
from .log import logger
from .model_desc import ModelDesc
from .models.gfnet import GFNet

#: Opset that TensorRT 10.3 (JetPack 6) parses and ONNX Runtime runs.
DEFAULT_OPSET = 17
INPUT = "image"
FEATURE, POLICY_STATE, LOGITS = "feature", "policy_state", "logits"


class BackboneGraph(nn.Module):
    """Encoder + policy state encoder (+ backbone classifier) as one exportable module."""

    def __init__(self, model: GFNet, which: str) -> None:
        super().__init__()
        if which not in ("glance", "focus"):
            raise ValueError(f"graph must be 'glance' or 'focus', got {which!r}")
        self.encoder = model.model_prime if which == "glance" else model.model
        self.policy = model.policy
        self.with_logits = which == "glance" and model.spec.step0 == "backbone"

    def forward(self, image: torch.Tensor):
        pooled, fmap = self.encoder(image)
        state = self.policy.encode(fmap)
        if self.with_logits:
            return pooled, state, self.encoder.logits(pooled)
        return pooled, state

    @property
    def output_names(self) -> List[str]:
        return [FEATURE, POLICY_STATE] + ([LOGITS] if self.with_logits else [])


def torchscript_export(net: nn.Module, size: int, dst, input_name: str, output_names: List[str],
                       opset: int = DEFAULT_OPSET) -> None:
    """``net`` on float32 (N, 3, size, size) images -> ONNX at ``dst`` (a path or a binary file),
    batch dimension dynamic, constants folded, with torch's TorchScript exporter: deprecated in
    favour of dynamo (which needs onnxscript), it still produces the plain opset-17 graphs
    TensorRT 10.3 parses (its deprecation warning is not shown)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net, (torch.zeros(1, 3, size, size),), dst,
            input_names=[input_name], output_names=list(output_names),
            dynamic_axes={n: {0: "batch"} for n in [input_name, *output_names]},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )


def export_graph(
    model: GFNet, which: str, path: Path, opset: int = DEFAULT_OPSET, simplify: bool = True
) -> Path:
    """Exports one backbone graph to ``path`` (checked with onnx.checker, simplified with onnxsim).

    Returns:
        ``path``.
    """
    import io

    import onnx

    graph = BackboneGraph(model, which).eval()
    P = model.spec.patch_size
    names = graph.output_names
    buf = io.BytesIO()
    torchscript_export(graph, P, buf, INPUT, names, opset)
    proto = onnx.load_from_string(buf.getvalue())
    if simplify:
        import onnxsim

        simplified, ok = onnxsim.simplify(proto)
        if ok:
            proto = simplified
        else:  # pragma: no cover - onnxsim reports its own check failure
            logger.warning("onnxsim could not validate the simplified %s graph; keeping the original", which)
    proto.doc_string = f"gfnet-edge {which} graph of {model.spec.model_name} (P={P})"
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, proto.SerializeToString())
    return path


def head_arrays(model: GFNet) -> Dict[str, np.ndarray]:
    """The GRU / Linear head weights the runtime's extension needs, as float32 arrays.

    Keys: ``cls.*`` (GRU: ``w_ih, w_hh, b_ih, b_hh, fc.w, fc.b``; cascaded: ``fc_K.w, fc_K.b``
    for K = 2..T) and ``pol.*`` (``w_ih, w_hh, b_ih, b_hh, actor.w, actor.b``).
    """
    def a(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().cpu().float().numpy())

    out: Dict[str, np.ndarray] = {}
    fc = model.fc
    if fc.kind == "gru":
        out.update({
            "cls.w_ih": a(fc.rnn.weight_ih_l0), "cls.w_hh": a(fc.rnn.weight_hh_l0),
            "cls.b_ih": a(fc.rnn.bias_ih_l0), "cls.b_hh": a(fc.rnn.bias_hh_l0),
            "cls.fc.w": a(fc.fc.weight), "cls.fc.b": a(fc.fc.bias),
        })
    else:
        for k in range(2, model.spec.steps + 1):
            out[f"cls.fc_{k}.w"] = a(fc.head(k).weight)
            out[f"cls.fc_{k}.b"] = a(fc.head(k).bias)
    pol = model.policy
    out.update({
        "pol.w_ih": a(pol.gru.weight_ih_l0), "pol.w_hh": a(pol.gru.weight_hh_l0),
        "pol.b_ih": a(pol.gru.bias_ih_l0), "pol.b_hh": a(pol.gru.bias_hh_l0),
        "pol.actor.w": a(pol.actor[0].weight), "pol.actor.b": a(pol.actor[0].bias),
    })
    return out


def export_heads(model: GFNet, path: Path) -> Path:
    """Writes :func:`head_arrays` to an ``.npz`` (no pickled objects)."""
    import io

    buf = io.BytesIO()
    np.savez(buf, **head_arrays(model))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buf.getvalue())
    return path


def export_model(
    model: GFNet, out_dir: Path, opset: int = DEFAULT_OPSET, simplify: bool = True
) -> Dict[str, Path]:
    """Exports ``glance.onnx``, ``focus.onnx`` and ``heads.npz`` into ``out_dir``."""
    out_dir = Path(out_dir)
    return {
        "glance": export_graph(model, "glance", out_dir / "glance.onnx", opset, simplify),
        "focus": export_graph(model, "focus", out_dir / "focus.onnx", opset, simplify),
        "heads": export_heads(model, out_dir / "heads.npz"),
    }


def model_desc(model: GFNet) -> ModelDesc:
    """The device side's description of ``model`` (from its spec and, for a demo model, its task)."""
    meta = getattr(model, "meta", {}) or {}
    demo = meta.get("demo_data") or {}
    return ModelDesc.from_spec(model.spec, demo.get("config"), meta.get("classes"))


def manifest_model(model: GFNet) -> Dict[str, object]:
    """The ``model`` entry of a bundle manifest: :func:`model_desc` as JSON-ready data."""
    return model_desc(model).to_dict()
