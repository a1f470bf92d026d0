"""Fill value types and shapes with ONNX shape inference.

The model is serialized *without its weights*: every initializer of the main
graph becomes a typed graph input (its value is dropped from the proto unless it
is tiny — at most ``_INLINE_BYTES`` bytes and already in memory, so that data
propagation can still see shape tensors such as a Reshape target). External or
large weights are never read. ``onnx.shape_inference.infer_shapes`` runs with
data propagation, and the inferred types are copied back onto the IR values by
name, graph by graph (subgraphs of If/Loop/Scan included, matched in traversal
order).

Copying back never loses information: a missing type or shape is filled; an
existing shape of the same rank is refined dimension by dimension (a known
integer beats a symbolic or unknown dimension, a named symbol beats an unknown
one); an existing shape of a different rank or a different element type is a
conflict — kept as it is, and an error when ``strict`` is set.

Function bodies are not inferred (ONNX infers them per call site only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx
import onnx_ir as ir
from ncc.errors import NccError
from ncc.passes.base import Pass, PassContext, PassResult, option

#: Initializers at most this large stay in the proto so data propagation can read them.
_INLINE_BYTES = 1024


@dataclass(frozen=True)
class ShapeInference(Pass):
    """Fill value types and shapes with ONNX shape inference (weights never loaded)."""

    name: ClassVar[str] = "shape-inference"

    strict: bool = option(
        False, "fail when inference fails or contradicts a declared type (else note and go on)"
    )

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        notes: list[str] = []
        try:
            inferred = ir.serde.deserialize_model(_infer(model, strict=self.strict))
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if self.strict:
                raise NccError(f"shape-inference: ONNX shape inference failed: {message}") from None
            note = f"ONNX shape inference failed, types left as they were: {message}"
            return PassResult(modified=False, notes=[note])

        typed = refined = conflicts = 0
        for graph, inferred_graph in zip(model.graphs(), inferred.graphs(), strict=False):
            inferred_values = _values_by_name(inferred_graph)
            for value in _values_of(graph):
                source = inferred_values.get(value.name)
                if source is None:
                    continue
                t, r, conflict = _merge_into(value, source)
                typed += t
                refined += r
                if conflict:
                    conflicts += 1
                    msg = (
                        f"value {value.name!r}: inferred {source.type}{_shape_str(source.shape)} "
                        f"contradicts declared {value.type}{_shape_str(value.shape)}"
                    )
                    if self.strict:
                        raise NccError(f"shape-inference: {msg}.")
                    notes.append(msg + "; kept the declared type")
        untyped = sum(1 for g in model.graphs() for v in _values_of(g) if v.type is None)
        stats = {"values typed": typed, "shapes refined": refined}
        if conflicts:
            stats["type conflicts"] = conflicts
        if untyped:
            stats["values still untyped"] = untyped
        return PassResult(modified=bool(typed or refined), stats=stats, notes=notes)


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
                and _nbytes(tensor) <= _INLINE_BYTES
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
        return _INLINE_BYTES + 1


def _values_of(graph: ir.Graph):
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


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    return {v.name: v for v in _values_of(graph) if v.name}


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
