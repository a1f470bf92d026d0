"""Stable topological sort of every graph, subgraph and function body.

Kahn's algorithm where, among the nodes whose inputs are all available, the
one that came first in the original order is placed next. A graph that is
already sorted is left exactly as it is, and two runs give the same order.

A node depends on the producers (in the same graph) of its inputs and of every
outer-scope value its subgraphs read, so an ``If`` is placed after whatever
its branches capture. A cycle is an error that names a node on it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from ncc.errors import NccError
from ncc.passes.base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class TopologicalSort(Pass):
    """Order every graph topologically, keeping the original order where it is free."""

    name: ClassVar[str] = "toposort"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        moved = 0
        graphs = [*model.graphs()]
        for function in model.functions.values():
            graphs.extend([function.graph, *function.graph.subgraphs()])
        for graph in graphs:
            moved += sort_graph(graph)
        return PassResult(modified=moved > 0, stats={"nodes moved": moved})


def sort_graph(graph: ir.Graph) -> int:
    """Sort ``graph`` (not its subgraphs) in place; return how many nodes changed position."""
    order = list(graph)
    index = {node: i for i, node in enumerate(order)}
    preds: list[set[int]] = [set() for _ in order]
    succs: list[list[int]] = [[] for _ in order]
    for i, node in enumerate(order):
        for value in _reads(node):
            producer = value.producer()
            j = index.get(producer) if producer is not None else None
            if j is not None and j != i and j not in preds[i]:
                preds[i].add(j)
                succs[j].append(i)
            elif j == i:
                raise NccError(f"toposort: node {_describe(node)} reads its own output; the graph has a cycle.")
    pending = [len(p) for p in preds]
    ready = [i for i, n in enumerate(pending) if n == 0]
    heapq.heapify(ready)
    result: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        result.append(i)
        for k in succs[i]:
            pending[k] -= 1
            if pending[k] == 0:
                heapq.heappush(ready, k)
    if len(result) != len(order):
        stuck = min(i for i, n in enumerate(pending) if n > 0)
        raise NccError(f"toposort: the graph {graph.name or ''!s} has a cycle through node {_describe(order[stuck])}.")
    moved = sum(1 for pos, i in enumerate(result) if pos != i)
    if moved:
        graph.remove(order)  # unsafe remove keeps the nodes' inputs and uses
        graph.extend(order[i] for i in result)
    return moved


def _reads(node: ir.Node):
    """Values ``node`` reads: its inputs and the outer-scope values its subgraphs read."""
    for value in node.inputs:
        if value is not None:
            yield value
    for attr in node.attributes.values():
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.GRAPH:
            subs = [attr.as_graph()]
        elif attr.type == ir.AttributeType.GRAPHS:
            subs = list(attr.as_graphs())
        else:
            continue
        for sub in subs:
            for inner in ir.traversal.RecursiveGraphIterator(sub):
                for value in inner.inputs:
                    if value is not None:
                        yield value


def _describe(node: ir.Node) -> str:
    out = node.outputs[0].name if node.outputs else ""
    return f"{node.op_type} {node.name or ''!s} (output {out!r})".replace("  ", " ")
