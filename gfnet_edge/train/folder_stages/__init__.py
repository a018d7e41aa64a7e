"""The GFNet training stages, on one process or many, for any data source (the losses are in
:mod:`.losses`, validation during training in :mod:`.validation`).

* ``stage1``: the encoders (the glance one too unless ``train_glance`` is off) and the
  classifier, on the glance and T - 1 uniformly random patches (:class:`~.losses.FocusLoss`).
* ``stage2``: the policy alone, by PPO (reward: gain in true-class probability; returns
  normalised over the global batch; encoders and classifier frozen).
* ``stage3``: encoders and classifier again, on patches of the sampled learned policy (frozen).
* ``static`` (optional): the same backbone on whole S x S images (the baseline a calibration
  report compares against).

The data source is a pair of datasets of ``(uint8 (3, S, S), label, index)`` items
(:class:`~.folder_data.DataSource`): an image folder for ``gfnet-edge train --data``, the
cluttered-digits splits in memory for the demo (:class:`gfnet_edge.train.stages.Run` adds its
task-specific stages to this trainer). Each stage is ``epochs`` epochs (a pass over the train
split with a ``DistributedSampler``, or ``iters`` batches of a seeded stream when the stage plan
says so); under ``torchrun`` the trainable part is wrapped in ``DistributedDataParallel``. All
random draws of a step (patch corners, policy noise) come from a generator seeded by (seed,
stage, epoch) and are drawn for the global batch, each rank taking its own rows, so W processes
make the same updates as one. Stages that keep the glance encoder frozen compute its outputs
once per train image (:mod:`.glance_cache`) when the train images are not augmented. Rank 0
writes ``RUN/<stage>.pt`` after every epoch (weights, optimiser, loss scaler, history); a
restarted run continues after the last finished epoch.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import InputError
from ...models.checkpoint import atomic_torch_save, read_torch_file
from ...models.gfnet import GFNet, action_to_coords, crop_patches
from ..data import EpochBatches
from ..dist import DistContext
from ..folder_data import DataSource, make_loader, normalise, worker_options
from ..recipe import StagePlan, TrainSettings
from .glance_cache import GlanceCache
from .losses import FocusLoss, PolicyEval, StaticLoss, normalised_returns, ppo_loss, sample_action, step_logits
from .sigint import SIGINT
from .validation import Validation

#: ``step(x, y, idx, g, opt, scaler)`` -> batch means (``loss`` and any other figures).
Step = Callable[..., Dict[str, float]]


#: What every ``RUN/<stage>.pt`` holds (:meth:`FolderTrainer.loop` writes them).
_STAGE_KEYS = frozenset(("done", "epoch", "elapsed", "history", "models", "opt"))

#: Stage numbers in the seeds of the stages' random draws (the demo's ``ppo`` is stage 2).
STAGE_IDS = {"stage1": 0, "stage2": 1, "stage3": 2, "static": 3, "ppo": 1, "pre_local": 4, "pre_glance": 5, "bc": 6}


def stage_seed(seed: int, name: str) -> int:
    """The seed of stage ``name``'s random draws (``seed x 100003 + epoch`` seeds an epoch)."""
    return seed * 1009 + STAGE_IDS[name]


class FolderTrainer(Validation):
    """Trains one GFNet (and optionally its static baseline) in a run folder.

    Args:
        out: the run folder (written by rank 0 only).
        cfg: the run's settings (a resolved :class:`FolderTrainConfig`, or the demo's config).
        ctx: this process's rank, world size and device.
        data: the train and val datasets.
        model: the GFNet (pretrained encoders already loaded), on the CPU.
        static: the static baseline network or ``None``.
        log: prints one line (rank 0 passes a real logger, others a no-op).
        progress: show a progress bar (rank 0).
    """

    def __init__(self, out: Path, cfg: TrainSettings, ctx: DistContext, data: DataSource, model: GFNet,
                 static: Optional[nn.Module], log: Callable[[str], None], progress: bool = True) -> None:
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
        self.data = data
        self.train_set, self.val_set, self.val_labels = data.train, data.val, data.val_labels
        self.amp_dtype = None
        if ctx.device.type == "cuda" and cfg.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.timings: Dict[str, float] = {}  # seconds of training per stage (over every session of it)
        self.skipped: set = set()  # stages found finished in the run folder
        self._glance_cache: Optional[GlanceCache] = None  # one for every frozen-glance stage

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

    def load_stage(self, name: str, only: Optional[str] = None, finished_only: bool = False) -> Optional[dict]:
        """The checkpoint of stage ``name``, its weights loaded into the model that stage trains
        (``"static"``: the static baseline, any other stage: the GFNet), or into model ``only``;
        ``None`` when there is none (also, with ``finished_only``, when the stage has not
        finished: nothing is loaded then). A stage checkpoint holds every model of the run as it
        was then, and only the stage's own is its result: the static baseline may be trained
        before the GFNet (``--stage static`` first), whose copy in ``static.pt`` is then untrained."""
        only = only or ("static" if name == "static" else "gfnet")
        p = self.stage_path(name)
        if not p.exists():
            return None
        ck = read_torch_file(p, "stage checkpoint")  # weights_only; a CheckpointError names the file
        if not isinstance(ck, dict) or not isinstance(ck.get("models"), dict) or not _STAGE_KEYS <= set(ck):
            raise InputError(f"{p}: not a stage checkpoint of gfnet-edge train (expected the keys "
                             f"{', '.join(sorted(_STAGE_KEYS))}); move it away to train {name} again")
        if finished_only and not ck.get("done"):
            return None
        for k, mod in self._modules().items():
            if k in ck["models"] and k == only:
                try:
                    mod.load_state_dict(ck["models"][k])
                except (RuntimeError, TypeError, AttributeError) as exc:  # other keys or shapes, not tensors
                    first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
                    raise InputError(f"{p}: its {k} weights do not fit this run's model (a checkpoint of "
                                     f"another run?): {first[:200]}") from exc
        return ck

    def _ddp(self, module: nn.Module) -> nn.Module:
        if not self.ctx.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    def release_glance_cache(self) -> None:
        """Frees the kept glance outputs (called when no later stage can use them)."""
        if self._glance_cache is not None:
            self._glance_cache.clear()

    def _set_trainable(self, params: List[nn.Parameter]) -> None:
        keep = {id(p) for p in params}
        if any(id(p) in keep for p in self.model.model_prime.parameters()):
            # The glance encoder trains: the kept outputs would be found stale at the first
            # batch after a step anyway; freeing them now returns their memory for the stage.
            self.release_glance_cache()
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

    def _draw(self, g: torch.Generator, shape: Tuple[int, ...], n: int, high: Optional[int] = None,
              low: int = 0) -> torch.Tensor:
        """Random numbers for the global batch of ``n`` images per process (dim 1), this rank's
        rows ``rank::world``: integers in ``[low, high)`` when ``high`` is given, else normal."""
        full = (shape[0], n * self.ctx.world) + tuple(shape[1:])
        dev = self.ctx.device
        t = torch.randint(low, high, full, generator=g, device=dev) if high is not None else \
            torch.randn(full, generator=g, device=dev)
        return t[:, self.ctx.rank::self.ctx.world]

    def _train_loader(self, name: str, plan: StagePlan, batch_schedule: Optional[Sequence[int]]):
        """``(loader, sampler, batches per epoch)`` of a stage (the sampler has ``set_epoch``)."""
        cfg, ctx = self.cfg, self.ctx
        if plan.iters:
            batches = list(batch_schedule or [plan.batch or cfg.batch_size])
            if any(b % ctx.world for b in batches):
                raise ValueError(f"stage {name}: batch sizes {batches} must be multiples of the {ctx.world} processes")
            sampler = EpochBatches(len(self.train_set), batches, plan.iters, stage_seed(cfg.seed, name),
                                   ctx.rank, ctx.world)
            loader = torch.utils.data.DataLoader(self.train_set, batch_sampler=sampler, pin_memory=ctx.device.type == "cuda",
                                                 **worker_options(cfg.workers, cfg.worker_start))
            return loader, sampler, plan.iters
        sampler = torch.utils.data.DistributedSampler(self.train_set, num_replicas=ctx.world, rank=ctx.rank,
                                                      shuffle=True, seed=cfg.seed, drop_last=True)
        loader = make_loader(self.train_set, self.local_batch, sampler, cfg.workers, ctx.device.type == "cuda", True,
                             cfg.worker_start)
        return loader, sampler, len(loader)

    def _log_epoch(self, name: str, epochs: int, rec: Dict, note: str = "") -> None:
        """Logs an epoch's record: a line, and the record in ``RUN/epochs.jsonl``."""
        self.log(f"[{name}] epoch {rec['epoch']}/{epochs} " + " ".join(
            f"{key}={v}" for key, v in rec.items() if key not in ("stage", "epoch")) + note, **rec)

    def _log_missing_epochs(self, name: str, epochs: int, history: List[Dict]) -> None:
        """Logs the records of a stage checkpoint's ``history`` that ``RUN/epochs.jsonl`` lacks:
        an epoch's record is logged just after its checkpoint is written, so a run stopped
        between the two has it in the checkpoint alone."""
        path = self.out / "epochs.jsonl"
        if not self.ctx.main or not history:
            return
        logged = set(path.read_text().splitlines()) if path.exists() else set()
        for rec in history:
            if json.dumps(rec) not in logged:
                self._log_epoch(name, epochs, rec, " (from the checkpoint: the run stopped before logging it)")

    def _restore(self, name: str, epochs: int, opt, scaler, resume: bool):
        """``(start epoch, history, elapsed seconds)`` from ``RUN/<name>.pt``; ``None`` when that
        stage is already done. Records of its epochs missing from the log are logged first."""
        ck = self.load_stage(name) if resume else None
        if ck is None:
            return 0, [], 0.0
        self._log_missing_epochs(name, epochs, ck["history"])
        if ck["done"]:
            self.timings[name] = ck["elapsed"]
            self.skipped.add(name)
            self.log(f"[{name}] already done ({ck['epoch']} epoch{'s' if ck['epoch'] != 1 else ''}, "
                     f"{ck['elapsed'] / 60:.1f} min): skipped")
            return None
        try:
            opt.load_state_dict(ck["opt"])
        except (ValueError, KeyError, TypeError) as exc:  # the optimiser of other parameters
            raise InputError(f"{self.stage_path(name)}: its optimiser state does not fit this run's {name} (a "
                             f"checkpoint of another run?): {exc}") from exc
        if ck.get("scaler"):  # empty where loss scaling was off (CPU, bfloat16)
            scaler.load_state_dict(ck["scaler"])
        self.log(f"[{name}] resuming after epoch {ck['epoch']}")
        return ck["epoch"], ck["history"], ck["elapsed"]

    def glance_cache(self, name: str) -> GlanceCache:
        """The glance outputs of stage ``name`` (glance encoder frozen): kept per train image
        unless ``cfg.glance_cache_mb`` is 0 or the train images are augmented (then recomputed
        per batch, logged). One cache serves every stage: rows an earlier stage kept are used
        while the encoder and the autocast context are unchanged (:class:`GlanceCache`)."""
        cache = self._glance_cache
        if cache is None:
            off = ("the train images are augmented" if getattr(self.train_set, "augmented", True) else
                   # a batch is served from the cache only once each of its images was seen in this
                   # process, and each process sees a different share of the images per epoch
                   "each process sees a different share of the train images (DistributedDataParallel)"
                   if self.ctx.distributed else None)
            cache = GlanceCache(self.model.model_prime, self.model.glance, len(self.train_set),
                                float(self.cfg.glance_cache_mb), self.log, name, off)
            self._glance_cache = cache
        cache.name = name
        return cache

    # ------------------------------------------------------------------ the loop
    def loop(self, name: str, plan: StagePlan, params: List[nn.Parameter], train_modules: List[nn.Module],
             step: Step, evaluate: Callable[[], Dict[str, float]], adam: bool = False, schedule: bool = True,
             resume: bool = True, on_epoch: Optional[Callable[[int], None]] = None,
             batch_schedule: Optional[Sequence[int]] = None, raw: bool = False) -> None:
        """Runs ``plan.epochs`` epochs of ``step`` (continuing after the last epoch
        ``RUN/<name>.pt`` holds when ``resume``); ``on_epoch(epoch)`` runs before each epoch,
        ``batch_schedule`` gives an iteration-budget stage's batch per epoch. ``step`` gets the
        images normalised, or as uint8 with ``raw`` (a step that uses only part of them)."""
        cfg, ctx = self.cfg, self.ctx
        if plan.epochs <= 0:
            return
        if plan.minutes and ctx.distributed:
            raise ValueError(f"stage {name}: a wall-clock cap (minutes) needs a single process")
        self._set_trainable(params)
        opt = (torch.optim.Adam(params, lr=plan.lr) if adam else
               torch.optim.AdamW(params, lr=plan.lr, weight_decay=cfg.weight_decay))
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        restored = self._restore(name, plan.epochs, opt, scaler, resume)
        if restored is None:
            return
        start, history, elapsed = restored
        loader, sampler, iters = self._train_loader(name, plan, batch_schedule)
        total = plan.epochs * iters
        warm = min(cfg.warmup_iters, max(1, total // 10))
        t0 = time.time() - elapsed

        def lr_at(i: int) -> float:
            if not schedule:
                return plan.lr
            if i < warm:
                return plan.lr * (i + 1) / warm
            frac = (i - warm) / max(1, total - warm)
            if plan.minutes:  # a capped stage still ends annealed
                frac = max(frac, (time.time() - t0) / 60 / plan.minutes)
            return plan.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

        from tqdm.auto import tqdm

        stopped, lr = None, plan.lr
        for epoch in range(start, plan.epochs):
            if on_epoch is not None:
                on_epoch(epoch)
            sampler.set_epoch(epoch)
            self.train_set.epoch = epoch
            g = torch.Generator(device=ctx.device)
            g.manual_seed(stage_seed(cfg.seed, name) * 100_003 + epoch)
            self._train_mode(train_modules)
            keys: List[str] = []
            sums = torch.zeros(0, dtype=torch.float64)  # images, then each figure x images
            t_ep, k = time.time(), 0
            bar = tqdm(SIGINT.started(loader), total=len(loader), desc=f"{name} {epoch + 1}/{plan.epochs}",
                       disable=not self.progress, leave=False, mininterval=2.0)
            for it, (x, y, idx) in enumerate(bar):
                SIGINT.check()  # a Ctrl-C raised where Python ignores it (a __del__)
                lr = lr_at(epoch * iters + it)
                for grp in opt.param_groups:
                    grp["lr"] = lr
                x = x.to(ctx.device, non_blocking=True)
                x = x if raw else normalise(x, self.spec.mean, self.spec.std)
                y = y.to(ctx.device, non_blocking=True)
                stats = step(x, y, idx, g, opt, scaler)
                if not keys:
                    keys = list(stats)
                    sums = torch.zeros(1 + len(keys), dtype=torch.float64)
                sums += torch.tensor([1.0] + [float(stats[key]) for key in keys], dtype=torch.float64) * len(y)
                k += 1
                if k == 1:  # after the first step: workers started, first batch decoded, kernels chosen
                    t_first, n_first = time.time(), float(sums[0])
                if self.progress:  # the epoch's running mean, shown at the bar's next refresh
                    bar.set_postfix(loss=f"{float(sums[1]) / max(float(sums[0]), 1):.3f}", refresh=False)
                if plan.minutes and (time.time() - t0) / 60 > plan.minutes:
                    stopped = f"time cap {plan.minutes} min hit at epoch {epoch + 1} iter {it + 1}"
                    break
            bar.close()
            t_end = time.time()
            sums = ctx.all_sum(sums)
            seconds = t_end - t_ep
            rec = {"stage": name, "epoch": epoch + 1}
            rec.update({key: round(float(sums[j + 1] / sums[0]), 2 if key.endswith("_acc") else 4)  # acc: percent
                        for j, key in enumerate(keys)})
            rec.update(lr=lr, iters=k, images_per_s=round(float(sums[0]) / max(seconds, 1e-9), 1))
            if k > 1:  # the epoch without its first step (DataLoader start-up, first batch, autotuning)
                rec["images_per_s_steady"] = round((float(sums[0]) - n_first * ctx.world) / max(t_end - t_first, 1e-9), 1)
            rec.update(evaluate())
            elapsed = time.time() - t0
            rec["minutes"] = round(elapsed / 60, 2)
            history.append(rec)
            done = stopped is not None or epoch + 1 == plan.epochs
            if ctx.main:
                with SIGINT.deferred():  # the epoch's checkpoint is written whole, then the run stops
                    atomic_torch_save({"done": done, "epoch": epoch + 1, "elapsed": elapsed, "history": history,
                                       "stopped": stopped,
                                       "models": {key: m.state_dict() for key, m in self._modules().items()},
                                       "opt": opt.state_dict(), "scaler": scaler.state_dict()}, self.stage_path(name))
            ctx.barrier()
            self._log_epoch(name, plan.epochs, rec)
            SIGINT.check()  # ... or the validation's (the epoch is saved)
            if stopped:
                self.log(f"[{name}] {stopped}")
                break
        self.timings[name] = time.time() - t0

    def _backward(self, loss: torch.Tensor, opt: torch.optim.Optimizer, scaler) -> None:
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    # ------------------------------------------------------------------ stages
    def _focus_params(self) -> List[nn.Parameter]:
        """Encoders and the classifier heads the T steps use (unused ones stay frozen: DDP needs
        that; the glance encoder stays frozen unless ``train_glance``)."""
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
        mods = (list(m.model_prime.parameters()) if self.cfg.train_glance else []) + \
            list(m.model.parameters()) + list(m.fc.parameters())
        return [p for p in mods if id(p) not in skip]

    def _focus_stage(self, name: str, plan: StagePlan, policy: bool, resume: bool) -> None:
        m, spec = self.model, self.spec
        params = self._focus_params()
        self._set_trainable(params)  # before DDP, which syncs exactly the parameters that need gradients
        net = self._ddp(FocusLoss(m, float(self.cfg.dsn_ratio or 0.0), policy, self.cfg.action_std))
        T, S, P = spec.steps, spec.image_size, spec.patch_size
        cache = None if self.cfg.train_glance else self.glance_cache(name)

        def step(x, y, idx, g, opt, scaler):
            n = len(y)
            draw = self._draw(g, (T - 1, 2), n) if policy else self._draw(g, (T - 1, 2), n, S - P + 1)
            with self.autocast():
                if cache is None:
                    loss, logits = net(x, y, draw)
                else:
                    with torch.no_grad():
                        glance = cache(x, idx)
                    loss, logits = net(x, y, draw, glance)
            self._backward(loss, opt, scaler)
            return {"loss": loss.item(), "train_acc": 100.0 * (logits.argmax(1) == y).float().mean().item()}

        modules = ([m.model_prime] if self.cfg.train_glance else []) + [m.model, m.fc]
        self.loop(name, plan, params, modules, step, self.evaluate, resume=resume)

    def stage1(self, resume: bool = True) -> None:
        if self.spec.classifier == "cascaded" and not (resume and self.stage_path("stage1").exists()):
            self.init_cascaded_heads()
        self._focus_stage("stage1", self.cfg.stage1, False, resume)

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

    def stage3(self, resume: bool = True) -> None:
        self._focus_stage("stage3", self.cfg.stage3, True, resume)

    def stage2(self, resume: bool = True, name: str = "stage2", plan: Optional[StagePlan] = None) -> None:
        """PPO on the policy (one update per batch, as the reference)."""
        cfg, m, spec = self.cfg, self.model, self.spec
        S, P, T = spec.image_size, spec.patch_size, spec.steps
        if T < 2:
            return
        self._set_trainable(list(m.policy.parameters()))
        net = self._ddp(PolicyEval(m, cfg.action_std))
        cache = self.glance_cache(name)

        def step(x, y, idx, g, opt, scaler):
            noise = self._draw(g, (T - 1, 2), len(y))
            yv = y.view(-1, 1)
            with torch.no_grad(), self.autocast():
                f0, fmap = cache(x, idx)
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
            ret_n = normalised_returns(rewards, cfg.gamma, self.ctx.all_sum)
            loss = ppo_loss(net, torch.stack(states), torch.stack(actions), ret_n, cfg.clip)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss.item(), "reward": torch.stack(rewards).sum(0).mean().item(),
                    "train_acc": 100.0 * (logits.argmax(1) == y).float().mean().item()}

        self.loop(name, plan or cfg.stage2, list(m.policy.parameters()), [m.policy], step, self.evaluate, adam=True,
                  schedule=False, resume=resume)

    def static_stage(self, resume: bool = True) -> None:
        self.release_glance_cache()  # the GFNet stages are over
        if self.static is None or self.cfg.static.epochs <= 0:
            return
        self._set_trainable(list(self.static.parameters()))
        net = self._ddp(StaticLoss(self.static))

        def step(x, y, idx, g, opt, scaler):
            with self.autocast():
                loss, logits = net(x, y)
            self._backward(loss, opt, scaler)
            return {"loss": loss.item(), "train_acc": 100.0 * (logits.argmax(1) == y).float().mean().item()}

        self.loop("static", self.cfg.static, list(self.static.parameters()), [self.static], step,
                  self.evaluate_static, resume=resume)
