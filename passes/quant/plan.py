"""What static INT8 quantization touches: op roles, candidates, observed values.

Shared by ``calibrate`` (which values to observe) and ``insert-qdq`` (what to
rewrite), so the two always agree. For each quantizable op type, ``ROLES``
says which inputs are activations, which is the weight (with its per-channel
axis) and which is the bias.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.ops import is_onnx_domain
from ncc.targets import TargetProfile

KEEP_FLOAT = "ncc.quant.keep_float"
"""Node metadata: a pass before ``insert-qdq`` wants this node in float; the value is the reason."""
#: On the MatMuls reading an activation ``smooth-quant`` left to insert-qdq's fallback (a Mul there would
#: break a fusion the target does): the migration strength to smooth it with, should the fallback need to.
SMOOTH_LATER = "ncc.quant.smooth_alpha"


@dataclass(frozen=True)
class Role:
    activations: tuple[int, ...]
    weight: int | None = None
    bias: int | None = None
    #: Inputs that must share one scale with each other and with the output (Concat).
    shared: bool = False


ROLES: dict[str, Role] = {
    "Conv": Role((0,), weight=1, bias=2),
    "ConvTranspose": Role((0,), weight=1, bias=2),
    "MatMul": Role((0, 1)),  # a constant input is quantized as a weight
    "Gemm": Role((0,), weight=1, bias=2),
    "Add": Role((0, 1)),
    "Mul": Role((0, 1)),
    "Concat": Role((), shared=True),  # every input
    "GlobalAveragePool": Role((0,)),
    "AveragePool": Role((0,)),
    "Sigmoid": Role((0,)),
    "LeakyRelu": Role((0,)),
    "Softmax": Role((0,)),
    "Resize": Role((0,)),
    "Where": Role((1, 2)),
}

#: Ops whose presence means a model was quantized already (plus every ``QLinear*``).
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
        "QAttention",
        "DynamicQuantizeLSTM",
        "MatMulNBits",
        "GatherBlockQuantized",
    }
)


def is_quantized_op(node: ir.Node) -> bool:
    return node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear")


ACTIVATIONS = frozenset({"Relu", "Clip"})


def check_op_types(op_types: Sequence[str], supported: Iterable[str]) -> None:
    supported = sorted(set(supported))
    unknown = [op for op in op_types if op not in supported]
    if unknown:
        raise NccError(
            f"cannot quantize op type {', '.join(map(repr, unknown))}; supported: {', '.join(supported)}."
        )


def refuse_quantized(model: ir.Model) -> None:
    from ncc.ir.ids import all_nodes

    for node in all_nodes(model):
        if is_quantized_op(node):
            label = f"{node.op_type} {node.name!r}" if node.name else node.op_type
            raise NccError(f"model is already quantized (found {label}); start from the float model.")


QDQ_OPSET = 10
"""QuantizeLinear and DequantizeLinear exist from this opset on (one scale per tensor)."""
PER_CHANNEL_OPSET = 13
"""DequantizeLinear takes ``axis`` (one scale per channel) from this opset on."""


def qdq_opset(model: ir.Model, per_channel: bool) -> tuple[bool, list[str]]:
    """Raise ``model``'s opset to what its Q/DQ pairs need, when every node keeps its meaning there
    (:mod:`ncc.passes.opset`): 13 for per-channel weights, else 10. Returns whether weights can be
    per channel and lines for the report; when only opset 10 can be reached, weights go per tensor
    (with a warning). A model that cannot reach opset 10 is an error."""
    from ncc.ir.ops import onnx_opset
    from ncc.passes.opset import raise_opset

    current = onnx_opset(model)
    notes: list[str] = []
    blockers: dict[int, list[str]] = {}
    for target in (PER_CHANNEL_OPSET, QDQ_OPSET) if per_channel else (QDQ_OPSET,):
        if current >= target:
            break
        blockers[target] = raise_opset(model, target)
        if not blockers[target]:
            notes.append(f"opset: raised from {current} to {target} for Q/DQ; every node keeps its meaning")
            break
    else:
        raise NccError(
            f"INT8 needs QuantizeLinear (opset {QDQ_OPSET}), and this model's opset {current} cannot be raised "
            f"safely because of {', '.join(blockers[QDQ_OPSET])}; export the model at opset "
            f"{PER_CHANNEL_OPSET} or later."
        )
    if per_channel and onnx_opset(model) < PER_CHANNEL_OPSET:
        notes.append(
            f"warning: weights quantized per tensor: per-channel DequantizeLinear needs opset "
            f"{PER_CHANNEL_OPSET}, and this model's opset {current} cannot be raised safely because of "
            f"{', '.join(blockers[PER_CHANNEL_OPSET])}"
        )
        return False, notes
    return per_channel, notes


def matches(node: ir.Node, patterns: Sequence[str]) -> str | None:
    """The first pattern naming ``node``, else None: its exact name, or a regex found anywhere in the name
    (``re.search``, as grep and ``quantize-dynamic`` and the weight-only passes do; anchor with ``^``/``$``)."""
    name = node.name or ""
    for pattern in patterns:
        if name == pattern or re.search(pattern, name):
            return pattern
    return None


def unmatched_warnings(model: ir.Model, **patterns: Sequence[str]) -> list[str]:
    """A report warning for each pattern (``include=...``, ``exclude=...``) that names no node of the
    model: a typo, or a name from another export, would otherwise change nothing without a word."""
    from ncc.ir.ids import all_nodes

    nodes = list(all_nodes(model))
    return [
        f"warning: {kind} pattern {p!r} matches no node name (patterns are regexes searched in names)"
        for kind, group in patterns.items()
        for p in group
        if not any(matches(n, (p,)) for n in nodes)
    ]


def weight_axis(node: ir.Node, index: int, rank: int) -> int:
    """Per-channel axis of the weight at input ``index``: the output channels."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = node.attributes.get_int("transB", 0)
        return 0 if trans_b else 1
    return rank - 1  # MatMul's [.., K, N] constant: one scale per column


def fused_activation(node: ir.Node) -> ir.Node | None:
    """The Relu/Clip that ``fuse-activation`` paired with ``node``, if any."""
    mark = node.metadata_props.get("ncc.fused_activation")
    if mark is None or len(node.outputs) != 1:
        return None
    users = [u.node for u in node.outputs[0].uses()]
    if len(users) == 1 and users[0].op_type in ACTIVATIONS and users[0].metadata_props.get("ncc.id") == mark:
        return users[0]
    return None


def integer_matmul(node: ir.Node, target: TargetProfile) -> bool:
    """Whether ``target`` runs the MatMul ``node`` as an integer kernel: always where it multiplies two
    activations in integer, else only with a constant operand (a weight)."""
    from ncc.ir.rewrite import is_constant

    return target.activation_matmul or any(v is not None and is_constant(v) for v in node.inputs[:2])


def activation_inputs(node: ir.Node) -> list[int]:
    """Indices of ``node``'s activation inputs by its role (every input of a shared-scale op)."""
    role = ROLES[node.op_type]
    indices = range(len(node.inputs)) if role.shared else role.activations
    return [i for i in indices if i < len(node.inputs) and node.inputs[i] is not None]


def select(
    graph: ir.Graph,
    target: TargetProfile,
    op_types: set[str],
    islands: set[str],
    *,
    chosen: Callable[[ir.Node], str | None] = lambda node: None,
    checked: Callable[[ir.Node], str | None] = lambda node: None,
    integer_output: Callable[[ir.Node], bool] | None = None,
) -> Iterator[tuple[ir.Node, str | None]]:
    """insert-qdq's choice, in graph order: every node of ``op_types`` with why it stays float (None: it is
    quantized). Reasons come in this order: ``chosen`` (the user's and earlier passes'), the target's
    (a MatMul of two activations it has no kernel for; an island op none of whose inputs comes out of
    an integer kernel), then ``checked`` (what the statistics say). A quantized node's output counts as
    integer when ``integer_output`` says so (default: it is not a float-output op), and pass-through ops
    carry that on."""
    integer_out: set[str] = set()
    for node in graph:
        if not is_onnx_domain(node):
            continue
        if node.op_type in target.passthrough_ops and node.inputs and node.inputs[0] is not None:
            if node.inputs[0].name in integer_out:
                integer_out.update(o.name for o in node.outputs if o.name)
        if node.op_type not in op_types or node.op_type not in ROLES:
            continue
        reason = chosen(node)
        if not reason and node.op_type == "MatMul" and not integer_matmul(node, target):
            reason = "both inputs are activations: the target has no integer kernel for that"
        if not reason and node.op_type in islands:
            if not any(node.inputs[i].name in integer_out for i in activation_inputs(node)):
                reason = (
                    "no input comes from an integer kernel (a Q/DQ round trip would cost time and accuracy)"
                )
        reason = reason or checked(node)
        yield node, reason
        if reason:
            continue
        outputs_integer = (
            integer_output(node)
            if integer_output is not None
            else node.op_type not in target.float_output_ops
        )
        if outputs_integer:
            output = (fused_activation(node) or node).outputs[0]
            if output.name:
                integer_out.add(output.name)


def observed_values(graph: ir.Graph, target: TargetProfile, op_types: Iterable[str] = ()) -> list[str]:
    """The float activations ``insert-qdq`` may need a range for, in graph order: the activation inputs and
    outputs (after a fused Relu/Clip: the layer's own output is never quantized, and exposing it to the
    calibration run would keep onnxruntime from fusing the activation) of every node it could quantize,
    of ``op_types`` (else the target profile's), and what pass-through ops move them into.

    That is :func:`select` with every candidate quantized: an upper bound on any of insert-qdq's runs,
    since exclusions, skipped nodes and min-cosine's fallbacks only remove integer kernels. A
    transformer's residual Adds after float-output MatMuls are then not observed at all."""
    ops = set(op_types) or (set(target.static_ops) & set(ROLES))
    islands = set() if op_types else set(target.island_ops)
    names: dict[str, None] = {}

    def add(value: ir.Value | None) -> None:
        if value is not None and value.name and value.const_value is None:
            names[value.name] = None

    for node, reason in select(graph, target, ops, islands):
        if reason:
            continue
        for i in activation_inputs(node):
            add(node.inputs[i])
        # a float-output kernel's output stays float; a reader that quantizes it adds it as its input
        if node.op_type not in target.float_output_ops:
            add((fused_activation(node) or node).outputs[0])
    for node in graph:  # what pass-through ops make of an observed value (insert-qdq may quantize it too)
        if is_onnx_domain(node) and node.op_type in target.passthrough_ops and node.inputs:
            if node.inputs[0] is not None and node.inputs[0].name in names:
                for value in node.outputs:
                    add(value)
    return list(names)


def binned_values(graph: ir.Graph, target: TargetProfile) -> frozenset[str]:
    """Activations the target's plan takes a histogram range for: the inputs of its compute ops that are
    quantized whatever their neighbours (static ops that are not islands), traced back through
    pass-through ops, and the outputs of those it requantizes (not float-output kernels), traced forward
    through a fused activation and pass-through ops.

    The other observed tensors (a transformer's residual Adds, MatMul outputs on x86) are quantized
    only as islands next to integer kernels, or with explicit op types; their statistics then give
    their min/max, and ``calibrate`` bins no histogram for them (binning is most of its cost)."""
    core = (set(target.static_ops) - set(target.island_ops)) & set(ROLES)
    moves = set(target.passthrough_ops)
    out: set[str] = set()
    for node in graph:
        if not is_onnx_domain(node) or node.op_type not in core:
            continue
        if node.op_type == "MatMul" and not integer_matmul(node, target):
            continue
        for value in node.inputs:
            while value is not None and value.const_value is None and value.name and value.name not in out:
                out.add(value.name)
                producer = value.producer()
                if producer is None or not is_onnx_domain(producer) or producer.op_type not in moves:
                    break
                value = producer.inputs[0]
        if node.op_type in target.float_output_ops:
            continue
        stack = [node.outputs[0]]
        while stack:
            value = stack.pop()
            if value is None or not value.name or value.name in out:
                continue
            out.add(value.name)
            stack.extend(
                use.node.outputs[0]
                for use in value.uses()
                if use.idx == 0
                and is_onnx_domain(use.node)
                and (use.node.op_type in moves or use.node.op_type in ACTIVATIONS)
            )
    return frozenset(out)


def smoothable(graph: ir.Graph) -> dict[str, list[ir.Node]]:
    """Activations that MatMuls with a constant ``[K, N]`` weight read (as their input 0), with those MatMuls.

    ``smooth-quant`` can divide such a tensor per channel and multiply the weights' rows back
    (see :func:`folds_into_layer_norm` for when the division is free). Graph inputs and outputs
    are left alone.
    """
    out: dict[str, list[ir.Node]] = {}
    for node in graph:
        if node.op_type != "MatMul" or not is_onnx_domain(node) or node.inputs[1] is None:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if w.const_value is None or w.const_value.shape.rank() != 2 or x is None or x.const_value is not None:
            continue
        if not x.name or x.producer() is None or x.is_graph_output():
            continue
        out.setdefault(x.name, []).append(node)
    return out


def folds_into_layer_norm(value: ir.Value) -> bool:
    """Whether ``value`` comes out of a LayerNormalization over its last axis with a constant scale (and
    bias): dividing it per channel then only changes those constants."""
    node = value.producer()
    if (
        node is None
        or node.op_type != "LayerNormalization"
        or not is_onnx_domain(node)
        or node.outputs[0] is not value
    ):
        return False
    axis = node.attributes.get_int("axis", -1)
    if axis != -1 and not (value.shape is not None and axis == len(value.shape) - 1):
        return False
    params = [v for v in node.inputs[1:3] if v is not None]
    return bool(params) and all(v.const_value is not None and v.const_value.shape.rank() == 1 for v in params)
