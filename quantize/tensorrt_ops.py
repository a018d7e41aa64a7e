"""What TensorRT's ONNX parser accepts: the one place this data lives.

Source: the operator support matrix of the ONNX-TensorRT parser, ``docs/operators.md`` of
github.com/onnx/onnx-tensorrt, branch ``release/10.3`` (TensorRT 10.3, the version JetPack 6
ships), which supports the default ONNX domain from opset 9 to opset 20. :data:`SUPPORTED_OPS`
is a conservative subset of the rows marked "Y" there (ops whose support also goes back to the
TensorRT 8.x matrices); an op missing from it is reported by the checker, so any omission errs
on the safe side and is fixed by adding the op here after checking the 10.3 matrix. Restrictions of that matrix that matter for
quantized backbones are checked separately in :mod:`gfnet_edge.quantize.checker`:

* ``QuantizeLinear`` / ``DequantizeLinear``: zero-point must be 0; INT8 (also FP8 / INT4,
  which gfnet-edge does not emit); scale and zero-point must be initializers; activation
  scales per-tensor, weight scales per-tensor or per-channel.
* ``Conv`` / ``ConvTranspose``: 2D or 3D; weights must be an initializer (or a
  DequantizeLinear of one).

The Q/DQ placement rules come from the TensorRT 10.3 Developer Guide, "Working with Quantized
Types" > "Explicit Quantization" (Q/DQ layer-placement recommendations, weight quantization
axes).
"""
from __future__ import annotations

from typing import Dict, FrozenSet

TENSORRT_VERSION = "10.3"
#: Default-domain opsets the TensorRT 10.3 ONNX parser supports.
MIN_OPSET, MAX_OPSET = 9, 20

SUPPORTED_OPS: FrozenSet[str] = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
Cast Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose
Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu
Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid Hardmax HardSwish Identity If
ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual
Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad Pow
PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
Scan Scatter ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu
Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

#: Ops the parser rejects that quantization tools commonly emit, with the reason to report.
UNSUPPORTED_REASONS: Dict[str, str] = {
    "QLinearConv": "QOperator op (TensorRT only parses Q/DQ-format quantization)",
    "QLinearMatMul": "QOperator op (TensorRT only parses Q/DQ-format quantization)",
    "QLinearAdd": "ONNX Runtime contrib QOperator op, not in the ONNX-TensorRT parser",
    "QLinearMul": "ONNX Runtime contrib QOperator op, not in the ONNX-TensorRT parser",
    "QLinearGlobalAveragePool": "ONNX Runtime contrib QOperator op, not in the ONNX-TensorRT parser",
    "QLinearAveragePool": "ONNX Runtime contrib QOperator op, not in the ONNX-TensorRT parser",
    "QLinearConcat": "ONNX Runtime contrib QOperator op, not in the ONNX-TensorRT parser",
    "QLinearSigmoid": "ONNX Runtime contrib QOperator op, not in the ONNX-TensorRT parser",
    "QLinearLeakyRelu": "ONNX Runtime contrib QOperator op, not in the ONNX-TensorRT parser",
    "QGemm": "ONNX Runtime contrib QOperator op, not in the ONNX-TensorRT parser",
    "ConvInteger": "integer op (not parsed by TensorRT; use Q/DQ around Conv)",
    "MatMulInteger": "integer op (not parsed by TensorRT; use Q/DQ around MatMul)",
    "DynamicQuantizeLinear": "dynamic quantization is not supported by TensorRT",
    "QAttention": "ONNX Runtime contrib op",
    "FusedConv": "ONNX Runtime contrib op (graph optimised by ONNX Runtime, not the exported graph)",
    "FusedGemm": "ONNX Runtime contrib op (graph optimised by ONNX Runtime, not the exported graph)",
    "BitShift": "not supported by the ONNX-TensorRT parser",
    "Compress": "not supported by the ONNX-TensorRT parser",
    "Det": "not supported by the ONNX-TensorRT parser",
    "MaxRoiPool": "not supported by the ONNX-TensorRT parser",
    "MaxUnpool": "not supported by the ONNX-TensorRT parser",
    "Multinomial": "not supported by the ONNX-TensorRT parser",
    "Unique": "not supported by the ONNX-TensorRT parser",
    "StringNormalizer": "not supported by the ONNX-TensorRT parser",
    "TfIdfVectorizer": "not supported by the ONNX-TensorRT parser",
}

#: Ops whose input TensorRT can take from a DequantizeLinear and run (or fuse) in INT8.
#: A DQ feeding anything else forces a dequantize in float at that point, which the explicit
#: quantization guide asks to avoid ("Q/DQ only where TensorRT can fuse them").
INT8_CONSUMERS: FrozenSet[str] = frozenset("""
Conv ConvTranspose Gemm MatMul Add Mul Sub Concat MaxPool AveragePool GlobalAveragePool
GlobalMaxPool Relu LeakyRelu Clip Sigmoid Tanh HardSigmoid HardSwish Reshape Flatten Transpose
Squeeze Unsqueeze Slice Split Pad Gather Identity Resize
""".split())

#: Weight tensors TensorRT quantizes per channel, and the output-channel axis of each.
#: Gemm / MatMul depend on attributes (see the checker).
PER_CHANNEL_AXIS: Dict[str, int] = {"Conv": 0, "ConvTranspose": 1}
