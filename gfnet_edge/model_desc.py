"""The typed description of a GFNet model that the device side runs.

The build side makes it from the checkpoint's :class:`~gfnet_edge.variants.GFNetSpec`
(:meth:`ModelDesc.from_spec`) and writes :meth:`ModelDesc.to_dict` as the ``model`` entry of a
bundle's ``manifest.json``; the device side checks that entry
(:func:`gfnet_edge.manifest_schema.check_model`) and parses it once (:meth:`ModelDesc.from_manifest`).
Everything after that reads attributes (``desc.steps``, ``desc.patch_size``) instead of indexing a
dict.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["ModelDesc"]


@dataclass(frozen=True)
class ModelDesc:
    """What the runtime, calibration and quantization need to know of a model.

    Attributes:
        image_size: side of the (square) network input, pixels.
        patch_size: side of a focus patch, pixels.
        steps: number of glance + focus steps (the glance is step 0).
        num_classes: classifier outputs.
        crop_pct: centre-crop fraction used when resizing a dataset image.
        dataset_interpolation: ``bilinear`` or ``bicubic``, for resizing dataset images.
        glance_interpolation: ``bilinear`` or ``bicubic``, for the down-sampled glance.
        mean, std: per-channel normalisation (of pixel values in [0, 1]).
        classifier: ``gru`` or ``cascaded`` recurrent classifier head.
        step0: where step 0's logits come from: ``classifier`` (the head) or ``backbone``
            (the glance graph itself).
        model_name, family, backbone: names (informational).
        feature_dim, fmap_channels, policy_conv, policy_hidden, fc_hidden: head layout.
        spec: the full :class:`~gfnet_edge.variants.GFNetSpec` as a dict (informational).
        demo_data_config: the demo task's generator config, for demo models.
        class_names: the name of each class in class order (a model trained on an image folder:
            its class folders' names), or None.
    """

    image_size: int
    patch_size: int
    steps: int
    num_classes: int
    crop_pct: float
    dataset_interpolation: str
    glance_interpolation: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    classifier: str
    step0: str
    model_name: str = ""
    family: Optional[str] = None
    backbone: Optional[str] = None
    feature_dim: Optional[int] = None
    fmap_channels: Optional[int] = None
    policy_conv: Optional[bool] = None
    policy_hidden: Optional[int] = None
    fc_hidden: Optional[int] = None
    spec: Optional[Dict[str, Any]] = field(default=None, compare=False)
    demo_data_config: Optional[Dict[str, Any]] = field(default=None, compare=False)
    class_names: Optional[Tuple[str, ...]] = None

    @classmethod
    def from_manifest(cls, entry: Any, checked: bool = False) -> "ModelDesc":
        """Checks a manifest's ``model`` entry (unless ``checked``: the caller validated it, as
        :func:`~gfnet_edge.manifest_schema.check_manifest` does) and parses it.

        Raises:
            ManifestError: naming the first field that is wrong.
        """
        from .manifest_schema import check_model

        m = entry if checked else check_model(entry)
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in m.items() if k in known}
        kw["mean"] = tuple(float(v) for v in m["mean"])
        kw["std"] = tuple(float(v) for v in m["std"])
        kw["crop_pct"] = float(m["crop_pct"])
        kw["model_name"] = str(m.get("model_name") or "")
        if m.get("class_names") is not None:
            kw["class_names"] = tuple(str(c) for c in m["class_names"])
        return cls(**kw)

    @classmethod
    def from_spec(cls, spec: Any, demo_data_config: Optional[Dict[str, Any]] = None,
                  class_names: Optional[Tuple[str, ...]] = None) -> "ModelDesc":
        """The description of a model built from ``spec`` (a :class:`~gfnet_edge.variants.GFNetSpec`)
        and, when known, its class names.

        Raises:
            ManifestError: the spec describes a model the device side cannot run (the same checks
                as a loaded manifest).
        """
        desc = cls(
            image_size=spec.image_size, patch_size=spec.patch_size, steps=spec.steps,
            num_classes=spec.num_classes, crop_pct=float(spec.crop_pct),
            dataset_interpolation=spec.dataset_interpolation, glance_interpolation=spec.glance_interpolation,
            mean=tuple(float(v) for v in spec.mean), std=tuple(float(v) for v in spec.std),
            classifier=spec.classifier, step0=spec.step0, model_name=spec.model_name, family=spec.family,
            backbone=spec.backbone, feature_dim=spec.feature_dim, fmap_channels=spec.fmap_channels,
            policy_conv=spec.policy_conv, policy_hidden=spec.policy_hidden, fc_hidden=spec.fc_hidden,
            spec=spec.to_dict(), demo_data_config=demo_data_config,
            class_names=tuple(class_names) if class_names is not None else None,
        )
        from .manifest_schema import check_model

        check_model(desc.to_dict())
        return desc

    @property
    def step0_backbone(self) -> bool:
        """Step 0's logits come from the glance graph rather than the classifier head."""
        return self.step0 == "backbone"

    @property
    def is_demo(self) -> bool:
        """A model of the bundled demo task (its images can be generated)."""
        return self.model_name.startswith("demo")

    def to_dict(self) -> Dict[str, Any]:
        """The manifest ``model`` entry (JSON-ready)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["class_names"] = list(self.class_names) if self.class_names is not None else None
        return d

    def class_name(self, k: int) -> Optional[str]:
        """The name of class ``k``, or None when the model has no class names."""
        return self.class_names[k] if self.class_names is not None else None


def as_desc(model: "ModelDesc | Mapping[str, Any]") -> ModelDesc:
    """A :class:`ModelDesc` from either a description or a manifest ``model`` dict."""
    return model if isinstance(model, ModelDesc) else ModelDesc.from_manifest(dict(model))
