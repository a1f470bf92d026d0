"""Weight-only quantization arithmetic in numpy: RTN, GPTQ, AWQ's scale and clip searches.

Layout: a MatMul weight ``W`` of shape ``[K, N]`` (``Y = X @ W``) is handled here
transposed, as ``Wt = W.T`` of shape ``[N, K]``: one row per output column,
quantized in groups of ``g`` consecutive input channels along ``K``. That is
MatMulNBits' layout; ``DequantizeLinear`` sees the transpose (``axis=0``,
``block_size=g``).

Codes and dequantization, per row ``n`` and group ``j``::

    asymmetric (unsigned codes, integer zero point):
        lo = min(0, min W[n, j])   hi = max(0, max W[n, j])
        s = (hi - lo) / (2^b - 1)  z = clip(round(-lo / s), 0, 2^b - 1)
        q = clip(round(w / s + z), 0, 2^b - 1)          w^ = (q - z) * s
    symmetric (signed codes, no zero point):
        m = the value of largest magnitude in the group (with its sign; the negative one on a tie)
        s = m / -2^(b-1)                                 (m lands on -2^(b-1))
        q = clip(round(w / s + 2^(b-1)) - 2^(b-1), -2^(b-1), 2^(b-1) - 1)   w^ = q * s

``round`` is to nearest with ties away from zero, as C's ``roundf`` and
onnxruntime's quantizer round, and ``w / s`` is computed as ``w * (1 / s)`` in
float32 as it does (ties are frequent on weights exported from a 4-bit GGUF,
so both choices decide codes). A group of zeros gets scale 1 (any scale reproduces it). ``group_size = 0``
means one group over all of ``K`` (per output channel). When ``g`` does not
divide ``K`` the last group is shorter: arithmetically the row is padded with
zeros to ``ceil(K / g) * g``, which changes no group's range (both schemes keep
0 representable) and quantizes exactly to zero, as MatMulNBits pads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Rows of ``Wt`` processed at once, so temporaries stay near 16 MB whatever the weight.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class GroupSpec:
    """Bits, group size along K (0 = per output channel) and symmetry."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    def group(self, k: int) -> int:
        return self.group_size or k

    def groups(self, k: int) -> int:
        g = self.group(k)
        return -(-k // g)

    def label(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"w{self.bits}{g}{'-sym' if self.symmetric else ''}"


@dataclass
class QuantizedWeight:
    """``codes [N, K]`` (int16 holding signed or unsigned codes of any width), ``scales [N, G]`` float32,
    ``zero_points [N, G]`` uint8 (asymmetric) or None (symmetric)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    spec: GroupSpec

    def dequantize(self, rows: slice = slice(None)) -> np.ndarray:
        """``Wt^`` (or the given rows of it) as float32 ``[N, K]``."""
        codes = self.codes[rows]
        n, k = codes.shape
        g = self.spec.group(k)
        q = pad_k(codes, g).reshape(n, -1, g).astype(np.float32)
        if self.zero_points is not None:
            q = q - self.zero_points[rows].astype(np.float32)[:, :, None]
        return (q * self.scales[rows][:, :, None]).reshape(n, -1)[:, :k]


def reconstruction_errors(
    wt: np.ndarray,
    qw: QuantizedWeight,
    *,
    input_scale: np.ndarray | None = None,
    hessian: np.ndarray | None = None,
) -> tuple[float, float | None]:
    """``(|W - W^| / |W|, |X (W - W^)| / |X W|)`` over row chunks; the output error from ``hessian = X^T X``
    (exact over every calibration row), None without it. ``input_scale``: AWQ's ``s``."""
    n, k = wt.shape
    sums = np.zeros(4)
    step = max(1, _CHUNK_ELEMENTS // k)
    for r0 in range(0, n, step):
        rows = slice(r0, r0 + step)
        w = wt[rows]
        dq = qw.dequantize(rows)
        if input_scale is not None:
            dq /= input_scale[None, :]
        diff = w - dq
        sums[0] += float(np.sum(np.square(diff, dtype=np.float64)))
        sums[1] += float(np.sum(np.square(w, dtype=np.float64)))
        if hessian is not None:
            sums[2] += float(np.sum((diff.astype(np.float64) @ hessian) * diff))
            sums[3] += float(np.sum((w.astype(np.float64) @ hessian) * w))
    weight = float(np.sqrt(sums[0] / max(sums[1], 1e-30)))
    output = float(np.sqrt(max(sums[2], 0.0) / max(sums[3], 1e-30))) if hessian is not None else None
    return weight, output


def group_params(wg: np.ndarray, spec: GroupSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (and zero points) for groups ``wg [..., g]`` -> arrays of shape ``wg.shape[:-1]``."""
    if spec.symmetric:
        hi, lo = wg.max(axis=-1).astype(np.float32), wg.min(axis=-1).astype(np.float32)
        m = np.where(np.abs(hi) > np.abs(lo), hi, lo)  # a tie takes the negative one, as onnxruntime does
        scale = m / np.float32(spec.qmin)
        scale[scale == 0] = 1.0
        return scale.astype(np.float32), None
    lo = np.minimum(wg.min(axis=-1), 0).astype(np.float32)
    hi = np.maximum(wg.max(axis=-1), 0).astype(np.float32)
    scale = (hi - lo) / np.float32(spec.qmax)
    scale[scale == 0] = 1.0
    zero = np.clip(round_half_away(-lo / scale), 0, spec.qmax)
    return scale.astype(np.float32), zero.astype(np.uint8)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero (C's ``roundf``, as onnxruntime's quantizers round; numpy's
    ``round`` goes to even). Ties are common here: weights exported from GGUF already lie on a 4-bit grid."""
    return np.copysign(np.floor(np.abs(x) + 0.5), x)


def quantize_with(wg: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, spec: GroupSpec) -> np.ndarray:
    """Codes of ``wg [..., g]`` for per-group ``scale``/``zero`` of shape ``wg.shape[:-1]``."""
    q = wg * (np.float32(1) / scale[..., None]).astype(np.float32)  # by the reciprocal, as onnxruntime does
    # rounded in the unsigned domain, as onnxruntime does: + z, or + 2^(b-1) for symmetric codes (then taken back)
    if zero is not None:
        q = round_half_away(q + zero[..., None])
    else:
        q = round_half_away(q - np.float32(spec.qmin)) + spec.qmin
    return np.clip(q, spec.qmin, spec.qmax).astype(np.int16)


def dequantize_codes(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    q = q.astype(np.float32)
    if zero is not None:
        q = q - zero.astype(np.float32)[..., None]
    return q * scale[..., None]


def pad_k(a: np.ndarray, g: int) -> np.ndarray:
    """``a [..., K]`` padded with zeros along its last axis to a multiple of ``g``."""
    extra = -a.shape[-1] % g
    if not extra:
        return a
    return np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)])


def rtn(wt: np.ndarray, spec: GroupSpec, *, clip: np.ndarray | None = None) -> QuantizedWeight:
    """Round-to-nearest of ``wt [N, K]``; ``clip [N, G]`` shrinks each group's range first (AWQ)."""
    n, k = wt.shape
    g = spec.group(k)
    groups = spec.groups(k)
    codes = np.empty((n, k), np.int16)
    scales = np.empty((n, groups), np.float32)
    zeros = None if spec.symmetric else np.empty((n, groups), np.uint8)
    rows = max(1, _CHUNK_ELEMENTS // k)
    for r0 in range(0, n, rows):
        wg = pad_k(np.asarray(wt[r0 : r0 + rows], dtype=np.float32), g).reshape(-1, groups, g)
        ref = wg if clip is None else _clipped(wg, clip[r0 : r0 + rows])
        scale, zero = group_params(ref, spec)
        codes[r0 : r0 + rows] = quantize_with(wg, scale, zero, spec).reshape(-1, groups * g)[:, :k]
        scales[r0 : r0 + rows] = scale
        if zeros is not None:
            zeros[r0 : r0 + rows] = zero
    return QuantizedWeight(codes, scales, zeros, spec)


def _clipped(wg: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    bound = np.abs(wg).max(axis=-1, keepdims=True) * ratio[..., None]
    return np.clip(wg, -bound, bound)


# -- GPTQ ----------------------------------------------------------------------------------------


def gptq(
    wt: np.ndarray,
    hessian: np.ndarray,
    spec: GroupSpec,
    *,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022) of ``wt [N, K]`` against ``hessian = X^T X [K, K]`` of its inputs.

    Columns are quantized left to right (or by decreasing Hessian diagonal with
    ``act_order``); each column's rounding error is spread over the columns not
    yet quantized through the Cholesky factor of ``H^-1``. Group parameters are
    taken when the walk reaches a group's first column, from the weights as
    updated so far (with ``act_order`` they come from the original weights,
    since the walk no longer follows the groups). ``damp`` adds that fraction of
    the mean diagonal to ``H``. Dead inputs (zero diagonal) get weight 0. Rows
    are independent given ``H``, so they are processed in cache-sized chunks.
    """
    n, k_in = wt.shape
    g = spec.group(k_in)
    k = k_in + (-k_in % g)
    h = np.zeros((k, k))
    h[:k_in, :k_in] = hessian
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    h = h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = _inverse_cholesky_upper(h).astype(np.float32)
    groups = k // g
    codes = np.empty((n, k), np.int16)
    scales = np.empty((n, groups), np.float32)
    zeros = None if spec.symmetric else np.empty((n, groups), np.uint8)
    rows = max(1, (1 << 19) // block)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = pad_k(np.array(wt[r0:r1], dtype=np.float32), g)
        w[:, dead] = 0.0
        sc = scales[r0:r1]
        zc = None if zeros is None else zeros[r0:r1]
        if act_order:
            s_, z_ = group_params(w.reshape(r1 - r0, groups, g), spec)
            sc[:] = s_
            if zc is not None:
                zc[:] = z_
        codes[r0:r1] = _gptq_rows(w[:, perm], u, perm, g, sc, zc, spec, block, act_order)
    return QuantizedWeight(codes[:, :k_in], scales, zeros, spec)


def _gptq_rows(
    w: np.ndarray,
    u: np.ndarray,
    perm: np.ndarray,
    g: int,
    scales: np.ndarray,
    zeros: np.ndarray | None,
    spec: GroupSpec,
    block: int,
    act_order: bool,
) -> np.ndarray:
    """GPTQ over rows ``w [rows, K]`` (columns already in walk order ``perm``); fills ``scales``/``zeros``."""
    k = w.shape[1]
    codes = np.empty(w.shape, np.int16)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w1 = w[:, b0:b1].copy()
        err1 = np.empty_like(w1)
        for i in range(b1 - b0):
            col = int(perm[b0 + i])
            j = col // g
            if not act_order and col % g == 0:
                ahead = (
                    w1[:, i : i + g]
                    if i + g <= b1 - b0
                    else np.concatenate([w1[:, i:], w[:, b1 : b0 + i + g]], axis=1)
                )
                s, z = group_params(ahead, spec)
                scales[:, j] = s
                if zeros is not None:
                    zeros[:, j] = z
            zj = None if zeros is None else zeros[:, j]
            q = quantize_with(w1[:, i : i + 1], scales[:, j], zj, spec)[:, 0]
            codes[:, col] = q
            dq = dequantize_codes(q[:, None], scales[:, j], zj)[:, 0]
            e = (w1[:, i] - dq) / u[b0 + i, b0 + i]
            w1[:, i:] -= np.outer(e, u[b0 + i, b0 + i : b1])
            err1[:, i] = e
        w[:, b1:] -= err1 @ u[b0:b1, b1:]
    return codes


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), adding damping until ``H`` factors."""
    k = h.shape[0]
    extra = 0.0
    for _ in range(8):
        try:
            lower = np.linalg.cholesky(h + extra * np.eye(k))
            break
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(h))))
    else:  # pragma: no cover - a damped Gram matrix is positive definite
        raise np.linalg.LinAlgError("Hessian is not positive definite even after damping")
    inv_lower = np.linalg.inv(lower)
    h_inv = inv_lower.T @ inv_lower
    return np.linalg.cholesky(h_inv).T


# -- AWQ -----------------------------------------------------------------------------------------


def awq_scales(
    wts: list[np.ndarray],
    hessian: np.ndarray,
    x_mean_abs: np.ndarray,
    spec: GroupSpec,
    *,
    grid: int = 20,
    max_rows: int = 4096,
) -> tuple[np.ndarray, float]:
    """AWQ's per-input-channel scale ``s [K]`` for weights ``wts`` (each ``[N_i, K]``) sharing one input ``x``.

    Tries ``s = mean|x|^a`` (normalized to geometric mean 1) for ``a`` in
    ``0, 1/grid, ..., (grid-1)/grid`` and keeps the one whose RTN of ``W * s``
    (undone by ``/ s``) gives the least output error ``|x (W - W^)^T|^2``, summed
    over the weights and taken over every calibration row through
    ``hessian = x^T x``: ``tr(D H D^T)`` for ``D = W - W^``. Returns ``(s, a)``;
    ``a = 0`` means no scaling. Weights with more than ``max_rows`` output rows
    in all are searched on evenly strided rows (the scale is per input channel;
    every row sees it the same way).
    """
    xm = np.maximum(x_mean_abs.astype(np.float64), 1e-8)
    h = np.asarray(hessian, np.float64)
    best = (np.inf, np.ones_like(xm, dtype=np.float32), 0.0)
    total = sum(wt.shape[0] for wt in wts)
    w = np.concatenate(wts) if len(wts) > 1 else wts[0]
    if total > max_rows:
        w = w[:: -(-total // max_rows)]
    for step in range(grid):
        a = step / grid
        s = xm**a
        s = s / np.sqrt(s.max() * s.min())
        s32 = s.astype(np.float32)
        d = (w - rtn(w * s32[None, :], spec).dequantize() / s32[None, :]).astype(np.float64)
        err = float(np.sum((d @ h) * d))
        if err < best[0]:
            best = (err, s32, a)
    return best[1], best[2]


def awq_clip(
    wt: np.ndarray, hessian: np.ndarray, spec: GroupSpec, *, ratios: int = 20, max_shrink: float = 0.5
) -> np.ndarray:
    """Per-group clipping ratio ``[N, G]`` in ``(1 - max_shrink, 1]`` minimising each group's output error.

    A group's error for a weight change ``d`` is ``d^T H_j d`` with ``H_j`` the
    group's ``g x g`` diagonal block of ``hessian = x^T x`` (``x`` the input
    the weight ``wt`` actually multiplies), so every calibration row counts.
    """
    n, k = wt.shape
    g = spec.group(k)
    groups = spec.groups(k)
    h = np.zeros((groups * g, groups * g), np.float32)
    h[:k, :k] = hessian
    gram = np.stack([h[j * g : (j + 1) * g, j * g : (j + 1) * g] for j in range(groups)])  # [G, g, g]
    best_err = np.full((n, groups), np.inf)
    best = np.ones((n, groups), np.float32)
    rows = max(1, _CHUNK_ELEMENTS // k)
    for r0 in range(0, n, rows):
        wg = pad_k(np.asarray(wt[r0 : r0 + rows], np.float32), g).reshape(-1, groups, g)
        for step in range(ratios):
            ratio = np.float32(1.0 - max_shrink * step / ratios)
            ref = _clipped(wg, np.full(wg.shape[:2], ratio, np.float32))
            scale, zero = group_params(ref, spec)
            diff = (wg - dequantize_codes(quantize_with(wg, scale, zero, spec), scale, zero)).transpose(
                1, 0, 2
            )
            err = np.sum(np.matmul(diff, gram) * diff, axis=2).T  # [rows, G]
            better = err < best_err[r0 : r0 + rows]
            best_err[r0 : r0 + rows][better] = err[better]
            best[r0 : r0 + rows][better] = ratio
    return best
