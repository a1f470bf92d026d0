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
        attrs = [ir.Attr(a.name, a.type, a.value) for a in conv.attributes.values()]
        fused = rewriter.create(
            "Conv", [conv.inputs[0], w_new, b_new], attrs, name=conv.name, absorbed=[conv, bn]
        )
        rewriter.replace_value(bn.outputs[0], fused.outputs[0])
        rewriter.erase(bn)
        rewriter.erase(conv)
        return MatchResult.ok()


@dataclass(frozen=True)
class FuseConvBN(Pass):
    """Fold BatchNormalization into the Conv that feeds it.

    W' = W * gamma / sqrt(var + eps)    b' = (b - mean) * gamma / sqrt(var + eps) + beta
    """

    name: ClassVar[str] = "fuse-conv-bn"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return run_patterns(model, [ConvBNPattern()])
