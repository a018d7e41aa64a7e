"""Quantization profiles: what each target needs, as objects in a registry.

A :class:`Profile` names the op types that get Q/DQ, the ONNX Runtime ``quantize_static``
settings, the post passes run on the quantized graph, the checker rules every written graph
must pass, and the calibration method ``method="auto"`` resolves to. Two are registered:

* ``tensorrt``: what TensorRT's explicit quantization needs. Signed int8 activations and
  weights, symmetric (zero-point 0), per-channel weights on the output-channel axis, Q/DQ only
  (no QOperator ops), Q/DQ at the inputs of weighted ops (Conv, Gemm, MatMul) and on the
  residual input of skip-connection adds, never on the outputs of weighted ops, biases left in
  float (TensorRT has no INT32 DequantizeLinear; it quantizes biases itself).
* ``cpu``: ONNX Runtime's fast x86 path. uint8 asymmetric activations, int8 symmetric
  per-channel weights, Q/DQ around every op ONNX Runtime has an integer kernel for, so that the
  graph optimiser turns DQ -> op -> Q groups into QLinearConv / QLinearAdd / ... and int8 data
  flows between them.

Importing this module needs nothing beyond the standard library.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, FrozenSet, Mapping, Optional, Tuple, Union

#: Weighted op types: the units of the mixed-precision search and of the checker's weight rules.
WEIGHTED_OP_TYPES: Tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class CalibMethod(str, Enum):
    """How activation ranges are calibrated (``auto``: the profile's :attr:`Profile.auto_method`)."""

    AUTO = "auto"
    MAX = "max"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"

    def __str__(self) -> str:
        return self.value

    @property
    def ort(self):
        """The ``onnxruntime.quantization.CalibrationMethod`` of this method."""
        from onnxruntime.quantization import CalibrationMethod

        if self is CalibMethod.AUTO:
            raise ValueError("calibration method 'auto' must be resolved for a profile first")
        return {CalibMethod.MAX: CalibrationMethod.MinMax, CalibMethod.ENTROPY: CalibrationMethod.Entropy,
                CalibMethod.PERCENTILE: CalibrationMethod.Percentile}[self]

    @property
    def histogram(self) -> bool:
        """Histogram-based (ONNX Runtime stacks every batch's outputs: batches must be equal)."""
        return self in (CalibMethod.ENTROPY, CalibMethod.PERCENTILE)

    @classmethod
    def parse(cls, value: Union[str, "CalibMethod"]) -> "CalibMethod":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown calibration method {value!r}; choose one of "
                             f"{', '.join(m.value for m in cls)}") from None


class CheckerRules(Enum):
    """Which rules :func:`~gfnet_edge.quantize.checker.check_tensorrt_compat` applies."""

    #: TensorRT's ONNX parser and explicit-quantization rules (every rule of the checker).
    TENSORRT = "tensorrt"
    #: An ONNX Runtime model: ``onnx.checker`` and well-formed Q/DQ parameters only.
    QDQ_PARAMS = "qdq-params"


class TensorRole(str, Enum):
    """Activation tensors a profile can give their full calibration range (min / max)."""

    #: the graph input (normalised pixels: bounded, clipping only loses information)
    GRAPH_INPUT = "graph-input"
    #: inputs of fully connected layers (Gemm / MatMul after global pooling: a few large
    #: pooled values carry the class evidence, and clipping them moves the logits)
    FC_INPUT = "fc-input"

    @classmethod
    def parse(cls, value: Union[str, "TensorRole"]) -> "TensorRole":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown tensor role {value!r}; choose from {', '.join(r.value for r in cls)}") from None


class PostPass(Enum):
    """Graph passes run after ONNX Runtime inserted Q/DQ (see :mod:`.qdq`)."""

    #: Residual Adds keep Q/DQ on the skip input only (TensorRT's Conv + Add fusion).
    RESIDUAL_SKIP_ONLY = "residual-skip-only"
    #: A node kept in float takes its single-input followers (ReLU, pooling, ...) with it.
    FLOAT_FOLLOWERS = "float-followers"


@dataclass(frozen=True)
class Profile:
    """One quantization target.

    Attributes:
        name: registry key (``QuantizeOptions.profile``, ``--int8-profiles``).
        op_types: op types whose inputs get Q/DQ.
        activation_type, weight_type: ``onnxruntime.quantization.QuantType`` member names.
        symmetric_activations: activation ranges symmetric around 0 (zero-point 0).
        extra_options: further ``quantize_static`` ``extra_options``.
        post_passes: passes run on the quantized graph.
        checker: rules every written graph must pass.
        auto_method: the calibration method ``method="auto"`` picks.
        reduce_range_allowed: ``QuantizeOptions.reduce_range`` applies (7-bit weights).
        latency_guard: the mixed-precision search keeps a node in float only if the graph stays
            within ``max_slowdown`` of the all-INT8 latency (a float island can be slow in ONNX
            Runtime's CPU kernels).
        graph_fallback: the search may keep a whole graph in float.
        max_float_mac_share: the search keeps at most this share (0..1) of the backbone
            multiply-adds per image in float, the patch guard's nodes included (``None``: no limit).
        bias_correction: float biases of weight-quantized nodes are corrected for the mean
            output shift quantization causes (:mod:`.bias_correction`).
        max_range_for: tensors whose range is their calibration min / max (no clipping),
            whatever the calibration method of the other tensors (:class:`TensorRole`).
        residual_int8: the skip input of residual Adds gets Q/DQ (the residual stream in INT8,
            Conv + Add fused in INT8 by TensorRT); off, Adds and the residual stream stay in
            float and only the weighted ops' inputs are quantized.
        finetune_epochs: epochs of quantization-aware fine-tuning of each graph's weights
            against its FP32 outputs (:mod:`.finetune`; 0: off), when there are at least
            ``finetune_min_images`` calibration images.
        finetune_min_images: fewest calibration images the profile fine-tunes on by default
            (with fewer, fine-tuning fits the calibration set rather than the model).
        patch_guard_share: up to this share (0..1) of the backbone multiply-adds per image is
            kept in float to protect the first patch's location: the weighted nodes reading the
            glance activations whose rounding moves it most (:mod:`.patch_guard`; 0: off).
    """

    name: str
    op_types: Tuple[str, ...]
    activation_type: str
    weight_type: str
    symmetric_activations: bool
    extra_options: Mapping[str, Any] = field(default_factory=dict)
    post_passes: FrozenSet[PostPass] = frozenset()
    checker: CheckerRules = CheckerRules.QDQ_PARAMS
    auto_method: CalibMethod = CalibMethod.PERCENTILE
    reduce_range_allowed: bool = False
    latency_guard: bool = False
    graph_fallback: bool = True
    max_float_mac_share: Optional[float] = None
    bias_correction: bool = False
    max_range_for: FrozenSet["TensorRole"] = frozenset()
    residual_int8: bool = True
    finetune_epochs: int = 0
    finetune_min_images: int = 0
    patch_guard_share: float = 0.0

    def resolve(self, method: Union[str, CalibMethod]) -> CalibMethod:
        """``method`` with ``auto`` replaced by :attr:`auto_method`."""
        m = CalibMethod.parse(method)
        return self.auto_method if m is CalibMethod.AUTO else m


#: Op types whose inputs get Q/DQ in the ``tensorrt`` profile (TensorRT developer guide,
#: "Explicit Quantization" > "Q/DQ Layer-Placement Recommendations": quantize all inputs of
#: weighted operations). The Add entry (the guide's "quantize the residual input of
#: weighted-layer + add fusions") is used with ``residual_int8`` only, and post-processed so
#: that only the residual (skip) input keeps its Q/DQ. By default the residual stream stays in
#: float: on GFNet's narrow backbones its INT8 rounding, added up over every block, is most of
#: the INT8 error, while every multiply-add still runs in INT8 without it.
TENSORRT = Profile(
    name="tensorrt",
    op_types=WEIGHTED_OP_TYPES + ("Add",),
    activation_type="QInt8",
    weight_type="QInt8",
    symmetric_activations=True,
    extra_options={
        "WeightSymmetric": True,
        # ranges symmetric already at calibration, so entropy / percentile pick |x| limits
        "CalibTensorRangeSymmetric": True,
        # TensorRT quantizes biases itself and has no INT32 DequantizeLinear
        "QuantizeBias": False,
        # never Q/DQ the outputs of weighted ops or adds (TensorRT rule); the next weighted op
        # quantizes its own input
        "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OP_TYPES + ("Add",)),
        # per-channel on the output-channel axis (Conv: 0; MatMul with constant B (K, N): 1)
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
    },
    post_passes=frozenset({PostPass.RESIDUAL_SKIP_ONLY}),
    checker=CheckerRules.TENSORRT,
    auto_method=CalibMethod.PERCENTILE,
    # both graphs in INT8: float fallback is per layer, within 5 % of the multiply-adds
    graph_fallback=False,
    max_float_mac_share=0.05,
    residual_int8=False,
    # quantization-aware fine-tuning by default once the calibration set is large enough:
    # on the demo model, 3000 calibration images with 6 epochs give 94.6 % held-out exit
    # agreement against 93.6 % without (within the spread between calibration sets); 744
    # images overfit (docs/quantization.md)
    finetune_epochs=6,
    finetune_min_images=2000,
    # the glance activations that move the first patch most, within 2 % of the multiply-adds:
    # on the demo model the residual streams at the ends of the stages (read by strided
    # convolutions) and the policy's inputs, 1.7 % of the multiply-adds; held-out exit agreement
    # with FP32 94.6 -> 95.7 % (docs/quantization.md, "Patch guard")
    patch_guard_share=0.02,
)

#: Op types quantized in the ``cpu`` profile: every op ONNX Runtime's CPU provider runs in
#: int8 (QLinearConv, QLinearMatMul / QGemm, QLinearAdd, QLinearMul, QLinearGlobalAveragePool,
#: QLinearAveragePool, int8 MaxPool, and data-movement ops that pass int8 through).
CPU = Profile(
    name="cpu",
    op_types=("Conv", "Gemm", "MatMul", "Add", "Mul", "Relu", "Clip", "MaxPool", "AveragePool",
              "GlobalAveragePool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat",
              "Resize", "Sigmoid", "HardSigmoid", "LeakyRelu"),
    activation_type="QUInt8",
    weight_type="QInt8",
    # asymmetric ranges also for percentile (ONNX Runtime's percentile calibrator defaults to
    # symmetric): a ReLU output then gets zero-point 0 and the full uint8 range, and ONNX
    # Runtime's integer kernels take their faster zero-point-0 path
    symmetric_activations=False,
    extra_options={"WeightSymmetric": True, "CalibTensorRangeSymmetric": False},
    post_passes=frozenset({PostPass.FLOAT_FOLLOWERS}),
    checker=CheckerRules.QDQ_PARAMS,
    auto_method=CalibMethod.PERCENTILE,
    reduce_range_allowed=True,
    latency_guard=True,
)

#: The registry: profile name -> :class:`Profile`.
PROFILES: Dict[str, Profile] = {p.name: p for p in (TENSORRT, CPU)}


def get_profile(profile: Union[str, Profile]) -> Profile:
    """The registered :class:`Profile` of a name (a ``Profile`` is returned as is).

    Raises:
        ValueError: no profile of that name.
    """
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[profile]
    except (KeyError, TypeError):
        raise ValueError(f"unknown quantization profile {profile!r}; choose one of {', '.join(PROFILES)}") from None
