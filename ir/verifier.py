"""The IR verifier: a table of rules, checked in one linear walk over the model.

Structural rules (every graph: main, subgraphs of GRAPH/GRAPHS attributes,
recursively, and function bodies):

=================  ==========================================================
``ssa``            a value name is defined once per scope chain (graph inputs,
                   initializers, node outputs; empty optional outputs exempt),
                   and an output's ``producer()``/``index()`` is the node and
                   position that hold it
``uses``           ``v.uses()`` holds exactly the ``(node, index)`` pairs of
                   nodes in the model that read ``v``
``order``          every input is defined before its reader (graph input,
                   initializer, earlier node, or a value of an enclosing scope
                   defined before the node that owns the subgraph)
``cycle``          nodes whose inputs form a cycle (named in cycle order)
``undefined``      an input no node, graph input or initializer in scope defines
``typed``          graph inputs, outputs, initializers and node outputs carry a
                   dtype (not required of outputs of schema-less ops, inside
                   their subgraphs, nor in function bodies, which ONNX leaves
                   untyped)
``output``         graph outputs are defined in the graph or its scope
``id``             every node has a unique integer ``ncc.id`` across the model
=================  ==========================================================

Per-op rules (:data:`OP_RULES`, from the ONNX schema of the op at the model's
opset for its domain; ops of a domain whose schemas were registered with
:func:`register_schemas` are checked for arity only; ops of other domains and
model-local functions pass):

=================  ==========================================================
``domain``         the node's domain is imported (or is a model-local
                   function's domain)
``op``             a standard-domain op exists at the imported opset
``inputs``         input count (trailing ``None`` are absent) within the
                   schema's range, required inputs present
``outputs``        output count (trailing unnamed outputs are absent) within
                   the schema's range
``attribute``      required attributes present, none unknown to the schema,
                   types as the schema declares
=================  ==========================================================

:func:`diagnose` returns every problem; :func:`verify` raises
:class:`~ncc.errors.VerificationError` naming the first and showing up to ten
more, each node printed between its neighbours.

The IR does not import onnxruntime, which knows the ``com.microsoft`` schemas:
:mod:`ncc.runtime` registers them here when it is imported (the pass manager
and the ``ncc`` commands import it). Without a registered provider, contrib ops
are checked for nothing but structure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache

import onnx.defs
import onnx_ir as ir
from ncc.errors import VerificationError
from ncc.ir.ids import ID_KEY
from ncc.ir.ops import is_onnx_domain

__all__ = [
    "Diagnostic",
    "diagnose",
    "verify",
    "format_diagnostics",
    "describe",
    "op_info",
    "register_schemas",
    "OP_RULES",
]

GraphLike = ir.Graph | ir.Function

#: Domains whose ops are fully checked against ``onnx.defs``.
STANDARD_DOMAINS = frozenset({"", "ai.onnx.ml", "ai.onnx.preview.training"})
#: Domains checked for arity only -> the function that returns their schemas (see :func:`register_schemas`).
_SCHEMA_PROVIDERS: dict[str, Callable[[], Iterable]] = {}
#: Further problems shown after the first one in a VerificationError.
MAX_SHOWN = 10


@dataclass(frozen=True)
class Diagnostic:
    """One broken invariant: the rule's name, a sentence, and where it happened."""

    rule: str
    message: str
    node: ir.Node | None = None
    graph_path: str = ""
    graph: GraphLike | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return self.message


def verify(model: ir.Model) -> None:
    """Raise :class:`VerificationError` if ``model`` breaks any rule. Ops of a domain ONNX does not define
    are checked against the schemas registered for it (:func:`register_schemas`), else for nothing but
    structure: import :mod:`ncc.runtime` to have ``com.microsoft`` ops checked."""
    problems = diagnose(model)
    if problems:
        raise VerificationError(format_diagnostics(problems))


def diagnose(model: ir.Model) -> list[Diagnostic]:
    """Every problem in ``model``, in walk order (structural first per node)."""
    return _Verifier(model).run()


# --------------------------------------------------------------------------- per-op rules


@dataclass(frozen=True)
class OpInfo:
    """What the per-op rules know about an op, read once from its schema."""

    label: str  # op type and schema version, e.g. "Conv-11"
    inputs: tuple[int, int]  # allowed count, inclusive
    required_inputs: tuple[tuple[int, str], ...]  # fixed positions that may not be empty
    outputs: tuple[int, int]
    #: name -> (AttributeType value, its name, required); None: attributes not checked
    attributes: dict[str, tuple[int, str, bool]] | None


def _count_range(lo: int, hi: int) -> str:
    if lo == hi:
        return f"exactly {lo}"
    if hi >= 2**31 - 1:
        return f"at least {lo}"
    return f"{lo} to {hi}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _rule_inputs(node: ir.Node, op: OpInfo) -> Iterator[str]:
    inputs = node.inputs
    n = len(inputs)
    while n and inputs[n - 1] is None:
        n -= 1
    lo, hi = op.inputs
    if not lo <= n <= hi:
        yield f"has {_plural(n, 'input')}; {op.label} takes {_count_range(lo, hi)}."
        return
    for i, name in op.required_inputs:
        if i < n and inputs[i] is None:
            yield f"lacks required input {i} ({name!r}) of {op.label}."


def _rule_outputs(node: ir.Node, op: OpInfo) -> Iterator[str]:
    outputs = node.outputs
    n = len(outputs)
    while n and not outputs[n - 1].name:
        n -= 1
    lo, hi = op.outputs
    if not lo <= n <= hi:
        yield f"has {_plural(n, 'output')}; {op.label} produces {_count_range(lo, hi)}."


def _rule_attributes(node: ir.Node, op: OpInfo) -> Iterator[str]:
    known = op.attributes
    if known is None:
        return
    attributes = node.attributes
    for name, (_, _, required) in known.items():
        if required and name not in attributes:
            yield f"lacks required attribute {name!r} of {op.label}."
    for name, attr in attributes.items():
        formal = known.get(name)
        if formal is None:
            valid = ", ".join(sorted(known)) or "none"
            yield f"has attribute {name!r}, unknown to {op.label} (valid: {valid})."
        elif formal[0] != attr.type:
            yield f"has attribute {name!r} of type {attr.type.name}; {op.label} expects {formal[1]}."


#: Rules checked on every node whose op has a schema: (rule name, check yielding sentence endings).
OP_RULES: list[tuple[str, Callable[[ir.Node, OpInfo], Iterator[str]]]] = [
    ("inputs", _rule_inputs),
    ("outputs", _rule_outputs),
    ("attribute", _rule_attributes),
]


@cache
def op_info(domain: str, op_type: str, version: int) -> OpInfo | str | None:
    """The op's :class:`OpInfo`; a sentence ending when a standard op does not exist; None when unchecked."""
    if domain in STANDARD_DOMAINS:
        try:
            schema = onnx.defs.get_schema(op_type, version, domain)
        except onnx.defs.SchemaError:
            return _missing_op(domain, op_type, version)
        attributes = {a.name: (int(a.type), a.type.name, a.required) for a in schema.attributes.values()}
        return _info(f"{op_type}-{schema.since_version}", schema, attributes)
    if domain in _SCHEMA_PROVIDERS:
        candidates = [s for s in _contrib_schemas().get((domain, op_type), []) if s.since_version <= version]
        if candidates:
            return _info(f"{domain}::{op_type}-{candidates[-1].since_version}", candidates[-1], None)
    return None


def _info(label: str, schema, attributes) -> OpInfo:
    required = []
    for i, formal in enumerate(schema.inputs):
        if formal.option.name != "Single":
            break  # variadic or optional: later positions are not fixed
        required.append((i, formal.name))
    return OpInfo(
        label,
        (schema.min_input, schema.max_input),
        tuple(required),
        (schema.min_output, schema.max_output),
        attributes,
    )


def _missing_op(domain: str, op_type: str, version: int) -> str:
    try:
        latest = onnx.defs.get_schema(op_type, domain)
    except onnx.defs.SchemaError:
        where = f"domain {domain!r}" if domain else "the default ONNX domain"
        return f"is not an operator of {where}."
    return (
        f"needs opset {latest.since_version} or later of {_domain_label(domain)}, but the model imports "
        f"opset {version}."
    )


def register_schemas(domains: Iterable[str], provider: Callable[[], Iterable]) -> None:
    """Check ops of ``domains`` for arity against the schemas ``provider()`` returns, called on first need
    (objects like ``onnx.defs.OpSchema``: ``domain``, ``name``, ``since_version``, ``inputs``, ``min_input``,
    ``max_input``, ``min_output``, ``max_output``; schemas of other domains are ignored)."""
    for domain in domains:
        _SCHEMA_PROVIDERS[domain] = provider
    _contrib_schemas.cache_clear()
    op_info.cache_clear()


@cache
def _contrib_schemas() -> dict[tuple[str, str], list]:
    table: dict[tuple[str, str], list] = {}
    for provider in dict.fromkeys(_SCHEMA_PROVIDERS.values()):
        for schema in provider():
            if _SCHEMA_PROVIDERS.get(schema.domain) is provider:
                table.setdefault((schema.domain, schema.name), []).append(schema)
    for schemas in table.values():
        schemas.sort(key=lambda s: s.since_version)
    return table


def _domain_label(domain: str) -> str:
    return f"domain {domain!r}" if domain else "the default domain"


# --------------------------------------------------------------------------- the walk


def describe(node: ir.Node) -> str:
    """``Conv node 'conv0' (id 3)`` — how messages name a node."""
    op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
    name = repr(node.name) if node.name else "(unnamed)"
    raw = node.metadata_props.get(ID_KEY) if node.metadata_props else None
    return f"{op} node {name} (id {raw if raw is not None else '?'})"


def _value(v: ir.Value) -> str:
    return f"%{v.name}" if v.name else "an unnamed value"


def _definition(v: ir.Value) -> str:
    producer = v.producer()
    if producer is not None:
        return f"output {v.index()} of {describe(producer)}"
    if v.is_initializer():
        return "an initializer"
    if v.is_graph_input():
        return "a graph input"
    return "a free value"


class _Scope:
    """The values visible in one graph: its own, then its enclosing scopes'."""

    __slots__ = ("parent", "graph", "path", "values", "names", "late")

    def __init__(self, parent: _Scope | None, graph: GraphLike, path: str):
        self.parent, self.graph, self.path = parent, graph, path
        self.values: set[ir.Value] = set()
        self.names: dict[str, ir.Value] = {}
        self.late: list[tuple[ir.Node, int, ir.Value]] = []

    def has(self, v: ir.Value) -> bool:
        scope: _Scope | None = self
        while scope is not None:
            if v in scope.values:
                return True
            scope = scope.parent
        return False

    def named(self, name: str) -> ir.Value | None:
        scope: _Scope | None = self
        while scope is not None:
            if (found := scope.names.get(name)) is not None:
                return found
            scope = scope.parent
        return None

    def encloses(self, graph: GraphLike | None) -> bool:
        scope = self.parent
        while scope is not None:
            if scope.graph is graph:
                return True
            scope = scope.parent
        return False


class _Verifier:
    def __init__(self, model: ir.Model):
        self.model = model
        self.problems: list[Diagnostic] = []
        self.functions = set(model.functions)
        self.function_domains = {key[0] for key in self.functions}
        self.imports = _normalized(model.opset_imports)
        self.uses: dict[ir.Value, list[tuple[ir.Node, int]]] = {}  # (reader, input index)
        self.defined: list[ir.Value] = []
        self.where: dict[ir.Node, _Scope] = {}
        self.ids: dict[int, ir.Node] = {}
        self.ops: dict[tuple, OpInfo] = {}
        self.untyped: set[ir.Value] = set()  # reported once, not again as a graph output

    def run(self) -> list[Diagnostic]:
        main = self.model.graph
        path = main.name or "main"
        self.walk(main, None, path, f"graph {path!r}", self.imports, typed=True)
        for key, function in self.model.functions.items():
            imports = _normalized(function.opset_imports) or self.imports
            path = "function " + "::".join(k for k in key if k)
            self.walk(function, None, path, path, imports, typed=False)
        self.check_uses()
        return self.problems

    def report(
        self, rule: str, message: str, node: ir.Node | None = None, scope: _Scope | None = None
    ) -> None:
        if scope is None and node is not None:
            scope = self.where.get(node)
        self.problems.append(
            Diagnostic(rule, message, node, scope.path if scope else "", scope.graph if scope else None)
        )

    # -- definitions

    def define(self, v: ir.Value, scope: _Scope, node: ir.Node | None) -> None:
        name = v.name
        if name:
            earlier = scope.named(name)
            if earlier is not None and earlier is not v:
                where = f"{describe(node)}: " if node is not None else ""
                self.report(
                    "ssa",
                    f"{where}%{name} is defined twice: as {_definition(earlier)} and as {_definition(v)}.",
                    node,
                    scope,
                )
            scope.names[name] = v
        scope.values.add(v)
        self.defined.append(v)

    def typed(self, v: ir.Value, what: str, scope: _Scope, node: ir.Node | None = None) -> None:
        if (v.type is None or v.dtype in (None, ir.DataType.UNDEFINED)) and v not in self.untyped:
            self.untyped.add(v)
            prefix = f"{describe(node)}: " if node is not None else ""
            self.report("typed", f"{prefix}{what} {_value(v)} has no type.", node, scope)

    # -- graphs

    def walk(
        self, graph: GraphLike, parent: _Scope | None, path: str, gname: str, imports, *, typed: bool
    ) -> None:
        """Check one graph; ``typed``: values must carry types (not in functions nor schema-less ops' bodies)."""
        scope = _Scope(parent, graph, path)
        for v in graph.inputs:
            if v.producer() is not None:
                self.report(
                    "ssa", f"input {_value(v)} of {gname} is also {_definition(v)}.", v.producer(), scope
                )
            self.define(v, scope, None)
            if typed:
                self.typed(v, f"input of {gname}", scope)
        if isinstance(graph, ir.Graph):
            for v in graph.initializers.values():
                if v in scope.values:
                    continue  # an initializer that is also a graph input
                if v.producer() is not None:
                    self.report(
                        "ssa", f"initializer {_value(v)} of {gname} is also {_definition(v)}.", None, scope
                    )
                self.define(v, scope, None)
                if typed:
                    self.typed(v, f"initializer of {gname}", scope)
        for node in graph:
            self.node(node, scope, imports, typed)
        for i, v in enumerate(graph.outputs):
            if not scope.has(v):
                self.report(
                    "output",
                    f"output {i} ({_value(v)}) of {gname} is not defined there: {_why_undefined(v, scope)}.",
                    v.producer() if v.producer() in self.where else None,
                    scope,
                )
            if typed:
                self.typed(v, f"output of {gname}", scope)
        if scope.late:
            self.report_order(scope)

    def node(self, node: ir.Node, scope: _Scope, imports, typed: bool) -> None:
        self.where[node] = scope
        self.check_id(node, scope)
        uses = self.uses
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            if v in uses:
                uses[v].append((node, i))
            else:
                uses[v] = [(node, i)]
            if v not in scope.values and not scope.has(v):
                self.undefined(node, i, v, scope)
        op = self.op_info(node, scope, imports)
        for attr in node.attributes.values():
            kind = attr.type
            if kind != ir.AttributeType.GRAPH and kind != ir.AttributeType.GRAPHS or attr.is_ref():
                continue
            subgraphs = [attr.value] if kind == ir.AttributeType.GRAPH else list(attr.value)
            for k, sub in enumerate(subgraphs):
                suffix = f"[{k}]" if kind == ir.AttributeType.GRAPHS else ""
                path = f"{scope.path}/{node.name or node.op_type}.{attr.name}{suffix}"
                self.walk(sub, scope, path, f"graph {path!r}", imports, typed=typed and op is not None)
        check_type = typed and op is not None
        for i, v in enumerate(node.outputs):
            if v.producer() is not node or v.index() != i:
                self.report(
                    "ssa", f"{describe(node)}: output {i} {_value(v)} records {_definition(v)}.", node, scope
                )
            if v.name:
                self.define(v, scope, node)
                if check_type and v.type is None or check_type and v.dtype == ir.DataType.UNDEFINED:
                    self.typed(v, f"output {i}", scope, node)
            else:
                scope.values.add(v)
                self.defined.append(v)
        if op is not None:
            for rule, check in OP_RULES:
                for message in check(node, op):
                    self.report(rule, f"{describe(node)} {message}", node, scope)

    def check_id(self, node: ir.Node, scope: _Scope) -> None:
        raw = node.metadata_props.get(ID_KEY)
        if raw is None:
            self.report(
                "id", f"{describe(node)} has no ncc.id (give it one with ncc.ir.ids.stamp).", node, scope
            )
            return
        try:
            nid = int(raw)
        except ValueError:
            self.report("id", f"{describe(node)} has ncc.id {raw!r}, which is not an integer.", node, scope)
            return
        other = self.ids.setdefault(nid, node)
        if other is not node:
            message = f"{describe(node)} reuses id {nid} of {describe(other)}; ids must be unique."
            self.report("id", message, node, scope)

    def op_info(self, node: ir.Node, scope: _Scope, imports: dict[str, int]) -> OpInfo | None:
        domain = node.domain
        version = node.version if node.version is not None else imports.get(domain)
        key = (domain, node.op_type, node.overload, version)
        found = self.ops.get(key)
        if found is not None:
            return found
        if (domain, node.op_type, node.overload) in self.functions:
            return None
        if version is None:
            if domain not in self.function_domains:
                have = ", ".join(repr(d) for d in sorted(imports)) or "none"
                self.report(
                    "domain",
                    f"{describe(node)} is in {_domain_label(domain)}, which the model does not import "
                    f"(imported: {have}).",
                    node,
                    scope,
                )
            return None
        info = op_info(domain, node.op_type, version)
        if isinstance(info, str):
            self.report("op", f"{describe(node)} {info}", node, scope)
            return None
        if info is not None:
            self.ops[key] = info  # only good lookups are cached: problems are reported per node
        return info

    # -- order, cycles, undefined values

    def undefined(self, node: ir.Node, i: int, v: ir.Value, scope: _Scope) -> None:
        producer = v.producer()
        here = f"{describe(node)} reads {_value(v)} (input {i})"
        if producer is not None and producer.graph is scope.graph and producer is not node:
            scope.late.append((node, i, v))
            return
        if producer is node:
            scope.late.append((node, i, v))
            return
        if producer is not None and scope.encloses(producer.graph):
            self.report(
                "order",
                f"{here} from an enclosing graph, where {describe(producer)} defines it only after the node "
                f"that owns graph {scope.path!r}.",
                node,
                scope,
            )
            return
        reason = _why_undefined(v, scope)
        namesake = scope.named(v.name) if v.name else None
        hint = f" (a different value named %{v.name} is in scope)" if namesake is not None else ""
        self.report("undefined", f"{here}, but {reason}{hint}.", node, scope)

    def report_order(self, scope: _Scope) -> None:
        from ncc.ir.analysis import find_cycles

        in_cycle: set[ir.Node] = set()
        for cycle in find_cycles(scope.graph):
            in_cycle.update(cycle)
            ring = " -> ".join(describe(n) for n in [*cycle, cycle[0]])
            self.report("cycle", f"{describe(cycle[0])} is on a cycle: {ring}.", cycle[0], scope)
        for node, i, v in scope.late:
            if node in in_cycle:
                continue
            self.report(
                "order",
                f"{describe(node)} reads {_value(v)} (input {i}) before it is defined: its producer "
                f"{describe(v.producer())} comes later in the graph (sort the graph topologically).",
                node,
                scope,
            )

    # -- use lists

    def check_uses(self) -> None:
        uses = self.uses
        seen: set[ir.Value] = set()
        for v in [*uses, *self.defined]:
            if v in seen:
                continue
            seen.add(v)
            expected = uses.get(v, ())
            actual = v.uses()
            if len(actual) == len(expected) and set(actual) == set(expected):
                continue
            recorded = set(actual)
            for reader, index in expected:
                if (reader, index) not in recorded:  # onnx-ir's Usage is a (node, idx) named tuple
                    self.report(
                        "uses",
                        f"{describe(reader)} reads {_value(v)} at input {index}, but the use list of "
                        f"{_value(v)} does not record it (were inputs changed behind the IR's mutators?).",
                        reader,
                    )
            wanted = set(expected)
            for use in actual:
                if use in wanted:
                    continue
                if use.node not in self.where:
                    self.report(
                        "uses",
                        f"the use list of {_value(v)} ({_definition(v)}) records input {use.idx} of "
                        f"{describe(use.node)}, which is not in the model (removed without clearing its inputs?).",
                        v.producer() if v.producer() in self.where else None,
                    )
                else:
                    inputs = use.node.inputs
                    now = inputs[use.idx] if use.idx < len(inputs) else None
                    held = _value(now) if now is not None else "empty"
                    self.report(
                        "uses",
                        f"the use list of {_value(v)} records input {use.idx} of {describe(use.node)}, "
                        f"but that input is {held}.",
                        use.node,
                    )


def _why_undefined(v: ir.Value, scope: _Scope) -> str:
    producer = v.producer()
    if producer is not None:
        if producer.graph is None:
            return f"its producer {describe(producer)} is in no graph (was it removed?)"
        if producer.graph is scope.graph or scope.encloses(producer.graph):
            return f"its producer {describe(producer)} comes later"
        return f"its producer {describe(producer)} is in another graph, out of scope"
    if v.is_graph_input() or v.is_initializer():
        return f"it is {_definition(v)} of another graph, out of scope"
    return "no node, graph input or initializer defines it"


def _normalized(imports: dict[str, int]) -> dict[str, int]:
    return {("" if is_onnx_domain(d) else d): v for d, v in imports.items()}


# --------------------------------------------------------------------------- rendering


def format_diagnostics(problems: list[Diagnostic], limit: int = MAX_SHOWN) -> str:
    """The first problem's sentence, its node in context, then up to ``limit`` more."""
    cache: dict[int, list[ir.Node]] = {}
    first, rest = problems[0], problems[1:]
    lines = [first.message, *_context(first, cache, "  ")]
    if rest:
        lines.append(f"{_plural(len(rest), 'more problem')}:")
        for problem in rest[:limit]:
            lines.append(f"  - [{problem.rule}] {problem.message}")
            lines.extend(_context(problem, cache, "    "))
        if len(rest) > limit:
            lines.append(f"  ... and {len(rest) - limit} more (ncc.ir.verifier.diagnose lists all).")
    return "\n".join(lines)


def _context(problem: Diagnostic, cache: dict[int, list[ir.Node]], indent: str) -> list[str]:
    node, graph = problem.node, problem.graph
    if node is None or graph is None:
        return [f"{indent}in {problem.graph_path}"] if problem.graph_path else []
    nodes = cache.get(id(graph))
    if nodes is None:
        nodes = cache[id(graph)] = list(graph)
    try:
        at = nodes.index(node)
    except ValueError:
        return [f"{indent}in {problem.graph_path}:", f"{indent}> {_render(node)}"]
    lines = [f"{indent}in {problem.graph_path}:"]
    for k in range(max(at - 1, 0), min(at + 2, len(nodes))):
        lines.append(f"{indent}{'>' if k == at else ' '} {_render(nodes[k])}")
    return lines


def _render(node: ir.Node) -> str:
    try:
        from ncc.ir.printer import print_node

        return print_node(node).strip()
    except Exception:  # the printer may be missing, or choke on exactly the IR that is broken
        return _fallback(node)


def _fallback(node: ir.Node) -> str:
    op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
    args = ", ".join("" if v is None else _value(v) for v in node.inputs)
    outs = ", ".join(_value(v) if v.name else "_" for v in node.outputs)
    return f"{op}({args}) -> {outs}    # {describe(node)}"
