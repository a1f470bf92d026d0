"""What GPTQ and AWQ need from calibration: per-input statistics of the weight MatMuls.

For each MatMul input ``x`` (rows ``x_t`` of its last axis, ``K`` wide) one run
over the calibration data accumulates

- ``hessian = sum_t x_t^T x_t`` (GPTQ's ``H``, up to a factor), each batch's product in float32
  and the running sum in float64;
- ``abs_sum = sum_t |x_t|`` and the row count (AWQ's activation magnitude);
- ``sample``: up to ``sample_rows`` rows, taken with a fixed stride from every
  batch (AWQ's loss is measured on them).

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
    rows: int = 0
    hessian: np.ndarray | None = None
    abs_sum: np.ndarray | None = None
    sample: list[np.ndarray] | None = None

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)

    def rows_sample(self) -> np.ndarray:
        return np.concatenate(self.sample, axis=0) if self.sample else np.zeros((0, self.k), np.float32)


def merged(parts: list[InputStats]) -> InputStats:
    """One weight read by several activations: their statistics pooled (Hessians and sums add, samples join)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return InputStats(
        first.k, rows=sum(p.rows for p in parts),
        hessian=None if first.hessian is None else sum(p.hessian for p in parts),
        abs_sum=sum(p.abs_sum for p in parts),
        sample=None if first.sample is None else [a for p in parts for a in p.sample])


def accumulator_bytes(k: int, *, hessian: bool, sample_rows: int) -> int:
    return (8 * k * k if hessian else 0) + 8 * k + 4 * k * sample_rows


def collect(model: ir.Model, inputs: dict[str, int], data: CalibrationData, *, hessian: bool, sample_rows: int,
            batch_size: int = 4, progress: bool = False) -> dict[str, InputStats]:
    """Statistics of the float values ``inputs`` (name -> K) of ``model`` over ``data``."""
    from ncc.passes.quant.calibration import iterate_outputs

    stats = {name: InputStats(k, hessian=np.zeros((k, k)) if hessian else None, abs_sum=np.zeros(k),
                              sample=[] if sample_rows else None)
             for name, k in inputs.items()}
    feeds = {v.name for v in model.graph.inputs}
    fetched = [n for n in inputs if n not in feeds]
    total = data.num_samples
    for batch, outputs in iterate_outputs(model, fetched, data, batch_size=batch_size, progress=progress):
        for name, st in stats.items():
            array = batch[name] if name in feeds else outputs[name]
            x = np.asarray(array, dtype=np.float32).reshape(-1, st.k)
            if st.hessian is not None:  # float32 products per batch, summed across batches in float64
                st.hessian += x.T @ x
            st.abs_sum += np.abs(x).sum(axis=0, dtype=np.float64)
            if st.sample is not None:
                taken = sum(len(s) for s in st.sample)
                if taken < sample_rows:
                    batches_left = max(1, -(-(total or 1) // batch_size) - len(st.sample))
                    want = min(sample_rows - taken, -(-(sample_rows - taken) // batches_left))
                    stride = max(1, len(x) // max(want, 1))
                    st.sample.append(np.array(x[::stride][:want], copy=True))
            st.rows += len(x)
    return stats
