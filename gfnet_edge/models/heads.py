"""GFNet heads: the patch-location policy and the recurrent / cascaded classifiers.

Module and parameter names are the reference's (``ActorCritic`` -> :class:`Policy`,
``Full_layer`` -> :class:`Classifier`), so reference checkpoints load without renaming.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..variants import CASCADED_HEADS, GFNetSpec


def gru_step(gru: nn.GRU, x: torch.Tensor, hidden: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step of a one-layer ``gru`` on (N, I) ``x`` and (N, H) ``hidden``: ``(output, new
    hidden)``, both (N, H). Under CUDA autocast the step runs in float32: autocast hands cuDNN's
    GRU float16 whatever its dtype, and under bfloat16 (no loss scaling) the small gradients of
    a recurrent head would underflow in float16."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        with torch.autocast("cuda", enabled=False):
            out, h = gru(x.float().unsqueeze(0), hidden.float().unsqueeze(0))
    else:
        out, h = gru(x.unsqueeze(0), hidden.unsqueeze(0))
    return out[0], h[0]


class Policy(nn.Module):
    """Patch-location policy (actor-critic).

    ``state_encoder`` maps the previous step's feature map to a vector, a GRU carries it across
    steps (hidden reset to zero at step 1), and ``actor`` = Linear(hidden, 2) + sigmoid gives the
    patch centre as fractions of ``S - P``; at test time the action is that mean.

    Args:
        fmap_channels: C of the feature map.
        fmap_hw: its side h (= ceil(P / 32)).
        hidden: GRU hidden size.
        conv: conv encoder (1x1 conv to 32 channels) instead of the linear one.
    """

    def __init__(self, fmap_channels: int, fmap_hw: int, hidden: int, conv: bool) -> None:
        super().__init__()
        state_dim = fmap_channels * fmap_hw * fmap_hw
        if conv:
            self.state_encoder = nn.Sequential(
                nn.Conv2d(fmap_channels, 32, kernel_size=1, stride=1, padding=0, bias=False),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(32 * fmap_hw * fmap_hw, hidden),
                nn.ReLU(),
            )
        else:
            self.state_encoder = nn.Sequential(
                nn.Linear(state_dim, 2048), nn.ReLU(), nn.Linear(2048, hidden), nn.ReLU()
            )
        self.gru = nn.GRU(hidden, hidden, batch_first=False)
        self.actor = nn.Sequential(nn.Linear(hidden, 2), nn.Sigmoid())
        self.critic = nn.Sequential(nn.Linear(hidden, 1))
        self.hidden_size = hidden
        self.conv = conv
        self.fmap_channels = fmap_channels
        self.fmap_hw = fmap_hw

    def encode(self, fmap: torch.Tensor) -> torch.Tensor:
        """State encoder on a feature map (N, C, h, w) -> (N, hidden)."""
        if self.conv:
            return self.state_encoder(fmap)
        return self.state_encoder(fmap.flatten(1))

    def recur(self, encoded: torch.Tensor, hidden: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """One GRU step. ``hidden`` (N, H) or ``None`` for zeros. Returns ``(output, new_hidden)``."""
        if hidden is None:
            hidden = encoded.new_zeros(encoded.shape[0], self.hidden_size)
        return gru_step(self.gru, encoded, hidden)

    def act(self, fmap: torch.Tensor, hidden: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deterministic action. Returns ``(action (N, 2) in [0, 1], new_hidden, gru_output)``."""
        out, h = self.recur(self.encode(fmap), hidden)
        return self.actor(out), h, out


class Classifier(nn.Module):
    """Step classifier: a GRU + Linear, or cascaded Linear layers over concatenated features.

    Args:
        feature_dim: F.
        num_classes: classes.
        kind: ``"gru"`` or ``"cascaded"``.
        hidden: GRU hidden size (GRU kind only).
    """

    def __init__(self, feature_dim: int, num_classes: int, kind: str, hidden: Optional[int] = 1024) -> None:
        super().__init__()
        self.kind = kind
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        if kind == "gru":
            self.hidden_size = int(hidden or 1024)
            self.rnn = nn.GRU(feature_dim, self.hidden_size)
            self.fc = nn.Linear(self.hidden_size, num_classes)
        elif kind == "cascaded":
            self.hidden_size = 0
            for k in range(2, CASCADED_HEADS + 2):
                self.add_module(f"fc_{k}", nn.Linear(feature_dim * k, num_classes))
        else:
            raise ValueError(f"classifier kind must be 'gru' or 'cascaded', got {kind!r}")

    def gru_step(self, feature: torch.Tensor, hidden: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """GRU kind: one step. Returns ``(logits, new_hidden)``; ``hidden=None`` means zeros."""
        if hidden is None:
            hidden = feature.new_zeros(feature.shape[0], self.hidden_size)
        out, h = gru_step(self.rnn, feature, hidden)
        return self.fc(out), h

    def head(self, k: int) -> nn.Linear:
        """Cascaded kind: the Linear layer over ``k`` concatenated features (k >= 2)."""
        return getattr(self, f"fc_{k}")

    def cascaded(self, features: List[torch.Tensor]) -> torch.Tensor:
        """Cascaded kind: logits from the concatenation of ``features`` (glance first)."""
        if len(features) < 2:
            raise ValueError("cascaded classifier needs at least two step features")
        return self.head(len(features))(torch.cat(features, 1))


def build_heads(spec: GFNetSpec) -> Tuple[Policy, Classifier]:
    """Policy and classifier for ``spec`` (feature sizes must be filled in)."""
    policy = Policy(spec.fmap_channels, spec.fmap_hw, spec.policy_hidden, spec.policy_conv)
    fc = Classifier(spec.feature_dim, spec.num_classes, spec.classifier, spec.fc_hidden)
    return policy, fc
