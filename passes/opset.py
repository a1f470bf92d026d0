"""Raising a model's default opset without changing what any node means.

A pass that needs a newer standard op (LayerNormalization at 17, blocked int4
DequantizeLinear at 21) raises the model's ``ai.onnx`` import, but only when
every standard node keeps its meaning at the new version. For each node, every
schema version between the model's opset and the target is checked against a
table of changes known to keep existing nodes' meaning (new types, new
attributes or inputs whose defaults are the old behaviour). One change is
adapted instead: at opset 18 the Reduce ops (except ReduceSum, moved at 13)
take ``axes`` as an input rather than an attribute, so the attribute becomes a
constant input. Anything else (RoiAlign 16, DFT 20, GridSample 20,
GroupNormalization 21, ...) blocks the upgrade and is named.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from ncc.ir.ops import is_onnx_domain, onnx_opset, set_onnx_opset
from ncc.ir.rewrite import Rewriter

#: since_version -> op types whose change at that version keeps existing nodes' meaning.
_SAFE: dict[int, frozenset[str]] = {
    14: frozenset(
        {
            "Add",
            "Sub",
            "Mul",
            "Div",
            "Relu",
            "Identity",
            "CumSum",
            "Reshape",
            "BatchNormalization",
            "GRU",
            "LSTM",
            "RNN",
        }
    ),
    15: frozenset({"Pow", "Shape", "BatchNormalization"}),
    16: frozenset(
        {
            "Identity",
            "If",
            "Loop",
            "Scan",
            "LeakyRelu",
            "PRelu",
            "GreaterOrEqual",
            "LessOrEqual",
            "Where",
            "ScatterElements",
            "ScatterND",
        }
    ),
    18: frozenset(
        {
            "Pad",
            "Resize",
            "ScatterElements",
            "ScatterND",
            "Split",
            "LpPool",
            "OptionalGetElement",
            "OptionalHasElement",
        }
    ),
    19: frozenset(
        {
            "AveragePool",
            "Cast",
            "CastLike",
            "Constant",
            "DequantizeLinear",
            "QuantizeLinear",
            "Equal",
            "Identity",
            "If",
            "Loop",
            "Scan",
            "Pad",
            "Reshape",
            "Resize",
            "Shape",
            "Size",
        }
    ),
    20: frozenset({"ConstantOfShape", "IsInf", "IsNaN", "ReduceMax", "ReduceMin"}),
    21: frozenset(
        {
            "Cast",
            "CastLike",
            "Constant",
            "ConstantOfShape",
            "DequantizeLinear",
            "QuantizeLinear",
            "Flatten",
            "Identity",
            "If",
            "Loop",
            "Scan",
            "Pad",
            "QLinearMatMul",
            "Reshape",
            "Shape",
            "Size",
            "Squeeze",
            "Transpose",
            "Unsqueeze",
        }
    ),
}

#: Reduce ops whose ``axes`` attribute became an input at opset 18.
_AXES_TO_INPUT_18 = frozenset(
    {
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSumSquare",
    }
)


def _changes(op_type: str, current: int, target: int) -> list[int] | None:
    """Versions in ``(current, target]`` at which ``op_type``'s schema changed; None if it has no schema."""
    versions = set()
    try:
        for version in range(current + 1, target + 1):
            since = onnx.defs.get_schema(op_type, version, "").since_version
            if since > current:
                versions.add(since)
        onnx.defs.get_schema(op_type, current, "")
    except onnx.defs.SchemaError:
        return None
    return sorted(versions)


def upgrade_blockers(model: ir.Model, target: int) -> list[str]:
    """Standard op types in ``model`` whose meaning may change when its default opset is raised to ``target``."""
    current = onnx_opset(model)
    blockers: set[str] = set()
    seen: set[str] = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if not is_onnx_domain(node) or node.op_type in seen:
            continue
        seen.add(node.op_type)
        changes = _changes(node.op_type, current, target)
        if changes is None:
            blockers.add(node.op_type)
            continue
        for version in changes:
            if node.op_type in _SAFE.get(version, ()):
                continue
            if version == 18 and node.op_type in _AXES_TO_INPUT_18:
                continue
            blockers.add(node.op_type)
    return sorted(blockers)


def raise_opset(model: ir.Model, target: int) -> list[str]:
    """Raise ``model``'s default opset to ``target`` if that is safe; returns the blockers (empty on success).

    Does nothing when the model is already at ``target`` or above.
    """
    current = onnx_opset(model)
    if current >= target:
        return []
    blockers = upgrade_blockers(model, target)
    if blockers:
        return blockers
    if current < 18 <= target:
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if is_onnx_domain(node) and node.op_type in _AXES_TO_INPUT_18 and "axes" in node.attributes:
                axes = np.asarray(node.attributes.pop("axes").as_ints(), np.int64)
                value = Rewriter(model, node.graph).constant(axes, f"{node.name or node.op_type}_axes")
                _set_input(node, 1, value)
    set_onnx_opset(model, target)
    model.ir_version = max(model.ir_version or 0, _IR_FOR_OPSET.get(target, 10))
    return []


#: The IR version released with each opset (a model must declare at least this to use it).
_IR_FOR_OPSET = {17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10}


def _set_input(node: ir.Node, index: int, value: ir.Value) -> None:
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
