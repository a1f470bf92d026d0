"""The ``legalize-qoperator`` pass: rewrite QDQ groups into onnxruntime's integer kernels.

The input follows the QDQ conventions of :mod:`ncc.passes.quant`: quantized
tensors are read through ``DequantizeLinear`` and a quantized result is
written through ``QuantizeLinear``. A *group* is a float op whose inputs are
all dequantized and whose output is quantized::

    DQ(x_q, xs, xz) ─┐
    DQ(w_q, ws, wz) ─┼─ Conv ─ [Relu | Clip] ─ Q(·, ys, yz) ─► y_q
    DQ(b_i32, xs·ws)─┘

becomes one integer node reading ``x_q`` and writing ``y_q``::

    y_q = QLinearConv(x_q, xs, xz, w_q, ws, wz, ys, yz, b_i32)

What converts (ONNX domain unless ``com.microsoft::``):

==================  ===========================================================
Conv                QLinearConv (per-channel weight scales, int32 bias)
MatMul              QLinearMatMul when the output is quantized; otherwise
                    ``com.microsoft::MatMulIntegerToFloat`` (float output),
                    folding a following ``Add`` of a constant 1-D bias of size N
Gemm                ``com.microsoft::QGemm`` (u8 or float output)
Add / Mul           ``com.microsoft::QLinearAdd`` / ``QLinearMul``
Concat              ``com.microsoft::QLinearConcat``
GlobalAveragePool   ``com.microsoft::QLinearGlobalAveragePool``
AveragePool         ``com.microsoft::QLinearAveragePool``
Sigmoid, LeakyRelu  ``com.microsoft::QLinearSigmoid`` / ``QLinearLeakyRelu``
Softmax             ``com.microsoft::QLinearSoftmax`` (``opset`` attribute set)
Where               ``com.microsoft::QLinearWhere``
pass-through ops    the same op on the 8-bit tensor, when the scale and zero
                    point are equal on both sides (Reshape, Transpose, MaxPool,
                    Flatten, Squeeze, Unsqueeze, Slice, Split, Gather, Pad,
                    Resize nearest/linear, DepthToSpace, SpaceToDepth, Identity)
==================  ===========================================================

Why each rewrite is exact (up to float rounding in the kernels):

- A ``Relu`` or ``Clip(lo, hi)`` between the op and the output
  ``QuantizeLinear(s, z)`` is absorbed when ``round(lo/s) + z <= qmin`` and
  ``round(hi/s) + z >= qmax``: the quantizer's saturation already clamps there,
  so ``Q(act(y)) == Q(y)``. For Relu that means ``z == qmin``.
- The int32 bias of QLinearConv/QGemm has scale ``xs·ws`` and zero point 0.
  A bias dequantized with that scale is used as is; any other bias (float, or
  another scale, or Gemm's ``beta/alpha`` folded in since QGemm computes
  ``alpha·(A·B + C)``) is requantized to it, an error of at most half an
  accumulator step.
- ``Q(DQ(t))`` with equal parameters is ``t``: such pairs are removed so
  tensors stay 8-bit between integer kernels.

A group that does not match exactly (non-constant scales, per-channel
activations, an output read both through Q and in float, mixed u8/s8, ...)
stays QDQ and the report says why. The rewrite happens in place through
:class:`ncc.ir.rewrite.Rewriter`, so each new node records the ids of the
DQ/op/Q nodes it absorbed and keeps the float op's name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.ops import PASSTHROUGH, ensure_opset, is_onnx_domain, onnx_opset
from ncc.ir.rewrite import (
    MatchResult,
    Pattern,
    Rewriter,
    apply_patterns,
    bias_add,
    constant_array,
    constant_tensor,
    consumers,
)
from ncc.passes.base import Pass, PassContext, PassResult, option
from ncc.targets import DEFAULT_TARGET, X86_VNNI, TargetProfile, get_target

__all__ = ["LegalizeQOperator", "QOperatorReport", "KeptGroup", "to_qoperator"]

MS = "com.microsoft"

_INT8 = {ir.DataType.UINT8: (0, 255), ir.DataType.INT8: (-128, 127)}

#: A handler's answer for a node that is no QDQ group at all (nothing to report).
_NOT_A_GROUP = "not a QDQ group: its output is not quantized"


@dataclass(frozen=True)
class KeptGroup:
    """A quantized-input op left in QDQ form, and why."""

    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op_type} {self.node!r}: {self.reason}"


@dataclass
class QOperatorReport:
    """What :func:`to_qoperator` did."""

    target: str
    #: QOperator node types emitted (``com.microsoft::`` prefix for contrib ops) -> count.
    emitted: Counter = field(default_factory=Counter)
    #: Pass-through op types now running on the 8-bit tensor -> count.
    passthrough: Counter = field(default_factory=Counter)
    #: Ops that still read DequantizeLinear outputs, with the reason.
    kept: list[KeptGroup] = field(default_factory=list)
    #: QuantizeLinear -> DequantizeLinear round trips removed, and Q/DQ nodes left unused and dropped.
    requantize_removed: int = 0
    qdq_nodes_removed: int = 0
    initializers_removed: int = 0
    converged: bool = True

    @property
    def modified(self) -> bool:
        return bool(self.emitted or self.passthrough or self.requantize_removed)

    def summary(self) -> str:
        lines = [f"qoperator ({self.target}):"]
        for op, n in sorted(self.emitted.items()):
            lines.append(f"  {op}: {n}")
        for op, n in sorted(self.passthrough.items()):
            lines.append(f"  {op} on 8-bit: {n}")
        if self.requantize_removed:
            lines.append(f"  Q(DQ(t)) round trips removed: {self.requantize_removed}")
        for kept in self.kept:
            lines.append(f"  kept QDQ: {kept}")
        if not self.converged:
            lines.append("  warning: the rewrite driver stopped before converging")
        return "\n".join(lines)


@dataclass(frozen=True)
class LegalizeQOperator(Pass):
    """Rewrite QDQ groups into onnxruntime's QOperator kernels (QLinearConv, QGemm, ...): --format qoperator."""

    name: ClassVar[str] = "legalize-qoperator"
    target: str = option(DEFAULT_TARGET, "target profile (which ops and pass-throughs it runs in integer)")

    def requires(self, model: ir.Model) -> None:
        if not any(n.op_type == "QuantizeLinear" for n in model.graph):
            raise NccError(
                "legalize-qoperator (--format qoperator) needs a statically quantized model "
                "(QuantizeLinear/DequantizeLinear pairs, e.g. from --pass int8)."
            )

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        report = to_qoperator(model, target=get_target(self.target))
        stats = {f"{op} emitted": n for op, n in sorted(report.emitted.items())}
        stats.update({f"{op} on 8-bit": n for op, n in sorted(report.passthrough.items())})
        stats["groups kept QDQ"] = len(report.kept)
        return PassResult(modified=report.modified, stats=stats, notes=report.summary().splitlines())


def to_qoperator(model: ir.Model, *, target: TargetProfile = X86_VNNI) -> QOperatorReport:
    """Rewrite the QDQ groups of ``model`` into QOperator kernels, in place."""
    report = QOperatorReport(target=target.name)
    legal = _Legalizer(model, target, report)
    unused_before = {
        id(v)
        for g in (model.graph, *model.graph.subgraphs())
        for v in g.initializers.values()
        if not v.uses()
    }
    patterns: list[Pattern] = [_QOpPattern(op, legal) for op in sorted(_HANDLERS) if op in target.static_ops]
    patterns += [_QOpPattern(op, legal) for op in sorted(PASSTHROUGH & target.passthrough_ops)]
    patterns.append(_RequantizePattern(legal))
    stats = apply_patterns(model, patterns)
    report.converged = stats.converged
    for graph in (model.graph, *model.graph.subgraphs()):
        _cleanup(graph, report, unused_before)
    if any(n.domain == MS for g in (model.graph, *model.graph.subgraphs()) for n in g):
        ensure_opset(model, MS)
    report.kept = legal.kept_groups()
    return report


# -- quantization parameters ---------------------------------------------------------------------


@dataclass
class _QParams:
    """Scale and zero point of one Q or DQ node."""

    node: ir.Node
    scale: np.ndarray
    zero_point: np.ndarray
    dtype: ir.DataType  # the 8-bit (or int32) side
    axis: int | None  # None: per-tensor

    @property
    def per_tensor(self) -> bool:
        return self.axis is None

    def same_as(self, other: _QParams) -> bool:
        return (
            self.per_tensor
            and other.per_tensor
            and self.dtype == other.dtype
            and np.array_equal(self.scale.reshape(()), other.scale.reshape(()))
            and int(self.zero_point.reshape(())) == int(other.zero_point.reshape(()))
        )


def _params(node: ir.Node) -> _QParams | str:
    """Read a QuantizeLinear/DequantizeLinear node's parameters, or say why they are unusable."""
    kind = "QuantizeLinear" if node.op_type == "QuantizeLinear" else "DequantizeLinear"
    inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
    scale = constant_array(inputs[1])
    if scale is None:
        return f"{kind} {node.name!r} has a non-constant scale"
    zp_value = inputs[2]
    zero_point = constant_array(zp_value)
    if zp_value is not None and zero_point is None:
        return f"{kind} {node.name!r} has a non-constant zero point"
    if (block := node.attributes.get("block_size")) is not None and block.value:
        return f"{kind} {node.name!r} is block-quantized"
    if kind == "DequantizeLinear":
        dtype = inputs[0].dtype if inputs[0] is not None else None
    else:
        out_dtype = node.attributes.get("output_dtype")
        if zero_point is not None:
            dtype = ir.DataType.from_numpy(zero_point.dtype)
        elif out_dtype is not None and out_dtype.value:
            dtype = ir.DataType(out_dtype.value)
        else:
            dtype = ir.DataType.UINT8
    if dtype is None:
        return f"{kind} {node.name!r}: the quantized dtype is unknown"
    if zero_point is None:
        zero_point = np.zeros((), dtype.numpy())
    if zero_point.shape != scale.shape:
        return f"{kind} {node.name!r}: scale and zero point shapes differ"
    axis = None
    if scale.size != 1:
        rank = _rank(inputs[0])
        if rank is None:
            return f"{kind} {node.name!r}: per-axis quantization of a tensor of unknown rank"
        raw = node.attributes.get("axis")
        axis = raw.value if raw is not None else 1
        axis = axis + rank if axis < 0 else axis
        if scale.ndim != 1 or not 0 <= axis < rank:
            return f"{kind} {node.name!r}: malformed per-axis parameters"
    return _QParams(node, scale.astype(np.float32), zero_point, dtype, axis)


def _rank(value: ir.Value | None) -> int | None:
    if value is None:
        return None
    if value.const_value is not None:
        return len(value.const_value.shape)
    return len(value.shape) if value.shape is not None else None


def _dequantized(value: ir.Value | None, what: str) -> tuple[ir.Value, _QParams] | str:
    """(quantized input, params) when ``value`` is a DequantizeLinear output, else a reason."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or not is_onnx_domain(node):
        return f"{what} is not dequantized"
    params = _params(node)
    if isinstance(params, str):
        return params
    return node.inputs[0], params


def _activation(value: ir.Value | None, what: str) -> tuple[ir.Value, _QParams] | str:
    found = _dequantized(value, what)
    if isinstance(found, str):
        return found
    if not found[1].per_tensor:
        return f"{what} is quantized per-axis; the kernel needs one scale"
    if found[1].dtype not in _INT8:
        return f"{what} is {found[1].dtype.name.lower()}, not 8-bit"
    return found


@dataclass
class _Output:
    """How a node's result leaves the group: through ``q`` (after absorbed ``acts``) or in float."""

    q: ir.Node | None = None
    params: _QParams | None = None
    acts: tuple[ir.Node, ...] = ()
    reason: str = ""  # why a quantized output was not usable (float output still possible)

    @property
    def quantized(self) -> bool:
        return self.q is not None


def _output(node: ir.Node, index: int = 0) -> _Output:
    out = node.outputs[index]
    readers = consumers(out)
    if out.is_graph_output() or not readers:
        return _Output()
    if len(readers) > 1:
        if any(c.op_type == "QuantizeLinear" for c in readers):
            return _Output(reason="its output is read both through QuantizeLinear and by float ops")
        return _Output()
    (consumer,) = readers
    acts: tuple[ir.Node, ...] = ()
    if consumer.op_type in ("Relu", "Clip") and is_onnx_domain(consumer):
        act_out = consumer.outputs[0]
        act_consumers = consumers(act_out)
        if (
            act_out.is_graph_output()
            or len(act_consumers) != 1
            or act_consumers[0].op_type != "QuantizeLinear"
        ):
            if any(c.op_type == "QuantizeLinear" for c in act_consumers):
                return _Output(reason=f"the output of {consumer.op_type} is read both quantized and in float")
            return _Output()
        acts, consumer = (consumer,), act_consumers[0]
    if consumer.op_type != "QuantizeLinear" or not is_onnx_domain(consumer):
        return _Output()
    params = _params(consumer)
    if isinstance(params, str):
        return _Output(reason=params)
    if not params.per_tensor or params.dtype not in _INT8:
        return _Output(reason=f"output QuantizeLinear {consumer.name!r} is not per-tensor 8-bit")
    if acts and (why := _absorb_reason(acts[0], params)):
        return _Output(reason=why)
    return _Output(consumer, params, acts)


def _absorb_reason(act: ir.Node, params: _QParams) -> str:
    """Empty when ``Q(act(y)) == Q(y)`` for every y, else why not."""
    qmin, qmax = _INT8[params.dtype]
    scale, zp = float(params.scale.reshape(())), int(params.zero_point.reshape(()))
    if act.op_type == "Relu":
        lo, hi = 0.0, None
    else:
        attrs = act.attributes
        inputs = list(act.inputs) + [None] * (3 - len(act.inputs))
        if "min" in attrs or "max" in attrs:  # Clip-6
            lo = attrs["min"].value if "min" in attrs else None
            hi = attrs["max"].value if "max" in attrs else None
        else:
            bounds = []
            for v in inputs[1:3]:
                if v is None:
                    bounds.append(None)
                    continue
                c = constant_array(v)
                if c is None:
                    return f"Clip {act.name!r} has non-constant bounds"
                bounds.append(float(c.reshape(())))
            lo, hi = bounds
    if lo is not None and np.round(np.float32(lo) / np.float32(scale)) + zp > qmin:
        return f"{act.op_type} {act.name!r} clamps at {lo:g}, above the output's quantized minimum"
    if hi is not None and np.round(np.float32(hi) / np.float32(scale)) + zp < qmax:
        return f"{act.op_type} {act.name!r} clamps at {hi:g}, below the output's quantized maximum"
    return ""


# -- the patterns --------------------------------------------------------------------------------


class _Legalizer:
    """State shared by the patterns of one run: target, report, last failure per node."""

    def __init__(self, model: ir.Model, target: TargetProfile, report: QOperatorReport):
        self.model = model
        self.target = target
        self.report = report
        self.opset = onnx_opset(model)
        self.reasons: dict[int, tuple[ir.Node, str]] = {}

    def fail(self, node: ir.Node, reason: str) -> MatchResult:
        self.reasons[id(node)] = (node, reason)
        return MatchResult.fail(reason)

    def done(self, node: ir.Node) -> None:
        self.reasons.pop(id(node), None)

    def kept_groups(self) -> list[KeptGroup]:
        kept = []
        for graph in (self.model.graph, *self.model.graph.subgraphs()):
            for node in graph:
                if node.op_type in ("QuantizeLinear", "DequantizeLinear") and is_onnx_domain(node):
                    continue
                if not any(
                    v is not None and (p := v.producer()) is not None and p.op_type == "DequantizeLinear"
                    for v in node.inputs
                ):
                    continue
                found = self.reasons.get(id(node))
                if found is not None and found[0] is node:
                    reason = found[1]
                    if reason == _NOT_A_GROUP:
                        continue
                else:
                    reason = f"{node.op_type}: no QOperator kernel on this target ({self.target.name})"
                kept.append(KeptGroup(node.name or "", node.op_type, reason))
        return kept


class _QOpPattern(Pattern):
    """One op type's QDQ group -> its QOperator form (rooted at the float op)."""

    benefit = 2

    def __init__(self, op_type: str, legal: _Legalizer):
        self.root = op_type
        self.legal = legal

    @property
    def label(self) -> str:
        return f"qoperator-{self.root}"

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        handler = _HANDLERS.get(self.root) or _passthrough
        result = handler(node, rewriter, self.legal)
        if isinstance(result, str):
            return self.legal.fail(node, result)
        self.legal.done(node)
        return MatchResult.ok()


class _RequantizePattern(Pattern):
    """``Q(DQ(t, s, z), s, z)`` is ``t``: drop the round trip between two integer ops."""

    root = "QuantizeLinear"
    benefit = 1

    def __init__(self, legal: _Legalizer):
        self.legal = legal

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        dq = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or not is_onnx_domain(dq):
            return MatchResult.fail("input is not dequantized")
        q_params, dq_params = _params(node), _params(dq)
        if isinstance(q_params, str) or isinstance(dq_params, str) or not q_params.same_as(dq_params):
            return MatchResult.fail("parameters differ (a requantization)")
        rewriter.replace_all_uses(node.outputs[0], dq.inputs[0])
        rewriter.erase(node)
        self.legal.report.requantize_removed += 1
        return MatchResult.ok()


# -- emitting ------------------------------------------------------------------------------------


def _param_value(rw: Rewriter, params: _QParams, which: str, *, scalar: bool, name: str) -> ir.Value:
    """An initializer holding the scale (``which='scale'``) or zero point, reused when possible."""
    array = params.scale if which == "scale" else params.zero_point
    index = 1 if which == "scale" else 2
    value = params.node.inputs[index] if len(params.node.inputs) > index else None
    want = array.reshape(()) if scalar else array.reshape(-1)
    if value is not None and value.is_initializer() and tuple(value.const_value.shape) == want.shape:
        if value.const_value.numpy().dtype == want.dtype:
            return value
    return rw.constant(np.ascontiguousarray(want), name)


def _scale_zp(rw: Rewriter, params: _QParams, base: str, *, scalar: bool = True) -> list[ir.Value]:
    return [
        _param_value(rw, params, "scale", scalar=scalar, name=f"{base}_scale"),
        _param_value(rw, params, "zero_point", scalar=scalar, name=f"{base}_zero_point"),
    ]


def _finish(
    rw: Rewriter,
    legal: _Legalizer,
    node: ir.Node,
    new: ir.Node,
    out: _Output,
    *,
    replaced: ir.Node | None = None,
    extra: tuple[ir.Node, ...] = (),
) -> None:
    """Route the group's result to ``new``'s output and erase what it absorbed."""
    last = out.q if out.quantized else (replaced or node)
    rw.replace_value(last.outputs[0], new.outputs[0])
    rw.erase(last)
    for dead in (*reversed(out.acts), *reversed(extra), node):
        if dead is not last and dead.graph is not None:
            rw.erase(dead)
    _keep_quant_mark(node, new)
    key = f"{new.domain}::{new.op_type}" if new.domain else new.op_type
    legal.report.emitted[key] += 1


def _keep_quant_mark(node: ir.Node, new: ir.Node) -> None:
    """The integer kernel is the node insert-qdq quantized: it keeps its ``ncc.quant`` mark, so the report
    and the runtime check count it."""
    if mark := node.metadata_props.get("ncc.quant"):
        new.metadata_props["ncc.quant"] = mark


def _absorbed(
    node: ir.Node, dqs: list[_QParams], out: _Output, extra: tuple[ir.Node, ...] = ()
) -> list[ir.Node]:
    nodes = [p.node for p in dqs] + [node, *out.acts, *extra]
    if out.q is not None:
        nodes.append(out.q)
    return nodes


def _copy_attrs(node: ir.Node, drop: tuple[str, ...] = ()) -> list[ir.Attr]:
    return [a for name, a in node.attributes.items() if name not in drop]


def _int32_bias(
    rw: Rewriter, bias: ir.Value | None, acc_scale: np.ndarray, factor: float, what: str
) -> tuple[ir.Value | None, list[_QParams]] | str:
    """The bias as int32 with scale ``acc_scale`` (reused when already so), and its DQ if any."""
    if bias is None:
        return None, []
    found = _dequantized(bias, what)
    if isinstance(found, str):
        array = constant_array(bias)
        if array is None or not np.issubdtype(array.dtype, np.floating):
            return f"{what} is neither a dequantized int32 constant nor a float constant"
        dqs, value_f = [], array.astype(np.float64)
    else:
        q_value, params = found
        data = constant_array(q_value)
        if data is None:
            return f"{what} is dequantized from a non-constant"
        if data.dtype != np.int32:
            return f"{what} is quantized to {data.dtype}, not int32"
        scale = params.scale.astype(np.float64).reshape(_axis_shape(params, data.ndim))
        zp = params.zero_point.astype(np.float64).reshape(_axis_shape(params, data.ndim))
        dqs = [params]
        if (
            factor == 1.0
            and not np.any(params.zero_point)
            and params.scale.size in (1, acc_scale.size)
            and _close(params.scale.reshape(-1), acc_scale.reshape(-1))
            and q_value.is_initializer()
            and data.ndim == 1
        ):
            return q_value, dqs
        value_f = (data.astype(np.float64) - zp) * scale
    rank = value_f.ndim
    step = acc_scale.astype(np.float64).reshape((-1,) if rank else ())
    if rank == 0:
        value_f = np.broadcast_to(value_f, step.shape)
    quantized = np.round(value_f * factor / step)
    if np.any(np.abs(quantized) > 2**31 - 1):
        return f"{what} overflows int32 at the accumulator scale"
    return rw.constant(quantized.astype(np.int32), "bias_quantized"), dqs


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float32 rounding, broadcasting a single value against many."""
    a, b = np.broadcast_arrays(a.astype(np.float64), b.astype(np.float64))
    return bool(np.allclose(a, b, rtol=1e-6, atol=0))


def _axis_shape(params: _QParams, rank: int) -> tuple[int, ...]:
    if params.per_tensor:
        return ()
    shape = [1] * rank
    shape[params.axis] = -1
    return tuple(shape)


# -- handlers: (node, rewriter, legalizer) -> None on success, a reason string otherwise ----------


def _conv(node: ir.Node, rw: Rewriter, legal: _Legalizer) -> str | None:
    x = _activation(node.inputs[0], "input 0")
    if isinstance(x, str):
        return x
    w = _dequantized(node.inputs[1], "the weight")
    if isinstance(w, str):
        return w
    w_q, wp = w
    if constant_tensor(w_q) is None:
        return "the weight is not a constant"
    if wp.dtype not in _INT8:
        return f"the weight is {wp.dtype.name.lower()}, not 8-bit"
    if not wp.per_tensor and wp.axis != 0:
        return f"the weight is quantized along axis {wp.axis}, not the output channels (0)"
    if x[1].dtype == ir.DataType.INT8 and wp.dtype == ir.DataType.UINT8:
        return "s8 activations with u8 weights have no kernel"
    out = _output(node)
    if not out.quantized:
        return out.reason or "its output is not quantized"
    if out.params.dtype != x[1].dtype and not legal.target.mixed_io_types:
        return "input and output 8-bit types differ"
    acc = (x[1].scale.reshape(()) * wp.scale.reshape(-1)).astype(np.float32)
    bias = _int32_bias(rw, node.inputs[2] if len(node.inputs) > 2 else None, acc, 1.0, "the bias")
    if isinstance(bias, str):
        return bias
    bias_value, bias_dqs = bias
    w_inputs = _scale_zp(rw, wp, "w", scalar=wp.per_tensor)
    inputs = [x[0], *_scale_zp(rw, x[1], "x"), w_q, *w_inputs, *_scale_zp(rw, out.params, "y")]
    if bias_value is not None:
        inputs.append(bias_value)
    new = rw.create(
        "QLinearConv",
        inputs,
        _copy_attrs(node),
        name=node.name,
        absorbed=_absorbed(node, [x[1], wp, *bias_dqs], out),
    )
    _finish(rw, legal, node, new, out)
    return None


def _int8_operands(node: ir.Node) -> tuple[tuple[ir.Value, _QParams], tuple[ir.Value, _QParams]] | str:
    """A MatMul's or Gemm's dequantized input A and 8-bit input B, as (codes, parameters) each, else why not."""
    a = _activation(node.inputs[0], "input A")
    if isinstance(a, str):
        return a
    b = _dequantized(node.inputs[1], "input B")
    if isinstance(b, str):
        return b
    if b[1].dtype not in _INT8:
        return f"input B is {b[1].dtype.name.lower()}, not 8-bit"
    return a, b


def _matmul(node: ir.Node, rw: Rewriter, legal: _Legalizer) -> str | None:
    operands = _int8_operands(node)
    if isinstance(operands, str):
        return operands
    a, (b_q, bp) = operands
    if not bp.per_tensor and not (_rank(b_q) == 2 and bp.axis == 1):
        return "input B is quantized per-axis other than along the columns of a 2-D matrix"
    out = _output(node)
    if out.quantized and out.params.dtype == a[1].dtype:
        inputs = [
            a[0],
            *_scale_zp(rw, a[1], "a"),
            b_q,
            *_scale_zp(rw, bp, "b", scalar=bp.per_tensor),
            *_scale_zp(rw, out.params, "y"),
        ]
        new = rw.create("QLinearMatMul", inputs, name=node.name, absorbed=_absorbed(node, [a[1], bp], out))
        _finish(rw, legal, node, new, out)
        return None
    if "MatMul" not in legal.target.float_output_ops:
        return out.reason or "its output is not quantized"
    # Float output: the integer product dequantized in the kernel, plus an optional folded bias.
    if node.outputs[0].dtype not in (None, ir.DataType.FLOAT):
        return "its output is not float32"
    shape = b_q.const_value.shape if b_q.const_value is not None else b_q.shape
    fused = bias_add(node.outputs[0], shape[-1] if shape is not None and len(shape) else None)
    add, bias = fused if fused is not None else (None, None)
    a_scale, a_zp = _scale_zp(rw, a[1], "a")
    b_scale, b_zp = _scale_zp(rw, bp, "b", scalar=bp.per_tensor)
    inputs = [a[0], b_q, a_scale, b_scale, a_zp, b_zp]
    float_out = _Output()
    extra: tuple[ir.Node, ...] = ()
    if add is not None:
        inputs.append(
            bias if bias.is_initializer() else rw.constant(constant_array(bias).astype(np.float32), "bias")
        )
        extra = (add,)
    new = rw.create(
        "MatMulIntegerToFloat",
        inputs,
        domain=MS,
        name=node.name,
        absorbed=_absorbed(node, [a[1], bp], float_out, extra),
    )
    _finish(rw, legal, node, new, float_out, replaced=add, extra=extra)
    return None


def _gemm(node: ir.Node, rw: Rewriter, legal: _Legalizer) -> str | None:
    operands = _int8_operands(node)
    if isinstance(operands, str):
        return operands
    a, (b_q, bp) = operands
    attrs = node.attributes
    trans_b = attrs["transB"].value if "transB" in attrs else 0
    alpha = attrs["alpha"].value if "alpha" in attrs else 1.0
    beta = attrs["beta"].value if "beta" in attrs else 1.0
    if not bp.per_tensor and bp.axis != (0 if trans_b else 1):
        return f"input B is quantized along axis {bp.axis}, not its N axis"
    if alpha == 0:
        return "alpha is 0"
    out = _output(node)
    if out.quantized and out.params.dtype != a[1].dtype:
        out = _Output(reason="input and output 8-bit types differ")
    acc = (a[1].scale.reshape(()) * bp.scale.reshape(-1)).astype(np.float32)
    bias = _int32_bias(rw, node.inputs[2] if len(node.inputs) > 2 else None, acc, beta / alpha, "C")
    if isinstance(bias, str):
        return bias
    bias_value, bias_dqs = bias
    inputs = [a[0], *_scale_zp(rw, a[1], "a"), b_q, *_scale_zp(rw, bp, "b", scalar=bp.per_tensor), bias_value]
    if out.quantized:
        inputs += _scale_zp(rw, out.params, "y")
    new = rw.create(
        "QGemm",
        inputs,
        _copy_attrs(node, drop=("beta",)),
        domain=MS,
        name=node.name,
        absorbed=_absorbed(node, [a[1], bp, *bias_dqs], out),
    )
    while new.inputs and new.inputs[-1] is None:
        new.resize_inputs(len(new.inputs) - 1)
    _finish(rw, legal, node, new, out)
    return None


def _unary(op: str, keep: tuple[str, ...] = ()):
    def handler(node: ir.Node, rw: Rewriter, legal: _Legalizer) -> str | None:
        x = _activation(node.inputs[0], "input 0")
        if isinstance(x, str):
            return x
        out = _output(node)
        if not out.quantized:
            return out.reason or "its output is not quantized"
        if out.params.dtype != x[1].dtype:
            return "input and output 8-bit types differ"
        attrs = [a for name, a in node.attributes.items() if name in keep]
        if node.op_type == "AveragePool":
            dilations = node.attributes.get("dilations")
            if dilations is not None and any(d != 1 for d in dilations.value):
                return "QLinearAveragePool has no dilations"
        if (
            node.op_type == "GlobalAveragePool"
            and _rank(node.inputs[0]) is not None
            and _rank(node.inputs[0]) < 3
        ):
            return "input rank below 3"
        if node.op_type == "Softmax":
            axis = (
                node.attributes["axis"].value
                if "axis" in node.attributes
                else (-1 if legal.opset >= 13 else 1)
            )
            attrs = [ir.AttrInt64("opset", legal.opset), ir.AttrInt64("axis", axis)]
        inputs = [x[0], *_scale_zp(rw, x[1], "x"), *_scale_zp(rw, out.params, "y")]
        new = rw.create(op, inputs, attrs, domain=MS, name=node.name, absorbed=_absorbed(node, [x[1]], out))
        _finish(rw, legal, node, new, out)
        return None

    return handler


def _operands(
    node: ir.Node, labelled: Sequence[tuple[ir.Value | None, str]]
) -> tuple[list[tuple[ir.Value, _QParams]], _Output] | str:
    """The 8-bit value and parameters of each ``(input, label)`` and the node's quantized output, or why the
    node cannot run on them: an input that is not a per-tensor 8-bit DequantizeLinear, an output that is not
    quantized, or u8 mixed with s8."""
    found = []
    for value, label in labelled:
        x = _activation(value, label)
        if isinstance(x, str):
            return x
        found.append(x)
    out = _output(node)
    if not out.quantized:
        return out.reason or "its output is not quantized"
    if any(x[1].dtype != out.params.dtype for x in found):
        return "inputs and output mix u8 and s8"
    return found, out


def _binary(op: str):
    def handler(node: ir.Node, rw: Rewriter, legal: _Legalizer) -> str | None:
        operands = _operands(node, [(node.inputs[0], "input A"), (node.inputs[1], "input B")])
        if isinstance(operands, str):
            return operands
        (a, b), out = operands
        inputs = [
            a[0],
            *_scale_zp(rw, a[1], "a"),
            b[0],
            *_scale_zp(rw, b[1], "b"),
            *_scale_zp(rw, out.params, "y"),
        ]
        new = rw.create(op, inputs, domain=MS, name=node.name, absorbed=_absorbed(node, [a[1], b[1]], out))
        _finish(rw, legal, node, new, out)
        return None

    return handler


def _concat(node: ir.Node, rw: Rewriter, legal: _Legalizer) -> str | None:
    operands = _operands(node, [(value, f"input {i}") for i, value in enumerate(node.inputs)])
    if isinstance(operands, str):
        return operands
    found, out = operands
    inputs = _scale_zp(rw, out.params, "y")
    for i, (x_q, params) in enumerate(found):
        inputs += [x_q, *_scale_zp(rw, params, f"x{i}")]
    new = rw.create(
        "QLinearConcat",
        inputs,
        _copy_attrs(node),
        domain=MS,
        name=node.name,
        absorbed=_absorbed(node, [p for _, p in found], out),
    )
    _finish(rw, legal, node, new, out)
    return None


def _where(node: ir.Node, rw: Rewriter, legal: _Legalizer) -> str | None:
    cond = node.inputs[0]
    if cond is not None and (p := cond.producer()) is not None and p.op_type == "DequantizeLinear":
        return "the condition is dequantized"
    operands = _operands(node, [(node.inputs[1], "input X"), (node.inputs[2], "input Y")])
    if isinstance(operands, str):
        return operands
    (x, y), out = operands
    inputs = [
        cond,
        x[0],
        *_scale_zp(rw, x[1], "x"),
        y[0],
        *_scale_zp(rw, y[1], "y"),
        *_scale_zp(rw, out.params, "z"),
    ]
    new = rw.create(
        "QLinearWhere", inputs, domain=MS, name=node.name, absorbed=_absorbed(node, [x[1], y[1]], out)
    )
    _finish(rw, legal, node, new, out)
    return None


def _passthrough(node: ir.Node, rw: Rewriter, legal: _Legalizer) -> str | None:
    """DQ -> op -> Q with equal parameters on both sides: run the op on the 8-bit tensor."""
    x = _activation(node.inputs[0], "input 0")
    if isinstance(x, str):
        return x
    x_q, xp = x
    for i, value in enumerate(node.inputs[1:], start=1):
        if value is not None and (p := value.producer()) is not None and p.op_type == "DequantizeLinear":
            return f"input {i} is dequantized too"
    if node.op_type == "MaxPool":
        if legal.opset < 12:
            return "MaxPool runs on 8-bit tensors from opset 12"
        if len(node.outputs) > 1 and node.outputs[1].uses():
            return "its Indices output is used"
    if node.op_type == "Resize":
        mode = node.attributes["mode"].value if "mode" in node.attributes else "nearest"
        if mode not in ("nearest", "linear"):
            return f"Resize mode {mode!r} has no 8-bit kernel"
    used = [i for i, o in enumerate(node.outputs) if o.uses() or o.is_graph_output()]
    outs = {}
    for i in used:
        out = _output(node, i)
        if out.acts:
            return f"{out.acts[0].op_type} between {node.op_type} and QuantizeLinear has no 8-bit form"
        if not out.quantized:
            return out.reason or _NOT_A_GROUP
        if not out.params.same_as(xp):
            return f"the scale or zero point changes across {node.op_type} (requantization)"
        outs[i] = out
    if not outs:
        return _NOT_A_GROUP
    inputs = [x_q, *node.inputs[1:]]
    if node.op_type == "Pad":
        pad = _pad_value(rw, node, xp)
        if isinstance(pad, str):
            return pad
        if pad is not None:
            inputs = inputs + [None] * (3 - len(inputs)) if len(inputs) < 3 else inputs
            inputs[2] = pad
    absorbed = [xp.node, node, *(o.q for o in outs.values())]
    new = rw.create(
        node.op_type,
        inputs,
        _copy_attrs(node),
        domain=node.domain,
        num_outputs=len(node.outputs),
        name=node.name,
        absorbed=absorbed,
    )
    for i, out in outs.items():
        rw.replace_value(out.q.outputs[0], new.outputs[i])
        rw.erase(out.q)
    _keep_quant_mark(node, new)
    rw.erase(node)
    legal.report.passthrough[node.op_type] += 1
    return None


def _pad_value(rw: Rewriter, node: ir.Node, xp: _QParams) -> ir.Value | None | str:
    mode = node.attributes["mode"].value if "mode" in node.attributes else "constant"
    if mode != "constant":
        return None
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if value is None:
        pad = 0.0
    else:
        array = constant_array(value)
        if array is None:
            return "Pad has a non-constant pad value"
        pad = float(array.reshape(()))
    qmin, qmax = _INT8[xp.dtype]
    scale, zp = float(xp.scale.reshape(())), int(xp.zero_point.reshape(()))
    q = int(np.clip(np.round(np.float32(pad) / np.float32(scale)) + zp, qmin, qmax))
    return rw.constant(np.array(q, dtype=xp.dtype.numpy()), "pad_value_quantized")


_HANDLERS = {
    "Conv": _conv,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Add": _binary("QLinearAdd"),
    "Mul": _binary("QLinearMul"),
    "Concat": _concat,
    "GlobalAveragePool": _unary("QLinearGlobalAveragePool"),
    "AveragePool": _unary(
        "QLinearAveragePool",
        keep=("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides"),
    ),
    "Sigmoid": _unary("QLinearSigmoid"),
    "LeakyRelu": _unary("QLinearLeakyRelu", keep=("alpha",)),
    "Softmax": _unary("QLinearSoftmax"),
    "Where": _where,
}


# -- cleanup -------------------------------------------------------------------------------------


def _cleanup(graph: ir.Graph, report: QOperatorReport, unused_before: set[int]) -> None:
    """Drop Q/DQ/Constant nodes and initializers the rewrite left unused (nothing else)."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if not is_onnx_domain(node) or node.op_type not in (
                "QuantizeLinear",
                "DequantizeLinear",
                "Constant",
            ):
                continue
            if any(o.uses() or o.is_graph_output() for o in node.outputs):
                continue
            graph.remove(node, safe=True)
            if node.op_type != "Constant":
                report.qdq_nodes_removed += 1
            changed = True
    for name, value in list(graph.initializers.items()):
        if id(value) in unused_before or value.uses() or value.is_graph_input() or value.is_graph_output():
            continue
        del graph.initializers[name]
        report.initializers_removed += 1
