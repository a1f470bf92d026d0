"""Dynamic (IntegerOps) INT8 quantization: int8 weights offline, activations quantized at run time.

No calibration: each activation is quantized per tensor, u8 asymmetric, from
its own min/max when the model runs (``DynamicQuantizeLinear``)::

    a_s = (max(a, 0) - min(a, 0)) / 255      a_zp = saturate(round(-min(a, 0) / a_s))
    a_q = saturate(round(a / a_s) + a_zp)                                   (u8)

Weights are quantized once, here, to int8 — per output channel by default
(one scale per column ``n`` of a MatMul's ``[K, N]`` weight), symmetric (zero
point 0, levels ``[-127, 127]``)::

    w_s[n] = max_k |W[k, n]| / 127           W_q[k, n] = round(W[k, n] / w_s[n])

and the product is an integer matmul rescaled to float::

    Y[m, n] = a_s * w_s[n] * sum_k (a_q[m, k] - a_zp) * (W_q[k, n] - w_zp[n])  (+ bias[n])

Rewrites (each candidate either rewritten with ``ncc.quant = "int8-dynamic"``
on the new compute node, or left float with ``ncc.quant.skip = "<reason>"``):

- ``MatMul(A, W)`` with a constant rank-2 ``W`` (``A`` of any rank) and, when
  the MatMul output is read only by an ``Add`` of a constant bias of ``N``
  values, that Add:

  - ``form=standard`` (default; standard ONNX ops only): ``DynamicQuantizeLinear(A)``
    (one per activation, shared by every MatMul reading ``A``) → ``MatMulInteger``
    → ``Cast`` → ``Mul(a_s * w_s)`` (→ ``Add(bias)``). onnxruntime fuses this at
    session creation into ``DynamicQuantizeMatMul`` (one reader) or
    ``DynamicQuantizeLinear`` + ``MatMulIntegerToFloat`` (shared, as Q/K/V are).
  - ``form=fused``: ``com.microsoft::DynamicQuantizeMatMul(A, W_q, w_s, w_zp,
    bias)`` per MatMul — onnxruntime's one-kernel path, each one quantizing
    ``A`` itself. Per-column ``w_s``/``w_zp`` work in onnxruntime 1.32.

  After fusion both forms run the same kernel; the standard form shares one
  activation quantization across Q/K/V, so on transformers it is as fast or
  faster, and it is the onnxruntime targets' form (numbers in ``benchmarks/RESULTS.md``).
  - ``form=qdq``: ``DynamicQuantizeLinear(A)`` → ``DequantizeLinear`` (the run-time
    scale and zero point) → ``MatMul`` with ``DequantizeLinear(W_q, w_s, axis=1)``
    (→ ``Add(bias)``): the quantization spelled as Q/DQ around a float MatMul, the
    form of PT2E's dynamic graphs, which the ``inductor`` target lowers to
    ``choose_qparams`` + oneDNN's int8 linear. ``form=target`` (default) takes the
    target's form.

- ``Gemm(A, B, C)`` with a constant ``B``: as MatMul; ``transB = 1`` is
  handled by transposing the constant here, ``alpha`` is folded into the
  weight scale and ``beta * C`` (a constant of ``N`` values, or broadcastable
  to them) into the bias. ``transA = 1`` is left float.
- ``Gather(E, idx)`` on a constant table ``E`` (axis 0): the table is stored
  int8 with one scale per row; the int8 rows are gathered, then dequantized
  with their gathered scales (``Cast(Gather(E_q, idx)) * Gather(e_s, idx)``
  with ``e_s`` stored as ``[V, 1]``), so only the rows used are touched at
  run time. Per-tensor: ``DequantizeLinear(Gather(E_q, idx), e_s)``.
- ``Conv(X, W, B)`` with a constant ``W``, only when ``op_types`` names Conv
  (ConvInteger is much slower than float Conv on CPU): ``DynamicQuantizeLinear``
  → ``ConvInteger`` → ``Cast`` → ``Mul(a_s * w_s)`` → ``Add(B)``, weights
  per output channel (axis 0). onnxruntime's ConvInteger takes one scalar
  weight zero point, so per-channel Conv weights must be symmetric.

Weights are read one at a time (a memory-mapped external tensor is read once
and released); a weight shared by several nodes is quantized once.

Weight integer type and the CPU. ``DynamicQuantizeMatMul`` / ``MatMulInteger``
run u8 activations against s8 weights (default) or u8 weights (``weight_dtype=u8``,
zero point 128). With VNNI the u8 x s8 kernel is exact. On x86 CPUs without VNNI
onnxruntime's u8 x s8 kernels use ``vpmaddubsw``, which adds two K-adjacent
products in saturating int16: ``255 * 127 * 2`` overflows, so unconstrained
full-range s8 weights can give results off by many steps there (the tests model
this exactly). On such a target (``x86-avx2``, which the default ``target=host``
picks there) each column's scale keeps every K pair's same-sign sum within 128
(:mod:`ncc.passes.quant.pairs`): exact, and as fine as ±127 wherever two large
weights of one sign do not meet in a pair (on all-MiniLM-L6-v2 it keeps more
of the embedding than ±63: ``benchmarks/RESULTS.md``). ``reduce_range`` (±63) and
u8 weights (the u8 x u8 kernel, 10-30% slower) are exact on every CPU. Gather
tables never meet an integer kernel and are always full-range s8.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.ids import COMPLETED_BY_KEY
from ncc.ir.ops import ensure_opset, is_onnx_domain, onnx_opset
from ncc.ir.rewrite import MatchResult, Pattern, Rewriter, apply_patterns, constant_tensor
from ncc.passes.base import Pass, PassContext, PassResult, option, regex
from ncc.passes.quant.pairs import KPairs, fit_pairs, symmetric_int8
from ncc.passes.quant.plan import matches, refuse_quantized, unmatched_warnings
from ncc.targets import DEFAULT_TARGET, get_target

QUANT_KEY = "ncc.quant"
SKIP_KEY = "ncc.quant.skip"
MODE = "int8-dynamic"
MS_DOMAIN = "com.microsoft"

SUPPORTED_OPS = ("Conv", "Gather", "Gemm", "MatMul")
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT})


# -- weight quantization (numpy) -------------------------------------------------------------------


@dataclass(frozen=True)
class WeightQuant:
    """How weights are quantized: dtype, symmetry, 7-bit range."""

    dtype: str = "s8"  # "s8" | "u8"
    symmetric: bool = True
    reduce_range: bool = False  # 7 bits: the range of quant_params(reduce_range=True)
    #: s8 weights of a GEMM whose kernel adds products in int16 pairs: pairs along K kept safe
    #: (:mod:`ncc.passes.quant.pairs`)
    paired: bool = False

    @property
    def qrange(self) -> tuple[int, int]:
        if self.dtype == "s8":
            return (-64, 63) if self.reduce_range else (-128, 127)
        return (0, 127) if self.reduce_range else (0, 255)

    @property
    def np_dtype(self) -> type:
        return np.int8 if self.dtype == "s8" else np.uint8

    def params(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorized :func:`ncc.passes.quant.observers.quant_params`: ``(scale f32, zero_point int)``."""
        qmin, qmax = self.qrange
        rmin = np.minimum(lo.astype(np.float64), 0.0)
        rmax = np.maximum(hi.astype(np.float64), 0.0)
        tiny = float(np.finfo(np.float32).tiny)
        if self.symmetric:
            zp = 0 if self.dtype == "s8" else (qmin + qmax + 1) // 2
            absmax = np.maximum(-rmin, rmax)
            scale = np.where(absmax > 0, absmax / (qmax - zp), 1.0)
            scale = np.maximum(scale, tiny).astype(np.float32)
            return scale, np.full(scale.shape, zp, dtype=np.int64)
        span = rmax - rmin
        scale = np.where(span > 0, np.maximum(span / (qmax - qmin), tiny), 1.0).astype(np.float32)
        zp = np.where(span > 0, np.clip(np.round(qmin - rmin / scale.astype(np.float64)), qmin, qmax), qmin)
        return scale, zp.astype(np.int64)

    def quantize(
        self,
        w: np.ndarray,
        axis: int | None,
        k_axis: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(w_q, scale, zero_point)``; per-tensor (scalars) when ``axis`` is None, else 1-D along ``axis``.
        ``k_axis``: the GEMM reduction axis of ``w`` (its int16 pairs are kept safe when ``paired``).
        Symmetric s8 is :func:`ncc.passes.quant.pairs.symmetric_int8`, as insert-qdq stores weights."""
        w = np.asarray(w, dtype=np.float32)
        paired = self.paired and self.dtype == "s8" and not self.reduce_range and k_axis is not None
        if self.dtype == "s8" and self.symmetric:
            tiny = np.finfo(np.float32).tiny  # the smallest scale quant_params gives
            pairs = KPairs(k_axis) if paired else None
            q, scale = symmetric_int8(w, axis, qmax=self.qrange[1], floor=tiny, pairs=pairs)
            return q, scale, np.zeros(scale.shape, np.int8)
        if axis is None:
            lo, hi = np.asarray(w.min() if w.size else 0.0), np.asarray(w.max() if w.size else 0.0)
        else:
            reduce = tuple(i for i in range(w.ndim) if i != axis)
            lo, hi = w.min(axis=reduce), w.max(axis=reduce)
        scale, zp = self.params(lo, hi)
        qmin, qmax = self.qrange
        if self.symmetric:  # keep the grid symmetric: -127..127 around the zero point
            qmin = max(qmin, int(zp.flat[0]) - (qmax - int(zp.flat[0])))
        shape = [1] * w.ndim
        if axis is not None:
            shape[axis] = -1
        s, z = scale.reshape(shape), zp.reshape(shape)
        exact = w / s + z
        q = np.clip(np.rint(exact), qmin, qmax).astype(self.np_dtype)
        if paired:
            q = fit_pairs(q, exact, k_axis)
        return q, scale, zp.astype(self.np_dtype)


# -- the patterns ------------------------------------------------------------------------------------


@dataclass
class _State:
    """Shared by the patterns of one run: options, caches, counters."""

    pass_: QuantizeDynamic
    wq: WeightQuant
    form: str  # standard | fused | qdq (the target's, resolved)
    quantized: Counter = field(default_factory=Counter)
    bytes_before: int = 0
    bytes_after: int = 0
    skipped: dict[int, tuple[ir.Node, str]] = field(default_factory=dict)
    weights: dict[tuple, tuple[ir.Value, ir.Value, ir.Value]] = field(default_factory=dict)
    activations: dict[tuple[int, int], tuple[ir.Value, ir.Value, ir.Value]] = field(default_factory=dict)
    #: form=qdq: per (graph, value), the activation's run-time DequantizeLinear output and each weight's
    dequantized: dict[tuple[int, int], ir.Value] = field(default_factory=dict)
    uses_ms: bool = False
    initializers: list[ir.Value] = field(default_factory=list)
    counted: set[int] = field(default_factory=set)  # the constants in bytes_after
    #: Helper nodes this pass built (a Gather of scales must not be quantized in turn).
    created: set[int] = field(default_factory=set)
    mode: str = MODE  # the quantization mark its nodes get

    def skip(self, node: ir.Node, reason: str) -> MatchResult:
        node.metadata_props[SKIP_KEY] = reason
        self.skipped[id(node)] = (node, reason)
        return MatchResult.fail(reason)

    def excluded(self, node: ir.Node) -> str | None:
        return matches(node, self.pass_.exclude)  # validated as regexes when the pass was built

    def done(self, node: ir.Node, op_type: str) -> None:
        node.metadata_props[QUANT_KEY] = self.mode
        self.quantized[op_type] += 1

    def weight(
        self,
        rewriter: Rewriter,
        value: ir.Value,
        tensor: ir.TensorProtocol,
        *,
        transpose: bool,
        axis: int | None,
        scale_shape: tuple[int, ...] | None = None,
        wq: WeightQuant | None = None,
        k_axis: int | None = None,
    ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """Quantized ``(w_q, w_scale, w_zero_point)`` constants for ``value`` (cached; reads it once)."""
        wq = wq or self.wq
        key = (id(value), transpose, axis, scale_shape, wq, k_axis)
        if key in self.weights:
            return self.weights[key]
        array = tensor.numpy()  # the one read of this weight (memory-mapped when external)
        if transpose:
            array = array.T
        q, scale, zp = wq.quantize(array, axis, k_axis)
        del array
        base = value.name or "w"
        if axis is None:
            scale, zp = scale.reshape(()), zp.reshape(())
        elif scale_shape is not None:
            scale, zp = scale.reshape(scale_shape), zp.reshape(scale_shape)
        q_v = rewriter.constant(np.ascontiguousarray(q), f"{base}_quantized")
        s_v = rewriter.constant(scale, f"{base}_scale")
        z_v = rewriter.constant(zp, f"{base}_zero_point")
        self.initializers.extend((q_v, s_v, z_v))
        self.counted.update((id(q_v), id(s_v), id(z_v)))
        self.bytes_before += tensor.nbytes
        self.bytes_after += q.nbytes + scale.nbytes + zp.nbytes
        self.weights[key] = (q_v, s_v, z_v)
        return q_v, s_v, z_v

    def constant(self, rewriter: Rewriter, array: np.ndarray, name: str) -> ir.Value:
        """A constant the rewrite needs (a bias moved into a kernel, scales reshaped): not weight bytes."""
        value = rewriter.constant(array, name)
        self.initializers.append(value)
        return value

    def drop_unused(self, model: ir.Model) -> None:
        """Remove the constants this pass made that ended up unread (a symmetric table's zero points)."""
        for value in self.initializers:
            graph = value.graph
            if graph is not None and not value.uses() and graph.initializers.get(value.name) is value:
                if id(value) in self.counted:
                    self.bytes_after -= value.const_value.nbytes
                del graph.initializers[value.name]

    def dynamic_quantize(
        self, rewriter: Rewriter, a: ir.Value, name: str
    ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """``DynamicQuantizeLinear(a)``, one per activation and graph (before its first quantized reader)."""
        key = (id(rewriter.graph), id(a))
        if key in self.activations:
            return self.activations[key]
        dql = rewriter.create(
            "DynamicQuantizeLinear",
            [a],
            num_outputs=3,
            name=f"{name}/DynamicQuantizeLinear",
            output_names=[
                rewriter.fresh_name(f"{a.name or 'a'}_{s}") for s in ("quantized", "scale", "zero_point")
            ],
        )
        aq, a_s, a_zp = dql.outputs
        _typed(aq, ir.DataType.UINT8, a.shape)
        _typed(a_s, ir.DataType.FLOAT, ir.Shape([]))
        _typed(a_zp, ir.DataType.UINT8, ir.Shape([]))
        self.activations[key] = (aq, a_s, a_zp)
        return aq, a_s, a_zp

    def dequantized_activation(self, rewriter: Rewriter, a: ir.Value, name: str) -> ir.Value:
        """``DequantizeLinear(DynamicQuantizeLinear(a))``, one per activation and graph (``form=qdq``)."""
        key = (id(rewriter.graph), id(a))
        if key not in self.dequantized:
            codes = self.dynamic_quantize(rewriter, a, name)
            self.dequantized[key] = self._dequantize(rewriter, codes, {}, f"{name}/DequantizeLinear", a)
        return self.dequantized[key]

    def dequantized_weight(
        self, rewriter: Rewriter, w: tuple[ir.Value, ir.Value, ir.Value], axis: int, name: str
    ) -> ir.Value:
        """``DequantizeLinear(w_q, w_s, w_zp)`` of a quantized weight (per ``axis`` when its scale is a
        vector), one per weight and graph (``form=qdq``)."""
        key = (id(rewriter.graph), id(w[0]))
        if key not in self.dequantized:
            per_axis = w[1].shape is not None and len(w[1].shape) == 1
            attrs = {"axis": axis} if per_axis else {}
            self.dequantized[key] = self._dequantize(
                rewriter, w, attrs, f"{name}/weight/DequantizeLinear", w[0]
            )
        return self.dequantized[key]

    @staticmethod
    def _dequantize(rewriter: Rewriter, inputs, attrs: dict, name: str, like: ir.Value) -> ir.Value:
        dq = rewriter.create(
            "DequantizeLinear",
            list(inputs),
            attrs,
            name=name,
            output_names=[rewriter.fresh_name(f"{like.name or 'a'}_dequantized")],
        )
        _typed(dq.outputs[0], ir.DataType.FLOAT, like.shape)
        return dq.outputs[0]


def _typed(value: ir.Value, dtype: ir.DataType, shape: ir.Shape | None) -> None:
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape(list(shape.dims)) if shape is not None else None


def _take_over(rewriter: Rewriter, old: ir.Value, new: ir.Value, erase: list[ir.Node]) -> None:
    """``new`` replaces ``old`` everywhere and takes over its name; ``erase`` are then removed."""
    rewriter.replace_value(old, new)
    for node in reversed(erase):  # consumers first
        rewriter.erase(node)


def _bias_vector(tensor: ir.TensorProtocol, n: int, out_rank: int | None) -> np.ndarray | None:
    """``tensor`` as a 1-D bias of ``n`` values when adding it broadcasts along the last axis only."""
    shape = tuple(int(d) for d in tensor.shape)
    if not shape or shape[-1] != n or any(d != 1 for d in shape[:-1]):
        return None
    if out_rank is not None and len(shape) > out_rank:
        return None
    return tensor.numpy().reshape(n).astype(np.float32)


class _Base(Pattern):
    op: ClassVar[str]

    def __init__(self, state: _State):
        self.state = state

    def _precheck(self, node: ir.Node) -> MatchResult | None:
        """A failure when ``node`` is not a candidate (built by this pass) or is excluded by name."""
        if node.metadata_props.get(QUANT_KEY) == self.state.mode or id(node) in self.state.created:
            return MatchResult.fail("built by this pass")
        if (pattern := self.state.excluded(node)) is not None:
            return self.state.skip(node, f"excluded by {pattern!r}")
        return None

    def _emit_matmul(
        self,
        rewriter: Rewriter,
        node: ir.Node,
        a: ir.Value,
        w: tuple[ir.Value, ir.Value, ir.Value],
        bias: ir.Value | None,
        out: ir.Value,
        absorbed: list[ir.Node],
    ) -> None:
        # an unnamed node is named after its output (unique), so the nodes it becomes are too
        st, name = self.state, node.name or node.outputs[0].name or self.op
        w_q, w_s, w_zp = w
        if st.form == "qdq":  # a float MatMul between the activation's run-time Q/DQ and the weight's DQ
            base = out.name or name
            a_dq = st.dequantized_activation(rewriter, a, name)
            w_dq = st.dequantized_weight(rewriter, w, 1, name)
            mm = rewriter.create(
                "MatMul",
                [a_dq, w_dq],
                name=name,
                absorbed=absorbed,
                output_names=[rewriter.fresh_name(f"{base}_product")] if bias is not None else None,
            )
            st.done(mm, self.op)
            y = mm
            if bias is not None:
                _typed(mm.outputs[0], ir.DataType.FLOAT, out.shape)
                y = rewriter.create("Add", [mm.outputs[0], bias], name=f"{name}/bias")
                mm.metadata_props[COMPLETED_BY_KEY] = "Add"
            _take_over(rewriter, out, y.outputs[0], absorbed)
            return
        if st.form == "fused":
            st.uses_ms = True
            inputs = [a, w_q, w_s, w_zp] + ([bias] if bias is not None else [])
            new = rewriter.create(
                "DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN, name=name, absorbed=absorbed
            )
            st.done(new, self.op)
            _take_over(rewriter, out, new.outputs[0], absorbed)
            return
        aq, a_s, a_zp = st.dynamic_quantize(rewriter, a, name)
        base = out.name or name
        mmi = rewriter.create(
            "MatMulInteger",
            [aq, w_q, a_zp, w_zp],
            name=f"{name}/MatMulInteger",
            absorbed=absorbed,
            output_names=[rewriter.fresh_name(f"{base}_int32")],
        )
        _typed(mmi.outputs[0], ir.DataType.INT32, out.shape)
        st.done(mmi, self.op)
        cast = rewriter.create(
            "Cast",
            mmi.outputs,
            {"to": ir.DataType.FLOAT},
            name=f"{name}/Cast",
            output_names=[rewriter.fresh_name(f"{base}_float")],
        )
        _typed(cast.outputs[0], ir.DataType.FLOAT, out.shape)
        scale = rewriter.create(
            "Mul", [a_s, w_s], name=f"{name}/scale", output_names=[rewriter.fresh_name(f"{base}_scale")]
        )
        _typed(scale.outputs[0], ir.DataType.FLOAT, w_s.shape)
        y = rewriter.create(
            "Mul",
            [cast.outputs[0], scale.outputs[0]],
            name=f"{name}/rescale",
            output_names=[rewriter.fresh_name(f"{base}_rescaled")],
        )
        if bias is not None:
            _typed(y.outputs[0], ir.DataType.FLOAT, out.shape)
            y = rewriter.create("Add", [y.outputs[0], bias], name=f"{name}/bias")
            mmi.metadata_props[COMPLETED_BY_KEY] = "Add"  # raised to a MatMul, whose output the Add completes
        _take_over(rewriter, out, y.outputs[0], absorbed)


class MatMulPattern(_Base):
    root = "MatMul"
    op = "MatMul"

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        st = self.state
        if (failed := self._precheck(node)) is not None:
            return failed
        a, b = node.inputs
        tensor = constant_tensor(b)
        if tensor is None:
            return st.skip(node, "weight is not a constant")
        if tensor.dtype not in _FLOAT_TYPES:
            return st.skip(node, f"weight dtype {tensor.dtype} is not float32")
        if len(tensor.shape) != 2:
            return st.skip(node, f"weight has rank {len(tensor.shape)}, not 2")
        if a.shape is not None and len(a.shape) < 2:
            return st.skip(node, f"input A has rank {len(a.shape)}, not at least 2")
        n = int(tensor.shape[1])
        out, absorbed, bias_array = node.outputs[0], [node], None
        uses = out.uses()
        if not out.is_graph_output() and len(uses) == 1 and uses[0].node.op_type == "Add":
            add = uses[0].node
            if is_onnx_domain(add) and add.graph is node.graph and len(add.inputs) == 2:
                other = add.inputs[1 - uses[0].idx]
                c = constant_tensor(other) if other is not None else None
                if c is not None and c.dtype in _FLOAT_TYPES:
                    rank = len(out.shape) if out.shape is not None else None
                    bias_array = _bias_vector(c, n, rank)
                    if bias_array is not None:
                        out, absorbed = add.outputs[0], [node, add]
        w = st.weight(
            rewriter, b, tensor, transpose=False, axis=1 if st.pass_.per_channel else None, k_axis=0
        )
        bias = st.constant(rewriter, bias_array, f"{b.name or 'w'}_bias") if bias_array is not None else None
        self._emit_matmul(rewriter, node, a, w, bias, out, absorbed)
        return MatchResult.ok()


class GemmPattern(_Base):
    root = "Gemm"
    op = "Gemm"

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        st = self.state
        if (failed := self._precheck(node)) is not None:
            return failed
        attrs = node.attributes
        if attrs.get_int("transA", 0):
            return st.skip(node, "transA = 1 is not supported")
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        tensor = constant_tensor(b)
        if tensor is None:
            return st.skip(node, "weight is not a constant")
        if tensor.dtype not in _FLOAT_TYPES or len(tensor.shape) != 2:
            return st.skip(node, "weight is not a rank-2 float32 constant")
        trans_b = bool(attrs.get_int("transB", 0))
        alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
        n = int(tensor.shape[0] if trans_b else tensor.shape[1])
        bias_array = None
        if c is not None:
            ct = constant_tensor(c)
            if ct is None or ct.dtype not in _FLOAT_TYPES:
                return st.skip(node, "bias C is not a float32 constant")
            shape = tuple(int(d) for d in ct.shape)
            if len(shape) > 2 or (shape and shape[-1] not in (1, n)) or any(d != 1 for d in shape[:-1]):
                return st.skip(node, f"bias C of shape {list(shape)} is not a vector of {n} values")
            bias_array = np.broadcast_to(ct.numpy().astype(np.float32).reshape(-1), (n,)) * np.float32(beta)
            bias_array = np.ascontiguousarray(bias_array, dtype=np.float32)
        w_q, w_s, w_zp = st.weight(
            rewriter, b, tensor, transpose=trans_b, axis=1 if st.pass_.per_channel else None, k_axis=0
        )
        if alpha != 1.0:
            scaled = w_s.const_value.numpy() * np.float32(alpha)
            w_s = st.constant(rewriter, scaled.astype(np.float32), f"{w_s.name}_alpha")
        bias = st.constant(rewriter, bias_array, f"{b.name or 'w'}_bias") if bias_array is not None else None
        self._emit_matmul(rewriter, node, a, (w_q, w_s, w_zp), bias, node.outputs[0], [node])
        return MatchResult.ok()


def embedding_table(node: ir.Node) -> tuple[ir.TensorProtocol | None, str | None]:
    """The constant ``[V, H]`` float32 table the Gather ``node`` reads rows of (axis 0), which this pass
    stores int8, else ``(None, why not)``; ``(None, None)`` when its table is not a constant at all."""
    tensor = constant_tensor(node.inputs[0] if node.inputs else None)
    if tensor is None:
        return None, None
    if tensor.dtype not in _FLOAT_TYPES:
        return None, f"table dtype {tensor.dtype} is not float32"
    if len(tensor.shape) != 2:
        return None, f"table has rank {len(tensor.shape)}, not 2"
    if node.attributes.get_int("axis", 0) != 0:
        return None, "Gather axis is not 0"
    return tensor, None


class GatherPattern(_Base):
    root = "Gather"
    op = "Gather"

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        st = self.state
        if (failed := self._precheck(node)) is not None:
            return failed
        table, idx = node.inputs
        tensor, why = embedding_table(node)
        if tensor is None:  # no reason: not an embedding lookup (shape arithmetic, activations)
            return st.skip(node, why) if why else MatchResult.fail("table is not a constant")
        out, name = node.outputs[0], node.name or node.outputs[0].name or "Gather"
        per_row = st.pass_.per_channel
        # no integer kernel reads the table: always s8 (8 bits), symmetric unless asked otherwise
        table_quant = WeightQuant("s8", st.wq.symmetric, False)
        e_q, e_s, e_zp = st.weight(
            rewriter,
            table,
            tensor,
            transpose=False,
            axis=0 if per_row else None,
            scale_shape=(int(tensor.shape[0]), 1) if per_row else None,
            wq=table_quant,
        )
        base = out.name or name
        g = rewriter.create(
            "Gather",
            [e_q, idx],
            name=name,
            absorbed=[node],
            output_names=[rewriter.fresh_name(f"{base}_quantized")],
        )
        _typed(g.outputs[0], e_q.const_value.dtype, out.shape)
        st.done(g, self.op)
        if not per_row:
            y = rewriter.create(
                "DequantizeLinear", [g.outputs[0], e_s, e_zp], name=f"{name}/DequantizeLinear"
            )
            _take_over(rewriter, out, y.outputs[0], [node])
            return MatchResult.ok()
        cast = rewriter.create(
            "Cast",
            g.outputs,
            {"to": ir.DataType.FLOAT},
            name=f"{name}/Cast",
            output_names=[rewriter.fresh_name(f"{base}_float")],
        )
        _typed(cast.outputs[0], ir.DataType.FLOAT, out.shape)
        x = cast.outputs[0]
        row_shape = ir.Shape([*idx.shape.dims, 1]) if idx.shape is not None else None
        if not table_quant.symmetric:  # (q - zp) * s: gather the zero points too
            zp_f = e_zp.const_value.numpy().astype(np.float32)
            zp_v = st.constant(rewriter, zp_f, f"{table.name or 'table'}_zero_point_f")
            gz = rewriter.create(
                "Gather",
                [zp_v, idx],
                name=f"{name}/zero_point",
                output_names=[rewriter.fresh_name(f"{base}_row_zero_point")],
            )
            st.created.add(id(gz))
            _typed(gz.outputs[0], ir.DataType.FLOAT, row_shape)
            sub = rewriter.create(
                "Sub",
                [x, gz.outputs[0]],
                name=f"{name}/Sub",
                output_names=[rewriter.fresh_name(f"{base}_centered")],
            )
            _typed(sub.outputs[0], ir.DataType.FLOAT, out.shape)
            x = sub.outputs[0]
        gs = rewriter.create(
            "Gather",
            [e_s, idx],
            name=f"{name}/scale",
            output_names=[rewriter.fresh_name(f"{base}_row_scale")],
        )
        st.created.add(id(gs))
        _typed(gs.outputs[0], ir.DataType.FLOAT, row_shape)
        y = rewriter.create("Mul", [x, gs.outputs[0]], name=f"{name}/rescale")
        _take_over(rewriter, out, y.outputs[0], [node])
        return MatchResult.ok()


class ConvPattern(_Base):
    root = "Conv"
    op = "Conv"

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        st = self.state
        if (failed := self._precheck(node)) is not None:
            return failed
        x, w = node.inputs[0], node.inputs[1]
        b = node.inputs[2] if len(node.inputs) > 2 else None
        tensor = constant_tensor(w)
        if tensor is None:
            return st.skip(node, "weight is not a constant")
        if tensor.dtype not in _FLOAT_TYPES:
            return st.skip(node, f"weight dtype {tensor.dtype} is not float32")
        bias_array = None
        if b is not None:
            bt = constant_tensor(b)
            if bt is None:
                return st.skip(node, "bias is not a constant")
            bias_array = bt.numpy().astype(np.float32)
        out, name = node.outputs[0], node.name or node.outputs[0].name or "Conv"
        rank = len(tensor.shape)
        m = int(tensor.shape[0])
        per_channel = st.pass_.per_channel
        if st.form == "qdq":
            weight = st.weight(rewriter, w, tensor, transpose=False, axis=0 if per_channel else None)
            self._emit_conv_qdq(rewriter, node, weight)
            return MatchResult.ok()
        if per_channel and not st.wq.symmetric:
            return st.skip(
                node, "ConvInteger takes one weight zero point: per-channel weights must be symmetric"
            )
        w_q, w_s, w_zp = st.weight(rewriter, w, tensor, transpose=False, axis=0 if per_channel else None)
        if per_channel:  # symmetric: every zero point is the same; ConvInteger wants a scalar
            zp0 = w_zp.const_value.numpy().reshape(-1)[:1].reshape(())
            w_zp = st.constant(rewriter, zp0, f"{w.name or 'w'}_zero_point_scalar")
        aq, a_s, a_zp = st.dynamic_quantize(rewriter, x, name)
        base = out.name or name
        conv = rewriter.create(
            "ConvInteger",
            [aq, w_q, a_zp, w_zp],
            node.attributes.values(),
            name=name,
            absorbed=[node],
            output_names=[rewriter.fresh_name(f"{base}_int32")],
        )
        _typed(conv.outputs[0], ir.DataType.INT32, out.shape)
        st.done(conv, self.op)
        cast = rewriter.create(
            "Cast",
            conv.outputs,
            {"to": ir.DataType.FLOAT},
            name=f"{name}/Cast",
            output_names=[rewriter.fresh_name(f"{base}_float")],
        )
        _typed(cast.outputs[0], ir.DataType.FLOAT, out.shape)
        # per-channel scales (and the bias) broadcast over [N, M, spatial...]
        bshape = (m,) + (1,) * (rank - 2)
        if per_channel:
            ws_b = st.constant(rewriter, w_s.const_value.numpy().reshape(bshape), f"{w.name or 'w'}_scale_b")
        else:
            ws_b = w_s
        scale = rewriter.create(
            "Mul", [a_s, ws_b], name=f"{name}/scale", output_names=[rewriter.fresh_name(f"{base}_scale")]
        )
        _typed(scale.outputs[0], ir.DataType.FLOAT, ws_b.shape)
        y = rewriter.create(
            "Mul",
            [cast.outputs[0], scale.outputs[0]],
            name=f"{name}/rescale",
            output_names=[rewriter.fresh_name(f"{base}_rescaled")],
        )
        if bias_array is not None:
            _typed(y.outputs[0], ir.DataType.FLOAT, out.shape)
            bv = st.constant(rewriter, bias_array.reshape(bshape), f"{b.name or 'b'}_b")
            y = rewriter.create("Add", [y.outputs[0], bv], name=f"{name}/bias")
        _take_over(rewriter, out, y.outputs[0], [node])
        return MatchResult.ok()

    def _emit_conv_qdq(self, rewriter: Rewriter, node: ir.Node, w) -> None:
        """``form=qdq``: the Conv reads the activation's run-time Q/DQ and its weight's DequantizeLinear."""
        st, name = self.state, node.name or node.outputs[0].name or "Conv"
        a_dq = st.dequantized_activation(rewriter, node.inputs[0], name)
        w_dq = st.dequantized_weight(rewriter, w, 0, name)
        conv = rewriter.create(
            "Conv",
            [a_dq, w_dq, *node.inputs[2:]],
            node.attributes.values(),
            name=name,
            absorbed=[node],
        )
        st.done(conv, self.op)
        _take_over(rewriter, node.outputs[0], conv.outputs[0], [node])


_PATTERNS = {"MatMul": MatMulPattern, "Gemm": GemmPattern, "Gather": GatherPattern, "Conv": ConvPattern}


# -- the pass ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizeDynamic(Pass):
    """Dynamic INT8 (IntegerOps): weights quantized offline, activations at run time."""

    name: ClassVar[str] = "quantize-dynamic"

    op_types: tuple[str, ...] = option(
        (), "op types to quantize: MatMul, Gemm, Gather, Conv (empty: the target's)"
    )
    per_channel: bool = option(True, "one weight scale per output channel (per row for Gather tables)")
    weight_symmetric: bool = option(True, "symmetric weights (zero point 0)")
    weight_dtype: Literal["s8", "u8"] = option("s8", "weight integer type: s8, or u8 (zero point 128)")
    reduce_range: bool = option(False, "7-bit weights (s8 within ±63, u8 within 64±63) on any target")
    exclude: tuple[str, ...] = option(
        (), "node names or regexes (searched in the name) to keep in float", check=regex
    )
    form: Literal["target", "standard", "fused", "qdq"] = option(
        "target",
        "standard: DynamicQuantizeLinear + MatMulInteger; fused: com.microsoft DynamicQuantizeMatMul; "
        "qdq: run-time Q/DQ around a float MatMul; target: the target's form",
    )
    gather: bool = option(True, "quantize Gather on constant tables (embeddings) when op-types names Gather")
    target: str = option(DEFAULT_TARGET, "target profile (host: this CPU's)")

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [op for op in self.op_types if op not in SUPPORTED_OPS]
        if unknown:
            raise ValueError(
                f"op type {unknown[0]!r} cannot be quantized dynamically; supported: {', '.join(SUPPORTED_OPS)}"
            )
        try:
            get_target(self.target)
        except NccError as err:
            raise ValueError(str(err).rstrip(".")) from None

    @property
    def active_ops(self) -> tuple[str, ...]:
        ops = self.op_types or tuple(op for op in SUPPORTED_OPS if op in get_target(self.target).dynamic_ops)
        return tuple(op for op in ops if op != "Gather" or self.gather)

    @property
    def resolved_form(self) -> str:
        return get_target(self.target).dynamic_form if self.form == "target" else self.form

    @property
    def paired_weights(self) -> bool:
        """s8 MatMul/Gemm weights with their int16 pairs kept safe: the target's kernels add u8 x s8
        products in int16 pairs."""
        return self.weight_dtype == "s8" and not self.reduce_range and get_target(self.target).pairwise_int16

    def requires(self, model: ir.Model) -> None:
        from ncc.ir import ids

        refuse_quantized(model)
        found = any(is_onnx_domain(node) and node.op_type in self.active_ops for node in ids.all_nodes(model))
        if not found:
            raise NccError(
                f"nothing to quantize: the model has no {', '.join(self.active_ops) or 'op of the requested types'} "
                "node (looked for op types " + ", ".join(self.active_ops) + ")."
            )
        opset = onnx_opset(model, default=0)
        if opset < 13:
            raise NccError(f"quantize-dynamic needs ONNX opset 13 or newer; the model imports opset {opset}.")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        self.requires(model)
        return self.rewrite(model)

    def rewrite(self, model: ir.Model, mode: str = MODE) -> PassResult:
        """The rewrite itself, marking what it quantizes ``mode``; no candidate quantized is an error."""
        warnings = unmatched_warnings(model, exclude=self.exclude)
        state = _State(
            self,
            WeightQuant(self.weight_dtype, self.weight_symmetric, self.reduce_range, self.paired_weights),
            self.resolved_form,
            mode=mode,
        )
        patterns = [_PATTERNS[op](state) for op in SUPPORTED_OPS if op in self.active_ops]
        pstats = apply_patterns(model, patterns)
        state.drop_unused(model)
        if state.uses_ms:
            ensure_opset(model, MS_DOMAIN)
        # a candidate that was skipped in an early sweep may have been quantized later
        skipped = [
            (n, r)
            for n, r in state.skipped.values()
            if n.graph is not None and QUANT_KEY not in n.metadata_props
        ]
        total = sum(state.quantized.values())
        if total == 0:
            why = "; ".join(sorted({f"{n.op_type} {n.name!r}: {r}" for n, r in skipped})[:5])
            raise NccError(
                f"nothing to quantize: no {', '.join(self.active_ops)} node could be quantized"
                + (f" ({why})." if why else ".")
            )
        stats = {f"{op} quantized": state.quantized.get(op, 0) for op in self.active_ops}
        stats["kept float"] = len(skipped)
        stats["weight bytes before"] = state.bytes_before
        stats["weight bytes after"] = state.bytes_after
        notes = warnings + [f"kept {n.op_type} {n.name!r} in float: {r}" for n, r in skipped]
        if not pstats.converged:
            notes.append(f"pattern driver stopped after {pstats.sweeps} sweeps without converging")
        return PassResult(modified=True, stats=stats, notes=notes)
