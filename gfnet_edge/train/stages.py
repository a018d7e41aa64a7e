"""The training stages of the demo GFNet (see ``docs/training.md``).

``pretrain`` (local encoder on digit-centred crops, then the glance encoder on glances with a
warm start of the policy's first action), ``1`` (random patches), ``2`` (policy: behaviour-cloning
warm start, then PPO), ``3`` (fine-tuning on patches of the sampled policy) and ``static`` (the
same backbone on full images). Every stage is a loop of ``epochs x iters`` batches, checkpointed
after each epoch in the run folder, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.backbones import _create_timm
from ..models.gfnet import GFNet, action_to_coords, crop_patches, glance_input
from .config import BACKBONES, StageBudget, TrainConfig, demo_spec
from .data import Batches, Split, centred_coords, crop_uint8, target_actions, to_tensor

STAGES = ("pre_local", "pre_glance", "stage1", "bc", "ppo", "stage3", "static")


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Run:
    """A training run in a folder: config, data, model, per-stage checkpoints and logs."""

    def __init__(self, out: Path, cfg: TrainConfig, train: Split, val: Split, progress: bool = True,
                 log: Optional[Callable[[str], None]] = None) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.train, self.val = train, val
        self.progress = progress
        self._print = log or (lambda s: print(s, flush=True))
        torch.manual_seed(cfg.seed)
        self.spec = demo_spec(cfg.backbone)
        self.model = GFNet(self.spec)
        self.spec = self.model.spec
        self.static = self.new_static()
        self.glance_cache: Optional[Dict[str, torch.Tensor]] = None
        self.timings: Dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str, **record) -> None:
        self._print(msg)
        if record:
            with open(self.out / "epochs.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def new_static(self) -> nn.Module:
        name, kw = BACKBONES[self.cfg.backbone]
        return _create_timm(name, self.spec.num_classes, **kw)

    def stage_path(self, name: str) -> Path:
        return self.out / f"{name}.pt"

    def stage_done(self, name: str) -> bool:
        p = self.stage_path(name)
        return p.exists() and torch.load(p, map_location="cpu", weights_only=True).get("done", False)

    def _state(self) -> Dict[str, dict]:
        return {"gfnet": self.model.state_dict(), "static": self.static.state_dict()}

    def _load_state(self, st: Dict[str, dict]) -> None:
        self.model.load_state_dict(st["gfnet"])
        self.static.load_state_dict(st["static"])

    def load_stage(self, name: str) -> bool:
        """Loads the weights a finished stage left (False if it has not finished)."""
        p = self.stage_path(name)
        if not p.exists():
            return False
        ck = torch.load(p, map_location="cpu", weights_only=True)
        if not ck.get("done"):
            return False
        self._load_state(ck["models"])
        self.timings[name] = ck.get("elapsed", 0.0)
        return True

    def load_static_stage(self) -> bool:
        """Loads only the static baseline's weights from a finished ``static.pt``."""
        p = self.stage_path("static")
        if not p.exists():
            return False
        ck = torch.load(p, map_location="cpu", weights_only=True)
        if not ck.get("done"):
            return False
        self.static.load_state_dict(ck["models"]["static"])
        self.timings["static"] = ck.get("elapsed", 0.0)
        return True

    # ------------------------------------------------------------------ the loop
    def loop(self, name: str, budget: StageBudget, params: List[nn.Parameter], step: Callable[[np.ndarray, np.random.Generator], Dict[str, float]],
             n: int, evaluate: Optional[Callable[[], Dict[str, float]]] = None, adam: bool = False,
             resume: bool = True, schedule: bool = True,
             on_epoch: Optional[Callable[[int, Batches], None]] = None) -> None:
        """Runs ``budget.epochs x budget.iters`` calls of ``step(batch_indices, rng)``."""
        cfg = self.cfg
        seed = cfg.seed * 1000 + STAGES.index(name)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        batches = Batches(n, min(budget.batch, n), seed)
        if adam:
            opt = torch.optim.Adam(params, lr=budget.lr)
        else:
            opt = torch.optim.AdamW(params, lr=budget.lr, weight_decay=cfg.weight_decay)
        total = budget.epochs * budget.iters
        warm = max(1, min(20, total // 10))

        def lr_at(i: int) -> float:
            # Cosine over the stage's progress: iterations done or wall-clock cap used, whichever
            # is further, so a stage cut short by its cap still ends with a small learning rate.
            if not schedule:
                return budget.lr
            if i < warm:
                return budget.lr * (i + 1) / warm
            frac = max((i - warm) / max(1, total - warm), (time.time() - t_start) / 60 / budget.minutes)
            return budget.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

        start_epoch, elapsed, history = 0, 0.0, []
        path = self.stage_path(name)
        if resume and path.exists():
            ck = torch.load(path, map_location="cpu", weights_only=True)
            self._load_state(ck["models"])
            if ck.get("done"):
                self.timings[name] = ck.get("elapsed", 0.0)
                self.log(f"[{name}] already done ({ck['epoch']} epochs, {ck.get('elapsed', 0) / 60:.1f} min): skipped")
                return
            opt.load_state_dict(ck["opt"])
            batches.load(ck["batches"])
            rng.bit_generator.state = ck["rng"]
            torch.set_rng_state(ck["torch_rng"])
            start_epoch, elapsed, history = ck["epoch"], ck["elapsed"], ck["history"]
            self.log(f"[{name}] resuming after epoch {start_epoch}")
        from tqdm.auto import tqdm

        t_start = time.time() - elapsed
        stopped = None
        for epoch in range(start_epoch, budget.epochs):
            sums: Dict[str, float] = {}
            if on_epoch is not None:
                on_epoch(epoch, batches)
            bar = tqdm(range(budget.iters), desc=f"{name} {epoch + 1}/{budget.epochs}", disable=not self.progress,
                       mininterval=5.0, leave=False)
            k = 0
            for it in bar:
                i = epoch * budget.iters + it
                for g in opt.param_groups:
                    g["lr"] = lr_at(i)
                idx = batches.next()
                stats = step(idx, rng, opt)
                k += 1
                for key, v in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(v)
                bar.set_postfix({key: f"{v / k:.3f}" for key, v in sums.items()})
                if (time.time() - t_start) / 60 > budget.minutes:
                    stopped = f"time cap {budget.minutes} min hit at epoch {epoch + 1} iter {it + 1}"
                    break
            bar.close()
            rec = {key: round(v / max(k, 1), 4) for key, v in sums.items()}
            if evaluate is not None:
                rec.update(evaluate())
            elapsed = time.time() - t_start
            rec.update(stage=name, epoch=epoch + 1, iters=k, minutes=round(elapsed / 60, 2), lr=lr_at(i))
            history.append(rec)
            done = stopped is not None or epoch + 1 == budget.epochs
            _atomic_save({
                "done": done, "epoch": epoch + 1, "elapsed": elapsed, "history": history, "stopped": stopped,
                "models": self._state(), "opt": opt.state_dict(), "batches": batches.state(),
                "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            }, path)
            self.log(f"[{name}] epoch {epoch + 1}/{budget.epochs} " + " ".join(f"{a}={b}" for a, b in rec.items() if a not in ("stage", "epoch")), **rec)
            if stopped:
                self.log(f"[{name}] {stopped}")
                break
        self.timings[name] = time.time() - t_start

    # ------------------------------------------------------------------ stage 0
    def pre_local(self, resume: bool = True) -> None:
        cfg, S, P = self.cfg, self.spec.image_size, self.spec.patch_size
        enc = self.model.model
        crop = {"size": P, "jitter": cfg.crop_jitter}

        def on_epoch(epoch, batches):
            sched = cfg.pre_local_schedule
            if sched:
                size, jitter, batch = sched[min(epoch, len(sched) - 1)]
                crop.update(size=int(size), jitter=int(jitter))
                batches.batch = min(int(batch), batches.n)

        def step(idx, rng, opt):
            enc.train()
            size = crop["size"]
            coords = centred_coords(self.train.centres(idx), S, size, crop["jitter"], rng)
            x = to_tensor(crop_uint8(self.train.frames[idx], coords, size))
            y = torch.from_numpy(self.train.labels[idx])
            return _cross_entropy_step(enc.logits(enc(x)[0]), y, opt)

        def evaluate():
            n = min(len(self.val), 300)
            idx = np.arange(n)
            coords = centred_coords(self.val.centres(idx), S, P, 0, None)
            acc = _accuracy(enc, to_tensor(crop_uint8(self.val.frames[idx], coords, P)), self.val.labels[idx])
            out = {"val_crop_acc": acc, "crop": crop["size"]}
            if crop["size"] != P:
                coords = centred_coords(self.val.centres(idx), S, crop["size"], 0, None)
                out["val_acc_at_crop"] = _accuracy(enc, to_tensor(crop_uint8(self.val.frames[idx], coords, crop["size"])),
                                                   self.val.labels[idx])
            return out

        self.loop("pre_local", cfg.pre_local, list(enc.parameters()), step, len(self.train), evaluate, resume=resume,
                  on_epoch=on_epoch)

    def pre_glance(self, resume: bool = True) -> None:
        cfg, S, P = self.cfg, self.spec.image_size, self.spec.patch_size
        enc, pol = self.model.model_prime, self.model.policy
        if not (resume and self.stage_path("pre_glance").exists()):
            enc.load_state_dict(self.model.model.state_dict())  # start from the digit reader

        def step(idx, rng, opt):
            enc.train()
            x = self.glance(to_tensor(self.train.frames[idx]))
            y = torch.from_numpy(self.train.labels[idx])
            pooled, fmap = enc(x)
            logits = enc.logits(pooled)
            target = torch.from_numpy(target_actions(self.train.centres(idx), S, P))
            action = pol.act(fmap, None)[0]
            ce = F.cross_entropy(logits, y)
            bc = F.mse_loss(action, target)
            loss = ce + cfg.glance_bc_weight * bc
            _optimise(loss, opt)
            return {"ce": ce.item(), "bc_mse": bc.item(), "acc": (logits.argmax(1) == y).float().mean().item()}

        def evaluate():
            n = min(len(self.val), 200)
            idx = np.arange(n)
            return {"val_glance_acc": _accuracy(enc, self.glance(to_tensor(self.val.frames[idx])), self.val.labels[idx])}

        self.loop("pre_glance", cfg.pre_glance, list(enc.parameters()) + list(pol.parameters()), step, len(self.train),
                  evaluate, resume=resume)

    def glance(self, x: torch.Tensor) -> torch.Tensor:
        return glance_input(x, self.spec.patch_size, self.spec.glance_interpolation)

    @torch.no_grad()
    def build_glance_cache(self) -> None:
        """Pooled features and feature maps of the (frozen) glance encoder on the train set."""
        path = self.out / "glance_cache.pt"
        key = _digest(self.model.model_prime.state_dict())
        if path.exists():
            c = torch.load(path, map_location="cpu", weights_only=True)
            if c.get("key") == key and c["pooled"].shape[0] == len(self.train):
                self.glance_cache = c
                return
        enc = self.model.model_prime.eval()
        pooled, fmaps = [], []
        for i in range(0, len(self.train), 100):
            p, f = enc(self.glance(to_tensor(self.train.frames[i:i + 100])))
            pooled.append(p)
            fmaps.append(f)
        self.glance_cache = {"key": key, "pooled": torch.cat(pooled), "fmap": torch.cat(fmaps)}
        _atomic_save(self.glance_cache, path)

    # ------------------------------------------------------------------ stage 1 / 3
    def _focus_loss(self, f0: torch.Tensor, pooled: List[torch.Tensor], y: torch.Tensor):
        m, fc = self.model.model, self.model.fc
        feats, loss, accs = [f0], 0.0, []
        for p in pooled:
            feats.append(p)
            logits = fc.cascaded(feats)
            loss = loss + F.cross_entropy(logits, y) + self.cfg.dsn_ratio * F.cross_entropy(m.logits(p), y)
            accs.append((logits.argmax(1) == y).float().mean().item())
        return loss / len(pooled), accs

    def stage1(self, resume: bool = True) -> None:
        cfg, S, P, T = self.cfg, self.spec.image_size, self.spec.patch_size, self.spec.steps
        m, fc = self.model.model, self.model.fc
        self.model.model_prime.eval()
        if not (resume and self.stage_path("stage1").exists()):
            self.init_cascaded_heads()

        def step(idx, rng, opt):
            m.train()
            n = len(idx)
            y = torch.from_numpy(self.train.labels[idx])
            f0 = self.glance_cache["pooled"][idx]
            frames = np.concatenate([self.train.frames[idx]] * (T - 1))
            coords = rng.integers(0, S - P + 1, size=(n * (T - 1), 2))
            pooled = m(to_tensor(crop_uint8(frames, coords, P)))[0]
            loss, accs = self._focus_loss(f0, list(pooled.split(n)), y)
            _optimise(loss, opt)
            return {"loss": loss.item(), "acc_last": accs[-1]}

        self.loop("stage1", cfg.stage1, list(m.parameters()) + list(fc.parameters()), step, len(self.train),
                  self._eval_gfnet, resume=resume)

    @torch.no_grad()
    def init_cascaded_heads(self) -> None:
        """Starts fc_k as a product of experts: the glance head's logits plus the local head's
        logits of every patch (a random cascaded head is worse than the glance alone for the
        first hundreds of steps; this one is at least as good from the start)."""
        fc, F_ = self.model.fc, self.spec.feature_dim
        wg, bg = self.model.model_prime.classifier_module().weight, self.model.model_prime.classifier_module().bias
        wl, bl = self.model.model.classifier_module().weight, self.model.model.classifier_module().bias
        for k in range(2, self.spec.steps + 1):
            head = fc.head(k)
            head.weight.zero_()
            head.weight[:, :F_] = wg
            for j in range(1, k):
                head.weight[:, j * F_:(j + 1) * F_] = wl
            head.bias.copy_(bg + (k - 1) * bl)

    def _sample(self, fmap: torch.Tensor, h: Optional[torch.Tensor]):
        """Policy action sampled around the actor mean, clipped to [0, 1] (relu, 1 - relu(1 - a))."""
        out, h = self.model.policy.recur(self.model.policy.encode(fmap), h)
        mean = self.model.policy.actor(out)
        raw = mean + self.cfg.action_std * torch.randn_like(mean)
        clipped = 1 - F.relu(1 - F.relu(raw))
        return raw, clipped, h

    def stage3(self, resume: bool = True) -> None:
        cfg, S, P, T = self.cfg, self.spec.image_size, self.spec.patch_size, self.spec.steps
        m, fc, pol = self.model.model, self.model.fc, self.model.policy
        self.model.model_prime.eval()
        pol.eval()

        def step(idx, rng, opt):
            m.train()
            y = torch.from_numpy(self.train.labels[idx])
            x = to_tensor(self.train.frames[idx])
            f0, fmap = self.glance_cache["pooled"][idx], self.glance_cache["fmap"][idx]
            h, pooled = None, []
            for t in range(1, T):
                with torch.no_grad():
                    _, a, h = self._sample(fmap, h)
                p, fmap = m(crop_patches(x, action_to_coords(a, S, P), P))
                fmap = fmap.detach()
                pooled.append(p)
            loss, accs = self._focus_loss(f0, pooled, y)
            _optimise(loss, opt)
            return {"loss": loss.item(), "acc_last": accs[-1]}

        self.loop("stage3", cfg.stage3, list(m.parameters()) + list(fc.parameters()), step, len(self.train),
                  self._eval_gfnet, resume=resume)

    # ------------------------------------------------------------------ stage 2
    def bc(self, resume: bool = True) -> None:
        """Policy warm start: regress both steps' actions onto the digit centre (encoders frozen)."""
        cfg, S, P, T = self.cfg, self.spec.image_size, self.spec.patch_size, self.spec.steps
        pol, m = self.model.policy, self.model.model

        def step(idx, rng, opt):
            m.eval()
            x = to_tensor(self.train.frames[idx])
            fmap = self.glance_cache["fmap"][idx]
            target = torch.from_numpy(target_actions(self.train.centres(idx), S, P))
            h, loss = None, 0.0
            for t in range(1, T):
                out, h = pol.recur(pol.encode(fmap), h)
                a = pol.actor(out)
                loss = loss + F.mse_loss(a, target)
                if t < T - 1:
                    with torch.no_grad():
                        noisy = (a + cfg.action_std * torch.randn_like(a)).clamp(0, 1)
                        fmap = m(crop_patches(x, action_to_coords(noisy, S, P), P))[1]
            loss = loss / (T - 1)
            _optimise(loss, opt)
            return {"bc_mse": loss.item()}

        self.loop("bc", cfg.bc, list(pol.parameters()), step, len(self.train), self._eval_gfnet, resume=resume)

    def ppo(self, resume: bool = True) -> None:
        """PPO on the policy (reward = gain in true-class probability), encoders and classifier frozen."""
        cfg, S, P, T = self.cfg, self.spec.image_size, self.spec.patch_size, self.spec.steps
        pol, m, fc, mp = self.model.policy, self.model.model, self.model.fc, self.model.model_prime

        def step(idx, rng, opt):
            m.eval()
            y = torch.from_numpy(self.train.labels[idx]).view(-1, 1)
            x = to_tensor(self.train.frames[idx])
            f0, fmap = self.glance_cache["pooled"][idx], self.glance_cache["fmap"][idx]
            states, actions, logps, rewards = [], [], [], []
            with torch.no_grad():
                p_last = F.softmax(mp.logits(f0), 1).gather(1, y).view(-1)
                feats, h = [f0], None
                for t in range(1, T):
                    states.append(fmap)
                    raw, a, h = self._sample(fmap, h)
                    pooled, fmap = m(crop_patches(x, action_to_coords(a, S, P), P))
                    feats.append(pooled)
                    p = F.softmax(fc.cascaded(feats), 1).gather(1, y).view(-1)
                    rewards.append(p - p_last)
                    p_last = p
                    actions.append(raw)
                acc = (fc.cascaded(feats).argmax(1) == y.view(-1)).float().mean().item()
                old_logp, _, _ = self._evaluate_policy(torch.stack(states), torch.stack(actions))
            returns, run = [], torch.zeros_like(rewards[0])
            for r in reversed(rewards):
                run = r + cfg.gamma * run
                returns.insert(0, run)
            ret = torch.stack(returns)
            ret_n = (ret - ret.mean()) / (ret.std() + 1e-5)
            logp, values, entropy = self._evaluate_policy(torch.stack(states), torch.stack(actions))
            ratio = torch.exp(logp - old_logp)
            adv = ret_n - values.detach()
            surr1 = ratio * adv
            surr2 = torch.clamp(ratio, 1 - cfg.clip, 1 + cfg.clip) * adv
            loss = (-torch.min(surr1, surr2) + 0.5 * F.mse_loss(values, ret_n) - 0.01 * entropy).mean()
            _optimise(loss, opt)
            return {"loss": loss.item(), "reward": torch.stack(rewards).sum(0).mean().item(), "acc_last": acc}

        self.loop("ppo", cfg.ppo, list(pol.parameters()), step, len(self.train), self._eval_gfnet, adam=True,
                  resume=resume, schedule=False)

    def _evaluate_policy(self, states: torch.Tensor, actions: torch.Tensor):
        """Log-probabilities, values and entropies of stored (T-1, N, ...) states and raw actions."""
        pol = self.model.policy
        L, n = states.shape[:2]
        enc = pol.encode(states.flatten(0, 1)).view(L, n, -1)
        out, _ = pol.gru(enc, enc.new_zeros(1, n, pol.hidden_size))
        mean = pol.actor(out)
        dist = torch.distributions.Normal(mean, torch.full_like(mean, self.cfg.action_std))
        values = pol.critic(out).squeeze(-1)
        return dist.log_prob(actions).sum(-1), values, dist.entropy().sum(-1)

    # ------------------------------------------------------------------ static baseline
    def static_stage(self, resume: bool = True) -> None:
        cfg = self.cfg
        net = self.static
        if not (resume and self.stage_path("static").exists()):
            pre = torch.load(self.stage_path("pre_local"), map_location="cpu", weights_only=True)["models"]["gfnet"]
            net.load_state_dict({k[len("model.net."):]: v for k, v in pre.items() if k.startswith("model.net.")})

        def step(idx, rng, opt):
            net.train()
            x = to_tensor(self.train.frames[idx])
            y = torch.from_numpy(self.train.labels[idx])
            return _cross_entropy_step(net(x), y, opt)

        def evaluate():
            n = min(len(self.val), 100)
            return {"val_acc": _accuracy(net, to_tensor(self.val.frames[:n]), self.val.labels[:n], logits_fn=lambda z: z)}

        self.loop("static", cfg.static, list(net.parameters()), step, len(self.train), evaluate, resume=resume)

    # ------------------------------------------------------------------ validation during training
    @torch.no_grad()
    def _eval_gfnet(self, n: int = 200) -> Dict[str, float]:
        n = min(len(self.val), n)
        was = [mod.training for mod in (self.model.model, self.model.model_prime, self.model.policy, self.model.fc)]
        self.model.eval()
        tr = self.model.trace(to_tensor(self.val.frames[:n]))
        acc = (tr.probs.argmax(2).numpy() == self.val.labels[:n][None]).mean(1) * 100
        for mod, w in zip((self.model.model, self.model.model_prime, self.model.policy, self.model.fc), was):
            mod.train(w)
        return {f"val_acc_t{t}": round(float(a), 2) for t, a in enumerate(acc)}


def _optimise(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    """One optimiser step on ``loss`` (gradients cleared first)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _cross_entropy_step(logits: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> Dict[str, float]:
    """One supervised step: cross-entropy, backward, optimiser step; ``{"loss", "acc"}``."""
    loss = F.cross_entropy(logits, y)
    _optimise(loss, opt)
    return {"loss": loss.item(), "acc": (logits.argmax(1) == y).float().mean().item()}


def _accuracy(enc: nn.Module, x: torch.Tensor, labels: np.ndarray, logits_fn=None) -> float:
    was = enc.training
    enc.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(x), 100):
            out = enc(x[i:i + 100])
            preds.append((logits_fn(out) if logits_fn else enc.logits(out[0])).argmax(1).numpy())
    enc.train(was)
    return round(float((np.concatenate(preds) == labels).mean() * 100), 2)


def _digest(sd: Dict[str, torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha1()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().float().sum().numpy().tobytes())
    return h.hexdigest()[:16]
