"""Fold an inference-mode BatchNormalization into the Conv that feeds it.

BatchNormalization computes, per channel ``c`` (axis 1),

    y = gamma[c] * (x - mean[c]) / sqrt(var[c] + eps) + beta[c]

and a Conv with weight ``W`` (shape ``[M, C/group, k...]``) and bias ``b``
computes, per output channel ``m``, ``x[m] = sum(W[m] * patch) + b[m]``. With
``s = gamma / sqrt(var + eps)`` the two collapse into one Conv:

    W'[m] = W[m] * s[m]          b'[m] = (b[m] - mean[m]) * s[m] + beta[m]

(``b = 0`` when the Conv has no bias). The per-output-channel scaling is the
same for grouped and depthwise convolutions, since ``W``'s first axis is the
output channel in every case. The arithmetic is done in float64 and cast back
to ``W``'s dtype.

Preconditions (a failed match says which one did not hold):
the BN is in inference form (``training_mode`` absent or 0, only its ``Y``
output used); its input comes from a ``Conv`` whose output nothing else reads
and which is not a graph output; ``W``, ``b`` and the four BN parameters are
constants with the expected shapes (``[M]``); ``W`` is a float tensor.

BatchNormalization also arrives decomposed: Keras 3 lowers it (through tf2onnx) to a per-channel ``Mul``
and ``Add`` after the convolution, which tf2onnx folds into regular convs but not into depthwise ones.
:class:`ConvMulPattern` and :class:`ConvAddPattern` fold such a ``Mul`` (``W' = W * s``, ``b' = b * s``) or ``Add`` (``b' = b + t``)
by a constant that varies only along the output channel (shape ``[M, 1, 1]`` or ``[1, M, 1, 1]`` or a
scalar), one at a time, so a Mul then an Add fold in two steps.

``ConvTranspose`` is not handled (its weight is ``[C, M/group, k...]``, so the
scale would apply along a different axis per group); neither is a BN fed
through a Relu or any other op.

The new Conv keeps the Conv's attributes and name, records the ids of both
nodes as absorbed, and takes over the BN output's name. Constants that only
the replaced nodes read go with them (the rewriter's ``erase``); a weight
another node shares stays. This pass reads the weight and BN parameter values:
it has to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.ir.ops import is_onnx_domain
from ncc.ir.rewrite import MatchResult, Pattern, Rewriter, constant_array, constant_tensor, single_consumer
from ncc.passes.base import Pass, PassContext, PassResult, run_patterns

_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


class ConvBNPattern(Pattern):
    root = "BatchNormalization"
    benefit = 2

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        bn = node
        if bn.attributes.get_int("training_mode", 0) != 0:
            return MatchResult.fail("BatchNormalization is in training mode")
        if any(o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
            return MatchResult.fail("BatchNormalization running mean/var outputs are used")
        if len(bn.inputs) != 5 or any(v is None for v in bn.inputs):
            return MatchResult.fail("BatchNormalization does not have 5 inputs")
        x = bn.inputs[0]
        conv = x.producer()
        if conv is None or conv.op_type != "Conv" or not is_onnx_domain(conv):
            transposed = conv is not None and conv.op_type == "ConvTranspose"
            kind = "ConvTranspose (not supported)" if transposed else "not a Conv"
            return MatchResult.fail(f"BatchNormalization input producer is {kind}")
        if conv.graph is not bn.graph:
            return MatchResult.fail("Conv is in another graph")
        if not single_consumer(x, bn):
            return MatchResult.fail("Conv output has other uses")
        if len(conv.inputs) < 2 or conv.inputs[1] is None:
            return MatchResult.fail("Conv has no weight")
        w_value = conv.inputs[1]
        w_tensor = constant_tensor(w_value)
        if w_tensor is None:
            return MatchResult.fail("Conv weight is not a constant")
        if w_tensor.dtype not in _FLOATS:
            return MatchResult.fail(f"Conv weight dtype {w_tensor.dtype} is not a float type")
        names = ("scale", "bias", "mean", "variance")
        params = []
        for label, value in zip(names, bn.inputs[1:], strict=True):
            array = constant_array(value)
            if array is None:
                return MatchResult.fail(f"BatchNormalization {label} is not a constant")
            params.append(array.astype(np.float64))
        b_value = conv.inputs[2] if len(conv.inputs) > 2 else None
        bias = constant_array(b_value) if b_value is not None else None
        if b_value is not None and bias is None:
            return MatchResult.fail("Conv bias is not a constant")
        m = int(w_tensor.shape[0])
        if any(p.shape != (m,) for p in params):
            return MatchResult.fail(f"BatchNormalization parameters are not of shape [{m}]")
        if bias is not None and bias.shape != (m,):
            return MatchResult.fail(f"Conv bias is not of shape [{m}]")
        weight = w_tensor.numpy()  # read only once the match is certain

        gamma, beta, mean, var = params
        eps = bn.attributes.get_float("epsilon", 1e-5)
        scale = gamma / np.sqrt(var + eps)
        new_w = (weight.astype(np.float64) * scale.reshape((m,) + (1,) * (weight.ndim - 1))).astype(
            weight.dtype
        )
        b = np.zeros(m) if bias is None else bias.astype(np.float64)
        new_b = ((b - mean) * scale + beta).astype(weight.dtype)

        w_new = rewriter.constant(new_w, f"{w_value.name}_bn")
        b_new = rewriter.constant(
            new_b, f"{b_value.name}_bn" if b_value is not None else f"{w_value.name}_bn_bias"
        )
        return _replace(rewriter, conv, bn, w_new, b_new)


class ConvAffinePattern(Pattern):
    """``Conv -> Mul(s)`` or ``Conv -> Add(t)`` by a per-output-channel constant: folded into the Conv
    (:class:`ConvMulPattern`, :class:`ConvAddPattern` root it at each op)."""

    benefit = 1

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        if not is_onnx_domain(node) or len(node.inputs) != 2:
            return MatchResult.fail(f"{node.op_type} is not a binary ONNX op")
        conv, x, k = None, None, None
        for i in (0, 1):
            producer = node.inputs[i].producer() if node.inputs[i] is not None else None
            if producer is not None and producer.op_type == "Conv" and is_onnx_domain(producer):
                conv, x, k = producer, node.inputs[i], node.inputs[1 - i]
                break
        if conv is None:
            return MatchResult.fail(f"no {node.op_type} input comes from a Conv")
        if conv.graph is not node.graph or not single_consumer(x, node):
            return MatchResult.fail("Conv output has other uses")
        w_tensor = constant_tensor(conv.inputs[1]) if len(conv.inputs) > 1 else None
        if w_tensor is None or w_tensor.dtype not in _FLOATS:
            return MatchResult.fail("Conv weight is not a float constant")
        const = constant_array(k)
        if const is None:
            return MatchResult.fail(f"{node.op_type} operand is not a constant")
        m, rank = int(w_tensor.shape[0]), len(w_tensor.shape)
        per_channel = _per_channel(const, m, rank)
        if per_channel is None:
            return MatchResult.fail(f"{node.op_type} constant {const.shape} is not per output channel")
        b_value = conv.inputs[2] if len(conv.inputs) > 2 else None
        bias = constant_array(b_value) if b_value is not None else np.zeros(m)
        if bias is None or bias.shape != (m,):
            return MatchResult.fail("Conv bias is not a constant of shape [M]")
        weight = w_tensor.numpy()
        w_value = conv.inputs[1]
        if node.op_type == "Mul":
            new_w = (weight.astype(np.float64) * per_channel.reshape((m,) + (1,) * (rank - 1))).astype(
                weight.dtype
            )
            w_value = rewriter.constant(new_w, f"{conv.inputs[1].name}_scaled")
            new_b = bias.astype(np.float64) * per_channel
        else:
            new_b = bias.astype(np.float64) + per_channel
        b_name = f"{b_value.name}_{node.op_type.lower()}" if b_value is not None else f"{w_value.name}_bias"
        b_new = rewriter.constant(new_b.astype(weight.dtype), b_name)
        return _replace(rewriter, conv, node, w_value, b_new)


class ConvMulPattern(ConvAffinePattern):
    root = "Mul"


class ConvAddPattern(ConvAffinePattern):
    root = "Add"


def _replace(
    rewriter: Rewriter, conv: ir.Node, after: ir.Node, weight: ir.Value, bias: ir.Value
) -> MatchResult:
    """``conv`` and the node ``after`` it, replaced by one Conv with ``weight`` and ``bias``."""
    attrs = [ir.Attr(a.name, a.type, a.value) for a in conv.attributes.values()]
    fused = rewriter.create(
        "Conv", [conv.inputs[0], weight, bias], attrs, name=conv.name, absorbed=[conv, after]
    )
    rewriter.replace_value(after.outputs[0], fused.outputs[0])
    rewriter.erase(after)
    rewriter.erase(conv)
    return MatchResult.ok()


def _per_channel(const: np.ndarray, m: int, rank: int) -> np.ndarray | None:
    """``const`` as ``m`` float64 values when it broadcasts against a ``[N, M, ...]`` output of ``rank``
    along the channel axis only (a scalar counts), else None."""
    if const.dtype.kind != "f" or const.ndim > rank:
        return None
    if const.size == 1:
        return np.full(m, float(const.reshape(())), np.float64)
    shape = (1,) * (rank - const.ndim) + const.shape
    if shape[0] != 1 or shape[1] != m or any(d != 1 for d in shape[2:]):
        return None
    return const.reshape(m).astype(np.float64)


@dataclass(frozen=True)
class FuseConvBN(Pass):
    """Fold BatchNormalization into the Conv that feeds it.

    W' = W * gamma / sqrt(var + eps)    b' = (b - mean) * gamma / sqrt(var + eps) + beta

    and a decomposed one (a per-channel Mul or Add after the Conv, as Keras models arrive).
    """

    name: ClassVar[str] = "fuse-conv-bn"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return run_patterns(model, [ConvBNPattern(), ConvMulPattern(), ConvAddPattern()])
