"""The shared skeleton of the ``woq-*`` passes.

``run`` finds the weight MatMuls, checks group sizes, raises the opset to 21
(blocked DequantizeLinear), then walks the weights in graph order, grouped by
the activation they multiply (Q/K/V share one). Calibrated algorithms get the
statistics of each group's activation from :mod:`ncc.passes.woq.activations`,
collected chunk by chunk on the model as quantized so far. Each weight is read,
quantized, written (spilled when it came from external data) and dropped
before the next is read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.rewrite import Rewriter
from ncc.ir.spill import SpillFile
from ncc.passes.base import Pass, PassContext, PassResult, option, regex
from ncc.passes.opset import raise_opset
from ncc.passes.quant.calib_data import validate
from ncc.passes.quant.calibration import model_inputs
from ncc.passes.woq.activations import InputStats, accumulator_bytes, collect, merged
from ncc.passes.woq.embeddings import embedding_gathers, quantize_embedding
from ncc.passes.woq.kernels import GroupSpec, QuantizedWeight, reconstruction_errors
from ncc.passes.woq.weights import (
    ALGO_KEY,
    WeightUse,
    check_group_sizes,
    gemms_as_matmuls,
    weight_matmuls,
    write_quantized,
)

BLOCKED_DQ_OPSET = 21
LAYERS_KEY = "woq_layers"


@dataclass
class LayerReport:
    """One row of the per-layer table (``--layer-report``)."""

    layer: str
    weight: str
    k: int
    n: int
    label: str
    algo: str
    weight_error: float
    output_error: float | None
    bytes_before: int
    bytes_after: int

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "layer",
        "weight",
        "k",
        "n",
        "label",
        "algo",
        "weight_error",
        "output_error",
        "bytes_before",
        "bytes_after",
    )

    def row(self) -> list[str]:
        out = self.output_error
        return [
            self.layer,
            self.weight,
            str(self.k),
            str(self.n),
            self.label,
            self.algo,
            f"{self.weight_error:.6g}",
            "" if out is None else f"{out:.6g}",
            str(self.bytes_before),
            str(self.bytes_after),
        ]


def _four_or_eight(bits: int) -> str | None:
    return None if bits in (4, 8) else f"must be 4 or 8, got {bits}"


def _not_one(group_size: int) -> str | None:
    return "must be 0 (one scale per output channel) or at least 2, got 1" if group_size == 1 else None


@dataclass(frozen=True)
class WeightOnlyPass(Pass):
    """Base of woq-rtn, woq-gptq and woq-awq (not registered itself)."""

    algo: ClassVar[str] = ""
    #: Needs ``ctx.data["calibration_data"]`` (the CLI's ``--calib``).
    uses_calibration: ClassVar[bool] = False

    bits: int = option(4, "bits per weight: 4 or 8", check=_four_or_eight)
    group_size: int = option(
        128,
        "input channels sharing one scale along K (0: one scale per output channel)",
        min=0,
        check=_not_one,
    )
    scheme: Literal["asym", "sym"] = option(
        "asym", "asym: unsigned codes and an integer zero point per group; sym: signed codes, no zero point"
    )
    partial_groups: bool = option(False, "allow a shorter last group when group-size does not divide K")
    include: tuple[str, ...] = option(
        (), "only MatMuls whose node or weight name matches one of these regexes", check=regex
    )
    exclude: tuple[str, ...] = option(
        (), "keep MatMuls whose node or weight name matches one of these in float", check=regex
    )
    embeddings: bool = option(
        False,
        "also quantize Gather embedding tables (RTN, groups along the hidden axis; "
        "GatherBlockQuantized after pack-int4)",
    )

    # -- what subclasses provide -------------------------------------------------------------------
    def quantize_group(
        self, rewriter: Rewriter, group: list[WeightUse], stats: InputStats | None, spec: GroupSpec
    ) -> Iterator[tuple[WeightUse, np.ndarray, QuantizedWeight, np.ndarray | None]]:
        """Yield ``(use, Wt, quantized, input_scale)`` per weight of ``group``; ``Wt = W^T`` as read.

        ``input_scale`` (AWQ) is the per-K factor the weight was multiplied by
        before quantization (the activation is divided by it in the graph).
        """
        raise NotImplementedError

    # -- the contract ------------------------------------------------------------------------------
    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        spec = GroupSpec(self.bits, self.group_size, self.scheme == "sym")
        graph = model.graph
        gemms_as_matmuls(model, self.include, self.exclude)
        uses = weight_matmuls(graph, self.include, self.exclude)
        if not uses and not self.include and _quantized_already(graph):
            # an earlier weight-only pass took every layer (a pipeline giving some layers their own
            # settings first, as the tuner's configurations do): nothing is left for this one
            return PassResult(
                modified=False, notes=[f"{self.name}: every weight MatMul is quantized already"]
            )
        if not uses:
            what = " matching the include/exclude filters" if self.include or self.exclude else ""
            raise NccError(
                f"no weight MatMuls{what} to quantize: {self.name} needs MatMuls (or Gemms) whose weight "
                "input is a constant float matrix."
            )
        tables = embedding_gathers(graph) if self.embeddings else {}
        check_group_sizes(
            [(u.layer, u.weight.name, u.k, u.n) for u in uses]
            + [
                (g[0].name or name, name, int(t.const_value.shape[1]), int(t.const_value.shape[0]))
                for name, (t, g) in tables.items()
            ],
            spec,
            self.partial_groups,
        )
        data = None
        if self.uses_calibration:
            data = ctx.data.get("calibration_data")
            if data is None:
                raise NccError(f"pass '{self.name}' needs calibration data; give it with --calib DATA.")
            if self.samples:
                data.max_samples = self.samples
            validate(data, model_inputs(model))  # names, dtypes and shapes, before any run
        blockers = raise_opset(model, BLOCKED_DQ_OPSET)
        if blockers:
            raise NccError(
                f"weight-only quantization writes blocked DequantizeLinear (opset {BLOCKED_DQ_OPSET}), and this "
                f"model's opset cannot be raised safely because of {', '.join(blockers)}."
            )
        external = any(
            isinstance(v.const_value, ir.ExternalTensor)
            for v in [u.weight for u in uses] + [t for t, _ in tables.values()]
        )
        spill = SpillFile("woq") if external else None
        rewriter = Rewriter(model, graph)
        layers: list[LayerReport] = []
        calib_seconds = 0.0
        for chunk in self._chunks(uses):
            stats: dict[str, InputStats] = {}
            if data is not None:
                start = time.perf_counter()
                stats = collect(
                    model,
                    {a: group[0].k for _, group in chunk for a in _activations(group)},
                    data,
                    batch_size=self.batch_size,
                    progress=ctx.data.get("progress", False),
                )
                calib_seconds += time.perf_counter() - start
            for _, group in chunk:
                st = merged([stats[a] for a in _activations(group)]) if stats else None
                for use, wt, qw, s in self.quantize_group(rewriter, group, st, spec):
                    layers.append(self._write(rewriter, use, wt, qw, s, st, spill))
                    del wt, qw
        for name, (table, gathers) in tables.items():
            error, before, after = quantize_embedding(rewriter, table, gathers, spec, spill)
            v, h = (int(d) for d in table.shape) if table.shape is not None else (0, 0)
            layers.append(
                LayerReport(
                    gathers[0].name or name, name, h, v, spec.label(), "rtn", error, None, before, after
                )
            )
        ctx.data.setdefault(LAYERS_KEY, []).extend(layers)
        return PassResult(
            modified=True, stats=self._stats(layers), notes=self._notes(layers, spec, calib_seconds)
        )

    # -- helpers -----------------------------------------------------------------------------------
    def _chunks(self, uses: list[WeightUse]) -> list[list[tuple[str, list[WeightUse]]]]:
        """Weights grouped by their activation, in graph order; calibrated passes split them by memory budget.

        A weight read by MatMuls on different activations forms a group of its own.
        """
        groups: dict[str, list[WeightUse]] = {}
        for use in uses:
            acts = use.activations
            key = acts[0] if len(acts) == 1 else f"{use.weight.name} (shared by {len(acts)} activations)"
            groups.setdefault(key, []).append(use)
        items = list(groups.items())
        if not self.uses_calibration:
            return [items]
        budget = self.calib_memory_mb << 20
        chunks: list[list[tuple[str, list[WeightUse]]]] = [[]]
        used = 0
        for name, group in items:
            need = len(_activations(group)) * accumulator_bytes(group[0].k)
            if chunks[-1] and used + need > budget:
                chunks.append([])
                used = 0
            chunks[-1].append((name, group))
            used += need
        return chunks

    def _write(
        self,
        rewriter: Rewriter,
        use: WeightUse,
        wt: np.ndarray,
        qw: QuantizedWeight,
        input_scale: np.ndarray | None,
        stats: InputStats | None,
        spill: SpillFile | None,
    ) -> LayerReport:
        weight_error, output_error = reconstruction_errors(
            wt, qw, input_scale=input_scale, hessian=None if stats is None else stats.hessian
        )
        before = int(wt.size * use.weight.const_value.dtype.itemsize)
        layer = use.layer
        written = write_quantized(
            rewriter,
            use,
            qw,
            algo=self.algo,
            error=output_error if output_error is not None else weight_error,
            spill=spill,
        )
        return LayerReport(
            layer,
            use.weight.name,
            use.k,
            use.n,
            qw.spec.label(),
            self.algo,
            weight_error,
            output_error,
            before,
            written,
        )

    @staticmethod
    def _stats(layers: list[LayerReport]) -> dict[str, int]:
        return {
            "weights quantized": len(layers),
            "bytes before": sum(r.bytes_before for r in layers),
            "bytes after": sum(r.bytes_after for r in layers),
        }

    def _notes(self, layers: list[LayerReport], spec: GroupSpec, calib_seconds: float) -> list[str]:
        before = sum(r.bytes_before for r in layers)
        after = sum(r.bytes_after for r in layers)
        kind = "output" if all(r.output_error is not None for r in layers) else "weight"
        errors = [(r.output_error if kind == "output" else r.weight_error, r.layer) for r in layers]
        mean = float(np.mean([e for e, _ in errors]))
        worst = sorted(errors, key=lambda t: -t[0])[:3]
        notes = [
            f"weight-only ({self.algo}, {spec.label()}): {len(layers)} weights; bytes "
            f"{before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({before / max(after, 1):.2f}x smaller)",
            f"relative {kind} error per layer: mean {mean:.4f}; worst "
            + ", ".join(f"{name} {e:.4f}" for e, name in worst),
        ]
        if calib_seconds:
            notes.append(f"calibration runs: {calib_seconds:.1f} s")
        return notes


def _activations(group: list[WeightUse]) -> list[str]:
    return list(dict.fromkeys(a for use in group for a in use.activations))


@dataclass(frozen=True)
class CalibratedWeightOnlyPass(WeightOnlyPass):
    """Base of the weight-only passes that read activations (woq-gptq, woq-awq): their calibration options."""

    uses_calibration: ClassVar[bool] = True

    samples: int = option(0, "use at most this many calibration samples (0: all)", min=0)
    batch_size: int = option(4, "samples per onnxruntime run", min=1)
    calib_memory_mb: int = option(
        512,
        "memory for the per-input statistics (x^T x) per calibration run; more layers per run when larger",
        min=1,
    )


def _quantized_already(graph: ir.Graph) -> bool:
    """Whether an earlier weight-only pass quantized MatMuls of ``graph`` (its nodes carry the mark)."""
    return any(ALGO_KEY in node.metadata_props for node in graph if node.op_type == "MatMul")
