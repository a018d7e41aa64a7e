"""The losses of the GFNet training stages (shared by the image-folder and the demo trainers).

* :class:`FocusLoss` (stages 1 and 3): mean over the T steps of CE(step classifier), plus
  ``dsn_ratio`` x CE(that encoder's own head) on every step the encoders compute.
* :class:`PolicyEval` and :func:`ppo_loss` (stage 2): PPO's clipped surrogate on stored states
  and raw actions (reward: gain in true-class probability, discounted returns normalised over
  the global batch, 0.5 value MSE, 0.01 entropy).
* :class:`StaticLoss`: cross-entropy of the static baseline on whole images.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...models.gfnet import GFNet, action_to_coords, crop_patches


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

    ``forward(x, y, draw, glance=None)``: with ``policy=False`` ``draw`` holds the patch corners
    (T-1, n, 2); with ``policy=True`` it holds the policy's noise (T-1, n, 2) and the (frozen)
    policy places the patches. ``glance``: the frozen glance encoder's ``(pooled, feature map)``
    of ``x`` when the caller has them (else computed here). Returns ``(loss, last step's logits)``.
    """

    def __init__(self, model: GFNet, dsn_ratio: float, policy: bool, action_std: float) -> None:
        super().__init__()
        self.model = model
        self.dsn = dsn_ratio
        self.policy = policy
        self.std = action_std

    def forward(self, x: torch.Tensor, y: torch.Tensor, draw: torch.Tensor,
                glance: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        m, spec = self.model, self.model.spec
        S, P, T = spec.image_size, spec.patch_size, spec.steps
        f0, fmap = glance if glance is not None else m.model_prime(m.glance(x))
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


def normalised_returns(rewards: List[torch.Tensor], gamma: float,
                       all_sum: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Discounted returns (T-1, n) of per-step rewards, normalised by the mean and (unbiased)
    standard deviation over the global batch (``all_sum`` sums over processes)."""
    returns, run = [], torch.zeros_like(rewards[0])
    for r in reversed(rewards):
        run = r + gamma * run
        returns.insert(0, run)
    ret = torch.stack(returns)
    stats = all_sum(torch.stack([ret.sum(), (ret * ret).sum(), ret.new_tensor(ret.numel())]).double())
    mean = stats[0] / stats[2]
    std = torch.sqrt(torch.clamp((stats[1] - stats[2] * mean ** 2) / max(float(stats[2]) - 1, 1.0), min=0))
    return ((ret - mean) / (std + 1e-5)).float()


def ppo_loss(net: nn.Module, states: torch.Tensor, actions: torch.Tensor, ret_n: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's loss for one update on a rollout (``net``: a :class:`PolicyEval`, maybe DDP-wrapped)."""
    with torch.no_grad():
        old_logp, _, _ = net.module(states, actions) if hasattr(net, "module") else net(states, actions)
    logp, values, entropy = net(states, actions)
    ratio = torch.exp(logp - old_logp)
    adv = ret_n - values.detach()
    surr = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    return (-surr + 0.5 * F.mse_loss(values, ret_n) - 0.01 * entropy).mean()
