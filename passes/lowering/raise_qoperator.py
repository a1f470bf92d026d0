"""The ``raise-qoperator`` pass: onnxruntime's integer kernels back into QDQ groups (``legalize-qoperator``
and ``pack-int4`` undone).

Each integer node becomes its float op reading ``DequantizeLinear`` of its 8-bit inputs (with the node's
scales and zero points) and, where its output is 8-bit, writing through a ``QuantizeLinear`` with the
output's parameters::

    y_q = QLinearConv(x_q, xs, xz, w_q, ws, wz, ys, yz, b_i32)

becomes::

    DQ(x_q, xs, xz) ─┐
    DQ(w_q, ws, wz) ─┼─ Conv ─ Q(·, ys, yz) ─► y_q
    DQ(b_i32, xs·ws)─┘

The QDQ form computes the same numbers (up to the kernels' float rounding), so what reads QDQ (``ncc
diff``, OpenVINO's ONNX reader, ncc's own passes) reads a QOperator model too: ncc's (``--format
qoperator``) or onnxruntime's (``quantize_static(quant_format=QOperator)``). Integer ops between
two 8-bit tensors stay as they are (a ``MaxPool`` on a ``uint8`` tensor is valid QDQ).

==================================  =============================================================
QLinearConv                         Conv; per-channel ``ws`` along axis 0; the int32 bias at ``xs·ws``
QLinearMatMul                       MatMul; per-column ``bs`` along the last axis
``MatMulIntegerToFloat``            MatMul with a float output, then ``Add`` of its bias
``QGemm``                           Gemm (``alpha`` kept, ``beta = alpha``: QGemm adds C inside
                                    ``alpha·(A·B + C)``); float output without ``y_scale``
``QLinearAdd`` / ``QLinearMul``     Add / Mul
``QLinearConcat``                   Concat
``QLinearGlobalAveragePool``        GlobalAveragePool (``channels_last = 0`` only)
``QLinearAveragePool``              AveragePool (``channels_last = 0`` only)
``QLinearSigmoid`` / ``LeakyRelu``  Sigmoid / LeakyRelu
``QLinearSoftmax``                  Softmax (its ``axis``; the last axis where its ``opset`` was < 13)
``QLinearWhere``                    Where
``MatMulInteger`` -> Cast -> Mul    MatMul between DequantizeLinears, the activation's at the scale and
                                    zero point its DynamicQuantizeLinear computes at run time
                                    (``quantize-dynamic``'s standard form as its ``form=qdq``)
``DynamicQuantizeMatMul``           the same, its activation quantized by a DynamicQuantizeLinear of its own
``MatMulNBits``                     MatMul of a blocked DequantizeLinear (opset 21) of its unpacked
                                    4/8-bit codes (``pack-int4``'s ``--format qdq`` form), its bias added
==================================  =============================================================

Each float op takes the integer node's name and metadata and records its id among those it absorbed
(:mod:`ncc.ir.ids`), so ``ncc diff`` pairs it with the float model's node as it pairs a QDQ node.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import onnx_ir as ir
from ncc.ir.ids import COMPLETED_BY_KEY, FUSED_KEY, ID_KEY
from ncc.ir.ops import PASSTHROUGH, is_onnx_domain, onnx_opset
from ncc.ir.rewrite import Rewriter, constant_array
from ncc.passes.base import Pass, PassContext, PassResult
from ncc.passes.opset import raise_opset
from ncc.passes.woq.weights import add_initializers

MS = "com.microsoft"
PER_AXIS_OPSET = 13  # DequantizeLinear's axis
BLOCKED_OPSET = 21  # DequantizeLinear's block_size, and 4-bit codes
_QMIN = {np.dtype(np.uint8): 0, np.dtype(np.int8): -128}
_SIGNED_OUTPUT = frozenset({"Conv", "MatMul", "Gemm", "Add", "Mul"})


class _Input(NamedTuple):
    """One input of a group's float op: ``value`` read through ``DequantizeLinear(value, scale, zero) {axis,
    block_size}``, or as it is without a ``scale``; with ``at_run_time``, ``value`` is a float activation
    that a DynamicQuantizeLinear quantizes first (its scale and zero point those it computes)."""

    value: ir.Value | None
    scale: ir.Value | None = None
    zero: ir.Value | None = None
    axis: int | None = None
    block: int | None = None
    at_run_time: bool = False


@dataclass(frozen=True)
class _Group:
    """A float op and what surrounds it: its inputs, and the output's ``(scale, zero point)`` (None: a float
    output). The group replaces ``replaces``'s output (default: the integer node's), erasing ``also`` with
    the integer node, and takes ``name`` (default: the integer node's)."""

    op: str
    inputs: list[_Input]
    attributes: list
    output: tuple[ir.Value, ir.Value | None] | None
    bias: ir.Value | None = None  # added to the float op's output (MatMulIntegerToFloat's)
    name: str | None = None
    replaces: ir.Node | None = None
    also: tuple[ir.Node, ...] = ()


def _optional(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _axis(scale: ir.Value | None, axis: int) -> int | None:
    """``axis`` when ``scale`` holds one value per channel, None when it holds one value."""
    shape = None if scale is None else scale.shape
    if shape is None and scale is not None and scale.const_value is not None:
        shape = scale.const_value.shape
    if shape is None or any(not isinstance(d, int) for d in shape):
        return axis
    return axis if int(np.prod(list(shape))) > 1 else None


def _attrs(node: ir.Node, drop: Sequence[str] = ()) -> list[ir.Attr]:
    return [a for name, a in node.attributes.items() if name not in drop]


def _conv(node: ir.Node, rw: Rewriter) -> _Group | str:
    x, xs, xz, w, ws, wz, ys, yz = (_optional(node, i) for i in range(8))
    bias = _optional(node, 8)
    inputs = [_Input(x, xs, xz), _Input(w, ws, wz, _axis(ws, 0))]
    if bias is not None:
        scale = _product(rw, node, xs, ws)
        if isinstance(scale, str):
            return scale
        inputs.append(_Input(bias, scale, None, _axis(ws, 0)))
    return _Group("Conv", inputs, _attrs(node), (ys, yz))


def _qlinear_matmul(node: ir.Node, rw: Rewriter) -> _Group | str:
    a, a_s, a_z, b, b_s, b_z, ys, yz = (_optional(node, i) for i in range(8))
    return _Group("MatMul", [_Input(a, a_s, a_z), _Input(b, b_s, b_z, _axis(b_s, -1))], [], (ys, yz))


def _matmul_to_float(node: ir.Node, rw: Rewriter) -> _Group | str:
    a, b, a_s, b_s, a_z, b_z, bias = (_optional(node, i) for i in range(7))
    return _Group("MatMul", [_Input(a, a_s, a_z), _Input(b, b_s, b_z, _axis(b_s, -1))], [], None, bias)


def _qgemm(node: ir.Node, rw: Rewriter) -> _Group | str:
    a, a_s, a_z, b, b_s, b_z, c, ys, yz = (_optional(node, i) for i in range(9))
    trans_b = node.attributes.get_int("transB", 0)
    alpha = node.attributes.get_float("alpha", 1.0)
    inputs = [_Input(a, a_s, a_z), _Input(b, b_s, b_z, _axis(b_s, 0 if trans_b else 1))]
    if c is not None:
        scale = _product(rw, node, a_s, b_s)
        if isinstance(scale, str):
            return scale
        inputs.append(_Input(c, scale, None, _axis(b_s, 0)))
    attrs = [*_attrs(node, drop=("beta",)), ir.AttrFloat32("beta", alpha)]
    return _Group("Gemm", inputs, attrs, (ys, yz) if ys is not None else None)


def _binary(op: str) -> Callable[[ir.Node, Rewriter], _Group | str]:
    def handler(node: ir.Node, rw: Rewriter) -> _Group | str:
        a, a_s, a_z, b, b_s, b_z, ys, yz = (_optional(node, i) for i in range(8))
        return _Group(op, [_Input(a, a_s, a_z), _Input(b, b_s, b_z)], [], (ys, yz))

    return handler


def _unary(op: str, keep: Sequence[str] = ()) -> Callable[[ir.Node, Rewriter], _Group | str]:
    def handler(node: ir.Node, rw: Rewriter) -> _Group | str:
        x, xs, xz, ys, yz = (_optional(node, i) for i in range(5))
        if node.attributes.get_int("channels_last", 0):
            return "channels_last has no float op"
        attrs = [a for name, a in node.attributes.items() if name in keep]
        if node.op_type == "QLinearSoftmax":
            axis = node.attributes.get_int("axis", -1)
            rank = len(x.shape) if x is not None and x.shape is not None else None
            if node.attributes.get_int("opset", PER_AXIS_OPSET) < 13 and axis not in (-1, (rank or 0) - 1):
                return "a Softmax before opset 13 over more than the last axis"
            attrs = [ir.AttrInt64("axis", axis)]
        return _Group(op, [_Input(x, xs, xz)], attrs, (ys, yz))

    return handler


def _concat(node: ir.Node, rw: Rewriter) -> _Group | str:
    ys, yz, *triples = node.inputs
    if len(triples) % 3:
        return "its inputs are not (value, scale, zero point) triples"
    inputs = [_Input(*triples[i : i + 3]) for i in range(0, len(triples), 3)]
    return _Group("Concat", inputs, _attrs(node), (ys, yz))


def _where(node: ir.Node, rw: Rewriter) -> _Group | str:
    cond, x, xs, xz, y, y_s, y_z, zs, zz = (_optional(node, i) for i in range(9))
    return _Group("Where", [_Input(cond), _Input(x, xs, xz), _Input(y, y_s, y_z)], [], (zs, zz))


def _matmul_nbits(node: ir.Node, rw: Rewriter) -> _Group | str:
    """MatMulNBits (``pack-int4``'s layout) as ``MatMul(A, DequantizeLinear(codes [K, N], scales [G, N],
    zero points [G, N]) {axis = 0, block_size})`` with 4- or 8-bit unsigned codes."""
    a, b, scales, zeros, g_idx, bias = (_optional(node, i) for i in range(6))
    k, n = node.attributes.get_int("K", 0), node.attributes.get_int("N", 0)
    bits, block = node.attributes.get_int("bits", 4), node.attributes.get_int("block_size", 0)
    if g_idx is not None:
        return "its g_idx (reordered groups) has no blocked DequantizeLinear"
    packed, scale = constant_array(b), constant_array(scales)
    zero = constant_array(zeros) if zeros is not None else None
    if packed is None or scale is None or (zeros is not None and zero is None):
        return "its weights are not constants"
    if bits not in (4, 8) or block < 1 or k < 1 or n < 1 or (zero is not None and zero.dtype != np.uint8):
        return "not a 4- or 8-bit layout with uint8 zero points"
    groups = -(-k // block)
    codes = _unpacked(packed, bits, n * groups * block).reshape(n, groups * block)[:, :k].T  # [K, N]
    offset = 1 << (bits - 1)
    zp = (
        np.full((groups, n), offset, np.uint8)
        if zero is None
        else _unpacked(zero.reshape(n, -1), bits, None).reshape(n, -1)[:, :groups].T
    )
    dtype = ir.DataType.UINT4 if bits == 4 else ir.DataType.UINT8
    base = node.name or "matmul"
    weight, zero_value, scale_value = add_initializers(
        rw,
        [
            (f"{base}_codes", dtype, np.ascontiguousarray(codes)),
            (f"{base}_zero_point", dtype, np.ascontiguousarray(zp)),
            (f"{base}_scale", scales.dtype, np.ascontiguousarray(scale.reshape(n, groups).T)),
        ],
        None,
    )
    return _Group("MatMul", [_Input(a), _Input(weight, scale_value, zero_value, 0, block)], [], None, bias)


def _unpacked(packed: np.ndarray, bits: int, count: int | None) -> np.ndarray:
    """Codes from bytes holding two 4-bit ones each (low nibble first), or the bytes themselves (8 bits);
    the first ``count`` of them, per row for a 2-D ``packed``."""
    if bits == 8:
        return packed.reshape(-1)[:count] if count is not None else packed
    rows = packed.reshape(-1, packed.shape[-1]) if packed.ndim == 2 else packed.reshape(1, -1)
    codes = np.stack([rows & 0x0F, rows >> 4], axis=-1).reshape(rows.shape[0], -1)
    return codes.reshape(-1)[:count] if count is not None else codes


def _dynamic_quantize_matmul(node: ir.Node, rw: Rewriter) -> _Group | str:
    """DynamicQuantizeMatMul (``quantize-dynamic{form=fused}``): its activation quantized by a
    DynamicQuantizeLinear of its own, then as MatMulIntegerToFloat."""
    a, b, b_s, b_z, bias = (_optional(node, i) for i in range(5))
    return _Group(
        "MatMul", [_Input(a, at_run_time=True), _Input(b, b_s, b_z, _axis(b_s, -1))], [], None, bias
    )


def _matmul_integer(node: ir.Node, rw: Rewriter) -> _Group | str:
    """``quantize-dynamic``'s standard form, ``MatMulInteger(DynamicQuantizeLinear(A), W_q) -> Cast -> Mul(a_s *
    w_s)``, as its ``form=qdq``: ``MatMul(DequantizeLinear(DynamicQuantizeLinear(A)), DequantizeLinear(W_q,
    w_s, w_zp))`` (the activation's scale and zero point still computed at run time), replacing the Mul."""
    a_q, w_q, a_zp, w_zp = (_optional(node, i) for i in range(4))
    dql = a_q.producer() if a_q is not None else None
    if dql is None or dql.op_type != "DynamicQuantizeLinear" or dql.outputs[0] is not a_q:
        return "its A is not quantized by a DynamicQuantizeLinear"
    if constant_array(w_q) is None or (w_zp is not None and constant_array(w_zp) is None):
        return "its weight is not a constant"
    uses = node.outputs[0].uses()
    cast = uses[0].node if len(uses) == 1 else None
    rescale = [u.node for u in cast.outputs[0].uses()] if cast is not None and cast.op_type == "Cast" else []
    if len(rescale) != 1 or rescale[0].op_type != "Mul":
        return "its product is not cast to float and rescaled by one Mul"
    rescale = rescale[0]
    scale = rescale.inputs[1] if rescale.inputs[0] is cast.outputs[0] else rescale.inputs[0]
    product = scale.producer() if scale is not None else None
    if product is None or product.op_type != "Mul" or dql.outputs[1] not in product.inputs:
        return "its rescale is not the activation's scale times the weight's"
    w_s = product.inputs[1] if product.inputs[0] is dql.outputs[1] else product.inputs[0]
    if constant_array(w_s) is None:
        return "the weight's scale is not a constant"
    inputs = [_Input(a_q, dql.outputs[1], a_zp or dql.outputs[2]), _Input(w_q, w_s, w_zp, _axis(w_s, 1))]
    also = (cast, product) if len(product.outputs[0].uses()) == 1 else (cast,)
    name = node.name.removesuffix("/MatMulInteger") if node.name else None
    return _Group("MatMul", inputs, [], None, name=name, replaces=rescale, also=also)


_HANDLERS: dict[tuple[str, str], Callable[[ir.Node, Rewriter], _Group | str]] = {
    ("", "MatMulInteger"): _matmul_integer,
    (MS, "MatMulNBits"): _matmul_nbits,
    (MS, "DynamicQuantizeMatMul"): _dynamic_quantize_matmul,
    ("", "QLinearConv"): _conv,
    ("", "QLinearMatMul"): _qlinear_matmul,
    (MS, "MatMulIntegerToFloat"): _matmul_to_float,
    (MS, "QGemm"): _qgemm,
    (MS, "QLinearAdd"): _binary("Add"),
    (MS, "QLinearMul"): _binary("Mul"),
    (MS, "QLinearConcat"): _concat,
    (MS, "QLinearGlobalAveragePool"): _unary("GlobalAveragePool"),
    (MS, "QLinearAveragePool"): _unary(
        "AveragePool", keep=("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")
    ),
    (MS, "QLinearSigmoid"): _unary("Sigmoid"),
    (MS, "QLinearLeakyRelu"): _unary("LeakyRelu", keep=("alpha",)),
    (MS, "QLinearSoftmax"): _unary("Softmax"),
    (MS, "QLinearWhere"): _where,
}


def _key(node: ir.Node) -> tuple[str, str]:
    return ("" if is_onnx_domain(node) else node.domain, node.op_type)


def raises(node: ir.Node) -> bool:
    """Whether ``node`` is an integer kernel this pass rewrites."""
    return _key(node) in _HANDLERS


def _product(rw: Rewriter, node: ir.Node, a: ir.Value | None, b: ir.Value | None) -> ir.Value | str:
    """A constant holding ``a * b`` (the int32 bias's scale), or why there is none."""
    x, y = constant_array(a), constant_array(b)
    if x is None or y is None:
        return "the bias's scale (input scale times weight scale) is not constant"
    product = (x.astype(np.float32).reshape(-1) * y.astype(np.float32).reshape(-1)).astype(np.float32)
    return rw.constant(
        product.reshape(()) if product.size == 1 else product, f"{node.name or 'node'}_bias_scale"
    )


@dataclass(frozen=True)
class RaiseQOperator(Pass):
    """Rewrite onnxruntime's integer kernels (QLinear*, QGemm, MatMulIntegerToFloat, MatMulNBits) as QDQ
    groups."""

    name: ClassVar[str] = "raise-qoperator"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        found = [n for n in graph if raises(n)]
        if not found:
            return PassResult(modified=False)
        notes = []
        wanted = BLOCKED_OPSET if any(n.op_type == "MatMulNBits" for n in found) else PER_AXIS_OPSET
        if onnx_opset(model) < wanted and (blockers := raise_opset(model, wanted)):
            notes.append(
                f"raise-qoperator: per-channel and blocked DequantizeLinear need opset {wanted}, and the model "
                f"cannot be raised to it ({blockers[0]}); the nodes needing it stay integer"
            )
        opset = onnx_opset(model)
        rw = Rewriter(model, graph)
        raised: Counter = Counter()
        for node in found:
            group = _HANDLERS[_key(node)](node, rw)
            if isinstance(group, _Group) and (need := _opset_for(group)) > opset:
                for piece in group.inputs:  # constants the handler made for it
                    for value in (piece.value, piece.scale, piece.zero):
                        if value is not None:
                            rw.drop_if_unused(value)
                group = f"its DequantizeLinear needs opset {need}"
            if isinstance(group, str):
                notes.append(f"raise-qoperator: kept {node.op_type} {node.name!r}: {group}")
                continue
            _rewrite(rw, node, group)
            raised[node.op_type] += 1
        for node in list(graph):
            if _passthrough(rw, node):
                raised[f"{node.op_type} on 8-bit"] += 1
        if raised:
            notes.insert(
                0,
                "raise-qoperator: "
                + ", ".join(f"{op} {n}" for op, n in sorted(raised.items()))
                + " as QDQ groups",
            )
        return PassResult(
            modified=bool(raised), stats={f"{op} raised": n for op, n in sorted(raised.items())}, notes=notes
        )


def _opset_for(group: _Group) -> int:
    """The opset the group's DequantizeLinears need: 21 blocked, 13 per axis, 10 else."""
    if any(piece.block is not None for piece in group.inputs):
        return BLOCKED_OPSET
    return PER_AXIS_OPSET if any(piece.axis is not None for piece in group.inputs) else 10


def _rewrite(rw: Rewriter, node: ir.Node, group: _Group) -> None:
    name = group.name if group.name is not None else node.name
    base = name or node.op_type
    rw.set_insertion_point(node)
    inputs = []
    for index, (value, scale, zero, axis, block, at_run_time) in enumerate(group.inputs):
        if at_run_time:
            dql = rw.create(
                "DynamicQuantizeLinear", [value], num_outputs=3, name=rw.fresh_name(f"{base}_quantize")
            )
            for out, dtype, shape in zip(dql.outputs, (ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8),
                                         (value.shape, ir.Shape([]), ir.Shape([]))):  # fmt: skip
                out.type, out.shape = ir.TensorType(dtype), shape
            value, scale, zero = dql.outputs
        if scale is None:
            inputs.append(value)
            continue
        attrs = {"axis": axis} if axis is not None else {}
        if block is not None:
            attrs["block_size"] = block
        dq = rw.create(
            "DequantizeLinear",
            [value, scale] + ([zero] if zero is not None else []),
            attrs,
            name=rw.fresh_name(f"{base}_dq{index}"),
        )
        _dequantized_type(dq.outputs[0], value, scale)
        inputs.append(dq.outputs[0])
    float_op = rw.create(group.op, inputs, group.attributes, name=name, absorbed=[node])
    _keep_marks(node, float_op)
    root = group.replaces or node
    old = root.outputs[0]
    result = _float_like(float_op.outputs[0], old)
    if group.bias is not None:
        add = rw.create("Add", [result, group.bias], name=rw.fresh_name(f"{base}_bias"))
        result = _float_like(add.outputs[0], old)
        float_op.metadata_props[COMPLETED_BY_KEY] = "Add"
    if group.output is not None:
        scale, zero = group.output
        if group.op in _SIGNED_OUTPUT and _implied_relu(zero):
            relu = rw.create("Relu", [result], name=rw.fresh_name(f"{base}_relu"))
            result = _float_like(relu.outputs[0], old)
            float_op.metadata_props[COMPLETED_BY_KEY] = "Relu"
        q = rw.create(
            "QuantizeLinear",
            [result, scale] + ([zero] if zero is not None else []),
            name=rw.fresh_name(f"{base}_q"),
        )
        result = q.outputs[0]
    rw.replace_value(old, result)
    rw.erase_all([root, *group.also, node] if group.replaces is not None else [node])


def _implied_relu(zero: ir.Value | None) -> bool:
    """Whether an output quantized with zero point ``zero`` clamps at 0 (the type's least code): then a
    ``Relu`` before the ``QuantizeLinear`` changes nothing it writes, and stands for the activation
    ``legalize-qoperator`` (or onnxruntime) left to that saturation."""
    array = constant_array(zero) if zero is not None else np.zeros((), np.uint8)
    if array is None or array.size != 1 or array.dtype not in _QMIN:
        return False
    return int(array.reshape(())) == _QMIN[array.dtype]


def _passthrough(rw: Rewriter, node: ir.Node) -> bool:
    """A data-movement op on a quantized 8-bit tensor (``legalize-qoperator`` moves them there when the scale
    is the same on both sides) as ``DequantizeLinear -> op -> QuantizeLinear`` with that scale."""
    if not is_onnx_domain(node) or node.op_type not in PASSTHROUGH or not node.inputs:
        return False
    q = node.inputs[0].producer() if node.inputs[0] is not None else None
    if q is None or q.op_type != "QuantizeLinear" or len(q.inputs) < 2:
        return False
    scale, zero = q.inputs[1], q.inputs[2] if len(q.inputs) > 2 else None
    if constant_array(scale) is None or constant_array(scale).size != 1:
        return False
    if node.op_type == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].uses():
        return False
    inputs = list(node.inputs)
    if node.op_type == "Pad" and len(inputs) > 2 and inputs[2] is not None:
        code = constant_array(inputs[2])
        if code is None:
            return False
        z = 0 if zero is None else int(constant_array(zero).reshape(()))
        pad = (float(code.reshape(())) - z) * float(constant_array(scale).reshape(()))
        inputs[2] = rw.constant(np.array(pad, np.float32), f"{node.name or 'pad'}_value")
    base = node.name or node.op_type
    rw.set_insertion_point(node)
    params = [scale] + ([zero] if zero is not None else [])
    dq = rw.create("DequantizeLinear", [inputs[0], *params], name=rw.fresh_name(f"{base}_dq0"))
    _dequantized_type(dq.outputs[0], inputs[0], scale)
    float_op = rw.create(
        node.op_type,
        [dq.outputs[0], *inputs[1:]],
        _attrs(node),
        domain=node.domain,
        num_outputs=len(node.outputs),
        name=node.name,
        absorbed=[node],
    )
    _keep_marks(node, float_op)
    for i, old in enumerate(node.outputs):
        if old.uses() or old.is_graph_output():
            requantized = rw.create(
                "QuantizeLinear",
                [_float_like(float_op.outputs[i], old, scale.dtype), *params],
                name=rw.fresh_name(f"{base}_q{i}"),
            )
            rw.replace_value(old, requantized.outputs[0])
    rw.erase(node)
    return True


def _dequantized_type(out: ir.Value, codes: ir.Value, scale: ir.Value) -> None:
    """A DequantizeLinear output's type (its scale's) and shape (its codes')."""
    out.type = ir.TensorType(scale.dtype or ir.DataType.FLOAT)
    shape = codes.shape if codes.shape is not None else None
    if shape is None and codes.const_value is not None:
        shape = ir.Shape(codes.const_value.shape)
    out.shape = shape


def _float_like(value: ir.Value, quantized: ir.Value, dtype: ir.DataType | None = None) -> ir.Value:
    """``value``, a float stand-in for the 8-bit ``quantized`` (or a float output it replaces), typed:
    ``dtype`` (float32 by default; ``quantized``'s own type where that is float) and its shape."""
    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    own = quantized.dtype if quantized.dtype in floats else None
    value.type = ir.TensorType(own or dtype or ir.DataType.FLOAT)
    value.shape = quantized.shape
    return value


def _keep_marks(node: ir.Node, new: ir.Node) -> None:
    """``node``'s ncc metadata (its quantization mark) on ``new``, but its id, which ``new`` has of its own."""
    for key, text in node.metadata_props.items():
        if key.startswith("ncc.") and key not in (ID_KEY, FUSED_KEY):
            new.metadata_props[key] = text
