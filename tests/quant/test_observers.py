"""TensorStats and quant_params against numpy references and onnxruntime's QuantizeLinear."""

from __future__ import annotations

import time

import numpy as np
import pytest
from ncc.passes.quant import observers
from ncc.passes.quant.observers import TensorStats, quant_params


def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float32)  # 1797 x 64 real pixel intensities in [0, 16]


def _fake_quant(x: np.ndarray, lo: float, hi: float, *, dtype="u8", symmetric=False) -> np.ndarray:
    scale, zp = quant_params(lo, hi, dtype=dtype, symmetric=symmetric)
    qmin, qmax = (0, 255) if dtype == "u8" else (-128, 127)
    q = np.clip(np.rint(x / np.float32(scale)) + zp, qmin, qmax)
    return ((q - zp) * np.float32(scale)).astype(np.float64)


def _tailed(kind: str, n: int = 1_000_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) if kind == "gauss" else rng.laplace(size=n)
    x[:4] = rng.uniform(15, 25, size=4) * np.array([1, -1, 1, -1])  # rare outliers: clipping them pays
    return x.astype(np.float32)


def test_digits_streamed_matches_numpy():
    pixels = _digits()
    stats = TensorStats()
    for chunk in np.array_split(pixels, 7):
        stats.update(chunk)
    assert stats.count == pixels.size
    assert stats.minmax() == (float(pixels.min()), float(pixels.max()))
    assert stats.absmax == float(np.abs(pixels).max())
    assert stats.zero_count == int(np.count_nonzero(pixels == 0))
    assert stats.hist.sum() == pixels.size
    for p in (90.0, 99.0):
        lo, hi = stats.percentile(p)
        cut = (100 - p) / 2
        ref_lo, ref_hi = np.percentile(pixels, [cut, 100 - cut])
        assert (
            abs(lo - ref_lo) <= 1.0 + stats.width and abs(hi - ref_hi) <= 1.0 + stats.width
        )  # integer-valued data


def test_histogram_matches_numpy_after_growth():
    rng = np.random.default_rng(1)
    parts = [
        rng.uniform(0, 0.5, 5000),
        rng.normal(0, 3, 5000),
        rng.uniform(-40, 100, 5000),
        rng.normal(0, 1, 5000),
    ]
    stats = TensorStats(bins=512)
    widths = []
    for part in parts:
        stats.update(part)
        widths.append(stats.width)
        assert stats.hist.sum() == stats.count  # re-binning loses no mass
    assert widths[0] < widths[1] < widths[2] == widths[3]
    everything = np.concatenate(parts)
    ref, _ = np.histogram(everything, bins=stats.edges())
    assert stats.edges()[0] <= everything.min() and stats.edges()[-1] >= everything.max()
    assert np.abs(ref - stats.hist).sum() <= 4  # only values on a bin edge may round differently


def test_zeros_first_then_data():
    stats = TensorStats()
    stats.update(np.zeros(100))
    assert stats.width == 0.0 and stats.minmax() == (0.0, 0.0)
    stats.update(np.array([1.0, 2.0, -1.0]))
    assert stats.hist.sum() == 103 and stats.zero_count == 100
    assert stats.hist[stats._cell(0.0)] >= 100


def test_sentinels_are_excluded_and_counted():
    rng = np.random.default_rng(2)
    scores = rng.normal(0, 2, size=(4, 8, 16)).astype(np.float32)
    mask = np.zeros_like(scores)
    mask[:, :, 12:] = np.finfo(np.float32).min  # padded positions, as in a transformers attention mask
    masked = scores + mask
    masked[0, 0, 0] = np.inf
    masked[0, 0, 1] = np.nan
    stats = TensorStats()
    stats.update(masked)
    values = masked[np.abs(masked) < 1e30]
    assert stats.sentinel_count == 4 * 8 * 4 + 1 and stats.nan_count == 1 and stats.has_sentinels
    assert stats.count == values.size
    assert stats.minmax() == (float(values.min()), float(values.max()))
    for method in ("minmax", "percentile", "entropy", "mse"):
        lo, hi = stats.range(method)
        assert values.min() <= lo <= 0 <= hi <= values.max(), method


def test_histogram_sample_sees_every_channel():
    # a [batch, seq, 384] hidden state with one outlier channel (0.26% of the values): the histogram
    # samples such a large batch with a stride, and a stride dividing 384 would skip that channel
    x = np.random.default_rng(0).standard_normal((8, 128, 384)).astype(np.float32)
    x[..., 1] = 100.0
    stats = TensorStats()
    stats.update(x)
    assert x.size > observers.HIST_SAMPLE
    assert stats.percentile(99.9)[1] == pytest.approx(100.0, rel=0.01)


@pytest.mark.parametrize("kind", ["gauss", "laplace"])
def test_methods_clip_outliers(kind):
    x = _tailed(kind)
    stats = TensorStats()
    for chunk in np.array_split(x, 5):
        stats.update(chunk)
    lo_mm, hi_mm = stats.minmax()
    lo_p, hi_p = stats.percentile(99.99)
    assert lo_mm < lo_p < 0 < hi_p < hi_mm
    for method in ("entropy", "mse"):
        lo, hi = stats.range(method)
        assert lo_mm < lo < 0 < hi < hi_mm, method
        assert -15 < lo and hi < 15, method  # the 15-25 outliers are clipped
    sigma = x[20:].std()
    assert stats.entropy()[1] > 2.5 * sigma  # but the bulk is kept


@pytest.mark.parametrize("kind", ["gauss", "laplace"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_range_beats_minmax_measured_on_data(kind, symmetric):
    x = _tailed(kind, seed=3)
    stats = TensorStats()
    stats.update(x)
    dtype = "s8" if symmetric else "u8"
    lo, hi = stats.mse(256, symmetric=symmetric)
    err_mse = np.mean((_fake_quant(x, lo, hi, dtype=dtype, symmetric=symmetric) - x) ** 2)
    err_minmax = np.mean((_fake_quant(x, *stats.minmax(), dtype=dtype, symmetric=symmetric) - x) ** 2)
    err_pct = np.mean((_fake_quant(x, *stats.percentile(99.0), dtype=dtype, symmetric=symmetric) - x) ** 2)
    assert err_mse <= err_minmax
    assert err_mse <= 1.05 * err_pct  # near-optimal, not just better than the worst choice


def test_one_sided_post_relu():
    rng = np.random.default_rng(4)
    y = np.maximum(rng.standard_normal(300_000), 0).astype(np.float32)
    y[:5] = 30.0
    stats = TensorStats()
    stats.update(y)
    assert stats.origin == 0  # the whole histogram on the non-negative side
    for method in ("percentile", "entropy"):
        lo, hi = stats.range(method)
        assert lo == 0.0 and 2.0 < hi < 10.0, (method, lo, hi)
    lo, hi = stats.mse()  # 5 outliers in 300k are worth keeping for squared error: rounding costs less
    assert lo == 0.0 and hi <= 30.0
    err_mse = np.mean((_fake_quant(y, lo, hi) - y) ** 2)
    assert err_mse <= np.mean((_fake_quant(y, 0.0, 30.0) - y) ** 2)
    neg = TensorStats()
    neg.update(-y)
    lo, hi = neg.entropy()
    assert hi <= 0.0 and lo == pytest.approx(-stats.entropy()[1])


def test_deterministic_and_fast():
    x = _tailed("laplace", n=400_000, seed=5)
    stats = TensorStats(bins=2048)
    stats.update(x)
    assert stats.entropy() == stats.entropy() and stats.mse() == stats.mse()
    for method in ("entropy", "mse"):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            stats.range(method)
            times.append(time.perf_counter() - start)
        assert sorted(times)[1] < 0.2, (method, times)  # ~10 ms measured; generous for a noisy machine


def test_round_trip_arrays_and_per_channel():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 3, 4)) * np.array([1.0, 10.0, 100.0])[None, :, None]
    stats = TensorStats(axis=1)
    stats.update(x[:2])
    stats.update(x[2:])
    np.testing.assert_array_equal(stats.channel_min, x.min(axis=(0, 2)))
    np.testing.assert_array_equal(stats.channel_max, x.max(axis=(0, 2)))
    back = TensorStats.from_arrays(stats.to_arrays())
    assert back.minmax() == stats.minmax() and back.axis == 1
    np.testing.assert_array_equal(back.hist, stats.hist)
    assert back.mse() == stats.mse() and back.entropy() == stats.entropy()


def test_empty_stats_raise():
    stats = TensorStats()
    stats.update(np.full(4, -np.inf))
    with pytest.raises(ValueError, match="no finite values"):
        stats.minmax()


# -- quant_params -----------------------------------------------------------------------------------


def _ort_qdq(x: np.ndarray, scale: np.float32, zp: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    zp_array = np.array(zp, dtype=np.uint8 if dtype == "u8" else np.int8)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
        [
            helper.make_tensor_value_info(
                "q", TensorProto.UINT8 if dtype == "u8" else TensorProto.INT8, [x.size]
            ),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.size]),
        ],
        [
            numpy_helper.from_array(np.array(scale, dtype=np.float32), "s"),
            numpy_helper.from_array(zp_array, "z"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q, y = session.run(None, {"x": x})
    return q, y


@pytest.mark.parametrize("dtype", ["u8", "s8"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reduce_range", [False, True])
@pytest.mark.parametrize("lo, hi", [(-1.5, 4.0), (0.0, 6.0), (-3.0, -0.5), (-0.02, 0.02)])
def test_quant_params_against_onnxruntime(dtype, symmetric, reduce_range, lo, hi):
    scale, zp = quant_params(lo, hi, dtype=dtype, symmetric=symmetric, reduce_range=reduce_range)
    assert isinstance(scale, np.float32) and scale > 0 and isinstance(zp, int)
    bits = 7 if reduce_range else 8
    qmin, qmax = (0, 2**bits - 1) if dtype == "u8" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert qmin <= zp <= qmax
    if symmetric:
        assert zp == (0 if dtype == "s8" else 2 ** (bits - 1))
    rmin, rmax = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        rmin, rmax = -max(-rmin, rmax), max(-rmin, rmax)
    x = np.concatenate([np.linspace(rmin, rmax, 1001), [0.0, rmin, rmax]]).astype(np.float32)
    q, y = _ort_qdq(x, scale, zp, dtype)
    assert q.min() >= qmin and q.max() <= qmax
    assert np.all(
        np.abs(y - x) <= scale * 0.5 + 1e-6 * max(abs(rmin), abs(rmax))
    )  # within one step (half, rounding)
    assert y[-3] == 0.0  # zero is exact


def test_quant_params_degenerate_and_invalid():
    assert quant_params(0.0, 0.0) == (np.float32(1.0), 0)
    assert quant_params(0.0, 0.0, dtype="s8", symmetric=True) == (np.float32(1.0), 0)
    scale, zp = quant_params(0.0, 1e-44)
    assert scale > 0
    with pytest.raises(ValueError):
        quant_params(float("nan"), 1.0)
    with pytest.raises(ValueError):
        quant_params(0.0, 1.0, dtype="u4")


def _kl_reference(hist: np.ndarray, levels: int) -> int:
    """TensorRT's threshold search written as the plain loop, for checking the vectorized one."""
    hist = hist[: np.flatnonzero(hist)[-1] + 1].astype(np.float64)
    best, best_kl = len(hist), np.inf
    for i in range(levels, len(hist) + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        q = np.zeros(i)
        merged = i // levels
        for c in range(levels):
            start, stop = c * merged, (i if c == levels - 1 else (c + 1) * merged)
            chunk = hist[start:stop]
            nonzero = chunk > 0
            if nonzero.any():
                q[start:stop][nonzero] = chunk.sum() / nonzero.sum()
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        kl = np.inf if np.any(q[mask] == 0) else float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl < best_kl - 1e-12:
            best, best_kl = i, kl
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_search_matches_plain_loop(seed):
    from ncc.passes.quant.observers import _kl_threshold

    rng = np.random.default_rng(seed)
    values = np.abs(rng.laplace(size=50_000) if seed != 1 else rng.standard_normal(50_000) ** 3)
    hist, _ = np.histogram(values, bins=600)
    if seed == 2:
        hist[::7] = 0  # sparse histograms: thresholds ending on an empty bin are invalid
    assert _kl_threshold(hist, 64) == _kl_reference(hist, 64)


def test_minmax_only_statistics_refuse_histogram_methods():
    x = _tailed("gauss")
    full, lean = TensorStats(axis=None), TensorStats(histogram=False)
    for chunk in np.array_split(x, 5):
        full.update(chunk)
        lean.update(chunk)
    assert lean.minmax() == full.minmax() == (float(x.min()), float(x.max()))
    assert lean.count == x.size and not lean.hist.any()
    for method in ("percentile", "entropy", "mse"):
        with pytest.raises(ValueError, match="needs a histogram"):
            lean.range(method)
    again = TensorStats.from_arrays(lean.to_arrays())
    assert not again.histogram and again.minmax() == lean.minmax()
    assert TensorStats.from_arrays(full.to_arrays()).histogram
