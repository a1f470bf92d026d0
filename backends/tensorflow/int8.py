"""The ``tf`` target's int8 lowering: the QOperator IR as TensorFlow's oneDNN quantized ops.

``--target tf`` compiles with the :data:`ncc.targets.TF` profile (zero-point-0 activations: ``scaled``) and
``legalize-qoperator``, so the IR reaching this module spells every integer layer as one node reading and
writing 8-bit tensors. These rules (for :func:`ncc.backends.tensorflow.graph.lower`) map them 1:1:

===============================  ==========================================================================
``QuantizeLinear`` (activation)  ``QuantizeV2`` (SCALED)
``DequantizeLinear`` (activ.)    ``Dequantize``
``QLinearConv``                  ``_FusedQuantizedConv2D`` / ``_FusedQuantizedDepthwiseConv2D`` (bias,
                                 requantize; a Relu is the u8 output's saturation at 0)
``MatMulIntegerToFloat``         ``_QuantizedMatMul`` (bias, dequantize in the kernel)
``QGemm``                        ``_QuantizedMatMul`` (+ ``QuantizeV2`` when its output is 8-bit)
``MaxPool`` on 8 bits            ``QuantizedMaxPool``
===============================  ==========================================================================

Reshape-like ops on 8-bit tensors are the graph lowering's own (they move codes). Everything else is float,
as the QOperator form left it. Activations have no zero point (SCALED mode), except u8 tensors read only by
1x1 convolutions and linears, whose zero point comes off those layers' biases; any other zero point, a
grouped convolution that is not depthwise, or a quantized op without a rule is one sentence (the profile's
pipeline produces none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from ncc.backends.tensorflow import onednn
from ncc.backends.tensorflow.graph import TfLowering, channels_last, logical
from ncc.errors import NccError

#: TensorFlow op types that are int8 kernels (what the check counts in a written SavedModel).
TF_INT8_KERNELS = frozenset(
    {"_FusedQuantizedConv2D", "_FusedQuantizedDepthwiseConv2D", "_QuantizedMatMul", "QuantizedMaxPool"}
)


def rules() -> list:
    """The rules, in the order :class:`TfLowering` tries them."""
    return [_quantize, _dequantize, _qlinear_conv, _matmul_integer_to_float, _qgemm, _max_pool]


def _name(node: ir.Node) -> str:
    return node.name or node.op_type


@dataclass(frozen=True)
class _Act:
    """An activation's quantization: one scale; zero point 0, or a u8 zero point where every integer reader
    folds it into its bias (insert-qdq's ``scaled`` scheme allows one only there)."""

    scale: float
    signed: bool
    zero: int


def _act(lw: TfLowering, node: ir.Node, scale: ir.Value, zero: ir.Value | None) -> _Act:
    s = lw.static(scale, "scale", node).astype(np.float32).reshape(-1)
    z = lw.static(zero, "zero point", node) if zero is not None else np.zeros((), np.uint8)
    if np.unique(s).size == 1 and np.unique(z).size == 1:  # a per-axis DQ repeating one scale: per tensor
        s, z = s[:1], z.reshape(-1)[:1]
    if s.size != 1:
        raise NccError(f"the tf target takes activations with one scale; {_name(node)!r} has several.")
    if z.dtype not in (np.uint8, np.int8):
        raise NccError(f"the tf target quantizes to 8 bits, not {z.dtype} ({_name(node)!r}).")
    if z.dtype == np.int8 and np.any(z != 0):
        raise NccError(
            f"the tf target takes s8 activations with zero point 0 ({_name(node)!r}; --target tf)."
        )
    return _Act(float(s[0]), z.dtype == np.int8, int(z.reshape(-1)[0]))


def _no_zero(act: _Act, node: ir.Node, what: str) -> None:
    if act.zero:
        raise NccError(
            f"the tf target's kernels write {what} without a zero point; {_name(node)!r} has one "
            "(compile with --target tf)."
        )


def _qtensor(lw: TfLowering, value: ir.Value, act: _Act, layout) -> onednn.QTensor:
    """``value``'s codes as the kernels read them: SCALED (a u8 zero point is the reader's bias's business)."""
    tf = lw.tf
    lo, hi = onednn.scaled_range(act.scale, act.signed)
    return onednn.QTensor(lw.get(value, layout), tf.constant(lo), tf.constant(hi), act.signed, act.scale)


def _offset(act: _Act, weight: np.ndarray) -> np.ndarray:
    """What a u8 zero point adds to each output of a layer reading it: ``zp * s * sum(w)`` over the
    reduced axes (``weight`` float, output channels first), to take off the bias."""
    return act.zero * act.scale * weight.reshape(weight.shape[0], -1).sum(axis=1)


def _weight(lw: TfLowering, node: ir.Node, codes: ir.Value, scale: ir.Value, zero: ir.Value | None):
    """An int8 weight's codes and per-output-channel scales (symmetric: zero point 0)."""
    w = lw.constant(codes)
    if w is None or w.dtype != np.int8:
        raise NccError(f"the tf target needs constant int8 weights ({_name(node)!r}).")
    z = lw.constant(zero) if zero is not None else None
    if z is not None and np.any(z != 0):
        raise NccError(f"the tf target needs symmetric weights (zero point 0) ({_name(node)!r}).")
    return w, lw.static(scale, "weight scale", node).astype(np.float32).reshape(-1)


def _quantize(lw: TfLowering, node: ir.Node) -> bool:
    if node.op_type != "QuantizeLinear" or lw.constant(node.inputs[0]) is not None:
        return False
    act = _act(lw, node, node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None)
    layout = lw.layout_of(node.inputs[0])
    x = lw.get(node.inputs[0], layout)
    if act.zero:  # QuantizeV2's MIN_FIRST rounds otherwise than ONNX: the codes as QuantizeLinear makes them
        tf = lw.tf
        codes = tf.clip_by_value(tf.round(x / np.float32(act.scale)) + float(act.zero), 0.0, 255.0)
        lw.set(node.outputs[0], tf.bitcast(tf.cast(codes, tf.uint8), tf.quint8), layout)
    else:
        lw.set(node.outputs[0], onednn.quantize(x, act.scale, act.signed, "quantize").value, layout)
    return True


def _dequantize(lw: TfLowering, node: ir.Node) -> bool:
    if node.op_type != "DequantizeLinear" or lw.constant(node.inputs[0]) is not None:
        return False
    act = _act(lw, node, node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None)
    layout = lw.layout_of(node.inputs[0])
    if act.zero:
        tf = lw.tf
        codes = tf.cast(tf.bitcast(lw.get(node.inputs[0], layout), tf.uint8), tf.float32)
        y = (codes - float(act.zero)) * np.float32(act.scale)
    else:
        y = onednn.dequantize(_qtensor(lw, node.inputs[0], act, layout), "dequantize")
    lw.set(node.outputs[0], y, layout)
    return True


def _qlinear_conv(lw: TfLowering, node: ir.Node) -> bool:
    if node.op_type != "QLinearConv":
        return False
    x, xs, xz, w, ws, wz, ys, yz = node.inputs[:8]
    bias = node.inputs[8] if len(node.inputs) > 8 else None
    xa, ya = _act(lw, node, xs, xz), _act(lw, node, ys, yz)
    _no_zero(ya, node, "convolution outputs")
    codes, w_scales = _weight(lw, node, w, ws, wz)
    if codes.ndim != 4:
        raise NccError(f"the tf target lowers 2-D convolutions only ({_name(node)!r}).")
    out_channels, per_group, kh, kw = codes.shape
    group = node.attributes.get_int("group", 1)
    depthwise = group > 1
    if depthwise and (per_group != 1 or group != out_channels):
        raise NccError(
            f"the tf target has no int8 kernel for a grouped convolution ({_name(node)!r}, group {group}): "
            "keep it float with --exclude."
        )
    filters = (
        codes.reshape(out_channels, kh, kw).transpose(1, 2, 0)[..., None]
        if depthwise
        else codes.transpose(2, 3, 1, 0)
    )
    strides = list(node.attributes.get_ints("strides", [1, 1]))
    dilations = list(node.attributes.get_ints("dilations", [1, 1]))
    layout = channels_last(4)
    q = _qtensor(lw, x, xa, layout)
    padding = lw.padding(node, q.value.shape.as_list()[1:3], [kh, kw], strides, dilations)
    if xa.zero and (padding != "VALID" or depthwise or (kh, kw) != (1, 1)):
        raise NccError(
            f"the tf target folds an input zero point only into 1x1 convolutions without padding ({_name(node)!r})."
        )
    explicit = None
    if isinstance(padding, list):
        explicit, padding = [padding[0][0], padding[0][1], padding[1][0], padding[1][1]], "EXPLICIT"
    w_scales64 = np.broadcast_to(w_scales.astype(np.float64), (out_channels,))
    b = np.zeros(out_channels, np.float64)
    if bias is not None:
        b = lw.static(bias, "bias", node).astype(np.float64) * xa.scale * w_scales64
    if xa.zero:
        b = b - _offset(xa, codes.astype(np.float64) * w_scales64[:, None, None, None])
    b = b.astype(np.float32)
    out = onednn.conv2d(
        q,
        filters,
        w_scales,
        b,
        depthwise=depthwise,
        strides=strides,
        dilations=dilations,
        padding=padding,
        explicit=explicit,
        activation=None,
        out_scale=ya.scale,
        out_signed=ya.signed,
        name="conv",
    )
    lw.set(node.outputs[0], out.value, layout)
    return True


def _matmul(lw: TfLowering, a: ir.Value, act: _Act, codes: np.ndarray, scales: np.ndarray, bias) -> Any:
    """``a @ (codes * scales)`` + ``bias`` (``a`` of any rank, its last axis K; ``codes`` ``[K, N]``) through
    ``_QuantizedMatMul``: float output. An input zero point comes off the bias."""
    tf = lw.tf
    rank = lw.rank(a)
    q = _qtensor(lw, a, act, logical(rank))
    n = codes.shape[1]
    b = np.zeros(n, np.float64) if bias is None else np.asarray(bias, np.float64)
    if act.zero:
        b = b - _offset(act, (codes.astype(np.float64) * np.broadcast_to(scales, (n,))).T)
    value = q.value if rank == 2 else tf.reshape(q.value, [-1, codes.shape[0]])
    y = onednn.matmul(
        onednn.QTensor(value, q.lo, q.hi, q.signed, q.scale), codes, scales, b.astype(np.float32), "matmul"
    )
    if rank != 2:
        y = tf.reshape(y, tf.concat([tf.shape(q.value)[:-1], [n]], 0))
    return y


def _matmul_integer_to_float(lw: TfLowering, node: ir.Node) -> bool:
    if node.op_type != "MatMulIntegerToFloat" or node.domain != "com.microsoft":
        return False
    a, b, a_scale_v, b_scale_v = node.inputs[:4]
    a_zero = node.inputs[4] if len(node.inputs) > 4 else None
    b_zero = node.inputs[5] if len(node.inputs) > 5 else None
    bias = node.inputs[6] if len(node.inputs) > 6 else None
    act = _act(lw, node, a_scale_v, a_zero)
    codes, scales = _weight(lw, node, b, b_scale_v, b_zero)
    b_float = lw.static(bias, "bias", node).astype(np.float32) if bias is not None else None
    lw.set(node.outputs[0], _matmul(lw, a, act, codes, scales, b_float))
    return True


def _qgemm(lw: TfLowering, node: ir.Node) -> bool:
    if node.op_type != "QGemm" or node.domain != "com.microsoft":
        return False
    inputs = list(node.inputs) + [None] * (9 - len(node.inputs))
    a, a_s, a_z, b, b_s, b_z, c, y_s, y_z = inputs[:9]
    if node.attributes.get_int("transA", 0):
        raise NccError(f"the tf target lowers QGemm without transA ({_name(node)!r}).")
    alpha = node.attributes.get_float("alpha", 1.0)
    act = _act(lw, node, a_s, a_z)
    codes, scales = _weight(lw, node, b, b_s, b_z)
    if node.attributes.get_int("transB", 0):
        codes = codes.T
    scales = np.broadcast_to(scales, (codes.shape[1],)).astype(np.float64)
    bias = None
    if c is not None:
        bias = lw.static(c, "bias", node).astype(np.float64) * act.scale * scales * alpha
    y = _matmul(lw, a, act, codes, (scales * alpha).astype(np.float32), bias)
    if y_s is not None:
        ya = _act(lw, node, y_s, y_z)
        _no_zero(ya, node, "linear outputs")
        y = onednn.quantize(y, ya.scale, ya.signed, "quantize").value
    lw.set(node.outputs[0], y)
    return True


def _max_pool(lw: TfLowering, node: ir.Node) -> bool:
    if node.op_type != "MaxPool" or node.inputs[0].dtype not in (ir.DataType.UINT8, ir.DataType.INT8):
        return False
    kernel = list(node.attributes.get_ints("kernel_shape"))
    strides = list(node.attributes.get_ints("strides", [1] * len(kernel)))
    dilations = node.attributes.get_ints("dilations", [1, 1])
    if len(kernel) != 2 or node.attributes.get_int("ceil_mode", 0) or any(d != 1 for d in dilations):
        return False
    layout = channels_last(4)
    tf = lw.tf
    t = lw.get(node.inputs[0], layout)
    padding = lw.padding(node, t.shape.as_list()[1:3], kernel, strides, [1, 1])
    if isinstance(padding, list):
        raise NccError(
            f"the tf target lowers an 8-bit MaxPool with SAME or VALID padding only ({_name(node)!r})."
        )
    # the codes' range is not needed: the maximum of codes is the code of the maximum
    signed = node.inputs[0].dtype == ir.DataType.INT8
    q = onednn.QTensor(t, tf.constant(-1.0 if signed else 0.0), tf.constant(1.0), signed, 1.0)
    lw.set(node.outputs[0], onednn.max_pool(q, kernel, strides, padding, "max_pool").value, layout)
    return True
