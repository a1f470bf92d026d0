"""ATen -> IR: a ``torch.export`` program's graph translated node by node into ncc's IR.

The torch frontend's fast route. ``torch.export`` (non-strict, no decompositions) gives a graph of ATen
ops at the example inputs' static shapes; each FX node becomes the ONNX-domain nodes that compute it, and
every IR node keeps the FX node it came from (``FX_NODE``, the node as torch prints it) and the module
path it was called under (``namespace``), as the torch.onnx route keeps them. Value types come from the
program's own metadata (each FX node's fake tensor), so nothing is inferred again.

Parts of the graph that do not depend on the user's inputs (``arange`` masks, position ids sliced from a
buffer, a scalar ``zeros``) are computed here, with torch, and enter the IR as constants. Parameters and
buffers become initializers; a ``linear`` weight becomes the ``[K, N]`` initializer a MatMul reads (a
rank-2 ``linear`` is a ``Gemm(transB=1)``, as torch.onnx writes it).

An op without a rule here, a symbolic shape or a dtype numpy cannot hold raises :class:`Unsupported`
naming it; the caller then takes torch.onnx's exporter, which covers the long tail of ATen.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from ncc.ir.rewrite import Rewriter

FX_NODE = "pkg.torch.onnx.fx_node"
"""Node metadata: the FX node (of the exported program) an IR node was made from, as torch prints it."""

OPSET = 20
"""The standard-domain opset the IR imports (Gelu with ``approximate`` needs 20), as torch.onnx's export."""

FOLD_LIMIT = 1 << 22
"""Most elements of a tensor computed at translation time from constants; larger ones stay ops."""


class Unsupported(Exception):
    """The program holds something this translator has no rule for (the message says what)."""


def translate(
    program: Any, input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None
) -> ir.Model:
    """``program`` (a ``torch.export.ExportedProgram`` with static shapes) as an IR model."""
    return _Translator(program).run(input_names, output_names)


class _Const:
    """A tensor known at translation time: a parameter, a buffer, or something computed from them."""

    __slots__ = ("tensor", "name", "value")

    def __init__(self, tensor, name: str):
        self.tensor, self.name, self.value = tensor, name, None


class _Translator:
    def __init__(self, program: Any):
        import torch

        self.torch = torch
        self.program = program
        self.graph = ir.Graph([], [], nodes=[], opset_imports={"": OPSET}, name="main_graph")
        self.model = ir.Model(self.graph, ir_version=10, producer_name="ncc", producer_version="torch.export")
        self.rw = Rewriter(self.model, self.graph)  # fresh names and initializers
        self.env: dict[Any, Any] = {}  # FX node -> ir.Value | _Const | tuple of those | None
        self.fx = None  # the FX node being translated
        self.weights_kn: dict[int, ir.Value] = {}

    # -- the walk -----------------------------------------------------------------------------------

    def run(self, input_names, output_names) -> ir.Model:
        program, torch = self.program, self.torch
        specs = {spec.arg.name: spec for spec in program.graph_signature.input_specs}
        mutated = [
            spec.kind.name for spec in program.graph_signature.output_specs if spec.kind.name != "USER_OUTPUT"
        ]
        if mutated:  # outputs that write back into buffers or inputs: state the IR has no place for
            raise Unsupported(f"the program mutates state ({', '.join(sorted(set(mutated))).lower()})")
        state = {**program.state_dict, **program.constants}
        user = 0
        for node in program.graph_module.graph.nodes:
            self.fx = node
            if node.op == "placeholder":
                spec = specs.get(node.name)
                if spec is None or spec.kind.name == "USER_INPUT":
                    name = input_names[user] if input_names and user < len(input_names) else node.name
                    user += 1
                    value = self.new_value(name, node.meta.get("val"))
                    self.graph.inputs.append(value)
                    self.env[node] = value
                elif spec.target in state and isinstance(state[spec.target], torch.Tensor):
                    self.env[node] = _Const(state[spec.target].detach(), spec.target)
                else:
                    raise Unsupported(f"input {node.name!r} ({spec.kind.name.lower()}) has no tensor")
            elif node.op == "call_function":
                self.env[node] = self.call(node)
            elif node.op == "output":
                results = node.args[0]
                for i, item in enumerate(results):
                    name = (
                        output_names[i]
                        if output_names and i < len(output_names)
                        else getattr(item, "name", None)
                    )
                    self.graph.outputs.append(self.output(self.env[item], name or f"output_{i}", node))
            else:
                raise Unsupported(f"FX node kind {node.op!r} ({node.name})")
        self.fx = None
        return self.model

    def call(self, node):
        target = node.target
        if target is operator.getitem:
            source, index = node.args
            return self.env[source][index]
        name = str(target)
        if name == "aten._assert_tensor_metadata.default":
            return None
        schema = getattr(target, "_schema", None)
        if schema is not None and schema.is_mutable:  # never run here: it would write into the module's state
            raise Unsupported(f"{name} ({node.name}) writes in place")
        folded = self.fold(node)
        if folded is not None:
            return folded
        rule: Callable | None = _RULES.get(name)
        if rule is None:
            raise Unsupported(f"{name} ({node.name}) has no direct rule")
        args = [self.arg(a) for a in node.args]
        kwargs = {k: self.arg(v) for k, v in node.kwargs.items()}
        return rule(self, *args, **kwargs)

    def arg(self, a):
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a)
        return self.env[a] if isinstance(a, self.torch.fx.Node) else a

    def fold(self, node):
        """The node's result computed now when every tensor it reads is known (small results only)."""
        torch = self.torch

        def real(a):
            if isinstance(a, (list, tuple)):
                return type(a)(real(x) for x in a)
            if isinstance(a, torch.fx.Node):
                entry = self.env[a]
                if not isinstance(entry, _Const):
                    raise LookupError
                return entry.tensor
            return a

        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.numel() > FOLD_LIMIT:
            return None
        try:
            args, kwargs = real(node.args), {k: real(v) for k, v in node.kwargs.items()}
        except LookupError:
            return None
        with torch.no_grad():
            result = node.target(*args, **kwargs)
        return _Const(result, node.name) if isinstance(result, torch.Tensor) else None

    # -- values ---------------------------------------------------------------------------------------

    def unique(self, name: str) -> str:
        return self.rw.fresh_name(name)

    def new_value(self, name: str, val) -> ir.Value:
        dtype, shape = self.type_of(val)
        return ir.Value(name=self.unique(name), type=ir.TensorType(dtype), shape=ir.Shape(shape))

    def type_of(self, val) -> tuple[ir.DataType, list[int]]:
        torch = self.torch
        if not isinstance(val, torch.Tensor):
            raise Unsupported(f"{self.fx.name} has no tensor type")
        shape = []
        for d in val.shape:
            if not isinstance(d, int):
                raise Unsupported(f"{self.fx.name} has a symbolic shape")
            shape.append(int(d))
        return _dtype(val.dtype), shape

    def value(self, entry, dtype: ir.DataType | None = None) -> ir.Value:
        """``entry`` as an IR value (a constant becomes an initializer once), cast to ``dtype`` if given."""
        if isinstance(entry, _Const):
            if entry.value is None:
                array = _numpy(entry.tensor)
                entry.value = self.initializer(entry.name, array)
            value = entry.value
        elif isinstance(entry, ir.Value):
            value = entry
        elif isinstance(entry, (bool, int, float)):
            return self.scalar(entry, dtype or ir.DataType.FLOAT)
        else:
            raise Unsupported(f"{self.fx.name} reads a {type(entry).__name__} where a tensor belongs")
        if dtype is not None and value.dtype != dtype:
            if value.const_value is not None:
                array = value.const_value.numpy().astype(dtype.numpy())
                return self.initializer(f"{value.name}.{dtype.name.lower()}", array)
            return self.emit("Cast", [value], {"to": dtype}, dtype=dtype, shape=list(value.shape))
        return value

    def initializer(self, name: str, array: np.ndarray) -> ir.Value:
        return self.rw.constant(array, name)

    def scalar(self, number, dtype: ir.DataType, shape: Sequence[int] = ()) -> ir.Value:
        array = np.full(shape, number, dtype=dtype.numpy())
        return self.initializer(f"{self.fx.name}_const", array)

    def ints(self, numbers: Sequence[int]) -> ir.Value:
        return self.initializer(f"{self.fx.name}_ints", np.asarray(list(numbers), np.int64))

    # -- nodes ----------------------------------------------------------------------------------------

    def emit(self, op_type: str, inputs, attributes=None, *, dtype=None, shape=None) -> ir.Value:
        """Append an ``op_type`` node; its output has the FX node's type unless ``dtype``/``shape`` say
        otherwise (the inner values of a multi-node expansion)."""
        fx = self.fx
        if dtype is None or shape is None:
            own_dtype, own_shape = self.out_type()
            dtype, shape = dtype or own_dtype, own_shape if shape is None else shape
        value = ir.Value(name=self.unique(fx.name), type=ir.TensorType(dtype), shape=ir.Shape(shape))
        attrs = [
            ir.convenience.convert_attribute(k, v) for k, v in (attributes or {}).items() if v is not None
        ]
        node = ir.Node("", op_type, list(inputs), attrs, outputs=[value], name=self.unique(f"node_{fx.name}"))
        node.metadata_props[FX_NODE] = fx.format_node()
        scope = _namespace(fx)
        if scope:
            node.metadata_props["namespace"] = scope
        self.graph.append(node)
        return value

    def out_type(self) -> tuple[ir.DataType, list[int]]:
        val = self.fx.meta.get("val")
        return self.type_of(val[0] if isinstance(val, (tuple, list)) else val)

    def output(self, entry, name: str, fx) -> ir.Value:
        """``entry`` as the graph output ``name``: renamed, or behind an Identity when it is a graph input, a
        constant or already another output."""
        value = self.value(entry)
        if value.producer() is None or value.is_graph_output():
            out = ir.Value(name=self.unique(name), type=value.type, shape=value.shape)
            node = ir.Node("", "Identity", [value], outputs=[out], name=self.unique(f"node_{name}"))
            node.metadata_props[FX_NODE] = fx.format_node()
            self.graph.append(node)
            return out
        if value.name != name:
            value.name = self.unique(name)
        return value

    # -- shared shapes ------------------------------------------------------------------------------

    def reshape(self, x) -> ir.Value:
        _, shape = self.out_type()
        x = self.value(x)
        if list(x.shape) == shape:
            return x
        return self.emit("Reshape", [x, self.ints(shape)])

    def promoted(self, a, b) -> ir.DataType:
        torch = self.torch

        def sample(e):
            if isinstance(e, _Const):
                return e.tensor
            if isinstance(e, ir.Value):  # rank matters: a 0-d tensor promotes like a scalar
                return torch.empty([1] * len(e.shape), dtype=_torch_dtype(e.dtype))
            return e

        return _dtype(torch.result_type(sample(a), sample(b)))


# -- rules: one per ATen op (overloads sharing a rule are listed together at the end) ---------------


def _identity(t: _Translator, x, *args, **kwargs):
    return x


def _to(t: _Translator, x, *args, **kwargs):
    dtype, _ = t.out_type()
    return t.value(x, dtype)


def _binary(op_type: str, arithmetic: bool = True):
    def rule(t: _Translator, a, b, *, alpha=1, rounding_mode=None):
        if rounding_mode is not None:
            raise Unsupported(f"division with rounding_mode={rounding_mode!r}")
        dtype = t.out_type()[0] if arithmetic else t.promoted(a, b)
        a, b = t.value(a, dtype), t.value(b, dtype)
        if alpha != 1:
            b = t.emit("Mul", [b, t.scalar(alpha, dtype)], dtype=dtype, shape=list(b.shape))
        return t.emit(op_type, [a, b])

    return rule


def _not_equal(t: _Translator, a, b):
    dtype = t.promoted(a, b)
    equal = t.emit("Equal", [t.value(a, dtype), t.value(b, dtype)])
    return t.emit("Not", [equal])


def _unary(op_type: str):
    def rule(t: _Translator, x, *args):
        return t.emit(op_type, [t.value(x)])

    return rule


def _rsqrt(t: _Translator, x):
    x = t.value(x)
    root = t.emit("Sqrt", [x], shape=list(x.shape))
    return t.emit("Reciprocal", [root])


def _silu(t: _Translator, x):
    x = t.value(x)
    gate = t.emit("Sigmoid", [x], shape=list(x.shape))
    return t.emit("Mul", [x, gate])


def _pow(t: _Translator, x, exponent):
    dtype, _ = t.out_type()
    return t.emit("Pow", [t.value(x, dtype), t.value(exponent, dtype)])


def _clip(t: _Translator, x, low=None, high=None):
    dtype, _ = t.out_type()
    bounds = [None if v is None else t.scalar(v, dtype) for v in (low, high)]
    return t.emit("Clip", [t.value(x), *bounds])


def _hardtanh(t: _Translator, x, low=-1.0, high=1.0):
    return _clip(t, x, low, high)


def _relu6(t: _Translator, x, inplace=False):
    return _clip(t, x, 0.0, 6.0)


def _leaky_relu(t: _Translator, x, slope=0.01):
    return t.emit("LeakyRelu", [t.value(x)], {"alpha": float(slope)})


def _gelu(t: _Translator, x, approximate="none"):
    return t.emit("Gelu", [t.value(x)], {"approximate": approximate})


def _softmax(t: _Translator, x, dim, *args):
    return t.emit("Softmax", [t.value(x)], {"axis": int(dim)})


def _conv(t: _Translator, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    x, w = t.value(x), t.value(w)
    spatial = len(w.shape) - 2
    strides, dilations = _per_dim(stride, spatial), _per_dim(dilation, spatial)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [0] * spatial * 2
        else:  # "same": torch pads the odd remainder at the end
            total = [d * (k - 1) for d, k in zip(dilations, w.shape[2:])]
            pads = [p // 2 for p in total] + [p - p // 2 for p in total]
    else:
        pads = _per_dim(padding, spatial) * 2
    inputs = [x, w] + ([t.value(b)] if b is not None else [])
    attrs = {"strides": strides, "pads": pads, "dilations": dilations, "group": int(groups)}
    attrs["kernel_shape"] = [int(k) for k in w.shape[2:]]
    return t.emit("Conv", inputs, attrs)


def _convolution(t: _Translator, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    if transposed:
        raise Unsupported("transposed convolution")
    return _conv(t, x, w, b, stride, padding, dilation, groups)


def _batch_norm(t: _Translator, x, w, b, mean, var, training, momentum, eps, *cudnn):
    if training:
        raise Unsupported("batch_norm in training mode")
    return _bn(t, x, w, b, mean, var, eps)


def _bn_no_training(t: _Translator, x, w, b, mean, var, momentum, eps):
    return (_bn(t, x, w, b, mean, var, eps), None, None)


def _bn(t: _Translator, x, w, b, mean, var, eps):
    x = t.value(x)
    channels = x.shape[1]
    dtype = x.dtype
    scale = t.value(w) if w is not None else t.scalar(1.0, dtype, [channels])
    bias = t.value(b) if b is not None else t.scalar(0.0, dtype, [channels])
    return t.emit(
        "BatchNormalization", [x, scale, bias, t.value(mean), t.value(var)], {"epsilon": float(eps)}
    )


def _layer_norm(t: _Translator, x, shape, w=None, b=None, eps=1e-5, *cudnn):
    x = t.value(x)
    scale = t.value(w) if w is not None else t.scalar(1.0, x.dtype, list(shape))
    inputs = [x, scale] + ([t.value(b)] if b is not None else [])
    return t.emit("LayerNormalization", inputs, {"axis": -len(shape), "epsilon": float(eps)})


def _linear(t: _Translator, x, w, b=None):
    x = t.value(x)
    if len(x.shape) == 2:
        inputs = [x, t.value(w)] + ([t.value(b)] if b is not None else [])
        return t.emit("Gemm", inputs, {"transB": 1})
    if isinstance(w, _Const):
        weight = t.weights_kn.get(id(w))
        if weight is None:  # torch stores [N, K]; a MatMul reads [K, N]
            weight = t.initializer(f"{w.name}.T", _numpy(w.tensor.detach().t().contiguous(), copy=False))
            t.weights_kn[id(w)] = weight
    else:
        w = t.value(w)
        weight = t.emit("Transpose", [w], {"perm": [1, 0]}, shape=[w.shape[1], w.shape[0]])
    if b is None:
        return t.emit("MatMul", [x, weight])
    dtype, shape = t.out_type()
    product = t.emit("MatMul", [x, weight], shape=shape)
    return t.emit("Add", [product, t.value(b)])


def _matmul(t: _Translator, a, b):
    return t.emit("MatMul", [t.value(a), t.value(b)])


def _addmm(t: _Translator, bias, a, b, *, beta=1, alpha=1):
    return t.emit(
        "Gemm", [t.value(a), t.value(b), t.value(bias)], {"alpha": float(alpha), "beta": float(beta)}
    )


def _embedding(t: _Translator, weight, indices, *args):
    return t.emit("Gather", [t.value(weight), t.value(indices)], {"axis": 0})


def _view(t: _Translator, x, *args, **kwargs):
    return t.reshape(x)


def _expand(t: _Translator, x, sizes, *, implicit=False):
    x = t.value(x)
    _, shape = t.out_type()
    if list(x.shape) == shape:
        return x
    return t.emit("Expand", [x, t.ints(shape)])


def _permute(t: _Translator, x, dims):
    x = t.value(x)
    rank = len(x.shape)
    return t.emit("Transpose", [x], {"perm": [int(d) % rank for d in dims]})


def _transpose(t: _Translator, x, a, b):
    x = t.value(x)
    perm = list(range(len(x.shape)))
    a, b = int(a) % len(perm), int(b) % len(perm)
    perm[a], perm[b] = perm[b], perm[a]
    return t.emit("Transpose", [x], {"perm": perm})


def _t(t: _Translator, x):
    x = t.value(x)
    return x if len(x.shape) < 2 else t.emit("Transpose", [x], {"perm": [1, 0]})


def _slice(t: _Translator, x, dim=0, start=None, end=None, step=1):
    x = t.value(x)
    _, shape = t.out_type()
    if list(x.shape) == shape:
        return x
    size = x.shape[int(dim)]
    start = 0 if start is None else max(-size, min(int(start), size))
    end = size if end is None else max(-size, min(int(end), size))
    return t.emit("Slice", [x, t.ints([start]), t.ints([end]), t.ints([int(dim)]), t.ints([int(step)])])


def _select(t: _Translator, x, dim, index):
    index_value = t.initializer(f"{t.fx.name}_index", np.asarray(int(index), np.int64))
    return t.emit("Gather", [t.value(x), index_value], {"axis": int(dim)})


def _cat(t: _Translator, tensors, dim=0):
    dtype, _ = t.out_type()
    values = [t.value(x, dtype) for x in tensors]
    values = [v for v in values if not (len(v.shape) == 1 and v.shape[0] == 0)]
    if len(values) == 1:
        return values[0]
    return t.emit("Concat", values, {"axis": int(dim)})


def _stack(t: _Translator, tensors, dim=0):
    dtype, shape = t.out_type()
    axis = int(dim) % len(shape)
    pieces = []
    for x in tensors:
        x = t.value(x, dtype)
        one = [*x.shape[:axis], 1, *x.shape[axis:]]
        pieces.append(t.emit("Reshape", [x, t.ints(one)], shape=one))
    return t.emit("Concat", pieces, {"axis": axis})


def _index(t: _Translator, x, indices):
    """``x[i0, i1, ...]``: with constant indices, a reshape when they pick every element in order, else a
    gather of flat positions; one non-constant index tensor on one axis is a Gather on that axis."""
    torch = t.torch
    x = t.value(x)
    if all(isinstance(i, _Const) for i in indices) and len(indices) == len(x.shape):
        arrays = [_numpy(i.tensor) for i in indices]
        if any(a.dtype == np.bool_ for a in arrays):
            raise Unsupported("boolean-mask indexing")
        arrays = np.broadcast_arrays(*[np.where(a < 0, a + n, a) for a, n in zip(arrays, x.shape)])
        flat = np.ravel_multi_index(arrays, list(x.shape))
        size = int(np.prod(x.shape))
        if flat.size == size and np.array_equal(flat.reshape(-1), np.arange(size)):
            return t.reshape(x)
        flat_x = t.emit("Reshape", [x, t.ints([-1])], shape=[size])
        positions = t.initializer(f"{t.fx.name}_positions", flat.astype(np.int64))
        return t.emit("Gather", [flat_x, positions], {"axis": 0})
    tensors = [(axis, i) for axis, i in enumerate(indices) if i is not None]
    if len(tensors) == 1:
        axis, index = tensors[0]
        if isinstance(index, _Const) and index.tensor.dtype == torch.bool:
            raise Unsupported("boolean-mask indexing")
        return t.emit("Gather", [x, t.value(index, ir.DataType.INT64)], {"axis": axis})
    raise Unsupported("advanced indexing beyond one index tensor or constant indices")


def _where(t: _Translator, condition, a, b):
    dtype, _ = t.out_type()
    return t.emit("Where", [t.value(condition, ir.DataType.BOOL), t.value(a, dtype), t.value(b, dtype)])


def _masked_fill(t: _Translator, x, mask, value):
    dtype, _ = t.out_type()
    return t.emit("Where", [t.value(mask, ir.DataType.BOOL), t.value(value, dtype), t.value(x, dtype)])


def _mean(t: _Translator, x, dims=None, keepdim=False, *, dtype=None):
    x = t.value(x)
    axes = list(range(len(x.shape))) if not dims else [int(d) for d in dims]
    return t.emit("ReduceMean", [x, t.ints(axes)], {"keepdims": int(bool(keepdim))})


def _adaptive_avg_pool2d(t: _Translator, x, size):
    x = t.value(x)
    if [int(s) for s in size] == [1, 1]:
        return t.emit("GlobalAveragePool", [x])
    if [int(s) for s in size] == list(x.shape[2:]):
        return x
    raise Unsupported(f"adaptive_avg_pool2d to {list(size)}")


def _max_pool2d(t: _Translator, x, kernel, stride=(), padding=0, dilation=1, ceil_mode=False):
    kernel = _per_dim(kernel, 2)
    attrs = {
        "kernel_shape": kernel,
        "strides": _per_dim(stride, 2) if stride else kernel,
        "pads": _per_dim(padding, 2) * 2,
        "dilations": _per_dim(dilation, 2),
        "ceil_mode": int(bool(ceil_mode)),
    }
    return t.emit("MaxPool", [t.value(x)], attrs)


def _pad(t: _Translator, x, pad, mode="constant", value=None):
    if mode != "constant":
        raise Unsupported(f"pad mode {mode!r}")
    x = t.value(x)
    rank = len(x.shape)
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):  # torch lists (begin, end) pairs from the last axis backwards
        begins[rank - 1 - i], ends[rank - 1 - i] = int(pad[2 * i]), int(pad[2 * i + 1])
    fill = t.scalar(0.0 if value is None else value, x.dtype)
    return t.emit("Pad", [x, t.ints(begins + ends), fill], {"mode": "constant"})


def _per_dim(v, n: int) -> list[int]:
    v = [int(i) for i in v] if isinstance(v, (list, tuple)) else [int(v)]
    return v * n if len(v) == 1 else v


_RULES: dict[str, Callable] = {}


def _register(rule: Callable, *names: str) -> None:
    for name in names:
        _RULES[f"aten.{name}"] = rule


_register(
    _identity,
    "contiguous.default",
    "clone.default",
    "alias.default",
    "detach.default",
    "dropout.default",
    "lift_fresh_copy.default",
    "feature_dropout.default",
)
_register(_to, "to.dtype", "to.device", "to.dtype_layout", "_to_copy.default", "type_as.default")
for _name, _op in (("add", "Add"), ("sub", "Sub"), ("mul", "Mul"), ("div", "Div")):
    _register(_binary(_op), f"{_name}.Tensor", f"{_name}.Scalar", f"{_name}.Tensor_mode")
for _name, _op in (
    ("eq", "Equal"),
    ("lt", "Less"),
    ("le", "LessOrEqual"),
    ("gt", "Greater"),
    ("ge", "GreaterOrEqual"),
):
    _register(_binary(_op, arithmetic=False), f"{_name}.Tensor", f"{_name}.Scalar")
_register(_not_equal, "ne.Tensor", "ne.Scalar")
for _name, _op in (
    ("__and__", "And"),
    ("logical_and", "And"),
    ("bitwise_and", "And"),
    ("__or__", "Or"),
    ("logical_or", "Or"),
    ("bitwise_or", "Or"),
):
    _register(_binary(_op), f"{_name}.Tensor", f"{_name}.default")
_register(_binary("Max"), "maximum.default")
_register(_binary("Min"), "minimum.default")
for _name, _op in (
    ("relu", "Relu"),
    ("sigmoid", "Sigmoid"),
    ("tanh", "Tanh"),
    ("exp", "Exp"),
    ("log", "Log"),
    ("sqrt", "Sqrt"),
    ("neg", "Neg"),
    ("abs", "Abs"),
    ("cos", "Cos"),
    ("sin", "Sin"),
    ("erf", "Erf"),
    ("reciprocal", "Reciprocal"),
    ("floor", "Floor"),
    ("ceil", "Ceil"),
    ("logical_not", "Not"),
    ("bitwise_not", "Not"),
):
    _register(_unary(_op), f"{_name}.default")
_register(_rsqrt, "rsqrt.default")
_register(_silu, "silu.default")
_register(_pow, "pow.Tensor_Scalar", "pow.Tensor_Tensor")
_register(_clip, "clamp.default", "clip.default")
_register(_hardtanh, "hardtanh.default")
_register(_relu6, "relu6.default")
_register(_leaky_relu, "leaky_relu.default")
_register(_gelu, "gelu.default")
_register(_softmax, "softmax.int", "_softmax.default")
_register(_conv, "conv1d.default", "conv2d.default", "conv1d.padding", "conv2d.padding")
_register(_convolution, "convolution.default")
_register(_batch_norm, "batch_norm.default")
_register(_bn_no_training, "_native_batch_norm_legit_no_training.default")
_register(_layer_norm, "layer_norm.default")
_register(_linear, "linear.default")
_register(_matmul, "matmul.default", "mm.default", "bmm.default")
_register(_addmm, "addmm.default")
_register(_embedding, "embedding.default")
_register(
    _view,
    "view.default",
    "reshape.default",
    "_unsafe_view.default",
    "unsqueeze.default",
    "squeeze.dim",
    "squeeze.dims",
    "squeeze.default",
    "flatten.using_ints",
)
_register(_expand, "expand.default")
_register(_permute, "permute.default")
_register(_transpose, "transpose.int")
_register(_t, "t.default")
_register(_slice, "slice.Tensor")
_register(_select, "select.int")
_register(_cat, "cat.default")
_register(_stack, "stack.default")
_register(_index, "index.Tensor")
_register(_where, "where.self", "where.ScalarOther", "where.ScalarSelf", "where.Scalar")
_register(_masked_fill, "masked_fill.Scalar", "masked_fill.Tensor")
_register(_mean, "mean.dim")
_register(_adaptive_avg_pool2d, "adaptive_avg_pool2d.default")
_register(_max_pool2d, "max_pool2d.default")
_register(_pad, "pad.default", "constant_pad_nd.default")


# -- helpers ------------------------------------------------------------------------------------------


def _numpy(tensor, copy: bool = True) -> np.ndarray:
    """``tensor``'s values; a copy unless ``copy`` is false (a tensor made here): the IR owns its weights."""
    import torch

    if tensor.dtype == torch.bfloat16:
        raise Unsupported("a bfloat16 tensor (numpy has no bfloat16)")
    array = tensor.detach().numpy()
    return np.array(array, copy=True) if copy else array


def _dtype(torch_dtype) -> ir.DataType:
    import torch

    if torch_dtype == torch.bfloat16:
        raise Unsupported("a bfloat16 tensor (numpy has no bfloat16)")
    return ir.DataType.from_numpy(torch.empty((), dtype=torch_dtype).numpy().dtype)


def _torch_dtype(dtype: ir.DataType):
    import torch

    return torch.from_numpy(np.empty((), dtype.numpy())).dtype


def _namespace(fx) -> str:
    """The module path the FX node was called under (``encoder.layer.0.attention``), if torch kept it."""
    stack = fx.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values() if path]
    return paths[-1] if paths else ""
