"""The ``smooth-quant`` pass: move activation outliers into the weights before static INT8.

A transformer's LayerNorm output has a few channels far larger than the rest
(all-MiniLM-L6-v2 after attention: channel absmax up to 28 against a median
channel of 1.7), so one per-tensor u8 scale spends most of its 256 levels on
them. SmoothQuant (Xiao et al., 2023) divides channel ``j`` of the activation by

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

and multiplies row ``j`` of every weight that reads it by ``s_j``: ``X W =
(X / s)(s W)`` exactly, with the range moved from the activation, which has
one scale, to the weights, which have one per output channel.

Where a LayerNormalization produces the activation, the division is folded
into its scale and bias, so it costs nothing at run time; a reader that is not
such a MatMul (the residual Add) gets ``X`` back through one ``Mul`` by ``s``
and a shape-only reader keeps reading the rescaled tensor. Elsewhere (a GELU
output feeding the FFN's second MatMul, attention's context feeding its
output projection) ``insert-mul`` puts a float ``Mul`` by ``1/s`` between the
activation and its MatMuls; the runtimes fuse it into the quantize that
follows (OpenVINO) or run it as one cheap elementwise op (onnxruntime).

Where the target's runtime folds the activation function into the int8 linear
before it and quantizes its output in that kernel (Inductor: a GELU or ReLU
after a qlinear; ``TargetProfile.fused_activations``), a Mul between them
breaks the fusion: the linear writes float32 and a separate kernel multiplies
and quantizes. Such activations are left to ``insert-qdq``'s fallback
(:data:`~ncc.passes.quant.plan.SMOOTH_LATER` on their MatMuls), which smooths
one through a Mul only where the model misses its fidelity target without it,
before it would keep that MatMul in float (with ``min-cosine`` off they stay
unsmoothed).

The defaults, ``alpha = 0.9`` with ``insert-mul``, are the measured best on
all-MiniLM-L6-v2 (``benchmarks/RESULTS.md``): every MatMul then quantizes
within the ``int8`` pipeline's fidelity target, where the LayerNorm fold alone
at 0.5 left the FFN's second MatMul in float. At ``alpha = 0.5`` the inserted
Muls cost more than they gain (the GELU output's few huge channels, half moved
into the weights' rows, decide every column's weight scale); at 0.9 nearly all
of an activation's range moves into weights that have one scale per column.

Runs after ``calibrate``, which records per-channel ranges of exactly these
tensors (:func:`~ncc.passes.quant.plan.smoothable`) on the graph, and before
``insert-qdq``. The rescaled tensor's range is computed from the channel
ranges and written over the calibrated one: it is exact for ``minmax`` and
replaces the histogram's range for the other methods, whose histogram
describes the tensor before rescaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.rewrite import Rewriter
from ncc.passes.base import Pass, PassContext, PassResult, option
from ncc.passes.quant.plan import KEEP_FLOAT, SMOOTH_LATER, folds_into_layer_norm, smoothable
from ncc.passes.quant.ranges import CalibratedRanges, TensorRange
from ncc.targets import DEFAULT_TARGET, get_target

#: Readers that only look at the tensor's shape: they may read the rescaled tensor.
_SHAPE_ONLY = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class SmoothQuant(Pass):
    """Migrate per-channel activation outliers into the MatMul weights that read them."""

    name: ClassVar[str] = "smooth-quant"
    alpha: float = option(
        0.9,
        "migration strength: 0 leaves the activations alone, 1 moves all their range into the weights",
        min=0,
        max=1,
    )
    insert_mul: bool = option(
        True,
        "also smooth activations no LayerNorm produces, through a float Mul by 1/s before their MatMuls",
    )

    target: str = option(
        DEFAULT_TARGET,
        "target profile: activations its runtime fuses into the linear before are left to the fallback",
    )

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        calibration = CalibratedRanges.read(model.graph)
        if calibration is None:
            raise NccError("pass 'smooth-quant' needs calibrated ranges; run 'calibrate' before it.")
        fused = get_target(self.target).fused_activations
        rewriter = Rewriter(model, model.graph)
        spreads, restored, inserted, deferred = [], 0, 0, 0
        for matmuls in smoothable(model.graph).values():
            x = matmuls[0].inputs[0]
            fold = folds_into_layer_norm(x)
            if not fold and not self.insert_mul:
                continue
            if not fold and x.producer().op_type in fused:
                # a Mul here would cost the linear before its fused activation and u8 output: the fallback
                # smooths this activation only where the model misses its target without (insert-qdq)
                if _smoothing_scales(x, matmuls, calibration, self.alpha) is not None:
                    for node in matmuls:
                        node.metadata_props[SMOOTH_LATER] = repr(self.alpha)
                    deferred += 1
                continue
            done = smooth(rewriter, x, matmuls, calibration, self.alpha)
            if done is None:
                continue
            spreads.append(done[:2])
            inserted += done[2]
            restored += done[3]
        calibration.write(model.graph)
        notes = []
        if spreads:
            before, after = (float(np.median([p[i] for p in spreads])) for i in (0, 1))
            notes.append(
                f"smooth-quant: {len(spreads)} activations rescaled (alpha {self.alpha}), {inserted} of them "
                f"through a new Mul; largest over median channel range, median over tensors: "
                f"{before:.1f}x -> {after:.1f}x"
            )
        if deferred:
            notes.append(
                f"smooth-quant: {deferred} activations of functions {self.target} fuses into the linear before "
                "left to insert-qdq's fallback (a Mul would break that fusion)"
            )
        return PassResult(
            modified=bool(spreads) or bool(deferred),
            notes=notes,
            stats={
                "tensors smoothed": len(spreads),
                "folded into LayerNorm": len(spreads) - inserted,
                "Mul before MatMuls": inserted,
                "Mul restoring other readers": restored,
                **({"left to the fallback": deferred} if deferred else {}),
            },
        )


def smooth(
    rewriter: Rewriter, x: ir.Value, matmuls: list[ir.Node], calibration: CalibratedRanges, alpha: float
) -> tuple[float, float, bool, bool] | None:
    """Smooth ``x`` for the ``matmuls`` reading it: their weights' rows times ``s``, and ``x`` divided by
    ``s`` in the LayerNorm producing it, else through a new Mul; the rescaled tensor's range written to
    ``calibration``. Returns (spread before, spread after, a Mul inserted, a Mul restoring other readers),
    or None where the calibrated channel ranges do not allow it."""
    s = _smoothing_scales(x, matmuls, calibration, alpha)
    if s is None:
        return None
    stats = calibration.tensors[x.name]
    for node in matmuls:
        w = node.inputs[1].const_value.numpy()
        _replace_weight(rewriter, node, (w.astype(np.float32) * s[:, None]).astype(np.float32))
        node.metadata_props.pop(SMOOTH_LATER, None)
    restored = False
    if folds_into_layer_norm(x):
        _fold_into_layer_norm(rewriter, x.producer(), s)
        restored = _restore_for_other_readers(rewriter, x, matmuls, s, calibration)
        smoothed = x
    else:
        smoothed = _divide_before(rewriter, x, matmuls, s)
    lo = float(np.min(np.minimum(stats.channel_min / s, 0.0)))
    hi = float(np.max(np.maximum(stats.channel_max / s, 0.0)))
    calibration.tensors[smoothed.name] = TensorRange(lo, hi)
    act = _channel_absmax(stats)
    return _spread(act), _spread(act / s), smoothed is not x, restored


def smooth_later(model: ir.Model, name: str, calibration: CalibratedRanges) -> bool:
    """Smooth the activation ``name`` that ``smooth-quant`` left to the fallback (:data:`SMOOTH_LATER` on
    its MatMuls), through a Mul; False where ``model`` has no such activation."""
    matmuls = smoothable(model.graph).get(name, [])
    alphas = {node.metadata_props.get(SMOOTH_LATER) for node in matmuls}
    if not matmuls or None in alphas or len(alphas) != 1:
        return False
    return (
        smooth(Rewriter(model, model.graph), matmuls[0].inputs[0], matmuls, calibration, float(alphas.pop()))
        is not None
    )


def _smoothing_scales(
    x: ir.Value, matmuls: list[ir.Node], calibration: CalibratedRanges, alpha: float
) -> np.ndarray | None:
    """The per-channel ``s`` of ``x`` from its calibrated channel ranges and the weights' rows, or None."""
    stats = calibration.tensors.get(x.name)
    if stats is None or stats.channel_max is None or stats.sentinels:
        return None
    act = _channel_absmax(stats)
    weights = [m.inputs[1].const_value.numpy() for m in matmuls]
    if not np.all(np.isfinite(act)) or any(w.shape[0] != act.size for w in weights):
        return None
    return _scales(act, np.max([np.abs(w).max(axis=1) for w in weights], axis=0), alpha)


def _channel_absmax(stats: TensorRange) -> np.ndarray:
    return np.maximum(np.abs(stats.channel_min), np.abs(stats.channel_max))


def _scales(act: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """``act**alpha / wmax**(1-alpha)`` per channel; 1 where either side is zero (a dead channel)."""
    act, wmax = act.astype(np.float64), wmax.astype(np.float64)
    live = (act > 0) & (wmax > 0)
    s = np.ones_like(act)
    s[live] = act[live] ** alpha / wmax[live] ** (1.0 - alpha)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


def _spread(absmax: np.ndarray) -> float:
    median = float(np.median(absmax))
    return float(absmax.max()) / median if median > 0 else 1.0


def _fold_into_layer_norm(rewriter: Rewriter, norm: ir.Node, s: np.ndarray) -> None:
    """LayerNormalization's scale and bias divided by ``s``: its output becomes ``X / s``."""
    for index in (1, 2):
        if index >= len(norm.inputs) or norm.inputs[index] is None:
            continue
        old = norm.inputs[index]
        value = rewriter.constant(
            (old.const_value.numpy().astype(np.float32) / s).astype(np.float32), f"{old.name}_smoothed"
        )
        norm.replace_input_with(index, value)
        rewriter.drop_if_unused(old)


def _replace_weight(rewriter: Rewriter, node: ir.Node, array: np.ndarray) -> None:
    old = node.inputs[1]
    node.replace_input_with(1, rewriter.constant(array, f"{old.name}_smoothed"))
    rewriter.drop_if_unused(old)


def _restore_for_other_readers(
    rewriter: Rewriter, x: ir.Value, matmuls: list[ir.Node], s: np.ndarray, calibration
) -> bool:
    """Readers of ``x`` other than ``matmuls`` and shape-only ops read ``x * s`` (the original tensor)."""
    smoothed_readers = {id(m) for m in matmuls}
    others = [
        (node, index)
        for node, index in x.uses()
        if id(node) not in smoothed_readers and node.op_type not in _SHAPE_ONLY
    ]
    if not others:
        return False
    restored = _scaled(rewriter, x, s, [node for node, _ in others], "unsmooth")
    for node, index in others:
        node.replace_input_with(index, restored)
    original = calibration.tensors[x.name]  # x * s is the tensor before smoothing
    calibration.tensors[restored.name] = TensorRange(original.lo, original.hi)
    return True


def _divide_before(rewriter: Rewriter, x: ir.Value, matmuls: list[ir.Node], s: np.ndarray) -> ir.Value:
    """``matmuls`` read ``x * (1/s)`` from a new Mul; returns its output."""
    smoothed = _scaled(rewriter, x, (1.0 / s).astype(np.float32), matmuls, "smooth")
    # quantizing the Mul itself would quantize its input, outliers and all
    smoothed.producer().metadata_props[KEEP_FLOAT] = (
        "smooth-quant's scale: it reads the activation before smoothing"
    )
    for node in matmuls:
        node.replace_input_with(0, smoothed)
    return smoothed


def _scaled(
    rewriter: Rewriter, x: ir.Value, factor: np.ndarray, readers: list[ir.Node], suffix: str
) -> ir.Value:
    """A new ``Mul(x, factor)`` placed before the first of ``readers`` in graph order; returns its output."""
    rewriter.set_insertion_point(next(n for n in rewriter.graph if any(n is r for r in readers)))
    scale = rewriter.constant(factor, f"{x.name}_{suffix}_scale")
    mul = rewriter.create(
        "Mul", [x, scale], name=f"{x.name}_{suffix}", output_names=[rewriter.fresh_name(f"{x.name}_{suffix}")]
    )
    mul.outputs[0].type, mul.outputs[0].shape = x.type, x.shape
    return mul.outputs[0]
