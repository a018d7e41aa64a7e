"""Running a graph on calibration inputs with some of its inner tensors as extra outputs (range
measurement, bias correction, fine-tuning targets all read tensors this way)."""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Sequence

import numpy as np


def with_outputs(model, names: Sequence[str]):
    """A copy of ``model`` whose outputs also include the tensors ``names`` (float)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    return m


def session(model, threads: Optional[int] = None):
    """An ONNX Runtime CPU session of ``model`` with basic graph optimisations only: the extended
    ones fuse e.g. Conv + Add even when the Conv's output is asked for as a graph output."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def probe(model, names: Sequence[str], x: np.ndarray, batch: int = 32,
          threads: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
    """Runs ``model`` (its one input) on ``x`` in batches of ``batch``; yields per batch
    ``{tensor name: array}`` of the graph's outputs and the tensors ``names``."""
    sess = session(with_outputs(model, names), threads)
    inp = sess.get_inputs()[0].name
    outs = [o.name for o in sess.get_outputs()]
    for i in range(0, len(x), batch):
        yield dict(zip(outs, sess.run(None, {inp: np.ascontiguousarray(x[i:i + batch], dtype=np.float32)})))


def outputs(model, x: np.ndarray, batch: int = 64, threads: Optional[int] = None) -> Dict[str, np.ndarray]:
    """The graph's outputs on all of ``x`` (concatenated over batches, float32)."""
    parts = list(probe(model, (), x, batch, threads))
    return {k: np.concatenate([p[k] for p in parts]).astype(np.float32) for k in parts[0]}
