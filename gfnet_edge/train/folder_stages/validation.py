"""Validation during training: the GFNet's step probabilities and the static baseline's
accuracy on the val split, sharded over the processes and gathered in order."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, Tuple

import numpy as np
import torch

from ..folder_data import ShardSampler, make_loader, normalise
from .sigint import SIGINT


class Validation:
    """Validation methods of a trainer (reads ``model``, ``static``, ``val_set``, ``val_labels``,
    ``spec``, ``cfg``, ``ctx``, ``local_batch`` and ``autocast`` of the class it is mixed into)."""

    def _val_loader(self, limit: int = 0):
        """An iterator over this process's shard of the first ``limit`` val images (0: all)."""
        n = len(self.val_set) if not limit else min(limit, len(self.val_set))
        sampler = ShardSampler(n, self.ctx.rank, self.ctx.world)
        return SIGINT.started(make_loader(self.val_set, max(1, self.local_batch * 2), sampler, self.cfg.workers,
                                          self.ctx.device.type == "cuda", False, self.cfg.worker_start))

    @torch.no_grad()
    def val_probs(self, limit: int = 0, amp: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """``(probs (T, n, K), labels (n,))`` of the GFNet on val (all ranks; gathered in order)."""
        was = {id(mod): mod.training for mod in self.model.modules()}
        self.model.eval()
        idx_l, probs_l = [], []
        for x, _, idx in self._val_loader(limit):
            x = normalise(x.to(self.ctx.device), self.spec.mean, self.spec.std)
            with (self.autocast() if amp else nullcontext()):
                probs_l.append(self.model.trace(x).probs.float().cpu().numpy())
            idx_l.append(idx.numpy())
        for mod in self.model.modules():
            mod.train(was[id(mod)])
        K = self.spec.num_classes
        mine = (np.concatenate(idx_l) if idx_l else np.zeros(0, np.int64),
                np.concatenate(probs_l, axis=1) if probs_l else np.zeros((self.spec.steps, 0, K), np.float32))
        parts = self.ctx.gather_objects(mine)
        idx = np.concatenate([p[0] for p in parts])
        probs = np.concatenate([p[1] for p in parts], axis=1)
        order = np.argsort(idx)
        return probs[:, order], self.val_labels[idx[order]]

    def evaluate(self) -> Dict[str, float]:
        """Val accuracy per step (``val_acc_t0`` ...) on the first ``cfg.eval_max`` images."""
        probs, labels = self.val_probs(self.cfg.eval_max, amp=True)
        acc = (probs.argmax(2) == labels[None]).mean(1) * 100
        return {f"val_acc_t{t}": round(float(a), 2) for t, a in enumerate(acc)}

    @torch.no_grad()
    def evaluate_static(self) -> Dict[str, float]:
        """The static baseline's val accuracy (``val_acc``) on the first ``cfg.eval_max`` images."""
        net = self.static
        was = net.training
        net.eval()
        correct = torch.zeros(2, dtype=torch.float64)
        for x, y, _ in self._val_loader(self.cfg.eval_max):
            x = normalise(x.to(self.ctx.device), self.spec.mean, self.spec.std)
            with self.autocast():
                pred = net(x).argmax(1).cpu()
            correct += torch.tensor([(pred == y).sum().item(), len(y)], dtype=torch.float64)
        net.train(was)
        c = self.ctx.all_sum(correct)
        return {"val_acc": round(float(100 * c[0] / max(c[1], 1)), 2)}
