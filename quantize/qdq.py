"""Q/DQ insertion with ONNX Runtime's quantizer, plus the placement fixes GFNet / TensorRT need.

ONNX Runtime does the work (pre-processing, calibration, QDQ insertion, scales). Afterwards:

* :func:`restore_float_consumers`: ONNX Runtime shares one Q/DQ pair between all consumers of
  a tensor and, when a quantized tensor is a graph output, makes the output the dequantized
  copy. Here every consumer that is *not* quantized (a node kept in float by the
  mixed-precision search, or an op type the profile does not quantize) and every graph output
  gets the original float tensor back: ``feature`` and ``policy_state`` leave the graphs in
  float, and a node kept in float really sees float input.
* :func:`keep_residual_qdq_only` (:attr:`~.profiles.PostPass.RESIDUAL_SKIP_ONLY`): a residual Add
  keeps Q/DQ on its skip input only; the input coming straight from the last weighted op of the block stays float so
  that TensorRT fuses Conv + Add (TensorRT developer guide: "quantize the residual input in
  weighted-layer + add fusions", "do not quantize the outputs of weighted operations").
"""
from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from gfnet_edge.log import logger

from .options import OrtSettings, quant_type
from .profiles import WEIGHTED_OP_TYPES, CalibMethod, PostPass, Profile, get_profile

#: Activations ONNX Runtime's QDQ quantizer may remove (``QDQRemovableActivation``).
REMOVABLE_ACTIVATIONS = ("Relu", "Clip")


def preprocess(src: Path, dst: Path) -> Tuple[Path, Optional[str]]:
    """``quant_pre_process`` (symbolic shape inference + ONNX Runtime's basic optimisations).

    Returns ``(path, problem)``: on failure the original graph is copied and the reason returned.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_optimization=False, skip_onnx_shape=False,
                          skip_symbolic_shape=False)
        return dst, None
    except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation only
        logger.warning("quant_pre_process failed on %s (%s); quantizing the graph as exported", src, exc)
        shutil.copyfile(src, dst)
        return dst, f"{type(exc).__name__}: {exc}"


def weighted_nodes(model) -> List[Tuple[str, str]]:
    """``(name, op_type)`` of the weighted nodes (Conv, Gemm, MatMul with a constant operand)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type in WEIGHTED_OP_TYPES and len(n.input) > 1 and (n.input[1] in inits or n.input[0] in inits):
            out.append((n.name, n.op_type))
    return out


def _supports_cache() -> bool:
    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def run_quantize_static(src: Path, dst: Path, reader, settings: OrtSettings, method: Union[str, CalibMethod],
                        nodes_to_exclude: Sequence[str] = (), cache_path: Optional[Path] = None) -> None:
    """Calls ``onnxruntime.quantization.quantize_static`` (QDQ format) with a profile's settings.

    ``cache_path``: calibration ranges are stored there on the first call and reused after
    (ONNX Runtime's ``calibration_cache_path``), so the mixed-precision search calibrates once.
    """
    from onnxruntime.quantization import QuantFormat, quantize_static

    method = CalibMethod.parse(method)
    extra = dict(settings.extra_options)
    kwargs = {}
    if cache_path is not None and _supports_cache():
        kwargs["calibration_cache_path"] = str(cache_path)
        if Path(cache_path).is_file():
            reader = None
    if reader is not None and method.histogram:
        reader = _even_batches(reader)
    if reader is not None and len(reader) > 1:
        # collect statistics a few batches at a time (bounded memory for histogram methods)
        extra.setdefault("CalibStridedMinMax", _stride(len(reader)))
    import contextlib
    import io
    import logging

    buf = io.StringIO()  # ONNX Runtime's calibrators print their progress to stdout
    ort_log = logging.getLogger()
    level = ort_log.level
    ort_log.setLevel(max(level, logging.ERROR))  # and warn about pre-processing through the root logger
    try:
        with contextlib.redirect_stdout(buf):
            quantize_static(
                str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(settings.op_types_to_quantize), per_channel=settings.per_channel,
                reduce_range=settings.reduce_range, activation_type=quant_type(settings.activation_type),
                weight_type=quant_type(settings.weight_type), nodes_to_exclude=list(nodes_to_exclude),
                calibrate_method=method.ort, extra_options=extra, **kwargs,
            )
    finally:
        ort_log.setLevel(level)
        if buf.getvalue().strip():
            logger.debug("onnxruntime.quantization: %s", buf.getvalue().strip())


def _even_batches(reader):
    """ONNX Runtime's histogram calibrators stack the outputs of all batches, so batches must
    be of equal size: any other reader is drained and re-batched evenly."""
    from .calibration import GraphDataReader

    if isinstance(reader, GraphDataReader):
        return reader
    feeds = []
    while True:
        item = reader.get_next()
        if not item:
            break
        feeds.append(item)
    if not feeds:
        raise ValueError("the calibration data reader returned no data")
    if len(feeds[0]) != 1:
        raise ValueError("histogram calibration of multi-input graphs needs equal-size batches from the reader")
    name = next(iter(feeds[0]))
    data = np.concatenate([f[name] for f in feeds])
    return GraphDataReader(data, max(f[name].shape[0] for f in feeds), name, progress=False)


def _stride(num_batches: int, most: int = 4) -> int:
    for s in range(min(most, num_batches), 0, -1):
        if num_batches % s == 0:
            return s
    return 1


# ---------------------------------------------------------------------------------- post passes
def _index(model):
    producer, consumers = {}, {}
    for n in model.graph.node:
        for o in n.output:
            producer[o] = n
        for i in n.input:
            if i:
                consumers.setdefault(i, []).append(n)
    return producer, consumers


def _activation_qdq(model) -> Dict[str, Tuple[object, object, str]]:
    """dq_output -> (dq node, q node, float tensor) for Q -> DQ pairs on activations."""
    inits = {t.name for t in model.graph.initializer}
    producer, _ = _index(model)
    out = {}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        q = producer.get(n.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        out[n.output[0]] = (n, q, q.input[0])
    return out


def restore_float_consumers(model, quantized: Set[str]) -> int:
    """Gives non-quantized consumers and graph outputs the float tensor (see module doc).

    Args:
        model: quantized ``ModelProto`` (edited in place).
        quantized: names of the nodes the quantizer was asked to quantize.

    Returns:
        Number of rewired inputs / outputs.
    """
    changed = 0
    graph_outputs = {o.name for o in model.graph.output}
    # 1) graph outputs that ONNX Runtime turned into dequantized copies
    for dq_out, (dq, q, x) in list(_activation_qdq(model).items()):
        if dq_out in graph_outputs:
            producer, consumers = _index(model)
            p = producer.get(x)
            if p is None:
                continue
            new_dq = dq_out + "_DequantizeLinear_Output"
            for c in consumers.get(dq_out, []):
                for k, i in enumerate(c.input):
                    if i == dq_out:
                        c.input[k] = new_dq
            dq.output[0] = new_dq
            for k, o in enumerate(p.output):
                if o == x:
                    p.output[k] = dq_out
            for c in consumers.get(x, []):
                for k, i in enumerate(c.input):
                    if i == x:
                        c.input[k] = dq_out
            changed += 1
    # 2) consumers that are not quantized read the float tensor
    _, consumers = _index(model)
    for dq_out, (dq, q, x) in _activation_qdq(model).items():
        for c in consumers.get(dq_out, []):
            if c.name in quantized or c.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue
            for k, i in enumerate(c.input):
                if i == dq_out:
                    c.input[k] = x
                    changed += 1
    remove_dangling_qdq(model)
    return changed


def _depths(model) -> Dict[str, int]:
    """Longest path (in nodes) from the graph inputs to each tensor."""
    depth: Dict[str, int] = {i.name: 0 for i in model.graph.input}
    for t in model.graph.initializer:
        depth[t.name] = 0
    for n in model.graph.node:  # ONNX graphs are topologically sorted
        d = max((depth.get(i, 0) for i in n.input if i), default=0) + 1
        for o in n.output:
            depth[o] = d
    return depth


def _through_qdq(name: str, producer) -> str:
    p = producer.get(name)
    if p is not None and p.op_type == "DequantizeLinear":
        q = producer.get(p.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            return q.input[0]
    return name


def _from_weighted(name: str, producer) -> bool:
    p = producer.get(name)
    while p is not None and p.op_type in ("BatchNormalization", "Identity"):
        p = producer.get(p.input[0])
    return p is not None and p.op_type in WEIGHTED_OP_TYPES


def keep_residual_qdq_only(model) -> List[str]:
    """``tensorrt`` profile: residual Adds keep Q/DQ on the skip input only.

    For an Add with both inputs dequantized, the "backbone" input is the one produced by a
    weighted op (through BatchNormalization); when both are (a projection shortcut), the deeper
    one. That input is rewired to the float tensor. Adds with no weighted-op input keep both.

    Returns:
        Names of the Adds changed.
    """
    producer, _ = _index(model)
    depth = _depths(model)
    changed = []
    for n in model.graph.node:
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        dq = [producer.get(i) for i in n.input]
        if not all(d is not None and d.op_type == "DequantizeLinear" for d in dq):
            continue
        raw = [_through_qdq(i, producer) for i in n.input]
        weighted = [_from_weighted(r, producer) for r in raw]
        if not any(weighted):
            continue
        if all(weighted):
            k = 0 if depth.get(raw[0], 0) >= depth.get(raw[1], 0) else 1
        else:
            k = 0 if weighted[0] else 1
        n.input[k] = raw[k]
        changed.append(n.name)
    remove_dangling_qdq(model)
    return changed


def remove_dangling_qdq(model) -> int:
    """Removes Q/DQ nodes (and their initializers) whose outputs nobody reads."""
    removed = 0
    outputs = {o.name for o in model.graph.output}
    while True:
        _, consumers = _index(model)
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(consumers.get(o) for o in n.output) and not any(o in outputs for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
            removed += 1
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used or t.name in {i.name for i in model.graph.input}]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return removed


#: Single-input ops that follow a weighted op and stay in float with it when it is kept in float
#: (:attr:`~.profiles.PostPass.FLOAT_FOLLOWERS`): a float Conv -> Relu -> MaxPool run stays float up to
#: the next quantized op instead of running e.g. MaxPool in a slow NCHW uint8 kernel between two float ops.
FOLLOWERS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "MaxPool", "AveragePool",
             "GlobalAveragePool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")


def float_group(model, excluded: Iterable[str]) -> Set[str]:
    """``excluded`` plus the single-input follower ops of each excluded node (see :data:`FOLLOWERS`)."""
    consumers: Dict[str, List[object]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    by_name = {n.name: n for n in model.graph.node}
    consts = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                         for o in n.output}
    out = set(excluded)
    todo = [by_name[e] for e in excluded if e in by_name]
    while todo:
        n = todo.pop()
        for o in n.output:
            for c in consumers.get(o, []):
                data_inputs = [i for i in c.input if i and i not in consts]
                if c.op_type in FOLLOWERS and c.name not in out and len(set(data_inputs)) == 1:
                    out.add(c.name)
                    todo.append(c)
    return out


def quantized_node_names(model, op_types: Iterable[str], excluded: Iterable[str]) -> Set[str]:
    """Nodes of the float ``model`` the quantizer was asked to quantize."""
    ops, ex = set(op_types), set(excluded)
    return {n.name for n in model.graph.node if n.op_type in ops and n.name not in ex}


def quantize_graph(pre_path: Path, out_path: Path, reader, settings: OrtSettings, method: Union[str, CalibMethod],
                   profile: Union[str, Profile],
                   nodes_to_exclude: Sequence[str] = (), cache_path: Optional[Path] = None) -> Dict[str, object]:
    """Quantizes one pre-processed graph and applies the profile's post passes; returns what they did."""
    import onnx

    profile = get_profile(profile)
    pre = onnx.load(str(pre_path))
    followers: List[str] = []
    if PostPass.FLOAT_FOLLOWERS in profile.post_passes and nodes_to_exclude:
        group = float_group(pre, nodes_to_exclude)
        followers = sorted(group - set(nodes_to_exclude))
        nodes_to_exclude = group
    # ONNX Runtime removes a quantized Relu / Clip (folding it into the uint8 range of the Q
    # after it): the float tensor behind that Q is the activation's input, which is what
    # restore_float_consumers hands every reader left in float (a node kept in float, an op
    # type the profile does not quantize, a graph output). Activations such a reader reads
    # stay float ops (their quantized readers still get Q/DQ after them)
    quantized = quantized_node_names(pre, settings.op_types_to_quantize, nodes_to_exclude)
    float_reads = {o.name for o in pre.graph.output}
    float_reads |= {i for n in pre.graph.node if n.name not in quantized for i in n.input}
    protected = {n.name for n in pre.graph.node
                 if n.op_type in REMOVABLE_ACTIVATIONS and n.name in quantized and any(o in float_reads for o in n.output)}
    nodes_to_exclude = sorted(set(nodes_to_exclude) | protected)
    quantized -= protected
    # ONNX Runtime may rename a graph output to "<name>_QuantizeInput"; node names are kept
    tmp = out_path.with_name(out_path.stem + ".ort.onnx")
    run_quantize_static(pre_path, tmp, reader, settings, method, nodes_to_exclude, cache_path)
    model = onnx.load(str(tmp))
    tmp.unlink()
    info: Dict[str, object] = {"rewired_to_float": restore_float_consumers(model, quantized)}
    if followers:
        info["float_followers"] = followers
    if PostPass.RESIDUAL_SKIP_ONLY in profile.post_passes:
        info["residual_adds"] = keep_residual_qdq_only(model)
    model.producer_name = "gfnet-edge quantize (onnxruntime.quantization)"
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return info
