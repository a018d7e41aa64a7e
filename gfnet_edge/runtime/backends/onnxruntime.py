"""ONNX Runtime backend: CPU (or any execution provider ONNX Runtime has here)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ...errors import InputError, UnavailableError
from .base import GRAPHS, Runner


def session_options(threads: Optional[int] = None, spinning: bool = True):
    """ONNX Runtime session options: full graph optimisation, deterministic thread counts.

    Args:
        threads: intra-op threads (``None``: ONNX Runtime's default).
        spinning: let idle intra-op threads spin after a run (ONNX Runtime's default). The GFNet
            loop turns it off: between two backbone runs the extension's own threads work, and
            spinning ONNX Runtime threads take the cores from them (measured on 2 cores: the
            per-image latency of the demo at 2 threads fell from 23.0 to 14.9 ms under load).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def load_session(path: Path, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                 spinning: bool = True):
    """Loader: an ``InferenceSession`` for one ONNX file, with clear errors (``spinning``: see
    :func:`session_options`)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is a hard dependency
        raise UnavailableError("onnxruntime is not installed: pip install onnxruntime") from exc
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads, spinning),
                                    providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:
        raise InputError(f"{path}: ONNX Runtime cannot load this graph: {str(exc).splitlines()[0]}") from exc


class OnnxRuntimeRunner(Runner):
    """Runs the glance/focus ONNX graphs with ONNX Runtime.

    Args:
        graphs: ``{"glance": path, "focus": path}``.
        precision: label of the graph set.
        threads: intra-op threads (``None``: ONNX Runtime's default).
        providers: execution providers (default CPU).
    """

    name = "onnxruntime"

    def __init__(self, graphs: Dict[str, Path], precision: str, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None) -> None:
        super().__init__(precision)
        self.graphs = dict(graphs)
        self.threads = threads
        self.providers = providers
        self.sessions: Dict[str, object] = {}
        self.outputs: Dict[str, List[str]] = {}

    def _activate(self) -> None:
        for g in GRAPHS:
            # No spinning: the extension's kernels run between two backbone runs (see session_options).
            s = load_session(self.graphs[g], self.threads, self.providers, spinning=False)
            self.sessions[g] = s
            self.outputs[g] = [o.name for o in s.get_outputs()]

    def _deactivate(self) -> None:
        self.sessions.clear()

    def _run(self, graph: str, image: np.ndarray) -> Dict[str, np.ndarray]:
        outs = self.sessions[graph].run(None, {"image": np.ascontiguousarray(image, dtype=np.float32)})
        return dict(zip(self.outputs[graph], outs))
