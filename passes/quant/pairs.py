"""Full-range int8 weights that stay exact where a CPU adds u8 x s8 products in int16 pairs.

On x86 without VNNI, onnxruntime's u8 x s8 GEMM (MLAS, AVX2 ``vpmaddubsw``)
multiplies a u8 activation by an s8 weight and adds each product to its
neighbour's in *saturating* int16, pairing the reduction dimension K as
``(0, 1), (2, 3), ...``. With activations up to 255 a pair overflows when its
weights' same-sign parts add up past 128 (``255 * 129 > 32767``); below that
every product pair fits. Established with onnxruntime 1.32 on an AVX2 CPU
(``tests/quant/test_pairs.py`` checks it on every machine):

- ``MatMulInteger`` and ``MatMulIntegerToFloat``: K pairs of a ``[K, N]``
  weight, for any K, M and N (an odd K's last element is paired with padding);
- ``QLinearConv``: K is a filter's ``(kh, kw, c)`` in that order, channel
  fastest, flattened across kernel positions (with 3 input channels, channel 2
  at one position pairs with channel 0 at the next);
- depthwise ``QLinearConv`` (one input and one output channel per group) and
  ``ConvInteger`` use other kernels and never saturate; a depthwise conv with a
  channel multiplier goes through the GEMM and pairs its kernel positions.

So instead of limiting every weight to ±63 (6 magnitude bits), each
channel's scale is the smallest that keeps both every weight within ±127 and
every pair's same-sign sum within :data:`PAIR_LIMIT` (``magnitude`` of
:class:`KPairs` and :class:`ConvPairs`): between ``absmax / 127`` and
``absmax / 64``, never coarser than ±63 and as fine as ±127 where no two large
weights of one sign meet in a pair. Rounding can still push a pair one step
past the limit; :func:`fit_pairs` moves such pairs to the nearest point on it.

:func:`symmetric_int8` is how both insert-qdq and quantize-dynamic store a
weight as symmetric int8 (per channel or per tensor), pair-safe when given the
weight's pairs::

    s[c] = max(max_{w in channel c} m(w) / qmax, floor)     q = clip(round(w / s[c]), -qmax, qmax)

with ``m(w) = |w|``, or the pair magnitude above; ``qmax`` 127 (63 for 7 bits).
Weight-only quantization (:mod:`ncc.passes.woq.kernels`) is another algorithm,
not this one: its symmetric grid puts the largest magnitude on ``-2^(b-1)`` and
rounds ties away from zero, as onnxruntime's MatMulNBits quantizer does.

(Moving every offending pair of a ±127 grid instead, with the scale left at
``absmax / 127``, made all-MiniLM-L6-v2's weight error 6x *larger* than ±63:
1.6% of its pairs are two large weights of one sign, and each move is large.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

PAIR_LIMIT = 128
"""Largest sum of same-sign magnitudes two paired s8 weights may have: ``255 * 128 = 32640 <= 32767``."""


def fit_pairs(q: np.ndarray, exact: np.ndarray, axis: int = 0) -> np.ndarray:
    """``q`` (integer weights on a grid within ±127) with every pair ``(2i, 2i + 1)`` along ``axis`` made safe.

    ``exact`` is the unrounded grid position of each weight (``w / scale + zero_point``). A pair whose
    positive parts add up past :data:`PAIR_LIMIT` (or negative parts below ``-PAIR_LIMIT``) moves to the
    nearest point on that limit; every other weight is returned unchanged. The result has ``q``'s dtype.
    """
    out = np.moveaxis(np.asarray(q).astype(np.int32), axis, 0).copy()
    target = np.moveaxis(np.asarray(exact, dtype=np.float64), axis, 0)
    k = out.shape[0] - out.shape[0] % 2
    a, b = out[0:k:2], out[1:k:2]  # views: assigning into them changes ``out``
    ta, tb = target[0:k:2], target[1:k:2]
    for sign in (1, -1):
        sa, sb = a * sign, b * sign
        over = (sa > 0) & (sb > 0) & (sa + sb > PAIR_LIMIT)
        if not over.any():
            continue
        # nearest point of sa' + sb' = PAIR_LIMIT to (sign*ta, sign*tb), both magnitudes within [1, 127]
        na = np.clip(np.rint((sign * ta - sign * tb + PAIR_LIMIT) / 2), PAIR_LIMIT - 127, 127).astype(
            np.int32
        )
        a[over] = (sign * na)[over]
        b[over] = (sign * (PAIR_LIMIT - na))[over]
    return np.moveaxis(out, 0, axis).astype(np.asarray(q).dtype)


def symmetric_int8(
    w: np.ndarray,
    axis: int | None,
    *,
    qmax: int = 127,
    floor: np.ndarray | float = 0.0,
    pairs: KPairs | ConvPairs | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes of ``w`` within ``±qmax`` and their float32 scales: one per slice along ``axis``
    (per channel), or one for all of ``w`` when ``axis`` is None. No scale is below ``floor`` (a scalar or
    one per channel); an all-zero channel gets scale 1. ``pairs``: where the kernel pairs ``w``'s products
    in int16 (a full-range grid is then kept pair-safe)."""
    array = np.asarray(w, dtype=np.float32)
    magnitude = pairs.magnitude(array) if pairs is not None else np.abs(array)
    if axis is None:
        absmax = np.array(magnitude.max(initial=0.0), np.float32)
    else:
        reduce = tuple(d for d in range(array.ndim) if d != axis)
        absmax = magnitude.max(axis=reduce, initial=0.0).astype(np.float32)
    scales = np.where(absmax > 0, absmax / np.float32(qmax), np.float32(1.0)).astype(np.float32)
    scales = np.maximum(scales, np.asarray(floor, np.float32)).astype(np.float32)
    shape = [1] * array.ndim
    if axis is not None:
        shape[axis] = -1
    exact = array / scales.reshape(shape)
    q = np.clip(np.rint(exact), -qmax, qmax).astype(np.int8)
    if pairs is not None:
        q = pairs.fit(q, exact)
    return q, scales


@dataclass(frozen=True)
class KPairs:
    """The int16 pairs of a GEMM weight: ``(2i, 2i + 1)`` along its reduction axis ``k_axis``."""

    k_axis: int

    def magnitude(self, w: np.ndarray) -> np.ndarray:
        """Each weight's ``|w|``, or its pair's same-sign magnitude sum times ``127 / PAIR_LIMIT`` when that
        is larger: a scale covering it on a ±127 grid keeps every pair within the limit (up to rounding)."""
        return k_pair_magnitude(w, self.k_axis)

    def fit(self, q: np.ndarray, exact: np.ndarray) -> np.ndarray:
        """``q`` with its overflowing pairs moved onto the limit (:func:`fit_pairs`)."""
        return fit_pairs(q, exact, self.k_axis)


@dataclass(frozen=True)
class ConvPairs:
    """The int16 pairs of a Conv weight ``[M, C/group, kh, ...]``: K runs over ``(kh, ..., c)``, channel
    fastest; depthwise filters (one input and one output channel per group) are never paired."""

    group: int = 1

    def magnitude(self, w: np.ndarray) -> np.ndarray:
        """As :meth:`KPairs.magnitude`, in the K order of the GEMM the Conv runs on."""
        w = np.asarray(w)
        w = w if w.dtype in (np.float32, np.float64) else w.astype(np.float64)
        if w.ndim < 3 or _depthwise(w.shape, self.group):
            return np.abs(w)
        k_major, restore = _conv_k_major(w)
        return restore(pair_sums(k_major))

    def fit(self, q: np.ndarray, exact: np.ndarray) -> np.ndarray:
        """:func:`fit_pairs` in the Conv's K order; depthwise filters are returned unchanged: their kernel
        accumulates in int32."""
        q = np.asarray(q)
        if q.ndim < 3 or _depthwise(q.shape, self.group):
            return q
        k_major, restore = _conv_k_major(q)
        return restore(fit_pairs(k_major, _conv_k_major(exact)[0], 0))


PAIRED_OPS = frozenset({"MatMul", "Gemm", "Conv"})
"""Ops whose weights' K order in onnxruntime's GEMM is known (measured); others keep weights within ±63."""


def node_pairs(
    op_type: str, shape: tuple[int, ...], attributes, kernels: str = "onnxruntime"
) -> KPairs | ConvPairs | None:
    """Where the kernel of a ``op_type`` node (with ``attributes``) pairs the products of its weight of
    ``shape``, for onnxruntime's kernels or oneDNN's (``kernels``); None where that is not known, or where
    the weight must stay exact under both (it is read by onnxruntime too, when ncc measures the model): a
    weight of a ±63 grid is safe under any pairing.

    oneDNN (measured in Inductor and TensorFlow on an AVX2 CPU) pairs a linear's K as onnxruntime does, and
    a convolution's input channels at each kernel tap, padding an odd count; onnxruntime flattens the taps.
    With an even channel count per group the two orders are the same pairs; with an odd one they differ."""
    if op_type not in PAIRED_OPS:
        return None
    if op_type != "Conv":
        return KPairs(_k_axis(op_type, len(shape), attributes))
    group = attributes.get_int("group", 1)
    if kernels == "onednn" and len(shape) >= 3 and shape[1] % 2 and not _depthwise(shape, group):
        return None
    return ConvPairs(group)


def k_pair_magnitude(w: np.ndarray, k_axis: int) -> np.ndarray:
    """:meth:`KPairs.magnitude` of a GEMM weight (float) whose reduction dimension is ``k_axis``."""
    return np.moveaxis(pair_sums(np.moveaxis(w, k_axis, 0)), 0, k_axis)


def pair_sums(x: np.ndarray) -> np.ndarray:
    """Along axis 0: each element's ``|x|``, or its pair's larger same-sign magnitude sum times 127/128
    when that is larger (in ``x``'s float precision)."""
    out = np.abs(x)
    k = x.shape[0] - x.shape[0] % 2
    a, b = x[0:k:2], x[1:k:2]
    same_sign = a * b > 0  # otherwise the larger magnitude alone, already in ``out``
    both = np.where(same_sign, np.abs(a + b), 0) * x.dtype.type(127 / PAIR_LIMIT)
    np.maximum(out[0:k:2], both, out=out[0:k:2])
    np.maximum(out[1:k:2], both, out=out[1:k:2])
    return out


def _k_axis(op_type: str, ndim: int, attributes) -> int:
    if op_type == "MatMul":
        return ndim - 2 if ndim >= 2 else 0
    if op_type == "Gemm":
        return 1 if attributes.get_int("transB", 0) else 0
    raise ValueError(f"the K order of {op_type}'s weights is not known")


def _conv_k_major(w: np.ndarray):
    """``[M, C, *k] -> [*k, C, M] -> [K, M]`` (row r is the K index the GEMM pairs), and the inverse."""
    order = (*range(2, w.ndim), 1, 0)
    k_major = np.transpose(w, order)
    shape = k_major.shape

    def restore(matrix: np.ndarray) -> np.ndarray:
        return np.transpose(matrix.reshape(shape), np.argsort(order))

    return k_major.reshape(-1, w.shape[0]), restore


def _depthwise(shape: tuple[int, ...], group: int) -> bool:
    """onnxruntime's depthwise kernel (int32 sums): one input and one output channel per group."""
    return group > 1 and shape[1] == 1 and shape[0] == group


def overflowing_layer(model: ir.Model) -> ir.Node | None:
    """The first layer of ``model`` whose int8 weights onnxruntime's int16 pairs would overflow, or None.

    A layer is a Conv, MatMul or Gemm reading a DequantizeLinear activation and a DequantizeLinear of an
    int8 constant: onnxruntime fuses them into an integer kernel, which Q/DQ left unfused avoids (explicit
    integer ops, MatMulInteger and the QLinear* ops, run as they are). With u8 activations up to 255 a pair
    overflows where its two weights' sum passes ±:data:`PAIR_LIMIT` (opposite signs never do); where the
    op's pairing is not known, any weight beyond ±63 counts.
    """
    for node in model.graph:
        if node.op_type not in (*PAIRED_OPS, "ConvTranspose") or len(node.inputs) < 2:
            continue
        if not all(_dequantized(v) for v in node.inputs[:2]):
            continue
        q = _int8_constant(node.inputs[1].producer().inputs[0])
        if q is not None and _overflows(node.op_type, q, node.attributes):
            return node
    return None


def _dequantized(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear"


def _int8_constant(value: ir.Value | None) -> np.ndarray | None:
    tensor = value.const_value if value is not None else None
    if tensor is None or tensor.dtype != ir.DataType.INT8:
        return None
    return tensor.numpy()


def _overflows(op_type: str, q: np.ndarray, attributes) -> bool:
    pairs = node_pairs(op_type, q.shape, attributes) if q.ndim >= 2 else None
    if pairs is None:
        return bool(np.abs(q.astype(np.int16)).max(initial=0) > 63)
    if isinstance(pairs, ConvPairs):
        if q.ndim < 3 or _depthwise(q.shape, pairs.group):
            return False
        k_major = _conv_k_major(q)[0]
    else:
        k_major = np.moveaxis(q, pairs.k_axis, 0)
    k = k_major.shape[0] - k_major.shape[0] % 2
    sums = k_major[0:k:2].astype(np.int16) + k_major[1:k:2]
    return bool(np.abs(sums).max(initial=0) > PAIR_LIMIT)
