"""Backbones as GFNet encoders: ``x -> (pooled feature (N, F), feature map (N, C, h, w))``.

Each released family is built from the library that has it (torchvision for ResNet-50 and
DenseNet, timm for RegNetY, MobileNet-V3 and EfficientNet) and keeps that library's parameter
names, which are the reference checkpoint's names (RegNetY excepted: see :mod:`.keymap`).
What is "pooled feature" and "feature map" per family follows the reference implementation:

* resnet: feature map = ``layer4`` output, pooled = its global average.
* densenet: feature map = ``relu(features(x))``, pooled = its global average.
* regnet: feature map = stage-4 output, pooled = its global average; logits from ``head.fc``.
* mobilenet: feature map = ``blocks`` output; pooled = ``act2(conv_head(avgpool(fmap)))``.
* efficientnet: feature map after ``conv_head``/``bn2``/swish; pooled = its global average.
* custom (any timm model): feature map = ``forward_features``, pooled =
  ``forward_head(pre_logits=True)``, logits = the model's classifier.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..variants import GFNetSpec


def _create_timm(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    import timm

    if name == "mobilenetv3_large_125":  # no timm twin: the same design at width 1.25
        from timm.models.mobilenetv3 import _gen_mobilenet_v3

        return _gen_mobilenet_v3("mobilenetv3_large_100", 1.25, pretrained=False, num_classes=num_classes, **kwargs)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise ValueError(f"timm has no model named {name!r} ({exc})") from exc


class Encoder(nn.Module):
    """A backbone returning ``(pooled, feature_map)``.

    Args:
        spec: the model spec (family, backbone name, classes).

    Attributes:
        net: the wrapped library model; its ``state_dict`` uses the library's names.
    """

    def __init__(self, spec: GFNetSpec) -> None:
        super().__init__()
        self.family = spec.family
        self.spec_name = spec.model_name
        if spec.family == "resnet":
            import torchvision

            if spec.model_name != "resnet50":
                raise ValueError(f"resnet family supports resnet50 only, got {spec.model_name!r}")
            self.net = torchvision.models.resnet50(weights=None, num_classes=spec.num_classes)
        elif spec.family == "densenet":
            import torchvision

            if spec.model_name not in ("densenet121", "densenet169", "densenet201"):
                raise ValueError(f"unknown densenet variant {spec.model_name!r}")
            self.net = getattr(torchvision.models, spec.model_name)(weights=None, num_classes=spec.num_classes)
        elif spec.family == "mobilenet" and spec.model_name == "mobilenetv3_large_125":
            self.net = _create_timm("mobilenetv3_large_125", spec.num_classes, **spec.backbone_kwargs)
        else:
            if not spec.backbone:
                raise ValueError(f"spec for {spec.model_name!r} names no timm backbone")
            self.net = _create_timm(spec.backbone, spec.num_classes, **spec.backbone_kwargs)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Runs the backbone.

        Args:
            x: images (N, 3, H, W), normalised.

        Returns:
            ``(pooled (N, F), feature_map (N, C, h, w))``.
        """
        net = self.net
        if self.family == "resnet":
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            fmap = net.layer4(net.layer3(net.layer2(net.layer1(x))))
            return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1), fmap
        if self.family == "densenet":
            fmap = F.relu(net.features(x))
            return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1), fmap
        if self.family == "regnet":
            fmap = net.forward_features(x)
            return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1), fmap
        fmap = net.forward_features(x)
        pooled = net.forward_head(fmap, pre_logits=True)
        return pooled.flatten(1), fmap

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """The backbone's own classifier on the pooled feature (step-0 logits of some families)."""
        net = self.net
        if self.family == "resnet":
            return net.fc(pooled)
        if self.family == "densenet":
            return net.classifier(pooled)
        if self.family == "regnet":
            return net.head.fc(pooled)
        return net.get_classifier()(pooled)

    def classifier_module(self) -> nn.Module:
        """The Linear layer :meth:`logits` applies."""
        net = self.net
        if self.family == "resnet":
            return net.fc
        if self.family == "densenet":
            return net.classifier
        if self.family == "regnet":
            return net.head.fc
        return net.get_classifier()


@torch.no_grad()
def probe_encoder(encoder: Encoder, patch_size: int) -> Tuple[int, int, int]:
    """Runs ``encoder`` once on zeros and returns ``(F, C, h)`` at ``patch_size``."""
    was_training = encoder.training
    encoder.eval()
    pooled, fmap = encoder(torch.zeros(1, 3, patch_size, patch_size))
    encoder.train(was_training)
    if fmap.shape[2] != fmap.shape[3]:
        raise ValueError(f"feature map is not square: {tuple(fmap.shape)}")
    return int(pooled.shape[1]), int(fmap.shape[1]), int(fmap.shape[2])
