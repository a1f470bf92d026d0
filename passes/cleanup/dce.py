"""Dead code elimination.

A node is *live* when one of its outputs is a graph output or is used by a
live node — where a node that owns subgraphs uses every value its (live)
subgraph nodes read from outer scopes. Liveness is computed by a worklist from
the graph outputs backwards along producer links, so it does not depend on the
node order; the subgraphs of a live node are swept the same way (their own
outputs are the roots) before their outer-scope reads are marked live. ONNX
operators are free of side effects, so every node that is not live is removed.

Then initializers nobody uses are removed (an initializer that is also a graph
input or output is part of the signature and stays), in subgraphs too; function
bodies are swept from their outputs; and functions no node of the model (or of
a used function) calls are removed. Graph inputs and outputs never change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
from ncc.passes.base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove nodes, initializers and functions that no graph output depends on."""

    name: ClassVar[str] = "dce"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        counts = {"nodes removed": 0, "initializers removed": 0, "functions removed": 0}
        _sweep(model.graph, counts)
        for function in model.functions.values():
            _sweep(function, counts)
        used = _used_functions(model)
        for key in [k for k in model.functions if k not in used]:
            del model.functions[key]
            counts["functions removed"] += 1
        return PassResult(modified=any(counts.values()), stats=counts)


def _subgraphs(node: ir.Node):
    for attr in node.attributes.values():
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.as_graph()
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.as_graphs()


def _sweep(graph: ir.Graph | ir.Function, counts: dict[str, int]) -> set[ir.Value]:
    """Remove dead code from ``graph``; return every value its live nodes read (incl. outer-scope ones)."""
    if isinstance(graph, ir.Function):
        graph = graph.graph
    nodes = set(graph)
    live: set[ir.Node] = set()
    read: set[ir.Value] = set()
    work: list[ir.Value] = list(graph.outputs)
    while work:
        value = work.pop()
        read.add(value)
        node = value.producer()
        if node is None or node in live or node not in nodes:
            continue
        live.add(node)
        work.extend(v for v in node.inputs if v is not None)
        for sub in _subgraphs(node):
            work.extend(_sweep(sub, counts))
    dead = [n for n in graph if n not in live]
    if dead:
        # Dead subgraphs may read values of other dead nodes: detach them first so
        # the safe removal below sees no outside users.
        for node in dead:
            for sub in _subgraphs(node):
                for inner in ir.traversal.RecursiveGraphIterator(sub):
                    for i in range(len(inner.inputs)):
                        inner.replace_input_with(i, None)
        graph.remove(dead, safe=True)
        counts["nodes removed"] += len(dead)
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]
            counts["initializers removed"] += 1
    return read


def _used_functions(model: ir.Model) -> set[ir.OperatorIdentifier]:
    used: set[ir.OperatorIdentifier] = set()
    work = [model.graph]
    while work:
        for node in ir.traversal.RecursiveGraphIterator(work.pop()):
            key = node.op_identifier()
            if key in model.functions and key not in used:
                used.add(key)
                work.append(model.functions[key])
    return used
