"""The ``bf16-precision`` pass: which layers run in bfloat16 on the target, measured before it is promised.

bfloat16 keeps float32's exponent and 8 bits of mantissa: matrix products in bf16 with float32
accumulation (AMX, AVX512-BF16) run at several times float32's speed and lose little, while
accumulations across a whole tensor (normalizations, softmax, reductions) and range-sensitive
elementwise math (exp, log, pow, division) lose more. So:

- every Conv / ConvTranspose / MatMul / Gemm is marked ``ncc.precision = "bf16"``;
- normalizations, softmax, reductions and range-sensitive math are marked ``"fp32"`` by rule, with
  the reason in ``ncc.precision.why`` (OpenVINO's CPU plugin keeps them in f32 under its bf16 hint
  too: its runtime graph runs them as f32 MVN / Eltwise layers);
- with calibration data (``--calib``), the model with every bf16 layer emulated in onnxruntime (its
  inputs, weights and output rounded to bf16, accumulation in f32) is run against the float model on
  ``samples`` samples; below ``min-cosine`` the pass fails and names the layers that lose most, since
  OpenVINO's bf16 hint applies to the whole model (it offers no per-layer f32 switch that its CPU
  plugin honours from Python).

The model is marked ``ncc.precision = "bf16"``: the OpenVINO backend writes the hint into the IR it
saves (``runtime_options``), so ``core.compile_model("model.xml")`` runs it in bf16 with no option.
onnxruntime's CPU execution provider has no bf16 MatMul, Gemm or Conv kernels, so other targets are
refused in one sentence. On a CPU without AVX512-BF16 or AMX-BF16 the pass notes that bf16 will be
emulated and slower than f32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import ml_dtypes
import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.ops import is_onnx_domain
from ncc.ir.rewrite import Rewriter, constant_array
from ncc.passes.base import Pass, PassContext, PassResult, option
from ncc.targets import DEFAULT_TARGET, get_target

PRECISION_KEY = "ncc.precision"
WHY_KEY = "ncc.precision.why"
COMPUTE = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
#: Kept in f32 by rule: accumulations over a whole axis and range-sensitive math.
FP32_OPS = {
    "LayerNormalization": "a normalization (mean and variance accumulate over the axis)",
    "BatchNormalization": "a normalization (mean and variance accumulate over the axis)",
    "InstanceNormalization": "a normalization (mean and variance accumulate over the axis)",
    "GroupNormalization": "a normalization (mean and variance accumulate over the axis)",
    "Softmax": "softmax (exponentials summed over the axis)",
    "LogSoftmax": "softmax (exponentials summed over the axis)",
    "ReduceMean": "a reduction", "ReduceSum": "a reduction", "ReduceSumSquare": "a reduction",
    "ReduceL2": "a reduction", "ReduceLogSumExp": "a reduction", "CumSum": "a running sum",
    "Exp": "range-sensitive math", "Log": "range-sensitive math", "Pow": "range-sensitive math",
    "Sqrt": "range-sensitive math", "Reciprocal": "range-sensitive math", "Div": "range-sensitive math",
}  # fmt: skip
#: Targets that run bf16, and how.
BF16_TARGETS = {"openvino": "OpenVINO's CPU plugin with INFERENCE_PRECISION_HINT=bf16"}


@dataclass(frozen=True)
class Bf16Precision(Pass):
    """Mark convolutions and linears to run in bfloat16 (the rest by rule in f32), measured on calibration data."""

    name: ClassVar[str] = "bf16-precision"
    uses_calibration: ClassVar[bool] = True
    target: str = option(DEFAULT_TARGET, "target profile (bf16 runs on: openvino)")
    min_cosine: float = option(
        0.999,
        "fail when the emulated bf16 model's outputs fall below this cosine (0: do not measure)",
        min=0,
        max=1,
    )
    samples: int = option(8, "calibration samples the emulation is measured on", min=1)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        target = get_target(self.target)
        if target.name not in BF16_TARGETS:
            raise NccError(
                f"bf16 runs on --target openvino: onnxruntime's CPU execution provider (target {target.name}) "
                "has no bf16 MatMul, Gemm or Conv kernels, and the torch backend's bf16 is not built yet."
            )
        float_model = model.clone() if self.min_cosine > 0 else None
        counts = {"bf16": 0, "fp32": 0}
        for node in model.graph:
            if not is_onnx_domain(node):
                continue
            if node.op_type in COMPUTE:
                node.metadata_props[PRECISION_KEY] = "bf16"
                counts["bf16"] += 1
            elif node.op_type in FP32_OPS:
                node.metadata_props[PRECISION_KEY] = "fp32"
                node.metadata_props[WHY_KEY] = f"by rule: {FP32_OPS[node.op_type]}"
                counts["fp32"] += 1
        if not counts["bf16"]:
            raise NccError("bf16: the model has no Conv, MatMul or Gemm to run in bfloat16.")
        model.metadata_props[PRECISION_KEY] = "bf16"
        stats = {"layers in bf16": counts["bf16"], "ops kept in f32 by rule": counts["fp32"]}
        notes = [
            f"bf16: {counts['bf16']} Conv/MatMul/Gemm layers in bf16, {counts['fp32']} ops in f32 by rule "
            f"(normalizations, softmax, reductions, exp/log/pow/div), on {BF16_TARGETS[target.name]}"
        ]
        if not host_has_bf16():
            notes.append(
                "this CPU has no AVX512-BF16 or AMX-BF16: bf16 is emulated here and runs slower than f32 "
                "(the artefact is still right for a CPU that has them)"
            )
        data = ctx.data.get("calibration_data")
        if float_model is not None and data is not None:
            cosine, worst = _measure(float_model, model, data, self.samples)
            stats["output cosine (bf16 emulated, calibration)"] = round(cosine, 6)
            notes.append(
                f"bf16: output cosine {cosine:.6f} on {self.samples} calibration samples (bf16 emulated in "
                f"onnxruntime against the float model; min-cosine {self.min_cosine})"
            )
            if cosine < self.min_cosine:
                raise NccError(
                    f"bf16 loses too much: output cosine {cosine:.5f} < min-cosine {self.min_cosine} on "
                    f"{self.samples} calibration samples (emulated); the layers that lose most: {', '.join(worst)}; "
                    "OpenVINO's bf16 hint applies to the whole model, so use int8 with --exclude for them."
                )
        elif float_model is not None:
            notes.append("bf16: fidelity not measured (no --calib)")
        return PassResult(modified=True, stats=stats, notes=notes)


def host_has_bf16() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: nothing to say
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _measure(float_model: ir.Model, marked: ir.Model, data, samples: int) -> tuple[float, list[str]]:
    """(worst output cosine of the bf16 emulation against float, the 3 bf16 layers adding most error)."""
    from ncc.metrics import relative_l2_error, token_masks, worst_output_cosine
    from ncc.passes.quant import fallback

    emulated = marked.clone()
    layers = _emulate(emulated)
    feeds = fallback.samples(data, samples)
    outputs = [v.name for v in float_model.graph.outputs]
    names = [n.outputs[0].name for n in layers]
    ref = fallback.run(float_model, feeds, outputs + names)
    got = fallback.run(emulated, feeds, outputs + names)
    masks = token_masks(feeds)
    cosine = worst_output_cosine({k: ref[k] for k in outputs}, {k: got[k] for k in outputs}, outputs, masks)
    errors = sorted(
        ((relative_l2_error(ref[n], got[n], masks), node.name or n) for n, node in zip(names, layers))
    )
    return cosine, [name for _, name in errors[::-1][:3]]


def _emulate(model: ir.Model) -> list[ir.Node]:
    """Round the inputs, weights and output of every bf16 layer of ``model`` to bfloat16 (Cast there and
    back), in place; returns those layers."""
    rewriter = Rewriter(model, model.graph)
    layers = [n for n in model.graph if n.metadata_props.get(PRECISION_KEY) == "bf16"]
    for node in layers:
        rewriter.set_insertion_point(node)
        for index, value in enumerate(node.inputs):
            if value is None or value.type is None or value.dtype != ir.DataType.FLOAT:
                continue
            array = constant_array(value)
            if array is not None:
                rounded = array.astype(ml_dtypes.bfloat16).astype(np.float32)
                node.replace_input_with(
                    index, rewriter.constant(rounded, rewriter.fresh_name(f"{value.name}_bf16"))
                )
            else:
                node.replace_input_with(index, _round_trip(rewriter, value)[1])
        output = node.outputs[0]
        rewriter.set_insertion_point(node, after=True)
        down, rounded = _round_trip(rewriter, output)
        rewriter.replace_uses_if(output, rounded, lambda user, down=down: user is not down)
    return layers


def _round_trip(rewriter: Rewriter, value: ir.Value) -> tuple[ir.Node, ir.Value]:
    """(the Cast to bf16 of ``value``, the value cast back to f32)."""
    down = rewriter.create(
        "Cast", [value], {"to": ir.DataType.BFLOAT16}, name=rewriter.fresh_name("bf16_cast")
    )
    up = rewriter.create(
        "Cast", [down.outputs[0]], {"to": ir.DataType.FLOAT}, name=rewriter.fresh_name("bf16_uncast")
    )
    return down, up.outputs[0]
