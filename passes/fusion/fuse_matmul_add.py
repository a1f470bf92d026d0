"""Fuse ``Add(MatMul(A, B), C)`` into ``Gemm(A, B, C)``.

``Gemm(A, B, C)`` with default attributes (``alpha = beta = 1``, no transposes)
computes ``A @ B + C`` for a rank-2 ``A`` of shape ``[M, K]`` and ``B`` of shape
``[K, N]``, with ``C`` unidirectionally broadcast to ``[M, N]`` — exactly the
MatMul followed by the Add, as one kernel with the bias fused in.

Preconditions (a failed match says which one did not hold): ``A`` has rank 2;
``B`` is a rank-2 constant (a weight); the other Add operand is a constant whose
shape broadcasts to ``[M, N]`` without growing it (``[N]``, ``[1, N]``, ``[M, N]``,
``[M, 1]``, ``[1]`` or a scalar, with a known ``N``; an ``M`` in the bias must be
a known, equal dimension); the MatMul output is read by the Add only and is not
a graph output; the dtype is a float type Gemm accepts.

A MatMul with an ``A`` of rank > 2 (a transformer's ``[batch, seq, hidden]``
activations) is left alone and the reason recorded: Gemm is rank-2 only, and
onnxruntime's own graph optimizer already fuses an N-D MatMul + Add (into
``FusedMatMul``/``MatMul`` with bias epilogues) at session creation.

The Gemm records the ids of both nodes as absorbed and takes over the Add
output's name. No weight is read: only shapes are inspected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
from ncc.ir.ops import is_onnx_domain
from ncc.ir.rewrite import MatchResult, Pattern, Rewriter, constant_tensor, single_consumer
from ncc.passes.base import Pass, PassContext, PassResult, run_patterns

_GEMM_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


class MatMulAddPattern(Pattern):
    root = "Add"

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        add = node
        if len(add.inputs) != 2 or any(v is None for v in add.inputs):
            return MatchResult.fail("Add does not have two inputs")
        matmul, bias = None, None
        for i, value in enumerate(add.inputs):
            producer = value.producer()
            if producer is not None and producer.op_type == "MatMul" and is_onnx_domain(producer):
                matmul, bias = producer, add.inputs[1 - i]
                break
        if matmul is None:
            return MatchResult.fail("no Add input is produced by a MatMul")
        if matmul.graph is not add.graph:
            return MatchResult.fail("MatMul is in another graph")
        mm_out = matmul.outputs[0]
        if not single_consumer(mm_out, add):
            return MatchResult.fail("MatMul output has other uses")
        a, b = matmul.inputs
        if a.shape is None:
            return MatchResult.fail("rank of MatMul input A is unknown")
        if len(a.shape) != 2:
            return MatchResult.fail(
                f"MatMul input A has rank {len(a.shape)}, Gemm needs rank 2 "
                "(onnxruntime fuses N-D MatMul+Add itself)"
            )
        b_tensor = constant_tensor(b)
        if b_tensor is None:
            return MatchResult.fail("MatMul input B is not a constant")
        if len(b_tensor.shape) != 2:
            return MatchResult.fail(f"MatMul input B has rank {len(b_tensor.shape)}, Gemm needs rank 2")
        if b_tensor.dtype not in _GEMM_TYPES:
            return MatchResult.fail(f"dtype {b_tensor.dtype} is not a float type")
        c_tensor = constant_tensor(bias)
        if c_tensor is None:
            return MatchResult.fail("Add bias is not a constant")
        m, n = a.shape[0], int(b_tensor.shape[1])
        reason = _broadcast_problem(tuple(int(d) for d in c_tensor.shape), m, n)
        if reason:
            return MatchResult.fail(reason)

        gemm = rewriter.create("Gemm", [a, b, bias], name=add.name or matmul.name, absorbed=[matmul, add])
        rewriter.replace_value(add.outputs[0], gemm.outputs[0])
        rewriter.erase(add)
        rewriter.erase(matmul)
        return MatchResult.ok()


def _broadcast_problem(shape: tuple[int, ...], m: int | ir.SymbolicDim, n: int) -> str:
    """Why a bias of ``shape`` does not broadcast to [M, N] without growing it ('' when it does)."""
    if len(shape) > 2:
        return f"Add bias has rank {len(shape)} > 2"
    padded = (1,) * (2 - len(shape)) + shape
    if padded[1] not in (1, n):
        return f"Add bias shape {list(shape)} does not broadcast to [M, {n}]"
    if padded[0] != 1 and not (isinstance(m, int) and padded[0] == m):
        return f"Add bias shape {list(shape)} does not broadcast to [{m}, {n}]"
    return ""


@dataclass(frozen=True)
class FuseMatMulAdd(Pass):
    """Fuse MatMul + Add with a rank-2 input and a constant weight into Gemm."""

    name: ClassVar[str] = "fuse-matmul-add"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return run_patterns(model, [MatMulAddPattern()])
