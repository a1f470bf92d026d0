"""``woq-awq``: activation-aware weight quantization (scale search and clip search)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.ir.ops import is_onnx_domain
from ncc.ir.rewrite import Rewriter
from ncc.passes.base import option
from ncc.passes.woq.base import CalibratedWeightOnlyPass
from ncc.passes.woq.kernels import awq_clip, awq_scales, rtn
from ncc.passes.woq.weights import WeightUse, read_weight_t


@dataclass(frozen=True)
class WoqAwq(CalibratedWeightOnlyPass):
    """Weight-only quantization by AWQ: per-channel scales that protect salient inputs, then clipping (needs --calib).

    For the weights sharing one activation ``x`` (Q/K/V, gate/up), a scale
    ``s = mean|x|^a`` is searched over ``a`` so that RTN of ``W * s`` changes
    ``x W`` least over all calibration rows (through ``x^T x``); with ``clip``
    each group's range is then shrunk where that lowers the group's output error. ``x`` is divided by
    ``s`` in the graph: folded into a producing ``Mul`` by a constant (an RMS or
    LayerNorm weight) when ``x`` has no other reader, else by a new ``Mul``.
    """

    name: ClassVar[str] = "woq-awq"
    algo: ClassVar[str] = "awq"

    grid: int = option(20, "exponents a = 0, 1/grid, ... tried for s = mean|x|^a", min=1)
    clip: bool = option(True, "search a clipping ratio per group after scaling")

    def quantize_group(self, rewriter, group, stats, spec):
        wts = [read_weight_t(use) for use in group]
        if len({a for use in group for a in use.activations}) == 1:
            s, a = awq_scales(wts, stats.hessian, stats.mean_abs, spec, grid=self.grid)
        else:  # one weight read with several activations: no single activation to divide by s
            s, a = np.ones(group[0].k, np.float32), 0.0
        inv = (1.0 / s).astype(np.float64)
        scaled_h = stats.hessian * inv[:, None] * inv[None, :]  # the Hessian of x / s
        if a:
            scale_activation(rewriter, group, (1.0 / s).astype(np.float32))
        for use, wt in zip(group, wts):
            ws = wt * s[None, :]
            ratio = awq_clip(ws, scaled_h, spec) if self.clip else None
            yield use, wt, rtn(ws, spec, clip=ratio), s
        del wts


def scale_activation(rewriter: Rewriter, group: list[WeightUse], inv_s: np.ndarray) -> None:
    """Make every MatMul of ``group`` read ``x * inv_s`` instead of its activation ``x``."""
    graph = rewriter.graph
    x = group[0].matmuls[0].inputs[0]
    readers = {id(n) for use in group for n in use.matmuls}
    only_group = all(id(node) in readers for node, _ in x.uses()) and x not in graph.outputs
    producer = x.producer()
    if only_group and producer is not None and producer.op_type == "Mul" and is_onnx_domain(producer):
        for i, operand in enumerate(producer.inputs):
            tensor = operand.const_value if operand is not None else None
            if (
                tensor is None
                or tensor.dtype != ir.DataType.FLOAT
                or tensor.shape[-1:] != (inv_s.size,)
                or any(d != 1 for d in tensor.shape[:-1])
            ):
                continue
            folded = (tensor.numpy() * inv_s).astype(np.float32)
            value = rewriter.constant(folded, f"{operand.name}_awq")
            producer.replace_input_with(i, value)
            if not operand.uses() and operand.is_initializer():
                graph.initializers.pop(operand.name)
            return
    scale = rewriter.constant(inv_s, f"{x.name}_awq_scale")
    first = group[0].matmuls[0]
    rewriter.set_insertion_point(first)
    mul = rewriter.create(
        "Mul",
        [x, scale],
        name=f"{first.name or x.name}_awq_Mul",
        output_names=[rewriter.fresh_name(f"{x.name}_awq")],
    )
    mul.outputs[0].type = x.type
    mul.outputs[0].shape = x.shape
    for use in group:
        for node in use.matmuls:
            node.replace_input_with(0, mul.outputs[0])
