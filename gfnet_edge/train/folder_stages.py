"""The three GFNet training stages on an image folder, on one process or many.

* ``stage1``: both encoders and the classifier, on the glance and T - 1 uniformly random patches;
  loss = mean over steps of CE(step classifier) + dsn_ratio x CE(encoder head on that step).
* ``stage2``: the policy alone, by PPO (reward: gain in true-class probability; returns
  normalised over the global batch; encoders and classifier frozen).
* ``stage3``: encoders and classifier again, on patches of the sampled learned policy (frozen).
* ``static`` (optional): the same backbone on whole S x S images (the baseline a calibration
  report compares against).

Each stage is ``epochs`` passes over the train split with a ``DistributedSampler``; under
``torchrun`` the trainable part is wrapped in ``DistributedDataParallel``. All random draws of a
step (patch corners, policy noise) come from a generator seeded by (seed, stage, epoch) and are
drawn for the global batch, each rank taking its own rows, so W processes make the same updates
as one. Rank 0 writes ``RUN/<stage>.pt`` after every epoch (weights, optimiser, loss scaler,
history); a restarted run continues after the last finished epoch.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.checkpoint import atomic_torch_save
from ..models.gfnet import GFNet, action_to_coords, crop_patches, glance_input
from .dist import DistContext
from .folder_data import FolderDataset, FolderSplit, ShardSampler, build_transform, make_loader, normalise
from .recipe import FolderTrainConfig, StagePlan

STAGES = ("stage1", "stage2", "stage3", "static")


def step_logits(model: GFNet, t: int, feats: List[torch.Tensor], h: Optional[torch.Tensor]):
    """Logits of step ``t`` from the features so far, as :meth:`GFNet.trace` computes them."""
    spec = model.spec
    logits = None
    if spec.classifier == "gru":
        logits, h = model.fc.gru_step(feats[-1], h)
    if t == 0 and spec.step0 == "backbone":
        logits = model.model_prime.logits(feats[0])
    elif spec.classifier == "cascaded":
        logits = model.fc.cascaded(feats)
    return logits, h


def sample_action(model: GFNet, fmap: torch.Tensor, h: Optional[torch.Tensor], noise: torch.Tensor, std: float):
    """Gaussian action around the actor mean: ``(raw, clipped to [0, 1], new hidden)``."""
    pol = model.policy
    out, h = pol.recur(pol.encode(fmap.float()), h)
    raw = pol.actor(out) + std * noise
    return raw, 1 - F.relu(1 - F.relu(raw)), h


class FocusLoss(nn.Module):
    """Stages 1 and 3: the classification loss over all steps of a batch.

    ``forward(x, y, draw)``: with ``policy=False`` ``draw`` holds the patch corners (T-1, n, 2);
    with ``policy=True`` it holds the policy's noise (T-1, n, 2) and the (frozen) policy places
    the patches. Returns ``(loss, last step's logits)``.
    """

    def __init__(self, model: GFNet, dsn_ratio: float, policy: bool, action_std: float) -> None:
        super().__init__()
        self.model = model
        self.dsn = dsn_ratio
        self.policy = policy
        self.std = action_std

    def forward(self, x: torch.Tensor, y: torch.Tensor, draw: torch.Tensor):
        m, spec = self.model, self.model.spec
        S, P, T = spec.image_size, spec.patch_size, spec.steps
        f0, fmap = m.model_prime(glance_input(x, P, spec.glance_interpolation))
        feats, h, h_pol = [f0], None, None
        logits, h = step_logits(m, 0, feats, h)
        loss = F.cross_entropy(logits, y)
        if self.dsn and spec.step0 != "backbone":
            loss = loss + self.dsn * F.cross_entropy(m.model_prime.logits(f0), y)
        if self.policy:
            patches = []
            for t in range(1, T):
                with torch.no_grad():
                    _, a, h_pol = sample_action(m, fmap.detach(), h_pol, draw[t - 1], self.std)
                p, fmap = m.model(crop_patches(x, action_to_coords(a, S, P), P))
                patches.append(p)
        else:
            n = x.shape[0]
            crops = torch.cat([crop_patches(x, draw[t], P) for t in range(T - 1)])
            patches = list(m.model(crops)[0].split(n)) if T > 1 else []
        for t, p in enumerate(patches, start=1):
            feats.append(p)
            logits, h = step_logits(m, t, feats, h)
            loss = loss + F.cross_entropy(logits, y)
            if self.dsn:
                loss = loss + self.dsn * F.cross_entropy(m.model.logits(p), y)
        return loss / T, logits


class PolicyEval(nn.Module):
    """Stage 2: log-probabilities, values and entropies of stored states and raw actions."""

    def __init__(self, model: GFNet, action_std: float) -> None:
        super().__init__()
        self.policy = model.policy
        self.std = action_std

    def forward(self, states: torch.Tensor, actions: torch.Tensor):
        pol = self.policy
        L, n = states.shape[:2]
        enc = pol.encode(states.flatten(0, 1)).view(L, n, -1)
        out, _ = pol.gru(enc, enc.new_zeros(1, n, pol.hidden_size))
        mean = pol.actor(out)
        dist = torch.distributions.Normal(mean, torch.full_like(mean, self.std))
        return dist.log_prob(actions).sum(-1), pol.critic(out).squeeze(-1), dist.entropy().sum(-1)


class StaticLoss(nn.Module):
    """The static baseline: cross-entropy of the backbone on whole images."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        logits = self.net(x)
        return F.cross_entropy(logits, y), logits


class FolderTrainer:
    """Trains one GFNet (and optionally its static baseline) in a run folder.

    Args:
        out: the run folder (written by rank 0 only).
        cfg: a resolved config (:meth:`FolderTrainConfig.resolved`).
        ctx: this process's rank, world size and device.
        train, val: the scanned splits.
        model: the GFNet (pretrained encoders already loaded), on the CPU.
        static: the static baseline network or ``None``.
        log: prints one line (rank 0 passes a real logger, others a no-op).
        progress: show a progress bar (rank 0).
    """

    def __init__(self, out: Path, cfg: FolderTrainConfig, ctx: DistContext, train: FolderSplit, val: FolderSplit,
                 model: GFNet, static: Optional[nn.Module], log: Callable[[str], None], progress: bool = True) -> None:
        self.out, self.cfg, self.ctx = Path(out), cfg, ctx
        self.model = model.to(ctx.device)
        self.static = static.to(ctx.device) if static is not None else None
        if ctx.distributed and ctx.device.type == "cuda" and cfg.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            if self.static is not None:
                self.static = nn.SyncBatchNorm.convert_sync_batchnorm(self.static)
        self.spec = model.spec
        self.log_line = log
        self.progress = progress and ctx.main
        if cfg.batch_size % ctx.world:
            raise ValueError(f"batch size {cfg.batch_size} is not a multiple of the {ctx.world} processes")
        self.local_batch = cfg.batch_size // ctx.world
        if len(train) < cfg.batch_size:
            raise ValueError(f"the train split has {len(train)} images, fewer than one batch ({cfg.batch_size}); "
                             "lower --batch-size")
        spec = self.spec
        self.train_set = FolderDataset(train, build_transform(spec.image_size, spec.crop_pct, spec.dataset_interpolation,
                                                              True, cfg.random_crop, cfg.hflip), cfg.seed)
        self.val_set = FolderDataset(val, build_transform(spec.image_size, spec.crop_pct, spec.dataset_interpolation,
                                                          False), cfg.seed)
        self.val_labels = np.asarray(val.labels(), dtype=np.int64)
        cuda = ctx.device.type == "cuda"
        self.amp_dtype = None
        if cuda and cfg.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.timings: Dict[str, float] = {}  # seconds of training per stage (over every session of it)
        self.skipped: set = set()  # stages found finished in the run folder

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str, **record) -> None:
        if not self.ctx.main:
            return
        self.log_line(msg)
        if record:
            with open(self.out / "epochs.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def stage_path(self, name: str) -> Path:
        return self.out / f"{name}.pt"

    def _modules(self) -> Dict[str, nn.Module]:
        mods: Dict[str, nn.Module] = {"gfnet": self.model}
        if self.static is not None:
            mods["static"] = self.static
        return mods

    def load_stage(self, name: str) -> Optional[dict]:
        """The checkpoint of stage ``name`` (weights loaded into the models) or ``None``."""
        p = self.stage_path(name)
        if not p.exists():
            return None
        ck = torch.load(p, map_location="cpu", weights_only=True)
        for k, mod in self._modules().items():
            if k in ck["models"]:
                mod.load_state_dict(ck["models"][k])
        return ck

    def _ddp(self, module: nn.Module) -> nn.Module:
        if not self.ctx.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    def _set_trainable(self, params: List[nn.Parameter]) -> None:
        keep = {id(p) for p in params}
        for mod in self._modules().values():
            for p in mod.parameters():
                p.requires_grad_(id(p) in keep)

    def _train_mode(self, modules: List[nn.Module]) -> None:
        for mod in self._modules().values():
            mod.eval()
        for mod in modules:
            mod.train()
            if self.cfg.freeze_bn:
                for sub in mod.modules():
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        sub.eval()

    def _draw(self, g: torch.Generator, shape: Tuple[int, ...], kind: str) -> torch.Tensor:
        """Random numbers for the global batch (dim 1), this rank's rows ``rank::world``."""
        S, P = self.spec.image_size, self.spec.patch_size
        B = self.cfg.batch_size
        full = (shape[0], B) + tuple(shape[1:])
        dev = self.ctx.device
        if kind == "coords":
            t = torch.randint(0, S - P + 1, full, generator=g, device=dev)
        else:
            t = torch.randn(full, generator=g, device=dev)
        return t[:, self.ctx.rank::self.ctx.world]

    # ------------------------------------------------------------------ the loop
    def loop(self, name: str, plan: StagePlan, params: List[nn.Parameter], train_modules: List[nn.Module],
             step: Callable, evaluate: Callable[[], Dict[str, float]], adam: bool = False,
             schedule: bool = True) -> None:
        """Runs ``plan.epochs`` epochs of ``step(x, y, g, opt, scaler) -> (loss, correct)``,
        continuing after the last epoch ``RUN/<name>.pt`` holds."""
        cfg, ctx = self.cfg, self.ctx
        if plan.epochs <= 0:
            return
        self._set_trainable(params)
        opt = (torch.optim.Adam(params, lr=plan.lr) if adam else
               torch.optim.AdamW(params, lr=plan.lr, weight_decay=cfg.weight_decay))
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        start, history, elapsed = 0, [], 0.0
        ck = self.load_stage(name)
        if ck is not None:
            if ck["done"]:
                self.timings[name] = ck["elapsed"]
                self.skipped.add(name)
                self.log(f"[{name}] already done ({ck['epoch']} epochs): skipped")
                return
            opt.load_state_dict(ck["opt"])
            scaler.load_state_dict(ck["scaler"])
            start, history, elapsed = ck["epoch"], ck["history"], ck["elapsed"]
            self.log(f"[{name}] resuming after epoch {start}")
        sampler = torch.utils.data.DistributedSampler(self.train_set, num_replicas=ctx.world, rank=ctx.rank,
                                                      shuffle=True, seed=cfg.seed, drop_last=True)
        loader = make_loader(self.train_set, self.local_batch, sampler, cfg.workers, ctx.device.type == "cuda", True)
        iters = len(loader)
        total = plan.epochs * iters
        warm = min(cfg.warmup_iters, max(1, total // 10))

        def lr_at(i: int) -> float:
            if not schedule:
                return plan.lr
            if i < warm:
                return plan.lr * (i + 1) / warm
            return plan.lr * 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, total - warm)))

        from tqdm.auto import tqdm

        t0 = time.time() - elapsed
        for epoch in range(start, plan.epochs):
            sampler.set_epoch(epoch)
            self.train_set.epoch = epoch
            g = torch.Generator(device=ctx.device)
            g.manual_seed((cfg.seed * 1009 + STAGES.index(name)) * 100_003 + epoch)
            self._train_mode(train_modules)
            sums = torch.zeros(3, dtype=torch.float64)  # loss, correct, images
            t_ep, images = time.time(), 0
            bar = tqdm(loader, desc=f"{name} {epoch + 1}/{plan.epochs}", disable=not self.progress, leave=False,
                       mininterval=2.0)
            for it, (x, y, _) in enumerate(bar):
                for grp in opt.param_groups:
                    grp["lr"] = lr_at(epoch * iters + it)
                x = normalise(x.to(ctx.device, non_blocking=True), self.spec.mean, self.spec.std)
                y = y.to(ctx.device, non_blocking=True)
                loss, correct = step(x, y, g, opt, scaler)
                sums += torch.tensor([loss * len(y), correct, len(y)], dtype=torch.float64)
                images += len(y) * ctx.world
                if it % 10 == 0:
                    bar.set_postfix(loss=f"{sums[0] / max(sums[2], 1):.3f}")
            bar.close()
            sums = ctx.all_sum(sums)
            seconds = time.time() - t_ep
            rec = {"stage": name, "epoch": epoch + 1, "loss": round(float(sums[0] / sums[2]), 4),
                   "train_acc": round(float(100 * sums[1] / sums[2]), 2), "lr": lr_at((epoch + 1) * iters - 1),
                   "images_per_s": round(images / max(seconds, 1e-9), 1)}
            rec.update(evaluate())
            elapsed = time.time() - t0
            rec["minutes"] = round(elapsed / 60, 2)
            history.append(rec)
            done = epoch + 1 == plan.epochs
            if ctx.main:
                atomic_torch_save({"done": done, "epoch": epoch + 1, "elapsed": elapsed, "history": history,
                                   "models": {k: m.state_dict() for k, m in self._modules().items()},
                                   "opt": opt.state_dict(), "scaler": scaler.state_dict()}, self.stage_path(name))
            ctx.barrier()
            self.log(f"[{name}] epoch {epoch + 1}/{plan.epochs} " + " ".join(
                f"{k}={v}" for k, v in rec.items() if k not in ("stage", "epoch")), **rec)
        self.timings[name] = time.time() - t0

    def _backward(self, loss: torch.Tensor, opt: torch.optim.Optimizer, scaler) -> None:
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    # ------------------------------------------------------------------ stages
    def _focus_params(self) -> List[nn.Parameter]:
        """Encoders and the classifier heads the T steps use (unused ones stay frozen: DDP needs that)."""
        m, spec = self.model, self.spec
        skip = set()
        if spec.classifier == "cascaded":
            for k in range(spec.steps + 1, 6):
                skip |= {id(p) for p in m.fc.head(k).parameters()}
        if not self.cfg.dsn_ratio:
            skip |= {id(p) for p in m.model.classifier_module().parameters()}
            if spec.step0 != "backbone":
                skip |= {id(p) for p in m.model_prime.classifier_module().parameters()}
        if spec.steps == 1:
            skip |= {id(p) for p in list(m.model.parameters()) + list(m.fc.parameters())}
        mods = list(m.model_prime.parameters()) + list(m.model.parameters()) + list(m.fc.parameters())
        return [p for p in mods if id(p) not in skip]

    def _focus_stage(self, name: str, plan: StagePlan, policy: bool) -> None:
        m = self.model
        params = self._focus_params()
        self._set_trainable(params)  # before DDP, which syncs exactly the parameters that need gradients
        net = self._ddp(FocusLoss(m, float(self.cfg.dsn_ratio), policy, self.cfg.action_std))
        T = self.spec.steps

        def step(x, y, g, opt, scaler):
            draw = self._draw(g, (T - 1, 2), "normal" if policy else "coords")
            with self.autocast():
                loss, logits = net(x, y, draw)
            self._backward(loss, opt, scaler)
            return loss.item(), (logits.argmax(1) == y).sum().item()

        self.loop(name, plan, params, [m.model_prime, m.model, m.fc], step, self.evaluate)

    def stage1(self) -> None:
        if self.spec.classifier == "cascaded" and not self.stage_path("stage1").exists():
            self.init_cascaded_heads()
        self._focus_stage("stage1", self.cfg.stage1, False)

    @torch.no_grad()
    def init_cascaded_heads(self) -> None:
        """Starts each cascaded head fc_k as a product of experts: the glance head's logits plus
        the local head's logits of every patch (at least as good as the glance from the first
        step, where a random fc_k is worse than the glance for hundreds of steps)."""
        m, F_ = self.model, self.spec.feature_dim
        wg, bg = m.model_prime.classifier_module().weight, m.model_prime.classifier_module().bias
        wl, bl = m.model.classifier_module().weight, m.model.classifier_module().bias
        for k in range(2, self.spec.steps + 1):
            head = m.fc.head(k)
            head.weight.zero_()
            head.weight[:, :F_] = wg
            for j in range(1, k):
                head.weight[:, j * F_:(j + 1) * F_] = wl
            head.bias.copy_(bg + (k - 1) * bl)

    def stage3(self) -> None:
        self._focus_stage("stage3", self.cfg.stage3, True)

    def stage2(self) -> None:
        """PPO on the policy (one update per batch, as the reference)."""
        cfg, m, spec = self.cfg, self.model, self.spec
        S, P, T = spec.image_size, spec.patch_size, spec.steps
        if T < 2:
            return
        self._set_trainable(list(m.policy.parameters()))
        net = self._ddp(PolicyEval(m, cfg.action_std))

        def step(x, y, g, opt, scaler):
            noise = self._draw(g, (T - 1, 2), "normal")
            yv = y.view(-1, 1)
            with torch.no_grad(), self.autocast():
                f0, fmap = m.model_prime(glance_input(x, P, spec.glance_interpolation))
                feats, h = [f0], None
                logits, h = step_logits(m, 0, feats, h)
                p_last = F.softmax(logits.float(), 1).gather(1, yv).view(-1)
                states, actions, rewards, h_pol = [], [], [], None
                for t in range(1, T):
                    states.append(fmap.float())
                    raw, a, h_pol = sample_action(m, fmap, h_pol, noise[t - 1], cfg.action_std)
                    pooled, fmap = m.model(crop_patches(x, action_to_coords(a, S, P), P))
                    feats.append(pooled)
                    logits, h = step_logits(m, t, feats, h)
                    p = F.softmax(logits.float(), 1).gather(1, yv).view(-1)
                    rewards.append(p - p_last)
                    p_last = p
                    actions.append(raw.float())
            states_t, actions_t = torch.stack(states), torch.stack(actions)
            returns, run = [], torch.zeros_like(rewards[0])
            for r in reversed(rewards):
                run = r + cfg.gamma * run
                returns.insert(0, run)
            ret = torch.stack(returns)
            stats = self.ctx.all_sum(torch.stack([ret.sum(), (ret * ret).sum(), ret.new_tensor(ret.numel())]).double())
            mean = stats[0] / stats[2]
            std = torch.sqrt(torch.clamp((stats[1] - stats[2] * mean ** 2) / max(float(stats[2]) - 1, 1.0), min=0))
            ret_n = ((ret - mean) / (std + 1e-5)).float()
            with torch.no_grad():
                old_logp, _, _ = net.module(states_t, actions_t) if hasattr(net, "module") else net(states_t, actions_t)
            logp, values, entropy = net(states_t, actions_t)
            ratio = torch.exp(logp - old_logp)
            adv = ret_n - values.detach()
            surr = torch.min(ratio * adv, torch.clamp(ratio, 1 - cfg.clip, 1 + cfg.clip) * adv)
            loss = (-surr + 0.5 * F.mse_loss(values, ret_n) - 0.01 * entropy).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item(), (logits.argmax(1) == y).sum().item()

        self.loop("stage2", cfg.stage2, list(m.policy.parameters()), [m.policy], step, self.evaluate, adam=True,
                  schedule=False)

    def static_stage(self) -> None:
        if self.static is None or self.cfg.static.epochs <= 0:
            return
        self._set_trainable(list(self.static.parameters()))
        net = self._ddp(StaticLoss(self.static))

        def step(x, y, g, opt, scaler):
            with self.autocast():
                loss, logits = net(x, y)
            self._backward(loss, opt, scaler)
            return loss.item(), (logits.argmax(1) == y).sum().item()

        self.loop("static", self.cfg.static, list(self.static.parameters()), [self.static], step,
                  self.evaluate_static)

    # ------------------------------------------------------------------ validation
    def _val_loader(self, limit: int = 0):
        n = len(self.val_set) if not limit else min(limit, len(self.val_set))
        sampler = ShardSampler(n, self.ctx.rank, self.ctx.world)
        return make_loader(self.val_set, max(1, self.local_batch * 2), sampler, self.cfg.workers,
                           self.ctx.device.type == "cuda", False)

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
        probs, labels = self.val_probs(self.cfg.eval_max, amp=True)
        acc = (probs.argmax(2) == labels[None]).mean(1) * 100
        return {f"val_acc_t{t}": round(float(a), 2) for t, a in enumerate(acc)}

    @torch.no_grad()
    def evaluate_static(self) -> Dict[str, float]:
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
