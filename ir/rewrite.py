"""Rewrite patterns, the greedy driver that applies them, and what every graph rewrite needs.

A :class:`Pattern` names the op type it is rooted at and a benefit; its
``match_and_rewrite(node, rewriter)`` either rewrites through the
:class:`Rewriter` and returns :meth:`MatchResult.ok`, or returns
:meth:`MatchResult.fail` with a reason and leaves the graph untouched.
Root a pattern at the *last* node of what it matches: new nodes are inserted
before the root, where all of the matched subgraph's inputs are defined.

:func:`apply_patterns` sweeps the graph (and its subgraphs) trying patterns in
order of benefit until a sweep changes nothing or ``max_sweeps`` is reached,
counting hits per pattern and failure reasons, and whether it converged.

Passes and backends both rewrite through this module, which imports neither;
:func:`ncc.passes.base.run_patterns` turns the driver's statistics into a pass
result. The reading helpers (:func:`constant_tensor`, :func:`constant_array`,
:func:`consumers`, :func:`single_consumer`) serve matching code with or without
a rewriter.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from ncc.ir import ids
from ncc.ir.ops import is_onnx_domain
from ncc.ir.tensors import from_array

# -- reading the graph -------------------------------------------------------------------------------


def is_constant(value: ir.Value | None) -> bool:
    """Whether ``value`` holds a compile-time constant: an initializer that is not also a graph input (that
    one is only a default the caller may override), or the output of a ``Constant`` node."""
    if value is None:
        return False
    if value.is_initializer():
        return value.const_value is not None and not value.is_graph_input()
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and is_onnx_domain(producer)


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of a constant value (see :func:`is_constant`; no data is read), or None."""
    if value is None:
        return None
    if value.is_initializer():
        return value.const_value if not value.is_graph_input() else None
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and is_onnx_domain(producer):
        return _constant_node_tensor(producer)
    return None


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The data of a constant value (reads the tensor), or None."""
    tensor = constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def dequantized_array(dq: ir.Node) -> np.ndarray:
    """The float32 tensor a DequantizeLinear of constants computes, ``(q - zero_point) * scale``: per tensor,
    per ``axis``, or in blocks of ``block_size`` along it."""
    codes = dq.inputs[0].const_value.numpy().astype(np.float32)
    block = dq.attributes.get_int("block_size", 0)
    axis = dq.attributes.get_int("axis", 1) % max(codes.ndim, 1)

    def spread(param: np.ndarray) -> np.ndarray:  # broadcast to the codes' shape
        param = param.astype(np.float32)
        if param.size == 1:
            return param.reshape(())
        if block:
            return np.take(np.repeat(param, block, axis=axis), np.arange(codes.shape[axis]), axis=axis)
        shape = [1] * codes.ndim
        shape[axis] = -1
        return param.reshape(shape)

    zero = dq.inputs[2] if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if zero is not None:
        codes = codes - spread(zero.const_value.numpy())
    return codes * spread(dq.inputs[1].const_value.numpy())


def consumers(value: ir.Value) -> list[ir.Node]:
    """The nodes that read ``value``, each once, in the order of its uses."""
    return list(dict.fromkeys(use.node for use in value.uses()))


def single_consumer(value: ir.Value, node: ir.Node) -> bool:
    """Whether ``node`` is the only reader of ``value`` (and it is not a graph output)."""
    uses = value.uses()
    return not value.is_graph_output() and len(uses) > 0 and all(u.node is node for u in uses)


def bias_add(value: ir.Value, width: int | None) -> tuple[ir.Node, ir.Value] | None:
    """``(add, bias)`` when ``value`` (a MatMul's product) is read only by an ``Add`` of a constant float32
    bias of shape ``[width]``: the bias a Gemm, an integer kernel or ``aten.linear`` can take in."""
    uses = list(value.uses())
    if value.is_graph_output() or len(uses) != 1:
        return None
    add = uses[0].node
    if add.op_type != "Add" or not is_onnx_domain(add) or len(add.inputs) != 2:
        return None
    bias = add.inputs[1 - uses[0].idx]
    array = constant_array(bias)
    if (
        array is None
        or array.dtype != np.float32
        or array.ndim != 1
        or not isinstance(width, int)
        or array.shape[0] != width
    ):
        return None
    return add, bias


def _constant_node_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    attrs = node.attributes
    if "value" in attrs:
        return attrs["value"].as_tensor()
    scalars = {
        "value_float": (np.float32, False),
        "value_floats": (np.float32, True),
        "value_int": (np.int64, False),
        "value_ints": (np.int64, True),
    }
    for key, (dtype, is_list) in scalars.items():
        if key in attrs:
            raw = attrs[key].value
            return from_array(np.array(list(raw) if is_list else raw, dtype=dtype))
    return None  # sparse_value and strings: left alone


def _is_interface(value: ir.Value) -> bool:
    """A graph input or output, or an initializer: a role a value has under its name."""
    return value.is_graph_input() or value.is_graph_output() or value.is_initializer()


# -- patterns ----------------------------------------------------------------------------------------


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
    inserted at the insertion point: before the current root, or after a node
    a pass names; values are replaced through onnx-ir's
    mutators so use lists never drift. A value is replaced in one of two ways:
    :meth:`replace_value` when the new value was built to take the old one's
    place (it takes over the old name), :meth:`replace_all_uses` when an
    existing value stands in for it (it keeps its own name, unless the old one
    was a graph output: that name is the model's interface and stays).
    """

    def __init__(self, model: ir.Model, graph: ir.Graph):
        self.model = model
        self.graph = graph
        self._anchor: ir.Node | None = None
        self._after = False
        self._taken: set[str] | None = None

    def set_insertion_point(self, node: ir.Node | None, *, after: bool = False) -> None:
        """New nodes go before ``node``, or with ``after`` after it (each after the one created before it,
        so they stay in creation order); at the end of the graph when ``node`` is None."""
        self._anchor = node
        self._after = after

    # -- building ---------------------------------------------------------------------------------
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
        """Build a node, stamp its id, insert it at the insertion point (before the root) and return it."""
        attrs = _to_attrs(attributes)
        node = ir.Node(domain, op_type, inputs, attrs, num_outputs=num_outputs, name=name)
        ids.stamp(self.model, node, absorbed)
        for i, out in enumerate(node.outputs):
            if output_names:
                out.name = output_names[i]
                if self._taken is not None and out.name:
                    self._taken.add(out.name)
            else:
                out.name = self.fresh_name(f"{name or op_type}_out{i}")
        if self._anchor is None:
            self.graph.append(node)
        elif self._after:
            self.graph.insert_after(self._anchor, node)
            self._anchor = node
        else:
            self.graph.insert_before(self._anchor, node)
        return node

    def constant(self, array: np.ndarray, name: str) -> ir.Value:
        """Add an initializer holding ``array`` and return its value."""
        value = ir.Value(name=self.fresh_name(name), const_value=from_array(array))
        value.type = ir.TensorType(value.const_value.dtype)
        value.shape = ir.Shape(array.shape)
        self.graph.register_initializer(value)
        return value

    def fresh_name(self, base: str) -> str:
        """A value or node name that no graph of the model uses yet, reserved for the caller: ``base``, else
        ``base_1``, ``base_2``, ... (``value`` when ``base`` is empty). Deterministic."""
        if self._taken is None:
            self._taken = _names_in_scope(self.model, self.graph)
        base = base or "value"
        name, n = base, 0
        while name in self._taken:
            n += 1
            name = f"{base}_{n}"
        self._taken.add(name)
        return name

    # -- replacing --------------------------------------------------------------------------------
    def replace_value(self, old: ir.Value, new: ir.Value) -> None:
        """``new``, built to replace ``old``, takes its place: every use of ``old`` (graph outputs and
        subgraphs included) reads ``new``, which takes ``old``'s name, and its type and shape where it
        has none. The model's interface and the names in dumps stay what they were.

        ``old``'s producer is left to the caller to erase. A ``new`` that is a graph input, output or
        initializer keeps its own name (see :meth:`replace_all_uses`).
        """
        if new.type is None:
            new.type = old.type
        if new.shape is None:
            new.shape = old.shape
        name, public = old.name, old.is_graph_output()
        self.replace_all_uses(old, new)  # a graph output's name moves to new here
        if not public and not _is_interface(new):
            old.name = None
            new.name = name

    def replace_all_uses(
        self, old: ir.Value, new: ir.Value, *, keep: Sequence[ir.Node] = (), renamed: str = "replaced"
    ) -> None:
        """Point every use of ``old`` (graph outputs and subgraphs included) at ``new``, an existing value
        that keeps its name; the nodes in ``keep`` (those computing ``new`` from ``old``) go on reading ``old``.

        Where ``old`` is a graph output its name is the model's interface: ``new`` takes it over (``old``
        becomes ``<name>_<renamed>``), or, when ``new`` already has such a role of its own (graph input or
        output, initializer), an ``Identity`` of ``new`` does (named after ``old``'s producer and absorbing it).
        """
        if old.is_graph_output():
            if _is_interface(new):
                # A value can appear once per role; keep the output name stable via Identity.
                producer = old.producer()
                ident = self.create(
                    "Identity",
                    [new],
                    name=producer.name if producer is not None else None,
                    absorbed=[producer] if producer is not None else (),
                    output_names=[self.fresh_name(f"{old.name}_id")],
                )
                new = ident.outputs[0]
                new.type, new.shape = old.type, old.shape
            self._retarget_outputs(old, new, renamed)
        self.replace_uses_if(old, new, lambda reader: not any(reader is n for n in keep))

    def replace_uses_if(self, old: ir.Value, new: ir.Value, predicate: Callable[[ir.Node], bool]) -> None:
        """Point the uses of ``old`` by the nodes ``predicate`` accepts at ``new`` (graph outputs stay)."""
        for use in old.uses():
            if predicate(use.node):
                use.node.replace_input_with(use.idx, new)

    def replace_op(self, node: ir.Node, new_values: Sequence[ir.Value]) -> None:
        """Replace every output of ``node`` by ``new_values`` (with :meth:`replace_all_uses`) and erase it."""
        for old, new in zip(node.outputs, new_values, strict=True):
            if new.type is None:
                new.type, new.shape = old.type, old.shape
            self.replace_all_uses(old, new)
        self.erase(node)

    def _retarget_outputs(self, old: ir.Value, new: ir.Value, renamed: str) -> None:
        # Keep the public output name: swap names so consumers of the model see no change.
        name = old.name
        old.name = self.fresh_name(f"{name}_{renamed}")
        new.name = name
        for i, out in enumerate(self.graph.outputs):
            if out is old:
                self.graph.outputs[i] = new

    # -- removing ---------------------------------------------------------------------------------
    def erase(self, node: ir.Node) -> None:
        """Remove a node whose outputs are no longer used, and the initializers only it used."""
        inputs = [v for v in node.inputs if v is not None]
        self.graph.remove(node, safe=True)
        for value in inputs:
            self.drop_if_unused(value)

    def erase_all(self, nodes: Sequence[ir.Node]) -> None:
        """Erase ``nodes`` (consumers first), which may read each other's outputs but nothing else may,
        then the ``Constant`` nodes that fed them and are now unread."""
        constants: list[ir.Node] = []
        for node in nodes:
            for value in node.inputs:
                p = value.producer() if value is not None else None
                if p is not None and p.op_type == "Constant" and is_onnx_domain(p) and p not in constants:
                    constants.append(p)
        pending = list(nodes)
        while pending:  # erase a node once nothing reads its outputs
            for node in pending:
                if not any(o.uses() for o in node.outputs):
                    self.erase(node)
                    pending.remove(node)
                    break
            else:
                raise RuntimeError("nodes to erase are still read by other nodes")
        for node in constants:
            if (
                node.graph is self.graph
                and not node.outputs[0].uses()
                and not node.outputs[0].is_graph_output()
            ):
                self.erase(node)

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


def _names_in_scope(model: ir.Model, graph: ir.Graph) -> set[str]:
    """Every value and node name of the model's graphs (main graph and subgraphs: one naming scope in
    ONNX), and of ``graph`` and its subgraphs when it is a function body. Node names are in the pool too,
    so a fresh name is safe for a node as well (onnxruntime refuses repeated node names in some kernels'
    fusions), whatever names the input model has or lacks."""
    graphs = list(model.graphs())
    if not any(g is graph for g in graphs):
        graphs += [graph, *graph.subgraphs()]
    names: set[str] = set()
    for g in graphs:
        names.update(v.name for v in g.inputs if v.name)
        names.update(name for name in g.initializers if name)
        for node in g:
            names.update(o.name for o in node.outputs if o.name)
            if node.name:
                names.add(node.name)
    return names


def _to_attrs(attributes: dict[str, Any] | Iterable[ir.Attr]) -> list[ir.Attr]:
    if isinstance(attributes, dict):
        return [
            a if isinstance(a, ir.Attr) else ir.convenience.convert_attribute(k, a)
            for k, a in attributes.items()
        ]
    return list(attributes)


# -- the driver --------------------------------------------------------------------------------------


@dataclass
class PatternStats:
    hits: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)  # (pattern label, reason) -> count
    sweeps: int = 0
    converged: bool = True


def apply_patterns(
    model: ir.Model, patterns: Sequence[Pattern], *, max_sweeps: int = 10, graph: ir.Graph | None = None
) -> PatternStats:
    """Apply ``patterns`` greedily to the graph and its subgraphs until nothing changes."""
    stats = PatternStats()
    graphs = [graph] if graph is not None else [model.graph, *model.graph.subgraphs()]
    by_root: dict[tuple[str, str], list[Pattern]] = {}
    for pattern in sorted(patterns, key=lambda p: -p.benefit):
        domain = "" if is_onnx_domain(pattern.domain) else pattern.domain  # as onnx-ir spells a node's
        by_root.setdefault((domain, pattern.root), []).append(pattern)
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
