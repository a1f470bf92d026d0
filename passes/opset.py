"""Raising a model's default opset without changing what any node means.

A pass that needs a newer standard op (QuantizeLinear at 10, per-channel
DequantizeLinear at 13, LayerNormalization at 17, blocked int4 DequantizeLinear
at 21) raises the model's ``ai.onnx`` import, but only when every standard node
keeps its meaning at the new version. For each node, every schema version
between the model's opset and the target is checked against a table of changes
known to keep existing nodes' meaning (new types, new attributes or inputs
whose defaults are the old behaviour; from 8 to 13 the changes onnx's own
version converter registers as compatible). Two kinds of change are adapted or
checked node by node instead:

- an attribute that became an input (``axes`` of ReduceSum, Squeeze and
  Unsqueeze and ``split`` of Split at 13, ``axes`` of the other Reduce ops at
  18) becomes a constant input;
- Softmax, LogSoftmax and Hardmax work on one axis from 13 on, where they
  flattened the input into 2-D at ``axis`` before: the same only when ``axis``
  is the last axis, so another axis blocks the upgrade.

Anything else (Slice and Upsample 10, Clip and Pad 11, Dropout 12, RoiAlign 16,
DFT 20, GridSample 20, GroupNormalization 21, ...) blocks the upgrade and is named.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
from ncc.ir.ops import is_onnx_domain, onnx_opset, set_onnx_opset
from ncc.ir.rewrite import Rewriter

#: since_version -> op types whose change at that version keeps existing nodes' meaning.
_SAFE: dict[int, frozenset[str]] = {
    8: frozenset({"Max", "Min", "Mean", "Sum", "MaxPool"}),
    9: frozenset({"Flatten", "Constant", "MatMul", "Gemm", "PRelu", "Greater", "Less", "Cast"}),
    10: frozenset({"AveragePool", "MaxPool", "Dropout"}),
    11: frozenset(
        {
            "ArgMax",
            "ArgMin",
            "AveragePool",
            "Concat",
            "Constant",
            "Compress",
            "Conv",
            "ConvTranspose",
            "DepthToSpace",
            "Equal",
            "Flatten",
            "Gather",
            "Gemm",
            "Hardmax",
            "If",
            "LogSoftmax",
            "Loop",
            "LpPool",
            "MaxPool",
            "MaxUnpool",
            "NonMaxSuppression",
            "OneHot",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSum",
            "ReduceSumSquare",
            "Scan",
            "Slice",
            "Softmax",
            "Split",
            "Squeeze",
            "TopK",
            "Unsqueeze",
        }
    ),
    12: frozenset(
        {
            "ArgMax",
            "ArgMin",
            "Clip",
            "Constant",
            "GatherND",
            "Max",
            "MaxPool",
            "Min",
            "Pow",
            "ReduceMax",
            "ReduceMin",
        }
    ),
    13: frozenset(
        {
            "Abs",
            "Add",
            "ArgMax",
            "ArgMin",
            "Cast",
            "Ceil",
            "Clip",
            "Concat",
            "Constant",
            "DepthToSpace",
            "DequantizeLinear",
            "Div",
            "Dropout",
            "Equal",
            "Erf",
            "Exp",
            "Expand",
            "Flatten",
            "Floor",
            "Gather",
            "GatherElements",
            "GatherND",
            "Gemm",
            "Greater",
            "Identity",
            "If",
            "IsNaN",
            "Less",
            "Log",
            "Loop",
            "LRN",
            "MatMul",
            "Max",
            "Mean",
            "MeanVarianceNormalization",
            "Min",
            "Mod",
            "Mul",
            "Neg",
            "NonZero",
            "Pad",
            "Pow",
            "QuantizeLinear",
            "Reciprocal",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSumSquare",
            "Relu",
            "Reshape",
            "Resize",
            "ScatterElements",
            "ScatterND",
            "Shape",
            "Sigmoid",
            "Sign",
            "Size",
            "Slice",
            "SpaceToDepth",
            "Sqrt",
            "Sub",
            "Sum",
            "Tanh",
            "Tile",
            "Transpose",
        }
    ),
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

#: since_version -> {op type: the attribute that became its input 1 at that version}.
_ATTRIBUTE_TO_INPUT: dict[int, dict[str, str]] = {
    13: {"ReduceSum": "axes", "Squeeze": "axes", "Unsqueeze": "axes", "Split": "split"},
    18: {
        op: "axes"
        for op in (
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSumSquare",
        )
    },
}


def _on_last_axis(node: ir.Node) -> bool:
    """Whether a Softmax-like node (``axis`` default 1 before opset 13) works on its input's last axis."""
    x = node.inputs[0] if node.inputs else None
    axis = node.attributes.get_int("axis", 1)
    if axis == -1:
        return True
    rank = len(x.shape) if x is not None and x.shape is not None else None
    return rank is not None and axis % rank == rank - 1


#: since_version -> {op type: whether a node keeps its meaning across that version's change}.
_SAFE_IF: dict[int, dict[str, Callable[[ir.Node], bool]]] = {
    13: {"Softmax": _on_last_axis, "LogSoftmax": _on_last_axis, "Hardmax": _on_last_axis},
}


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
    changes: dict[str, list[int] | None] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if not is_onnx_domain(node) or node.op_type in blockers:
            continue
        if node.op_type not in changes:
            changes[node.op_type] = _changes(node.op_type, current, target)
        versions = changes[node.op_type]
        if versions is None:
            blockers.add(node.op_type)
            continue
        for version in versions:
            if node.op_type in _SAFE.get(version, ()) or node.op_type in _ATTRIBUTE_TO_INPUT.get(version, {}):
                continue
            condition = _SAFE_IF.get(version, {}).get(node.op_type)
            if condition is None or not condition(node):
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
    for version, moved in _ATTRIBUTE_TO_INPUT.items():
        if not current < version <= target:
            continue
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            attribute = moved.get(node.op_type) if is_onnx_domain(node) else None
            if attribute is not None and attribute in node.attributes:
                array = np.asarray(node.attributes.pop(attribute).as_ints(), np.int64)
                value = Rewriter(model, node.graph).constant(
                    array, f"{node.name or node.op_type}_{attribute}"
                )
                _set_input(node, 1, value)
    set_onnx_opset(model, target)
    model.ir_version = max(model.ir_version or 0, _IR_FOR_OPSET.get(target, 10))
    return []


#: The IR version released with each opset (a model must declare at least this to use it).
_IR_FOR_OPSET = {10: 5, 11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10}


def _set_input(node: ir.Node, index: int, value: ir.Value) -> None:
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
