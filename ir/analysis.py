"""Graph analyses over one IR graph, most of them networkx views.

Edges run from a value's producer to each node that reads it, including the
implicit edges of subgraphs: a node whose If/Loop body reads a value of this
graph depends on that value's producer. networkx is imported inside the
functions that need it, so ``import ncc.ir`` stays cheap.

- :func:`to_networkx` — a ``MultiDiGraph`` keyed by node id, for ad-hoc queries
- :func:`topological_order` — a stable topological order (Kahn, original index first)
- :func:`find_cycles` — one cycle per strongly connected component (the verifier names them)
- :func:`dominators` — immediate dominators from a virtual entry
- :func:`partition` — maximal connected groups of nodes satisfying a predicate
- :func:`subgraph_matches` — where a pattern graph occurs, matching op types
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import onnx_ir as ir
from ncc.errors import VerificationError
from ncc.ir.ids import node_id

if TYPE_CHECKING:
    import networkx as nx

__all__ = [
    "to_networkx",
    "topological_order",
    "find_cycles",
    "dominators",
    "partition",
    "subgraph_matches",
    "dependencies",
]

GraphLike = ir.Graph | ir.Function


def dependencies(graph: GraphLike) -> tuple[list[ir.Node], list[list[int]]]:
    """The graph's nodes and, per node, the positions of the nodes it depends on (deduplicated).

    A dependency is an input produced by a node of ``graph``, or a value of
    ``graph`` read anywhere inside the node's subgraphs.
    """
    nodes = list(graph)
    position = {node: k for k, node in enumerate(nodes)}
    preds: list[list[int]] = []
    for node in nodes:
        found: dict[int, None] = {}
        for v in _reads(node):
            producer = v.producer()
            if producer is not None and (k := position.get(producer)) is not None:
                found[k] = None
        preds.append(list(found))
    return nodes, preds


def _reads(node: ir.Node) -> Iterator[ir.Value]:
    """Inputs of ``node`` and of every node inside its subgraphs."""
    for v in node.inputs:
        if v is not None:
            yield v
    for attr in node.attributes.values():
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.GRAPH:
            subgraphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            subgraphs = list(attr.value)
        else:
            continue
        for sub in subgraphs:
            for inner in sub:
                yield from _reads(inner)


def to_networkx(graph: GraphLike, *, sources: bool = False) -> nx.MultiDiGraph:
    """A ``MultiDiGraph`` view of ``graph``.

    Nodes are keyed by ``ncc.id`` (int) with attributes ``op_type``, ``domain``,
    ``name``, ``index`` (position in the graph) and ``node`` (the IR node).
    One edge per read: ``value`` (name), ``input`` (index at the reader, None
    for a read inside a subgraph) and ``output`` (index at the producer).
    With ``sources=True`` graph inputs and initializers are nodes too, keyed
    by value name, with ``kind`` "input" or "initializer".
    """
    import networkx as nx

    g = nx.MultiDiGraph(name=graph.name)
    keys: dict[ir.Node, int] = {}
    for k, node in enumerate(graph):
        key = node_id(node)
        if key is None or key in g:
            raise VerificationError(
                f"{node.op_type} node {node.name!r} has {'no' if key is None else 'a duplicate'} ncc.id; "
                "run ncc.ir.ids.assign_ids before taking a networkx view."
            )
        keys[node] = key
        g.add_node(key, op_type=node.op_type, domain=node.domain, name=node.name, index=k, node=node)
    source_values: dict[ir.Value, str] = {}
    if sources:
        for v in graph.inputs:
            g.add_node(v.name, kind="input", value=v)
            source_values[v] = v.name
        if isinstance(graph, ir.Graph):
            for v in graph.initializers.values():
                if v not in source_values:
                    g.add_node(v.name, kind="initializer", value=v)
                    source_values[v] = v.name
    for node, key in keys.items():
        direct = {id(v) for v in node.inputs if v is not None}
        for index, v in enumerate(node.inputs):
            if v is not None:
                _edge(g, keys, source_values, v, key, index)
        seen: set[int] = set()
        for v in _reads(node):
            if id(v) in direct or id(v) in seen:
                continue
            seen.add(id(v))
            _edge(g, keys, source_values, v, key, None)
    return g


def _edge(g, keys, source_values, v: ir.Value, key: int, index: int | None) -> None:
    producer = v.producer()
    if producer is not None and producer in keys:
        g.add_edge(keys[producer], key, value=v.name, input=index, output=v.index())
    elif v in source_values:
        g.add_edge(source_values[v], key, value=v.name, input=index, output=None)


def topological_order(graph: GraphLike) -> list[ir.Node]:
    """The nodes in a topological order that keeps the original order where it is valid.

    Kahn's algorithm taking the ready node of smallest original index first,
    so an already sorted graph comes back unchanged. Raises
    :class:`VerificationError` naming a cycle if there is one.
    """
    nodes, preds = dependencies(graph)
    succs: list[list[int]] = [[] for _ in nodes]
    waiting = [len(p) for p in preds]
    for k, ps in enumerate(preds):
        for p in ps:
            succs[p].append(k)
    ready = [k for k, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order: list[ir.Node] = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for s in succs[k]:
            waiting[s] -= 1
            if waiting[s] == 0:
                heapq.heappush(ready, s)
    if len(order) != len(nodes):
        cycle = find_cycles(graph)[0]
        ring = " -> ".join(f"{n.op_type} {n.name!r}" for n in [*cycle, cycle[0]])
        raise VerificationError(f"graph {graph.name!r} has no topological order: it has a cycle {ring}.")
    return order


def find_cycles(graph: GraphLike) -> list[list[ir.Node]]:
    """One cycle per strongly connected component with a cycle, in cycle order.

    Each cycle starts at its earliest node in graph order; cycles are ordered
    by that node. Empty when the graph is acyclic.
    """
    import networkx as nx

    nodes, preds = dependencies(graph)
    g = nx.DiGraph()
    g.add_nodes_from(range(len(nodes)))
    g.add_edges_from((p, k) for k, ps in enumerate(preds) for p in ps)
    cycles = []
    for component in nx.strongly_connected_components(g):
        start = min(component)
        if len(component) == 1 and not g.has_edge(start, start):
            continue
        cycles.append(_cycle_through(g.subgraph(component), start))
    cycles.sort(key=lambda c: c[0])
    return [[nodes[k] for k in cycle] for cycle in cycles]


def _cycle_through(g, start: int) -> list[int]:
    """A shortest cycle through ``start`` inside the strongly connected ``g`` (BFS back to start)."""
    parent: dict[int, int] = {}
    frontier = [start]
    while frontier:
        following = []
        for u in frontier:
            for w in sorted(g.successors(u)):
                if w == start:
                    path = [u]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1]
                if w not in parent:
                    parent[w] = u
                    following.append(w)
        frontier = following
    raise AssertionError("a strongly connected component has a cycle through each of its nodes")


def dominators(graph: GraphLike) -> dict[ir.Node, ir.Node | None]:
    """Immediate dominator of each node, from a virtual entry feeding every node without predecessors.

    A node maps to None when only the entry dominates it (it has more than one
    independent path from the graph's inputs, or none). Nodes unreachable from
    the entry (only on a cycle) are left out.
    """
    import networkx as nx

    nodes, preds = dependencies(graph)
    entry = -1
    g = nx.DiGraph()
    g.add_node(entry)
    g.add_nodes_from(range(len(nodes)))
    for k, ps in enumerate(preds):
        if not ps:
            g.add_edge(entry, k)
        g.add_edges_from((p, k) for p in ps)
    idom = nx.immediate_dominators(g, entry)
    return {nodes[k]: (None if d == entry else nodes[d]) for k, d in sorted(idom.items()) if k != entry}


def partition(graph: GraphLike, predicate: Callable[[ir.Node], bool]) -> list[list[ir.Node]]:
    """Maximal groups of nodes satisfying ``predicate`` connected by producer→consumer edges.

    Groups list their nodes in graph order and come in the order of their
    first node. A group is connected, not necessarily convex: a path between
    two of its nodes may leave it (check before collapsing a group into one node).
    """
    nodes, preds = dependencies(graph)
    chosen = [bool(predicate(n)) for n in nodes]
    parent = list(range(len(nodes)))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for k, ps in enumerate(preds):
        if not chosen[k]:
            continue
        for p in ps:
            if chosen[p]:
                a, b = root(p), root(k)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[int, list[ir.Node]] = {}
    for k, node in enumerate(nodes):
        if chosen[k]:
            groups.setdefault(root(k), []).append(node)
    return [groups[r] for r in sorted(groups)]


def subgraph_matches(
    graph: GraphLike, pattern: GraphLike, *, induced: bool = False, inputs: bool = False
) -> list[dict[ir.Node, ir.Node]]:
    """Every occurrence of ``pattern`` in ``graph``, as ``{pattern node: graph node}``.

    Nodes match on domain and op type. A pattern edge must exist in ``graph``;
    with ``induced=True`` the matched nodes may have no other edges among
    themselves. With ``inputs=True`` an edge also matches on the input indices it feeds
    (``Sub(a, b)`` is not ``Sub(b, a)``). Symmetric patterns match once per
    automorphism. Matches come in a deterministic order.
    """
    from networkx.algorithms.isomorphism import DiGraphMatcher

    g, g_nodes = _simple_view(graph)
    p, p_nodes = _simple_view(pattern)

    def node_match(a: dict, b: dict) -> bool:
        return a["op"] == b["op"]

    def edge_match(a: dict, b: dict) -> bool:
        return a["inputs"] == b["inputs"]

    matcher = DiGraphMatcher(g, p, node_match=node_match, edge_match=edge_match if inputs else None)
    found = matcher.subgraph_isomorphisms_iter() if induced else matcher.subgraph_monomorphisms_iter()
    matches = [{p_nodes[pk]: g_nodes[gk] for gk, pk in m.items()} for m in found]
    position = {node: k for k, node in enumerate(g_nodes)}
    matches.sort(key=lambda m: [position[m[pn]] for pn in p_nodes])
    return matches


def _simple_view(graph: GraphLike):
    import networkx as nx

    nodes = list(graph)
    position = {node: k for k, node in enumerate(nodes)}
    g = nx.DiGraph()
    for k, node in enumerate(nodes):
        g.add_node(k, op=(node.domain, node.op_type))
    for k, node in enumerate(nodes):
        for index, v in enumerate(node.inputs):
            producer = v.producer() if v is not None else None
            if producer is not None and (p := position.get(producer)) is not None:
                if g.has_edge(p, k):
                    g.edges[p, k]["inputs"] = (*g.edges[p, k]["inputs"], index)
                else:
                    g.add_edge(p, k, inputs=(index,))
    return g, nodes
