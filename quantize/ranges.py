"""Per-tensor ranges that bypass the calibration method: the min / max of the FP32 graph's
tensors of some roles (:class:`~.profiles.TensorRole`) on the calibration inputs, given to ONNX
Runtime's quantizer as ``TensorQuantOverrides``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional

import numpy as np

from .probe import probe
from .profiles import TensorRole


def role_tensors(model, roles: FrozenSet[TensorRole]) -> List[str]:
    """Names of the activation tensors of ``roles`` in the float ``model``."""
    inits = {t.name for t in model.graph.initializer}
    out: List[str] = []
    if TensorRole.GRAPH_INPUT in roles:
        out += [i.name for i in model.graph.input if i.name not in inits]
    if TensorRole.FC_INPUT in roles:
        for n in model.graph.node:
            if n.op_type in ("Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits and n.input[0] not in inits:
                out.append(n.input[0])
    return list(dict.fromkeys(out))


def minmax_overrides(path: Path, roles: FrozenSet[TensorRole], x: np.ndarray, batch: int = 64,
                     threads: Optional[int] = None) -> Dict[str, List[Dict[str, Any]]]:
    """``TensorQuantOverrides`` entries ``{tensor: [{"rmin", "rmax"}]}`` for the tensors of
    ``roles`` in the float graph at ``path``, from its outputs on the inputs ``x``."""
    import onnx

    model = onnx.load(str(path))
    names = role_tensors(model, roles)
    if not names:
        return {}
    lo = {n: 0.0 for n in names}  # ranges include 0 (symmetric and asymmetric alike)
    hi = {n: 0.0 for n in names}
    for res in probe(model, names, x, batch, threads):
        for n in names:
            lo[n] = min(lo[n], float(np.min(res[n])))
            hi[n] = max(hi[n], float(np.max(res[n])))
    return {n: [{"rmin": np.array(lo[n], np.float32), "rmax": np.array(hi[n], np.float32)}] for n in names}
