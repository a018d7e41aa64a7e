"""The one table of GFNet variants released with the paper.

Every size, interpolation mode and head type the toolkit needs for a released model comes from
``VARIANTS``; custom models (any timm backbone) carry the same fields in their checkpoint under
``gfnet_edge_config`` (see :class:`gfnet_edge.variants.GFNetSpec`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Optional, Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Families and how step 0 produces its logits.
FAMILIES = ("resnet", "densenet", "regnet", "mobilenet", "efficientnet", "custom")


@dataclass(frozen=True)
class Variant:
    """A released GFNet variant (one row of the table in ``docs/gfnet.md``).

    Attributes:
        name: ``model_name`` as written in checkpoints.
        family: backbone family (decides step-0 logits and key mapping).
        image_size: full input S.
        patch_sizes: released patch sizes P.
        steps: number of steps T.
        crop_pct: validation centre-crop ratio.
        dataset_interpolation: resize mode of the validation pre-processing.
        glance_interpolation: mode of the S -> P glance resize (align_corners=True).
        feature_dim: pooled feature size F.
        fmap_channels: feature-map channels C.
        policy_conv: conv state encoder (True) or linear (False).
        policy_hidden: policy GRU hidden size.
        classifier: ``"gru"`` or ``"cascaded"``.
        fc_hidden: classifier GRU hidden size (``None`` for cascaded).
        step0: ``"classifier"`` (GRU logits) or ``"backbone"`` (backbone's own head).
        timm_name: timm model the backbone is built from (``None`` for torchvision models).
    """

    name: str
    family: str
    image_size: int
    patch_sizes: Tuple[int, ...]
    steps: int
    crop_pct: float
    dataset_interpolation: str
    glance_interpolation: str
    feature_dim: int
    fmap_channels: int
    policy_conv: bool
    policy_hidden: int
    classifier: str
    fc_hidden: Optional[int]
    step0: str
    timm_name: Optional[str] = None


def _v(name, family, S, Ps, T, crop, dint, gint, F, C, conv, ph, clf, fch, step0, timm_name=None):
    return Variant(name, family, S, tuple(Ps), T, crop, dint, gint, F, C, conv, ph, clf, fch, step0, timm_name)


VARIANTS: Dict[str, Variant] = {
    v.name: v
    for v in [
        _v("resnet50", "resnet", 224, (96, 128), 5, 0.875, "bilinear", "bicubic", 2048, 2048, False, 1024, "gru", 1024, "classifier"),
        _v("densenet121", "densenet", 224, (96,), 5, 0.875, "bilinear", "bilinear", 1024, 1024, False, 1024, "gru", 1024, "classifier"),
        _v("densenet169", "densenet", 224, (96,), 5, 0.875, "bilinear", "bilinear", 1664, 1664, False, 1024, "gru", 1024, "classifier"),
        _v("densenet201", "densenet", 224, (96,), 5, 0.875, "bilinear", "bilinear", 1920, 1920, False, 1024, "gru", 1024, "classifier"),
        _v("regnety_600m", "regnet", 224, (96,), 5, 0.875, "bilinear", "bilinear", 608, 608, True, 256, "gru", 1024, "backbone", "regnety_006"),
        _v("regnety_800m", "regnet", 224, (96,), 5, 0.875, "bilinear", "bilinear", 768, 768, True, 256, "gru", 1024, "backbone", "regnety_008"),
        _v("regnety_1.6g", "regnet", 224, (96,), 5, 0.875, "bilinear", "bilinear", 888, 888, True, 256, "gru", 1024, "backbone", "regnety_016"),
        _v("mobilenetv3_large_100", "mobilenet", 224, (96, 128), 3, 0.875, "bilinear", "bicubic", 1280, 960, True, 256, "cascaded", None, "backbone", "mobilenetv3_large_100"),
        _v("mobilenetv3_large_125", "mobilenet", 224, (128,), 3, 0.875, "bilinear", "bicubic", 1280, 1200, True, 256, "cascaded", None, "backbone", "mobilenetv3_large_100"),
        _v("efficientnet_b2", "efficientnet", 260, (128,), 4, 0.875, "bicubic", "bicubic", 1408, 1408, True, 256, "cascaded", None, "backbone", "efficientnet_b2"),
        _v("efficientnet_b3", "efficientnet", 300, (128, 144), 4, 0.904, "bicubic", "bicubic", 1536, 1536, True, 256, "cascaded", None, "backbone", "efficientnet_b3"),
    ]
}

#: Released cascaded classifiers always hold fc_2..fc_5, whatever T is.
CASCADED_HEADS = 4


def fmap_size(patch_size: int) -> int:
    """Side of the backbone feature map at patch size ``patch_size`` (ceil(P/32))."""
    return math.ceil(patch_size / 32)


@dataclass
class GFNetSpec:
    """Everything needed to build one GFNet: a released variant or a custom timm backbone.

    Attributes:
        model_name: released variant name, or a free name for a custom model.
        family: one of :data:`FAMILIES`.
        backbone: timm model name (``None`` for torchvision resnet/densenet).
        backbone_kwargs: extra keyword arguments for ``timm.create_model``.
        image_size, patch_size, steps: S, P, T.
        num_classes: classes of the task.
        crop_pct, dataset_interpolation, glance_interpolation: pre-processing.
        feature_dim, fmap_channels: F and C (filled in from the backbone for custom models).
        policy_conv, policy_hidden, classifier, fc_hidden, step0: head layout (see :class:`Variant`).
        mean, std: normalisation.
    """

    model_name: str
    family: str
    backbone: Optional[str]
    image_size: int
    patch_size: int
    steps: int
    num_classes: int = 1000
    crop_pct: float = 0.875
    dataset_interpolation: str = "bilinear"
    glance_interpolation: str = "bicubic"
    feature_dim: int = 0
    fmap_channels: int = 0
    policy_conv: bool = True
    policy_hidden: int = 256
    classifier: str = "gru"
    fc_hidden: Optional[int] = 1024
    step0: str = "classifier"
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    @property
    def released(self) -> bool:
        return self.model_name in VARIANTS and self.family != "custom"

    @property
    def fmap_hw(self) -> int:
        return fmap_size(self.patch_size)

    @property
    def state_dim(self) -> int:
        """Flattened feature-map size C * h * w fed to the policy."""
        return self.fmap_channels * self.fmap_hw ** 2

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "GFNetSpec":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GFNet spec fields: {sorted(unknown)}")
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        return cls(**d)

    def validate(self) -> "GFNetSpec":
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected one of {FAMILIES}")
        if self.classifier not in ("gru", "cascaded"):
            raise ValueError(f"classifier must be 'gru' or 'cascaded', got {self.classifier!r}")
        if self.step0 not in ("classifier", "backbone"):
            raise ValueError(f"step0 must be 'classifier' or 'backbone', got {self.step0!r}")
        for k in ("dataset_interpolation", "glance_interpolation"):
            if getattr(self, k) not in ("bilinear", "bicubic"):
                raise ValueError(f"{k} must be 'bilinear' or 'bicubic', got {getattr(self, k)!r}")
        if not (0 < self.patch_size <= self.image_size):
            raise ValueError(f"patch size {self.patch_size} must be in (0, image size {self.image_size}]")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.classifier == "cascaded" and self.steps > CASCADED_HEADS + 1:
            raise ValueError(f"cascaded classifiers support at most {CASCADED_HEADS + 1} steps, got {self.steps}")
        if self.classifier == "cascaded" and self.step0 != "backbone":
            raise ValueError("cascaded classifiers take step-0 logits from the backbone (step0='backbone')")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        return self

    def replace(self, **kw: Any) -> "GFNetSpec":
        return replace(self, **kw)


def released_spec(model_name: str, patch_size: Optional[int] = None, num_classes: int = 1000) -> GFNetSpec:
    """The spec of a released variant.

    Args:
        model_name: a key of :data:`VARIANTS`.
        patch_size: P; defaults to the variant's first released size. Other sizes are allowed
            (the policy input size follows ceil(P/32)).
        num_classes: classes (1000 for the released ImageNet models).

    Raises:
        ValueError: unknown ``model_name``.
    """
    if model_name not in VARIANTS:
        raise ValueError(f"unknown GFNet variant {model_name!r}; released variants: {', '.join(VARIANTS)}")
    v = VARIANTS[model_name]
    return GFNetSpec(
        model_name=v.name, family=v.family, backbone=v.timm_name, image_size=v.image_size,
        patch_size=int(patch_size or v.patch_sizes[0]), steps=v.steps, num_classes=num_classes,
        crop_pct=v.crop_pct, dataset_interpolation=v.dataset_interpolation,
        glance_interpolation=v.glance_interpolation, feature_dim=v.feature_dim,
        fmap_channels=v.fmap_channels, policy_conv=v.policy_conv, policy_hidden=v.policy_hidden,
        classifier=v.classifier, fc_hidden=v.fc_hidden, step0=v.step0,
    ).validate()
