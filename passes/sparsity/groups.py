"""Unit groups: output channels, FFN neurons or attention heads that layers write and read together.

Removing channel ``c`` of a Conv is only a smaller model when every node that carries the channel
axis drops ``c`` too: the activations and depthwise convs after it, a BatchNormalization's parameters,
the residual Add that mixes it with another layer's channel ``c`` (which must go as well), and, at the
end, the input channel ``c`` of every layer that reduces over the axis. A :class:`Group` is that closure:

- *producers*: MatMul / Gemm / Conv nodes with constant weights whose output units the group holds;
- *tracks*: every value carrying the units, with the axis they lie on (counted from the end) and their
  width (elements per unit along that axis: 1 for channels and neurons, the head size for heads until
  the Reshape that splits them off);
- *consumers*: MatMul / Gemm / Conv nodes reducing over the units (their weight rows or input channels);
- *through* nodes: what carries the units in between (activations, elementwise ops with per-unit
  constants, depthwise Conv, BatchNormalization, pooling, Transpose, Reshape, batched MatMul);
- *problem*: why the group cannot be slimmed (a LayerNormalization normalizing over the units, a graph
  output, a weight shared with another layer, a Reshape whose target is computed at run time), or None.

The walk goes forward from a producer's output through every use, and backward from any non-constant
operand that an elementwise op combines with a tracked value (a residual Add's other input must carry
the same units). A Reshape that splits the units' axis into ``(heads, head_size)`` makes the unit a head:
the walk restarts with producers' units ``head_size`` wide. :func:`zero_units` then tells which units
are exactly zero where every consumer reads them, from the current weights: what ``slim`` may remove
without changing any output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from ncc.ir.rewrite import constant_array, is_constant

#: f(0) == 0: a zero unit stays zero through them.
ZERO_PRESERVING = frozenset(
    {
        "Relu", "LeakyRelu", "Gelu", "HardSwish", "Tanh", "Erf", "Neg", "Abs", "Identity", "Dropout", "Sqrt",
        "Sin", "Softsign", "Elu", "Selu", "Cast", "Mish", "PRelu", "Round", "Sign", "Ceil", "Floor", "Clip",
    }
)  # fmt: skip
#: Elementwise unary ops whose output at 0 is not 0 (still one value per element: the units follow).
OTHER_UNARY = frozenset({"Sigmoid", "Exp", "Cos", "Softplus", "HardSigmoid", "Reciprocal", "Log", "Not"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"})
#: Ops over spatial axes only (the channel axis is 1): units follow, zeros stay zero.
SPATIAL = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize"})
REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2"})
LAYERS = frozenset({"MatMul", "Gemm", "Conv"})


@dataclass
class Track:
    """A value carrying the units: along ``axis`` (negative, from the end), ``width`` elements per unit."""

    value: ir.Value
    axis: int
    width: int


@dataclass
class Group:
    units: int
    producers: list[ir.Node] = field(default_factory=list)
    tracks: dict[int, Track] = field(default_factory=dict)  # id(value) -> Track
    through: list[ir.Node] = field(default_factory=list)
    consumers: list[ir.Node] = field(default_factory=list)
    #: Reshape nodes whose target names the units' size: (node, position in the target, width after)
    reshapes: list[tuple[ir.Node, int, int]] = field(default_factory=list)
    problem: str | None = None
    head_size: int = 1  # the producers' unit width: > 1 for attention heads

    @property
    def kind(self) -> str:
        if self.head_size > 1:
            return "head"
        return "channel" if any(p.op_type == "Conv" for p in self.producers) else "neuron"

    def track(self, value: ir.Value) -> Track | None:
        return self.tracks.get(id(value))

    def name(self) -> str:
        return self.producers[0].name or f"#{self.producers[0].metadata_props.get('ncc.id', '?')}"


class _Restart(Exception):
    def __init__(self, width: int):
        self.width = width


def find_groups(model: ir.Model) -> list[Group]:
    """Every unit group of ``model``'s main graph, in graph order of their first producer; refused ones
    carry their ``problem``."""
    order = {id(n): i for i, n in enumerate(model.graph)}
    seen: set[int] = set()
    groups = []
    for node in model.graph:
        if id(node) in seen or _producer_axis(node) is None:
            continue
        width = 1
        while True:
            try:
                group = _walk(node, width, order)
                break
            except _Restart as restart:
                width = restart.width
        seen.update(id(p) for p in group.producers)
        group.producers.sort(key=lambda n: order[id(n)])
        group.consumers.sort(key=lambda n: order[id(n)])
        group.through.sort(key=lambda n: order[id(n)])
        groups.append(group)
    return groups


def _producer_axis(node: ir.Node) -> tuple[int, int] | None:
    """``(axis from the end, units)`` of a layer whose output units can be removed, or None."""
    if node.op_type not in LAYERS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    shape = weight.shape if weight is not None else None
    if not is_constant(weight) or shape is None:
        return None
    if node.op_type == "MatMul" and len(shape) == 2:
        return -1, int(shape[1])
    if node.op_type == "Gemm" and len(shape) == 2:
        trans = _attr(node, "transB", 0)
        return -1, int(shape[0] if trans else shape[1])
    if node.op_type == "Conv" and len(shape) >= 3 and _attr(node, "group", 1) == 1:
        return 1 - len(shape), int(shape[0])
    return None


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _walk(start: ir.Node, width: int, order: dict[int, int]) -> Group:
    axis, size = _producer_axis(start)
    if size % width:
        return Group(
            units=size, producers=[start], problem=f"{size} outputs do not split into units of {width}"
        )
    group = Group(units=size // width, head_size=width)
    pending: list[tuple[ir.Value, Track]] = []
    visited_nodes: set[tuple[str, int]] = set()  # (role, id): p producer, t through, c consumer

    def problem(text: str) -> None:
        if group.problem is None:
            group.problem = text

    def add_producer(node: ir.Node) -> None:
        if ("p", id(node)) in visited_nodes:
            return
        visited_nodes.add(("p", id(node)))
        found = _producer_axis(node)
        if found is None or found[1] != size:
            problem(f"{_label(node)} writes the same channels but cannot drop them")
            return
        if len(node.inputs[1].uses()) > 1:
            problem(f"the weight of {_label(node)} is shared with another node")
        group.producers.append(node)
        pending.append((node.outputs[0], Track(node.outputs[0], found[0], width)))

    def reach(value: ir.Value, track: Track) -> None:
        """``value`` carries the units (found from a use): account for where it comes from."""
        track = Track(value, track.axis, track.width)
        if id(value) in group.tracks:
            known = group.tracks[id(value)]
            if (known.axis, known.width) != (track.axis, track.width):
                problem(f"{value.name} carries the units on two different axes")
            return
        pending.append((value, track))
        node = value.producer()
        if node is None:
            problem(f"the units come from graph input {value.name}")
            return
        if ("p", id(node)) in visited_nodes or ("t", id(node)) in visited_nodes:
            return
        if _producer_axis(node) is not None and node.op_type in LAYERS:
            add_producer(node)
            return
        # a through node met backward: its carrying inputs must be tracked too
        visited_nodes.add(("t", id(node)))
        _through_backward(node, track, group, reach, problem)

    add_producer(start)
    while pending:
        value, track = pending.pop()
        if id(value) in group.tracks:
            continue
        group.tracks[id(value)] = track
        if value.is_graph_output():
            problem(f"the units reach graph output {value.name}")
        for use in list(value.uses()):
            node = use.node
            _forward(node, use.idx, track, group, reach, problem, visited_nodes)
    return group


def _label(node: ir.Node) -> str:
    return f"{node.op_type} {node.name or '#' + node.metadata_props.get('ncc.id', '?')}"


def _static(value: ir.Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or len(shape) < -axis:
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _operand_role(other: ir.Value, axis: int, span: int) -> str:
    """How an elementwise op's other operand meets the units' axis: ``scalar`` (broadcast),
    ``param`` (a constant with one entry per element of the axis), ``tracked`` (a non-constant
    carrying them), or ``unknown``."""
    shape = other.shape
    rank = None if shape is None else len(shape)
    if rank is not None and rank < -axis:
        return "scalar"
    dim = _dim(other, axis)
    if dim == 1:
        return "scalar"
    if is_constant(other):
        return "param" if dim == span else "unknown"
    if dim == span or dim is None:
        return "tracked"
    return "unknown"


_BROADCASTING = frozenset(
    {"Where", "And", "Or", "Xor", "Not", "Cast", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
     "Add", "Sub", "Mul", "Div", "Neg", "Max", "Min"}
)  # fmt: skip


def _dim(value: ir.Value, axis: int, depth: int = 0) -> int | None:
    """The static size of ``value``'s ``axis`` (from the end), looking through broadcasting elementwise ops
    and ``Expand`` to a shape computed from shapes (an attention mask expanded to ``[B, 1, S, S]``)."""
    found = _static(value, axis)
    node = value.producer()
    if found is not None or node is None or depth > 12 or node.domain not in ("", "ai.onnx"):
        return found
    if node.op_type in _BROADCASTING:
        dims = []
        for operand in node.inputs:
            rank = _rank(operand)
            if rank is None:
                return None
            dims.append(1 if rank < -axis else _dim(operand, axis, depth + 1))
        if None in dims:
            return None
        return max(dims)
    if node.op_type == "Expand":
        target = _shape_values(node.inputs[1])
        rank = _rank(node.inputs[0])
        if target is None or rank is None or len(target) < -axis:
            return None
        x = 1 if rank < -axis else _dim(node.inputs[0], axis, depth + 1)
        t = target[axis]
        if x is None or t is None:
            return None
        return x if t == 1 else t if x == 1 else (x if x == t else None)
    return None


def _shape_values(value: ir.Value, depth: int = 0) -> list[int | None] | None:
    """The entries of a 1-D int64 value computed from shapes, each known or None: enough constant
    propagation to read the target of an ``Expand`` or ``Reshape`` built by an exporter at run time."""
    array = constant_array(value)
    if array is not None:
        return [int(v) for v in np.asarray(array).reshape(-1)] if array.ndim <= 1 else None
    node = value.producer()
    if node is None or depth > 16 or node.domain not in ("", "ai.onnx"):
        return None
    op, ins = node.op_type, node.inputs
    if op == "Shape":
        shape = ins[0].shape
        if shape is None:
            return None
        dims = [d if isinstance(d, int) else None for d in shape]
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        return dims[start:end]
    if op in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
        return _shape_values(ins[0], depth + 1)
    if op == "Concat":
        parts = [_shape_values(v, depth + 1) for v in ins]
        return None if any(p is None for p in parts) else [x for p in parts for x in p]
    if op == "Gather":
        data, index = _shape_values(ins[0], depth + 1), constant_array(ins[1])
        if data is None or index is None:
            return None
        return [data[int(i)] if -len(data) <= int(i) < len(data) else None for i in np.reshape(index, -1)]
    if op == "ConstantOfShape":
        length = _shape_values(ins[0], depth + 1)
        attr = node.attributes.get("value")
        fill = 0 if attr is None else int(np.asarray(attr.value.numpy()).reshape(-1)[0])
        return None if length is None or len(length) != 1 or length[0] is None else [fill] * length[0]
    if op in ("Equal", "Where", "Add", "Sub", "Mul"):
        parts = [_shape_values(v, depth + 1) for v in ins]
        if any(p is None for p in parts) or len({len(p) for p in parts if len(p) != 1}) > 1:
            return None
        n = max(len(p) for p in parts)
        parts = [p * n if len(p) == 1 else p for p in parts]
        out = []
        for items in zip(*parts):
            if op == "Where":
                c, a, b = items
                out.append(None if c is None else (a if c else b))
            elif None in items:
                out.append(None)
            else:
                a, b = items
                out.append(int({"Equal": a == b, "Add": a + b, "Sub": a - b, "Mul": a * b}[op]))
        return out
    return None


def _forward(node, index, track, group, reach, problem, visited) -> None:  # noqa: C901 - one rule per op family
    op = node.op_type
    value = node.inputs[index]
    if node.domain not in ("", "ai.onnx"):
        problem(f"{_label(node)} ({node.domain}) reads the units")
        return
    rank = _rank(value)
    if op == "Conv" and index == 0 and _depthwise(node, track):
        _through(node, group, visited)
        reach(node.outputs[0], track)
        return
    if (
        op in ("MatMul", "Gemm", "Conv")
        and index == 0
        and len(node.inputs) > 1
        and is_constant(node.inputs[1])
    ):
        ok = _consumer_ok(node, track, rank)
        if ok is not None:
            problem(ok)
            return
        if ("c", id(node)) not in visited:
            visited.add(("c", id(node)))
            group.consumers.append(node)
            if len(node.inputs[1].uses()) > 1:
                problem(f"the weight of {_label(node)} is shared with another node")
        return
    if op == "MatMul":  # both operands computed: the units must be a batch axis of both
        if rank is None or track.axis > -3 or track.width != 1:
            problem(f"{_label(node)} multiplies the units with a computed operand")
            return
        other = node.inputs[1 - index]
        _through(node, group, visited)
        reach(other, Track(other, track.axis, 1))
        reach(node.outputs[0], Track(node.outputs[0], track.axis, 1))
        return
    if op in ZERO_PRESERVING or op in OTHER_UNARY:
        if op == "PRelu" and index == 0 and not _broadcast_ok(node.inputs[1], track, group):
            problem(f"{_label(node)} has a slope tensor that does not follow the units")
            return
        _through(node, group, visited)
        if index == 0:
            reach(node.outputs[0], track)
        return
    if op in BINARY:
        span = group.units * track.width
        other_index = 1 - index
        other = node.inputs[other_index]
        role = _operand_role(other, track.axis, span)
        if role == "unknown":
            problem(f"cannot tell how {other.name} broadcasts over the units at {_label(node)}")
            return
        if role == "tracked":
            reach(other, Track(other, track.axis, track.width))
        _through(node, group, visited)
        reach(node.outputs[0], Track(node.outputs[0], track.axis, track.width))
        return
    if op == "BatchNormalization" and index == 0 and rank is not None and track.axis == 1 - rank:
        _through(node, group, visited)
        reach(node.outputs[0], track)
        return
    if op in SPATIAL and index == 0 and rank is not None and track.axis == 1 - rank:
        _through(node, group, visited)
        reach(node.outputs[0], track)
        return
    if op in REDUCE and index == 0 and rank is not None:
        axes = _reduce_axes(node, rank)
        if axes is None or (rank + track.axis) in axes:
            problem(f"{_label(node)} reduces over the units")
            return
        keep = _attr(node, "keepdims", 1)
        after = sum(1 for a in axes if a > rank + track.axis)
        _through(node, group, visited)
        reach(node.outputs[0], Track(node.outputs[0], track.axis + (0 if keep else after), track.width))
        return
    if op in ("Softmax", "LogSoftmax") and rank is not None:
        if (_attr(node, "axis", -1) % rank) == rank + track.axis:
            problem(f"{_label(node)} normalizes over the units")
            return
        _through(node, group, visited)
        reach(node.outputs[0], track)
        return
    if op == "Transpose" and rank is not None:
        perm = list(_attr(node, "perm", list(reversed(range(rank)))))
        new_axis = perm.index(rank + track.axis) - rank
        _through(node, group, visited)
        reach(node.outputs[0], Track(node.outputs[0], new_axis, track.width))
        return
    if op in ("Reshape", "Flatten") and index == 0:
        _reshape(node, track, group, reach, problem, visited)
        return
    if op == "Shape":
        problem(f"{_label(node)} reads the shape of a value carrying the units")
        return
    problem(f"{_label(node)} reads the units and cannot follow them")


def _broadcast_ok(value: ir.Value, track: Track, group: Group) -> bool:
    return _operand_role(value, track.axis, group.units * track.width) in ("scalar", "param")


def _through(node: ir.Node, group: Group, visited: set) -> None:
    if ("t", id(node)) not in visited:
        visited.add(("t", id(node)))
        group.through.append(node)


def _through_backward(node: ir.Node, track: Track, group: Group, reach, problem) -> None:
    """``node``'s output carries the units (seen from a reader): its carrying inputs do too."""
    op = node.op_type
    group.through.append(node)
    if op in ZERO_PRESERVING or op in OTHER_UNARY or op == "BatchNormalization" or op in SPATIAL:
        reach(node.inputs[0], Track(node.inputs[0], track.axis, track.width))
        return
    if op == "Conv" and _depthwise(node, track):
        reach(node.inputs[0], track)
        return
    if op in BINARY:
        span = group.units * track.width
        for operand in node.inputs:
            role = _operand_role(operand, track.axis, span)
            if role == "tracked":
                reach(operand, Track(operand, track.axis, track.width))
            elif role == "unknown":
                problem(f"cannot tell how {operand.name} broadcasts over the units at {_label(node)}")
        return
    if op in ("Softmax", "LogSoftmax", "Transpose", "Reshape", "Flatten", "MatMul"):
        source = _backward_track(node, track)
        if source is None:
            problem(f"the units also come from {_label(node)}, which cannot drop them")
            return
        reach(node.inputs[0], source)
        if op == "MatMul":
            reach(node.inputs[1], Track(node.inputs[1], track.axis, 1))
        return
    problem(f"the units also come from {_label(node)}, which cannot drop them")


def _backward_track(node: ir.Node, track: Track) -> Track | None:
    """Where the units lie on ``node``'s first input, given where they lie on its output."""
    op, src, out = node.op_type, node.inputs[0], node.outputs[0]
    in_rank, out_rank = _rank(src), _rank(out)
    if in_rank is None or out_rank is None:
        return None
    if op in ("Softmax", "LogSoftmax"):
        return (
            None
            if (_attr(node, "axis", -1) % out_rank) == out_rank + track.axis
            else Track(src, track.axis, track.width)
        )
    if op == "MatMul":
        return Track(src, track.axis, 1) if track.axis <= -3 and track.width == 1 else None
    if op == "Transpose":
        perm = list(_attr(node, "perm", list(reversed(range(in_rank)))))
        return Track(src, perm[out_rank + track.axis] - in_rank, track.width)
    # Reshape / Flatten: the inverse of the cases _reshape follows
    if track.axis == -2 and track.width == 1 and out_rank == in_rank + 1 and _static(out, -1) is not None:
        return Track(src, -1, _static(out, -1))  # a split
    if track.axis == -1 and out_rank < in_rank:  # a merge of the units' axis with static axes after it
        k = in_rank - out_rank + 1
        tail = [_static(src, a) for a in range(-k + 1, 0)]
        if None in tail or track.width % int(np.prod(tail, dtype=np.int64)):
            return None
        return Track(src, -k, track.width // int(np.prod(tail, dtype=np.int64)))
    if out_rank >= -track.axis and in_rank >= -track.axis:
        return Track(src, track.axis, track.width)
    return None


def _consumer_ok(node: ir.Node, track: Track, rank: int | None) -> str | None:
    """None when ``node`` reduces over the units through its weight, else why not."""
    weight = node.inputs[1].shape
    if node.op_type == "MatMul":
        if track.axis != -1 or weight is None or len(weight) != 2:
            return f"{_label(node)} reads the units on an axis it does not reduce over"
        return None
    if node.op_type == "Gemm":
        if track.axis != -1 or _attr(node, "transA", 0):
            return f"{_label(node)} reads the units transposed"
        return None
    if rank is None or track.axis != 1 - rank or track.width != 1:
        return f"{_label(node)} reads the units on an axis other than its input channels"
    if _attr(node, "group", 1) != 1:
        return f"{_label(node)} is a grouped convolution"
    return None


def _depthwise(node: ir.Node, track: Track) -> bool:
    """A Conv with one group per channel (weight ``[C, 1, ...]``) reading the units as its channels."""
    if node.op_type != "Conv" or len(node.inputs) < 2 or not is_constant(node.inputs[1]):
        return False
    shape = node.inputs[1].shape
    rank = _rank(node.inputs[0])
    if shape is None or rank is None or track.axis != 1 - rank or track.width != 1:
        return False
    groups = _attr(node, "group", 1)
    return groups > 1 and shape[1] == 1 and shape[0] == groups


def _reduce_axes(node: ir.Node, rank: int) -> set[int] | None:
    axes = _attr(node, "axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant_array(node.inputs[1])
        if array is None:
            return None
        axes = array.tolist()
    if axes is None:
        return set(range(rank))
    return {a % rank for a in axes}


def _reshape(node, track, group, reach, problem, visited) -> None:
    """Follow the units through a Reshape or Flatten: an axis split into (units, rest), an axis merged
    with the static axes after it, or axes before the units rearranged."""
    src, out = node.inputs[0], node.outputs[0]
    in_rank, out_rank = _rank(src), _rank(out)
    if in_rank is None or out_rank is None:
        problem(f"{_label(node)} has no known ranks")
        return
    tail_in = [_static(src, a) for a in range(track.axis + 1, 0)]  # the axes after the units
    if node.op_type == "Flatten":
        axis = _attr(node, "axis", 1) % in_rank
        if axis != in_rank + track.axis or None in tail_in:
            problem(f"{_label(node)} does not flatten from the units' axis")
            return
        _through(node, group, visited)
        reach(out, Track(out, -1, track.width * int(np.prod(tail_in, dtype=np.int64))))
        return
    # same static tail: the units keep their axis counted from the end (leading axes merged or split)
    k = -track.axis
    if out_rank >= k and all(_static(out, -j) == tail_in[-j] for j in range(1, k)) and None not in tail_in:
        if _static(out, track.axis) in (None, group.units * track.width):
            if out_rank - k >= 0 and in_rank - k >= 0:
                position = out_rank + track.axis
                if (why := retarget_problem(node, position)) is not None:
                    problem(why)
                    return
                group.reshapes.append((node, position, track.width))
                _through(node, group, visited)
                reach(out, Track(out, track.axis, track.width))
                return
    # split: [..., U*w] -> [..., U, w] (a head split)
    if track.axis == -1 and out_rank == in_rank + 1:
        last = _static(out, -1)
        if last is not None and last == track.width and _static(out, -2) in (None, group.units):
            if (why := retarget_problem(node, out_rank - 2)) is not None:
                problem(why)
                return
            group.reshapes.append((node, out_rank - 2, 1))
            _through(node, group, visited)
            reach(out, Track(out, -2, 1))
            return
        if last is not None and group.head_size == 1 and last > 1 and (group.units * track.width) % last == 0:
            raise _Restart(last)
        problem(f"{_label(node)} splits the units")
        return
    # merge: [..., U, a, b] -> [..., U*a*b] (the units' axis with the static axes after it)
    if track.axis < -1 and out_rank == in_rank + track.axis + 1 and None not in tail_in:
        width = track.width * int(np.prod(tail_in, dtype=np.int64))
        if (why := retarget_problem(node, out_rank - 1)) is not None:
            problem(why)
            return
        group.reshapes.append((node, out_rank - 1, width))
        _through(node, group, visited)
        reach(out, Track(out, -1, width))
        return
    problem(f"{_label(node)} reshapes the units' axis in a way slimming cannot follow")


def target_piece(node: ir.Node, position: int) -> tuple[ir.Node | None, int, ir.Value] | None:
    """Where entry ``position`` of a Reshape's target is written: ``(concat or None, input index, the
    constant holding it)`` with the entry's index in that constant, or None when it is computed at run
    time. (Flatten has no target.)"""
    if node.op_type != "Reshape":
        return None
    target = node.inputs[1]
    if constant_array(target) is not None:
        return None, 1, target
    concat = target.producer()
    if concat is None or concat.op_type != "Concat":
        return None
    offset = 0
    for index, piece in enumerate(concat.inputs):
        length = _static(piece, -1) if _rank(piece) == 1 else None
        if length is None:
            return None
        if offset <= position < offset + length:
            return (concat, index, piece) if constant_array(piece) is not None else None
        offset += length
    return None


def retarget_problem(node: ir.Node, position: int) -> str | None:
    """None when slimming can rewrite (or need not touch) entry ``position`` of ``node``'s target shape."""
    if node.op_type != "Reshape":
        return None
    values = _shape_values(node.inputs[1])
    if values is not None and position < len(values) and values[position] in (-1, 0):
        return None  # inferred or copied: follows the input
    if target_piece(node, position) is None:
        return f"the target shape of {_label(node)} is computed at run time"
    return None


# -- which units are zero --------------------------------------------------------------------------


def unit_slice(array: np.ndarray, axis: int, units: np.ndarray, width: int) -> np.ndarray:
    """The elements of ``units`` (unit indices) along ``axis`` of ``array``, ``width`` per unit."""
    index = (units[:, None] * width + np.arange(width)[None, :]).reshape(-1)
    return np.take(array, index, axis=axis)


def _units_zero(array: np.ndarray | None, axis: int, units: int, width: int) -> np.ndarray:
    """Per unit: whether ``array`` is zero on all of its elements along ``axis`` (from the end)."""
    if array is None:
        return np.zeros(units, dtype=bool)
    if array.ndim < -axis or array.shape[axis] == 1:
        return np.full(units, bool(np.all(array == 0)))
    moved = np.moveaxis(array, axis, 0).reshape(units, -1)
    return ~np.any(moved != 0, axis=1)


def producer_weight_axis(node: ir.Node) -> int:
    """The axis of a producer's weight that holds its output units."""
    if node.op_type == "MatMul":
        return -1
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return 0


def consumer_weight_axis(node: ir.Node) -> int:
    """The axis of a consumer's weight that holds its input units."""
    if node.op_type == "MatMul":
        return 0
    if node.op_type == "Gemm":
        return 1 if _attr(node, "transB", 0) else 0
    return 1


def zero_units(group: Group) -> np.ndarray:
    """Per unit: whether it is exactly zero at the input of every consumer (so removing it changes no
    output), from the current weights and parameters; for a group no layer reads, whether every producer
    writes zero."""
    units = group.units
    zero: dict[int, np.ndarray] = {}
    none = np.zeros(units, dtype=bool)
    for node in group.producers:
        w = constant_array(node.inputs[1])
        axis = producer_weight_axis(node)
        z = _units_zero(np.moveaxis(w, axis, -1), -1, units, group.head_size)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            z &= _units_zero(constant_array(node.inputs[2]), -1, units, group.head_size)
        zero[id(node.outputs[0])] = z
    for node in group.through:  # graph order: inputs before outputs
        out = node.outputs[0]
        track = group.track(out)
        if track is None:
            continue
        ins = [
            zero.get(id(v), none) if v is not None and group.track(v) is not None else None
            for v in node.inputs
        ]
        zero[id(out)] = _through_zero(node, ins, track, group)
    result = np.ones(units, dtype=bool)
    if not group.consumers:
        for node in group.producers:
            result &= zero[id(node.outputs[0])]
        return result
    for node in group.consumers:
        result &= zero.get(id(node.inputs[0]), none)
    return result


def _through_zero(node: ir.Node, ins: list, track: Track, group: Group) -> np.ndarray:  # noqa: C901
    op, units = node.op_type, group.units
    none = np.zeros(units, dtype=bool)
    first = ins[0] if ins[0] is not None else none
    if op == "Clip":  # Clip(0) is 0 when 0 lies within its bounds
        low, high = (
            constant_array(v) if v is not None else None for v in (list(node.inputs) + [None, None])[1:3]
        )
        inside = (low is None or float(np.max(low)) <= 0) and (high is None or float(np.min(high)) >= 0)
        return first if inside else none
    if op in ZERO_PRESERVING:
        return first
    if op in OTHER_UNARY or op in ("Softmax", "LogSoftmax"):
        return none
    if op in SPATIAL or op in REDUCE or op in ("Transpose", "Reshape", "Flatten"):
        return first
    if op == "MatMul":
        return (ins[0] if ins[0] is not None else none) | (ins[1] if ins[1] is not None else none)
    if op == "Conv":  # depthwise: a zero input channel gives its bias
        bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        w = constant_array(node.inputs[1])
        w_zero = _units_zero(w.reshape(w.shape[0], -1).T, -1, units, 1)
        b_zero = _units_zero(bias, -1, units, 1) if bias is not None else np.ones(units, dtype=bool)
        return (first | w_zero) & b_zero
    if op == "BatchNormalization":
        scale, b, mean, var = (constant_array(v) for v in node.inputs[1:5])
        if any(a is None for a in (scale, b, mean, var)):
            return none
        eps = _attr(node, "epsilon", 1e-5)
        shift = b - scale * mean / np.sqrt(var + eps)
        return (first & (shift == 0)) | ((scale == 0) & (b == 0))
    if op in BINARY:
        parts = []
        for value, known in zip(node.inputs, ins):
            if known is not None:
                parts.append(known)
            else:
                array = constant_array(value)
                parts.append(
                    _units_zero(array, track.axis, units, track.width) if array is not None else none
                )
        if op == "Mul":
            return parts[0] | parts[1]
        if op == "Div":
            return parts[0]
        if op in ("Add", "Sub", "Max", "Min"):
            return parts[0] & parts[1]
        return none
    return none
