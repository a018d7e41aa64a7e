"""What every backend provides: run one backbone graph on a batch.

Backends follow a loader/runner split: a runner owns sessions, engines and buffers, and does
nothing on the device until :meth:`Runner.activate` (or ``with runner:``).
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

GRAPHS = ("glance", "focus")


class Runner:
    """Base class. Subclasses implement :meth:`_activate`, :meth:`_run` and :meth:`_deactivate`.

    Attributes:
        name: backend name (``onnxruntime``, ``tensorrt``, ``torch``).
        precision: what the graphs run in (``fp32``, ``int8-cpu`` ...).
        max_batch: the largest batch one call accepts (``None``: unlimited).
    """

    name = "base"
    max_batch = None

    def __init__(self, precision: str) -> None:
        self.precision = precision
        self.active = False

    def activate(self) -> "Runner":
        if not self.active:
            self._activate()
            self.active = True
        return self

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def run(self, graph: str, image: np.ndarray) -> Dict[str, np.ndarray]:
        """Runs ``graph`` ("glance" or "focus") on ``image`` (N, 3, P, P) float32.

        Returns:
            ``{"feature": (N, F), "policy_state": (N, H)[, "logits": (N, classes)]}`` as float32.
        """
        if not self.active:
            raise RuntimeError(f"{self.name} runner is not active; call activate() first")
        if graph not in GRAPHS:
            raise ValueError(f"unknown graph {graph!r}")
        if self.max_batch is not None and image.shape[0] > self.max_batch:
            outs = [self._run(graph, image[i:i + self.max_batch]) for i in range(0, image.shape[0], self.max_batch)]
            return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        return self._run(graph, image)

    # to implement
    def _activate(self) -> None:
        raise NotImplementedError

    def _deactivate(self) -> None:
        pass

    def _run(self, graph: str, image: np.ndarray) -> Dict[str, np.ndarray]:
        raise NotImplementedError
