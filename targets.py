"""Target profiles: which ops and formats a target runs fast, as data.

Passes read a profile to decide what to quantize and how; backends read it to
decide what to emit. Both import this module; it imports neither. Numbers
behind each choice are in FIELD-NOTES.md (measured with onnxruntime 1.32).
"""

from __future__ import annotations

from dataclasses import dataclass

from ncc.errors import NccError


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    #: Activation dtype that hits the fast integer kernels ("u8" or "s8").
    activation_dtype: str
    activation_symmetric: bool
    weight_dtype: str
    weight_per_channel: bool
    #: Compute ops quantized in static mode (inputs and weights quantized).
    static_ops: frozenset[str]
    #: Ops that move or select data without arithmetic: their output shares the input's scale.
    passthrough_ops: frozenset[str]
    #: Ops worth quantizing in dynamic (IntegerOps) mode.
    dynamic_ops: frozenset[str]
    #: Ops the runtime runs as integer kernels with float output (no output requantization).
    float_output_ops: frozenset[str]


X86_VNNI = TargetProfile(
    name="x86-vnni",
    description="x86-64 CPU with AVX512-VNNI, onnxruntime CPU execution provider",
    activation_dtype="u8",  # s8 activations miss the u8 x s8 VNNI path: 2-4x slower (FIELD-NOTES)
    activation_symmetric=False,
    weight_dtype="s8",
    weight_per_channel=True,
    static_ops=frozenset({
        "Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Concat", "GlobalAveragePool",
        "AveragePool", "Sigmoid", "LeakyRelu", "Softmax", "Resize", "Where",
    }),
    passthrough_ops=frozenset({
        "Reshape", "Transpose", "MaxPool", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split",
        "Gather", "Resize", "Pad", "DepthToSpace", "SpaceToDepth", "Identity",
    }),
    dynamic_ops=frozenset({"MatMul", "Gemm", "Gather"}),  # ConvInteger is 7-20x slower on CPU
    float_output_ops=frozenset({"MatMul"}),  # DQ -> MatMul runs as MatMulIntegerToFloat
)

TARGETS: dict[str, TargetProfile] = {X86_VNNI.name: X86_VNNI}
DEFAULT_TARGET = X86_VNNI.name


def get_target(name: str) -> TargetProfile:
    try:
        return TARGETS[name]
    except KeyError:
        raise NccError(f"unknown target {name!r}; known targets: {', '.join(sorted(TARGETS))}.") from None
