"""What GPTQ and AWQ need from calibration: per-input statistics of the weight MatMuls.

For each MatMul input ``x`` (rows ``x_t`` of its last axis, ``K`` wide) one run
over the calibration data accumulates

- ``hessian = sum_t x_t^T x_t`` (GPTQ's ``H``, up to a factor), each batch's product in float32
  and the running sum in float64;
- ``abs_sum = sum_t |x_t|`` and the row count (AWQ's activation magnitude).

GPTQ's error propagation and AWQ's scale and clip searches all measure a weight
change ``D`` by its output error over every calibration row, ``tr(D H D^T)``.

Memory holds one batch's activations plus these accumulators, never the
activations of the whole run. The passes call :func:`collect` chunk by chunk
(layers in graph order, each chunk's accumulators within a memory budget) on
the model as quantized so far, so later layers are calibrated on the outputs
of the already-quantized earlier ones, as GPTQ does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from ncc.passes.quant.calib_data import CalibrationData


@dataclass
class InputStats:
    k: int
    hessian: np.ndarray
    abs_sum: np.ndarray
    rows: int = 0

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)


def merged(parts: list[InputStats]) -> InputStats:
    """One weight read by several activations: their statistics pooled (Hessians and sums add, samples join)."""
    if len(parts) == 1:
        return parts[0]
    return InputStats(
        parts[0].k,
        hessian=sum(p.hessian for p in parts),
        abs_sum=sum(p.abs_sum for p in parts),
        rows=sum(p.rows for p in parts),
    )


def accumulator_bytes(k: int) -> int:
    return 8 * k * k + 8 * k


def collect(
    model: ir.Model,
    inputs: dict[str, int],
    data: CalibrationData,
    *,
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, InputStats]:
    """Statistics of the float values ``inputs`` (name -> K) of ``model`` over ``data``."""
    from ncc.passes.quant.calibration import iterate_outputs

    stats = {name: InputStats(k, hessian=np.zeros((k, k)), abs_sum=np.zeros(k)) for name, k in inputs.items()}
    feeds = {v.name for v in model.graph.inputs}
    fetched = [n for n in inputs if n not in feeds]
    for batch, outputs in iterate_outputs(
        model, fetched, data, batch_size=batch_size, progress=progress, prune=True
    ):
        for name, st in stats.items():
            array = batch[name] if name in feeds else outputs[name]
            x = np.asarray(array, dtype=np.float32).reshape(-1, st.k)
            st.hessian += x.T @ x  # float32 products per batch, summed across batches in float64
            st.abs_sum += np.abs(x).sum(axis=0, dtype=np.float64)
            st.rows += len(x)
    return stats
