"""Recognize decomposed layer normalization and replace it with LayerNormalization.

Over the last axis of ``x`` (of size ``D``), layer normalization is

    mean = ReduceMean(x)          d = x - mean
    var  = ReduceMean(d^2)        y = d / sqrt(var + eps) * gamma + beta

which exporters of a hand-written LayerNorm (and of older framework versions)
emit as ``ReduceMean → Sub → Pow(·, 2) | Mul(d, d) → ReduceMean → Add eps →
Sqrt → Div | Mul(·, Reciprocal) → Mul gamma → Add beta``. The whole chain
becomes ``LayerNormalization(x, gamma, beta) {axis = -1, epsilon = eps}``, one
op that stays in float under quantization instead of nine elementwise nodes.

Recognized: every Mul and Add in either operand order; the two ReduceMeans
reduce exactly the last axis (``axes = [-1]`` or ``[rank - 1]``) with
``keepdims = 1``, given as an attribute (opset < 18) or a constant input
(opset >= 18); ``eps``, ``2`` are one-element float constants (``2`` within a
relative 1e-4); ``gamma`` (and ``beta``) are constants of shape ``[D]``. The
beta Add may be absent (the pattern is then rooted at the gamma Mul). Every
intermediate value must be read only inside the pattern and must not be a
graph output. RMSNorm (no mean subtraction) and normalization over several
trailing axes are out of scope; a failed match says what did not hold.

LayerNormalization is a standard op from opset 17. onnxruntime has no
``com.microsoft`` LayerNormalization, so for a model importing an older
default opset the pass raises the import to 17 (and the IR version to at least
8) when that is safe: every
standard op in the model must mean the same at opset 17 — its schema is
unchanged, or changed only by new types or by attributes whose default keeps
the old behaviour (``_SAME_AT_17``). Otherwise (or with
``upgrade-opset=false``) the subgraph stays as it is, with the reason noted.

The new node records the ids of the nodes it absorbed and takes over the last
node's output name. Only ``gamma``/``beta`` shapes and one-element constants
are inspected; no weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.ir.ops import is_onnx_domain, onnx_opset, set_onnx_opset
from ncc.ir.rewrite import MatchResult, Pattern, Rewriter, constant_tensor
from ncc.passes.base import Pass, PassContext, PassResult, option, run_patterns
from ncc.passes.fusion.fuse_gelu import (
    inner_uses_problem,
    is_constant,
    operands,
    producer_of,
    scalar_constant,
)
from ncc.passes.opset import upgrade_blockers

LAYER_NORM_OPSET = 17


def _reduce_axes(node: ir.Node) -> list[int] | None:
    """The constant axes of a ReduceMean (attribute or input), or None when not known."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        tensor = constant_tensor(node.inputs[1])
        return None if tensor is None else [int(a) for a in np.asarray(tensor.numpy()).reshape(-1)]
    attr = node.attributes.get("axes")
    return None if attr is None else [int(a) for a in attr.as_ints()]


def _last_axis_problem(node: ir.Node, x: ir.Value) -> str:
    axes = _reduce_axes(node)
    if axes is None:
        return "ReduceMean axes are not constant (or reduce all axes)"
    rank = len(x.shape) if x.shape is not None else None
    if node.attributes.get_int("keepdims", 1) != 1:
        return "ReduceMean has keepdims=0"
    if axes == [-1] or (rank is not None and axes == [rank - 1]):
        return ""
    return f"ReduceMean reduces axes {axes}, not the last axis only"


class _LayerNormPattern(Pattern):
    def __init__(self, upgrade_opset: bool = True):
        self.upgrade_opset = upgrade_opset

    def _normalized(self, value: ir.Value) -> tuple[ir.Value, float, list[ir.Node]] | str:
        """``value = (x - mean(x)) / sqrt(var(x) + eps)``: return (x, eps, nodes) or why not."""
        div = producer_of(value, "Div", "Mul")
        if div is None or operands(div) is None:
            return "not (x - mean) / sqrt(var + eps)"
        nodes = [div]
        candidates = []
        if div.op_type == "Div":
            candidates.append((div.inputs[0], producer_of(div.inputs[1], "Sqrt"), []))
        else:
            for d, r in (div.inputs, div.inputs[::-1]):
                recip = producer_of(r, "Reciprocal")
                if recip is not None:
                    candidates.append((d, producer_of(recip.inputs[0], "Sqrt"), [recip]))
        for d, sqrt, extra in candidates:
            sub = producer_of(d, "Sub")
            if sub is None or sqrt is None or operands(sub) is None:
                continue
            x, mean = sub.inputs
            rm1 = producer_of(mean, "ReduceMean")
            if rm1 is None or rm1.inputs[0] is not x:
                return "the Sub does not subtract ReduceMean(x) from x"
            add = producer_of(sqrt.inputs[0], "Add")
            if add is None or operands(add) is None:
                return "the Sqrt argument is not var + eps"
            var, eps = add.inputs
            if scalar_constant(eps) is None:
                eps, var = var, eps
            eps_value = scalar_constant(eps)
            rm2 = producer_of(var, "ReduceMean")
            if eps_value is None or rm2 is None:
                return "the Sqrt argument is not ReduceMean(d^2) + constant eps"
            sq = producer_of(rm2.inputs[0], "Pow", "Mul")
            if sq is None or operands(sq) is None:
                return "the variance is not ReduceMean((x - mean)^2)"
            if sq.op_type == "Pow" and not (sq.inputs[0] is d and is_constant(sq.inputs[1], 2.0)):
                return "the variance is not ReduceMean(Pow(x - mean, 2))"
            if sq.op_type == "Mul" and not (sq.inputs[0] is d and sq.inputs[1] is d):
                return "the variance is not ReduceMean((x - mean) * (x - mean))"
            for rm in (rm1, rm2):
                problem = _last_axis_problem(rm, x)
                if problem:
                    return problem
            if _reduce_axes(rm1) != _reduce_axes(rm2):
                return "the two ReduceMeans reduce different axes"
            return x, eps_value, [rm1, sub, sq, rm2, add, sqrt, *extra, *nodes]
        return "not (x - mean) / sqrt(var + eps)"

    def _affine(self, value: ir.Value, x: ir.Value, label: str) -> str:
        """Why ``value`` is not a constant of shape [D] usable as LayerNormalization's ``label``."""
        tensor = constant_tensor(value)
        if tensor is None:
            return f"{label} is not a constant"
        if len(tensor.shape) != 1:
            return f"{label} has shape {list(tensor.shape)}, not [D]"
        dim = x.shape[-1] if x.shape is not None and len(x.shape) > 0 else None
        size = int(tensor.shape[0])
        if isinstance(dim, int) and size != dim:
            return f"{label} has shape [{size}], not [{dim}]"
        if not isinstance(dim, int) and size == 1:
            return f"{label} has one element and the last axis size is unknown"
        return ""

    def _match_scaled(self, value: ir.Value) -> tuple[ir.Value, ir.Value, float, list[ir.Node]] | str:
        """``value = normalized(x) * gamma``: return (x, gamma, eps, nodes) or why not."""
        mul = producer_of(value, "Mul")
        if mul is None or operands(mul) is None:
            return "no Mul by gamma"
        reason = "no Mul by gamma of (x - mean) / sqrt(var + eps)"
        for n, gamma in (mul.inputs, mul.inputs[::-1]):
            found = self._normalized(n)
            if isinstance(found, str):
                if found != "not (x - mean) / sqrt(var + eps)":
                    reason = found
                continue
            x, eps, nodes = found
            problem = self._affine(gamma, x, "gamma")
            if problem:
                return problem
            return x, gamma, eps, [*nodes, mul]
        return reason

    def _emit(self, root: ir.Node, x, gamma, beta, eps, nodes, rewriter: Rewriter) -> MatchResult:
        problem = inner_uses_problem(nodes, root)
        if problem:
            return MatchResult.fail(problem)
        model = rewriter.model
        if onnx_opset(model) < LAYER_NORM_OPSET:
            if not self.upgrade_opset:
                return MatchResult.fail(
                    f"LayerNormalization needs opset {LAYER_NORM_OPSET}, the model imports "
                    f"{onnx_opset(model)} (upgrade-opset=false)"
                )
            blockers = upgrade_blockers(model, LAYER_NORM_OPSET)
            if blockers:
                return MatchResult.fail(
                    f"LayerNormalization needs opset {LAYER_NORM_OPSET}, and the model's opset "
                    f"{onnx_opset(model)} cannot be raised safely because of {', '.join(blockers)}"
                )
            set_onnx_opset(model, LAYER_NORM_OPSET)
            model.ir_version = max(model.ir_version or 0, 8)  # IR 8 is the one released with opset 17
        inputs = [x, gamma] + ([beta] if beta is not None else [])
        attrs = {"axis": -1, "epsilon": float(np.float32(eps))}
        new = rewriter.create("LayerNormalization", inputs, attrs, name=root.name, absorbed=nodes)
        rewriter.replace_value(root.outputs[0], new.outputs[0])
        rewriter.erase_all(nodes)
        return MatchResult.ok()


class LayerNormPattern(_LayerNormPattern):
    """``normalized(x) * gamma + beta``, rooted at the Add."""

    root = "Add"
    benefit = 2

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        pair = operands(node)
        if pair is None:
            return MatchResult.fail("Add does not have two inputs")
        reason = "no Add of beta to gamma * (x - mean) / sqrt(var + eps)"
        for scaled, beta in (pair, pair[::-1]):
            found = self._match_scaled(scaled)
            if isinstance(found, str):
                if found not in ("no Mul by gamma", "no Mul by gamma of (x - mean) / sqrt(var + eps)"):
                    reason = found
                continue
            x, gamma, eps, nodes = found
            problem = self._affine(beta, x, "beta")
            if problem:
                return MatchResult.fail(problem)
            return self._emit(node, x, gamma, beta, eps, [*nodes, node], rewriter)
        return MatchResult.fail(reason)


class LayerNormNoBiasPattern(_LayerNormPattern):
    """``normalized(x) * gamma`` with no beta, rooted at the Mul."""

    root = "Mul"
    benefit = 1

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        found = self._match_scaled(node.outputs[0])
        if isinstance(found, str):
            return MatchResult.fail(found)
        out = node.outputs[0]
        uses = out.uses()
        if len(uses) == 1 and not out.is_graph_output():
            reader = uses[0].node
            if reader.op_type == "Add" and is_onnx_domain(reader) and operands(reader) is not None:
                other = reader.inputs[1] if reader.inputs[0] is out else reader.inputs[0]
                if constant_tensor(other) is not None:
                    return MatchResult.fail(
                        "the gamma Mul feeds an Add of a constant (matched there, with beta)"
                    )
        x, gamma, eps, nodes = found
        return self._emit(node, x, gamma, None, eps, nodes, rewriter)


@dataclass(frozen=True)
class FuseLayerNorm(Pass):
    """Replace decomposed layer normalization over the last axis by LayerNormalization.

    (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * gamma + beta  ->  LayerNormalization(x, gamma, beta)
    """

    name: ClassVar[str] = "fuse-layer-norm"

    upgrade_opset: bool = option(True, "raise a default opset below 17 to 17 when every op keeps its meaning")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return run_patterns(
            model, [LayerNormPattern(self.upgrade_opset), LayerNormNoBiasPattern(self.upgrade_opset)]
        )
