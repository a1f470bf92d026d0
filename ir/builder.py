"""Write IR graphs in a few lines (tests, examples, patterns).

::

    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", ["N", 3, 8, 8])
    w = b.const("w", np.ones((4, 3, 3, 3), np.float32))
    y = b.op("Conv", [x, w], pads=[1, 1, 1, 1], name="conv0")
    a, c = b.op("Split", [y], num_outputs=2, axis=1)
    b.output(a)
    model = b.build()          # shape inference fills the types, ids assigned, verified

Node names default to the lower-cased op type and a counter (``conv0``,
``relu1``); an op's single output takes the node's name, several outputs
``name_0``, ``name_1``, ...; names are unique across the builder and its
subgraphs. ``num_outputs`` sets how many outputs a node has (and is passed on
as the attribute when the op's schema has one, as Split-18 does); every other
keyword is an attribute (numpy arrays become tensors, builders and graphs
become subgraphs). Dtypes are ncc's short names (``f32 f16 bf16 f64 i8 ...
u64 bool str``, the table of :mod:`ncc.ir.printer`), an ``ir.DataType`` or a
numpy dtype.

If/Loop bodies are nested builders that may read values of the enclosing
builders directly::

    then = b.subgraph("then")
    then.output(then.op("Relu", [x]))
    out = b.op("If", [cond], then_branch=then, else_branch=other)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir import ids
from ncc.ir.ops import is_onnx_domain
from ncc.ir.printer import DTYPE_NAMES, DTYPES_BY_NAME  # one table for the whole IR: the printer's
from ncc.ir.tensors import from_array

__all__ = ["GraphBuilder", "dtype", "DTYPE_NAMES", "DTYPES_BY_NAME"]

DTypeLike = str | ir.DataType | np.dtype | type
ShapeLike = Sequence[int | str | None] | None


def dtype(spec: DTypeLike) -> ir.DataType:
    """``"f32"`` / ``ir.DataType.FLOAT`` / ``np.float32`` as an ``ir.DataType``."""
    if isinstance(spec, ir.DataType):
        return spec
    if isinstance(spec, str):
        found = DTYPES_BY_NAME.get(spec)
        if found is None or found == ir.DataType.UNDEFINED:
            raise NccError(f"unknown dtype {spec!r}; use one of {', '.join(sorted(DTYPES_BY_NAME))}.")
        return found
    return ir.DataType.from_numpy(np.dtype(spec))


def _type(spec: DTypeLike) -> ir.TypeProtocol:
    return (
        spec
        if isinstance(spec, (ir.TensorType, ir.SequenceType, ir.OptionalType))
        else ir.TensorType(dtype(spec))
    )


class _Names:
    """Unique node and value names shared by a builder and its subgraphs."""

    def __init__(self) -> None:
        self.values: set[str] = set()
        self.nodes: set[str] = set()
        self.counters: dict[str, int] = {}

    def value(self, name: str) -> str:
        return self._fresh(name, self.values)

    def node(self, name: str | None, op_type: str) -> str:
        if name is not None:
            return self._fresh(name, self.nodes)
        base = op_type.lower()
        while True:
            k = self.counters.get(base, 0)
            self.counters[base] = k + 1
            if f"{base}{k}" not in self.nodes:
                return self._fresh(f"{base}{k}", self.nodes)

    @staticmethod
    def _fresh(name: str, taken: set[str]) -> str:
        candidate, k = name, 0
        while candidate in taken:
            k += 1
            candidate = f"{name}_{k}"
        taken.add(candidate)
        return candidate


class GraphBuilder:
    """Builds one graph; :meth:`build` wraps the top-level one in a model."""

    def __init__(
        self,
        name: str = "g",
        opset: int = 17,
        *,
        opsets: Mapping[str, int] | None = None,
        ir_version: int | None = None,
        _parent: GraphBuilder | None = None,
    ):
        self._parent = _parent
        self._root: GraphBuilder = _parent._root if _parent is not None else self
        self._names: _Names = _parent._names if _parent is not None else _Names()
        self.opsets: dict[str, int] = {"": opset, **(opsets or {})} if _parent is None else self._root.opsets
        self.ir_version = ir_version
        self.graph = ir.Graph(
            [], [], nodes=[], name=name, opset_imports=self.opsets if _parent is None else None
        )
        self.functions: list[ir.Function] = []

    # -- values

    def input(self, name: str, dtype: DTypeLike | None = None, shape: ShapeLike = None) -> ir.Value:
        """Add a graph input (``dtype`` None leaves it untyped)."""
        v = ir.Value(name=self._names.value(name), type=_type(dtype) if dtype is not None else None)
        if shape is not None:
            v.shape = ir.Shape(shape)
        self.graph.inputs.append(v)
        return v

    def const(self, name: str, array: Any) -> ir.Value:
        """Add an initializer holding ``array`` (anything ``np.asarray`` takes, or an IR tensor)."""
        name = self._names.value(name)
        # an ndarray first: isinstance against the Protocol is slow (see from_array)
        if not isinstance(array, np.ndarray) and isinstance(array, ir.TensorProtocol):
            tensor = array
        else:
            tensor = from_array(np.asarray(array), name=name)
        tensor.name = name
        v = ir.Value(
            name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape), const_value=tensor
        )
        self.graph.register_initializer(v)
        return v

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | np.ndarray | None] = (),
        *,
        name: str | None = None,
        domain: str = "",
        num_outputs: int | None = None,
        outputs: Sequence[str] | None = None,
        version: int | None = None,
        **attributes: Any,
    ) -> Any:
        """Append a node; returns its output Value, or a tuple when it has several.

        ``outputs`` names the outputs explicitly (and sets their number);
        numpy arrays among ``inputs`` become initializers named after the node.
        """
        node_name = self._names.node(name, op_type)
        if outputs is not None:
            count = len(outputs)
        else:
            count = num_outputs if num_outputs is not None else 1
        if num_outputs is not None and self._has_attribute(domain, op_type, "num_outputs"):
            attributes.setdefault("num_outputs", num_outputs)
        if not is_onnx_domain(domain) and domain not in self._root.opsets:
            self._root.opsets[domain] = 1
        values: list[ir.Value | None] = []
        for k, v in enumerate(inputs):
            if isinstance(v, (np.ndarray, np.generic)):
                v = self.const(f"{node_name}_in{k}", v)
            values.append(v)
        if outputs is not None:
            out_names = list(outputs)
        elif count == 1:
            out_names = [node_name]
        else:
            out_names = [f"{node_name}_{k}" for k in range(count)]
        out_values = [ir.Value(name=self._names.value(n) if n else "") for n in out_names]
        node = ir.node(
            op_type,
            values,
            {k: _attribute(v) for k, v in attributes.items()},
            domain=domain,
            outputs=out_values,
            version=version,
            name=node_name,
        )
        self.graph.append(node)
        return out_values[0] if count == 1 else tuple(out_values)

    def output(self, value: ir.Value, dtype: DTypeLike | None = None, shape: ShapeLike = None) -> ir.Value:
        """Make ``value`` a graph output, setting its type and shape when given."""
        if dtype is not None:
            value.type = _type(dtype)
        if shape is not None:
            value.shape = ir.Shape(shape)
        self.graph.outputs.append(value)
        return value

    def subgraph(self, name: str) -> GraphBuilder:
        """A nested builder for an If/Loop/Scan body; it may read this builder's values."""
        return GraphBuilder(name, _parent=self)

    def function(self, function: ir.Function) -> None:
        """Add a model-local function (its domain is imported at version 1 unless given)."""
        self._root.functions.append(function)
        self._root.opsets.setdefault(function.domain, 1)

    # -- the model

    def build(self, *, infer: bool = True, verify: bool = True) -> ir.Model:
        """The model: ONNX shape inference fills missing types, ids are assigned, then it is verified."""
        if self._parent is not None:
            raise NccError(
                f"subgraph builder {self.graph.name!r} has no model of its own; pass it as an attribute."
            )
        model = ir.Model(
            self.graph,
            ir_version=self.ir_version or _ir_version_for(self.opsets.get("", 17)),
            producer_name="ncc.ir.builder",
            functions=self.functions,
        )
        if infer:
            from ncc.ir.inference import InferenceFailed, infer_types

            try:
                infer_types(model, strict=True)
            except InferenceFailed as err:
                raise NccError(f"ONNX shape inference failed on graph {model.graph.name!r}: {err}") from None
        ids.assign_ids(model)
        if verify:
            from ncc.ir.verifier import verify as _verify

            _verify(model)
        return model

    def _has_attribute(self, domain: str, op_type: str, attribute: str) -> bool:
        import onnx.defs

        version = self._root.opsets.get(domain)
        if version is None or domain not in ("", "ai.onnx.ml"):
            return False
        try:
            return attribute in onnx.defs.get_schema(op_type, version, domain).attributes
        except onnx.defs.SchemaError:
            return False

    def __repr__(self) -> str:
        return f"GraphBuilder({self.graph.name!r}, {len(self.graph)} nodes)"


def _attribute(value: Any) -> Any:
    if isinstance(value, GraphBuilder):
        return value.graph
    if isinstance(value, np.ndarray):
        return from_array(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, GraphBuilder) for v in value):
        return [v.graph for v in value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, np.ndarray) for v in value):
        return [from_array(v) for v in value]
    return value


def _ir_version_for(opset: int) -> int:
    import onnx.helper

    for _release, ir_version, ai_onnx, *_ in onnx.helper.VERSION_TABLE:
        if ai_onnx >= opset:
            return ir_version
    raise NccError(f"opset {opset} is newer than this onnx package knows.")
