"""The IR as a TensorFlow graph: a concrete function taking the graph inputs and returning the outputs by name.

:func:`lower` traces one ``tf.function`` over the IR (ONNX-domain ops, QDQ form or float). ``quant`` says what
the quantization ops become:

- ``"fakequant"``: an activation's ``QuantizeLinear`` -> ``DequantizeLinear`` pair is
  ``fake_quant_with_min_max_vars`` on ``[(qmin - zp) * s, (qmax - zp) * s]`` (8 bits, full range), the grid
  the pair rounds to; an int8 weight behind ``DequantizeLinear`` is its float value through
  ``fake_quant_with_min_max_vars_per_channel`` (or the per-tensor op) on ``[-127 s, 127 s]`` with
  ``narrow_range`` (``[-128 s, 127 s]`` without it when a code is -128), which gives the codes back; an int32
  bias is its float value. The TFLite converter reads these ranges as the model's quantization.
- ``"float"``: every pair is its float value (no rounding), weights dequantized.

**Layout.** TensorFlow's CPU convolutions and pools take channels last. Every value carries a *layout*, the
logical (ONNX) axis each physical axis holds: ``(0, 2, 3, 1)`` is a logical NCHW value stored NHWC. Conv,
pools, BatchNormalization and Resize read and write channels last; a ``Transpose`` composes layouts and
emits nothing; elementwise ops read their operands in one layout (constants permuted in numpy, broadcast by
ONNX's rules first); ops with axes (Concat, Softmax, Reduce*, GlobalAveragePool, Gather, Split, Slice, Pad,
Tile) map them onto the physical axes. A Reshape (Flatten, Squeeze, Unsqueeze) that only adds, drops or
moves size-1 axes is a physical reshape in any layout; any other reads the logical order, one
``tf.transpose`` when the value is not stored so. A permutation that moves only size-1 axes is a reshape,
never a transpose. So a model tf2onnx converted (NHWC input, Transpose to NCHW, ..., Transpose back) comes
out with the transposes its Keras model had and no others.

**Rules.** ``rules`` are callables ``rule(lowering, node) -> bool`` tried on each node, in topological order,
before the op's own rule; one that returns True has lowered the node: it set the outputs' tensors
(:meth:`TfLowering.set`), and may have claimed nodes further down (:meth:`TfLowering.consume`: a
``DequantizeLinear -> Conv -> QuantizeLinear`` group). They read values in a layout of their choice
(:meth:`TfLowering.get`), constants (:meth:`TfLowering.constant`, :func:`dequantized_constant`,
:meth:`TfLowering.qparams`). Nodes of constants only (a weight's ``DequantizeLinear``, ``Constant``,
constant folding leftovers) are lowered when something reads them, so a rule that takes a weight's codes
leaves no float copy behind.

Symbolic dimensions stay dynamic (``None`` in the input signature). Constant subgraphs are evaluated at
trace time (``tf.init_scope``), so a shape built from constants or from static dimensions is a constant;
one computed at run time (a flatten to ``[batch, -1]``, a slice to the sequence's length) is taken where
TensorFlow takes a tensor: Reshape's target, Slice's starts and ends, Expand, ConstantOfShape, Range.
An op without a rule, or a run-time value where TensorFlow needs a constant (pads, axes, sizes, repeats,
split sizes), is one sentence naming the op and its node (:class:`~ncc.errors.NccError`). onnxruntime's
Gelu, FastGelu, BiasGelu and LayerNormalization (which ncc's fusions emit) have rules too. TensorFlow is
imported when a lowering is built.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.ops import is_onnx_domain, onnx_opset
from ncc.ir.rewrite import constant_array

Quant = Literal["fakequant", "float"]
#: ``Layout[i]`` is the logical (ONNX) axis physical axis ``i`` holds.
Layout = tuple[int, ...]
Rule = Callable[["TfLowering", ir.Node], bool]

#: Ops that read and write channels last (the logical axis 1 physically last).
_SPATIAL = frozenset(
    {"Conv", "MaxPool", "AveragePool", "BatchNormalization", "Resize", "GlobalAveragePool", "GlobalMaxPool"}
)
#: Ops a layout passes through unchanged (used to look ahead for a channels-last reader).
_TRANSPARENT = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "Relu",
        "Clip",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Sigmoid",
        "Tanh",
        "HardSigmoid",
        "HardSwish",
        "LeakyRelu",
        "PRelu",
        "Identity",
        "Cast",
        "Pad",
        "Concat",
        "Max",
        "Min",
    }
)

_UNARY = {
    "Relu": "nn.relu",
    "Sigmoid": "math.sigmoid",
    "Tanh": "math.tanh",
    "Erf": "math.erf",
    "Exp": "math.exp",
    "Log": "math.log",
    "Sqrt": "math.sqrt",
    "Neg": "math.negative",
    "Abs": "math.abs",
    "Reciprocal": "math.reciprocal",
    "Floor": "math.floor",
    "Ceil": "math.ceil",
    "Round": "math.round",
    "Sin": "math.sin",
    "Cos": "math.cos",
    "Not": "math.logical_not",
    "Softplus": "math.softplus",
    "Softsign": "math.softsign",
}
_BINARY = {
    "Add": "math.add",
    "Sub": "math.subtract",
    "Mul": "math.multiply",
    "Div": "math.divide",
    "Pow": "math.pow",
    "Max": "math.maximum",
    "Min": "math.minimum",
    "Sum": "math.add",
    "Equal": "math.equal",
    "Less": "math.less",
    "LessOrEqual": "math.less_equal",
    "Greater": "math.greater",
    "GreaterOrEqual": "math.greater_equal",
    "And": "math.logical_and",
    "Or": "math.logical_or",
    "Xor": "math.logical_xor",
}
#: onnxruntime's ops ncc's fusions emit, and their rules.
_CONTRIB = {
    "Gelu": "_Gelu",
    "BiasGelu": "_Gelu",
    "FastGelu": "_FastGelu",
    "LayerNormalization": "_LayerNormalization",
}
_REDUCE = {
    "ReduceMean": "math.reduce_mean",
    "ReduceSum": "math.reduce_sum",
    "ReduceMax": "math.reduce_max",
    "ReduceMin": "math.reduce_min",
    "ReduceProd": "math.reduce_prod",
}
#: Codes' numpy dtype -> (qmin, qmax, bits) of the fake quantization that rounds to them.
_GRIDS = {
    np.dtype(np.uint8): (0, 255, 8),
    np.dtype(np.int8): (-128, 127, 8),
    np.dtype(np.uint16): (0, 65535, 16),
    np.dtype(np.int16): (-32768, 32767, 16),
}


def lower(model: ir.Model, *, quant: Quant = "fakequant", rules: Sequence[Rule] = ()) -> Any:
    """``model`` as a TensorFlow concrete function: its arguments are the graph inputs (keyword names:
    :meth:`TfLowering.argument_names`, the IR names when they are Python identifiers), in graph order, each
    ``[None, ...]`` where the IR's dimension is symbolic; it returns ``{output name: tensor}`` in the IR's
    (logical) layout."""
    return TfLowering(model, quant=quant, rules=rules).concrete_function()


def argument_names(model: ir.Model) -> list[str]:
    """The argument (and input ``TensorSpec``) names of ``model``'s concrete function, one per graph input in
    order: the IR name when it is a Python identifier, else that name with other characters as ``_``. A
    SavedModel's or ``.tflite``'s signature takes its inputs by these names."""
    names: list[str] = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        name = re.sub(r"\W", "_", value.name) or "input"
        name = f"input_{name}" if name[0].isdigit() or name in _RESERVED else name
        while name in names:
            name += "_"
        names.append(name)
    return names


def logical(rank: int) -> Layout:
    """The identity layout: the value stored in ONNX's axis order."""
    return tuple(range(rank))


def channels_last(rank: int) -> Layout:
    """The layout of a logical ``N, C, *spatial`` value stored ``N, *spatial, C`` (NHWC for rank 4)."""
    return (0, *range(2, rank), 1) if rank >= 3 else logical(rank)


def dequantized_constant(value: ir.Value | None) -> ir.Node | None:
    """The ``DequantizeLinear`` producing ``value`` from constant codes (a quantized weight or bias), else None."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or not is_onnx_domain(node):
        return None
    return node if _array(node.inputs[0]) is not None else None


@dataclass(frozen=True)
class QParams:
    """A ``QuantizeLinear``/``DequantizeLinear``'s quantization: ``scale`` and ``zero_point`` (scalars, or
    vectors along the logical ``axis``), the codes' dtype and their range."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    dtype: np.dtype
    qmin: int
    qmax: int
    bits: int

    def broadcast(self, array: np.ndarray, rank: int) -> np.ndarray:
        """A per-channel vector shaped to broadcast along ``axis`` of a rank-``rank`` value."""
        if self.axis is None or array.size == 1:
            return array.reshape(())
        shape = [1] * rank
        shape[self.axis] = -1
        return array.reshape(shape)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        rank = codes.ndim
        zero = self.broadcast(self.zero_point.astype(np.float64), rank)
        return (
            (codes.astype(np.float64) - zero) * self.broadcast(self.scale.astype(np.float64), rank)
        ).astype(np.float32)

    def float_range(self, *, narrow: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(min, max)`` of the grid, per channel when per-channel: ``narrow`` drops ``qmin``."""
        zero, scale = self.zero_point.astype(np.float64), self.scale.astype(np.float64)
        low = (self.qmin + (1 if narrow else 0) - zero) * scale
        return low.astype(np.float32).reshape(-1), ((self.qmax - zero) * scale).astype(np.float32).reshape(-1)


@dataclass
class _Stored:
    """A value's TensorFlow tensor in its physical layout (or a constant's array), and the layouts it was
    read in since (one transpose per layout, however many readers)."""

    tensor: Any
    layout: Layout
    array: np.ndarray | None = None
    views: dict[Layout, Any] = field(default_factory=dict)


class TfLowering:
    """Lowers one IR model to TensorFlow ops inside a ``tf.function`` trace (see the module docstring).

    Rules see this object; everything public is theirs: ``tf`` (the module), ``quant``, ``opset``;
    :meth:`get` / :meth:`set` a value's tensor in a layout, :meth:`layout_of`, :meth:`shape`;
    :meth:`constant`, :meth:`known`, :meth:`static` (trace-time values), :meth:`qparams`, :meth:`weight`,
    :meth:`fake_quant`; :meth:`consume` for the nodes a rule lowered along with its own."""

    def __init__(self, model: ir.Model, *, quant: Quant = "fakequant", rules: Sequence[Rule] = ()):
        if quant not in ("fakequant", "float"):
            raise NccError(f"the TensorFlow backend lowers quant='fakequant' or 'float', not {quant!r}.")
        import tensorflow as tf

        self.tf = tf
        self.model, self.quant, self.rules = model, quant, tuple(rules)
        self.opset = onnx_opset(model, 17)
        graph = model.graph
        self.inputs = [v for v in graph.inputs if not v.is_initializer()]
        self._deferred, self._folded = _constant_nodes(graph)
        self._reset()

    def _reset(self) -> None:
        self._stored: dict[str, _Stored] = {}
        self._weights: dict[tuple[str, Layout], Any] = {}
        self._done: set[int] = set()  # ids of nodes lowered or consumed
        self._standins: set[str] = set()  # Q outputs whose tensor is the fake-quantized float, not codes

    # -- the function --------------------------------------------------------------------------------
    def argument_names(self) -> list[str]:
        """The concrete function's argument names (:func:`argument_names`)."""
        return argument_names(self.model)

    def concrete_function(self) -> Any:
        """Trace the model (once) and return the concrete function :func:`lower` describes."""
        tf = self.tf
        names = self.argument_names()
        specs = [
            tf.TensorSpec(_signature_shape(v), _tf_dtype(tf, v.dtype, v.name), name=n)
            for v, n in zip(self.inputs, names)
        ]

        def body(*args):
            self._reset()
            for value, tensor in zip(self.inputs, args):
                self.set(value, tensor)
            for node in self.model.graph:
                if id(node) not in self._deferred:
                    self._lower(node)
            outputs = {}
            for value in self.model.graph.outputs:
                outputs[value.name] = tf.identity(self.get(value), name=scope_name(value.name))
            return outputs

        body.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
        )
        function = tf.function(body, input_signature=specs, autograph=False)
        return function.get_concrete_function()

    def _lower(self, node: ir.Node) -> None:
        if id(node) in self._done:
            return
        self._done.add(id(node))
        if id(node) not in self._folded:
            with self.tf.name_scope(scope_name(node.name or node.op_type)):
                self._apply(node)
            return
        with self.tf.init_scope():  # eagerly, outside the trace: its outputs are arrays
            self._apply(node)
            for out in node.outputs:
                if out is not None and out.name in self._stored and self._stored[out.name].array is None:
                    array = np.asarray(self.get(out).numpy())
                    self._stored[out.name] = _Stored(None, logical(array.ndim), array=array)

    def _apply(self, node: ir.Node) -> None:
        for rule in self.rules:
            if rule(self, node):
                return
        op = node.op_type
        if node.domain == "com.microsoft" and op in _CONTRIB:
            getattr(self, _CONTRIB[op])(node)
            return
        if not is_onnx_domain(node):
            raise NccError(f"the TensorFlow backend cannot lower {node.domain}::{op} ({_label(node)}).")
        if op in _UNARY:
            self._unary(node, _tf_op(self.tf, _UNARY[op]))
        elif op in _BINARY:
            self._nary(node, _tf_op(self.tf, _BINARY[op]))
        elif op in _REDUCE:
            self._reduce(node, _tf_op(self.tf, _REDUCE[op]))
        else:
            rule = getattr(self, f"_{op}", None)
            if rule is None:
                raise NccError(f"the TensorFlow backend cannot lower {op} yet ({_label(node)}).")
            rule(node)

    # -- what rules use -------------------------------------------------------------------------------
    def consume(self, *nodes: ir.Node) -> None:
        """Mark ``nodes`` lowered (a rule lowered them with another node): they are skipped in their turn."""
        self._done.update(id(n) for n in nodes)

    def set(self, value: ir.Value, tensor: Any, layout: Layout | str | None = None) -> None:
        """``value`` is ``tensor``, stored in ``layout`` (default: logical; ``"channels_last"``)."""
        rank = tensor.shape.rank
        self._stored[value.name] = _Stored(tensor, self._layout(layout, rank, value))

    def get(self, value: ir.Value | None, layout: Layout | str | None = None) -> Any:
        """``value``'s tensor in ``layout`` (default: logical; ``"channels_last"``; or a permutation), one
        transpose (a reshape when it moves only size-1 axes) if it is stored otherwise. A quantized
        constant is its (fake-quantized) float value (:meth:`weight`)."""
        if value is None:
            return None
        if value.name not in self._stored and dequantized_constant(value) is not None:
            rank = len(value.shape) if value.shape is not None else _array(value.producer().inputs[0]).ndim
            return self.weight(value, self._layout(layout, rank, value))
        stored = self._find(value)
        want = self._layout(layout, len(stored.layout), value)
        if want == stored.layout and stored.tensor is not None:
            return stored.tensor
        if stored.array is not None and self.tf.executing_eagerly():  # folding: nothing kept for the trace
            return self.tf.constant(np.transpose(stored.array, want))
        if want not in stored.views:
            if stored.array is not None:
                stored.views[want] = self.tf.constant(np.transpose(stored.array, want))
            else:
                order = [stored.layout.index(a) for a in want]
                stored.views[want] = self._permute(stored.tensor, order)
        return stored.views[want]

    def layout_of(self, value: ir.Value) -> Layout:
        """The layout ``value`` is stored in (lowering its producer first if it was deferred)."""
        if value.name not in self._stored and dequantized_constant(value) is not None:
            return logical(len(self.shape(value)))
        return self._find(value).layout

    def shape(self, value: ir.Value) -> list[int | None]:
        """``value``'s static shape in logical order (``None``: known at run time only)."""
        if value.name not in self._stored and dequantized_constant(value) is not None:
            return list(_array(value.producer().inputs[0]).shape)
        stored = self._find(value)
        if stored.array is not None:
            return list(stored.array.shape)
        physical = stored.tensor.shape.as_list()
        out: list[int | None] = [None] * len(physical)
        for j, axis in enumerate(stored.layout):
            out[axis] = physical[j]
        return out

    def rank(self, value: ir.Value) -> int:
        return len(self.shape(value))

    def constant(self, value: ir.Value | None) -> np.ndarray | None:
        """The data of a constant (initializer, also one listed as a graph input; ``Constant``), or of a value
        the lowering computed at trace time (a static ``Shape``, a reshaped constant), else None."""
        array = _array(value)
        if array is None and value is not None and value.name in self._stored:
            array = self._stored[value.name].array
        return array

    def known(self, value: ir.Value) -> np.ndarray | None:
        """The value of ``value`` at trace time: a constant (a quantized one dequantized), or what TensorFlow
        computes from the graph without running it (a ``Shape`` of static dimensions); else None."""
        array = self.constant(value)
        dq = dequantized_constant(value) if array is None else None
        if dq is not None:
            return self.qparams(dq).dequantize(_array(dq.inputs[0]))
        if array is None:
            array = self.tf.get_static_value(self.get(value))
        return None if array is None else np.asarray(array)

    def static(self, value: ir.Value, what: str, node: ir.Node) -> np.ndarray:
        """:meth:`known`, which ``node`` needs (a shape, axes, sizes); one sentence when it is computed at run
        time."""
        array = self.known(value)
        if array is None:
            raise NccError(
                f"the TensorFlow backend needs {node.op_type}'s {what} at compile time ({_label(node)}): "
                f"{value.name!r} is computed at run time."
            )
        return np.asarray(array)

    def qparams(self, node: ir.Node) -> QParams:
        """The quantization of a ``QuantizeLinear`` or ``DequantizeLinear`` (constant scale and zero point)."""
        scale = self.static(node.inputs[1], "scale", node).astype(np.float32)
        zero_value = node.inputs[2] if len(node.inputs) > 2 else None
        if zero_value is not None:
            zero = self.static(zero_value, "zero point", node)
        else:
            codes = node.outputs[0] if node.op_type == "QuantizeLinear" else node.inputs[0]
            kind = codes.dtype.numpy() if codes.dtype is not None else np.dtype(np.uint8)
            zero = np.zeros((), kind)
        if zero.dtype not in _GRIDS and zero.dtype != np.int32:
            raise NccError(
                f"the TensorFlow backend quantizes to 8 or 16 bits, not {zero.dtype} ({_label(node)})."
            )
        if node.attributes.get_int("block_size", 0):
            raise NccError(f"the TensorFlow backend does not lower blocked quantization ({_label(node)}).")
        axis = None
        if scale.size > 1:
            rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
            axis = node.attributes.get_int("axis", 1)
            if axis < 0:
                rank = rank if rank is not None else self.rank(node.inputs[0])
                axis += rank
        qmin, qmax, bits = _GRIDS.get(zero.dtype, (-(2**31), 2**31 - 1, 32))
        return QParams(scale.reshape(-1), zero.reshape(-1), axis, zero.dtype, qmin, qmax, bits)

    def fake_quant(self, tensor: Any, qp: QParams, layout: Layout) -> Any:
        """An activation ``tensor`` (stored in ``layout``) rounded to ``qp``'s grid, as TensorFlow's
        ``FakeQuantWithMinMaxVars`` (per channel: the channel physically last)."""
        tf = self.tf
        low, high = qp.float_range()
        if qp.axis is None:
            return tf.quantization.fake_quant_with_min_max_vars(
                tensor, float(low[0]), float(high[0]), num_bits=qp.bits, narrow_range=False
            )
        if layout.index(qp.axis) != len(layout) - 1:
            raise NccError(
                "the TensorFlow backend fake-quantizes an activation per channel only along its last "
                "physical axis."
            )
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(
            tensor, low, high, num_bits=qp.bits, narrow_range=False
        )

    def weight(
        self, value: ir.Value, layout: Layout | None = None, *, shape: Sequence[int] | None = None
    ) -> Any:
        """A constant or a quantized constant (``DequantizeLinear`` of constant codes) as a tensor transposed
        to ``layout`` (then reshaped to ``shape``, its channel axis staying physically last): in
        ``"fakequant"`` mode an 8/16-bit weight goes through TensorFlow's fake quantization (per channel
        along its axis, moved physically last for the op and back), an int32 bias is its float value; in
        ``"float"`` mode every one is its float value. Anything else is :meth:`get`."""
        tf = self.tf
        array = self.constant(value)
        dq = dequantized_constant(value) if array is None else None
        if array is None and dq is None:
            tensor = self.get(value, layout)
            return tensor if shape is None else tf.reshape(tensor, list(shape))
        rank = array.ndim if array is not None else _array(dq.inputs[0]).ndim
        layout = logical(rank) if layout is None else tuple(layout)
        key = (value.name if shape is None else f"{value.name}{list(shape)}", layout)
        if key in self._weights:
            return self._weights[key]
        if array is not None:
            array = np.transpose(array, layout)
            tensor = tf.constant(array if shape is None else array.reshape(shape))
        else:
            qp = self.qparams(dq)
            codes = _array(dq.inputs[0])
            floats = np.transpose(qp.dequantize(codes), layout)
            channel = layout.index(qp.axis) if qp.axis is not None else None
            if shape is not None:
                if channel is not None and (channel != rank - 1 or shape[-1] != floats.shape[-1]):
                    raise ValueError("a per-channel weight's channel axis must stay last when reshaped")
                floats, channel = floats.reshape(shape), None if channel is None else len(shape) - 1
            if self.quant == "float" or qp.bits == 32:
                tensor = tf.constant(floats)
            else:
                tensor = self._fake_quant_weight(floats, codes, qp, channel)
        if not tf.executing_eagerly():
            self._weights[key] = tensor
        return tensor

    def _fake_quant_weight(self, floats: np.ndarray, codes: np.ndarray, qp: QParams, channel: int | None):
        """``floats`` through TensorFlow's fake quantization on ``qp``'s grid (``channel``: its physical
        channel axis), narrowed to ``[-127 s, 127 s]`` when the codes are symmetric int8 without -128."""
        tf = self.tf
        narrow = qp.qmin == -128 and not np.any(qp.zero_point) and int(codes.min(initial=0)) > -128
        low, high = qp.float_range(narrow=narrow)
        if channel is None:
            return tf.quantization.fake_quant_with_min_max_vars(
                tf.constant(floats), float(low[0]), float(high[0]), num_bits=qp.bits, narrow_range=narrow
            )
        last = floats.ndim - 1
        moved = np.ascontiguousarray(np.moveaxis(floats, channel, last))
        tensor = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            tf.constant(moved), low, high, num_bits=qp.bits, narrow_range=narrow
        )
        if channel != last:
            tensor = tf.transpose(
                tensor, [int(a) for a in np.moveaxis(np.arange(floats.ndim), last, channel)]
            )
        return tensor

    # -- storage and layouts --------------------------------------------------------------------------
    def _find(self, value: ir.Value) -> _Stored:
        stored = self._stored.get(value.name)
        if stored is not None:
            return stored
        array = self.constant(value)
        if array is not None:
            stored = _Stored(None, logical(array.ndim), array=array)
            self._stored[value.name] = stored
            return stored
        producer = value.producer()
        if producer is not None and id(producer) not in self._done:
            self._lower(producer)
            stored = self._stored.get(value.name)
            if stored is not None:
                return stored
        where = f"{producer.op_type} ({_label(producer)})" if producer is not None else "no node"
        raise NccError(f"the TensorFlow backend found no tensor for {value.name!r} (produced by {where}).")

    def _alias(self, out: ir.Value, source: ir.Value) -> None:
        stored = self._find(source)
        self._stored[out.name] = stored
        if source.name in self._standins:
            self._standins.add(out.name)

    def _layout(self, layout: Layout | str | None, rank: int, value: ir.Value | None = None) -> Layout:
        if layout is None:
            return logical(rank)
        if isinstance(layout, str):
            if layout != "channels_last":
                raise ValueError(f"unknown layout {layout!r}")
            return channels_last(rank)
        layout = tuple(int(a) for a in layout)
        if sorted(layout) != list(range(rank)):
            name = f" for {value.name!r}" if value is not None else ""
            raise ValueError(f"layout {layout} is no permutation of {rank} axes{name}")
        return layout

    def _permute(self, tensor: Any, order: Sequence[int]) -> Any:
        """``tf.transpose(tensor, order)``; a reshape when it moves only size-1 axes."""
        tf = self.tf
        order = list(order)
        if order == sorted(order):
            return tensor
        dims = tensor.shape.as_list()
        moved = [a for a in order if dims[a] != 1]
        if moved == sorted(moved):
            return tf.reshape(tensor, self._dims(tensor, [dims[a] for a in order], [a for a in order]))
        if tensor.dtype in (tf.quint8, tf.qint8):  # TensorFlow has no Transpose kernel for these: move bytes
            plain = tf.uint8 if tensor.dtype == tf.quint8 else tf.int8
            return tf.bitcast(tf.transpose(tf.bitcast(tensor, plain), order), tensor.dtype)
        return tf.transpose(tensor, order)

    def _dims(self, tensor: Any, dims: Sequence[int | None], sources: Sequence[int | None]) -> Any:
        """A shape for ``tf.reshape``: static ``dims``; an unknown one is ``-1`` when it is the only one, else
        read at run time from ``tensor``'s physical axis ``sources[i]``."""
        unknown = [i for i, d in enumerate(dims) if d is None]
        if len(unknown) <= 1:
            return [-1 if d is None else int(d) for d in dims]
        tf = self.tf
        shape = tf.shape(tensor)
        parts = []
        for d, source in zip(dims, sources):
            if d is not None:
                parts.append(tf.constant(int(d), tf.int32))
            elif source is not None:
                parts.append(shape[source])
            else:
                parts.append(tf.constant(-1, tf.int32))
        return tf.stack(parts)

    def _wants_channels_last(self, value: ir.Value, depth: int = 8) -> bool:
        """Whether a reader of ``value`` (through ops that keep a layout) reads it channels last."""
        seen, frontier = set(), [value]
        for _ in range(depth):
            following = []
            for v in frontier:
                for use in v.uses():
                    node = use.node
                    if node.op_type in _SPATIAL:
                        return True
                    if node.op_type in _TRANSPARENT and id(node) not in seen:
                        seen.add(id(node))
                        following += [o for o in node.outputs if o is not None]
            frontier = following
        return False

    def _aligned(self, values: Sequence[ir.Value]) -> tuple[list[Any], Layout]:
        """Operands of an elementwise op in one layout, after ONNX's broadcasting (leading size-1 axes): the
        layout of the first operand of full rank that is not a constant."""
        tf = self.tf
        ranks = [self.rank(v) for v in values]
        full = max(ranks)
        layout = logical(full)
        for v, r in zip(values, ranks):
            if r == full and self.constant(v) is None and dequantized_constant(v) is None:
                layout = self.layout_of(v)
                break
        tensors = []
        for v, r in zip(values, ranks):
            if r == full:
                tensors.append(self.get(v, layout))
                continue
            array = self.constant(v)
            if array is not None:
                array = array.reshape((1,) * (full - r) + array.shape)
                tensors.append(tf.constant(np.transpose(array, layout)))
                continue
            tensor = self.get(v)
            shape = self.shape(v)
            tensor = tf.reshape(
                tensor, self._dims(tensor, [1] * (full - r) + shape, [None] * (full - r) + list(range(r)))
            )
            tensors.append(self._permute(tensor, layout))
        return tensors, layout

    # -- elementwise ----------------------------------------------------------------------------------
    def _unary(self, node: ir.Node, op) -> None:
        x = node.inputs[0]
        layout = self.layout_of(x)
        self.set(node.outputs[0], op(self.get(x, layout)), layout)

    def _nary(self, node: ir.Node, op) -> None:
        tensors, layout = self._aligned([v for v in node.inputs if v is not None])
        result = tensors[0]
        for t in tensors[1:]:
            result = op(result, t)
        self.set(node.outputs[0], result, layout)

    def _Mean(self, node: ir.Node) -> None:
        tensors, layout = self._aligned(node.inputs)
        self.set(node.outputs[0], self.tf.add_n(tensors) / float(len(tensors)), layout)

    def _Where(self, node: ir.Node) -> None:
        (condition, x, y), layout = self._aligned(node.inputs)
        self.set(node.outputs[0], self.tf.where(condition, x, y), layout)

    def _PRelu(self, node: ir.Node) -> None:
        """``relu(x) - slope * relu(-x)``, the form TFLite's converter fuses into its PRELU."""
        tf = self.tf
        (x, slope), layout = self._aligned(node.inputs[:2])
        self.set(node.outputs[0], tf.nn.relu(x) - slope * tf.nn.relu(-x), layout)

    def _Identity(self, node: ir.Node) -> None:
        self._alias(node.outputs[0], node.inputs[0])

    def _Dropout(self, node: ir.Node) -> None:
        self._alias(node.outputs[0], node.inputs[0])
        if len(node.outputs) > 1 and node.outputs[1] is not None and _read(node.outputs[1]):
            raise NccError(f"the TensorFlow backend lowers Dropout without its mask ({_label(node)}).")

    def _Constant(self, node: ir.Node) -> None:
        self._find(node.outputs[0])

    def _Cast(self, node: ir.Node) -> None:
        tf = self.tf
        to = ir.DataType(node.attributes.get_int("to"))
        x = node.inputs[0]
        layout = self.layout_of(x)
        self.set(node.outputs[0], tf.cast(self.get(x, layout), _tf_dtype(tf, to, node.name)), layout)

    def _Clip(self, node: ir.Node) -> None:
        tf = self.tf
        if self.opset < 11:
            low = node.attributes.get_float("min", None)
            high = node.attributes.get_float("max", None)
        else:
            low, high = (
                float(self.static(v, "bound", node)) if v is not None else None
                for v in (list(node.inputs[1:3]) + [None, None])[:2]
            )
        x = node.inputs[0]
        layout = self.layout_of(x)
        t = self.get(x, layout)
        if low == 0.0 and high == 6.0:
            result = tf.nn.relu6(t)
        elif low == 0.0 and high is None:
            result = tf.nn.relu(t)
        else:
            result = t
            if low is not None:
                result = tf.maximum(result, low)
            if high is not None:
                result = tf.minimum(result, high)
        self.set(node.outputs[0], result, layout)

    def _LeakyRelu(self, node: ir.Node) -> None:
        alpha = node.attributes.get_float("alpha", 0.01)
        self._unary(node, lambda t: self.tf.nn.leaky_relu(t, alpha))

    def _Elu(self, node: ir.Node) -> None:
        alpha = node.attributes.get_float("alpha", 1.0)
        tf = self.tf
        self._unary(
            node, lambda t: tf.nn.elu(t) if alpha == 1.0 else tf.where(t > 0, t, alpha * (tf.exp(t) - 1))
        )

    def _HardSigmoid(self, node: ir.Node) -> None:
        alpha = node.attributes.get_float("alpha", 0.2)
        beta = node.attributes.get_float("beta", 0.5)
        tf = self.tf
        self._unary(node, lambda t: tf.clip_by_value(alpha * t + beta, 0.0, 1.0))

    def _HardSwish(self, node: ir.Node) -> None:
        """``x * relu6(x + 3) / 6``, the form TFLite's converter fuses into its HARD_SWISH."""
        tf = self.tf
        self._unary(node, lambda t: t * tf.nn.relu6(t + 3.0) * (1.0 / 6.0))

    def _Gelu(self, node: ir.Node, *, approximate: bool | None = None) -> None:
        """ONNX's Gelu, and onnxruntime's (erf) Gelu, FastGelu (tanh) and BiasGelu (erf), which add an
        optional bias first."""
        tf = self.tf
        if approximate is None:
            approximate = node.attributes.get_string("approximate", "none") == "tanh"
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            (x, bias), layout = self._aligned(node.inputs[:2])
            x = x + bias
        else:
            layout = self.layout_of(node.inputs[0])
            x = self.get(node.inputs[0], layout)
        self.set(node.outputs[0], tf.nn.gelu(x, approximate=approximate), layout)

    def _FastGelu(self, node: ir.Node) -> None:
        self._Gelu(node, approximate=True)

    # -- quantization ---------------------------------------------------------------------------------
    def _QuantizeLinear(self, node: ir.Node) -> None:
        """A pair with its ``DequantizeLinear`` readers is the fake-quantized float (``"float"``: the value
        itself), which they pass on; codes anything else reads (a graph output) are computed."""
        tf = self.tf
        x, out = node.inputs[0], node.outputs[0]
        qp = self.qparams(node)
        layout = self.layout_of(x)
        t = self.get(x, layout)
        paired = not out.is_graph_output() and all(
            u.node.op_type == "DequantizeLinear" and same_qparams(self, node, u.node) for u in out.uses()
        )
        if paired:
            self.set(out, t if self.quant == "float" else self.fake_quant(t, qp, layout), layout)
            self._standins.add(out.name)
            return
        rank = len(layout)
        scale = _physical(qp.broadcast(qp.scale, rank), layout)
        zero = _physical(qp.broadcast(qp.zero_point.astype(np.float32), rank), layout)
        codes = tf.clip_by_value(tf.round(t / scale) + zero, float(qp.qmin), float(qp.qmax))
        self.set(out, tf.cast(codes, tf.as_dtype(qp.dtype)), layout)

    def _DequantizeLinear(self, node: ir.Node) -> None:
        tf = self.tf
        source, out = node.inputs[0], node.outputs[0]
        if dequantized_constant(out) is not None:
            self.set(out, self.weight(out))
            return
        if source.name in self._standins:
            self._alias(out, source)
            self._standins.discard(out.name)
            return
        qp = self.qparams(node)
        layout = self.layout_of(source)
        rank = len(layout)
        scale = _physical(qp.broadcast(qp.scale, rank), layout)
        zero = _physical(qp.broadcast(qp.zero_point.astype(np.float32), rank), layout)
        self.set(out, (tf.cast(self.get(source, layout), tf.float32) - zero) * scale, layout)

    # -- convolution and pooling ----------------------------------------------------------------------
    def _Conv(self, node: ir.Node) -> None:
        tf = self.tf
        x, w = node.inputs[0], node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        w_shape = self.shape(w)
        spatial = len(w_shape) - 2
        if spatial not in (1, 2, 3) or any(d is None for d in w_shape):
            raise NccError(
                f"the TensorFlow backend lowers 1-, 2- and 3-D Conv with a static weight ({_label(node)})."
            )
        group = node.attributes.get_int("group", 1)
        out_channels, per_group = int(w_shape[0]), int(w_shape[1])
        kernel = [int(d) for d in w_shape[2:]]
        strides = list(node.attributes.get_ints("strides", [1] * spatial))
        dilations = list(node.attributes.get_ints("dilations", [1] * spatial))
        layout = channels_last(spatial + 2)
        t = self.get(x, layout)
        padding = self.padding(node, t.shape.as_list()[1:-1], kernel, strides, dilations)
        to_filter = (*range(2, spatial + 2), 1, 0)  # ONNX [O, I/g, *k] -> TensorFlow [*k, I/g, O]
        if group == 1:
            y = self._convolution(t, self.weight(w, to_filter), strides, dilations, padding)
        elif (
            per_group == 1
            and spatial == 2
            and strides[0] == strides[1]
            and (strides == [1, 1] or dilations == [1, 1])
        ):
            # depthwise: [kh, kw, 1, C*m] (channel c*m + j) is TensorFlow's [kh, kw, C, m]
            f = tf.reshape(self.weight(w, to_filter), [*kernel, group, out_channels // group])
            pads = [[0, 0], *padding, [0, 0]] if isinstance(padding, list) else padding
            y = tf.nn.depthwise_conv2d(t, f, [1, *strides, 1], pads, dilations=dilations)
        else:  # grouped: one convolution per group, concatenated
            f = self.weight(w, to_filter)
            parts = tf.split(t, group, axis=-1)
            filters = tf.split(f, group, axis=-1)
            y = tf.concat(
                [self._convolution(p, g, strides, dilations, padding) for p, g in zip(parts, filters)], -1
            )
        if bias is not None:
            y = tf.nn.bias_add(y, self.weight(bias))
        self.set(node.outputs[0], y, layout)

    def _convolution(self, t, f, strides, dilations, padding):
        tf = self.tf
        if isinstance(padding, list):
            if len(strides) == 2:
                return tf.nn.conv2d(t, f, strides, [[0, 0], *padding, [0, 0]], dilations=dilations)
            t, padding = tf.pad(t, [[0, 0], *padding, [0, 0]]), "VALID"
        return tf.nn.convolution(t, f, strides=strides, padding=padding, dilations=dilations)

    def padding(self, node: ir.Node, sizes, kernel, strides, dilations, *, ceil: bool = False):
        """``"SAME"``, ``"VALID"`` or explicit ``[[begin, end], ...]`` per spatial axis for ``node``'s pads
        (``ceil``: a pool's ``ceil_mode``, as more padding at the end)."""
        rank = len(kernel)
        auto = node.attributes.get_string("auto_pad", "NOTSET")
        if auto == "VALID" and not ceil:
            return "VALID"
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            if auto == "SAME_UPPER" and not ceil:
                return "SAME"
            if any(s is None for s in sizes):
                raise NccError(f"the TensorFlow backend needs static sizes for {auto} ({_label(node)}).")
            pads = [_same(sizes[i], kernel[i], strides[i], dilations[i]) for i in range(rank)]
            if auto == "SAME_LOWER":
                pads = [(end, begin) for begin, end in pads]
        else:
            flat = list(node.attributes.get_ints("pads", [0] * (2 * rank)))
            pads = [(flat[i], flat[i + rank]) for i in range(rank)]
        if ceil:
            if any(s is None for s in sizes):
                raise NccError(f"the TensorFlow backend needs static sizes for ceil_mode ({_label(node)}).")
            pads = [_ceil_pads(sizes[i], kernel[i], strides[i], dilations[i], *pads[i]) for i in range(rank)]
        if all(p == (0, 0) for p in pads):
            return "VALID"
        if all(
            s is not None
            and pads[i] == _same(s, kernel[i], strides[i], dilations[i])
            or s is None
            and strides[i] == 1
            and pads[i] == _same(1, kernel[i], 1, dilations[i])
            for i, s in enumerate(sizes)
        ):
            return "SAME"
        return [list(p) for p in pads]

    def _pool(self, node: ir.Node, kind: str) -> None:
        tf = self.tf
        kernel = list(node.attributes.get_ints("kernel_shape"))
        rank = len(kernel)
        strides = list(node.attributes.get_ints("strides", [1] * rank))
        dilations = list(node.attributes.get_ints("dilations", [1] * rank))
        if any(d != 1 for d in dilations):
            raise NccError(
                f"the TensorFlow backend lowers {node.op_type} without dilations ({_label(node)})."
            )
        if len(node.outputs) > 1 and node.outputs[1] is not None and _read(node.outputs[1]):
            raise NccError(f"the TensorFlow backend lowers MaxPool without indices ({_label(node)}).")
        layout = channels_last(rank + 2)
        t = self.get(node.inputs[0], layout)
        ceil = bool(node.attributes.get_int("ceil_mode", 0))
        padding = self.padding(node, t.shape.as_list()[1:-1], kernel, strides, dilations, ceil=ceil)
        if kind == "max":
            if isinstance(padding, list) and rank != 2:
                raise NccError(
                    f"the TensorFlow backend lowers explicit pads on 2-D MaxPool only ({_label(node)})."
                )
            pads = [[0, 0], *padding, [0, 0]] if isinstance(padding, list) else padding
            y = (
                tf.nn.max_pool(t, kernel, strides, pads)
                if rank != 2
                else tf.nn.max_pool2d(t, kernel, strides, pads)
            )
        else:
            include = bool(node.attributes.get_int("count_include_pad", 0))
            if padding == "SAME" and include or isinstance(padding, list) and (not include or ceil):
                raise NccError(
                    f"the TensorFlow backend lowers AveragePool with pads counted only as TensorFlow counts "
                    f"them ({_label(node)})."
                )
            if isinstance(padding, list):
                t, padding = tf.pad(t, [[0, 0], *padding, [0, 0]]), "VALID"
            y = tf.nn.avg_pool(t, kernel, strides, padding)
        self.set(node.outputs[0], y, layout)

    def _MaxPool(self, node: ir.Node) -> None:
        self._pool(node, "max")

    def _AveragePool(self, node: ir.Node) -> None:
        self._pool(node, "avg")

    def _GlobalAveragePool(self, node: ir.Node) -> None:
        self._global(node, self.tf.math.reduce_mean)

    def _GlobalMaxPool(self, node: ir.Node) -> None:
        self._global(node, self.tf.math.reduce_max)

    def _global(self, node: ir.Node, op) -> None:
        x = node.inputs[0]
        layout = self.layout_of(x)
        axes = [layout.index(a) for a in range(2, len(layout))]
        self.set(node.outputs[0], op(self.get(x, layout), axis=axes, keepdims=True), layout)

    def _BatchNormalization(self, node: ir.Node) -> None:
        """``x * a + b`` on channels last, ``a = gamma / sqrt(var + eps)``, ``b = beta - mean * a``."""
        if node.attributes.get_int("training_mode", 0):
            raise NccError(
                f"the TensorFlow backend lowers BatchNormalization for inference ({_label(node)})."
            )
        gamma, beta, mean, var = (
            self.static(v, "statistics", node).astype(np.float64) for v in node.inputs[1:5]
        )
        a = gamma / np.sqrt(var + node.attributes.get_float("epsilon", 1e-5))
        b = beta - mean * a
        x = node.inputs[0]
        layout = channels_last(self.rank(x))
        y = self.get(x, layout) * a.astype(np.float32) + b.astype(np.float32)
        self.set(node.outputs[0], y, layout)

    def _Resize(self, node: ir.Node) -> None:
        tf = self.tf
        mode = node.attributes.get_string("mode", "nearest")
        transform = node.attributes.get_string("coordinate_transformation_mode", "half_pixel")
        nearest = node.attributes.get_string("nearest_mode", "round_prefer_floor")
        if node.attributes.get_int("antialias", 0) or node.attributes.get_ints("axes", None) is not None:
            raise NccError(
                f"the TensorFlow backend lowers Resize without antialias or axes ({_label(node)})."
            )
        x = node.inputs[0]
        shape = self.shape(x)
        if len(shape) != 4 or any(d is None for d in shape[2:]):
            raise NccError(
                f"the TensorFlow backend lowers 4-D Resize of static spatial size ({_label(node)})."
            )
        scales_value = (
            node.inputs[1] if self.opset < 11 else (node.inputs[2] if len(node.inputs) > 2 else None)
        )
        sizes_value = node.inputs[3] if self.opset >= 11 and len(node.inputs) > 3 else None
        if sizes_value is not None and self.static(sizes_value, "sizes", node).size:
            sizes = [int(s) for s in self.static(sizes_value, "sizes", node)]
            scales = [sizes[i] / shape[i] if shape[i] else 1.0 for i in (2, 3)]
            if sizes[:2] != [d if d is not None else sizes[i] for i, d in enumerate(shape[:2])]:
                raise NccError(f"the TensorFlow backend resizes only the spatial axes ({_label(node)}).")
            out = sizes[2:]
        else:
            factors = [float(s) for s in self.static(scales_value, "scales", node)]
            if factors[:2] != [1.0, 1.0]:
                raise NccError(f"the TensorFlow backend resizes only the spatial axes ({_label(node)}).")
            out = [int(np.floor(shape[i] * factors[i])) for i in (2, 3)]
            scales = factors[2:]
        align = transform == "align_corners"
        upscale = all(s >= 1.0 and float(s).is_integer() for s in scales)
        if mode == "nearest":
            half = {
                ("asymmetric", "floor"): False,
                ("tf_half_pixel_for_nn", "floor"): True,
                ("align_corners", "round_prefer_ceil"): False,
            }.get((transform, nearest))
            if half is None and transform in ("half_pixel", "pytorch_half_pixel") and upscale:
                half = True  # integer upscales: every source coordinate is away from a rounding tie
            op = tf.raw_ops.ResizeNearestNeighbor
        elif mode == "linear":
            half = {"asymmetric": False, "align_corners": False, "half_pixel": True}.get(transform)
            if transform == "pytorch_half_pixel" and min(out) > 1:
                half = True
            op = tf.raw_ops.ResizeBilinear
        else:
            half = None
        if half is None:
            raise NccError(
                f"the TensorFlow backend cannot lower Resize mode={mode!r} with "
                f"coordinate_transformation_mode={transform!r} ({_label(node)})."
            )
        layout = channels_last(4)
        t = self.get(x, layout)
        y = op(images=t, size=out, align_corners=align, half_pixel_centers=half)
        self.set(node.outputs[0], tf.cast(y, t.dtype), layout)

    # -- linear algebra -------------------------------------------------------------------------------
    def _Gemm(self, node: ir.Node) -> None:
        tf = self.tf
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        x = self.get(a, (1, 0) if node.attributes.get_int("transA", 0) else None)
        w = self.weight(b, (1, 0) if node.attributes.get_int("transB", 0) else None)  # [K, N]
        y = tf.linalg.matmul(x, w)
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            bias = self.weight(c)
            if beta != 1.0:
                bias = bias * beta
            y = tf.nn.bias_add(y, bias) if bias.shape.as_list() == y.shape.as_list()[-1:] else y + bias
        self.set(node.outputs[0], y)

    def _MatMul(self, node: ir.Node) -> None:
        """``tf.linalg.matmul``; a weight (a constant or quantized constant) goes through :meth:`weight`, an
        operand whose two last axes are stored swapped is read so and multiplied with ``transpose_a/b``."""
        tf = self.tf
        operands, flags = [], []
        for v in node.inputs[:2]:
            rank = self.rank(v)
            if rank < 2:
                raise NccError(f"the TensorFlow backend lowers MatMul of matrices ({_label(node)}).")
            if self.constant(v) is not None or dequantized_constant(v) is not None:
                operands.append(self.weight(v))
                flags.append(False)
                continue
            layout = self.layout_of(v)
            swapped = layout[-2:] == (rank - 1, rank - 2)
            want = (*range(rank - 2), rank - 1, rank - 2) if swapped else logical(rank)
            operands.append(self.get(v, want))
            flags.append(swapped)
        y = tf.linalg.matmul(operands[0], operands[1], transpose_a=flags[0], transpose_b=flags[1])
        self.set(node.outputs[0], y)

    def _LayerNormalization(self, node: ir.Node) -> None:
        """``(x - mean) / sqrt(var + eps) * scale + bias`` over the axes from ``axis`` on, in whatever layout
        keeps them physically last and in order."""
        tf = self.tf
        x = node.inputs[0]
        rank = self.rank(x)
        axis = node.attributes.get_int("axis", -1) % rank
        stored = self.layout_of(x)
        layout = stored if stored[axis:] == tuple(range(axis, rank)) else logical(rank)
        t = self.get(x, layout)
        axes = list(range(axis, rank))
        mean = tf.reduce_mean(t, axis=axes, keepdims=True)
        centered = t - mean
        var = tf.reduce_mean(tf.square(centered), axis=axes, keepdims=True)
        y = centered * tf.math.rsqrt(var + node.attributes.get_float("epsilon", 1e-5))
        y = y * self.weight(node.inputs[1])
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            y = y + self.weight(node.inputs[2])
        self.set(node.outputs[0], y, layout)
        if any(o is not None and _read(o) for o in node.outputs[1:]):
            raise NccError(
                f"the TensorFlow backend lowers LayerNormalization's first output only ({_label(node)})."
            )

    # -- axes ------------------------------------------------------------------------------------------
    def _axes(self, node: ir.Node, rank: int | None, *, index: int = 1, since: int = 13) -> list[int] | None:
        """``node``'s axes (an input from opset ``since`` on, before it an attribute), made non-negative for a
        value of ``rank``; None when it has none."""
        if self.opset >= since:
            value = node.inputs[index] if len(node.inputs) > index else None
            if value is None:
                return None
            axes = [int(a) for a in self.static(value, "axes", node).reshape(-1)]
        else:
            found = node.attributes.get_ints("axes", None)
            if found is None:
                return None
            axes = [int(a) for a in found]
        return axes if rank is None else [a % rank for a in axes]

    def _Softmax(self, node: ir.Node) -> None:
        self._softmax(node, self.tf.nn.softmax)

    def _LogSoftmax(self, node: ir.Node) -> None:
        self._softmax(node, self.tf.nn.log_softmax)

    def _softmax(self, node: ir.Node, op) -> None:
        tf = self.tf
        x = node.inputs[0]
        rank = self.rank(x)
        axis = node.attributes.get_int("axis", -1 if self.opset >= 13 else 1) % rank
        if self.opset < 13 and axis != rank - 1:  # over the axes from `axis` on, flattened
            t = self.get(x)
            flat = tf.reshape(t, tf.concat([tf.shape(t)[:axis], [-1]], 0))
            self.set(node.outputs[0], tf.reshape(op(flat, axis=-1), tf.shape(t)))
            return
        layout = self.layout_of(x)
        self.set(node.outputs[0], op(self.get(x, layout), axis=layout.index(axis)), layout)

    def _reduce(self, node: ir.Node, op) -> None:
        x = node.inputs[0]
        layout = self.layout_of(x)
        rank = len(layout)
        since = 13 if node.op_type == "ReduceSum" else 18
        axes = self._axes(node, rank, since=since)
        if axes is None or not axes:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                self._alias(node.outputs[0], x)
                return
            axes = list(range(rank))
        keep = bool(node.attributes.get_int("keepdims", 1))
        y = op(self.get(x, layout), axis=sorted(layout.index(a) for a in axes), keepdims=keep)
        if not keep:
            layout = tuple(a - sum(r < a for r in axes) for a in layout if a not in axes)
        self.set(node.outputs[0], y, layout)

    def _Concat(self, node: ir.Node) -> None:
        tensors, layout = self._aligned([v for v in node.inputs if v is not None])
        axis = node.attributes.get_int("axis") % len(layout)
        self.set(node.outputs[0], self.tf.concat(tensors, layout.index(axis)), layout)

    def _Transpose(self, node: ir.Node) -> None:
        """No op: the output is the input's tensor with the layouts composed."""
        x = node.inputs[0]
        stored = self._find(x)
        rank = len(stored.layout)
        perm = list(node.attributes.get_ints("perm", list(reversed(range(rank)))))
        inverse = [perm.index(a) for a in range(rank)]
        if stored.array is not None:
            self._stored[node.outputs[0].name] = _Stored(
                None, logical(rank), array=np.transpose(stored.array, perm)
            )
            return
        self.set(node.outputs[0], stored.tensor, tuple(inverse[a] for a in stored.layout))

    def _Gather(self, node: ir.Node) -> None:
        tf = self.tf
        data, indices = node.inputs[0], node.inputs[1]
        layout = self.layout_of(data)
        rank = len(layout)
        axis = node.attributes.get_int("axis", 0) % rank
        size = self.shape(data)[axis]
        constant = self.constant(indices)
        if constant is not None:
            if size is not None:
                constant = np.where(constant < 0, constant + size, constant)
            ind = tf.constant(constant)
        else:
            ind = self.get(indices)
            ind = tf.where(
                ind < 0, ind + tf.cast(tf.shape(self.get(data, layout))[layout.index(axis)], ind.dtype), ind
            )
        k = ind.shape.rank
        p = layout.index(axis)
        y = tf.gather(self.get(data, layout), ind, axis=p)

        def moved(a: int) -> int:
            return a if a < axis else a + k - 1

        out = tuple(moved(a) for a in layout[:p]) + tuple(axis + i for i in range(k))
        self.set(node.outputs[0], y, out + tuple(moved(a) for a in layout[p + 1 :]))

    def _Split(self, node: ir.Node) -> None:
        tf = self.tf
        x = node.inputs[0]
        layout = self.layout_of(x)
        axis = node.attributes.get_int("axis", 0) % len(layout)
        count = len(node.outputs)
        if self.opset >= 13 and len(node.inputs) > 1 and node.inputs[1] is not None:
            sizes = [int(s) for s in self.static(node.inputs[1], "split sizes", node)]
        elif self.opset < 13 and node.attributes.get_ints("split", None) is not None:
            sizes = list(node.attributes.get_ints("split"))
        else:
            size = self.shape(x)[axis]
            if size is None:
                raise NccError(
                    f"the TensorFlow backend needs Split's axis size at compile time ({_label(node)})."
                )
            part = -(-size // count)
            sizes = [min(part, size - i * part) for i in range(count)]
        parts = tf.split(self.get(x, layout), sizes, axis=layout.index(axis))
        for out, part in zip(node.outputs, parts):
            if out is not None:
                self.set(out, part, layout)

    def _Slice(self, node: ir.Node) -> None:
        """``tf.strided_slice`` on the physical axes; starts and ends may be computed at run time (a slice up
        to a sequence's length), axes and steps are constants."""
        tf = self.tf
        x = node.inputs[0]
        layout = self.layout_of(x)
        rank = len(layout)
        if self.opset < 10:
            starts, ends = node.attributes.get_ints("starts"), node.attributes.get_ints("ends")
            axes = [a % rank for a in node.attributes.get_ints("axes", list(range(len(starts))))]
            steps = [1] * len(starts)
        else:
            starts, ends = (self.known(v) for v in node.inputs[1:3])
            starts = self.get(node.inputs[1]) if starts is None else [int(v) for v in starts.reshape(-1)]
            ends = self.get(node.inputs[2]) if ends is None else [int(v) for v in ends.reshape(-1)]
            count = len(starts) if isinstance(starts, list) else starts.shape.num_elements()
            axes = self._axes(node, rank, index=3, since=10) or list(range(count))
            steps = [1] * len(axes)
            if len(node.inputs) > 4 and node.inputs[4] is not None:
                steps = [int(v) for v in self.static(node.inputs[4], "steps", node).reshape(-1)]
        begin, end, stride = [0] * rank, [0] * rank, [1] * rank
        begin_mask = end_mask = (1 << rank) - 1
        limit = 2**31 - 1
        for i, a in enumerate(axes):
            p = layout.index(a)
            begin[p], end[p] = (
                min(max(v[i], -limit - 1), limit) if isinstance(v, list) else tf.cast(v[i], tf.int32)
                for v in (starts, ends)
            )
            stride[p] = steps[i]
            begin_mask &= ~(1 << p)
            end_mask &= ~(1 << p)
        begin, end = (tf.stack(v) if any(tf.is_tensor(d) for d in v) else v for v in (begin, end))
        y = tf.strided_slice(
            self.get(x, layout), begin, end, stride, begin_mask=begin_mask, end_mask=end_mask
        )
        self.set(node.outputs[0], y, layout)

    def _Pad(self, node: ir.Node) -> None:
        tf = self.tf
        mode = node.attributes.get_string("mode", "constant")
        modes = {"constant": "CONSTANT", "reflect": "REFLECT"}
        if mode not in modes:
            raise NccError(
                f"the TensorFlow backend lowers constant and reflect Pad, not {mode!r} ({_label(node)})."
            )
        x = node.inputs[0]
        layout = self.layout_of(x)
        rank = len(layout)
        if self.opset < 11:
            pads, value = list(node.attributes.get_ints("pads")), node.attributes.get_float("value", 0.0)
        else:
            pads = [int(p) for p in self.static(node.inputs[1], "pads", node).reshape(-1)]
            fill = node.inputs[2] if len(node.inputs) > 2 else None
            value = float(self.static(fill, "value", node).reshape(-1)[0]) if fill is not None else 0.0
        axes = self._axes(node, rank, index=3, since=18) or list(range(rank))
        count = len(axes)
        amounts = {a: (pads[i], pads[i + count]) for i, a in enumerate(axes)}
        paddings = [list(amounts.get(a, (0, 0))) for a in layout]
        if any(p < 0 for pair in paddings for p in pair):
            raise NccError(f"the TensorFlow backend lowers Pad with non-negative pads ({_label(node)}).")
        y = tf.pad(self.get(x, layout), paddings, modes[mode], constant_values=value)
        self.set(node.outputs[0], y, layout)

    def _Tile(self, node: ir.Node) -> None:
        x = node.inputs[0]
        layout = self.layout_of(x)
        repeats = [int(r) for r in self.static(node.inputs[1], "repeats", node).reshape(-1)]
        y = self.tf.tile(self.get(x, layout), [repeats[a] for a in layout])
        self.set(node.outputs[0], y, layout)

    def _Expand(self, node: ir.Node) -> None:
        tf = self.tf
        x = node.inputs[0]
        known = self.known(node.inputs[1])
        if known is None:  # a shape computed at run time: in the logical layout
            target = tf.cast(self.get(node.inputs[1]), tf.int32)
            count = target.shape.num_elements()
            if count is None:
                raise NccError(f"the TensorFlow backend needs the rank Expand gives ({_label(node)}).")
            rank = max(count, self.rank(x))
            t = self._leading_ones(x, rank)
            target = tf.concat([tf.ones([rank - count], tf.int32), target], 0)
            self.set(node.outputs[0], tf.broadcast_to(t, tf.broadcast_dynamic_shape(tf.shape(t), target)))
            return
        target = [int(d) for d in known.reshape(-1)]
        rank = max(len(target), self.rank(x))
        target = [1] * (rank - len(target)) + target
        if self.rank(x) == rank:
            layout = self.layout_of(x)
            t = self.get(x, layout)
        else:
            layout, t = logical(rank), self._leading_ones(x, rank)
        shape = tf.broadcast_dynamic_shape(tf.shape(t), tf.constant([target[a] for a in layout], tf.int32))
        self.set(node.outputs[0], tf.broadcast_to(t, shape), layout)

    def _leading_ones(self, value: ir.Value, rank: int) -> Any:
        """``value`` in the logical layout with size-1 axes in front up to ``rank`` (ONNX broadcasting)."""
        t, own = self.get(value), self.rank(value)
        extra = rank - own
        return self.tf.reshape(
            t, self._dims(t, [1] * extra + self.shape(value), [None] * extra + list(range(own)))
        )

    def _ConstantOfShape(self, node: ir.Node) -> None:
        fill = node.attributes.get("value")
        value = fill.as_tensor().numpy().reshape(-1)[0] if fill is not None else np.float32(0)
        known = self.known(node.inputs[0])
        if known is None:
            self.set(node.outputs[0], self.tf.fill(self.get(node.inputs[0]), self.tf.constant(value)))
            return
        shape = [int(d) for d in known.reshape(-1)]
        self._stored[node.outputs[0].name] = _Stored(None, logical(len(shape)), array=np.full(shape, value))

    def _Range(self, node: ir.Node) -> None:
        bounds = [self.known(v) for v in node.inputs[:3]]
        if any(b is None for b in bounds):
            start, limit, delta = (self.get(v) for v in node.inputs[:3])
            self.set(node.outputs[0], self.tf.range(start, limit, delta))
            return
        start, limit, delta = bounds
        self._stored[node.outputs[0].name] = _Stored(
            None, (0,), array=np.arange(start, limit, delta, dtype=start.dtype)
        )

    def _Shape(self, node: ir.Node) -> None:
        tf = self.tf
        x = node.inputs[0]
        shape = self.shape(x)
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", len(shape))
        if all(d is not None for d in shape):
            self._stored[node.outputs[0].name] = _Stored(
                None, (0,), array=np.array(shape[start:end], np.int64)
            )
            return
        self.set(node.outputs[0], tf.shape(self.get(x), out_type=tf.int64)[start:end])

    # -- reshapes ---------------------------------------------------------------------------------------
    def _Reshape(self, node: ir.Node) -> None:
        """A constant target (or one TensorFlow can compute at trace time) as :meth:`_reshape`; a target
        computed at run time (a flatten to ``[batch, -1]`` read from ``Shape``) reshapes the logical order,
        a 0 in it copying the input's dimension as ONNX says."""
        tf = self.tf
        x = node.inputs[0]
        allow_zero = node.attributes.get_int("allowzero", 0)
        known = self.known(node.inputs[1])
        if known is None:
            t = self.get(x)
            shape = tf.cast(self.get(node.inputs[1]), tf.int32)
            if not allow_zero:
                rank = shape.shape.num_elements()
                if rank is None:
                    raise NccError(f"the TensorFlow backend needs the rank Reshape gives ({_label(node)}).")
                own = tf.shape(t)
                own = tf.pad(own, [[0, max(rank - self.rank(x), 0)]])[:rank]
                shape = tf.where(tf.equal(shape, 0), own, shape)
            self.set(node.outputs[0], tf.reshape(t, shape))
            return
        target = [int(d) for d in np.asarray(known).reshape(-1)]
        dims: list[int | tuple[str, int]] = [
            ("copy", i) if d == 0 and not allow_zero else d for i, d in enumerate(target)
        ]
        self._reshape(node, x, dims)

    def _Flatten(self, node: ir.Node) -> None:
        x = node.inputs[0]
        shape = self.shape(x)
        axis = node.attributes.get_int("axis", 1) % (len(shape) + 1) if shape else 0

        def product(dims):
            return None if any(d is None for d in dims) else int(np.prod(dims, dtype=np.int64))

        first = ("copy", 0) if axis == 1 else product(shape[:axis])
        second = product(shape[axis:])
        dims = [first if first is not None else -1, second if second is not None else -1]
        if dims.count(-1) > 1:
            raise NccError(
                f"the TensorFlow backend needs Flatten's input shape at compile time ({_label(node)})."
            )
        self._reshape(node, x, dims)

    def _Squeeze(self, node: ir.Node) -> None:
        x = node.inputs[0]
        shape = self.shape(x)
        axes = self._axes(node, len(shape))
        if axes is None:
            if any(d is None for d in shape):
                raise NccError(
                    f"the TensorFlow backend needs Squeeze's axes or a static shape ({_label(node)})."
                )
            axes = [i for i, d in enumerate(shape) if d == 1]
        self._reshape(node, x, [("copy", i) for i in range(len(shape)) if i not in axes])

    def _Unsqueeze(self, node: ir.Node) -> None:
        x = node.inputs[0]
        rank = self.rank(x)
        raw = self._axes(node, None) or []
        axes = {a % (rank + len(raw)) for a in raw}
        source = iter(range(rank))
        dims: list = [1 if i in axes else ("copy", next(source)) for i in range(rank + len(axes))]
        self._reshape(node, x, dims)

    def _reshape(self, node: ir.Node, x: ir.Value, dims: list) -> None:
        """``x`` reshaped to ``dims`` (ints, ``-1``, ``("copy", i)``: input axis ``i``). When the reshape only
        adds, drops or moves size-1 axes, a physical reshape in a layout that keeps the input's order
        (channels last when a reader wants it); otherwise a reshape of the logical order."""
        tf = self.tf
        out = node.outputs[0]
        shape = self.shape(x)
        sizes: list[int | None] = []
        for d in dims:
            sizes.append(shape[d[1]] if isinstance(d, tuple) else None if d == -1 else d)
        if -1 in dims and all(s is not None for s in shape) and sum(s is None for s in sizes) == 1:
            known = int(np.prod([s for s in sizes if s is not None], dtype=np.int64))
            sizes[dims.index(-1)] = int(np.prod(shape, dtype=np.int64)) // known if known else 0
        stored = self._find(x)
        pairs = _size_one_moves(shape, sizes, dims)
        if pairs is not None and stored.array is None:
            order = [pairs[a] for a in stored.layout if shape[a] != 1]  # output axes, physical order
            ones = [o for o, s in enumerate(sizes) if s == 1]
            rank = len(sizes)
            candidates = [logical(rank), channels_last(rank)]
            if rank >= 3 and self._wants_channels_last(out):
                candidates.reverse()
            layout = next(
                (c for c in candidates if [a for a in c if a not in ones] == order), tuple(order + ones)
            )
            physical = [sizes[a] for a in layout]
            axis_of = {pairs[a]: j for j, a in enumerate(stored.layout) if shape[a] != 1}
            t = stored.tensor
            sources = [axis_of.get(a) for a in layout]
            dims = t.shape.as_list()
            if len(dims) != len(physical) or any(
                d != p or p is None and sources[j] != j for j, (d, p) in enumerate(zip(dims, physical))
            ):
                t = tf.reshape(t, self._dims(t, physical, sources))
            self.set(out, t, layout)
            return
        if stored.array is not None:
            target = [shape[d[1]] if isinstance(d, tuple) else d for d in dims]
            self._stored[out.name] = _Stored(None, logical(len(dims)), array=stored.array.reshape(target))
            return
        t = self.get(x)
        self.set(
            out, tf.reshape(t, self._dims(t, sizes, [d[1] if isinstance(d, tuple) else None for d in dims]))
        )


# -- helpers ------------------------------------------------------------------------------------------------

_RESERVED = frozenset({"self", "args", "kwargs"})


def _array(value: ir.Value | None) -> np.ndarray | None:
    """The data of a constant, an initializer listed as a graph input included (the backend takes the graph's
    weights as they are)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    return constant_array(value)


def _constant_nodes(graph: ir.Graph) -> tuple[set[int], set[int]]:
    """Ids of the nodes that read only constants (and such nodes' outputs), lowered when read; and of those
    evaluated at trace time into arrays: all but a quantized weight's ``DequantizeLinear`` (which stays a
    FakeQuant op for the converter) and what reads it."""
    deferred: set[int] = set()
    folded: set[int] = set()
    for node in graph:
        producers = [v.producer() if v is not None and _array(v) is None else None for v in node.inputs]
        if all(
            p is None and (v is None or _array(v) is not None) or p is not None and id(p) in deferred
            for v, p in zip(node.inputs, producers)
        ):
            deferred.add(id(node))
            if node.op_type != "DequantizeLinear" and all(p is None or id(p) in folded for p in producers):
                folded.add(id(node))
    return deferred, folded


def same_qparams(lowering: TfLowering, q: ir.Node, dq: ir.Node) -> bool:
    """Whether ``dq`` reads ``q``'s codes on the same grid (for any two Q/DQ nodes: whether their grids are
    the same). A per-axis DequantizeLinear repeating one scale and zero point is the per-tensor one (insert-qdq writes those before a layer it keeps float, so that
    onnxruntime does not quantize that layer after all)."""
    a, b = lowering.qparams(q), lowering.qparams(dq)

    def flat(p):
        one = np.unique(p.scale).size == 1 and np.unique(p.zero_point).size == 1
        return (None, p.scale[:1], p.zero_point[:1]) if one else (p.axis, p.scale, p.zero_point)

    (a_axis, a_scale, a_zero), (b_axis, b_scale, b_zero) = flat(a), flat(b)
    return (
        a.dtype == b.dtype
        and a_axis == b_axis
        and np.array_equal(a_scale, b_scale)
        and np.array_equal(a_zero, b_zero)
    )


def _physical(array: np.ndarray, layout: Layout) -> np.ndarray:
    return np.transpose(array, layout) if array.ndim == len(layout) else array


def _size_one_moves(shape, sizes, dims) -> dict[int, int] | None:
    """When reshaping ``shape`` to ``sizes`` only adds, drops or moves size-1 axes: input axis -> output axis
    for the others (in order), else None. An unknown size pairs only with an unknown size: the copy of that
    axis, or the one unknown left (the element count fixes it)."""
    ins = [i for i, s in enumerate(shape) if s != 1]
    outs = [o for o, s in enumerate(sizes) if s != 1]
    if len(ins) != len(outs):
        return None
    loose = 0
    for i, o in zip(ins, outs):
        if shape[i] is None or sizes[o] is None:
            if shape[i] is not None or sizes[o] is not None:
                return None
            if dims[o] != ("copy", i):
                loose += 1
        elif shape[i] != sizes[o]:
            return None
    if loose > 1:
        return None
    return dict(zip(ins, outs))


def _same(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's ``SAME`` pads ``(begin, end)`` for one axis (the odd one at the end)."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _ceil_pads(size: int, kernel: int, stride: int, dilation: int, begin: int, end: int) -> tuple[int, int]:
    """Pads that give ``ceil_mode``'s output size with floor division: more at the end, for windows that start
    inside the input or its begin padding."""
    effective = (kernel - 1) * dilation + 1
    out = -(-(size + begin + end - effective) // stride) + 1
    if (out - 1) * stride >= size + begin:
        out -= 1
    return begin, max(end, (out - 1) * stride + effective - size - begin)


def _signature_shape(value: ir.Value) -> list[int | None]:
    if value.shape is None:
        raise NccError(f"the TensorFlow backend needs the rank of input {value.name!r}.")
    return [d if isinstance(d, int) else None for d in value.shape]


def _tf_dtype(tf, dtype: ir.DataType | None, name: str):
    try:
        return tf.as_dtype(dtype.numpy())
    except (AttributeError, TypeError):
        raise NccError(f"the TensorFlow backend cannot take {name!r} of type {dtype}.") from None


def _tf_op(tf, path: str):
    module, _, name = path.rpartition(".")
    return getattr(getattr(tf, module), name)


def _read(value: ir.Value) -> bool:
    return value.is_graph_output() or bool(value.uses())


def scope_name(name: str) -> str:
    """The TensorFlow name scope the node named ``name`` is lowered in (its ops are ``<scope>/...``): the
    name with what TensorFlow refuses (``[^A-Za-z0-9_.-/]``) as ``_``."""
    text = re.sub(r"[^A-Za-z0-9_.\-/]", "_", name).strip("/")
    return text if text and (text[0].isalnum() or text[0] == ".") else f"n{text}"


def _label(node: ir.Node) -> str:
    return f"node {node.name!r}" if node.name else f"an unnamed {node.op_type}"
