"""The reference GFNet in PyTorch: glance, policy-driven focus, step classifiers.

:meth:`GFNet.trace` is the ground truth every other part of the toolkit is checked against.
It follows the public reference implementation step by step (described in ``docs/gfnet.md``),
batched: no per-sample Python loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..variants import GFNetSpec
from .backbones import Encoder, probe_encoder
from .heads import build_heads


def glance_input(images: torch.Tensor, patch_size: int, mode: str) -> torch.Tensor:
    """The glance: ``images`` (N, 3, S, S) resized to P x P with ``align_corners=True``."""
    return F.interpolate(images, size=[patch_size, patch_size], mode=mode, align_corners=True)


def action_to_coords(action: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """Patch top-left ``(row, col)`` = floor(action * (S - P)) in float32, as int32 (N, 2)."""
    return torch.floor(action.float() * (image_size - patch_size)).to(torch.int32)


def crop_patches(images: torch.Tensor, coords: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cuts the P x P window at ``coords`` (N, 2) (row, col) from each image, without resizing.

    Raises:
        ValueError: a coordinate outside ``[0, S - P]`` (coordinates on the CPU; on a GPU the
            check runs on the device and fails the CUDA context, like an indexing error).
    """
    n, c, h, w = images.shape
    coords = coords.to(torch.long)
    if coords.shape != (n, 2):
        raise ValueError(f"coords must be ({n}, 2), got {tuple(coords.shape)}")
    if n:
        bad = (coords.min() < 0) | (coords[:, 0].max() > h - patch_size) | (coords[:, 1].max() > w - patch_size)
        if coords.is_cuda:  # checked on the device: a host test would stop the host at every crop
            torch._assert_async(~bad, "crop_patches: patch coordinates out of range")
        elif bool(bad):
            raise ValueError(f"patch coordinates out of range [0, {h - patch_size}]: {coords.tolist()}")
    ar = torch.arange(patch_size, device=images.device)
    rows = (coords[:, 0:1] + ar).view(n, 1, patch_size, 1)
    cols = (coords[:, 1:2] + ar).view(n, 1, 1, patch_size)
    bidx = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    cidx = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return images[bidx, cidx, rows, cols]


@dataclass
class Trace:
    """All steps of a GFNet on a batch.

    Attributes:
        probs: softmax probabilities (T, N, classes).
        logits: logits (T, N, classes).
        coords: patch top-left (row, col) per focus step (T-1, N, 2), int32.
        actions: policy actions in [0, 1] (T-1, N, 2).
        features: pooled features per step (T, N, F).
    """

    probs: torch.Tensor
    logits: torch.Tensor
    coords: torch.Tensor
    actions: torch.Tensor
    features: torch.Tensor


class GFNet(nn.Module):
    """Glance-and-Focus Network.

    Args:
        spec: model spec; for custom backbones ``feature_dim``/``fmap_channels`` may be 0 and are
            filled in by probing the backbone at P.

    Attributes:
        spec: the (completed) spec.
        model_prime: global (glance) encoder.
        model: local (focus) encoder.
        fc: step classifier.
        policy: patch-location policy.
    """

    def __init__(self, spec: GFNetSpec) -> None:
        super().__init__()
        spec.validate()
        self.model_prime = Encoder(spec)
        self.model = Encoder(spec)
        feat, ch, hw = probe_encoder(self.model, spec.patch_size)
        if spec.family == "custom" or not spec.feature_dim:
            spec = spec.replace(feature_dim=feat, fmap_channels=ch)
        elif (feat, ch) != (spec.feature_dim, spec.fmap_channels):
            raise ValueError(
                f"{spec.model_name}: backbone gives F={feat}, C={ch}, spec says F={spec.feature_dim}, C={spec.fmap_channels}"
            )
        if hw != spec.fmap_hw:
            raise ValueError(f"{spec.model_name}: feature map is {hw}x{hw} at P={spec.patch_size}, expected {spec.fmap_hw}")
        self.spec = spec
        self.policy, self.fc = build_heads(spec)
        self.eval()

    # ------------------------------------------------------------------ steps
    def glance(self, images: torch.Tensor) -> torch.Tensor:
        return glance_input(images, self.spec.patch_size, self.spec.glance_interpolation)

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.spec.image_size
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != s or images.shape[3] != s:
            raise ValueError(f"images must be (N, 3, {s}, {s}), got {tuple(images.shape)}")
        if images.dtype != torch.float32:
            raise TypeError(f"images must be float32, got {images.dtype}")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or Inf")

    @torch.no_grad()
    def trace(self, images: torch.Tensor, coords_override: Optional[torch.Tensor] = None) -> Trace:
        """Runs every step on a batch, as the reference does at test time.

        Args:
            images: normalised float32 (N, 3, S, S).
            coords_override: optional (T-1, N, 2) int patch coordinates used instead of the
                policy's (to evaluate random or centre patches with the same model).

        Returns:
            A :class:`Trace`.
        """
        self._check_images(images)
        spec = self.spec
        S, P, T = spec.image_size, spec.patch_size, spec.steps
        n = images.shape[0]
        if coords_override is not None:  # the caller's coordinates: a bad one is a ValueError, on any device
            c = coords_override.detach().to("cpu", torch.long)
            if c.shape != (T - 1, n, 2):
                raise ValueError(f"coords_override must be ({T - 1}, {n}, 2), got {tuple(c.shape)}")
            if c.numel() and (c.min() < 0 or c.max() > S - P):
                raise ValueError(f"coords_override out of range [0, {S - P}]")
        pooled, fmap = self.model_prime(self.glance(images))
        feats: List[torch.Tensor] = [pooled]
        h_fc = None
        if spec.classifier == "gru":
            logits, h_fc = self.fc.gru_step(pooled, None)
        if spec.step0 == "backbone":
            logits = self.model_prime.logits(pooled)
        all_logits = [logits]
        coords_l, actions_l = [], []
        h_pol = None
        for t in range(1, T):
            action, h_pol, _ = self.policy.act(fmap, h_pol)
            coords = action_to_coords(action, S, P) if coords_override is None else coords_override[t - 1].to(torch.int32)
            pooled, fmap = self.model(crop_patches(images, coords, P))
            feats.append(pooled)
            if spec.classifier == "gru":
                logits, h_fc = self.fc.gru_step(pooled, h_fc)
            else:
                logits = self.fc.cascaded(feats)
            all_logits.append(logits)
            coords_l.append(coords)
            actions_l.append(action)
        lg = torch.stack(all_logits)
        empty = images.new_zeros((0, n, 2))
        return Trace(
            probs=F.softmax(lg, dim=2),
            logits=lg,
            coords=torch.stack(coords_l) if coords_l else empty.to(torch.int32),
            actions=torch.stack(actions_l) if actions_l else empty,
            features=torch.stack(feats),
        )


def build_gfnet(spec: GFNetSpec) -> GFNet:
    """Builds a GFNet (random weights) for ``spec``."""
    return GFNet(spec)
