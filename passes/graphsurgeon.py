"""Write a pass as an ONNX GraphSurgeon function.

::

    @graphsurgeon_pass("remove-identity")
    def remove_identity(graph: onnx_graphsurgeon.Graph) -> None:
        for node in graph.nodes:
            if node.op == "Identity":
                ...

The decorator returns a registered :class:`~ncc.passes.base.Pass` class. Its
``run`` serializes the IR to an ONNX proto, imports it into GraphSurgeon,
calls the function, cleans up and topologically sorts, exports, and copies the
result back into the model in place. GraphSurgeon keeps node names but not
node metadata, so node ids are carried by name: unnamed or duplicate-named
nodes get a temporary unique name for the trip, nodes that survive keep
their id (and fused ids), and new nodes get fresh ids.

This is an escape hatch for existing GraphSurgeon scripts: it round-trips the
whole model through protobuf (weights included), so native passes are faster.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir
from ncc.ir import ids
from ncc.passes.base import Pass, PassContext, PassResult

_TEMP_PREFIX = "__ncc_gs_node_"


def graphsurgeon_pass(name: str, doc: str | None = None) -> Callable[[Callable[[Any], None]], type[Pass]]:
    """Turn ``def f(graph: onnx_graphsurgeon.Graph) -> None`` into a registered pass named ``name``."""

    def decorate(fn: Callable[[Any], None]) -> type[Pass]:
        def run(self: Pass, model: ir.Model, ctx: PassContext) -> PassResult:
            return run_graphsurgeon(model, fn)

        words = re.split(r"[^0-9a-zA-Z]+", name)
        class_name = "".join(word.capitalize() for word in words if word) or "GraphSurgeonPass"
        namespace = {
            "name": name,
            "__doc__": doc or fn.__doc__ or f"GraphSurgeon function {fn.__qualname__}.",
            "__module__": fn.__module__,
            "__qualname__": class_name,
            "run": run,
            "function": staticmethod(fn),
        }
        cls = type(class_name, (Pass,), namespace)  # registers (Pass.__init_subclass__)
        return dataclass(frozen=True)(cls)

    return decorate


def run_graphsurgeon(model: ir.Model, fn: Callable[[Any], None]) -> PassResult:
    """Apply the GraphSurgeon function ``fn`` to ``model`` in place."""
    import onnx_graphsurgeon as gs
    from ncc.ir.printer import fingerprint

    before = fingerprint(model)
    proto = ir.serde.serialize_model(model)
    carried = _name_nodes(proto.graph, model)
    graph = gs.import_onnx(proto)
    fn(graph)
    graph.cleanup().toposort()
    new = ir.serde.deserialize_model(gs.export_onnx(graph))
    _copy_into(model, new, carried)
    return PassResult(modified=fingerprint(model) != before)


def _proto_nodes(graph_proto: Any):
    """Nodes of a GraphProto and of its subgraph attributes, in order (as onnx-ir walks them)."""
    for node in graph_proto.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _proto_nodes(attr.g)
            for g in attr.graphs:
                yield from _proto_nodes(g)


def _name_nodes(graph_proto: Any, model: ir.Model) -> dict[str, tuple[str, dict[str, str]]]:
    """Give unnamed/duplicate-named proto nodes a temporary unique name; map name -> (original name, metadata)."""
    ir_nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    proto_nodes = list(_proto_nodes(graph_proto))
    assert len(ir_nodes) == len(proto_nodes), "serialized node order differs from the IR"
    counts: dict[str, int] = {}
    for node in proto_nodes:
        counts[node.name] = counts.get(node.name, 0) + 1
    carried: dict[str, tuple[str, dict[str, str]]] = {}
    for i, (proto_node, node) in enumerate(zip(proto_nodes, ir_nodes)):
        original = proto_node.name
        if not original or counts[original] > 1:
            proto_node.name = f"{_TEMP_PREFIX}{i}"
        carried[proto_node.name] = (original, dict(node.metadata_props))
    return carried


def _copy_into(model: ir.Model, new: ir.Model, carried: dict[str, tuple[str, dict[str, str]]]) -> None:
    old_graph = model.graph
    new_graph = new.graph
    new_graph.metadata_props.update(old_graph.metadata_props)
    if old_graph.doc_string and not new_graph.doc_string:
        new_graph.doc_string = old_graph.doc_string
    model.graph = new_graph
    model.functions.clear()
    model.functions.update(new.functions)
    seen: set[str] = set()
    fresh: list[ir.Node] = []
    for node in ir.traversal.RecursiveGraphIterator(new_graph):
        name = node.name or ""
        if name in carried:
            original, metadata = carried[name]
            if name.startswith(_TEMP_PREFIX):
                node.name = original or None
            node_id = metadata.get(ids.ID_KEY)
            if node_id is not None and node_id not in seen:  # a copied node keeps no id twice
                seen.add(node_id)
                node.metadata_props.update(metadata)
                continue
            node.metadata_props.update(
                {k: v for k, v in metadata.items() if k not in (ids.ID_KEY, ids.FUSED_KEY)}
            )
        elif name.startswith(_TEMP_PREFIX):
            node.name = None
        fresh.append(node)
    for node in fresh:
        if ids.ID_KEY not in node.metadata_props:
            ids.stamp(model, node)
