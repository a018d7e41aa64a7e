"""The demo GFNet's training: the image-folder trainer with the cluttered-digits task plugged in.

:class:`Run` is a :class:`~gfnet_edge.train.folder_stages.FolderTrainer` whose data source is
the cluttered-digits splits held in memory, with three task-specific stages that use the
generator's ground-truth digit boxes (no pretrained backbone exists for this task):

* ``pre_local``: the local encoder on digit-centred crops (a curriculum of crop sizes);
* ``pre_glance``: the glance encoder (started from the local one) on glances, with a warm start
  of the policy's first action towards the digit;
* ``bc``: the policy's warm start for every step (behaviour cloning of the digit-centred action)
  before PPO.

Stages 1, 2 (``ppo``), 3 and the static baseline are the shared ones, with the demo's settings
(:class:`~gfnet_edge.train.config.TrainConfig`: iteration budgets and wall-clock caps, the glance
encoder frozen after its pre-training, the static baseline started from ``pre_local``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.backbones import _create_timm
from ..models.gfnet import GFNet, action_to_coords, crop_patches
from .config import BACKBONES, TrainConfig, demo_spec
from .data import Split, centred_coords, crop_uint8, split_source, target_actions, to_tensor
from .dist import DistContext
from .folder_data import normalise
from .folder_stages import FolderTrainer

#: Every stage of the demo, in order.
STAGES = ("pre_local", "pre_glance", "stage1", "bc", "ppo", "stage3", "static")


class Run(FolderTrainer):
    """A demo training run in a folder: config, data, model, per-stage checkpoints and logs."""

    def __init__(self, out: Path, cfg: TrainConfig, train: Split, val: Split, progress: bool = True,
                 log: Optional[Callable[[str], None]] = None) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        model = GFNet(demo_spec(cfg.backbone))
        name, kw = BACKBONES[cfg.backbone]
        static = _create_timm(name, model.spec.num_classes, **kw)
        super().__init__(out, cfg, DistContext(), split_source(train, val), model, static,
                         log or (lambda s: print(s, flush=True)), progress)
        self.train, self.val = train, val

    def load_finished(self, name: str, only: Optional[str] = None) -> bool:
        """Loads the weights a finished stage left (of the model it trains, or only ``"gfnet"`` / ``"static"``);
        False if it has not finished."""
        ck = self.load_stage(name, only, finished_only=True)
        if ck is None:
            return False
        self.timings[name] = ck["elapsed"]
        return True

    def glance(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.glance(x)

    def _targets(self, idx: torch.Tensor) -> torch.Tensor:
        """The digit-centred actions of train images ``idx``."""
        S, P = self.spec.image_size, self.spec.patch_size
        return torch.from_numpy(target_actions(self.train.centres(idx.numpy()), S, P)).to(self.ctx.device)

    def _step_stats(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, opt, scaler) -> Dict[str, float]:
        self._backward(loss, opt, scaler)
        return {"loss": loss.item(), "train_acc": 100.0 * (logits.argmax(1) == y).float().mean().item()}

    # ------------------------------------------------------------------ pre-training
    def pre_local(self, resume: bool = True) -> None:
        """The local encoder on digit-centred crops (curriculum: ``pre_local_schedule``)."""
        cfg, S, P = self.cfg, self.spec.image_size, self.spec.patch_size
        enc = self.model.model
        sched = cfg.pre_local_schedule
        crop = {"size": P, "jitter": cfg.crop_jitter}

        def on_epoch(epoch: int) -> None:
            if sched:
                size, jitter, _ = sched[min(epoch, len(sched) - 1)]
                crop.update(size=int(size), jitter=int(jitter))

        def step(x, y, idx, g, opt, scaler):
            size, j = crop["size"], crop["jitter"]
            offsets = self._draw(g, (2,), len(y), high=j + 1, low=-j).T.cpu().numpy()
            coords = centred_coords(self.train.centres(idx.numpy()) + offsets, S, size)
            crops = normalise(crop_patches(x, torch.from_numpy(coords).to(x.device), size), self.spec.mean, self.spec.std)
            logits = enc.logits(enc(crops)[0])
            return self._step_stats(F.cross_entropy(logits, y), logits, y, opt, scaler)

        def evaluate():
            idx = np.arange(min(len(self.val), 300))
            out = {"val_crop_acc": self._crop_accuracy(idx, P), "crop": crop["size"]}
            if crop["size"] != P:
                out["val_acc_at_crop"] = self._crop_accuracy(idx, crop["size"])
            return out

        batches = [b for _, _, b in sched] if sched else None
        self.loop("pre_local", cfg.pre_local, list(enc.parameters()), [enc], step, evaluate, resume=resume,
                  on_epoch=on_epoch, batch_schedule=batches, raw=True)

    def _crop_accuracy(self, idx: np.ndarray, size: int) -> float:
        """The local encoder's accuracy on val crops of ``size`` centred on the digits."""
        coords = centred_coords(self.val.centres(idx), self.spec.image_size, size)
        x = to_tensor(crop_uint8(self.val.frames[idx], coords, size)).to(self.ctx.device)
        return _accuracy(self.model.model, x, self.val.labels[idx])

    def pre_glance(self, resume: bool = True) -> None:
        """The glance encoder (from the local one) on glances + the policy's first action."""
        cfg = self.cfg
        enc, pol = self.model.model_prime, self.model.policy
        if not (resume and self.stage_path("pre_glance").exists()):
            enc.load_state_dict(self.model.model.state_dict())  # start from the digit reader

        def step(x, y, idx, g, opt, scaler):
            pooled, fmap = enc(self.glance(x))
            logits = enc.logits(pooled)
            ce = F.cross_entropy(logits, y)
            bc = F.mse_loss(pol.act(fmap, None)[0], self._targets(idx))
            stats = self._step_stats(ce + cfg.glance_bc_weight * bc, logits, y, opt, scaler)
            return dict(stats, ce=ce.item(), bc_mse=bc.item())

        def evaluate():
            n = min(len(self.val), 200)
            x = self.glance(to_tensor(self.val.frames[:n]).to(self.ctx.device))
            return {"val_glance_acc": _accuracy(enc, x, self.val.labels[:n])}

        self.loop("pre_glance", cfg.pre_glance, list(enc.parameters()) + list(pol.parameters()), [enc, pol], step,
                  evaluate, resume=resume)

    # ------------------------------------------------------------------ stage 2
    def bc(self, resume: bool = True) -> None:
        """Policy warm start: regress every step's action onto the digit centre (encoders frozen)."""
        cfg, S, P, T = self.cfg, self.spec.image_size, self.spec.patch_size, self.spec.steps
        pol, m = self.model.policy, self.model.model
        cache = self.glance_cache("bc")

        def step(x, y, idx, g, opt, scaler):
            noise = self._draw(g, (T - 1, 2), len(y))
            target = self._targets(idx)
            with torch.no_grad():
                fmap = cache(x, idx)[1]
            h, loss = None, 0.0
            for t in range(1, T):
                out, h = pol.recur(pol.encode(fmap), h)
                a = pol.actor(out)
                loss = loss + F.mse_loss(a, target)
                if t < T - 1:
                    with torch.no_grad():
                        noisy = (a + cfg.action_std * noise[t - 1]).clamp(0, 1)
                        fmap = m(crop_patches(x, action_to_coords(noisy, S, P), P))[1]
            loss = loss / (T - 1)
            self._backward(loss, opt, scaler)
            return {"loss": loss.item()}

        self.loop("bc", cfg.bc, list(pol.parameters()), [pol], step, self.evaluate, resume=resume)

    def ppo(self, resume: bool = True) -> None:
        """Stage 2 (PPO) with the demo's budget."""
        self.stage2(resume, name="ppo", plan=self.cfg.ppo)

    # ------------------------------------------------------------------ static baseline
    def static_stage(self, resume: bool = True) -> None:
        """The static baseline, started from the ``pre_local`` weights of the local encoder."""
        if not (resume and self.stage_path("static").exists()):
            pre = torch.load(self.stage_path("pre_local"), map_location="cpu", weights_only=True)["models"]["gfnet"]
            self.static.load_state_dict({k[len("model.net."):]: v for k, v in pre.items() if k.startswith("model.net.")})
        super().static_stage(resume)


def _accuracy(enc: nn.Module, x: torch.Tensor, labels: np.ndarray) -> float:
    """Accuracy (percent) of an encoder's own head on ``x``, in eval mode."""
    was = enc.training
    enc.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(x), 100):
            preds.append(enc.logits(enc(x[i:i + 100])[0]).argmax(1).cpu().numpy())
    enc.train(was)
    return round(float((np.concatenate(preds) == labels).mean() * 100), 2)
