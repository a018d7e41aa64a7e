"""Settings of ``gfnet-edge train --data``: the run config and the defaults per backbone family.

The GFNet layout of a timm backbone follows the released variant of the same family
(:data:`gfnet_edge.variants.VARIANTS`): S, P, T, classifier kind, policy encoder and where the
step-0 logits come from. Any other timm CNN gets the layout of the T = 3 released models
(cascaded classifier, conv policy encoder). Every field can be overridden from the command line.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Type, TypeVar, Union, get_args, get_origin, get_type_hints

from ..variants import GFNetSpec

_T = TypeVar("_T", bound="TrainSettings")


@dataclass(frozen=True)
class FamilyDefaults:
    """The GFNet layout and loss weights of one backbone family."""

    image_size: int
    patch_size: int
    steps: int
    classifier: str  # "gru" or "cascaded"
    policy_conv: bool
    policy_hidden: int
    step0: str  # "classifier" or "backbone"
    dsn_ratio: float
    glance_interpolation: str
    dataset_interpolation: str


_GRU_LINEAR = dict(classifier="gru", policy_conv=False, policy_hidden=1024, step0="classifier", dsn_ratio=1.0)
_CASCADED = dict(classifier="cascaded", policy_conv=True, policy_hidden=256, step0="backbone")

#: (regular expression on the timm name, defaults), first match wins.
FAMILY_DEFAULTS: List[Tuple[str, FamilyDefaults]] = [
    (r"^efficientnet_b2", FamilyDefaults(260, 128, 4, **_CASCADED, dsn_ratio=5.0, glance_interpolation="bicubic",
                                         dataset_interpolation="bicubic")),
    (r"^efficientnet_b3", FamilyDefaults(300, 128, 4, **_CASCADED, dsn_ratio=5.0, glance_interpolation="bicubic",
                                         dataset_interpolation="bicubic")),
    (r"efficientnet", FamilyDefaults(224, 96, 4, **_CASCADED, dsn_ratio=5.0, glance_interpolation="bicubic",
                                     dataset_interpolation="bicubic")),
    (r"mobilenetv3", FamilyDefaults(224, 96, 3, **_CASCADED, dsn_ratio=5.0, glance_interpolation="bicubic",
                                    dataset_interpolation="bilinear")),
    (r"^regnety", FamilyDefaults(224, 96, 5, classifier="gru", policy_conv=True, policy_hidden=256, step0="backbone",
                                 dsn_ratio=1.0, glance_interpolation="bilinear", dataset_interpolation="bilinear")),
    (r"densenet", FamilyDefaults(224, 96, 5, **_GRU_LINEAR, glance_interpolation="bilinear",
                                 dataset_interpolation="bilinear")),
    (r"resne|res2net|^test_resnet", FamilyDefaults(224, 96, 5, **_GRU_LINEAR, glance_interpolation="bicubic",
                                                   dataset_interpolation="bilinear")),
]
OTHER_DEFAULTS = FamilyDefaults(224, 96, 3, **_CASCADED, dsn_ratio=1.0, glance_interpolation="bicubic",
                                dataset_interpolation="bilinear")


def family_defaults(backbone: str) -> Tuple[str, FamilyDefaults]:
    """``(family pattern, defaults)`` for a timm model name (``("other", ...)`` when none matches)."""
    for pattern, d in FAMILY_DEFAULTS:
        if re.search(pattern, backbone):
            return pattern, d
    return "other", OTHER_DEFAULTS


@dataclass
class StagePlan:
    """One training stage: ``epochs`` checkpointed epochs at peak learning rate ``lr``.

    An epoch is one pass over the train split in batches of the run's ``batch_size`` unless
    ``iters`` is set: then it is ``iters`` batches of ``batch`` images (``0``: the run's batch)
    drawn from an endless seeded stream of permutations. ``minutes`` > 0 caps the stage's wall
    clock (single process only): the stage ends at the cap, and the cosine learning rate follows
    whichever of iterations or wall-clock fraction is further, so a capped stage still ends annealed.
    """

    epochs: int
    lr: float
    iters: int = 0
    batch: int = 0
    minutes: float = 0.0


def default_workers() -> int:
    """DataLoader worker processes per training process by default: 4, or the CPUs this process
    may use when fewer (more workers than CPUs only queue for them, and torch warns)."""
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


#: The settings that say how images are loaded, not what is trained: ``--resume`` may change them.
LOADING_SETTINGS = ("workers", "worker_start")


@dataclass
class TrainSettings:
    """The settings every training stage reads (shared by the folder and the demo configs)."""

    seed: int = 0
    batch_size: int = 64  # global batch of a stage without its own ``StagePlan.batch``
    workers: int = field(default_factory=lambda: default_workers())  # DataLoader processes per training process
    #: How the DataLoader workers start: "fork", "spawn" or "forkserver" (None: the platform's
    #: default, or the method ``torch.multiprocessing.set_start_method`` set in the calling script).
    worker_start: Optional[str] = None
    amp: bool = True  # autocast on a GPU (bfloat16 where supported, else float16 with loss scaling)
    freeze_bn: bool = False  # BatchNorm layers keep their running statistics (small batches)
    sync_bn: bool = True  # SyncBatchNorm when several CUDA processes train
    train_glance: bool = True  # stages 1 and 3 train the glance encoder too (else it stays frozen)
    dsn_ratio: Optional[float] = None  # weight of each encoder's own head in stages 1 / 3
    weight_decay: float = 0.05
    warmup_iters: int = 100
    gamma: float = 0.7
    clip: float = 0.2
    action_std: float = 0.1
    eval_max: int = 0  # images of val scored after each epoch (0: all)
    #: Most memory (float32 MB) for the frozen glance encoder's outputs kept per train image in
    #: stages that do not train it (0: recomputed per batch, as they are when the images are augmented).
    glance_cache_mb: float = 1024.0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: Type[_T], d: Dict[str, Any]) -> _T:
        """The config from its JSON form (stage plans from dicts), refusing unknown fields and
        values of another type than the field's (as :meth:`set` does)."""
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        hints, plan_hints = get_type_hints(cls), get_type_hints(StagePlan)
        for k, value in d.items():
            if hints[k] is not StagePlan:
                items = [(k, value, hints[k])]
            elif isinstance(value, dict):
                unknown = set(value) - set(plan_hints)
                if unknown:
                    raise ValueError(f"unknown fields of {k}: {sorted(unknown)}")
                items = [(f"{k}.{name}", v, plan_hints[name]) for name, v in value.items()]
                d[k] = StagePlan(**value)
            else:
                raise ValueError(f"{k} takes an object of {', '.join(plan_hints)}, got {json.dumps(value)}")
            for key, v, hint in items:
                if not _fits(v, hint):
                    raise ValueError(f"{key} takes {_type_name(hint)}, got {json.dumps(v)}")
        return cls(**d)

    def set(self, key: str, value: Any) -> None:
        """Sets ``key`` (``field`` or ``stage.field``) to ``value``, refusing unknown names and
        values of another type than the field's (an int is taken for a float)."""
        obj, _, sub = key.partition(".")
        if obj not in self.__dataclass_fields__:
            raise ValueError(f"unknown config field {obj!r}")
        target, name = (getattr(self, obj), sub) if sub else (self, obj)
        if sub and (not isinstance(target, StagePlan) or sub not in StagePlan.__dataclass_fields__):
            raise ValueError(f"unknown config field {key!r}")
        hint = get_type_hints(type(target))[name]
        if not _fits(value, hint):
            raise ValueError(f"{key} takes {_type_name(hint)}, got {json.dumps(value)}")
        setattr(target, name, value)


_SCALARS: Dict[Any, Tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a config field's type hint (``bool`` is not taken for a number)."""
    if hint is Any:
        return True
    if get_origin(hint) is Union:
        return any(_fits(value, a) for a in get_args(hint))
    if hint is type(None):
        return value is None
    if hint in _SCALARS:
        return isinstance(value, _SCALARS[hint]) and (hint is bool or not isinstance(value, bool))
    base = get_origin(hint) or hint
    if base in (list, tuple):
        return isinstance(value, list)
    if base is dict:
        return isinstance(value, dict)
    return False  # a stage plan: set its fields (stage1.epochs=...)


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Union:
        return " or ".join(_type_name(a) for a in get_args(hint))
    if hint is type(None):
        return "null"
    base = get_origin(hint) or hint
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string (in quotes)", list: "a list",
             tuple: "a list", dict: "an object"}
    return names.get(base, f"the fields of {getattr(base, '__name__', base)} (KEY.FIELD=...)")


@dataclass
class FolderTrainConfig(TrainSettings):
    """All settings of one ``gfnet-edge train --data`` run (saved as ``RUN/config.json``).

    ``batch_size`` is the global batch: under ``torchrun`` each of the W processes takes
    ``batch_size / W`` images per step, so a run gives the same updates on any number of processes.
    """

    data: str = ""
    backbone: str = ""
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained: Optional[str] = None  # --pretrained: a weights file, "timm", or None (given none)
    #: Where the GFNet's encoders started when stage 1 began (written by the trainer, not an
    #: option): the ``pretrained`` file or "timm", the run's own static baseline (the path of
    #: its ``RUN/static.pt``), or "random"; None while the GFNet has not started.
    gfnet_init: Optional[str] = None
    #: Where the static baseline's weights started when its stage began (written by the trainer):
    #: the ``pretrained`` file or "timm", or "random"; None while it has not started.
    static_init: Optional[str] = None
    image_size: int = 0  # 0: the family's default (likewise patch_size, steps)
    patch_size: int = 0
    steps: int = 0
    crop_pct: float = 1.0  # whole image: objects near the border are kept
    classifier: Optional[str] = None  # None: the family's default (likewise policy_*, step0, dsn_ratio)
    policy_conv: Optional[bool] = None
    policy_hidden: Optional[int] = None
    fc_hidden: Optional[int] = None  # GRU classifier's hidden size (None: 1024, as released)
    step0: Optional[str] = None
    stage1: StagePlan = field(default_factory=lambda: StagePlan(30, 5e-4))
    stage2: StagePlan = field(default_factory=lambda: StagePlan(10, 3e-4))
    stage3: StagePlan = field(default_factory=lambda: StagePlan(10, 1e-4))
    static: StagePlan = field(default_factory=lambda: StagePlan(0, 5e-4))  # 0 epochs: no static baseline
    random_crop: bool = True  # training augmentation: random S x S crop (else the centre one) ...
    hflip: bool = False  # ... and horizontal flips (off: wrong for text, digits, asymmetric parts)
    classes: List[str] = field(default_factory=list)

    def resolved(self) -> "FolderTrainConfig":
        """A copy with every ``0`` / ``None`` layout field filled from the family's defaults."""
        out = FolderTrainConfig.from_dict(json.loads(self.dumps()))
        _, d = family_defaults(self.backbone)
        for k in ("image_size", "patch_size", "steps"):
            if not getattr(out, k):
                setattr(out, k, getattr(d, k))
        for k in ("classifier", "policy_conv", "policy_hidden", "step0", "dsn_ratio"):
            if getattr(out, k) is None:
                setattr(out, k, getattr(d, k))
        if out.classifier == "cascaded":
            out.step0 = "backbone"
        return out

    def spec(self, num_classes: int) -> GFNetSpec:
        """The GFNet spec of this run (call on a :meth:`resolved` config)."""
        _, d = family_defaults(self.backbone)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", self.backbone)
        return GFNetSpec(
            model_name=f"gfnet_{name}_{self.image_size}_{self.patch_size}",
            family="custom",
            backbone=self.backbone,
            backbone_kwargs=dict(self.backbone_kwargs),
            image_size=int(self.image_size),
            patch_size=int(self.patch_size),
            steps=int(self.steps),
            num_classes=int(num_classes),
            crop_pct=float(self.crop_pct),
            dataset_interpolation=d.dataset_interpolation,
            glance_interpolation=d.glance_interpolation,
            policy_conv=bool(self.policy_conv),
            policy_hidden=int(self.policy_hidden),
            classifier=str(self.classifier),
            fc_hidden=int(self.fc_hidden or 1024) if self.classifier == "gru" else None,
            step0=str(self.step0),
        ).validate()
