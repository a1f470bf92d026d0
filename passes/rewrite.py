"""Rewrite patterns and the greedy driver that applies them.

A :class:`Pattern` names the op type it is rooted at and a benefit; its
``match_and_rewrite(node, rewriter)`` either rewrites through the
:class:`Rewriter` and returns :meth:`MatchResult.ok`, or returns
:meth:`MatchResult.fail` with a reason and leaves the graph untouched.
Root a pattern at the *last* node of what it matches: new nodes are inserted
before the root, where all of the matched subgraph's inputs are defined.

:func:`apply_patterns` sweeps the graph (and its subgraphs) trying patterns in
order of benefit until a sweep changes nothing or ``max_sweeps`` is reached,
counting hits per pattern and failure reasons, and whether it converged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from ncc.ir import ids
from ncc.passes.base import PassResult

#: Ops whose output holds exactly the values of their input 0, rearranged (same range, same histogram; a
#: scalar factor commutes with them). Only input 0 carries data.
VALUE_MOVES = frozenset(
    {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "DepthToSpace", "SpaceToDepth"}
)


@dataclass(frozen=True)
class MatchResult:
    success: bool
    reason: str = ""

    @staticmethod
    def ok() -> MatchResult:
        return MatchResult(True)

    @staticmethod
    def fail(reason: str) -> MatchResult:
        return MatchResult(False, reason)

    def __bool__(self) -> bool:
        return self.success


class Pattern:
    """One local rewrite. Subclasses set ``root`` (op type), optionally ``domain`` and ``benefit``."""

    root: ClassVar[str]
    domain: ClassVar[str] = ""
    benefit: ClassVar[int] = 1

    @property
    def label(self) -> str:
        return type(self).__name__

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        raise NotImplementedError


class Rewriter:
    """All graph mutation a pattern does goes through here.

    New nodes are stamped with fresh ids (recording the ids they absorb) and
    inserted before the current root; values are replaced through onnx-ir's
    mutators so use lists never drift.
    """

    def __init__(self, model: ir.Model, graph: ir.Graph):
        self.model = model
        self.graph = graph
        self._anchor: ir.Node | None = None
        self._names = Counter()

    def set_insertion_point(self, node: ir.Node) -> None:
        self._anchor = node

    def create(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: dict[str, Any] | Iterable[ir.Attr] = (),
        *,
        domain: str = "",
        num_outputs: int = 1,
        name: str | None = None,
        absorbed: Iterable[ir.Node] = (),
        output_names: Sequence[str] | None = None,
    ) -> ir.Node:
        """Build a node, stamp its id, insert it before the root and return it."""
        attrs = _to_attrs(attributes)
        node = ir.Node(domain, op_type, inputs, attrs, num_outputs=num_outputs, name=name)
        ids.stamp(self.model, node, absorbed)
        for i, out in enumerate(node.outputs):
            out.name = output_names[i] if output_names else self.fresh_name(f"{name or op_type}_out{i}")
        if self._anchor is None:
            self.graph.append(node)
        else:
            self.graph.insert_before(self._anchor, node)
        return node

    def constant(self, array: np.ndarray, name: str) -> ir.Value:
        """Add an initializer holding ``array`` and return its value."""
        value = ir.Value(name=self.fresh_name(name), const_value=ir.tensor(array))
        value.type = ir.TensorType(value.const_value.dtype)
        value.shape = ir.Shape(array.shape)
        self.graph.register_initializer(value)
        return value

    def fresh_name(self, base: str) -> str:
        """A value name not used yet in this graph (deterministic)."""
        if not self._names:
            self._names.update(_names_in(self.graph))
        name, n = base, 0
        while name in self._names:
            n += 1
            name = f"{base}_{n}"
        self._names[name] += 1
        return name

    def replace_all_uses(self, old: ir.Value, new: ir.Value) -> None:
        """Point every use of ``old`` (including graph outputs) at ``new``."""
        if old.is_graph_output():
            if new.is_graph_output() or new.is_graph_input() or new.is_initializer():
                # A value can appear once per role; keep the output name stable via Identity.
                ident = self.create("Identity", [new], output_names=[self.fresh_name(f"{old.name}_id")])
                new = ident.outputs[0]
            _retarget_outputs(self.graph, old, new)
        ir.convenience.replace_all_uses_with(old, new)

    def replace_op(self, node: ir.Node, new_values: Sequence[ir.Value]) -> None:
        """Replace every output of ``node`` by ``new_values`` and erase it."""
        for old, new in zip(node.outputs, new_values, strict=True):
            if new.type is None:
                new.type, new.shape = old.type, old.shape
            self.replace_all_uses(old, new)
        self.erase(node)

    def erase(self, node: ir.Node) -> None:
        """Remove a node whose outputs are no longer used, and the initializers only it used."""
        inputs = [v for v in node.inputs if v is not None]
        self.graph.remove(node, safe=True)
        for value in inputs:
            self.drop_if_unused(value)

    def drop_if_unused(self, value: ir.Value) -> None:
        """Remove ``value``'s initializer from this graph when nothing reads it any more."""
        if (
            value.is_initializer()
            and not value.uses()
            and not value.is_graph_input()
            and not value.is_graph_output()
            and self.graph.initializers.get(value.name) is value
        ):
            del self.graph.initializers[value.name]


def _retarget_outputs(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    # Keep the public output name: swap names so consumers of the model see no change.
    name = old.name
    old.name = graph_unique(graph, f"{name}_replaced")
    new.name = name
    for i, out in enumerate(graph.outputs):
        if out is old:
            graph.outputs[i] = new


def graph_unique(graph: ir.Graph, base: str) -> str:
    taken = _names_in(graph)
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def names_taken(graph: ir.Graph) -> set[str]:
    """Every value and node name of ``graph``'s own nodes: what a name a pass makes up must not repeat."""
    return _names_in(graph) | {node.name for node in graph if node.name}


def fresh(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first not in ``taken`` (which it is added to)."""
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def _names_in(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        names.update(o.name for o in node.outputs if o.name)
    return names


def _to_attrs(attributes: dict[str, Any] | Iterable[ir.Attr]) -> list[ir.Attr]:
    if isinstance(attributes, dict):
        return [
            a if isinstance(a, ir.Attr) else ir.convenience.convert_attribute(k, a)
            for k, a in attributes.items()
        ]
    return list(attributes)


@dataclass
class PatternStats:
    hits: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)  # (pattern label, reason) -> count
    sweeps: int = 0
    converged: bool = True

    def to_result(self, patterns: Sequence[Pattern] = ()) -> PassResult:
        """The pass result: hits per pattern (every one of ``patterns`` listed, 0 when it never matched),
        and why the misses missed."""
        hits = {**{p.label: 0 for p in patterns}, **self.hits}
        stats = {f"{label} hits": n for label, n in sorted(hits.items())}
        notes = [f"{label}: no match {n}x: {reason}" for (label, reason), n in sorted(self.failures.items())]
        if not self.converged:
            notes.append(f"pattern driver stopped after {self.sweeps} sweeps without converging")
        return PassResult(modified=sum(self.hits.values()) > 0, stats=stats, notes=notes)


def apply_patterns(
    model: ir.Model, patterns: Sequence[Pattern], *, max_sweeps: int = 10, graph: ir.Graph | None = None
) -> PatternStats:
    """Apply ``patterns`` greedily to the graph and its subgraphs until nothing changes."""
    stats = PatternStats()
    graphs = [graph] if graph is not None else [model.graph, *model.graph.subgraphs()]
    by_root: dict[tuple[str, str], list[Pattern]] = {}
    for pattern in sorted(patterns, key=lambda p: -p.benefit):
        by_root.setdefault((pattern.domain, pattern.root), []).append(pattern)
    for g in graphs:
        rewriter = Rewriter(model, g)
        for sweep in range(1, max_sweeps + 1):
            stats.sweeps = max(stats.sweeps, sweep)
            changed = False
            failures: Counter = Counter()  # only the last sweep's failures describe the result
            for node in list(g):
                if node.graph is not g:  # erased by an earlier rewrite in this sweep
                    continue
                for pattern in by_root.get((node.domain, node.op_type), ()):
                    rewriter.set_insertion_point(node)
                    result = pattern.match_and_rewrite(node, rewriter)
                    if result:
                        stats.hits[pattern.label] += 1
                        changed = True
                        break
                    failures[(pattern.label, result.reason)] += 1
            if not changed:
                stats.failures.update(failures)
                break
        else:
            stats.converged = False
    return stats
