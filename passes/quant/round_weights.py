"""The ``round-weights`` pass: round each int8 weight up or down by what its layer's inputs make least wrong.

``insert-qdq`` rounds every weight to its nearest grid point, which makes each
weight's own error smallest, not its layer's output error: weights that read
correlated inputs (neighbouring pixels, co-active channels) can cancel each
other's error when one rounds up and another down. For a quantized Conv or
Gemm with int8 weights ``q = round(w / s)`` (per output channel ``s``), its
output error from rounding is ``s * d . x`` with ``d = q - w / s``; this pass
measures, on calibration samples, the covariance ``C`` of what each output
channel's weights multiply (the patches a Conv filter reads, the rows a Gemm
reads — the *dequantized* inputs, as the quantized model computes them) and
minimizes ``d' C d`` per output channel over codes one grid step apart
(``floor`` or ``ceil`` of ``w / s``; scales unchanged), by coordinate descent
from round-to-nearest: one weight at a time flips to its other grid
neighbour while that lowers the error (AdaRound's layer-wise objective,
Nagel et al. 2020, solved over the two grid points directly instead of by
gradient descent on a relaxation). The covariance rather than the second
moment, because the mean part of the error (``d . mean(x)``) is what
``correct-bias``, run next, removes.

``C`` is shrunk toward its diagonal (``damping``): estimated from a few
samples it has directions the samples never visited, and minimizing along
those fits the calibration set rather than the layer. At full damping the
objective is ``sum(C_kk d_k^2)``, which round-to-nearest already minimizes.

On targets whose kernels add u8 x s8 products in int16 pairs (``x86-avx2``,
:mod:`ncc.passes.quant.pairs`) a weight flips only if its pair stays within
:data:`~ncc.passes.quant.pairs.PAIR_LIMIT`, so the weights stay exact there;
depthwise filters are never paired.

Layers are independent: each one's statistics and rounding is a job, and half of the jobs run in a
forked worker (:func:`ncc.forked.fork_map`), the other core being idle while one holds the GIL.

What it buys on EfficientNet-Lite0, and how ``damping`` and the number of sampled positions were
chosen, is in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.forked import fork_map
from ncc.ir.ops import is_onnx_domain
from ncc.ir.tensors import from_array
from ncc.passes.base import Pass, PassContext, PassResult, option
from ncc.passes.quant.insert_qdq import FLOAT_WEIGHT
from ncc.passes.quant.pairs import PAIR_LIMIT
from ncc.targets import DEFAULT_TARGET, get_target

QMAX = 127
FORK_WEIGHTS = 1 << 20
"""Weights from which the layers are split with a forked worker: the fork and its one-BLAS-thread setup
cost about 20 ms, what the whole pass takes on a model with fewer (the MNIST CNN's 0.4M)."""


@dataclass(frozen=True)
class RoundWeights(Pass):
    """Round quantized Conv/Gemm weights up or down to minimize each layer's output error on calibration data."""

    name: ClassVar[str] = "round-weights"
    samples: int = option(16, "calibration samples the input statistics are measured on")
    damping: float = option(0.1, "shrink the input covariance this far toward its diagonal (0..1)")
    sweeps: int = option(2, "most coordinate-descent sweeps over a layer's weights (the first gains most)")
    target: str = option(DEFAULT_TARGET, "target profile (int16-pair limits on targets without VNNI)")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from ncc.passes.quant import fallback

        data = ctx.data.get("calibration_data")
        if data is None:
            raise NccError("pass 'round-weights' needs calibration data (--calib).")
        quantized = [
            n
            for n in model.graph
            if n.metadata_props.get("ncc.quant") == "int8" and n.op_type in ("Conv", "Gemm")
        ]
        if quantized and not any(FLOAT_WEIGHT in n.metadata_props for n in quantized):
            raise NccError(
                "pass 'round-weights' needs the float weights insert-qdq keeps beside the quantized ones; "
                "run it after insert-qdq, before correct-bias and dce."
            )
        paired = get_target(self.target).pairwise_int16
        floats = model.graph.initializers
        layers = [layer for node in model.graph if (layer := _layer(node, floats, paired)) is not None]
        if not layers:
            return PassResult(modified=False)
        sources = {layer.node.inputs[0].name: _Source.of(layer.node.inputs[0]) for layer in layers}
        names = list(dict.fromkeys(source.name for source in sources.values()))
        session = fallback.measuring_session(model, names)
        # batches of up to 8 samples, all kept: mostly 8-bit codes (see _Source), a quarter of the float inputs
        batches = [session.run(feed, names) for feed in fallback.samples(data, self.samples)]
        del session

        def round_layer(index: int) -> tuple[np.ndarray, float, float]:
            layer = layers[index]
            moments = _Moments(*layer.moment_shape)
            for results in batches:
                moments.fold(layer, sources[layer.node.inputs[0].name], results)
            return _round_layer(layer, moments, self.damping, self.sweeps)

        # each layer's statistics and rounding are its own: half of them in a forked worker, unless the
        # model is too small to pay for the fork
        big = sum(layer.codes.size for layer in layers) >= FORK_WEIGHTS
        done = fork_map(round_layer, len(layers), fork=big)
        rounded = done.results
        changed = total = 0
        before = after = 0.0
        for layer, (q, e0, e1) in zip(layers, rounded):
            changed += int(np.count_nonzero(q != layer.codes))
            total += q.size
            before, after = before + e0, after + e1
            layer.value.const_value = from_array(np.ascontiguousarray(layer.restore(q.astype(np.int8))))
        notes = [
            f"round-weights: {changed} of {total} weights of {len(layers)} layers rounded the other way: "
            f"rounding error variance on calibration data {after / before if before else 1.0:.2f}x nearest's"
        ]
        notes += [f"round-weights: {done.note}"] if done.note else []
        return PassResult(modified=changed > 0, stats={"weights re-rounded": changed}, notes=notes)


@dataclass(frozen=True)
class _Source:
    """Where a layer's input is read from the session: the codes its per-tensor DequantizeLinear reads,
    dequantized here as DequantizeLinear does (``float(q - zp) * scale``), or else the input itself.

    Fetching the dequantized value would give its DequantizeLinear a second reader, and onnxruntime
    would then run the layer (and the one writing the codes) in float instead of as one integer kernel.
    Only the values a layer's statistics sample are dequantized (:meth:`dequantize`): a Conv samples at
    most :data:`POSITIONS` output positions of a feature map, and dequantizing whole activations cost
    more than the statistics."""

    name: str
    scale: np.float32 | None = None
    zero_point: int = 0

    @staticmethod
    def of(value: ir.Value) -> _Source:
        dq = value.producer()
        if dq is None or dq.op_type != "DequantizeLinear" or not is_onnx_domain(dq) or not dq.inputs[0].name:
            return _Source(value.name)
        scale = dq.inputs[1].const_value if len(dq.inputs) > 1 and dq.inputs[1] is not None else None
        zero = dq.inputs[2] if len(dq.inputs) > 2 else None
        if scale is None or scale.size != 1 or (zero is not None and zero.const_value is None):
            return _Source(value.name)
        zp = int(zero.const_value.numpy().reshape(-1)[0]) if zero is not None else 0
        return _Source(dq.inputs[0].name, np.float32(scale.numpy().reshape(-1)[0]), zp)

    @property
    def fill(self) -> int:
        """What a window reading padding holds before :meth:`dequantize`: the code of 0.0, or 0.0 itself."""
        return self.zero_point if self.scale is not None else 0

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        """``values`` (float32, copied out of what the session returned) dequantized in place: the same
        float32 arithmetic as ``float32(int32(q) - zp) * scale`` on the whole tensor."""
        if self.scale is not None:
            values -= np.float32(self.zero_point)
            values *= self.scale
        return values


class _Moments:
    """Running sums of the patch vectors and of their outer products, per channel group (float64)."""

    def __init__(self, groups: int, k: int) -> None:
        self.count = 0
        self.sum = np.zeros((groups, k))
        self.outer = np.zeros((groups, k, k))
        #: the batches' patches (``[P, K]`` each) while a shared group has at most K / 8: see ``patches``;
        #: their outer products are folded in only if more come (a Gemm after a global pool never needs them)
        self.kept: list[np.ndarray] | None = [] if groups == 1 else None

    def fold(self, layer: _Layer, source: _Source, results: dict[str, np.ndarray]) -> None:
        """Fold in what ``layer`` multiplies in the batch ``results`` (its input, read from ``source``)."""
        x = results[source.name]
        if layer.depthwise:
            for start, columns in layer.depthwise_patches(x, source.fill):
                self.add(source.dequantize(columns), start)
        else:
            self.add(source.dequantize(layer.patches(x, source.fill)))

    def add(self, columns: np.ndarray, start: int = 0) -> None:
        """Fold in ``columns`` ``[G, K, P]`` (P patches of groups ``start .. start + G``); a batch counts once,
        at the chunk starting at group 0."""
        if start == 0:
            self.count += columns.shape[2]
        end = start + columns.shape[0]
        self.sum[start:end] += columns.sum(axis=2)
        if self.kept is not None:
            self.kept.append(columns[0].T)
            if self.count <= self.sum.shape[1] // 8:
                return
            self.outer, self.kept = self._outer(), None
            return
        self.outer[start:end] += np.matmul(columns, columns.transpose(0, 2, 1))

    def patches(self) -> np.ndarray | None:
        """All patches ``[n, K]`` (float64) when there are at most K / 8 of them (a Gemm after a global pool
        sees one per sample): the covariance then has rank below n, and rounding works with the patches
        (:func:`_round_low_rank`, O(n) per weight visited) instead of a K x K matrix. Else None."""
        if not self.kept:
            return None
        return np.concatenate(self.kept).astype(np.float64)

    def _outer(self) -> np.ndarray:
        """The summed outer products, with the kept batches' folded in batch by batch (as if they had been
        folded as they came)."""
        outer = self.outer
        for patches in self.kept or ():
            outer = outer + np.matmul(patches.T[None], patches[None])
        return outer

    def covariance(self, damping: float) -> np.ndarray:  # [G, K, K]
        n = max(self.count, 1)
        mean = self.sum / n
        cov = self._outer() / n - mean[:, :, None] * mean[:, None, :]
        k = np.arange(cov.shape[1])
        diag = cov[:, k, k].copy()
        cov *= 1.0 - damping  # off the diagonal; the diagonal (each weight's own error) stays
        cov[:, k, k] = diag
        return cov


@dataclass
class _Layer:
    node: ir.Node
    value: ir.Value  # the int8 weight initializer
    codes: np.ndarray  # [C, K] int64: one row per output channel
    exact: np.ndarray  # [C, K] unrounded grid positions (w / scale)
    restore: object  # [C, K] codes -> the initializer's layout
    depthwise: bool  # each output channel reads its own input channel (else all read one input)
    partner: np.ndarray | None  # [K]: the column each column is int16-paired with (-1: none); None: unpaired

    @property
    def moment_shape(self) -> tuple[int, int]:
        """(groups, K) of the layer's moments: one group per channel for a depthwise Conv, else one."""
        return (self.codes.shape[0] if self.depthwise else 1), self.codes.shape[1]

    def depthwise_patches(self, x: np.ndarray, fill: float = 0) -> Iterator[tuple[int, np.ndarray]]:
        """For a depthwise Conv, in chunks of channels (a few megabytes at a time): ``(first channel,
        [c, K, N * P])``, what each channel's K weights multiply (see :meth:`windows`)."""
        yield from self.windows(x, chunked=True, fill=fill)

    def patches(self, x: np.ndarray, fill: float = 0) -> np.ndarray:
        """What the rows of the weight multiply, one column per output position of the samples ``x``:
        ``[1, K, P]`` (every output channel reads the same input; depthwise: :meth:`depthwise_patches`)."""
        if self.node.op_type == "Gemm":
            x = x.astype(np.float32, copy=False)
            return (x if self.node.attributes.get_int("transA", 0) else x.T)[None]
        ((_, columns),) = self.windows(x, chunked=False, fill=fill)
        return columns.reshape(1, -1, columns.shape[2])  # K in the weight's (c, *kernel) order

    def windows(self, x: np.ndarray, *, chunked: bool, fill: float = 0) -> Iterator[tuple[int, np.ndarray]]:
        """A Conv's input windows at P output positions of each sample ``x`` (a regular grid of at most
        :data:`POSITIONS`), as float32, ``fill`` where a window reads padding: ``(first channel, [c, K, N * P])``
        per chunk of input channels (``chunked``, at most :data:`CHUNK_VALUES` values), else one chunk of all.

        Each chunk is copied out of the input once per kernel position, from a strided view of the positions
        that read inside it (the others keep ``fill``): padding the input, or copying a whole layer's windows
        at once (tens of megabytes), spent more time in fresh memory than in the copy."""
        node = self.node
        kernel = [int(d) for d in self.value.const_value.shape[2:]]
        rank = len(kernel)
        pads = list(node.attributes.get_ints("pads", [0] * (2 * rank)))
        strides = list(node.attributes.get_ints("strides", [1] * rank))
        dilations = list(node.attributes.get_ints("dilations", [1] * rank))
        n, channels, size = x.shape[0], x.shape[1], x.shape[2:]
        out = [
            (size[a] + pads[a] + pads[a + rank] - (kernel[a] - 1) * dilations[a] - 1) // strides[a] + 1
            for a in range(rank)
        ]
        step = _position_step(out)
        sampled = [-(-o // step) for o in out]
        k, p = int(np.prod(kernel)), int(np.prod(sampled))
        chunk = max(1, CHUNK_VALUES // (k * n * p)) if chunked else channels
        for start in range(0, channels, chunk):
            part = x[:, start : start + chunk].swapaxes(0, 1)  # [c, N, *size]
            c = part.shape[0]
            columns = np.full((c, k, n, *sampled), fill, np.float32)
            for index, offsets in enumerate(itertools.product(*(range(kk) for kk in kernel))):
                target, source = [], []
                for a, o in enumerate(offsets):
                    first, stride = o * dilations[a] - pads[a], strides[a] * step  # input coordinate of i
                    lo = max(0, -(first // stride))  # first i with first + stride * i >= 0
                    hi = min(sampled[a], (size[a] - 1 - first) // stride + 1)
                    target.append(slice(lo, max(lo, hi)))
                    source.append(slice(first + stride * lo, first + stride * (hi - 1) + 1, stride))
                if all(t.stop > t.start for t in target):  # else the window reads only padding
                    columns[(slice(None), index, slice(None), *target)] = part[
                        (slice(None), slice(None), *source)
                    ]
            yield start, columns.reshape(c, k, n * p)


CHUNK_VALUES = 1 << 21
"""Window values a depthwise layer's chunk of channels holds at most (8 MB of float32)."""

POSITIONS = 128
"""Output positions per sample the statistics of a Conv sample at most, on a regular grid: a 112x112
feature map has 12,544, far more than a K x K covariance needs (fewer, farther apart, measured better
than more; see ``benchmarks/RESULTS.md``)."""


def _round_layer(
    layer: _Layer, moments: _Moments, damping: float, sweeps: int
) -> tuple[np.ndarray, float, float]:
    patches = moments.patches()
    if patches is not None:
        return _round_low_rank(layer.exact, layer.codes, patches, damping, sweeps, layer.partner)
    return _round(layer.exact, layer.codes, moments.covariance(damping), sweeps, layer.partner)


def _position_step(spatial) -> int:
    """The grid step (the same along every spatial axis) that keeps at most ``POSITIONS`` positions."""
    step = 1
    while int(np.prod([-(-n // step) for n in spatial])) > POSITIONS:
        step += 1
    return step


def _layer(node: ir.Node, floats, paired: bool) -> _Layer | None:
    """The int8 weight of the quantized Conv/Gemm ``node`` as a :class:`_Layer` (its float weight the
    initializer insert-qdq linked it to, among ``floats``), or None where this pass does not apply."""
    if node.op_type not in ("Conv", "Gemm") or not is_onnx_domain(node):
        return None
    if node.metadata_props.get("ncc.quant") != "int8" or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return None
    dq = node.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.outputs[0].uses()) != 1:
        return None
    wq, scale = dq.inputs[0], dq.inputs[1]
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    if wq.const_value is None or scale is None or scale.const_value is None or len(wq.uses()) != 1:
        return None
    if zero is not None and (zero.const_value is None or np.any(zero.const_value.numpy() != 0)):
        return None
    codes = wq.const_value.numpy()
    weight = floats.get(node.metadata_props.get(FLOAT_WEIGHT, ""))
    if codes.dtype != np.int8 or weight is None or weight.const_value is None:
        return None
    w = weight.const_value.numpy().astype(np.float64)
    if w.shape != codes.shape:
        return None
    if node.op_type == "Conv":
        group = node.attributes.get_int("group", 1)
        depthwise = group > 1 and codes.shape[1] == 1 and codes.shape[0] == group
        if codes.ndim < 3 or not (depthwise or group == 1):
            return None
        shape = codes.shape
        rows, w_rows = codes.reshape(shape[0], -1), w.reshape(shape[0], -1)

        def restore(q, shape=shape):
            return q.reshape(shape)

        partner = _conv_partner(shape) if paired and not depthwise else None
    else:
        if codes.ndim != 2:
            return None
        depthwise = False
        trans_b = node.attributes.get_int("transB", 0)
        rows, w_rows = (codes, w) if trans_b else (codes.T, w.T)

        def restore(q, trans_b=trans_b):
            return q if trans_b else q.T

        partner = _adjacent_partner(rows.shape[1]) if paired else None
    s = scale.const_value.numpy().astype(np.float64).reshape(-1)
    if s.size not in (1, rows.shape[0]):
        return None
    s = np.broadcast_to(s, (rows.shape[0],))
    return _Layer(
        node=node,
        value=wq,
        codes=np.ascontiguousarray(rows).astype(np.int64),
        exact=w_rows / np.where(s > 0, s, 1.0)[:, None],
        restore=restore,
        depthwise=depthwise,
        partner=partner,
    )


def _adjacent_partner(k: int) -> np.ndarray:
    """Pairs ``(0, 1), (2, 3), ...`` along K (an odd K's last element is paired with padding: none)."""
    partner = np.arange(k) ^ 1
    partner[partner >= k] = -1
    return partner


def _conv_partner(shape: tuple[int, ...]) -> np.ndarray:
    """For a Conv weight ``[M, C, *kernel]`` flattened as ``(c, *kernel)``: the column each one is paired
    with in onnxruntime's GEMM, whose K runs over ``(*kernel, c)``, channel fastest (see ``pairs``)."""
    c, spatial = shape[1], int(np.prod(shape[2:]))
    ours = np.arange(c * spatial).reshape(c, spatial)  # our column of (c, position)
    k_major = ours.T.reshape(-1)  # K-major index -> our column
    partner_k = _adjacent_partner(k_major.size)
    partner = np.full(k_major.size, -1)
    has = partner_k >= 0
    partner[k_major[has]] = k_major[partner_k[has]]
    return partner


BLOCK = 128
"""Columns visited between two full updates of ``C d`` (one matrix product) when ``C`` is shared."""

LOW_RANK_BLOCK = 64
"""Columns whose ``C d`` one product gives in :func:`_round_low_rank` (and whose part of ``C`` it forms)."""


def _round(
    exact: np.ndarray, codes: np.ndarray, cov: np.ndarray, sweeps: int, partner: np.ndarray | None = None
) -> tuple[np.ndarray, float, float]:
    """Codes one grid step from ``exact`` at most (``[C, K]``) lowering ``d' cov d`` per row, ``d = q - exact``,
    by coordinate descent from ``codes``; ``cov`` is ``[C, K, K]`` or ``[1, K, K]`` (shared by every row).
    With ``partner``, no flip makes a pair's same-sign magnitudes exceed ``PAIR_LIMIT``. Codes off the two
    nearest grid points (moved by :func:`ncc.passes.quant.pairs.fit_pairs`) stay. Returns the codes and the
    summed objective before and after.

    A shared ``cov`` is visited in blocks of :data:`BLOCK` columns (GPTQ's lazy batch updates): within a
    block only the block's columns of ``C d`` are kept current, the rest follow in one product per block.
    The state is kept column-major (``[K, C]``): a visit reads and writes one column of every row."""
    d = codes.astype(np.int64) - exact
    shared = cov.shape[0] == 1
    hd = d @ cov[0] if shared else np.matmul(cov, d[:, :, None])[:, :, 0]  # cov is symmetric
    start = float(np.sum(d * hd))
    hd = hd.T.copy()  # [K, C] from here on
    q = codes.astype(np.int64).T.copy()
    lo = np.floor(exact).T.copy()
    diag = np.diagonal(cov, axis1=1, axis2=2).T  # [K, 1] shared, else [K, C]
    movable = (q == lo) | (q == lo + 1)
    width = q.shape[0]
    block = BLOCK if shared else width
    for _ in range(max(0, sweeps)):
        moved = 0
        other, twice, allowed = _flips(q, lo, movable)
        for b0 in range(0, width, block):
            stop = min(b0 + block, width)
            # [C, block]: C d, current on the block's columns
            local = hd[b0:stop].T.copy() if shared else None
            change = np.zeros((q.shape[1], stop - b0)) if shared else None
            for k in range(b0, stop):
                j = k - b0 if shared else k
                # change of d' C d when d_k moves by step (+-1): 2 step (C d)_k + C_kk
                gain = twice[k] * (local[:, j] if shared else hd[k]) + diag[k]
                rows = _pair_safe(
                    np.flatnonzero(allowed[k] & (gain < -1e-12 * diag[k])), q, other, partner, k
                )
                if rows.size == 0:
                    continue
                s = 0.5 * twice[k, rows]
                q[k, rows] = other[k, rows]
                if shared:
                    change[rows, j] = s
                    local[rows] += s[:, None] * cov[0, k, b0:stop][None, :]
                else:
                    hd[:, rows] += cov[rows, :, k].T * s[None, :]
                moved += rows.size
            if shared and change.any():
                hd += (change @ cov[0, b0:stop, :]).T
        if not moved:
            break
    d = q - exact.T
    return q.T.copy(), start, float(np.sum(d * hd))


def _flips(q: np.ndarray, lo: np.ndarray, movable: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every code of ``q`` (``[K, C]``, column-major): its other grid neighbour, twice the step to it
    (+-2.0), and whether that flip is allowed (the code is on one of its two nearest grid points and the
    other stays within +-QMAX). Computed once per sweep: a visit changes only its own column's codes, so
    a column's neighbours are still these when its turn comes (an int16 pair is checked then:
    :func:`_pair_safe`)."""
    other = np.where(q == lo, lo + 1, lo).astype(np.int64)
    allowed = movable & (np.abs(other) <= QMAX)
    return other, 2.0 * (other - q), allowed


def _pair_safe(
    rows: np.ndarray, q: np.ndarray, other: np.ndarray, partner: np.ndarray | None, k: int
) -> np.ndarray:
    """Of the ``rows`` whose code in column ``k`` would flip, those whose flip keeps column ``k``'s int16
    pair within ``PAIR_LIMIT``, against its partner's codes as they are now (checked on the few candidate
    rows only: most columns have none)."""
    if partner is None or partner[k] < 0 or rows.size == 0:
        return rows
    return rows[_pair_allowed(q, other, partner, k, rows)]


def _round_low_rank(
    exact: np.ndarray,
    codes: np.ndarray,
    patches: np.ndarray,
    damping: float,
    sweeps: int,
    partner: np.ndarray | None = None,
) -> tuple[np.ndarray, float, float]:
    """:func:`_round` for a covariance shared by every row and given by its ``n < K`` patches ``[n, K]``.

    With ``X`` the centred patches, ``S = X' X / n`` and ``C = (1 - damping) S + damping diag(S)``, so
    ``C d = (1 - damping) X' (X d) / n + damping diag(S) d``: each row keeps ``r = X d`` (n numbers), and a
    block of :data:`LOW_RANK_BLOCK` columns gets its ``C d`` from one product and its part of ``C`` from its
    own patches; no K x K matrix is formed. The same objective, the same visiting order and the same flips
    as :func:`_round` on that covariance.

    Rows are independent problems that share ``C``, so within a block a row's next flip waits only for its
    own earlier ones: each round flips, in every row that still has one, the next column of the block
    (after its last flip) where flipping lowers that row's error, then brings those rows' ``C d`` up to
    date through the block's part of ``C``. A block takes as many rounds as the most flips one row makes
    in it, not one Python visit per column."""
    d = codes.astype(np.int64) - exact
    n = max(patches.shape[0], 1)
    x = patches - patches.mean(axis=0)
    diag = np.einsum("nk,nk->k", x, x) / n
    keep = 1.0 - damping
    r = d @ x.T  # [rows, n]

    def objective() -> float:
        return float(keep * np.sum(r * r) / n + damping * np.sum(d * d * diag[:, None]))

    d = d.T.copy()  # [K, rows] from here on, as in _round
    start = objective()
    q = codes.astype(np.int64).T.copy()
    lo = np.floor(exact).T.copy()
    xt = x.T.copy()  # [K, n]
    movable = (q == lo) | (q == lo + 1)
    width, every_row = q.shape[0], np.arange(q.shape[1])
    for _ in range(max(0, sweeps)):
        other, twice, allowed = _flips(q, lo, movable)
        moved = 0
        for b0 in range(0, width, LOW_RANK_BLOCK):
            block = slice(b0, min(b0 + LOW_RANK_BLOCK, width))
            xb = xt[block]
            part = (keep / n) * (xb @ xb.T)  # the block's C, but for its diagonal: not read after a flip
            cd = (keep / n) * (r @ xb.T) + damping * diag[block] * d[block].T  # [rows, block]
            can, step = allowed[block].T.copy(), twice[block].T.copy()
            dg, limit = diag[block], -1e-12 * diag[block]
            later = np.arange(cd.shape[1])[None, :]
            wants = can & (step * cd + dg < limit)  # 2 step (C d)_k + C_kk < 0: the flip lowers d' C d
            live = every_row
            while True:
                ahead = wants[live]
                has = ahead.any(axis=1)
                live, ahead = live[has], ahead[has]
                if not live.size:
                    break
                j = ahead.argmax(axis=1)
                k = b0 + j
                s = 0.5 * step[live, j]
                if partner is not None:  # a flip its int16 pair refuses leaves the code: a step of 0
                    s *= _pair_allowed(q, other, partner, k, live)
                q[k, live] += s.astype(np.int64)
                d[k, live] += s
                r[live] += s[:, None] * xt[k]
                moved += int(np.count_nonzero(s))
                c = cd[live] + s[:, None] * part[j]
                cd[live] = c
                wants[live] = can[live] & (step[live] * c + dg < limit) & (later > j[:, None])
        if not moved:
            break
    return q.T.copy(), start, objective()


def _pair_allowed(
    q: np.ndarray, other: np.ndarray, partner: np.ndarray, k: np.ndarray | int, rows: np.ndarray
) -> np.ndarray:
    """Whether flipping each row's code in its column ``k`` (one column, or one per row) keeps its int16 pair
    within ``PAIR_LIMIT``, against the partner's code as it is now."""
    mate = partner[k]
    u, o = q[np.maximum(mate, 0), rows], other[k, rows]
    return (mate < 0) | ~((o * u > 0) & (np.abs(o) + np.abs(u) > PAIR_LIMIT))
