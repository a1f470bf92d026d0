"""Write the QDQ IR as an int8 ``.tflite``, and tell which of its ops run int8.

The IR is lowered with ``quant="fakequant"`` (:mod:`ncc.backends.tensorflow.graph`): every scale ncc chose
is a FakeQuant range in the graph, so TensorFlow Lite's converter (``Optimize.DEFAULT``) quantizes it to
ncc's grid without a representative dataset: int8 tensors (TFLite's u8 -> s8 shift of the zero point),
per-channel int8 convolution weights, int32 biases it derives as ``x_scale * w_scale``. Inputs and outputs
stay float (a QUANTIZE after each input, a DEQUANTIZE before each output), as the IR's are.

Two rewrites on the way. The converter cannot carry a per-channel FakeQuant through the transpose it gives a
FULLY_CONNECTED weight (``'tfl.transpose' op has mismatched quantized axes``), so a Gemm or MatMul with a
per-channel weight becomes a 1x1 CONV_2D on the rows (``[rows, 1, 1, K]``), which keeps ncc's per-channel
weights exactly and runs the same int8 GEMM. And a GlobalAveragePool or GlobalMaxPool whose only reader
drops its spatial axes (a Squeeze or Flatten, as a classifier's head has) becomes one MEAN/MAX without the
kept dimensions, as TFLiteConverter writes a Keras global pooling: no RESHAPE op after it.

The converter is deterministic: the same IR gives the same bytes. TensorFlow is imported when these run.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
from ncc.backends.tensorflow.graph import TfLowering, dequantized_constant, logical, same_qparams
from ncc.errors import NccError, first_line

#: TFLite ops that only cross the float/int8 boundary (at the graph's inputs and outputs).
BOUNDARY = frozenset({"QUANTIZE", "DEQUANTIZE"})
#: TFLite ops that compute (convolutions and linears): the ones ``ok`` asks to run int8.
COMPUTE = frozenset(
    {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV", "CONV_3D"}
)
_FLOAT = frozenset({"float32", "float16", "float64"})
_QUANTIZED = frozenset({"int8", "uint8", "int16"})


def write_tflite(model: ir.Model, path: str | os.PathLike) -> None:
    """Write ``model`` (QDQ IR) as an int8 ``.tflite`` at ``path`` (the caller's staged file)."""
    Path(path).write_bytes(to_tflite(model))


def to_tflite(model: ir.Model) -> bytes:
    """The ``.tflite`` flatbuffer of ``model`` (see the module docstring)."""
    from ncc.frontends.tensorflow import quiet

    with quiet():
        import tensorflow as tf

        function = TfLowering(
            model, quant="fakequant", rules=[linear_as_conv, pool_squeezed]
        ).concrete_function()
        holder = tf.Module()
        holder.serving = function
        converter = tf.lite.TFLiteConverter.from_concrete_functions([function], holder)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        try:
            return converter.convert()
        except Exception as err:  # the converter raises ConverterError with MLIR's diagnostics
            raise NccError(
                f"TensorFlow Lite's converter cannot convert the lowered model: {first_line(err)}."
            ) from None


def linear_as_conv(lowering: TfLowering, node: ir.Node) -> bool:
    """A Gemm (``transA=0``, ``alpha=beta=1``) or MatMul by a per-channel quantized 2-D weight as a 1x1
    ``conv2d`` on ``[rows, 1, 1, K]``: the converter keeps per-channel weights on CONV_2D, not on
    FULLY_CONNECTED."""
    if node.op_type not in ("Gemm", "MatMul") or lowering.quant != "fakequant":
        return False
    x, w = node.inputs[0], node.inputs[1]
    dq = dequantized_constant(w)
    if dq is None or lowering.qparams(dq).axis is None or len(lowering.shape(w)) != 2:
        return False
    transposed = False
    if node.op_type == "Gemm":
        attrs = node.attributes
        if (
            attrs.get_int("transA", 0)
            or attrs.get_float("alpha", 1.0) != 1.0
            or attrs.get_float("beta", 1.0) != 1.0
        ):
            return False
        transposed = bool(attrs.get_int("transB", 0))
    tf = lowering.tf
    k, n = lowering.shape(w)[::-1] if transposed else lowering.shape(w)
    weight = lowering.weight(w, (1, 0) if transposed else None, shape=[1, 1, k, n])
    t = lowering.get(x)
    y = tf.nn.conv2d(tf.reshape(t, [-1, 1, 1, k]), weight, 1, "VALID")
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    if bias is not None:
        b = lowering.weight(bias)
        y = tf.nn.bias_add(y, tf.reshape(b, [n])) if b.shape.num_elements() == n else y + b
    lead = lowering.shape(x)[:-1]
    if sum(d is None for d in lead) <= 1:
        shape = [-1 if d is None else d for d in lead] + [n]
    else:
        shape = tf.concat([tf.shape(t)[:-1], [n]], 0)
    lowering.set(node.outputs[0], tf.reshape(y, shape))
    return True


def pool_squeezed(lowering: TfLowering, node: ir.Node) -> bool:
    """A global pooling read only (through its Q/DQ pair, if quantized) by a Squeeze of its spatial axes or
    a ``Flatten(axis=1)``: lowered together as one reduction without ``keepdims``. The pair's rounding is
    kept unless the reader's output is rounded on the same grid right after (a passthrough's output shares
    its input's scale), which makes it the same rounding twice."""
    ops = {"GlobalAveragePool": "reduce_mean", "GlobalMaxPool": "reduce_max"}
    if node.op_type not in ops or lowering.quant != "fakequant":
        return False
    x, out = node.inputs[0], node.outputs[0]
    rank = len(lowering.shape(x))
    pair = _only_pair(out)
    reader = _only_reader(pair[1].outputs[0] if pair else out)
    if rank < 3 or reader is None or out.is_graph_output():
        return False
    if reader.op_type == "Squeeze":
        if sorted(lowering._axes(reader, rank) or ()) != list(range(2, rank)):
            return False
    elif reader.op_type != "Flatten" or reader.attributes.get_int("axis", 1) != 1:
        return False
    layout = lowering.layout_of(x)
    axes = [layout.index(a) for a in range(2, rank)]
    y = getattr(lowering.tf.math, ops[node.op_type])(lowering.get(x, layout), axis=axes, keepdims=False)
    after = _only_pair(reader.outputs[0])
    if pair and not (after and same_qparams(lowering, pair[0], after[0])):
        y = lowering.fake_quant(y, lowering.qparams(pair[0]), logical(2))
    lowering.set(reader.outputs[0], y)
    lowering.consume(*(pair or ()), reader)
    return True


def _only_reader(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None


def _only_pair(value: ir.Value) -> tuple[ir.Node, ir.Node] | None:
    """``value``'s QuantizeLinear and its one DequantizeLinear, where they are its only reader."""
    q = _only_reader(value)
    if q is None or q.op_type != "QuantizeLinear":
        return None
    dq = _only_reader(q.outputs[0])
    return (q, dq) if dq is not None and dq.op_type == "DequantizeLinear" else None


@dataclass
class TfliteCheck:
    """What a ``.tflite``'s ops compute in: int8 (they read or write a quantized 8/16-bit tensor and no float
    one), float (a float tensor among theirs), the QUANTIZE/DEQUANTIZE ops at the float boundary, and the
    rest (shape and index arithmetic on int32/int64/bool tensors)."""

    runtime: str
    int8: Counter = field(default_factory=Counter)
    #: ``(op, its first output tensor's name)`` of every op that computes in float, in graph order.
    float_: list[tuple[str, str]] = field(default_factory=list)
    boundary: Counter = field(default_factory=Counter)
    other: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        """Every convolution and linear runs int8."""
        return not any(op in COMPUTE for op, _ in self.float_)

    def summary(self, names: int = 3) -> str:
        """Lines for the report: the int8 ops by type, the float ones by type with up to ``names`` tensor
        names each, the boundary."""
        counted = sum(self.int8.values())
        line = f"on {self.runtime}: {counted}/{counted + len(self.float_)} ops run int8"
        lines = [line + (f" ({_counts(self.int8)})" if self.int8 else "")]
        if self.float_:
            by_op: dict[str, list[str]] = {}
            for op, name in self.float_:
                by_op.setdefault(op, []).append(name)
            parts = []
            for op, found in sorted(by_op.items()):
                shown = ", ".join(found[:names]) + (", ..." if len(found) > names else "")
                parts.append(f"{op} {len(found)} ({shown})")
            lines.append("float: " + "; ".join(parts))
        if self.boundary:
            lines.append(f"float boundary: {_counts(self.boundary)}")
        return "\n".join(lines)


def check_tflite(path: str | os.PathLike) -> TfliteCheck:
    """Load ``path`` in LiteRT's interpreter (builtin kernels, no delegate rewriting the graph) and classify
    its ops by the types of the tensors they compute on."""
    from ai_edge_litert import __version__ as version
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        interpreter = Interpreter(
            model_path=str(path),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    except (ValueError, RuntimeError) as err:
        raise NccError(f"{path}: LiteRT cannot load it ({first_line(err)}).") from None
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    check = TfliteCheck(runtime=f"LiteRT {version}")
    for op in interpreter._get_ops_details():  # the public API lists tensors, not ops
        name = op["op_name"]
        types = {tensors[i]["dtype"].__name__ for i in (*op["inputs"], *op["outputs"]) if i >= 0}
        if name in BOUNDARY:
            check.boundary[name] += 1
        elif types & _FLOAT:
            outputs = [i for i in op["outputs"] if i >= 0]
            # the converter names a fused tensor after every op it absorbed, joined by ";": the first says
            check.float_.append((name, tensors[outputs[0]]["name"].split(";")[0] if outputs else ""))
        elif types & _QUANTIZED:
            check.int8[name] += 1
        else:
            check.other[name] += 1
    return check


def _counts(counter: Counter) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(counter.items()))
