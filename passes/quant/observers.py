"""Streaming tensor statistics and the calibration range methods built on them.

A :class:`TensorStats` sees a tensor batch by batch and keeps, in constant
memory: min, max, abs-max (over every value), count, the number of exact zeros, the number of
*sentinels* and NaNs, optional per-channel min/max, and a histogram with a
fixed number of bins.

**Sentinels.** Values with ``|x| >= 1e30`` (float32's minimum used as an
attention-mask fill, ``±inf``) are counted in ``sentinel_count`` and left out
of every other statistic; NaNs likewise go to ``nan_count``. The range of a
masked ``Add`` then comes from the values that matter, and the caller can see
the tensor had sentinels (all-MiniLM-L6-v2's mask is float32's minimum: a
range taken over it makes INT8 useless).

**Histogram layout.** Bins lie on the lattice ``w·Z`` (bin ``m`` is
``[m·w, (m+1)·w)``), so 0 is always a bin edge; the histogram covers the
``bins`` consecutive lattice cells starting at cell ``origin`` (an integer
``<= 0``) and always contains ``[min(0, min), max(0, max)]``. Covering 0
costs nothing a quantizer can use (every quantized range includes 0) and it
gives a one-sided tensor (post-ReLU) the full resolution on its side. When a
batch falls outside, the bin width grows by the smallest integer factor
``k`` that makes it fit: each old cell then lies inside exactly one new cell
(``m -> floor(m / k)``), so re-binning is exact and loses no mass.

**Range methods** return ``(lo, hi)`` in float:

- ``minmax()`` — the observed extremes (sentinels excluded).
- ``percentile(p)`` — two-sided: ``(100 - p)`` percent of the mass is cut,
  half from each tail, interpolating linearly inside a bin; the side of a
  one-sided tensor that ends at 0 keeps its observed bound.
- ``entropy(levels)`` — TensorRT's KL-divergence threshold search: for each
  candidate threshold ``T`` (a bin edge), ``P`` is the histogram on
  ``[0, T)`` with the mass beyond ``T`` added to its last bin, and ``Q`` is
  ``P`` merged into ``levels`` quantization bins and spread back evenly over
  the bins that were non-empty; the ``T`` minimizing ``KL(P || Q)`` wins.
  Exact zeros (post-ReLU, padding) are left out of ``P``: 0 is always
  representable, and a spike of zeros in the first chunk would drag ``T``
  down. A two-sided tensor is folded to ``|x|`` and searched with ``levels // 2``
  bins (one sign's share of the integer grid), the result clamped to the
  observed ``[min, max]``; a one-sided tensor (``min >= 0``, or ``max <= 0``
  mirrored) is searched on its own side with all ``levels``. A threshold
  whose last bin is empty while mass lies beyond it would give ``KL = inf``
  (``P > 0`` where ``Q = 0``) and is skipped. Every candidate is scored at
  once from prefix sums, no Python loop over thresholds.
- ``mse(levels, symmetric)`` — the clip range minimizing the expected squared
  quantization error, estimated from the histogram: values inside the range
  cost ``scale² / 12`` (uniform rounding error; exact zeros cost nothing, 0 is
  always representable), values outside cost their squared distance to the
  clip edge (``(c - T)² + w² / 12`` for a bin centred at ``c``). Symmetric:
  ``scale = T / ((levels - 1) // 2)``, one candidate per bin edge.
  Asymmetric: ``scale = (hi - lo) / (levels - 1)``, every pair of bin edges
  ``lo <= 0 <= hi`` scored at once on a 2-D grid.

:func:`quant_params` turns a range into ONNX ``QuantizeLinear`` parameters.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

SENTINEL = 1e30
"""Magnitude from which a value counts as a masking sentinel, not data."""

DEFAULT_BINS = 2048

HIST_SAMPLE = 1 << 17
"""Values per batch that reach the histogram (a deterministic strided sample beyond this size).

Range methods work on mass fractions, which a sample of 131k values per batch
(millions per calibration run) pins down well; min and max still see every
value, so ``minmax`` is exact and no outlier escapes the histogram's range.
The stride is coprime with a sample's size, so the sample visits every
channel: a stride dividing the row length (3 on a 384-wide hidden state) would
see the same third of the channels in every row and miss outlier channels.
"""

_FIELDS_SCALAR = ("count", "zero_count", "sentinel_count", "nan_count", "min", "max", "width", "origin")


def _stride(size: int, shape: tuple[int, ...]) -> int:
    """The sampling stride for ``size`` values of ``shape``: at least ``size // HIST_SAMPLE`` and coprime
    with the values per sample (``shape[1:]``), so every position within a sample is reachable."""
    per_sample = math.prod(shape[1:]) if len(shape) > 1 else size
    stride = max(1, size // HIST_SAMPLE)
    while math.gcd(stride, per_sample) != 1:
        stride += 1
    return stride


class TensorStats:
    """Streaming statistics of one tensor: see the module docstring for the layout.

    ``axis`` (optional) also tracks per-channel min/max along that axis
    (``channel_min``, ``channel_max``; sentinels excluded, a channel with no
    finite value keeps ``+inf``/``-inf``).

    ``histogram=False`` keeps only what ``minmax`` needs (extremes, counts,
    sentinels, channel ranges): binning is most of an update's cost, and the
    other range methods then refuse with a clear error.
    """

    def __init__(self, bins: int = DEFAULT_BINS, *, axis: int | None = None, histogram: bool = True):
        if bins < 16:
            raise ValueError(f"TensorStats needs at least 16 bins, got {bins}")
        self.bins = int(bins)
        self.axis = axis
        self.histogram = histogram
        self.count = 0  # finite, non-sentinel values observed
        self.zero_count = 0
        self.sentinel_count = 0
        self.nan_count = 0
        self.min = math.inf
        self.max = -math.inf
        self.width = 0.0  # bin width; 0 until a non-zero value is seen
        self.origin = 0  # lattice index of the first bin (<= 0)
        self.hist = np.zeros(self.bins, dtype=np.int64)
        self.channel_min: np.ndarray | None = None
        self.channel_max: np.ndarray | None = None

    # -- observing ------------------------------------------------------------------------------

    @property
    def absmax(self) -> float:
        """Largest magnitude observed (0.0 before any value)."""
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    @property
    def has_sentinels(self) -> bool:
        return self.sentinel_count > 0

    def update(self, array: np.ndarray) -> None:
        """Fold one batch into the statistics (any shape; float dtypes)."""
        x = np.asarray(array)
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        # the batch's extremes: from its channel extremes when they are clean (two fewer passes over x)
        extremes = self._update_channels(x) if self.axis is not None else None
        flat = x.reshape(-1)
        if flat.size == 0:
            return
        lo, hi = extremes if extremes is not None else (float(flat.min()), float(flat.max()))
        if not (abs(lo) < SENTINEL and abs(hi) < SENTINEL):  # NaN or sentinels present: filter (slow path)
            keep = np.abs(flat) < SENTINEL  # False for NaN and sentinels
            n_keep = int(np.count_nonzero(keep))
            n_nan = int(np.count_nonzero(np.isnan(flat))) if math.isnan(lo) or math.isnan(hi) else 0
            self.nan_count += n_nan
            self.sentinel_count += flat.size - n_keep - n_nan
            if n_keep == 0:
                return
            flat = flat[keep]
            lo, hi = float(flat.min()), float(flat.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if not self.histogram:
            self.count += flat.size
            return
        self._cover(min(lo, 0.0), max(hi, 0.0))  # before counting this batch's zeros (see _cover)
        if flat.size > HIST_SAMPLE:  # min/max saw every value; counts and histogram see a strided sample
            flat = flat[:: _stride(flat.size, x.shape)].copy()  # gathered once: two passes read it
        self.count += flat.size
        self.zero_count += int(flat.size - np.count_nonzero(flat))
        if self.width == 0.0:  # only zeros so far: remembered in zero_count, binned on first growth
            return
        # Cell index floor(x / w) - origin, computed in the input's precision (float32 for activations):
        # a value within rounding of a bin edge may land in the neighbouring bin, which no range method
        # can tell apart from the data's own noise.
        scaled = np.multiply(flat, flat.dtype.type(1.0 / self.width))
        np.floor(scaled, out=scaled)
        cells = scaled.astype(np.intp)
        cells -= self.origin
        np.clip(cells, 0, self.bins - 1, out=cells)
        self.hist += np.bincount(cells, minlength=self.bins)

    def _update_channels(self, x: np.ndarray) -> tuple[float, float] | None:
        """Fold the batch's per-channel extremes in; returns the batch's overall (min, max) when every
        channel's are finite and below the sentinel magnitude, else None (the caller filters)."""
        axis = self.axis % x.ndim
        if axis == x.ndim - 1:  # channels last (a transformer's hidden size): a view, no copy
            rows, over = x.reshape(-1, x.shape[-1]), 0
        else:
            rows, over = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1), 1
        cmin = rows.min(axis=over, initial=np.inf).astype(np.float64)
        cmax = rows.max(axis=over, initial=-np.inf).astype(np.float64)
        clean = bool(np.all(np.abs(cmin) < SENTINEL) and np.all(np.abs(cmax) < SENTINEL))
        if not clean:  # NaN, inf or sentinels: filter them out (slow path); a channel left with no value
            # keeps +inf / -inf
            bad = ~(np.abs(rows) < SENTINEL)
            cmin = np.where(bad, np.inf, rows).min(axis=over, initial=np.inf).astype(np.float64)
            cmax = np.where(bad, -np.inf, rows).max(axis=over, initial=-np.inf).astype(np.float64)
        if self.channel_min is None:
            self.channel_min, self.channel_max = cmin.copy(), cmax.copy()
        elif self.channel_min.shape != cmin.shape:
            raise ValueError(
                f"channel count changed along axis {self.axis}: {self.channel_min.shape[0]} -> {cmin.shape[0]}"
            )
        else:
            np.minimum(self.channel_min, cmin, out=self.channel_min)
            np.maximum(self.channel_max, cmax, out=self.channel_max)
        return (float(cmin.min()), float(cmax.max())) if clean and cmin.size else None

    def _cover(self, lo: float, hi: float) -> None:
        """Grow the histogram (exactly, by an integer factor) until it covers ``[lo, hi]``; ``lo <= 0 <= hi``."""
        if hi == lo:  # all zeros
            return
        b = self.bins
        if self.width == 0.0:
            width = (hi - lo) / (b - 1)
            origin = math.floor(lo / width)
            self.width, self.origin = width, origin
            zeros_seen = self.zero_count  # the zeros observed before any range existed
            self.hist[:] = 0
            self.hist[self._cell(0.0)] += zeros_seen
            return
        w, o = self.width, self.origin
        if o * w <= lo and (o + b) * w >= hi:
            return
        lo, hi = min(lo, o * w), max(hi, (o + b) * w)
        k = max(2, math.ceil((hi - lo) / (b * w)))
        while True:  # at most two rounds: k = ceil(span / ((b - 1) w)) always fits
            new_w = k * w
            new_o = math.floor(lo / new_w)
            if (new_o + b) * new_w >= hi:
                break
            k += 1
        cells = np.arange(o, o + b, dtype=np.int64) // k - new_o
        grown = np.zeros(b, dtype=np.int64)
        np.add.at(grown, cells, self.hist)
        self.hist, self.width, self.origin = grown, new_w, new_o

    def _cell(self, value: float) -> int:
        return int(min(max(math.floor(value / self.width) - self.origin, 0), self.bins - 1))

    # -- histogram views ------------------------------------------------------------------------

    def edges(self) -> np.ndarray:
        """The ``bins + 1`` bin edges (all zero before a non-zero value was seen)."""
        return (np.arange(self.bins + 1, dtype=np.float64) + self.origin) * self.width

    def _folded(self, sign: int) -> np.ndarray:
        """Histogram of ``sign * x`` restricted to ``sign * x >= 0``, as cells ``[i w, (i + 1) w)``, i >= 0.

        ``sign = 0`` folds both sides into ``|x|``. Cells on the lattice fold exactly.
        """
        b, o = self.bins, self.origin
        pos_cells = max(o + b, 0)  # cells [0, o+b) are non-negative
        neg_cells = max(-o, 0)  # cells [o, 0) are negative
        size = max(pos_cells, neg_cells)
        out = np.zeros(max(size, 1), dtype=np.float64)
        if sign >= 0 and pos_cells:
            out[:pos_cells] += self.hist[-o : -o + pos_cells] if o < 0 else self.hist[:pos_cells]
        if sign <= 0 and neg_cells:
            out[:neg_cells] += self.hist[:neg_cells][::-1]
        return out

    def _without_zeros(self, folded: np.ndarray) -> np.ndarray:
        """``folded`` with the exact zeros taken out of cell 0 (0 is always exact; a spike there skews KL)."""
        folded[0] = max(folded[0] - self.zero_count, 0.0)
        return folded

    # -- range methods --------------------------------------------------------------------------

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("no finite values observed: the range is undefined")

    def _require_histogram(self, method: str) -> None:
        self._require_data()
        if not self.histogram:
            raise ValueError(
                f"calibration method {method!r} needs a histogram; these statistics were "
                "collected for minmax only"
            )

    def minmax(self) -> tuple[float, float]:
        """The observed ``(min, max)``."""
        self._require_data()
        return float(self.min), float(self.max)

    def percentile(self, p: float = 99.99) -> tuple[float, float]:
        """Two-sided percentile range: ``100 - p`` percent of the values cut, half from each tail."""
        self._require_histogram("percentile")
        if not 0.0 < p <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {p}")
        if self.width == 0.0 or p == 100.0:
            return self.minmax()
        cut = (100.0 - p) / 200.0
        cdf = np.cumsum(self.hist, dtype=np.float64) / self.hist.sum()
        edges = self.edges()

        def quantile(q: float) -> float:
            i = int(np.searchsorted(cdf, q, side="left"))
            i = min(i, self.bins - 1)
            below = cdf[i - 1] if i else 0.0
            mass = cdf[i] - below
            frac = (q - below) / mass if mass > 0 else 0.0
            return float(edges[i] + frac * self.width)

        # a one-sided tensor keeps its bound at (or beyond) 0: the quantized range includes 0 anyway
        lo = self.min if self.min >= 0.0 else max(quantile(cut), self.min)
        hi = self.max if self.max <= 0.0 else min(quantile(1.0 - cut), self.max)
        return float(min(lo, hi)), float(max(lo, hi))

    def entropy(self, levels: int = 256) -> tuple[float, float]:
        """KL-divergence (TensorRT) threshold for an integer grid of ``levels`` values (256 for 8-bit)."""
        self._require_histogram("entropy")
        if self.width == 0.0:
            return self.minmax()
        if self.min >= 0.0:
            t = _kl_threshold(self._without_zeros(self._folded(+1)), levels) * self.width
            return float(min(self.min, t)), float(min(t, self.max))
        if self.max <= 0.0:
            t = _kl_threshold(self._without_zeros(self._folded(-1)), levels) * self.width
            return float(max(-t, self.min)), float(max(self.max, -t))
        t = _kl_threshold(self._without_zeros(self._folded(0)), max(levels // 2, 1)) * self.width
        return float(max(-t, self.min)), float(min(t, self.max))

    def mse(self, levels: int = 256, *, symmetric: bool = False) -> tuple[float, float]:
        """Clip range minimizing the expected squared quantization error on a grid of ``levels`` values."""
        self._require_histogram("mse")
        if self.width == 0.0:
            return self.minmax()
        w = self.width
        h = self.hist.astype(np.float64)
        nonzero_total = float(self.count - self.zero_count)
        if symmetric:
            folded = self._folded(0)
            n = folded.size
            centers = (np.arange(n) + 0.5) * w
            t = np.arange(n + 1, dtype=np.float64) * w  # candidate thresholds (edges)
            # mass and moments beyond each edge (suffix sums)
            s0 = np.concatenate([np.cumsum(folded[::-1])[::-1], [0.0]])
            s1 = np.concatenate([np.cumsum((folded * centers)[::-1])[::-1], [0.0]])
            s2 = np.concatenate([np.cumsum((folded * centers**2)[::-1])[::-1], [0.0]])
            clip = s2 - 2 * t * s1 + t**2 * s0 + s0 * w * w / 12.0
            qpos = max((levels - 1) // 2, 1)
            scale = t / qpos
            inside = np.maximum(nonzero_total - s0, 0.0)
            err = clip + inside * scale**2 / 12.0
            err[0] = np.inf
            best = int(np.argmin(err))
            return float(max(-t[best], self.min)), float(min(t[best], self.max))
        o, b = self.origin, self.bins
        centers = (np.arange(o, o + b, dtype=np.float64) + 0.5) * w
        edges = np.arange(o, o + b + 1, dtype=np.float64) * w
        zero_edge = -o  # index of edge 0.0
        # right tail beyond edge j (j >= zero_edge): suffix sums
        r0 = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])
        r1 = np.concatenate([np.cumsum((h * centers)[::-1])[::-1], [0.0]])
        r2 = np.concatenate([np.cumsum((h * centers**2)[::-1])[::-1], [0.0]])
        # left tail below edge j: prefix sums
        l0 = np.concatenate([[0.0], np.cumsum(h)])
        l1 = np.concatenate([[0.0], np.cumsum(h * centers)])
        l2 = np.concatenate([[0.0], np.cumsum(h * centers**2)])
        hi_idx = np.arange(zero_edge, b + 1)
        lo_idx = np.arange(0, zero_edge + 1)
        hi_e, lo_e = edges[hi_idx], edges[lo_idx]
        right = r2[hi_idx] - 2 * hi_e * r1[hi_idx] + hi_e**2 * r0[hi_idx] + r0[hi_idx] * w * w / 12.0
        left = l2[lo_idx] - 2 * lo_e * l1[lo_idx] + lo_e**2 * l0[lo_idx] + l0[lo_idx] * w * w / 12.0
        # err[lo, hi] = left + right + inside * scale² / 12, built in place (the grid is up to ~1M cells)
        err = hi_e[None, :] - lo_e[:, None]
        degenerate = err == 0.0
        np.square(err, out=err)
        err *= 1.0 / (12.0 * max(levels - 1, 1) ** 2)
        inside = (nonzero_total - r0[hi_idx])[None, :] - l0[lo_idx][:, None]
        np.maximum(inside, 0.0, out=inside)
        err *= inside
        err += left[:, None]
        err += right[None, :]
        err[degenerate] = np.inf
        i, j = np.unravel_index(int(np.argmin(err)), err.shape)
        lo, hi = float(lo_e[i]), float(hi_e[j])
        return float(max(lo, self.min)), float(min(hi, self.max))

    def range(self, method: str = "minmax", **options) -> tuple[float, float]:
        """Dispatch by name: ``minmax``, ``percentile`` (``p``), ``entropy`` (``levels``), ``mse``."""
        methods = {
            "minmax": self.minmax,
            "percentile": self.percentile,
            "entropy": self.entropy,
            "mse": self.mse,
        }
        if method not in methods:
            raise ValueError(f"unknown calibration method {method!r}; expected one of {sorted(methods)}")
        return methods[method](**options)

    def without_channels(self) -> TensorStats:
        """A copy without the per-channel ranges (for a tensor holding the same values in another layout)."""
        arrays = {k: v for k, v in self.to_arrays().items() if k not in ("channel_min", "channel_max")}
        arrays["axis"] = np.asarray(-(2**31))
        return TensorStats.from_arrays(arrays)

    # -- persistence ----------------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to rebuild these statistics, as named numpy arrays."""
        out = {name: np.asarray(getattr(self, name)) for name in _FIELDS_SCALAR}
        out["bins"] = np.asarray(self.bins)
        out["axis"] = np.asarray(-(2**31) if self.axis is None else self.axis)
        out["histogram"] = np.asarray(self.histogram)
        out["hist"] = self.hist
        if self.channel_min is not None:
            out["channel_min"], out["channel_max"] = self.channel_min, self.channel_max
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> TensorStats:
        axis = int(arrays["axis"])
        stats = cls(
            int(arrays["bins"]),
            axis=None if axis == -(2**31) else axis,
            histogram=bool(arrays["histogram"]) if "histogram" in arrays else True,
        )
        for name in _FIELDS_SCALAR:
            value = arrays[name].item()
            setattr(stats, name, value)
        stats.hist = np.array(arrays["hist"], dtype=np.int64)
        if "channel_min" in arrays:
            stats.channel_min = np.array(arrays["channel_min"])
            stats.channel_max = np.array(arrays["channel_max"])
        return stats

    def __repr__(self) -> str:
        extra = f", sentinels={self.sentinel_count}" if self.sentinel_count else ""
        return f"TensorStats(count={self.count}, min={self.min:.6g}, max={self.max:.6g}{extra})"


def _kl_threshold(hist: np.ndarray, levels: int) -> int:
    """Number of cells ``i`` of ``hist`` (cells ``[k w, (k+1) w)``) whose edge minimizes KL(P || Q).

    For candidate ``i``: ``P = hist[:i]`` plus the outliers ``sum(hist[i:])`` on
    ``P[i-1]``; ``Q`` merges ``hist[:i]`` into ``levels`` chunks (``i // levels``
    cells each, the last takes the remainder) and spreads each chunk's mass
    evenly over its non-empty cells. With ``N = sum(P)`` and ``M = sum(Q)``::

        KL = (1/N) Σ P log P - log N - (1/N) Σ P log Q + log M

    and ``Σ_{chunk} P log Q = S_c log(S_c / Z_c)`` (chunk mass, non-empty
    cells), plus ``outliers · log Q[i-1]`` — all from prefix sums.
    """
    hist = np.asarray(hist, dtype=np.float64)
    nz = np.flatnonzero(hist)
    if nz.size == 0:
        return max(hist.size, 1)
    n = int(nz[-1]) + 1  # drop empty tail cells
    hist = hist[:n]
    if n <= levels:
        return n
    total = hist.sum()
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    cnt = np.concatenate([[0], np.cumsum(hist > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        hlogh = np.where(hist > 0, hist * np.log(np.where(hist > 0, hist, 1.0)), 0.0)
    cum_hlogh = np.concatenate([[0.0], np.cumsum(hlogh)])

    cand = np.arange(levels, n + 1)  # i
    outliers = total - cum[cand]
    last = hist[cand - 1]
    p_last = last + outliers
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = cum_hlogh[cand - 1] + np.where(
            p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0
        )
    # chunk boundaries, shape (candidates, levels + 1)
    merged = cand // levels
    starts = merged[:, None] * np.arange(levels + 1)[None, :]
    starts[:, -1] = cand
    s = cum[starts[:, 1:]] - cum[starts[:, :-1]]
    z = cnt[starts[:, 1:]] - cnt[starts[:, :-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        slogq = np.where(s > 0, s * np.log(np.where(s > 0, s, 1.0) / np.maximum(z, 1)), 0.0).sum(axis=1)
        q_last = np.where(z[:, -1] > 0, s[:, -1] / np.maximum(z[:, -1], 1), 0.0)
        out_term = np.where(outliers > 0, outliers * np.log(np.where(q_last > 0, q_last, 1.0)), 0.0)
    m = cum[cand]
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = plogp / total - np.log(total) - (slogq + out_term) / total + np.log(np.where(m > 0, m, 1.0))
    invalid = (outliers > 0) & ((last == 0) | (q_last == 0))
    kl = np.where(invalid | (m == 0), np.inf, kl)
    best = int(np.argmin(kl))
    return int(cand[best])


def quant_params(
    lo: float,
    hi: float,
    *,
    dtype: Literal["u8", "s8"] = "u8",
    symmetric: bool = False,
    reduce_range: bool = False,
) -> tuple[np.float32, int]:
    """``(scale, zero_point)`` for ONNX ``QuantizeLinear`` covering ``[lo, hi]``.

    ``y = saturate(round(x / scale) + zero_point)``. The range is widened to
    include 0 (so 0 is exact). Asymmetric: ``scale = (rmax - rmin) / (qmax - qmin)``,
    ``zero_point = round(qmin - rmin / scale)``. Symmetric: ``scale = A / q``
    with ``A = max(|lo|, |hi|)`` and ``q`` the largest positive level relative
    to the zero point (127, or 63 with ``reduce_range``), so ``±A`` are both
    exact; the zero point is 0 for s8 and 128 for u8 (64 with ``reduce_range``).
    ``reduce_range`` uses 7 bits: u8 ``[0, 127]``, s8 ``[-64, 63]``. A zero
    range gets ``scale = 1``; the scale is always a positive float32.
    """
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"cannot quantize a non-finite range [{lo}, {hi}]")
    if lo > hi:
        raise ValueError(f"empty range: lo {lo} > hi {hi}")
    if dtype == "u8":
        qmin, qmax = (0, 127) if reduce_range else (0, 255)
    elif dtype == "s8":
        qmin, qmax = (-64, 63) if reduce_range else (-128, 127)
    else:
        raise ValueError(f"dtype must be 'u8' or 's8', got {dtype!r}")
    rmin, rmax = min(lo, 0.0), max(hi, 0.0)
    tiny = float(np.finfo(np.float32).tiny)
    if symmetric:
        zero_point = 0 if dtype == "s8" else (qmin + qmax + 1) // 2
        qpos = qmax - zero_point
        absmax = max(-rmin, rmax)
        scale = absmax / qpos if absmax > 0 else 1.0
        return np.float32(max(scale, tiny)), int(zero_point)
    if rmax == rmin:
        return np.float32(1.0), int(qmin)
    scale = float(np.float32(max((rmax - rmin) / (qmax - qmin), tiny)))
    zero_point = int(np.clip(round(qmin - rmin / scale), qmin, qmax))
    return np.float32(scale), zero_point
