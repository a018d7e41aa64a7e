"""Multiply-add counting per GFNet step, measured on the model itself.

Counts Conv2d and Linear multiply-adds (as the paper does) with forward hooks, plus the GRU
cells (3 gates: ``3 * (I*H + H*H)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn as nn

from .gfnet import GFNet


def _count(module: nn.Module, run) -> int:
    total = [0]

    def conv_hook(m: nn.Conv2d, inp, out) -> None:
        kh, kw = m.kernel_size
        total[0] += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def lin_hook(m: nn.Linear, inp, out) -> None:
        total[0] += out.numel() // out.shape[0] * m.in_features

    def gru_hook(m: nn.GRU, inp, out) -> None:
        total[0] += 3 * (m.input_size * m.hidden_size + m.hidden_size * m.hidden_size)

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(lin_hook))
        elif isinstance(m, nn.GRU):
            handles.append(m.register_forward_hook(gru_hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return total[0]


@dataclass
class StepCosts:
    """Multiply-adds of one GFNet, per part and cumulative per step.

    Attributes:
        backbone: one encoder pass at P x P (pooled feature + feature map).
        backbone_classifier: the backbone's own classifier (step-0 logits of some families).
        policy: state encoder + GRU + actor, per focus step.
        classifier: per step k (k = 0..T-1) classifier cost (GRU+Linear or cascaded Linear).
        cumulative: cumulative cost of steps 0..k (the checkpoint's ``flops``).
    """

    backbone: int
    backbone_classifier: int
    policy: int
    classifier: List[int]
    cumulative: List[int]

    def as_dict(self) -> Dict[str, object]:
        return {
            "backbone": self.backbone, "backbone_classifier": self.backbone_classifier,
            "policy": self.policy, "classifier": list(self.classifier), "cumulative": list(self.cumulative),
        }


def count_step_macs(model: GFNet) -> StepCosts:
    """Counts per-step multiply-adds of ``model`` at its patch size."""
    spec = model.spec
    P = spec.patch_size
    x = torch.zeros(1, 3, P, P)
    was = model.training
    model.eval()
    try:
        out = []  # the counted pass's (pooled, fmap) feed the heads
        backbone = _count(model.model, lambda: out.append(model.model(x)))
        pooled, fmap = out[0]
        bclf = _count(model.model.classifier_module(), lambda: model.model.logits(pooled))
        policy = _count(model.policy, lambda: model.policy.act(fmap, None)) - _count(
            model.policy.critic, lambda: None
        )
        classifier: List[int] = []
        for k in range(spec.steps):
            if spec.classifier == "gru":
                c = _count(model.fc, lambda: model.fc.gru_step(pooled, None))
                if k == 0 and spec.step0 == "backbone":
                    c += bclf
            else:
                c = bclf if k == 0 else _count(model.fc, lambda: model.fc.cascaded([pooled] * (k + 1)))
            classifier.append(c)
    finally:
        model.train(was)
    cumulative, run = [], 0
    for k in range(spec.steps):
        run += backbone + classifier[k] + (policy if k > 0 else 0)
        cumulative.append(run)
    return StepCosts(backbone, bclf, policy, classifier, cumulative)


def count_static_macs(encoder: nn.Module, image_size: int) -> int:
    """Multiply-adds of a plain backbone + its classifier at ``image_size`` (static baseline)."""
    x = torch.zeros(1, 3, image_size, image_size)
    return _count(encoder, lambda: encoder(x))
