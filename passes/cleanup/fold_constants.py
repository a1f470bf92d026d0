"""Constant folding: evaluate at compile time what does not depend on graph inputs.

A value is *constant* when it is an initializer that is not also a graph input
(an initializer listed as an input is only a default the caller may override),
or the output of a ``Constant`` node. The pass walks each graph in order (main
graph, then subgraphs, where outer-scope initializers count as constants) and

1. turns ``Constant`` nodes into initializers of the same name;
2. replaces ``Shape(x)`` by an int64 initializer when ``x``'s shape is fully
   static (honouring ``start``/``end``), when ``fold_shapes`` is set, and
   ``CastLike(c, x)`` of a constant ``c`` by ``c`` cast to ``x``'s known
   element type (only the type of ``x`` matters);
3. evaluates every other node whose inputs are all constant with
   ``onnx.reference.ReferenceEvaluator`` on a one-node model at the model's
   opset, and replaces its outputs by initializers named after them (so names
   are stable run after run) with the evaluated dtype and shape.

Never folded: nodes with subgraphs, nondeterministic ops (Random*, Multinomial,
Bernoulli, Dropout), ops outside the ONNX domain, and Quantize/DequantizeLinear
(folding a DequantizeLinear of a quantized weight would undo quantization).
Size guard: a node is skipped, without reading anything, when one of its
inputs or statically known outputs has more than ``size_limit`` elements, and
its result is dropped when an output turns out larger; weights are only read
when a node is really evaluated.

4. removes operations with a neutral constant operand — ``x + 0``, ``x - 0``,
   ``x * 1``, ``x / 1``, ``x and true``, ``x or false`` — when the constant
   does not broadcast ``x`` to a larger shape (the output's shape and dtype
   equal ``x``'s), by pointing the output's uses at ``x``.

When a folded value is a graph output it stays the output of a node — a new
``Constant`` node (stamped with the folded node's id as absorbed) — so graph
outputs keep their names and stay node outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.errors import first_line
from ncc.ir.ops import NONDETERMINISTIC, is_onnx_domain
from ncc.ir.rewrite import Rewriter, constant_tensor, is_constant
from ncc.ir.tensors import from_array
from ncc.passes.base import Pass, PassContext, PassResult, option

#: Folding these would undo quantization (they mark where the backend quantizes).
NEVER_FOLD = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


@dataclass(frozen=True)
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constant into initializers."""

    name: ClassVar[str] = "fold-constants"

    size_limit: int = option(1 << 20, "largest tensor (elements) read or materialized by folding", min=0)
    fold_shapes: bool = option(True, "fold Shape(x) when x has a fully static shape")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        stats = {
            "nodes folded": 0,
            "constants to initializers": 0,
            "shapes folded": 0,
            "identities removed": 0,
            "skipped (size limit)": 0,
        }
        notes: list[str] = []
        opsets = dict(model.opset_imports)
        for graph in model.graphs():
            rewriter = Rewriter(model, graph)
            for node in list(graph):
                if node.graph is not graph:
                    continue
                outcome = self._fold(rewriter, node, opsets, notes)
                if outcome:
                    stats[outcome] += 1
        stats = {k: v for k, v in stats.items() if v or k == "nodes folded"}
        changed = sum(
            stats.get(k, 0)
            for k in ("nodes folded", "constants to initializers", "shapes folded", "identities removed")
        )
        return PassResult(modified=changed > 0, stats=stats, notes=notes)

    # -- one node ----------------------------------------------------------------
    def _fold(self, rewriter: Rewriter, node: ir.Node, opsets: dict, notes: list[str]) -> str | None:
        if not is_onnx_domain(node) or node.op_type in NONDETERMINISTIC or node.op_type in NEVER_FOLD:
            return None
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return None
        if node.op_type == "Constant":
            tensor = constant_tensor(node.outputs[0])
            if tensor is None or node.outputs[0].is_graph_output():
                return None
            _replace_with_initializers(rewriter, node, [tensor])
            return "constants to initializers"
        if node.op_type == "Shape" and self.fold_shapes:
            return self._fold_shape(rewriter, node)
        if node.op_type in _NEUTRAL and len(node.inputs) == 2 and self._drop_neutral(rewriter, node):
            return "identities removed"
        if node.op_type == "CastLike":
            return self._fold_cast_like(rewriter, node)
        if not node.inputs or not all(v is None or is_constant(v) for v in node.inputs):
            return None
        tensors = [None if v is None else constant_tensor(v) for v in node.inputs]
        if any(v is not None and t is None for v, t in zip(node.inputs, tensors, strict=True)):
            return None
        if any(t is not None and _size(t.shape) > self.size_limit for t in tensors):
            return "skipped (size limit)"
        for out in node.outputs:
            if out.shape is not None and out.shape.is_static() and _size(out.shape) > self.size_limit:
                return "skipped (size limit)"
        arrays = [None if t is None else t.numpy() for t in tensors]
        if _estimated_output_size(node, arrays) > self.size_limit:
            return "skipped (size limit)"
        try:
            results = _evaluate(node, arrays, opsets, rewriter.model.ir_version)
        except Exception as err:  # the reference evaluator raises anything; folding is optional
            notes.append(
                f"could not evaluate {node.op_type} {node.name or _out_name(node)}: {first_line(err)}"
            )
            return None
        if results is None:
            return None
        for out, array in zip(node.outputs, results, strict=True):
            if array is None:
                continue
            if array.size > self.size_limit:
                return "skipped (size limit)"
            try:
                dtype = ir.DataType.from_numpy(array.dtype)
            except (TypeError, ValueError):
                return None  # a dtype the IR cannot hold
            if out.dtype is not None and dtype != out.dtype:
                notes.append(
                    f"not folding {node.op_type} {_out_name(node)}: evaluated dtype {array.dtype} != {out.dtype}"
                )
                return None
        _replace_with_initializers(rewriter, node, [None if a is None else from_array(a) for a in results])
        return "nodes folded"

    def _drop_neutral(self, rewriter: Rewriter, node: ir.Node) -> bool:
        neutral, commutative = _NEUTRAL[node.op_type]
        out = node.outputs[0]
        for const_index in (1, 0) if commutative else (1,):
            const, x = node.inputs[const_index], node.inputs[1 - const_index]
            if x is None or const is None or not is_constant(const) or is_constant(x):
                continue
            tensor = constant_tensor(const)
            if tensor is None or _size(tensor.shape) > min(self.size_limit, 1 << 16):
                continue
            if out.is_graph_output() or x.dtype is None or x.dtype != out.dtype or not _same_shape(x, out):
                continue
            if not np.all(tensor.numpy() == neutral):
                continue
            rewriter.replace_all_uses(out, x)
            node.graph.remove(node, safe=True)
            return True
        return False

    def _fold_cast_like(self, rewriter: Rewriter, node: ir.Node) -> str | None:
        """``CastLike(c, like)`` with ``c`` constant needs only ``like``'s element type, not its values
        (torch.onnx casts every scalar of a traced expression to its operand's type this way)."""
        source, like = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
        if source is None or like is None or like.dtype is None or not is_constant(source):
            return None
        tensor = constant_tensor(source)
        if tensor is None or _size(tensor.shape) > self.size_limit:
            return None
        array = tensor.numpy().astype(like.dtype.numpy())
        _replace_with_initializers(rewriter, node, [from_array(array)])
        return "nodes folded"

    def _fold_shape(self, rewriter: Rewriter, node: ir.Node) -> str | None:
        source = node.inputs[0] if node.inputs else None
        if source is None or source.shape is None or not source.shape.is_static():
            return None
        dims = [int(d) for d in source.shape.dims]
        rank = len(dims)
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", rank)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        array = np.array(dims[start:end], dtype=np.int64)
        _replace_with_initializers(rewriter, node, [from_array(array)])
        return "shapes folded"


#: op -> (neutral element of its constant operand, whether either operand may hold it)
_NEUTRAL = {
    "Add": (0, True),
    "Sub": (0, False),
    "Mul": (1, True),
    "Div": (1, False),
    "And": (True, True),
    "Or": (False, True),
}


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    """Both shapes known, of equal rank and dim by dim equal (same number or same symbol)."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return all(
        (isinstance(x, int) and x == y) or (not isinstance(x, int) and x.value is not None and x == y)
        for x, y in zip(a.shape.dims, b.shape.dims)
    )


def _replace_with_initializers(
    rewriter: Rewriter, node: ir.Node, tensors: list[ir.TensorProtocol | None]
) -> None:
    """Replace each output of ``node`` by an initializer (or a Constant node for graph outputs)."""
    replacements: list[tuple[ir.Value, ir.Value, bool]] = []
    for out, tensor in zip(node.outputs, tensors, strict=True):
        if tensor is None or (not out.uses() and not out.is_graph_output()):
            continue
        public = out.is_graph_output()
        if public:
            rewriter.set_insertion_point(node)
            const = rewriter.create(
                "Constant", [], [ir.AttrTensor("value", tensor)], name=node.name, absorbed=[node]
            )
            new = const.outputs[0]
        else:
            new = ir.Value(const_value=tensor)
        new.type = ir.TensorType(tensor.dtype)
        new.shape = ir.Shape(tensor.shape)
        replacements.append((out, new, public))
    for out, new, public in replacements:
        rewriter.replace_value(out, new)
        if not public:
            rewriter.graph.register_initializer(new)
    rewriter.graph.remove(node, safe=True)


def _evaluate(node: ir.Node, arrays: list[np.ndarray | None], opsets: dict, ir_version: int) -> list | None:
    """Run ``node`` alone on ``arrays`` with the ONNX reference evaluator."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    inputs, feeds = [], {}
    for name, array in zip(proto.input, arrays, strict=True):
        if not name or name in feeds:
            continue
        feeds[name] = array
        dtype = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        inputs.append(onnx.helper.make_tensor_value_info(name, dtype, array.shape))
    outputs = [onnx.helper.make_empty_tensor_value_info(n) for n in proto.output if n]
    graph = onnx.helper.make_graph([proto], "fold", inputs, outputs)
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
        ir_version=ir_version,
    )
    results = iter(ReferenceEvaluator(model).run(None, feeds))
    out: list[np.ndarray | None] = []
    for name in proto.output:
        if not name:
            out.append(None)
            continue
        array = next(results)
        if not isinstance(array, np.ndarray):
            if np.isscalar(array):
                array = np.asarray(array)
            else:
                return None  # sequences, optionals: not tensors
        out.append(array)
    return out


_BROADCASTING = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Mod",
        "Max",
        "Min",
        "Sum",
        "Mean",
        "Where",
        "And",
        "Or",
        "Xor",
        "Equal",
        "Less",
        "Greater",
        "LessOrEqual",
        "GreaterOrEqual",
        "BitShift",
        "PRelu",
    }
)


def _estimated_output_size(node: ir.Node, arrays: list[np.ndarray | None]) -> int:
    """An upper estimate of the largest output, computed before evaluating (0 when unknown).

    Catches the ops whose output can be far larger than their inputs, so that a
    ``ConstantOfShape([100000, 100000])`` is never materialized.
    """
    op = node.op_type
    present = [a for a in arrays if a is not None]
    try:
        if op == "ConstantOfShape" and present:
            return _size(present[0].tolist())
        if op == "Expand" and len(present) == 2:
            return _size(np.broadcast_shapes(present[0].shape, tuple(int(d) for d in present[1].tolist())))
        if op == "Tile" and len(present) == 2:
            return _size(np.array(present[0].shape) * present[1].astype(np.int64))
        if op == "Range" and len(present) == 3:
            start, limit, delta = (float(a) for a in present)
            return max(int(np.ceil((limit - start) / delta)), 0) if delta else 0
        if op in _BROADCASTING:
            return _size(np.broadcast_shapes(*(a.shape for a in present)))
        if op in ("MatMul", "Gemm") and len(present) >= 2:
            a, b = present[0].shape, present[1].shape
            return _size(a[:-1]) * (b[-1] if b else 1) * max(_size(b[:-2]), 1)
    except (ValueError, TypeError, OverflowError):
        return 0  # malformed: let the evaluator report it
    return 0


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _out_name(node: ir.Node) -> str:
    return node.outputs[0].name if node.outputs else ""
