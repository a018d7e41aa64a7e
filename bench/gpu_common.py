"""Shared pieces of the GPU benchmarks (``bench/e2e_gpu.py``, ``bench/gpu_shapes.py``).

* :class:`ModelRunner` -- the torch runner over an in-memory GFNet (no bundle, no ONNX export),
  so random-weight ImageNet-shaped models can be timed without building bundles.
* :func:`gfnet_driver` -- the runtime's loop (:class:`gfnet_edge.runtime.driver.Driver`) over
  such a runner, with CUDA heads (device place, CUDA graphs unless switched off).
* :class:`Graphed` -- a torch callable on fixed-shape inputs captured as a CUDA graph per batch
  (the static baselines and the backbones timed alone use it), so both sides of a comparison
  run with the same launch technology. On the CPU (dry runs) it calls eagerly.
* :func:`per_call_ms` -- wall-clock milliseconds per call, the GPU synchronized.

Everything works on the CPU too, eagerly, so the scripts can be dry-run without a GPU.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from common import time_calls  # (importing common also imports the checkout)

DTYPES = {"fp32": "float32", "fp16": "float16"}


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def per_call_ms(fn: Callable[[], Any], device: str, reps: int = 50, warmup: int = 5,
                min_seconds: float = 0.2) -> float:
    """Median wall-clock ms of one call of ``fn`` (each call completes on the GPU before the
    clock stops; :func:`common.time_calls`): ``reps`` calls at least, and at least
    ``min_seconds`` of them."""
    def call() -> None:
        fn()
        sync(device)

    return float(np.median(time_calls(call, warmup=warmup, repeat=reps, min_seconds=min_seconds))) * 1e3


def backbone_graphs(model, device: str, dtype: str) -> Dict[str, Any]:
    """The GFNet's backbone graphs (``glance``, ``focus``: :class:`gfnet_edge.export.BackboneGraph`)
    on ``device`` in ``dtype``, made from a copy of ``model``: converting them to float16 leaves
    ``model`` as it was for the heads and for runs at other precisions."""
    import copy

    from gfnet_edge.export import BackboneGraph
    from gfnet_edge.runtime.backends.base import GRAPHS

    own = copy.deepcopy(model)
    graphs = {g: BackboneGraph(own, g).eval().to(device) for g in GRAPHS}
    return {g: (m.half() if dtype == "float16" else m) for g, m in graphs.items()}


def make_runner(model, device: str, dtype: str):
    """A :class:`gfnet_edge.runtime.backends.torch.TorchRunner` over an in-memory GFNet
    (:func:`backbone_graphs`)."""
    from pathlib import Path
    from types import SimpleNamespace

    from gfnet_edge.export import model_desc
    from gfnet_edge.runtime.backends.torch import TorchRunner

    class ModelRunner(TorchRunner):
        def __init__(self) -> None:
            fake = SimpleNamespace(manifest={"checkpoint": "-"}, root=Path("."),
                                   model=model_desc(model), path=lambda p: Path(p))
            super().__init__(fake, device=device, dtype=dtype)

        def _activate(self) -> None:
            self.graphs = backbone_graphs(model, device, dtype)

    return ModelRunner().activate()


def gfnet_driver(model, device: str, dtype: str, cuda_graphs: bool = True, conditional=None):
    """The runtime's loop over ``model`` (a GFNet) on ``device``: heads from the model's
    weights, CUDA heads (device place) on ``cuda``; ``conditional``: the batch-1 loop graph's
    mode (``None``: from the environment)."""
    from gfnet_edge.export import head_arrays, model_desc
    from gfnet_edge.runtime.driver import Driver
    from gfnet_edge.runtime.heads import HeadSet
    from gfnet_edge.runtime.profile import Profiler

    mm = model_desc(model)
    runner = make_runner(model, device, dtype)
    heads = HeadSet(head_arrays(model), mm, device=device)
    return Driver(mm, runner, heads, Profiler(False), cuda_graphs=cuda_graphs, conditional=conditional)


class Graphed:
    """``fn(x)`` on a fixed-shape input captured as a CUDA graph per batch size.

    ``__call__(x)`` copies ``x`` (a tensor on the device, or a host array / tensor uploaded
    first) into the graph's input, replays, and returns the graph's output tensor (valid until
    the next call with the same batch). Eager on the CPU.
    """

    def __init__(self, fn: Callable[[Any], Any], device: str) -> None:
        self.fn, self.device = fn, device
        self.graphs: Dict[tuple, tuple] = {}
        self.pool = None

    def __call__(self, x):
        import torch

        if self.device != "cuda":
            with torch.inference_mode():
                return self.fn(torch.as_tensor(x))
        key = (tuple(x.shape), str(x.dtype))
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(x)
        graph, static_in, static_out = g
        static_in.copy_(torch.as_tensor(x), non_blocking=False)
        graph.replay()
        return static_out

    def _capture(self, x):
        import torch

        static_in = torch.empty(tuple(x.shape), dtype=torch.as_tensor(x).dtype, device="cuda")
        static_in.copy_(torch.as_tensor(x))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the capture (cuDNN / cuBLAS set-up)
                self.fn(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            static_out = self.fn(static_in)
        if self.pool is None:
            self.pool = graph.pool()
        return graph, static_in, static_out


def replay_ms(g: "Graphed", x, device: str, k: int = 20) -> float:
    """ms per replay of ``g``'s graph for ``x``, ``k`` replays back to back between two
    synchronizations: the backbone's GPU time, without the input copy, the launch and the
    synchronization that one call of ``g`` adds (the loop it is subtracted from pays those once
    per call, not once per step). Eager calls on the CPU."""
    if device != "cuda":
        return per_call_ms(lambda: g(x), device)
    g(x)  # captured here
    graph = g.graphs[(tuple(x.shape), str(x.dtype))][0]
    return per_call_ms(lambda: [graph.replay() for _ in range(k)], device) / k


def close_driver(driver) -> None:
    """Frees a driver's GPU buffers and graphs, then its runner, before the next one allocates."""
    driver.close()
    driver.runner.deactivate()


def forced_profile(T: int, base: Sequence[float]) -> np.ndarray:
    """Exit fractions per step for a T-step model from a measured profile ``base`` (fractions
    of a shorter or equal model): the first ``len(base) - 1`` steps keep theirs, the rest of the
    images spread evenly over the remaining steps."""
    base = [float(v) for v in base]
    head = base[:min(len(base) - 1, T - 1)]
    rest = 1.0 - sum(head)
    tail = T - len(head)
    return np.asarray(head + [rest / tail] * tail, np.float64)


def profile_thresholds(probs: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """Thresholds under which the images of the trace ``probs`` (T, N, C) exit with the given
    fractions per step (the reference threshold fit)."""
    from gfnet_edge.evaluate import fit_thresholds

    return fit_thresholds(probs, np.asarray(fractions, np.float32))


def run_loop(driver, images, glance, n: int, thresholds: Optional[Sequence[float]]):
    """One call of the loop from inputs already in the place (device pointers on the GPU,
    numpy arrays on the CPU)."""
    if driver.on_device:
        return driver.run_device(images, glance, n, thresholds)
    return driver.run(images, glance, thresholds)
