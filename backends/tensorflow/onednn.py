"""TensorFlow's oneDNN quantized ops, built as graph nodes: the int8 kernels ``--target tf`` runs.

Stock ``tensorflow-cpu`` runs int8 only through oneDNN's graph-mode ops (``QuantizeV2``,
``_FusedQuantizedConv2D``, ``_FusedQuantizedDepthwiseConv2D``, ``_QuantizedMatMul``, ``QuantizedMaxPool``,
``Dequantize``); a Q/DQ or FakeQuant graph runs in float. The underscore ops have no Python wrapper, so
they are created with ``Graph.create_op`` inside the ``tf.function`` being traced; their weights are
``Const`` nodes (``is_filter_const``), which lets the kernels cache the reordered weights.

Every tensor is in TensorFlow's SCALED mode: no zero point, the scale given by a ``[min, max]`` pair of
float tensors carried beside it. :class:`QTensor` is that triple. ncc's ``scaled`` activation scheme
(:data:`ncc.targets.TF`) produces exactly these: ``quint8`` with ``scale = max / 255`` (a non-negative
tensor) or ``qint8`` with ``scale = max / 127`` on ``[-max, max]`` (narrow range, so ``-128`` is never
used: the kernels and ``QuantizeV2`` then agree on the scale bit for bit). Weights are ``qint8``,
symmetric, per output channel (``min = -127 s``, ``max = 127 s``); biases are float (the kernels add
them at the accumulator's scale). Each op was checked against a float reference on quantized inputs:
within half an output step (``tests/backends/test_tf_int8.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: fused_ops of the convolutions by the activation folded in (ncc's lowering passes none: a Relu is what a
#: u8 output's saturation at 0 gives).
CONV_ACTIVATIONS = {None: [], "Relu": ["Relu"]}


@dataclass(frozen=True)
class QTensor:
    """A SCALED-mode 8-bit tensor: ``value`` (quint8 or qint8) and the float ``[lo, hi]`` range tensors."""

    value: Any
    lo: Any
    hi: Any
    signed: bool
    scale: float

    @property
    def dtype(self):
        import tensorflow as tf

        return tf.qint8 if self.signed else tf.quint8


def scaled_range(scale: float, signed: bool) -> tuple[float, float]:
    """The SCALED-mode ``[min, max]`` whose scale is ``scale``: ``[0, 255 s]`` or ``[-127 s, 127 s]``."""
    scale = float(np.float32(scale))
    return (-127.0 * scale, 127.0 * scale) if signed else (0.0, 255.0 * scale)


def quantize(x, scale: float, signed: bool, name: str) -> QTensor:
    """``QuantizeV2`` (SCALED, half to even as ONNX's QuantizeLinear) of a float tensor."""
    import tensorflow as tf

    lo, hi = scaled_range(scale, signed)
    q = tf.raw_ops.QuantizeV2(
        input=x,
        min_range=lo,
        max_range=hi,
        T=tf.qint8 if signed else tf.quint8,
        mode="SCALED",
        round_mode="HALF_TO_EVEN",
        narrow_range=signed,
        ensure_minimum_range=0.0,
        name=name,
    )
    return QTensor(q.output, tf.constant(lo), tf.constant(hi), signed, scale)


def dequantize(q: QTensor, name: str):
    """``Dequantize`` (SCALED) back to float32."""
    import tensorflow as tf

    return tf.raw_ops.Dequantize(
        input=q.value, min_range=q.lo, max_range=q.hi, mode="SCALED", narrow_range=q.signed, name=name
    )


def conv2d(
    x: QTensor,
    weight: np.ndarray,
    weight_scales: np.ndarray,
    bias: np.ndarray,
    *,
    depthwise: bool,
    strides: list[int],
    dilations: list[int],
    padding: str,
    explicit: list[int] | None,
    activation: str | None,
    out_scale: float,
    out_signed: bool,
    name: str,
) -> QTensor:
    """``_FusedQuantizedConv2D`` / ``_FusedQuantizedDepthwiseConv2D`` (NHWC), bias and activation fused,
    requantized to ``out_scale``. ``weight`` is int8 HWIO (depthwise: ``[H, W, C, 1]``); ``explicit``
    gives ``[top, bottom, left, right]`` pads for ``padding="EXPLICIT"``.

    oneDNN halves the weights of a convolution reading s8 on x86 without VNNI (a code of 3 acts as 4):
    weights within ±63 are stored doubled at half the scale, which that halving undoes exactly (and which
    other CPUs compute exactly as they are)."""
    import tensorflow as tf
    from tensorflow.core.framework import attr_value_pb2, types_pb2

    w_scales = np.broadcast_to(
        np.asarray(weight_scales, np.float32), (weight.shape[-2 if depthwise else -1],)
    )
    if x.signed and np.abs(weight.astype(np.int32)).max(initial=0) <= 63:
        weight, w_scales = weight.astype(np.int32) * 2, w_scales / np.float32(2)
    lo, hi = scaled_range(out_scale, out_signed)
    out_type = tf.qint8 if out_signed else tf.quint8
    inputs = [
        x.value,
        tf.constant(weight.astype(np.int8), dtype=tf.qint8),
        tf.constant(np.asarray(bias, np.float32)),
        x.lo,
        x.hi,
        tf.constant(-127.0 * w_scales),
        tf.constant(127.0 * w_scales),
        tf.constant(lo),
        tf.constant(hi),
    ]
    host = [x.dtype.as_datatype_enum, types_pb2.DT_QINT8] + [types_pb2.DT_FLOAT] * 7
    attrs = {
        "Thost_inputs": _types(host),
        "Thost_outputs": _types([out_type.as_datatype_enum, types_pb2.DT_FLOAT, types_pb2.DT_FLOAT]),
        "Tdevice_inputs": _types([]),
        "Tdevice_outputs": _types([]),
        "Tinput": attr_value_pb2.AttrValue(type=x.dtype.as_datatype_enum),
        "Tfilter": attr_value_pb2.AttrValue(type=types_pb2.DT_QINT8),
        "Tbias": attr_value_pb2.AttrValue(type=types_pb2.DT_FLOAT),
        "Tsummand": attr_value_pb2.AttrValue(type=out_type.as_datatype_enum),
        "out_type": attr_value_pb2.AttrValue(type=out_type.as_datatype_enum),
        "strides": _ints([1, *strides, 1]),
        "dilations": _ints([1, *dilations, 1]),
        "padding": attr_value_pb2.AttrValue(s=padding.encode()),
        "fused_ops": _strings(["BiasAdd", *CONV_ACTIVATIONS[activation], "Requantize"]),
    }
    if explicit is not None:
        attrs["explicit_paddings"] = _ints([0, 0, explicit[0], explicit[1], explicit[2], explicit[3], 0, 0])
    op_type = "_FusedQuantizedDepthwiseConv2D" if depthwise else "_FusedQuantizedConv2D"
    op = tf.compat.v1.get_default_graph().create_op(
        op_type, inputs, dtypes=[out_type, tf.float32, tf.float32], attrs=attrs, name=name
    )
    return QTensor(op.outputs[0], op.outputs[1], op.outputs[2], out_signed, out_scale)


def matmul(x: QTensor, weight: np.ndarray, weight_scales: np.ndarray, bias: np.ndarray | None, name: str):
    """``_QuantizedMatMul`` of a 2-D ``x`` by an int8 ``[K, N]`` weight (per-column scales), bias added and
    the output dequantized inside the kernel: float32 ``[M, N]``."""
    import tensorflow as tf
    from tensorflow.core.framework import attr_value_pb2, types_pb2

    n = weight.shape[1]
    w_scales = np.broadcast_to(np.asarray(weight_scales, np.float32), (n,))
    b = np.zeros(n, np.float32) if bias is None else np.asarray(bias, np.float32)
    inputs = [
        x.value,
        tf.constant(weight.astype(np.int8), dtype=tf.qint8),
        tf.constant(b),
        x.lo,
        x.hi,
        tf.constant(-127.0 * w_scales),
        tf.constant(127.0 * w_scales),
    ]
    attrs = {
        "Thost_inputs": _types([x.dtype.as_datatype_enum, types_pb2.DT_QINT8] + [types_pb2.DT_FLOAT] * 5),
        "Thost_outputs": _types([types_pb2.DT_FLOAT]),
        "Tdevice_inputs": _types([]),
        "Tdevice_outputs": _types([]),
        "T1": attr_value_pb2.AttrValue(type=x.dtype.as_datatype_enum),
        "T2": attr_value_pb2.AttrValue(type=types_pb2.DT_QINT8),
        "Tbias": attr_value_pb2.AttrValue(type=types_pb2.DT_FLOAT),
        "Tout": attr_value_pb2.AttrValue(type=types_pb2.DT_FLOAT),
        "U": attr_value_pb2.AttrValue(type=types_pb2.DT_FLOAT),
        "fused_ops": _strings(["BiasAdd", "Dequantize"]),
        "input_quant_mode": attr_value_pb2.AttrValue(s=b"SCALED"),
        "is_weight_const": attr_value_pb2.AttrValue(b=True),
    }
    op = tf.compat.v1.get_default_graph().create_op(
        "_QuantizedMatMul", inputs, dtypes=[tf.float32], attrs=attrs, name=name
    )
    return op.outputs[0]


def max_pool(x: QTensor, ksize: list[int], strides: list[int], padding: str, name: str) -> QTensor:
    """``QuantizedMaxPool`` (NHWC): the maximum of 8-bit codes is the code of the maximum."""
    import tensorflow as tf

    out = tf.raw_ops.QuantizedMaxPool(
        input=x.value,
        min_input=x.lo,
        max_input=x.hi,
        ksize=[1, *ksize, 1],
        strides=[1, *strides, 1],
        padding=padding,
        name=name,
    )
    return QTensor(out.output, x.lo, x.hi, x.signed, x.scale)


def _types(types: list[int]):
    from tensorflow.core.framework import attr_value_pb2

    return attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(type=types))


def _ints(values: list[int]):
    from tensorflow.core.framework import attr_value_pb2

    return attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(i=[int(v) for v in values]))


def _strings(values: list[str]):
    from tensorflow.core.framework import attr_value_pb2

    return attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(s=[v.encode() for v in values]))
