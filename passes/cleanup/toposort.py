"""Stable topological sort of every graph, subgraph and function body.

Kahn's algorithm where, among the nodes whose inputs are all available, the
one that came first in the original order is placed next. A graph that is
already sorted is left exactly as it is, and two runs give the same order.

A node depends on the producers (in the same graph) of its inputs and of every
outer-scope value its subgraphs read, so an ``If`` is placed after whatever
its branches capture. A cycle is an error that names a node on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
from ncc.errors import NccError, VerificationError
from ncc.ir.analysis import topological_order
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
    before = list(graph)
    try:
        after = topological_order(graph)
    except VerificationError as err:
        raise NccError(f"toposort: {str(err).splitlines()[0]}") from None
    moved = sum(1 for a, b in zip(before, after) if a is not b)
    if moved:
        graph.remove(before)  # unsafe remove keeps the nodes' inputs and uses
        graph.extend(after)
    return moved
