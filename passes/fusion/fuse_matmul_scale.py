"""Fold a constant scalar ``Mul`` (or ``Div``) after a MatMul into a weight upstream.

Attention scales its scores: ``Mul(MatMul(Q, Kᵀ), c)`` with ``c = 1/sqrt(d)``.
onnxruntime fuses that Mul into its float ``FusedMatMul``, but not once the
MatMul reads dequantized inputs: in an INT8 model the Mul runs as its own
kernel over the largest tensor of the layer (``[batch, heads, seq, seq]``; six
of them cost all-MiniLM-L6-v2 about 1.5 ms a batch of 8). Since

    (c·A) @ B = c·(A @ B)

the scale can go into whichever operand is computed from constants by a linear
map: ``Q = Transpose(Reshape(X @ Wq + bq))`` becomes ``X @ (c·Wq) + c·bq``, and
the Mul disappears. Followed up from the MatMul's operand (first A, then B)
through data-movement ops (``VALUE_MOVES``: Reshape's data, Transpose,
Squeeze, Unsqueeze, Flatten, Identity, DepthToSpace, SpaceToDepth), the scale
lands on

- a constant operand: it is scaled;
- ``MatMul(X, W)`` with a constant ``W``: ``W`` is scaled;
- ``Add(MatMul(X, W), b)`` with constant ``W`` and ``b``: both are scaled;
- ``Gemm``: its ``alpha`` and ``beta`` are multiplied by ``c``.

Preconditions (a failed match says which one did not hold): the Mul/Div has a
constant float operand with one element, broadcasting to no higher rank than
the MatMul output (a Div's constant is the divisor, ``c`` is its inverse and
must not be 0); the MatMul reads two different values, and its output feeds
only the Mul and is not a graph output; every value on the path up to the carrier has that one reader too, so
nothing else sees the scaled values. Scaled constants are new initializers
(the old ones go when nothing else reads them); arithmetic in float64, cast
back to the weight's dtype. The result equals the original up to float
rounding. The MatMul is rebuilt, absorbing the Mul's id, and takes over the
Mul output's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.ir.ops import VALUE_MOVES, is_onnx_domain
from ncc.ir.rewrite import MatchResult, Pattern, Rewriter, constant_array, constant_tensor, single_consumer
from ncc.passes.base import Pass, PassContext, PassResult, run_patterns

_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def _scalar(value: ir.Value) -> np.ndarray | None:
    tensor = constant_tensor(value)
    if tensor is None or tensor.dtype not in _FLOATS or int(np.prod(tensor.shape.numpy())) != 1:
        return None
    return tensor.numpy()


def _scaled(rewriter: Rewriter, value: ir.Value, factor: float) -> ir.Value:
    array = constant_array(value)
    return rewriter.constant(
        (array.astype(np.float64) * factor).astype(array.dtype), f"{value.name or 'const'}_scaled"
    )


class _Plan:
    """Where the factor goes for one operand: the (node, input index) of each constant to scale, and a
    Gemm whose alpha and beta to scale."""

    def __init__(self, weights: list[tuple[ir.Node, int]], gemm: ir.Node | None = None):
        self.weights, self.gemm = weights, gemm


def _plan(operand: ir.Value, reader: ir.Node) -> _Plan | str:
    """Where the factor can go for ``operand`` (read by ``reader``), or why it cannot."""
    value, consumer = operand, reader
    while True:
        if constant_tensor(value) is not None:
            if constant_tensor(value).dtype not in _FLOATS:
                return "a constant operand is not a float tensor"
            index = next(i for i, v in enumerate(consumer.inputs) if v is value)
            return _Plan([(consumer, index)])
        if not single_consumer(value, consumer):
            return f"{value.name!r} has other readers"
        producer = value.producer()
        if producer is None:
            return "an operand is a graph input"
        if not is_onnx_domain(producer):
            return f"{producer.op_type} ({producer.domain}) is not a standard op"
        if producer.op_type in VALUE_MOVES:
            value, consumer = producer.inputs[0], producer
            continue
        if producer.op_type == "MatMul":
            w = producer.inputs[1]
            if _float_constant(w):
                return _Plan([(producer, 1)])
            return "the MatMul upstream has no constant weight"
        if producer.op_type == "Add" and len(producer.inputs) == 2:
            for i in (0, 1):
                mm_out, bias = producer.inputs[i], producer.inputs[1 - i]
                mm = mm_out.producer()
                if (
                    mm is not None
                    and mm.op_type == "MatMul"
                    and is_onnx_domain(mm)
                    and _float_constant(bias)
                    and _float_constant(mm.inputs[1])
                    and single_consumer(mm_out, producer)
                ):
                    return _Plan([(mm, 1), (producer, 1 - i)])
            return "the Add upstream is not a MatMul with constant weight plus a constant bias"
        if producer.op_type == "Gemm":
            return _Plan([], gemm=producer)
        return f"an operand comes from {producer.op_type}"


def _float_constant(value: ir.Value | None) -> bool:
    tensor = constant_tensor(value) if value is not None else None
    return tensor is not None and tensor.dtype in _FLOATS


class MatMulScalePattern(Pattern):
    root = "Mul"

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        return _fold(node, rewriter, divide=False)


class MatMulDivScalePattern(Pattern):
    root = "Div"

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        return _fold(node, rewriter, divide=True)


def _fold(node: ir.Node, rewriter: Rewriter, divide: bool) -> MatchResult:
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return MatchResult.fail(f"{node.op_type} does not have two inputs")
    sides = (0,) if divide else (0, 1)  # a Div's constant must be the divisor
    matmul = scale = None
    for i in sides:
        producer = node.inputs[i].producer()
        c = _scalar(node.inputs[1 - i])
        if (
            producer is not None
            and producer.op_type == "MatMul"
            and is_onnx_domain(producer)
            and c is not None
        ):
            matmul, scale, scale_value = producer, c, node.inputs[1 - i]
            break
    if matmul is None:
        return MatchResult.fail(f"not a MatMul output times a constant scalar ({node.op_type})")
    if matmul.graph is not node.graph:
        return MatchResult.fail("MatMul is in another graph")
    if matmul.inputs[0] is matmul.inputs[1]:
        return MatchResult.fail("the MatMul reads one value twice: scaling it would scale the product twice")
    out = matmul.outputs[0]
    if not single_consumer(out, node):
        return MatchResult.fail("MatMul output has other uses")
    if scale.ndim > 1 and (out.shape is None or scale.ndim > len(out.shape)):
        return MatchResult.fail(
            f"the constant has rank {scale.ndim}, which may broadcast the MatMul output up"
        )
    c = float(scale.reshape(()))
    if divide and c == 0.0:
        return MatchResult.fail("division by a constant 0")
    factor = 1.0 / c if divide else c
    reasons = []
    for operand in matmul.inputs:
        plan = _plan(operand, matmul)
        if isinstance(plan, str):
            reasons.append(plan)
            continue
        new_inputs = list(matmul.inputs)
        for weight_node, index in plan.weights:
            new = _scaled(rewriter, weight_node.inputs[index], factor)
            if weight_node is matmul:
                new_inputs[index] = new
            else:
                old = weight_node.inputs[index]
                weight_node.replace_input_with(index, new)
                rewriter.drop_if_unused(old)
        if plan.gemm is not None:
            for attr in ("alpha", "beta"):
                value = plan.gemm.attributes.get_float(attr, 1.0) * factor
                plan.gemm.attributes[attr] = ir.AttrFloat32(attr, value)
        fused = rewriter.create("MatMul", new_inputs, name=matmul.name, absorbed=[matmul, node])
        rewriter.replace_value(node.outputs[0], fused.outputs[0])
        rewriter.erase(node)
        rewriter.erase(matmul)
        rewriter.drop_if_unused(scale_value)
        return MatchResult.ok()
    return MatchResult.fail("; ".join(dict.fromkeys(reasons)))


@dataclass(frozen=True)
class FuseMatMulScale(Pass):
    """Fold a constant scalar Mul/Div after a MatMul into a constant weight upstream of one operand."""

    name: ClassVar[str] = "fuse-matmul-scale"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return run_patterns(model, [MatMulScalePattern(), MatMulDivScalePattern()])
