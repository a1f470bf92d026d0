"""The quantized IR as a PyTorch graph: ATen ops in PT2E's reference form, which Inductor lowers to int8.

Every IR node becomes ATen calls in a ``torch.fx.GraphModule`` whose constants are the module's buffers.
Quantization is spelled as PT2E's converted programs spell it, so Inductor's x86 int8 lowering
(``torch/_inductor/fx_passes/quantization.py``, compiled with ``freezing``) recognizes it:

- an activation's ``QuantizeLinear`` -> ``DequantizeLinear`` pair becomes
  ``quantized_decomposed.quantize_per_tensor`` -> ``dequantize_per_tensor`` (uint8 activations: int8
  ones match Inductor's patterns but fail at run time, so ncc's torch targets quantize to u8);
- an int8 weight behind a per-channel ``DequantizeLinear`` becomes an int8 buffer read through
  ``dequantize_per_channel`` on axis 0 of the layout ATen's op takes (a Gemm or MatMul weight
  ``[K, N]`` is stored transposed, ``[N, K]``, for ``aten.linear``): only int8 weights are stored;
- an int32 bias (the IR's ``DequantizeLinear`` of the bias on ``x_scale * w_scale``) becomes its float
  value: PT2E keeps biases float and Inductor's kernels take them so.

Only what the IR spells with static attributes and constant shapes is lowered; an op without a rule,
or a shape computed at run time, is one sentence naming the op (:class:`~ncc.errors.NccError`).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.rewrite import bias_add, constant_array, dequantized_array, is_constant

#: ONNX elementwise ops and their ATen overloads (tensor-tensor; broadcasting as in ONNX).
_BINARY = {
    "Add": "add.Tensor",
    "Sub": "sub.Tensor",
    "Mul": "mul.Tensor",
    "Div": "div.Tensor",
    "Pow": "pow.Tensor_Tensor",
    "Max": "maximum.default",
    "Min": "minimum.default",
    "Equal": "eq.Tensor",
    "Less": "lt.Tensor",
    "LessOrEqual": "le.Tensor",
    "Greater": "gt.Tensor",
    "GreaterOrEqual": "ge.Tensor",
}
_LOGICAL = {"And": "logical_and.default", "Or": "logical_or.default", "Xor": "logical_xor.default"}
_UNARY = {
    "Relu": "relu.default",
    "Sigmoid": "sigmoid.default",
    "Tanh": "tanh.default",
    "Erf": "erf.default",
    "Sqrt": "sqrt.default",
    "Exp": "exp.default",
    "Neg": "neg.default",
    "Abs": "abs.default",
    "Cos": "cos.default",
    "Sin": "sin.default",
    "Reciprocal": "reciprocal.default",
    "Log": "log.default",
    "Floor": "floor.default",
    "Ceil": "ceil.default",
    "Not": "logical_not.default",
}


def to_graph_module(model: ir.Model) -> Any:
    """``model`` (ONNX domain ops, QDQ form) as a ``torch.fx.GraphModule`` taking the graph inputs in order
    and returning the graph outputs (a tuple when there are several)."""
    import torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

    return _Lowering(model, torch).build()


def _aten(torch, name: str):
    op, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, op), overload)


class _Lowering:
    def __init__(self, model: ir.Model, torch):
        self.model, self.torch = model, torch
        self.graph = torch.fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[str, Any] = {}  # IR value name -> fx node (or a Python constant)
        self.buffers: dict[str, str] = {}  # IR constant name -> buffer attribute
        self.qd = torch.ops.quantized_decomposed
        self.absorbed: set[int] = set()  # ids of IR nodes another node's lowering already covered

    # -- building ---------------------------------------------------------------------------------
    def build(self):
        graph = self.model.graph
        for value in graph.inputs:
            if not value.is_initializer():
                self.env[value.name] = self.graph.placeholder(_identifier(value.name))
        for node in graph:
            self.lower(node)
        outputs = [self.value(v) for v in graph.outputs]
        self.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        self.graph.eliminate_dead_code()  # a weight's DequantizeLinear that linear_weight stored transposed
        module = self.torch.fx.GraphModule(self.root, self.graph)
        module.eval()
        return module

    def lower(self, node: ir.Node) -> None:
        if id(node) in self.absorbed:
            return
        if node.domain not in ("", "ai.onnx"):
            raise NccError(f"the torch backend cannot lower {node.domain}::{node.op_type} ({_label(node)}).")
        rule: Callable | None = getattr(self, f"_{node.op_type}", None)
        if node.op_type in _BINARY:
            result = self.binary(node)
        elif node.op_type in _LOGICAL:
            result = self.call(_LOGICAL[node.op_type], self.value(node.inputs[0]), self.value(node.inputs[1]))
        elif node.op_type in _UNARY:
            result = self.call(_UNARY[node.op_type], self.value(node.inputs[0]))
        elif rule is not None:
            result = rule(node)
        else:
            raise NccError(f"the torch backend cannot lower {node.op_type} yet ({_label(node)}).")
        if isinstance(result, tuple):  # one fx node per output
            for output, part in zip(node.outputs, result):
                if output is not None:
                    self.env[output.name] = part
            return
        self.env[node.outputs[0].name] = result

    def binary(self, node: ir.Node):
        """An elementwise op; a float32 one with a single-value float32 constant that broadcasts nothing
        takes it as a Python scalar: Inductor bakes it into its kernels, and its attention fusion needs
        the softmax scale as a number (a one-element tensor there fails its compile)."""
        op, (a, b) = node.op_type, node.inputs[:2]
        orders = [(a, b), (b, a)] if op in ("Add", "Mul") else [(a, b)] if op in ("Sub", "Div") else []
        for x, c in orders:
            scalar = self.scalar(c, x)
            if scalar is not None:
                return self.call(_BINARY[op], self.value(x), scalar)
        return self.call(_BINARY[op], self.value(a), self.value(b))

    def scalar(self, constant: ir.Value, other: ir.Value) -> float | None:
        array = self.constant(constant)
        if array is None or array.size != 1 or array.dtype != np.float32 or other.dtype != ir.DataType.FLOAT:
            return None
        if other.shape is None or array.ndim > len(other.shape):
            return None
        return float(array.reshape(()))

    def call(self, overload: str, *args):
        return self.graph.call_function(_aten(self.torch, overload), args)

    def value(self, value: ir.Value | None):
        """The fx node (or buffer read) standing for ``value``."""
        if value is None:
            return None
        if value.name in self.env:
            return self.env[value.name]
        array = self.constant(value)
        if array is None:
            raise NccError(f"the torch backend found no producer for {value.name!r}.")
        node = self.buffer(value.name, array)
        self.env[value.name] = node
        return node

    def constant(self, value: ir.Value | None) -> np.ndarray | None:
        """The data of a constant (an initializer, also one listed as a graph input: the backend takes
        the graph's weights as they are, or a Constant node's value), else None."""
        if value is not None and value.const_value is not None:
            return value.const_value.numpy()
        return constant_array(value)

    def convert(self, x, dtype):
        """``x`` (an fx node) converted to the torch ``dtype``."""
        return self.graph.call_function(_aten(self.torch, "_to_copy.default"), (x,), {"dtype": dtype})

    def buffer(self, name: str, array):
        """A module buffer holding ``array`` (numpy, or a tensor already in torch's layout), made once per name."""
        attr = self.buffers.get(name)
        if attr is None:
            attr = f"c{len(self.buffers)}_{_identifier(name)[:40]}"
            tensor = (
                array
                if isinstance(array, self.torch.Tensor)
                else self.torch.from_numpy(np.ascontiguousarray(array))
            )
            self.root.register_buffer(attr, tensor)
            self.buffers[name] = attr
        return self.graph.get_attr(attr)

    def ints(self, node: ir.Node, name: str, default: list[int]) -> list[int]:
        return list(node.attributes.get_ints(name, default))

    def static(self, value: ir.Value, what: str) -> np.ndarray:
        array = self.constant(value)
        if array is None:
            raise NccError(
                f"the torch backend needs a constant {what} ({value.name!r} is computed at run time)."
            )
        return array

    # -- quantization ----------------------------------------------------------------------------
    def _QuantizeLinear(self, node: ir.Node):
        scale, zero, dtype, lo, hi = self.qparams(node)
        if scale.size != 1:
            raise NccError(f"the torch backend quantizes activations per tensor only ({_label(node)}).")
        op = self.qd.quantize_per_tensor.default
        return self.graph.call_function(
            op, (self.value(node.inputs[0]), float(scale.reshape(())), int(zero.reshape(())), lo, hi, dtype)
        )

    def _DynamicQuantizeLinear(self, node: ir.Node):
        """u8 codes, scale and zero point chosen at run time from the activation's range, as PT2E's dynamic
        graphs compute them (``choose_qparams.tensor``), which Inductor fuses into its dynamic int8 linear."""
        x = self.value(node.inputs[0])
        eps = float(np.finfo(np.float32).eps)
        params = self.graph.call_function(self.qd.choose_qparams.tensor, (x, 0, 255, eps, self.torch.uint8))
        scale = self.graph.call_function(operator.getitem, (params, 0))
        zero = self.graph.call_function(operator.getitem, (params, 1))
        codes = self.graph.call_function(
            self.qd.quantize_per_tensor.tensor, (x, scale, zero, 0, 255, self.torch.uint8)
        )
        return codes, scale, zero

    def dynamic_params(self, node: ir.Node):
        """The run-time (scale, zero point) fx nodes of a DequantizeLinear reading DynamicQuantizeLinear's
        outputs, else None."""
        if len(node.inputs) < 3 or self.constant(node.inputs[1]) is not None:
            return None
        producer = node.inputs[1].producer()
        if producer is None or producer.op_type != "DynamicQuantizeLinear" or node.inputs[2] is None:
            return None
        return self.value(node.inputs[1]), self.value(node.inputs[2])

    def _DequantizeLinear(self, node: ir.Node):
        source = node.inputs[0]
        if node.attributes.get_int("block_size", 0):  # a weight-only table or weight not read by a MatMul
            if any(v is not None and v.const_value is None for v in node.inputs):
                raise NccError(f"the torch backend dequantizes blocks of constants only ({_label(node)}).")
            return self.buffer(node.outputs[0].name, dequantized_array(node))
        dynamic = self.dynamic_params(node)
        if dynamic is not None:
            op = self.qd.dequantize_per_tensor.tensor
            return self.graph.call_function(op, (self.value(source), *dynamic, 0, 255, self.torch.uint8))
        scale, zero, dtype, lo, hi = self.qparams(node)
        codes = self.constant(source)
        if codes is not None and codes.dtype == np.int32:  # a bias: PT2E keeps it float
            axis = node.attributes.get_int("axis", 1)
            shape = [1] * codes.ndim
            if scale.size > 1:
                shape[axis] = -1
            return self.buffer(node.outputs[0].name, (codes * scale.reshape(shape)).astype(np.float32))
        if scale.size == 1:
            x = self.value(source)
            op = self.qd.dequantize_per_tensor.default
            return self.graph.call_function(
                op, (x, float(scale.reshape(())), int(zero.reshape(())), lo, hi, dtype)
            )
        if codes is None:
            raise NccError(
                f"the torch backend dequantizes per channel only constant weights ({_label(node)})."
            )
        axis = node.attributes.get_int("axis", 1) % codes.ndim
        weight = self.buffer(source.name, codes)
        scales = self.buffer(f"{node.outputs[0].name}.scales", scale.astype(np.float32).reshape(-1))
        zeros = self.buffer(f"{node.outputs[0].name}.zero_points", zero.astype(np.int64).reshape(-1))
        op = self.qd.dequantize_per_channel.default
        return self.graph.call_function(op, (weight, scales, zeros, axis, lo, hi, dtype))

    def qparams(self, node: ir.Node):
        torch = self.torch
        scale = self.static(node.inputs[1], "scale").astype(np.float32)
        zero_value = node.inputs[2] if len(node.inputs) > 2 else None
        zero = self.constant(zero_value) if zero_value is not None else np.zeros((), np.uint8)
        if zero is None:
            raise NccError(f"the torch backend needs a constant zero point ({_label(node)}).")
        kinds = {
            np.dtype(np.uint8): (torch.uint8, 0, 255),
            np.dtype(np.int8): (torch.int8, -128, 127),
            np.dtype(np.int32): (torch.int32, -(2**31), 2**31 - 1),
        }
        if zero.dtype not in kinds:
            raise NccError(
                f"the torch backend quantizes to u8, s8 or s32, not {zero.dtype} ({_label(node)})."
            )
        dtype, lo, hi = kinds[zero.dtype]
        return scale, zero, dtype, lo, hi

    # -- compute ---------------------------------------------------------------------------------
    def _Conv(self, node: ir.Node):
        weight = node.inputs[1]
        rank = len(weight.shape) - 2 if weight.shape is not None else 2
        if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
            raise NccError(f"the torch backend needs explicit pads, not auto_pad ({_label(node)}).")
        pads = self.ints(node, "pads", [0] * (2 * rank))
        x = self.value(node.inputs[0])
        begin, end = pads[:rank], pads[rank:]
        if begin != end:  # ATen pads symmetrically: pad first (last axis first), ...
            extra = [p for a in reversed(range(rank)) for p in (begin[a], end[a])]
            x = self.padded(node.inputs[0], extra) or self.call("constant_pad_nd.default", x, extra, 0.0)
            begin = [0] * rank
        op = {1: "conv1d.default", 2: "conv2d.default", 3: "conv3d.default"}.get(rank)
        if op is None:
            raise NccError(
                f"the torch backend lowers 1-D to 3-D convolutions, not {rank}-D ({_label(node)})."
            )
        return self.call(
            op,
            x,
            self.value(weight),
            self.value(node.inputs[2]) if len(node.inputs) > 2 else None,
            self.ints(node, "strides", [1] * rank),
            begin,
            self.ints(node, "dilations", [1] * rank),
            node.attributes.get_int("group", 1),
        )

    def padded(self, value: ir.Value, amounts: list[int]):
        """... and for an input dequantized per tensor, pad its quantized codes with the zero point and
        dequantize again: ``dequantize -> conv`` stays adjacent, which Inductor's int8 patterns need
        (a float pad between them left stride-2 "same"-padded convolutions in float)."""
        dq = value.producer()
        if dq is None or dq.op_type != "DequantizeLinear" or self.constant(dq.inputs[0]) is not None:
            return None
        scale, zero, dtype, lo, hi = self.qparams(dq)
        if scale.size != 1:
            return None
        codes = self.call(
            "constant_pad_nd.default", self.value(dq.inputs[0]), amounts, float(zero.reshape(()))
        )
        op = self.qd.dequantize_per_tensor.default
        return self.graph.call_function(
            op, (codes, float(scale.reshape(())), int(zero.reshape(())), lo, hi, dtype)
        )

    def _Gemm(self, node: ir.Node):
        if node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0:
            raise NccError(f"the torch backend lowers Gemm with transA=0 and alpha=1 ({_label(node)}).")
        if len(node.inputs) > 2 and node.attributes.get_float("beta", 1.0) != 1.0:
            raise NccError(f"the torch backend lowers Gemm with beta=1 ({_label(node)}).")
        weight = self.linear_weight(node.inputs[1], transposed=bool(node.attributes.get_int("transB", 0)))
        bias = self.value(node.inputs[2]) if len(node.inputs) > 2 else None
        return self.call("linear.default", self.value(node.inputs[0]), weight, bias)

    def _MatMul(self, node: ir.Node):
        b = node.inputs[1]
        if not is_weight(b):
            return self.batched_matmul(node)
        dq = _dequantized_constant(b)
        if dq is not None and dq.attributes.get_int("block_size", 0):
            return self.weight_only(node, dq)
        x, weight = self.value(node.inputs[0]), self.linear_weight(b, transposed=False)
        product = node.outputs[0]
        fused = bias_add(
            product, product.shape[-1] if product.shape is not None and len(product.shape) else None
        )
        if fused is None:
            return self.call("linear.default", x, weight)
        # A bias Add joins the linear, as in PT2E's graphs: Inductor's int8 linear adds it in the kernel
        # (an Add of its own was a kernel per layer). The Add is lowered here, and skipped in its turn.
        add, bias = fused
        self.env[add.outputs[0].name] = self.call("linear.default", x, weight, self.value(bias))
        self.absorbed.add(id(add))
        return self.env[add.outputs[0].name]  # the product's only reader was the Add

    def batched_matmul(self, node: ir.Node):
        """A MatMul of two activations (attention's scores and context): ``aten.bmm`` on 3-D views when
        both sides have the same static batch dimensions, else ``aten.matmul``.

        Spelled as ``matmul``, attention's MatMul -> Softmax -> MatMul is rewritten by Inductor into its
        CPU flash-attention kernel, which at BERT's lengths is slower than the batched GEMMs and the
        fused softmax it replaces (``benchmarks/RESULTS.md``); PT2E's graphs keep the batched form."""
        a, b = node.inputs[0], node.inputs[1]
        x, y = self.value(a), self.value(b)
        shapes = (a.shape, b.shape)
        if any(s is None or len(s) < 3 or not all(isinstance(d, int) for d in s) for s in shapes):
            return self.call("matmul.default", x, y)
        (*batch, m, k), (*other, _, n) = (list(s) for s in shapes)
        if batch != other or len(batch) == 1:
            return self.call("matmul.default", x, y)  # broadcasting, or already 3-D (matmul is bmm)
        rows = int(np.prod(batch))
        product = self.call(
            "bmm.default",
            self.call("reshape.default", x, [rows, m, k]),
            self.call("reshape.default", y, [rows, k, n]),
        )
        return self.call("reshape.default", product, [*batch, m, n])

    def weight_only(self, node: ir.Node, dq: ir.Node):
        """A MatMul with a weight-only quantized weight (blocked DequantizeLinear of 4- or 8-bit codes,
        :mod:`ncc.passes.woq`) as ATen's CPU weight-only kernel, which reads packed codes and takes bf16
        activations (float32 ones run it ~10x slower): ``_weight_int4pack_mm_for_cpu`` for 4 bits,
        ``_weight_int8pack_mm`` for symmetric 8 bits with one scale per output channel. A layout neither
        kernel takes, or more rows than :data:`WOQ_MAX_ROWS` (prefill, where float32 is as fast), is
        dequantized here and runs as a float32 linear (:func:`ncc.backends.torch.check.float_weight_only` names them, with the reason)."""
        torch = self.torch
        x = node.inputs[0]
        plan = woq_kernel(dq, x.shape)
        if plan.kernel is None:
            weight = dequantized_array(dq)
            buffer = self.buffer(f"{dq.outputs[0].name}.T", np.ascontiguousarray(weight.T))
            return self.call("linear.default", self.value(x), buffer)
        k, n = plan.k, plan.n
        rows = self.convert(self.call("reshape.default", self.value(x), [-1, k]), torch.bfloat16)
        if plan.kernel == "int4":
            packed, scale_zero = pack_int4_for_cpu(torch, dq)
            product = self.call(
                "_weight_int4pack_mm_for_cpu.default",
                rows,
                self.buffer(f"{dq.inputs[0].name}.int4pack", packed),
                plan.group,
                self.buffer(f"{dq.inputs[1].name}.scale_and_zero", scale_zero),
            )
        else:
            codes = np.ascontiguousarray(dq.inputs[0].const_value.numpy().T).astype(np.int8)
            scale = dq.inputs[1].const_value.numpy().reshape(-1)
            product = self.call(
                "_weight_int8pack_mm.default",
                rows,
                self.buffer(f"{dq.inputs[0].name}.T", codes),
                self.buffer(f"{dq.inputs[1].name}.bf16", torch.from_numpy(scale).to(torch.bfloat16)),
            )
        shape = [int(d) for d in x.shape[:-1]] + [n]
        return self.call("reshape.default", self.convert(product, torch.float32), shape)

    def linear_weight(self, value: ir.Value, *, transposed: bool):
        """The ``[N, K]`` weight ``aten.linear`` takes, for an IR weight ``[N, K]`` (``transposed``) or
        ``[K, N]``: a constant is stored transposed; an int8 weight behind a per-channel DequantizeLinear
        is stored transposed with its channel axis moved to 0."""
        if transposed:
            return self.value(value)
        array = self.constant(value)
        if array is not None:
            return self.buffer(f"{value.name}.T", np.ascontiguousarray(array.T))
        dq = _dequantized_constant(value)
        if dq is None:
            return self.call("t.default", self.value(value))
        scale, zero, dtype, lo, hi = self.qparams(dq)
        codes = self.constant(dq.inputs[0])
        weight = self.buffer(f"{dq.inputs[0].name}.T", np.ascontiguousarray(codes.T))
        if scale.size == 1:
            op = self.qd.dequantize_per_tensor.default
            return self.graph.call_function(
                op, (weight, float(scale.reshape(())), int(zero.reshape(())), lo, hi, dtype)
            )
        scales = self.buffer(f"{value.name}.T.scales", scale.astype(np.float32).reshape(-1))
        zeros = self.buffer(f"{value.name}.T.zero_points", zero.astype(np.int64).reshape(-1))
        op = self.qd.dequantize_per_channel.default
        return self.graph.call_function(op, (weight, scales, zeros, 0, lo, hi, dtype))

    # -- the rest --------------------------------------------------------------------------------
    def _Cast(self, node: ir.Node):
        return self.cast(node, ir.DataType(node.attributes.get_int("to")))

    def _CastLike(self, node: ir.Node):
        return self.cast(node, node.inputs[1].dtype)

    def cast(self, node: ir.Node, dtype: ir.DataType | None):
        torch = self.torch
        if dtype is None:
            raise NccError(f"the torch backend needs the element type to cast to ({_label(node)}).")
        target = torch.from_numpy(np.zeros(0, dtype.numpy())).dtype
        array = self.constant(node.inputs[0])
        if array is not None:  # a constant: cast here
            return self.buffer(node.outputs[0].name, array.astype(dtype.numpy()))
        return self.convert(self.value(node.inputs[0]), target)

    def _Gather(self, node: ir.Node):
        axis = node.attributes.get_int("axis", 0)
        data = node.inputs[0]
        rank = len(data.shape) if data.shape is not None else None
        if axis < 0:
            if rank is None:
                raise NccError(f"the torch backend needs Gather's input rank ({_label(node)}).")
            axis += rank
        constant = self.constant(node.inputs[1])
        if constant is not None and constant.ndim == 0:  # one slice: the axis goes (index.Tensor keeps it)
            return self.call("select.int", self.value(data), axis, int(constant))
        indices = self.value(node.inputs[1])
        return self.call("index.Tensor", self.value(data), [None] * axis + [indices])

    def _GatherND(self, node: ir.Node):
        if node.attributes.get_int("batch_dims", 0):
            raise NccError(f"the torch backend lowers GatherND with batch_dims=0 ({_label(node)}).")
        shape = node.inputs[1].shape
        if shape is None or not isinstance(shape[-1], int):
            raise NccError(f"the torch backend needs GatherND's index depth ({_label(node)}).")
        view = self.broadcast_gather(node)
        if view is not None:
            return view
        indices = self.value(node.inputs[1])
        parts = [self.call("select.int", indices, -1, i) for i in range(int(shape[-1]))]
        return self.call("index.Tensor", self.value(node.inputs[0]), parts)

    def broadcast_gather(self, node: ir.Node):
        """A GatherND whose constant indices are aranges broadcast along distinct output axes (how exported
        attention masks spell ``mask[batch, None, None, key]``) as a view: permute, unsqueeze, expand.
        Gathered element by element, Inductor recomputes it inside every reader (each layer's softmax)."""
        indices = self.constant(node.inputs[1])
        data_shape = node.inputs[0].shape
        if indices is None or indices.ndim < 2 or data_shape is None:
            return None
        depth, out_rank = indices.shape[-1], indices.ndim - 1
        if len(data_shape) != depth or not all(isinstance(d, int) for d in data_shape):
            return None  # whole-element gathers only (no trailing data axes)
        axes = []
        for j in range(depth):
            component = indices[..., j]
            found = [
                a
                for a in range(out_rank)
                if component.shape[a] == data_shape[j]
                and np.array_equal(
                    component,
                    np.broadcast_to(
                        np.arange(data_shape[j]).reshape([-1 if i == a else 1 for i in range(out_rank)]),
                        component.shape,
                    ),
                )
            ]
            if not found:
                return None
            axes.append(found[0])
        if len(set(axes)) != depth:
            return None
        order = sorted(range(depth), key=lambda j: axes[j])
        x = self.value(node.inputs[0])
        if order != list(range(depth)):
            x = self.call("permute.default", x, order)
        placed = sorted(axes)
        for a in range(out_rank):
            if a not in placed:
                x = self.call("unsqueeze.default", x, a)
        return self.call("expand.default", x, list(indices.shape[:-1]))

    def _Where(self, node: ir.Node):
        condition, x, y = (self.value(v) for v in node.inputs)
        return self.call("where.self", condition, x, y)

    def _Expand(self, node: ir.Node):
        target = [int(d) for d in self.static(node.inputs[1], "Expand shape")]
        shape = node.inputs[0].shape
        if shape is None or not all(isinstance(d, int) for d in shape):
            raise NccError(f"the torch backend needs Expand's input shape ({_label(node)}).")
        full = list(np.broadcast_shapes(tuple(int(d) for d in shape), tuple(target)))
        return self.call("expand.default", self.value(node.inputs[0]), full)

    def _Unsqueeze(self, node: ir.Node):
        axes = sorted(int(a) for a in self.static(node.inputs[1], "Unsqueeze axes"))
        x = self.value(node.inputs[0])
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        for axis in axes:
            if axis < 0:
                if rank is None:
                    raise NccError(f"the torch backend needs Unsqueeze's input rank ({_label(node)}).")
                axis += rank + len(axes)
            x = self.call("unsqueeze.default", x, axis)
        return x

    def _Slice(self, node: ir.Node):
        starts = [int(v) for v in self.static(node.inputs[1], "Slice start")]
        ends = [int(v) for v in self.static(node.inputs[2], "Slice end")]
        axes = list(range(len(starts)))
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            axes = [int(v) for v in self.static(node.inputs[3], "Slice axes")]
        steps = [1] * len(starts)
        if len(node.inputs) > 4 and node.inputs[4] is not None:
            steps = [int(v) for v in self.static(node.inputs[4], "Slice steps")]
        if any(step < 1 for step in steps):
            raise NccError(f"the torch backend lowers Slice with positive steps ({_label(node)}).")
        x = self.value(node.inputs[0])
        limit = 2**63 - 1
        for axis, start, end, step in zip(axes, starts, ends, steps):
            x = self.call("slice.Tensor", x, axis, start, min(end, limit), step)
        return x

    def _Squeeze(self, node: ir.Node):
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return self.call("squeeze.default", self.value(node.inputs[0]))
        axes = [int(a) for a in self.static(node.inputs[1], "Squeeze axes")]
        return self.call("squeeze.dims", self.value(node.inputs[0]), axes)

    def _Split(self, node: ir.Node):
        axis = node.attributes.get_int("axis", 0)
        if len(node.inputs) < 2 or node.inputs[1] is None:
            shape = node.inputs[0].shape
            if shape is None or not isinstance(shape[axis], int) or shape[axis] % len(node.outputs):
                raise NccError(f"the torch backend needs Split's sizes ({_label(node)}).")
            sizes = [int(shape[axis]) // len(node.outputs)] * len(node.outputs)
        else:
            sizes = [int(v) for v in self.static(node.inputs[1], "Split sizes")]
        parts = self.call("split_with_sizes.default", self.value(node.inputs[0]), sizes, axis)
        return tuple(self.graph.call_function(operator.getitem, (parts, i)) for i in range(len(sizes)))

    def _Constant(self, node: ir.Node):
        return self.buffer(node.outputs[0].name, self.static(node.outputs[0], "Constant value"))

    def _Identity(self, node: ir.Node):
        return self.value(node.inputs[0])

    def _Clip(self, node: ir.Node):
        lo = self.constant(node.inputs[1]) if len(node.inputs) > 1 else None
        hi = self.constant(node.inputs[2]) if len(node.inputs) > 2 else None
        x = self.value(node.inputs[0])
        if lo is not None and hi is not None:
            return self.call("hardtanh.default", x, float(lo), float(hi))  # Inductor fuses it as a post-op
        return self.call(
            "clamp.default", x, None if lo is None else float(lo), None if hi is None else float(hi)
        )

    def _LeakyRelu(self, node: ir.Node):
        return self.call(
            "leaky_relu.default", self.value(node.inputs[0]), node.attributes.get_float("alpha", 0.01)
        )

    def _Softmax(self, node: ir.Node):
        return self.call("softmax.int", self.value(node.inputs[0]), node.attributes.get_int("axis", -1))

    def _Gelu(self, node: ir.Node):
        approximate = node.attributes.get_string("approximate", "none")  # keyword-only in ATen
        return self.graph.call_function(
            _aten(self.torch, "gelu.default"), (self.value(node.inputs[0]),), {"approximate": approximate}
        )

    def _Pad(self, node: ir.Node):
        mode = node.attributes.get_string("mode", "constant")
        if mode != "constant":
            raise NccError(f"the torch backend lowers constant Pad only, not {mode!r} ({_label(node)}).")
        pads = [int(p) for p in self.static(node.inputs[1], "Pad amount")]
        value = self.constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        shape = node.inputs[0].shape
        rank = len(shape) if shape is not None else len(pads) // 2
        axes = list(range(rank))
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            axes = [int(a) % rank for a in self.static(node.inputs[3], "Pad axes")]
        count = len(axes)
        begin, end = dict(zip(axes, pads[:count])), dict(zip(axes, pads[count:]))
        last = max(axes) if axes else 0
        amounts = [p for a in range(last, -1, -1) for p in (begin.get(a, 0), end.get(a, 0))]
        fill = 0.0 if value is None or value.size == 0 else float(value.reshape(-1)[0])
        return self.call("constant_pad_nd.default", self.value(node.inputs[0]), amounts, fill)

    def _MaxPool(self, node: ir.Node):
        kernel = self.ints(node, "kernel_shape", [])
        rank = len(kernel)
        pads = self.ints(node, "pads", [0] * (2 * rank))
        if pads[:rank] != pads[rank:] or node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
            raise NccError(f"the torch backend lowers MaxPool with symmetric explicit pads ({_label(node)}).")
        if rank != 2 or len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
            raise NccError(f"the torch backend lowers 2-D MaxPool without indices ({_label(node)}).")
        return self.call(
            "max_pool2d.default",
            self.value(node.inputs[0]),
            kernel,
            self.ints(node, "strides", [1] * rank),
            pads[:rank],
            self.ints(node, "dilations", [1] * rank),
            bool(node.attributes.get_int("ceil_mode", 0)),
        )

    def _ReduceMean(self, node: ir.Node):
        keep = bool(node.attributes.get_int("keepdims", 1))
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = [int(a) for a in self.static(node.inputs[1], "ReduceMean axes")]
        else:
            axes = self.ints(node, "axes", [])
        if not axes:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                return self.value(node.inputs[0])
            rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
            if rank is None:
                raise NccError(f"the torch backend needs the rank of ReduceMean's input ({_label(node)}).")
            axes = list(range(rank))
        return self.call("mean.dim", self.value(node.inputs[0]), axes, keep)

    def _GlobalAveragePool(self, node: ir.Node):
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else 4
        return self.call("mean.dim", self.value(node.inputs[0]), list(range(2, rank)), True)

    def _Flatten(self, node: ir.Node):
        axis = node.attributes.get_int("axis", 1)
        x = self.value(node.inputs[0])
        if axis == 0:
            return self.call("reshape.default", x, [1, -1])
        flat = self.call("flatten.using_ints", x, axis, -1)
        return self.call("flatten.using_ints", flat, 0, axis - 1) if axis > 1 else flat

    def _Reshape(self, node: ir.Node):
        shape = [int(d) for d in self.static(node.inputs[1], "Reshape target")]
        source = node.inputs[0].shape
        for i, d in enumerate(shape):
            if d == 0:  # ONNX: copy the input's dimension
                if source is None or i >= len(source) or not isinstance(source[i], int):
                    if i == 0 and -1 not in shape:
                        shape[i] = -1
                        continue
                    raise NccError(
                        f"the torch backend cannot resolve Reshape's 0 at axis {i} ({_label(node)})."
                    )
                shape[i] = source[i]
        return self.call("reshape.default", self.value(node.inputs[0]), shape)

    def _Transpose(self, node: ir.Node):
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        perm = self.ints(node, "perm", list(reversed(range(rank))) if rank else [])
        return self.call("permute.default", self.value(node.inputs[0]), perm)

    def _Concat(self, node: ir.Node):
        return self.call(
            "cat.default", [self.value(v) for v in node.inputs], node.attributes.get_int("axis", 0)
        )

    def _LayerNormalization(self, node: ir.Node):
        axis = node.attributes.get_int("axis", -1)
        shape = node.inputs[0].shape
        if shape is None or not all(isinstance(d, int) for d in list(shape)[axis:]):
            raise NccError(f"the torch backend needs LayerNormalization's normalized dims ({_label(node)}).")
        dims = [int(d) for d in list(shape)[axis:]]
        bias = self.value(node.inputs[2]) if len(node.inputs) > 2 else None
        return self.call(
            "layer_norm.default",
            self.value(node.inputs[0]),
            dims,
            self.value(node.inputs[1]),
            bias,
            node.attributes.get_float("epsilon", 1e-5),
        )


#: Rows (tokens) up to which a weight-only MatMul runs the packed-weight kernel: decoding and short inputs.
#: Measured on SmolLM2's [576, 1536] (AMX Xeon, 1 thread): int4 48 / 166 / 324 us at 1 / 8 / 16 rows
#: against float32's 119 / 358 / 336 us; from 16 rows on float32 is as fast, at 32 faster (707 vs 480).
WOQ_MAX_ROWS = 8
#: Group sizes ``_weight_int4pack_mm_for_cpu`` takes.
INT4_GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True)
class WoqPlan:
    kernel: str | None  # "int4" | "int8" | None (a float linear)
    reason: str
    k: int = 0
    n: int = 0
    group: int = 0


def woq_kernel(dq: ir.Node, x_shape) -> WoqPlan:
    """Which CPU weight-only kernel runs the MatMul reading ``dq`` on an input of ``x_shape``, or why none."""
    codes = dq.inputs[0].const_value
    if dq.attributes.get_int("axis", 1) != 0 or len(codes.shape) != 2:
        return WoqPlan(None, "the weight is not blocked along K")
    k, n = (int(d) for d in codes.shape)
    block = dq.attributes.get_int("block_size", 0)
    bits = 4 if codes.dtype in (ir.DataType.INT4, ir.DataType.UINT4) else 8
    if x_shape is None or not all(isinstance(d, int) for d in x_shape):
        return WoqPlan(None, "the input's shape is not static")
    rows = int(np.prod([int(d) for d in x_shape[:-1]]))
    if rows > WOQ_MAX_ROWS:
        return WoqPlan(
            None, f"{rows} rows: above {WOQ_MAX_ROWS} the packed-weight kernels are no faster than float32"
        )
    if bits == 4:
        if block not in INT4_GROUPS or k % block:
            return WoqPlan(
                None, f"group size {block} with K={k}: the int4 kernel takes 32, 64, 128 or 256 dividing K"
            )
        if n % 16:  # _convert_weight_to_int4pack_for_cpu refuses it
            return WoqPlan(None, f"N={n}: the int4 kernel takes N divisible by 16")
        return WoqPlan("int4", "", k, n, block)
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    symmetric = zero is None or not np.any(zero.const_value.numpy())
    if block < k or not symmetric or codes.dtype != ir.DataType.INT8:
        return WoqPlan(None, "the int8 kernel takes symmetric codes with one scale per output channel")
    if k % 16:  # torch 2.13's _weight_int8pack_mm crashes (segmentation fault) on other K
        return WoqPlan(None, f"K={k}: the int8 kernel takes K divisible by 16")
    return WoqPlan("int8", "", k, n, block)


def pack_int4_for_cpu(torch, dq: ir.Node):
    """``(packed codes, scales and zeros)`` as ``_weight_int4pack_mm_for_cpu`` reads them: codes ``[N, K]``
    as unsigned 0..15 packed by ``_convert_weight_to_int4pack_for_cpu``, and per group ``[K/g, N, 2]``
    bf16 ``(s, z)`` with ``w = (u - 8) * s + z``: for ONNX's ``(q - zp) * s``, ``u = q`` (unsigned) or
    ``q + 8`` (signed, no zero point) and ``z = (8 - zp) * s`` (0 when signed)."""
    codes = dq.inputs[0].const_value.numpy().astype(np.int32).T  # [N, K]
    scale = dq.inputs[1].const_value.numpy().astype(np.float32)  # [G, N]
    zero = dq.inputs[2] if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if dq.inputs[0].const_value.dtype == ir.DataType.INT4:
        unsigned, offset = codes + 8, np.zeros_like(scale)
    else:
        unsigned = codes
        zp = zero.const_value.numpy().astype(np.float32) if zero is not None else np.zeros_like(scale)
        offset = (8.0 - zp) * scale
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.from_numpy(np.ascontiguousarray(unsigned, dtype=np.int32)), 1
    )
    scale_zero = torch.from_numpy(np.stack([scale, offset], axis=-1)).to(torch.bfloat16).contiguous()
    return packed, scale_zero


def is_weight(value: ir.Value | None) -> bool:
    """Whether ``value`` is a constant, or a DequantizeLinear of constant codes: what ``aten.linear`` takes as
    its weight (a MatMul with anything else stays ``aten.matmul``)."""
    return is_constant(value) or _dequantized_constant(value) is not None


def _dequantized_constant(value: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear producing ``value`` from constant codes (a quantized weight), else None."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear":
        return None
    return node if node.inputs[0] is not None and node.inputs[0].const_value is not None else None


def _identifier(name: str) -> str:
    text = re.sub(r"\W", "_", name)
    return text if text and not text[0].isdigit() else f"v_{text}"


def _label(node: ir.Node) -> str:
    return f"node {node.name!r}" if node.name else f"an unnamed {node.op_type}"
