"""Settings of the demo GFNet training (cluttered digits, 2 CPU cores).

Every stage has an iteration budget (``epochs x iters``) and a wall-clock cap in minutes
(:class:`~gfnet_edge.train.recipe.StagePlan`); a stage stops at whichever comes first and
records which (the cap only matters on a machine much slower than the one the defaults were
tuned on).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from ..variants import GFNetSpec
from .recipe import StagePlan, TrainSettings

#: Backbones the demo knows (timm name, kwargs). ``r16``/``r32`` are ResNet-18 layouts at 1/4
#: and 1/2 width: plain 3x3 convs train fastest per multiply-add on a CPU.
BACKBONES: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "r16": ("resnet18", {"channels": [16, 32, 64, 128], "stem_width": 16}),
    "r24": ("resnet18", {"channels": [24, 48, 96, 192], "stem_width": 24}),
    "r32": ("resnet18", {"channels": [32, 64, 128, 256], "stem_width": 32}),
}


def demo_spec(backbone: str = "r16", num_classes: int = 10) -> GFNetSpec:
    """The GFNet spec of the shipped demo model (custom family, cascaded classifier)."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown demo backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    name, kw = BACKBONES[backbone]
    return GFNetSpec(
        model_name=f"demo_{name}_{backbone}",
        family="custom",
        backbone=name,
        backbone_kwargs=dict(kw),
        image_size=224,
        patch_size=96,
        steps=3,
        num_classes=num_classes,
        crop_pct=1.0,  # demo frames are the whole S x S scene: resize to S, no centre crop
        glance_interpolation="bicubic",
        policy_conv=True,
        policy_hidden=256,
        classifier="cascaded",
        fc_hidden=None,
        step0="backbone",
    ).validate()


def _plan(epochs: int, iters: int, batch: int, lr: float, minutes: float) -> StagePlan:
    return StagePlan(epochs=epochs, lr=lr, iters=iters, batch=batch, minutes=minutes)


@dataclass
class TrainConfig(TrainSettings):
    """All settings of one demo training run (saved as ``config.json`` in the run folder).

    Every stage is a :class:`StagePlan` with its own iterations, batch and wall-clock cap; the
    stages shared with the image-folder trainer read the :class:`TrainSettings` fields (the
    demo keeps the glance encoder frozen after its pre-training, ``train_glance=False``).
    """

    backbone: str = "r16"
    threads: int = 1
    train_size: int = 4000
    val_size: int = 500
    test_size: int = 1000
    # stage 0: local encoder on digit-centred crops, then glance encoder on glances
    pre_local: StagePlan = field(default_factory=lambda: _plan(18, 50, 64, 2e-3, 10.0))
    pre_glance: StagePlan = field(default_factory=lambda: _plan(2, 30, 64, 1e-3, 3.0))
    crop_jitter: int = 28  # max offset (px) of the crop centre from the digit centre (last epochs)
    #: Curriculum of the local pre-training, one entry per epoch: [crop side, jitter, batch].
    #: Small digit-centred crops first (cheap, little clutter: learns in minutes where 96 px
    #: crops stay at chance), then the patch size. ``None``: P-sized crops, ``crop_jitter``.
    pre_local_schedule: Optional[list] = field(default_factory=lambda: [
        [48, 4, 64]] * 10 + [[64, 10, 64]] * 4 + [[96, 24, 64]] * 4)
    glance_bc_weight: float = 5.0  # weight of the policy warm-start loss during glance training
    # stage 1: random patches; stage 3: patches from the sampled policy
    stage1: StagePlan = field(default_factory=lambda: _plan(3, 25, 32, 1e-3, 4.0))
    stage3: StagePlan = field(default_factory=lambda: _plan(3, 20, 32, 5e-4, 4.0))
    dsn_ratio: Optional[float] = 1.0
    # stage 2: policy warm start (behaviour cloning on digit boxes) then PPO
    bc: StagePlan = field(default_factory=lambda: _plan(1, 25, 64, 1e-3, 1.5))
    ppo: StagePlan = field(default_factory=lambda: _plan(3, 15, 64, 3e-4, 2.5))
    # static baseline: the same backbone on full S x S images
    static: StagePlan = field(default_factory=lambda: _plan(3, 30, 16, 1e-3, 6.0))
    #: The cluttered-digits generator config, pinned when the run starts (``None``: current defaults).
    data_config: Optional[Dict[str, Any]] = None
    # the shared stages' settings, as the demo uses them
    workers: int = 0  # the splits are in memory
    amp: bool = False
    sync_bn: bool = False
    train_glance: bool = False
    warmup_iters: int = 20
    eval_max: int = 200

    def data(self):
        """The pinned :class:`ClutteredDigitsConfig` (pins the current defaults on first use)."""
        from dataclasses import asdict as _asdict

        from ..data.cluttered_digits import ClutteredDigitsConfig

        if self.data_config is None:
            self.data_config = json.loads(json.dumps(_asdict(ClutteredDigitsConfig())))
        return data_config_from_dict(self.data_config)


def tiny_config(**kw: Any) -> TrainConfig:
    """A few iterations of every stage on a handful of images (tests)."""
    b = lambda lr=1e-3: _plan(2, 2, 4, lr, 5.0)  # noqa: E731
    cfg = TrainConfig(
        backbone="r16", train_size=24, val_size=16, test_size=16,
        pre_local=b(3e-3), pre_local_schedule=None, pre_glance=b(), stage1=b(), stage3=b(), bc=b(), ppo=b(3e-4),
        static=_plan(2, 2, 2, 1e-3, 5.0),
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def data_config_from_dict(d: Dict[str, Any]):
    """A :class:`ClutteredDigitsConfig` from its JSON form (lists back to tuples)."""
    from ..data.cluttered_digits import config_from_dict

    return config_from_dict(d)
