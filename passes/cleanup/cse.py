"""Common subexpression elimination.

Two nodes of one graph compute the same values when they have the same domain,
op type, overload, number of outputs, the *same input values* (by identity,
after earlier merges) and equal attributes; the later one is removed and its
outputs replaced by the earlier one's. Nodes are visited in graph order, so a
merge exposes the merges downstream of it in the same sweep. Each subgraph is
processed on its own (its nodes may read outer values, which is fine: inputs
are compared by identity).

Identical constants are merged first, so that nodes reading two copies of a
weight become identical too: initializers (not graph inputs — those are
overridable defaults) with the same dtype, shape and bytes. Only initializers
sharing dtype and shape with another one are ever read, only those of at most
``max_constant_bytes`` bytes, and they are compared by SHA-256 digest and then
byte for byte (so a hash collision cannot merge different weights). Tensor
attributes (``Constant`` nodes) are compared the same way.

Never merged: nondeterministic ops (two RandomNormal draws differ; Dropout,
which may be training), nodes with subgraphs, nodes with a tensor attribute
over the byte limit. Graph outputs keep their names: when the removed node produced a graph output, the kept value is
renamed to it, or — if the kept value is itself a graph input/output or an
initializer — an ``Identity`` is inserted (stamped as absorbing the removed node).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from ncc.ir.ops import NONDETERMINISTIC, is_onnx_domain
from ncc.ir.rewrite import Rewriter
from ncc.passes.base import Pass, PassContext, PassResult, option


class _Skip(Exception):
    """A node that must not be merged."""


@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Merge identical nodes and identical constants."""

    name: ClassVar[str] = "cse"

    max_constant_bytes: int = option(
        1 << 20, "largest constant (bytes) read to compare with another one", min=0
    )

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        stats = {"nodes merged": 0, "constants merged": 0}
        for graph in list(model.graphs()):
            stats["constants merged"] += self._merge_initializers(graph)
            stats["nodes merged"] += self._merge_nodes(model, graph)
        for function in model.functions.values():
            stats["nodes merged"] += self._merge_nodes(model, function.graph)
        return PassResult(modified=any(stats.values()), stats=stats)

    # -- constants -------------------------------------------------------------
    def _merge_initializers(self, graph: ir.Graph) -> int:
        by_type: dict[tuple, list[ir.Value]] = {}
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or value.is_graph_input() or value.is_graph_output():
                continue
            if _nbytes(tensor) > self.max_constant_bytes:
                continue
            by_type.setdefault((tensor.dtype, tuple(tensor.shape)), []).append(value)
        merged = 0
        for group in by_type.values():
            if len(group) < 2:
                continue  # a constant with no same-shaped peer is never read
            kept: dict[str, list[ir.Value]] = {}
            for value in group:
                data = value.const_value.tobytes()
                digest = hashlib.sha256(data).hexdigest()
                target = next((k for k in kept.get(digest, ()) if k.const_value.tobytes() == data), None)
                if target is None:
                    kept.setdefault(digest, []).append(value)
                    continue
                value.replace_all_uses_with(target)
                del graph.initializers[value.name]
                merged += 1
        return merged

    # -- nodes -------------------------------------------------------------------
    def _merge_nodes(self, model: ir.Model, graph: ir.Graph) -> int:
        seen: dict[tuple, ir.Node] = {}
        rewriter = Rewriter(model, graph)
        merged = 0
        for node in list(graph):
            if is_onnx_domain(node) and node.op_type in NONDETERMINISTIC:
                continue
            try:
                key = (
                    node.domain,
                    node.op_type,
                    node.overload,
                    len(node.outputs),
                    tuple(id(v) if v is not None else None for v in node.inputs),
                    self._attributes_key(node),
                )
            except _Skip:
                continue
            first = seen.setdefault(key, node)
            if first is node:
                continue
            rewriter.set_insertion_point(node)
            for old, new in zip(node.outputs, first.outputs, strict=True):
                rewriter.replace_all_uses(old, new)  # a graph output keeps its name
            graph.remove(node, safe=True)
            merged += 1
        return merged

    def _attributes_key(self, node: ir.Node) -> tuple:
        items = []
        for name in sorted(node.attributes):
            attr = node.attributes[name]
            if attr.is_ref():
                items.append((name, "ref", attr.ref_attr_name))
                continue
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                raise _Skip
            items.append((name, attr.type, self._attribute_value_key(attr)))
        return tuple(items)

    def _attribute_value_key(self, attr: ir.Attr) -> Any:
        value = attr.value
        if attr.type == ir.AttributeType.TENSOR:
            if _nbytes(value) > self.max_constant_bytes:
                raise _Skip
            data = value.tobytes()
            return (value.dtype, tuple(value.shape), hashlib.sha256(data).hexdigest(), data)
        if attr.type == ir.AttributeType.TENSORS:
            if sum(_nbytes(t) for t in value) > self.max_constant_bytes:
                raise _Skip
            return tuple((t.dtype, tuple(t.shape), t.tobytes()) for t in value)
        if attr.type in (ir.AttributeType.FLOAT, ir.AttributeType.FLOATS):
            # Compare floats by bit pattern so NaN equals NaN and -0.0 differs from 0.0.
            return np.asarray(value, dtype=np.float32).tobytes()
        if isinstance(value, (list, tuple)):
            return tuple(value)
        if attr.type in (ir.AttributeType.INT, ir.AttributeType.STRING):
            return value
        raise _Skip  # sparse tensors, type protos: not worth comparing


def _nbytes(tensor: ir.TensorProtocol) -> int:
    try:
        return tensor.nbytes
    except Exception:  # string tensors
        return 1 << 62
