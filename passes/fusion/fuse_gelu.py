"""Recognize decomposed GELU subgraphs and replace each with one Gelu node.

GELU is ``x * Phi(x)`` with ``Phi`` the standard normal CDF. Exporters write it
out elementwise, in one of two forms:

    exact (erf):  y = x * 0.5 * (1 + erf(x / sqrt(2)))
    tanh approx:  y = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))

Both become a single node: the standard ``Gelu`` (opset 20, attribute
``approximate = "none"`` or ``"tanh"``) when the model's default opset is 20 or
later, else ``com.microsoft::Gelu`` (erf) or ``com.microsoft::FastGelu`` (tanh),
both onnxruntime kernels, adding the ``com.microsoft`` opset import if missing.
Keeping GELU whole matters to quantization: it stays in float as one op
instead of five quantizable elementwise nodes with Q/DQ pairs between them.

Orderings recognized (every Mul and Add in either operand order):

- the erf argument is ``Div(x, 1.4142135)`` or ``Mul(x, 0.70710677)``;
- the tanh argument is ``Mul(Add(x, Mul(x^3, 0.044715)), 0.7978846)`` with
  ``x^3`` as ``Pow(x, 3)``, ``Mul(x, Mul(x, x))`` or ``Mul(Mul(x, x), x)``;
- the factor ``p = Add(erf|tanh(...), 1)`` and ``x`` and ``0.5`` are multiplied
  in any grouping: ``Mul(Mul(x, p), 0.5)``, ``Mul(Mul(x, 0.5), p)``,
  ``Mul(x, Mul(p, 0.5))``.

Constants are initializers or ``Constant`` nodes holding one element, equal to
the expected value within a relative 1e-4. The pattern is rooted at the last
Mul; every intermediate value must be read only inside the subgraph and must
not be a graph output (a failed match says which one is not). ``Constant``
nodes left without readers go with the subgraph.

The new node records the ids of the nodes it absorbed and takes over the last
Mul's output name. No weight is read: only one-element constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.ir.ops import ensure_opset, is_onnx_domain, onnx_opset
from ncc.ir.rewrite import MatchResult, Pattern, Rewriter, constant_tensor
from ncc.passes.base import Pass, PassContext, PassResult, run_patterns

MS_DOMAIN = "com.microsoft"
#: Relative tolerance on the constants of a recognized pattern.
CONST_RTOL = 1e-4

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_CUBIC = 0.044715

_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


# -- helpers shared by the recognition passes --------------------------------------


def producer_of(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The standard-domain node producing ``value`` if its op type is one of ``op_types``."""
    if value is None:
        return None
    node = value.producer()
    if node is None or not is_onnx_domain(node) or node.op_type not in op_types:
        return None
    return node


def scalar_constant(value: ir.Value | None) -> float | None:
    """The value of a one-element float constant (initializer or Constant node), else None."""
    if value is None:
        return None
    tensor = constant_tensor(value)
    if tensor is None or tensor.size != 1 or tensor.dtype not in _FLOATS:
        return None
    return float(np.asarray(tensor.numpy()).reshape(()))


def is_constant(value: ir.Value | None, expected: float, rtol: float = CONST_RTOL) -> bool:
    """Whether ``value`` is a one-element float constant within ``rtol`` of ``expected``."""
    got = scalar_constant(value)
    return got is not None and abs(got - expected) <= rtol * abs(expected)


def operands(node: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """The two inputs of a binary node, or None when it does not have exactly two."""
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return None
    return node.inputs[0], node.inputs[1]


def split_constant(node: ir.Node, expected: float) -> ir.Value | None:
    """For a commutative binary node with one operand == ``expected``: the other operand."""
    pair = operands(node)
    if pair is None:
        return None
    a, b = pair
    if is_constant(b, expected):
        return a
    if is_constant(a, expected):
        return b
    return None


def inner_uses_problem(nodes: list[ir.Node], root: ir.Node) -> str:
    """Why the matched ``nodes`` cannot be replaced as a whole ('' when they can).

    Every output of a node other than ``root`` must be read only by nodes in
    ``nodes`` and must not be a graph output.
    """
    members = {id(n) for n in nodes}
    for node in nodes:
        if node is root:
            continue
        if node.graph is not root.graph:
            return f"{node.op_type} node {node.name!r} is in another graph"
        for out in node.outputs:
            if out.is_graph_output():
                return f"intermediate value {out.name} is a graph output"
            if any(id(u.node) not in members for u in out.uses()):
                return f"intermediate value {out.name} has a consumer outside the pattern"
    return ""


# -- the GELU patterns -------------------------------------------------------------------


def _erf_core(p: ir.Value) -> tuple[ir.Value, list[ir.Node]] | str:
    """``p = 1 + erf(x / sqrt 2)``: return (x, nodes) or why not."""
    add = producer_of(p, "Add")
    if add is None:
        return "no Add(erf(...), 1) factor"
    t = split_constant(add, 1.0)
    erf = producer_of(t, "Erf")
    if erf is None:
        return "no Add(erf(...), 1) factor"
    arg = erf.inputs[0]
    scale = producer_of(arg, "Div", "Mul")
    if scale is None:
        return "the Erf argument is not x / sqrt(2) or x * (1 / sqrt(2))"
    if scale.op_type == "Div":
        pair = operands(scale)
        x = pair[0] if pair is not None and is_constant(pair[1], SQRT2) else None
    else:
        x = split_constant(scale, 1.0 / SQRT2)
    if x is None:
        return "the Erf argument is not x / sqrt(2) or x * (1 / sqrt(2)) (constant differs)"
    return x, [scale, erf, add]


def _cube_of(value: ir.Value, x: ir.Value) -> list[ir.Node] | None:
    """The nodes computing ``value = x^3`` from ``x``, or None."""
    pow_ = producer_of(value, "Pow")
    if pow_ is not None:
        pair = operands(pow_)
        if pair is not None and pair[0] is x and is_constant(pair[1], 3.0):
            return [pow_]
        return None
    mul = producer_of(value, "Mul")
    if mul is None or operands(mul) is None:
        return None
    for a, b in (mul.inputs, mul.inputs[::-1]):
        sq = producer_of(b, "Mul")
        if a is x and sq is not None and list(sq.inputs) == [x, x]:
            return [sq, mul]
    return None


def _tanh_core(p: ir.Value) -> tuple[ir.Value, list[ir.Node]] | str:
    """``p = 1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))``: return (x, nodes) or why not."""
    add = producer_of(p, "Add")
    if add is None:
        return "no Add(tanh(...), 1) factor"
    t = split_constant(add, 1.0)
    tanh = producer_of(t, "Tanh")
    if tanh is None:
        return "no Add(tanh(...), 1) factor"
    scale = producer_of(tanh.inputs[0], "Mul")
    s = split_constant(scale, SQRT_2_OVER_PI) if scale is not None else None
    inner = producer_of(s, "Add")
    if inner is None or operands(inner) is None:
        return "the Tanh argument is not sqrt(2/pi) * (x + 0.044715 * x^3)"
    for x, c in (inner.inputs, inner.inputs[::-1]):
        cmul = producer_of(c, "Mul")
        cube = split_constant(cmul, TANH_CUBIC) if cmul is not None else None
        cube_nodes = _cube_of(cube, x) if cube is not None else None
        if cube_nodes is not None:
            return x, [*cube_nodes, cmul, inner, scale, tanh, add]
    return "the Tanh argument is not sqrt(2/pi) * (x + 0.044715 * x^3)"


class _GeluPattern(Pattern):
    root = "Mul"
    approximate: ClassVar[str]

    @staticmethod
    def _core(p: ir.Value) -> tuple[ir.Value, list[ir.Node]] | str:
        raise NotImplementedError

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        root = node
        pair = operands(root)
        if pair is None:
            return MatchResult.fail("Mul does not have two inputs")
        # Candidate (x, p, tail nodes) assignments for the product x * 0.5 * p.
        candidates: list[tuple[ir.Value, ir.Value, list[ir.Node]]] = []
        z = split_constant(root, 0.5)
        if z is not None:  # Mul(Mul(x, p), 0.5)
            inner = producer_of(z, "Mul")
            if inner is not None and operands(inner) is not None:
                a, b = inner.inputs
                candidates += [(a, b, [inner]), (b, a, [inner])]
        else:
            for a, b in (pair, pair[::-1]):
                half = producer_of(a, "Mul")
                rest = split_constant(half, 0.5) if half is not None else None
                if rest is not None:  # Mul(Mul(x, 0.5), p) or Mul(x, Mul(p, 0.5))
                    candidates += [(rest, b, [half]), (b, rest, [half])]
        if not candidates:
            return MatchResult.fail("not a product x * 0.5 * p")
        reason = f"no (1 + {'erf' if self.approximate == 'none' else 'tanh'}(...)) factor of x"
        for x, p, tail in candidates:
            core = self._core(p)
            if isinstance(core, str):
                if not core.startswith("no Add("):  # found erf/tanh, but its argument is wrong
                    reason = core
                continue
            cx, core_nodes = core
            if cx is not x:
                reason = "the erf/tanh argument is computed from a different value than the one multiplied"
                continue
            nodes = [*core_nodes, *tail, root]
            problem = inner_uses_problem(nodes, root)
            if problem:
                return MatchResult.fail(problem)
            self._rewrite(root, x, nodes, rewriter)
            return MatchResult.ok()
        return MatchResult.fail(reason)

    def _rewrite(self, root: ir.Node, x: ir.Value, nodes: list[ir.Node], rewriter: Rewriter) -> None:
        model = rewriter.model
        if onnx_opset(model) >= 20:
            new = rewriter.create(
                "Gelu", [x], {"approximate": self.approximate}, name=root.name, absorbed=nodes
            )
        else:
            ensure_opset(model, MS_DOMAIN)
            op = "Gelu" if self.approximate == "none" else "FastGelu"
            new = rewriter.create(op, [x], domain=MS_DOMAIN, name=root.name, absorbed=nodes)
        rewriter.replace_value(root.outputs[0], new.outputs[0])
        rewriter.erase_all(nodes)


class GeluErfPattern(_GeluPattern):
    approximate = "none"
    benefit = 2
    _core = staticmethod(_erf_core)


class GeluTanhPattern(_GeluPattern):
    approximate = "tanh"
    benefit = 2
    _core = staticmethod(_tanh_core)


@dataclass(frozen=True)
class FuseGelu(Pass):
    """Replace decomposed GELU subgraphs (erf or tanh form) by one Gelu node.

    x * 0.5 * (1 + erf(x / sqrt 2))  ->  Gelu(x)
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  ->  Gelu(x){approximate=tanh} / com.microsoft::FastGelu(x)
    """

    name: ClassVar[str] = "fuse-gelu"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return run_patterns(model, [GeluErfPattern(), GeluTanhPattern()])
