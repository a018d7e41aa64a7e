"""Options of INT8 post-training quantization and the ONNX Runtime settings of a profile.

The profiles themselves (``tensorrt``, ``cpu``) are :class:`~.profiles.Profile` objects in
:data:`~.profiles.PROFILES`.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from .profiles import PROFILES, WEIGHTED_OP_TYPES, CalibMethod, Profile, TensorRole, get_profile

#: Calibration method names accepted by :class:`QuantizeOptions` (``--calib-method``).
METHODS: Tuple[str, ...] = tuple(m.value for m in CalibMethod)

__all__ = ["METHODS", "PROFILES", "WEIGHTED_OP_TYPES", "OrtSettings", "QuantizeOptions", "ort_settings", "quant_type"]


@dataclass
class QuantizeOptions:
    """Settings of :func:`~gfnet_edge.quantize.quantize_model`.

    Attributes:
        profile: ``tensorrt`` (symmetric int8 Q/DQ for TensorRT) or ``cpu`` (ONNX Runtime x86).
        method: activation calibration: ``max`` (min/max), ``entropy`` (KL), ``percentile``, or
            ``auto`` (the profile's :attr:`~.profiles.Profile.auto_method`).
        percentile: percentile of |x| kept by the ``percentile`` method.
        num_calib: calibration images used (glance inputs; the focus graph gets T-1 patches
            per image); of a larger set, a sample drawn with ``seed`` (not its first images).
        max_accuracy_drop: largest final-step accuracy drop (points) the mixed-precision
            search accepts on the held-out set; ``None`` disables the search (everything int8).
        drop_noise_z: the accuracy targets (``max_accuracy_drop``, ``max_budget_drop``) count
            as missed only when the held-out drop exceeds them by more than this many standard
            errors of the drop (``100 * sqrt(lost + gained) / n`` points, lost / gained: held-out
            images FP32 classifies right and INT8 wrong / the reverse): a drop measured above the
            target by less is within what the draw of held-out images moves it by, and keeping
            nodes in float to meet it would fit those images (1.645: one-sided 95 %; 0: the drop
            itself is compared).
        min_exit_agreement: optional second target of the search: the share (percent) of
            held-out images whose exit step at the mid budget (``exit_fractions(p=1)``,
            thresholds fitted on the FP32 probabilities) is the same as FP32's.
        eval_fraction: when no held-out images are given, the fraction of the calibration
            images held out (not calibrated on) to score accuracy.
        min_eval: fewest held-out images the search accepts.
        per_channel: per-channel weight scales (output-channel axis).
        reduce_range: 7-bit weights (ONNX Runtime's remedy for u8s8 saturation on x86 CPUs
            without VNNI); only used by the ``cpu`` profile, ``None`` = off.
        max_candidates: at most this many weighted nodes (ranked by a cheap local error proxy)
            get a full sensitivity measurement.
        max_float_nodes: the search keeps at most this many nodes in float.
        max_budget_drop: optional target of the search: the largest accuracy drop (points) at
            the mid budget (early exit with thresholds fitted on the FP32 probabilities).
        max_float_mac_share: the search keeps at most this share (0..1) of the backbone
            multiply-adds per image in float, the patch guard's nodes included; ``None``: the profile's
            :attr:`~.profiles.Profile.max_float_mac_share`.
        graph_fallback: the search may keep a whole graph in float; ``None``: the profile's
            :attr:`~.profiles.Profile.graph_fallback`.
        bias_correction: correct float biases for the quantization shift on this many
            calibration inputs per graph (0: off); ``None``: 64 where the profile's
            :attr:`~.profiles.Profile.bias_correction` is on, else off.
        max_range_for: tensor roles (``graph-input``, ``fc-input``) whose range is their
            calibration min / max (other tensors: ``method``); ``None``: the profile's
            :attr:`~.profiles.Profile.max_range_for`.
        residual_int8: Q/DQ on the skip input of residual Adds; ``None``: the profile's
            :attr:`~.profiles.Profile.residual_int8`.
        finetune_epochs: quantization-aware fine-tuning of each graph's weights against its
            FP32 outputs on the calibration inputs, this many epochs (0: off; :mod:`.finetune`);
            ``None``: the profile's :attr:`~.profiles.Profile.finetune_epochs` when there are at
            least :attr:`~.profiles.Profile.finetune_min_images` calibration images, else off.
        finetune_lr: its step size, in quantization steps per iteration.
        finetune_policy: the glance graph's fine-tuning also fits the policy's first patch
            location computed from its ``policy_state`` output (:func:`.finetune.first_patch_location`).
        patch_guard_share: share (0..1) of the backbone multiply-adds per image that may be kept
            in float to protect the policy's first patch location (:mod:`.patch_guard`; 0: off);
            ``None``: the profile's :attr:`~.profiles.Profile.patch_guard_share`. Glance graphs
            without a ``policy_state`` output, heads without a policy, and profiles that quantize
            ReLUs (``cpu``) are left alone. The
            guard's nodes count against :attr:`max_float_mac_share` (the guard stays within it);
            the ``cpu`` profile's latency check (``max_slowdown``) applies to the search only.
        max_slowdown: ``cpu`` profile: a node is only kept in float if the graph stays within
            this factor of the all-INT8 graph's batch-1 latency (ONNX Runtime can turn a float
            island into slow layout conversions, e.g. a uint8 NCHW MaxPool after a float stem).
        batch_size: images per ONNX Runtime call during calibration / evaluation.
        threads: ONNX Runtime intra-op threads for evaluation (``None``: its default).
        seed: seed of every random choice (held-out split, random crops).
        keep_work: keep the intermediate models (``out_dir/work``).
    """

    profile: str = "tensorrt"
    method: str = "auto"
    percentile: float = 99.99
    num_calib: int = 256
    max_accuracy_drop: Optional[float] = 0.5
    drop_noise_z: float = 1.645
    min_exit_agreement: Optional[float] = None
    eval_fraction: float = 0.25
    min_eval: int = 32
    per_channel: bool = True
    reduce_range: Optional[bool] = None
    max_candidates: int = 48
    max_float_nodes: int = 8
    max_budget_drop: Optional[float] = None
    max_float_mac_share: Optional[float] = None
    graph_fallback: Optional[bool] = None
    bias_correction: Optional[int] = None
    max_range_for: Optional[Tuple[str, ...]] = None
    residual_int8: Optional[bool] = None
    finetune_epochs: Optional[int] = None
    finetune_lr: float = 0.02
    finetune_policy: bool = True
    patch_guard_share: Optional[float] = None
    max_slowdown: float = 1.15
    batch_size: int = 32
    threads: Optional[int] = None
    seed: int = 0
    keep_work: bool = False

    def validate(self) -> "QuantizeOptions":
        get_profile(self.profile)
        CalibMethod.parse(self.method)
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if int(self.num_calib) < 1:
            raise ValueError(f"num_calib must be >= 1, got {self.num_calib}")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise ValueError(f"max_accuracy_drop must be >= 0 (points), got {self.max_accuracy_drop}")
        if not 0.0 <= self.drop_noise_z < float("inf"):
            raise ValueError(f"drop_noise_z must be >= 0 standard errors, got {self.drop_noise_z}")
        if self.min_exit_agreement is not None and not 0.0 <= self.min_exit_agreement <= 100.0:
            raise ValueError(f"min_exit_agreement must be a percentage, got {self.min_exit_agreement}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.max_budget_drop is not None and self.max_budget_drop < 0:
            raise ValueError(f"max_budget_drop must be >= 0 (points), got {self.max_budget_drop}")
        if self.max_float_mac_share is not None and not 0.0 <= self.max_float_mac_share <= 1.0:
            raise ValueError(f"max_float_mac_share must be in [0, 1], got {self.max_float_mac_share}")
        if self.bias_correction is not None and int(self.bias_correction) < 0:
            raise ValueError(f"bias_correction must be >= 0 calibration inputs, got {self.bias_correction}")
        if self.max_range_for is not None:
            for r in self.max_range_for:
                TensorRole.parse(r)
        if self.finetune_epochs is not None and int(self.finetune_epochs) < 0:
            raise ValueError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        if not 0.0 < self.finetune_lr <= 1.0:
            raise ValueError(f"finetune_lr must be in (0, 1] quantization steps, got {self.finetune_lr}")
        if self.patch_guard_share is not None and not 0.0 <= self.patch_guard_share <= 1.0:
            raise ValueError(f"patch_guard_share must be in [0, 1], got {self.patch_guard_share}")
        if self.max_slowdown < 1.0:
            raise ValueError(f"max_slowdown must be >= 1, got {self.max_slowdown}")
        if self.max_candidates < 0 or self.max_float_nodes < 0:
            raise ValueError("max_candidates and max_float_nodes must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @property
    def spec(self) -> Profile:
        """The :class:`~.profiles.Profile` of :attr:`profile`."""
        return get_profile(self.profile)

    @property
    def float_mac_limit(self) -> Optional[float]:
        """The share of multiply-adds the search may keep in float (option, else the profile's)."""
        return self.max_float_mac_share if self.max_float_mac_share is not None else self.spec.max_float_mac_share

    @property
    def whole_graph_fallback(self) -> bool:
        """Whether whole graphs are search candidates (option, else the profile's)."""
        return self.graph_fallback if self.graph_fallback is not None else self.spec.graph_fallback

    @property
    def bias_correction_inputs(self) -> int:
        """Calibration inputs per graph used for bias correction (0: off)."""
        if self.bias_correction is not None:
            return int(self.bias_correction)
        return 64 if self.spec.bias_correction else 0

    def finetune_for(self, num_images: int) -> int:
        """Fine-tuning epochs per graph with ``num_images`` calibration images (the option,
        else the profile's when it has enough images; 0: off)."""
        if self.finetune_epochs is not None:
            return int(self.finetune_epochs)
        return int(self.spec.finetune_epochs) if num_images >= self.spec.finetune_min_images else 0

    @property
    def guard_share(self) -> float:
        """Share of multiply-adds the patch guard may keep in float (option, else the profile's)."""
        return float(self.patch_guard_share if self.patch_guard_share is not None else self.spec.patch_guard_share)

    @property
    def max_range_roles(self) -> FrozenSet[TensorRole]:
        """Tensor roles calibrated by min / max (option, else the profile's)."""
        if self.max_range_for is not None:
            return frozenset(TensorRole.parse(r) for r in self.max_range_for)
        return frozenset(self.spec.max_range_for)

    @property
    def resolved_method(self) -> CalibMethod:
        """The calibration method actually used (``auto`` resolved for the profile)."""
        return self.spec.resolve(self.method)


@dataclass
class OrtSettings:
    """Arguments of ``onnxruntime.quantization.quantize_static`` for one profile."""

    op_types_to_quantize: List[str]
    activation_type: str
    weight_type: str
    per_channel: bool
    reduce_range: bool
    extra_options: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def ort_settings(opts: QuantizeOptions) -> OrtSettings:
    """The ``quantize_static`` settings of ``opts.profile`` (types as names, see :func:`quant_type`)."""
    prof = opts.spec
    extra: Dict[str, Any] = {"ActivationSymmetric": prof.symmetric_activations, **copy.deepcopy(dict(prof.extra_options))}
    if opts.resolved_method is CalibMethod.PERCENTILE:
        extra["CalibPercentile"] = float(opts.percentile)
    residual = prof.residual_int8 if opts.residual_int8 is None else bool(opts.residual_int8)
    op_types = [t for t in prof.op_types if residual or t != "Add"]
    return OrtSettings(op_types, prof.activation_type, prof.weight_type, bool(opts.per_channel),
                       bool(opts.reduce_range) and prof.reduce_range_allowed, extra)


def quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return getattr(QuantType, name)
