"""ONNX Runtime backend: CPU (or any execution provider ONNX Runtime has here)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import numpy as np

from ...errors import InputError, UnavailableError
from .base import GRAPHS, Runner

if TYPE_CHECKING:  # pragma: no cover
    from . import RunnerRequest


def session_options(threads: Optional[int] = None):
    """ONNX Runtime session options: full graph optimisation, deterministic thread counts, and
    intra-op threads that spin during a run but stop when it ends.

    Spinning (ONNX Runtime's default) keeps the worker threads busy-waiting for the next
    parallel section: fast inside a run, but after the run they go on burning cores (35 ms of
    CPU in the 200 ms after one 2-thread run) and take them from whatever runs next -- the
    extension's kernels between two backbone runs, or another session.
    ``session.force_spinning_stop`` keeps the spinning inside runs only. On an idle 2-core VM,
    demo model, batch 1, 2 threads: 0.70x (fp32) and 0.95x (INT8) the per-image time of
    sessions that never spin (``bench/ort_threads.py``, docs/benchmarks.md).

    Args:
        threads: intra-op threads (``None``: ONNX Runtime's default).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 3
    return so


def load_session(path: Path, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None):
    """Loader: an ``InferenceSession`` for one ONNX file (options: :func:`session_options`),
    with clear errors."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is a hard dependency
        raise UnavailableError("onnxruntime is not installed: pip install onnxruntime") from exc
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads),
                                    providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:
        raise InputError(f"{path}: ONNX Runtime cannot load this graph: {str(exc).splitlines()[0]}") from exc


def load_runner(request: "RunnerRequest") -> "OnnxRuntimeRunner":
    """The runner of the bundle's graph set ``request.precision`` (``auto``: ``int8-cpu`` when
    the bundle has it, else ``fp32``)."""
    precision = request.precision
    if precision == "auto":
        precision = "int8-cpu" if "int8-cpu" in request.bundle.manifest["graphs"] else "fp32"
    return OnnxRuntimeRunner(request.bundle.graph_paths(precision), precision, request.threads)


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
            s = load_session(self.graphs[g], self.threads, self.providers)
            self.sessions[g] = s
            self.outputs[g] = [o.name for o in s.get_outputs()]

    def _deactivate(self) -> None:
        self.sessions.clear()

    def _run(self, graph: str, image: np.ndarray) -> Dict[str, np.ndarray]:
        outs = self.sessions[graph].run(None, {"image": np.ascontiguousarray(image, dtype=np.float32)})
        return dict(zip(self.outputs[graph], outs))
