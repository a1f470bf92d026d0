"""What Inductor really ran as int8: the torch counterpart of the onnxruntime check.

Inductor's x86 int8 lowering counts, per compile, the quantized convolutions and linears whose weight it
prepacked for oneDNN (``qconv_weight_prepack_matcher_count``, ``qlinear_weight_prepack_matcher_count``
in ``torch._dynamo.utils.counters["inductor"]``). A quantized layer its patterns did not match runs as
dequantize -> float op -> quantize: correct, and slower than the float model. The check compiles the
graph on the example inputs, reads the counters, and compares them with the layers ncc quantized.

Weight-only layers (``w4`` / ``w8``) need no pattern: the torch backend calls ATen's packed-weight kernels
(``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``) itself, and Inductor calls them as they are.
The check counts those calls in the graph it compiles, against the weight-only MatMuls of the IR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
from ncc.backends.torch.fx import is_weight, woq_kernel

WEIGHT_ONLY_KERNELS = ("_weight_int4pack_mm_for_cpu", "_weight_int8pack_mm")


@dataclass
class InductorCheck:
    runtime: str
    convs: int  # quantized by ncc
    linears: int
    int8_convs: int  # run by oneDNN int8 kernels
    int8_linears: int
    weight_only: int = 0  # weight-only quantized MatMuls in the IR
    weight_only_kernels: int = 0  # of those, run by ATen's packed-weight kernels
    #: weight-only layers the backend ran as float linears, with the reason
    weight_only_float: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.int8_convs, self.int8_linears) == (self.convs, self.linears) and (
            self.weight_only_kernels == self.weight_only
        )

    def summary(self) -> str:
        parts = []
        total, done = self.convs + self.linears, self.int8_convs + self.int8_linears
        if total or not self.weight_only:
            line = (
                f"{done}/{total} quantized convolutions and linears run as oneDNN int8 kernels "
                f"(qconv {self.int8_convs}, qlinear {self.int8_linears})"
            )
            if (self.int8_convs, self.int8_linears) != (self.convs, self.linears):
                line += (
                    f"; {self.convs - self.int8_convs} convolutions and {self.linears - self.int8_linears} "
                    "linears matched no int8 pattern and run as dequantize -> float -> quantize"
                )
            parts.append(line)
        if self.weight_only:
            line = f"{self.weight_only_kernels}/{self.weight_only} weight-only linears run as packed-weight kernels"
            if self.weight_only_float:
                reasons = sorted({why for _, why in self.weight_only_float})
                line += f"; {len(self.weight_only_float)} run as float linears ({'; '.join(reasons)})"
            parts.append(line)
        return f"on {self.runtime}: " + "; ".join(parts)


def quantized_layers(model: ir.Model) -> tuple[int, int, int]:
    """(convolutions, linears, weight-only MatMuls) ``model`` quantized: Conv, and Gemm or MatMul with a
    constant weight, in int8 or int8-dynamic; MatMuls a ``woq-*`` pass quantized."""
    convs = linears = 0
    for node in model.graph:
        if node.metadata_props.get("ncc.quant", "") in ("int8", "int8-dynamic"):
            if node.op_type == "Conv":
                convs += 1
            elif node.op_type == "Gemm" or (node.op_type == "MatMul" and is_weight(node.inputs[1])):
                linears += 1
    return convs, linears, len(_weight_only_matmuls(model))


def _weight_only_matmuls(model: ir.Model) -> list[ir.Node]:
    return [
        node
        for node in model.graph
        if node.op_type == "MatMul" and node.metadata_props.get("ncc.quant", "").startswith("w")
    ]


def float_weight_only(model: ir.Model) -> list[tuple[str, str]]:
    """The weight-only MatMuls the torch backend runs as float linears (no kernel takes them), with why."""
    out = []
    for node in _weight_only_matmuls(model):
        dq = node.inputs[1].producer()
        plan = woq_kernel(dq, node.inputs[0].shape) if dq is not None else None
        if plan is not None and plan.kernel is None:
            out.append((f"{node.name} (weight {dq.inputs[0].name})", plan.reason))
    return out


def kernel_calls(graph_module: Any) -> int:
    """Calls of ATen's weight-only kernels in ``graph_module``'s graph."""
    return sum(
        1
        for node in graph_module.graph.nodes
        if node.op == "call_function"
        and getattr(node.target, "__name__", "").split(".")[0] in WEIGHT_ONLY_KERNELS
    )


def inductor_check(
    run, example_inputs: tuple, model: ir.Model, graph_module: Any
) -> tuple[InductorCheck, Any]:
    """Call ``run`` (``graph_module`` compiled by Inductor, not yet run) on ``example_inputs`` and classify
    ``model``'s quantized layers by Inductor's counters and the graph's kernel calls; returns the check and
    the outputs."""
    from torch._dynamo.utils import counters

    counters["inductor"].clear()
    outputs = run(*example_inputs)
    return counted_check(model, graph_module), outputs


def counted_check(model: ir.Model, graph_module: Any | None, runtime: str = "Inductor") -> InductorCheck:
    """The check from Inductor's counters as its last compile left them (of ``graph_module``). Without the
    graph (an AOTInductor package holds compiled code), the weight-only kernels counted are those the
    backend's plan gave one (:func:`~ncc.backends.torch.fx.woq_kernel`, which its lowering follows)."""
    import torch
    from torch._dynamo.utils import counters

    seen = counters["inductor"]
    convs, linears, weight_only = quantized_layers(model)
    in_float = float_weight_only(model)
    kernels = kernel_calls(graph_module) if graph_module is not None else weight_only - len(in_float)
    return InductorCheck(
        runtime=f"{runtime} (torch {torch.__version__})",
        convs=convs,
        linears=linears,
        int8_convs=int(seen["qconv_weight_prepack_matcher_count"]),
        int8_linears=int(seen["qlinear_weight_prepack_matcher_count"]),
        weight_only=weight_only,
        weight_only_kernels=kernels,
        weight_only_float=in_float,
    )
