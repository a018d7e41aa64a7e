"""PyTorch backend: runs the bundle's checkpoint with the reference modules (build side; for
debugging and parity). Needs torch and a bundle built with ``--include-checkpoint``."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from ...errors import InputError, UnavailableError
from .base import Runner


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, bundle, threads: Optional[int] = None) -> None:
        super().__init__("fp32-torch")
        ck = bundle.manifest.get("checkpoint")
        if not ck:
            raise InputError(
                f"{bundle.root}: the torch backend needs the checkpoint inside the bundle; "
                "rebuild with `gfnet-edge build-engine CKPT -o BUNDLE --include-checkpoint`"
            )
        self.path = bundle.path(ck)
        self.threads = threads
        self.graphs = {}

    def _activate(self) -> None:
        try:
            import torch
        except ImportError as exc:
            raise UnavailableError("the torch backend needs PyTorch: pip install 'gfnet-edge[build]'") from exc
        from ...export import BackboneGraph
        from ...models.checkpoint import load_checkpoint

        if self.threads:
            torch.set_num_threads(int(self.threads))
        model = load_checkpoint(self.path)
        self.graphs = {g: BackboneGraph(model, g).eval() for g in ("glance", "focus")}

    def _run(self, graph: str, image: np.ndarray) -> Dict[str, np.ndarray]:
        import torch

        g = self.graphs[graph]
        with torch.no_grad():
            outs = g(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)))
        return {n: o.numpy() for n, o in zip(g.output_names, outs)}
