"""ONNX shape inference on the IR: the one place that runs ``onnx.shape_inference`` and copies the
result back.

The model is serialized *without its weights*: every initializer of the main graph becomes a typed
graph input, its value dropped from the proto unless it is tiny — at most :data:`INLINE_BYTES` bytes
and already in memory, so that data propagation still sees shape tensors such as a Reshape target.
External or large weights are never read. ``onnx.shape_inference.infer_shapes`` runs with data
propagation (``strict``: also with ONNX's type checks and strict mode, so a node it cannot infer is an
error), and the inferred types are copied back onto the IR values by name, graph by graph (subgraphs
of If/Loop/Scan included, matched in traversal order). The model's initializers come back in their
order.

Copying back never loses information: a missing type or shape is filled; an existing shape of the same
rank is refined dimension by dimension (a known integer beats a symbolic or unknown dimension, a named
symbol beats an unknown one); an existing shape of a different rank or a different element type is a
conflict, kept as it is and reported to the caller.

Function bodies are not inferred (ONNX infers them per call site only).

onnx-ir has this pass (``onnx_ir.passes.common.ShapeInferencePass``, over ``_c_api_utils.call_onnx_api``)
but it does not do the job here: it logs a failure and returns the model unchanged where ncc must say
why (the builder and the frontend raise, the pass notes or raises); its merge overwrites every declared
type and shape with the inferred one, so a contradiction goes unseen; and it registers the weights it
took out after the ones it left in, which reorders the printed initializers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

__all__ = ["INLINE_BYTES", "InferenceFailed", "Inferred", "infer_types"]

INLINE_BYTES = 1024
"""Initializers at most this large stay in the proto so data propagation can read them."""


class InferenceFailed(Exception):
    """ONNX shape inference rejected the model; the message is the first line of ONNX's."""


@dataclass
class Inferred:
    """What :func:`infer_types` changed: values given a type, shapes refined, and one sentence per
    value whose inferred type contradicts its declared one (kept)."""

    typed: int = 0
    refined: int = 0
    conflicts: list[str] = field(default_factory=list)


def infer_types(model: ir.Model, *, strict: bool = False) -> Inferred:
    """Fill and refine ``model``'s value types and shapes from ONNX shape inference (see the module
    docstring); raises :class:`InferenceFailed` when ONNX fails (in ``strict`` mode, on any node it
    cannot infer)."""
    try:
        proto = _infer(model, strict=strict)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as err:
        text = str(err).strip()
        raise InferenceFailed(text.splitlines()[0] if text else type(err).__name__) from None
    inferred = ir.serde.deserialize_model(proto)
    result = Inferred()
    for graph, inferred_graph in zip(model.graphs(), inferred.graphs(), strict=False):
        inferred_values = {v.name: v for v in values_of(inferred_graph) if v.name}
        for value in values_of(graph):
            source = inferred_values.get(value.name)
            if source is None:
                continue
            typed, refined, conflict = _merge_into(value, source)
            result.typed += typed
            result.refined += refined
            if conflict:
                result.conflicts.append(
                    f"value {value.name!r}: inferred {source.type}{_shape_str(source.shape)} "
                    f"contradicts declared {value.type}{_shape_str(value.shape)}"
                )
    contrib = _type_like_input(model)
    if contrib:  # what reads those outputs can be inferred now
        again = infer_types(model, strict=strict)
        result.typed += contrib + again.typed
        result.refined += again.refined
        result.conflicts += [c for c in again.conflicts if c not in result.conflicts]
    return result


LIKE_INPUT = frozenset({"Gelu", "FastGelu", "QuickGelu", "FusedConv"})
"""``com.microsoft`` ops ncc writes whose output 0 has input 0's element type (and, but FusedConv, its
shape): ONNX's inference has no schema for them, so a model ncc wrote without ``value_info`` (its INT8
default) would read back with them untyped."""


TYPED_BY_INPUT = {
    "QLinearAdd": 7,
    "QLinearMul": 7,
    "QLinearSigmoid": 4,
    "QLinearLeakyRelu": 4,
    "QLinearSoftmax": 4,
    "QLinearAveragePool": 4,
    "QLinearGlobalAveragePool": 4,
    "QLinearConcat": 1,
    "QLinearWhere": 8,
    "QGemm": 8,
    "MatMulIntegerToFloat": 2,
}
"""``com.microsoft`` integer kernels (onnxruntime's QOperator form, as its quantizer writes it, without
``value_info``) whose output 0 has the element type of this input: the output zero point (QGemm: a float
output without one; MatMulIntegerToFloat: its A scale's float type)."""


def _type_like_input(model: ir.Model) -> int:
    """Type the untyped output 0 of :data:`LIKE_INPUT` ops from their typed input 0, and of
    :data:`TYPED_BY_INPUT` ops from their input; how many were typed."""
    typed = 0
    for graph in model.graphs():
        for node in graph:
            if node.domain != "com.microsoft" or not node.outputs or node.outputs[0].type is not None:
                continue
            out = node.outputs[0]
            if node.op_type in LIKE_INPUT:
                source = node.inputs[0] if node.inputs else None
                if source is None or source.type is None:
                    continue
                out.type = source.type
                if node.op_type != "FusedConv" and out.shape is None and source.shape is not None:
                    out.shape = source.shape.copy()
            elif node.op_type in TYPED_BY_INPUT:
                index = TYPED_BY_INPUT[node.op_type]
                source = node.inputs[index] if len(node.inputs) > index else None
                if source is None and node.op_type == "QGemm":  # no output scale: float output
                    source = node.inputs[1]
                if source is None or source.type is None:
                    continue
                out.type = ir.TensorType(source.dtype)
            else:
                continue
            typed += 1
    return typed


def values_of(graph: ir.Graph):
    """Inputs, initializers and node outputs of ``graph`` itself (not its subgraphs)."""
    seen: set[int] = set()
    for value in (*graph.inputs, *graph.initializers.values()):
        if id(value) not in seen:
            seen.add(id(value))
            yield value
    for node in graph:
        for value in node.outputs:
            if value.name:
                yield value


def _infer(model: ir.Model, *, strict: bool) -> onnx.ModelProto:
    """Serialize ``model`` with weights replaced by typed inputs and run ONNX inference."""
    graph = model.graph
    initializers = list(graph.initializers.values())
    saved = {v.name: v.const_value for v in initializers}
    inputs_before = list(graph.inputs)
    try:
        for value in initializers:
            tensor = value.const_value
            if tensor is not None:
                if value.dtype is None:
                    value.dtype = tensor.dtype
                if value.shape is None:
                    value.shape = ir.Shape(tensor.shape)
            if not value.is_graph_input():
                graph.inputs.append(value)
            keep = (
                tensor is not None
                and not isinstance(tensor, ir.ExternalTensor)
                and _nbytes(tensor) <= INLINE_BYTES
            )
            if not keep:
                graph.initializers.pop(value.name)
                value.const_value = None
        proto = ir.serde.serialize_model(model)
    finally:
        graph.inputs.clear()
        graph.inputs.extend(inputs_before)
        graph.initializers.clear()
        for value in initializers:  # restore in the original order (the printed order)
            value.const_value = saved[value.name]
            graph.initializers.add(value)
    return onnx.shape_inference.infer_shapes(proto, check_type=strict, strict_mode=strict, data_prop=True)


def _nbytes(tensor: ir.TensorProtocol) -> int:
    try:
        return tensor.nbytes
    except Exception:  # string tensors: size unknown without reading
        return INLINE_BYTES + 1


def _shape_str(shape: ir.Shape | None) -> str:
    return "" if shape is None else str(shape)


def _merge_into(value: ir.Value, source: ir.Value) -> tuple[int, int, bool]:
    """Copy ``source``'s type/shape onto ``value``; returns (typed, refined, conflict)."""
    typed = refined = 0
    if source.type is not None:
        if value.type is None:
            value.type = source.type
            typed = 1
        elif value.type != source.type:
            return 0, 0, True
    if source.shape is None:
        return typed, 0, False
    if value.shape is None:
        value.shape = ir.Shape(list(source.shape.dims))
        return typed, 0 if typed else 1, False
    if len(value.shape) != len(source.shape):
        return typed, 0, True
    dims = list(value.shape.dims)
    changed = False
    for i, (old, new) in enumerate(zip(value.shape.dims, source.shape.dims, strict=True)):
        if isinstance(old, int):
            if isinstance(new, int) and new != old:
                return typed, 0, True
            continue
        if isinstance(new, int) or (new.value is not None and old.value is None):
            dims[i] = new
            changed = True
    if changed:
        value.shape = ir.Shape(dims)
        refined = 1
    return typed, refined, False
