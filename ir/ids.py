"""Stable node ids.

Every node carries an integer id in ``metadata_props["ncc.id"]``; a node that a
pass builds to replace others records the ids it absorbed in
``metadata_props["ncc.fused"]`` (comma-separated, ascending). Both survive the
text form (printed inside ``loc(...)``) and ONNX files (as node metadata), so a
float model and its compressed counterpart can always be matched node by node.

Ids are assigned once, deterministically, in graph order (subgraphs after their
owner node, functions after the main graph) to nodes that have none; a new id
is one more than the largest id in the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import onnx_ir as ir

ID_KEY = "ncc.id"
FUSED_KEY = "ncc.fused"
COMPLETED_BY_KEY = "ncc.completed_by"
"""On a node whose output is not yet the value its source node computed: the op type of the node right after
it that completes it (the ``Add`` of a bias quantize-dynamic split off a Gemm, or that raise-qoperator took
back out of an integer kernel; a ``Relu`` raise-qoperator put back where the kernel left it to the output's
saturation). ``ncc diff`` compares that node's output with the source's."""
_NEXT_KEY = "ncc.next_id"
_CARRIED_KEY = "ncc.carried_ids"


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node of the model: main graph, subgraphs (recursively) and functions."""
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def node_id(node: ir.Node) -> int | None:
    """The node's id, or None when it has not been given one."""
    raw = node.metadata_props.get(ID_KEY)
    return int(raw) if raw is not None else None


def fused_ids(node: ir.Node) -> tuple[int, ...]:
    """The ids this node absorbed (empty unless a pass fused nodes into it)."""
    raw = node.metadata_props.get(FUSED_KEY)
    return tuple(int(x) for x in raw.split(",")) if raw else ()


def assign_ids(model: ir.Model) -> None:
    """Give every node without an id a fresh one, in graph order (the first call also records whether the
    model came with ids: :func:`carries_ids`)."""
    nodes = list(all_nodes(model))
    model.meta.setdefault(_CARRIED_KEY, any(ID_KEY in node.metadata_props for node in nodes))
    next_id = max((i for i in map(node_id, nodes) if i is not None), default=-1) + 1
    for node in nodes:
        if ID_KEY not in node.metadata_props:
            node.metadata_props[ID_KEY] = str(next_id)
            next_id += 1
    model.meta[_NEXT_KEY] = next_id


def new_id(model: ir.Model) -> int:
    """Reserve and return a fresh id for a node a pass is about to create."""
    if _NEXT_KEY not in model.meta:
        assign_ids(model)
    value = model.meta[_NEXT_KEY]
    model.meta[_NEXT_KEY] = value + 1
    return value


def stamp(model: ir.Model, node: ir.Node, absorbed: Iterable[ir.Node] = ()) -> ir.Node:
    """Give a newly built ``node`` a fresh id and record the ids of the nodes it replaces.

    The absorbed set is transitive: fusing an already-fused node carries its
    ``ncc.fused`` ids along.
    """
    node.metadata_props[ID_KEY] = str(new_id(model))
    ids: set[int] = set()
    for old in absorbed:
        if (i := node_id(old)) is not None:
            ids.add(i)
        ids.update(fused_ids(old))
    if ids:
        node.metadata_props[FUSED_KEY] = ",".join(map(str, sorted(ids)))
    return node


def carries_ids(model: ir.Model) -> bool:
    """Whether ``model``'s ids came with it (an ncc output, whose ids are those its float input gets when
    loaded) rather than given when it was loaded (a file from another tool: its ids match nothing)."""
    return bool(model.meta.get(_CARRIED_KEY, True))
