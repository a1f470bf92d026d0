"""The ``calibrate`` pass: statistics of the float model's activations on real data.

Runs the float model in onnxruntime on the calibration data (``--calib``,
handed over in ``ctx.data["calibration_data"]``), observing every activation
``insert-qdq`` may need, for the op types it quantizes (``op-types``, as
insert-qdq's; the CLI's ``--op-types`` sets both) and no other
(:func:`ncc.passes.quant.plan.observed_values`),
and writes each one's range onto the graph (:mod:`ncc.passes.quant.ranges`),
where ``smooth-quant`` and ``insert-qdq`` read it and every dump shows it.
Statistics are histograms, cached by model and data, so the range method (mse,
minmax, percentile, entropy) is a choice made afterwards: changing it, or any
quantization option, reuses the cached statistics instead of running the model
again. ``minmax`` alone needs no histograms and collects none (binning is most of
the collection's cost); a histogram method after it runs the model once more.

The default is ``mse``: the clip range with the least expected squared error
(on all-MiniLM-L6-v2 it keeps more of the embedding than minmax; numbers in
``benchmarks/RESULTS.md``). mse and entropy depend on the number of levels and
on the scheme, so the pass takes insert-qdq's ``scheme`` and ``reduce-range``
(the CLI's ``--symmetric`` and ``--reduce-range`` set both).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import onnx_ir as ir
from ncc.errors import NccError
from ncc.passes.base import Pass, PassContext, PassResult, option
from ncc.passes.quant.observers import TensorStats
from ncc.passes.quant.ranges import CalibratedRanges, TensorRange
from ncc.targets import DEFAULT_TARGET, get_target

Method = Literal["minmax", "percentile", "entropy", "mse"]


@dataclass
class Calibration:
    method: str
    percentile: float
    stats: dict[str, TensorStats]

    def range(self, name: str, *, levels: int = 256, symmetric: bool = False) -> tuple[float, float]:
        """The range of ``name`` by the calibration method; by minmax where it was observed without a
        histogram (see :func:`ncc.passes.quant.plan.binned_values`)."""
        stats = self.stats[name]
        if not stats.histogram:
            return stats.minmax()
        if self.method == "percentile":
            return stats.percentile(self.percentile)
        if self.method == "entropy":
            return stats.entropy(levels)
        if self.method == "mse":
            return stats.mse(levels, symmetric=symmetric)
        return stats.minmax()


@dataclass(frozen=True)
class Calibrate(Pass):
    """Observe activation ranges of the float model on calibration data (needs --calib)."""

    name: ClassVar[str] = "calibrate"
    #: Needs ``ctx.data["calibration_data"]`` (the CLI's ``--calib``).
    uses_calibration: ClassVar[bool] = True
    method: Method = option(
        "mse", "range method: mse (least squared error), minmax, percentile or entropy (KL)"
    )
    percentile: float = option(99.999, "two-sided percentile kept by method=percentile", gt=0, max=100)
    samples: int = option(0, "use at most this many calibration samples (0: all)", min=0)
    batch_size: int = option(8, "samples per onnxruntime run", min=1)
    target: str = option(DEFAULT_TARGET, "target profile")
    scheme: Literal["asym", "sym", "scaled"] = option(
        "asym", "activation scheme the ranges are chosen for (as insert-qdq's)"
    )
    reduce_range: bool = option(False, "choose ranges for 7-bit activations (as insert-qdq's reduce-range)")
    op_types: tuple[str, ...] = option(
        (), "op types insert-qdq quantizes (as its op-types; empty: the target profile's)"
    )
    reference_samples: int = option(
        8, "keep the graph outputs on this many samples for min-cosine (0: none)", min=0
    )

    def requires(self, model: ir.Model) -> None:
        if self.op_types:
            from ncc.passes.quant.plan import ROLES, check_op_types

            check_op_types(self.op_types, ROLES)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from ncc.passes.quant.calibration import (
            FloatReference,
            cache_file_for,
            collect_statistics,
            stats_cache_file,
        )
        from ncc.passes.quant.plan import binned_values, observed_values, smoothable

        data = ctx.data.get("calibration_data")
        if data is None:
            raise NccError("pass 'calibrate' needs calibration data; give it with --calib DATA.")
        if self.samples:
            data.max_samples = self.samples
        values = observed_values(model.graph, get_target(self.target), self.op_types)
        if not values:
            raise NccError("nothing to calibrate: the model has no quantizable operators.")
        # per-channel ranges where smooth-quant may migrate outliers into the weights
        axes = {name: -1 for name in smoothable(model.graph)}
        lean = frozenset(values) - binned_values(model.graph, get_target(self.target))
        cache = Path(ctx.cache_dir) / "calibration" if ctx.cache_dir else None
        histograms = self.method != "minmax"  # binning is most of the statistics' cost
        cache_file = None
        if cache is not None:
            full = stats_cache_file(model, values, data, cache, axes=axes, minmax_only=lean)
            cache_file, histograms = cache_file_for(full, histograms)
        cached = cache_file is not None and cache_file.is_file()
        reference = FloatReference(self.reference_samples) if self.reference_samples else None
        stats = collect_statistics(
            model,
            values,
            data,
            batch_size=self.batch_size,
            cache_file=cache_file,
            progress=ctx.data.get("progress", True),
            axes=axes,
            reference=reference,
            histograms=histograms,
            minmax_only=lean,
        )
        calibration = Calibration(self.method, self.percentile, stats)
        levels = 128 if self.reduce_range else 256
        ranges = CalibratedRanges(
            self.method,
            levels,
            self.scheme,
            percentile=self.percentile if self.method == "percentile" else None,
            op_types=self.op_types,
            target=self.target,
        )
        for name in sorted(stats):
            tensor = stats[name]
            if tensor.count == 0:
                continue  # nothing finite observed: no range (insert-qdq keeps its readers float)
            if tensor.sentinel_count:  # never quantized; its range is recorded as observed
                lo, hi = tensor.minmax()
            else:
                # scaled: insert-qdq makes a signed tensor s8 symmetric on the larger side of this range, or
                # u8 with a zero point where every integer reader can fold one (1x1 convolutions, linears)
                lo, hi = calibration.range(name, levels=levels, symmetric=self.scheme == "sym")
            ranges.tensors[name] = TensorRange(
                lo, hi, tensor.sentinel_count, tensor.channel_min, tensor.channel_max
            )
        ranges.write(model.graph)
        if reference is not None and reference.complete:
            ctx.data["float_reference"] = reference
        sentinels = sorted(n for n, s in stats.items() if s.sentinel_count)
        notes = [
            f"calibration: {len(stats)} tensors observed, method {self.method}"
            + (f" (p={self.percentile})" if self.method == "percentile" else "")
        ]
        if sentinels:
            notes.append(
                f"{len(sentinels)} tensors carry masking sentinels (|x| >= 1e30), e.g. {sentinels[0]}"
            )
        if cached:
            notes.append(f"statistics reused from the cache in {cache}")
        return PassResult(
            modified=True,
            stats={
                "tensors observed": len(stats),
                "with sentinels": len(sentinels),
                "from cache": int(cached),
            },
            notes=notes,
        )
