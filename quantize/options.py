"""Options of INT8 post-training quantization and the ONNX Runtime settings of each profile.

Two profiles:

* ``tensorrt``: what TensorRT's explicit quantization needs. Signed int8 activations and
  weights, symmetric (zero-point 0), per-channel weights on the output-channel axis, Q/DQ only
  (no QOperator ops), Q/DQ at the inputs of weighted ops (Conv, Gemm, MatMul) and on the
  residual input of skip-connection adds, never on the outputs of weighted ops, biases left in
  float (TensorRT has no INT32 DequantizeLinear; it quantizes biases itself).
* ``cpu``: ONNX Runtime's fast x86 path. uint8 asymmetric activations, int8 symmetric
  per-channel weights, Q/DQ around every op ONNX Runtime has an integer kernel for, so that the
  graph optimiser turns DQ -> op -> Q groups into QLinearConv / QLinearAdd / ... and int8 data
  flows between them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

PROFILES: Tuple[str, ...] = ("tensorrt", "cpu")
METHODS: Tuple[str, ...] = ("auto", "max", "entropy", "percentile")
#: What ``method="auto"`` picks per profile: the method with the lowest KL(FP32 || INT8) of the
#: final-step probabilities on the demo model (bench/results/quantize.md).
AUTO_METHOD: Dict[str, str] = {"tensorrt": "percentile", "cpu": "percentile"}

#: Op types whose inputs get Q/DQ in the ``tensorrt`` profile (TensorRT developer guide,
#: "Explicit Quantization" > "Q/DQ Layer-Placement Recommendations": quantize all inputs of
#: weighted operations; quantize the residual input of weighted-layer + add fusions). The Add
#: entry is post-processed so that only the residual (skip) input keeps its Q/DQ.
TENSORRT_OP_TYPES: Tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")

#: Op types quantized in the ``cpu`` profile: every op ONNX Runtime's CPU provider runs in
#: int8 (QLinearConv, QLinearMatMul / QGemm, QLinearAdd, QLinearMul, QLinearGlobalAveragePool,
#: QLinearAveragePool, int8 MaxPool, and data-movement ops that pass int8 through).
CPU_OP_TYPES: Tuple[str, ...] = (
    "Conv", "Gemm", "MatMul", "Add", "Mul", "Relu", "Clip", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat",
    "Resize", "Sigmoid", "HardSigmoid", "LeakyRelu",
)

#: Weighted op types: the units of the mixed-precision search.
WEIGHTED_OP_TYPES: Tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class QuantizeOptions:
    """Settings of :func:`~gfnet_edge.quantize.quantize_model`.

    Attributes:
        profile: ``tensorrt`` (symmetric int8 Q/DQ for TensorRT) or ``cpu`` (ONNX Runtime x86).
        method: activation calibration: ``max`` (min/max), ``entropy`` (KL), ``percentile``, or
            ``auto`` (:data:`AUTO_METHOD`: percentile, 99.99, for both profiles).
        percentile: percentile of |x| kept by the ``percentile`` method.
        num_calib: calibration images used (glance inputs; the focus graph gets T-1 patches
            per image).
        max_accuracy_drop: largest final-step accuracy drop (points) the mixed-precision
            search accepts on the held-out set; ``None`` disables the search (everything int8).
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
    min_exit_agreement: Optional[float] = None
    eval_fraction: float = 0.25
    min_eval: int = 32
    per_channel: bool = True
    reduce_range: Optional[bool] = None
    max_candidates: int = 48
    max_float_nodes: int = 8
    max_slowdown: float = 1.15
    batch_size: int = 32
    threads: Optional[int] = None
    seed: int = 0
    keep_work: bool = False

    def validate(self) -> "QuantizeOptions":
        if self.profile not in PROFILES:
            raise ValueError(f"unknown quantization profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if int(self.num_calib) < 1:
            raise ValueError(f"num_calib must be >= 1, got {self.num_calib}")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise ValueError(f"max_accuracy_drop must be >= 0 (points), got {self.max_accuracy_drop}")
        if self.min_exit_agreement is not None and not 0.0 <= self.min_exit_agreement <= 100.0:
            raise ValueError(f"min_exit_agreement must be a percentage, got {self.min_exit_agreement}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
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
    def resolved_method(self) -> str:
        """The calibration method actually used (``auto`` resolved for the profile)."""
        return AUTO_METHOD[self.profile] if self.method == "auto" else self.method


def calibrate_method(method: str):
    """The ONNX Runtime ``CalibrationMethod`` of a method name."""
    from onnxruntime.quantization import CalibrationMethod

    return {"max": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


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
    calib: Dict[str, Any] = {}
    if opts.resolved_method == "percentile":
        calib["CalibPercentile"] = float(opts.percentile)
    if opts.profile == "tensorrt":
        extra = {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            # ranges symmetric already at calibration, so entropy / percentile pick |x| limits
            "CalibTensorRangeSymmetric": True,
            # TensorRT quantizes biases itself and has no INT32 DequantizeLinear
            "QuantizeBias": False,
            # never Q/DQ the outputs of weighted ops or adds (TensorRT rule); the next
            # weighted op quantizes its own input
            "OpTypesToExcludeOutputQuantization": list(TENSORRT_OP_TYPES),
            # per-channel on the output-channel axis (Conv: 0; MatMul with constant B (K, N): 1)
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        }
        extra.update(calib)
        return OrtSettings(list(TENSORRT_OP_TYPES), "QInt8", "QInt8", bool(opts.per_channel), False, extra)
    # asymmetric ranges also for percentile (ONNX Runtime's percentile calibrator defaults to
    # symmetric): a ReLU output then gets zero-point 0 and the full uint8 range, and
    # ONNX Runtime's integer kernels take their faster zero-point-0 path
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True, "CalibTensorRangeSymmetric": False}
    extra.update(calib)
    return OrtSettings(list(CPU_OP_TYPES), "QUInt8", "QInt8", bool(opts.per_channel),
                       bool(opts.reduce_range), extra)


def quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return getattr(QuantType, name)
