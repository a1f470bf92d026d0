"""What Inductor really ran as int8: the torch counterpart of the onnxruntime check.

Inductor's x86 int8 lowering counts, per compile, the quantized convolutions and linears whose weight it
prepacked for oneDNN (``qconv_weight_prepack_matcher_count``, ``qlinear_weight_prepack_matcher_count``
in ``torch._dynamo.utils.counters["inductor"]``). A quantized layer its patterns did not match runs as
dequantize -> float op -> quantize: correct, and slower than the float model. The check compiles the
graph on the example inputs, reads the counters, and compares them with the layers ncc quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx_ir as ir
from ncc.backends.torch.fx import is_weight


@dataclass
class InductorCheck:
    runtime: str
    convs: int  # quantized by ncc
    linears: int
    int8_convs: int  # run by oneDNN int8 kernels
    int8_linears: int

    @property
    def ok(self) -> bool:
        return (self.int8_convs, self.int8_linears) == (self.convs, self.linears)

    def summary(self) -> str:
        total, done = self.convs + self.linears, self.int8_convs + self.int8_linears
        line = (
            f"on {self.runtime}: {done}/{total} quantized convolutions and linears run as oneDNN int8 kernels "
            f"(qconv {self.int8_convs}, qlinear {self.int8_linears})"
        )
        if not self.ok:
            line += (
                f"; {self.convs - self.int8_convs} convolutions and {self.linears - self.int8_linears} linears "
                "matched no int8 pattern and run as dequantize -> float -> quantize"
            )
        return line


def quantized_layers(model: ir.Model) -> tuple[int, int]:
    """(convolutions, linears) ``model`` quantized: Conv, and Gemm or MatMul with a constant weight."""
    convs = linears = 0
    for node in model.graph:
        if node.metadata_props.get("ncc.quant") not in ("int8", "int8-dynamic"):
            continue
        if node.op_type == "Conv":
            convs += 1
        elif node.op_type == "Gemm" or (node.op_type == "MatMul" and is_weight(node.inputs[1])):
            linears += 1
    return convs, linears


def inductor_check(run, example_inputs: tuple, model: ir.Model) -> tuple[InductorCheck, Any]:
    """Call ``run`` (an Inductor-compiled callable, not yet run) on ``example_inputs`` and classify ``model``'s
    quantized layers by Inductor's counters; returns the check and the outputs."""
    import torch
    from torch._dynamo.utils import counters

    counters["inductor"].clear()
    outputs = run(*example_inputs)
    seen = counters["inductor"]
    convs, linears = quantized_layers(model)
    check = InductorCheck(
        runtime=f"Inductor (torch {torch.__version__})",
        convs=convs,
        linears=linears,
        int8_convs=int(seen["qconv_weight_prepack_matcher_count"]),
        int8_linears=int(seen["qlinear_weight_prepack_matcher_count"]),
    )
    return check, outputs
