"""Weight-only quantization kernels (passes/woq/kernels.py) against a plain per-group reference.

:func:`ref_rtn` is the module docstring's formulas written out one row and one
group at a time (no padding, no vectorization), in float32 like the weights:

    asymmetric: lo = min(0, min w)  hi = max(0, max w)  s = (hi - lo) / (2^b - 1)
                z = clip(round(-lo / s), 0, 2^b - 1)    q = clip(round(w / s) + z, 0, 2^b - 1)
    symmetric:  m = the group's value of largest magnitude (with its sign)
                s = m / -2^(b-1)                         q = clip(round(w / s), -2^(b-1), 2^(b-1) - 1)

with scale 1 for an all-zero group. Codes, scales and zero points must equal
the kernel's exactly (the same float32 operations on the same values).

Dequantization error: an element that is not clipped is rounded to the nearest
level, so ``|w - w^| <= |s| / 2``; a clipped one is at most ``|s|`` away (the
zero point's own rounding moves the grid by at most ``s / 2``).
"""

from __future__ import annotations

import numpy as np
import pytest
from ncc.passes.woq.kernels import GroupSpec, awq_clip, awq_scales, gptq, rtn

# -- the reference -------------------------------------------------------------------------------


def round_away(x):
    """Nearest integer, ties away from zero (the documented rounding; C's roundf)."""
    x = np.asarray(x)
    return np.where(x >= 0, np.floor(x + 0.5), np.ceil(x - 0.5))


def ref_rtn(wt: np.ndarray, bits: int, group: int, sym: bool):
    """Codes ``[N, K]`` (int64), scales ``[N, G]`` float32, zero points ``[N, G]`` (None when symmetric)."""
    n, k = wt.shape
    g = group or k
    groups = -(-k // g)
    codes = np.zeros((n, k), np.int64)
    scales = np.zeros((n, groups), np.float32)
    zeros = None if sym else np.zeros((n, groups), np.int64)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    for r in range(n):
        for j in range(groups):
            w = wt[r, j * g : (j + 1) * g].astype(np.float32)  # the last group may be shorter
            if sym:
                hi, lo = w.max(), w.min()
                m = hi if abs(hi) > abs(lo) else lo  # the negative one on a tie (documented)
                s = np.float32(m) / np.float32(qmin)
                s = np.float32(1.0) if s == 0 else s
                q = np.clip(round_away(w * (np.float32(1) / s) + np.float32(-qmin)) + qmin, qmin, qmax)
            else:
                lo = np.float32(min(np.float32(0), w.min()))
                hi = np.float32(max(np.float32(0), w.max()))
                s = (hi - lo) / np.float32(qmax)
                s = np.float32(1.0) if s == 0 else s
                z = np.clip(round_away(-lo / s), 0, qmax)
                zeros[r, j] = int(z)
                q = np.clip(round_away(w * (np.float32(1) / s) + np.float32(z)), qmin, qmax)
            scales[r, j] = s
            codes[r, j * g : (j + 1) * g] = q.astype(np.int64)
    return codes, scales, zeros


def ref_dequantize(codes, scales, zeros, group: int) -> np.ndarray:
    """``w^ [N, K]`` from codes ``[N, K]`` and per-group scales/zero points ``[N, G]``."""
    k = codes.shape[1]
    g = group or k
    idx = np.arange(k) // g
    q = codes.astype(np.float32)
    if zeros is not None:
        q = q - zeros[:, idx].astype(np.float32)
    return q * scales[:, idx]


def weights(n: int, k: int, seed: int = 0) -> np.ndarray:
    """``Wt [N, K]``: Gaussian with a few outliers (as trained weights have), one all-zero group, and a group
    whose two largest magnitudes are equal and opposite (the symmetric scheme must clip one of them)."""
    rng = np.random.default_rng(seed)
    wt = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    wt[rng.integers(4, n, 6), rng.integers(0, k, 6)] = rng.choice([-1.0, 1.0], 6) * 0.6
    wt[1, :32] = 0.0
    wt[2, :16] = rng.uniform(-0.05, 0.05, 16)
    wt[2, 3], wt[2, 9] = 0.5, -0.5
    wt[3] = np.abs(wt[3])  # a row without negative values: lo = 0
    return wt


SPECS = [
    pytest.param(bits, group, sym, id=f"b{bits}-g{group}-{'sym' if sym else 'asym'}")
    for bits in (4, 8)
    for group in (32, 128, 0)
    for sym in (False, True)
]

DQ_SPECS = [
    pytest.param(bits, group, sym, id=f"b{bits}-g{group}-{'sym' if sym else 'asym'}")
    for bits in (4, 8)
    for group in (32, 128, 0)
    for sym in (False, True)
]


def unsigned_or_signed(qw) -> np.ndarray:
    """The codes as the integers they stand for (int16 holds both signed and unsigned codes)."""
    assert qw.codes.dtype == np.int16
    return qw.codes.astype(np.int64)


# -- RTN ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [256, 200], ids=["K256", "K200-partial"])
@pytest.mark.parametrize("bits,group,sym", SPECS)
def test_rtn_matches_reference(bits, group, sym, k):
    wt = weights(24, k)
    qw = rtn(wt, GroupSpec(bits, group, sym))
    codes, scales, zeros = ref_rtn(wt, bits, group, sym)
    np.testing.assert_array_equal(unsigned_or_signed(qw), codes)
    np.testing.assert_array_equal(qw.scales, scales)
    if sym:
        assert qw.zero_points is None
    else:
        np.testing.assert_array_equal(qw.zero_points.astype(np.int64), zeros)


@pytest.mark.parametrize("k", [256, 200], ids=["K256", "K200-partial"])
@pytest.mark.parametrize("bits,group,sym", DQ_SPECS)
def test_quantized_weight_dequantize_matches_reference(bits, group, sym, k):
    """QuantizedWeight.dequantize (used for the layer report's errors and by AWQ's searches) is (q - z) * s."""
    wt = weights(24, k, seed=1)
    codes, scales, zeros = ref_rtn(wt, bits, group, sym)
    np.testing.assert_array_equal(
        rtn(wt, GroupSpec(bits, group, sym)).dequantize(), ref_dequantize(codes, scales, zeros, group)
    )


@pytest.mark.parametrize("k", [256, 200], ids=["K256", "K200-partial"])
@pytest.mark.parametrize("bits,group,sym", SPECS)
def test_rtn_dequantize_within_half_a_step(bits, group, sym, k):
    wt = weights(24, k, seed=1)
    spec = GroupSpec(bits, group, sym)
    qw = rtn(wt, spec)
    zeros = None if sym else qw.zero_points.astype(np.int64)
    w_hat = ref_dequantize(unsigned_or_signed(qw), qw.scales, zeros, group)
    g = group or k
    idx = np.arange(k) // g
    step = np.abs(qw.scales[:, idx])
    err = np.abs(wt - w_hat)
    # clipped: the unclipped code would leave the integer range
    raw = round_away(wt / qw.scales[:, idx] + (0 if sym else zeros[:, idx].astype(np.float32)))
    clipped = (raw < spec.qmin) | (raw > spec.qmax)
    # slack: w / s + z is rounded to float32 before it is rounded to an integer, which can move a value that
    # close to a tie by one float32 ulp of a number up to 2^bits (onnxruntime's quantizer rounds the same sum)
    slack = 2.0**-24 * 2**bits * 2 + 1e-6
    assert np.all(err[~clipped] <= step[~clipped] * (0.5 + slack))
    assert np.all(err[clipped] <= step[clipped] * (1 + slack))
    if sym:
        # the +-0.5 pair in row 2: one lands on -2^(b-1), the other would be 2^(b-1) and is clipped one step off
        assert clipped[2, 3] and not clipped[2, 9] or clipped[2, 9] and not clipped[2, 3]
    # zeros reproduce exactly; an all-zero group (row 1's first at g=32) gets scale 1
    assert np.all(w_hat[1, :32] == 0)
    if group == 32:
        assert qw.scales[1, 0] == 1.0


def test_rtn_partial_group_is_quantized_on_its_own_values():
    """K=200, g=128: the last group holds 72 channels, and its range is theirs alone."""
    wt = weights(8, 200)
    wt[:, 128:] *= 0.01  # much smaller than the first group
    qw = rtn(wt, GroupSpec(4, 128, False))
    assert qw.codes.shape == (8, 200) and qw.scales.shape == (8, 2)
    # the last group's step follows its own (small) range, not the first group's
    span = np.maximum(wt[:, 128:].max(1), 0) - np.minimum(wt[:, 128:].min(1), 0)
    np.testing.assert_allclose(qw.scales[:, 1], span / 15, rtol=1e-6)


# -- GPTQ -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "group,k",
    [(32, 256), (128, 200), (96, 288), (0, 96)],
    ids=["g32", "g128-partial", "g96-groups-across-blocks", "per-channel"],
)
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_gptq_with_uncorrelated_inputs_is_rtn(group, k, sym):
    """With H = c I (inputs uncorrelated, equal power) H^-1 is diagonal: no error is propagated to other
    columns, so GPTQ's codes are RTN's (the reference's) exactly, whatever the damping and block size."""
    wt = weights(16, k, seed=2)
    qw = gptq(wt, 3.0 * np.eye(k), GroupSpec(4, group, sym), block=128)
    codes, scales, zeros = ref_rtn(wt, 4, group, sym)
    np.testing.assert_array_equal(unsigned_or_signed(qw), codes)
    np.testing.assert_array_equal(qw.scales, scales)
    if not sym:
        np.testing.assert_array_equal(qw.zero_points.astype(np.int64), zeros)


@pytest.mark.parametrize(
    "bits,sym",
    [
        (4, False),
        (4, True),
        (8, True),
        (8, False),
    ],
    ids=["w4-asym", "w4-sym", "w8-sym", "w8-asym"],
)
def test_gptq_dead_inputs_get_weight_zero_and_the_rest_improves(bits, sym):
    """Correlated inputs with one dead channel: the dead channel's weight dequantizes to 0, and GPTQ's output
    error on the data it saw is lower than RTN's (the point of the algorithm)."""
    rng = np.random.default_rng(3)
    k, n, t = 128, 32, 2048
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = rng.standard_normal((t, k)) @ mix
    x[:, 7] = 0.0
    wt = weights(n, k, seed=3)
    spec = GroupSpec(bits, 32, sym)

    def dequantize(qw):  # the reference dequantization of the codes as the integers they stand for
        zeros = None if sym else qw.zero_points.astype(np.int64)
        return ref_dequantize(unsigned_or_signed(qw), qw.scales, zeros, 32)

    def out_err(d):
        return np.linalg.norm(x @ (wt - d).T) / np.linalg.norm(x @ wt.T)

    qw = gptq(wt, x.T @ x, spec)
    dq = dequantize(qw)
    assert np.all(dq[:, 7] == 0)
    # on this data GPTQ measures about 0.7x RTN's error at either width
    assert out_err(dq) < 0.8 * out_err(dequantize(rtn(wt, spec)))


# -- AWQ ------------------------------------------------------------------------------------------


def test_awq_scales_and_clip_ranges():
    rng = np.random.default_rng(4)
    k, n, t = 128, 48, 256
    mag = np.exp(rng.standard_normal(k))  # channels of very different magnitude
    x = (rng.standard_normal((t, k)) * mag).astype(np.float32)
    wt = weights(n, k, seed=4)
    spec = GroupSpec(4, 32, False)
    s, a = awq_scales([wt], x.T.astype(np.float64) @ x, np.abs(x).mean(0), spec)
    assert s.shape == (k,) and s.dtype == np.float32 and 0 <= a < 1
    # normalized so that sqrt(max * min) = 1 (float32 rounding of s)
    np.testing.assert_allclose(np.sqrt(float(s.max()) * float(s.min())), 1.0, rtol=1e-5)
    # the search includes a = 0 (plain RTN), so what it keeps is never worse than RTN on its data

    def out_err(d):
        return np.linalg.norm(x @ (wt - d).T)

    scaled = rtn(wt * s[None, :], spec).dequantize() / s[None, :]
    assert out_err(scaled) <= out_err(rtn(wt, spec).dequantize()) * (1 + 1e-6)
    ws, xs = wt * s[None, :], x / s[None, :]
    ratio = awq_clip(ws, xs.T.astype(np.float64) @ xs, spec)
    assert ratio.shape == (n, 4) and np.all((ratio >= 0.5) & (ratio <= 1.0))
    assert np.any(ratio < 1.0)  # the outliers make some group worth clipping

    def group_err(d):  # [N, G]: each group's own contribution to the output error, |x_j (w_j - w^_j)|^2
        diff = ws - d
        return np.stack(
            [
                np.square(xs[:, j * 32 : (j + 1) * 32] @ diff[:, j * 32 : (j + 1) * 32].T).sum(0)
                for j in range(4)
            ],
            axis=1,
        )

    # ratio 1 (no clipping) is among those tried, so no group's own error gets worse; 1e-4: float32 sums
    clipped, plain = group_err(rtn(ws, spec, clip=ratio).dequantize()), group_err(rtn(ws, spec).dequantize())
    assert np.all(clipped <= plain * (1 + 1e-4) + 1e-12)
    assert clipped.sum() < plain.sum()
