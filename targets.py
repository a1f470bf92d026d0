"""Target profiles: which ops and formats a target runs fast, as data.

Passes read a profile to decide what to quantize and how; backends read it to
decide what to emit. Both import this module; it imports neither (op families
come from :mod:`ncc.ir.ops`). The measurements behind each choice are in
``benchmarks/RESULTS.md`` and the shared field notes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from ncc.errors import NccError
from ncc.ir.ops import PASSTHROUGH


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
    #: Of those, ops quantized by default only where an input already comes out of an integer
    #: kernel: elsewhere a Q/DQ pair costs a float -> int8 -> float round trip and accuracy for
    #: nothing (a transformer's residual Add, LayerNorm-side Mul).
    island_ops: frozenset[str]
    #: Ops that move or select data without arithmetic: their output shares the input's scale
    #: (a subset of :data:`ncc.ir.ops.PASSTHROUGH`, which the QOperator legalization can run in 8 bits).
    passthrough_ops: frozenset[str]
    #: Ops worth quantizing in dynamic (IntegerOps) mode.
    dynamic_ops: frozenset[str]
    #: Ops the runtime runs as integer kernels with float output (no output requantization).
    float_output_ops: frozenset[str]
    #: Whether the u8 x s8 kernels add products in int16 pairs (AVX2 vpmaddubsw, no VNNI): 255·127·2
    #: overflows int16, so paired weights must keep their same-sign sum within 128
    #: (:mod:`ncc.passes.quant.pairs`), or within ±63 each where the op's pairing is not known.
    pairwise_int16: bool = False
    #: Whose int8 kernels run the artefact: ``onnxruntime`` (MLAS; its pairs are what :mod:`ncc.passes.quant.
    #: pairs` measured), or ``onednn`` (Inductor, TensorFlow). oneDNN picks its int8 code path on the CPU it
    #: runs on: on x86 without VNNI it pairs a linear's K and a convolution's input channels at each kernel
    #: tap (an odd channel count pads each tap), never a depthwise filter's, so :func:`get_target` gives
    #: such a profile ``pairwise_int16`` where the compiling CPU has no VNNI.
    int8_kernels: str = "onnxruntime"
    #: Whether a convolution reading s8 activations has its weights halved by the kernel on x86 without
    #: VNNI (oneDNN's s8 x s8 convolutions in TensorFlow, measured: a code of 3 acts as 4): such weights
    #: keep 7 bits, which the backend stores doubled, so that halving them is exact.
    signed_conv_halves_weights: bool = False
    #: Whether a MatMul of two activations (attention's scores and context) runs as an integer kernel;
    #: where it does not, it stays float (a Q/DQ pair around it would only cost).
    activation_matmul: bool = True
    #: Activation functions the runtime folds into the int8 linear before them, quantizing their output in
    #: that kernel (Inductor's qlinear/qconv post-ops): a float Mul between such a function and its
    #: quantize breaks the fusion, so ``smooth-quant`` leaves these activations to the fallback, which
    #: smooths one through a Mul only where the model misses its target without (cheaper than float).
    fused_activations: frozenset[str] = frozenset()
    #: How quantize-dynamic spells an int8 MatMul: ``standard`` (MatMulInteger, which onnxruntime fuses),
    #: or ``qdq`` (run-time Q/DQ around a float MatMul, which Inductor lowers like PT2E's dynamic graphs).
    dynamic_form: str = "standard"
    #: How pack-int4 lays out weight-only quantized MatMuls: ``matmulnbits`` (onnxruntime's kernel) or
    #: ``qdq`` (standard blocked DequantizeLinear, which the torch backend packs for its int4/int8 kernels).
    woq_format: str = "matmulnbits"
    #: The activation scheme calibrate and insert-qdq use for this target: ``asym`` (zero points), or
    #: ``scaled`` (zero point 0: u8 where a tensor is non-negative, s8 symmetric elsewhere).
    activation_scheme: str = "asym"
    #: Whether an integer convolution may read one 8-bit type and write the other (u8 in, s8 out).
    mixed_io_types: bool = False
    #: Whether insert-qdq quantizes graph outputs too (every kernel of a full-integer runtime needs an
    #: output scale, the last layer's included).
    quantize_graph_outputs: bool = False
    #: Output grids the runtime's integer kernels fix, by op type: ``(op, scale, u8 zero point)``. TFLite's
    #: int8 SOFTMAX and LOGISTIC write 1/256 steps from -128 (u8: from 0); a calibrated scale there costs a
    #: second rounding, a requantization the converter appends after the kernel.
    fixed_outputs: tuple[tuple[str, float, int], ...] = ()
    #: Whether a layer between quantized tensors can stay float (min-cosine's fallback). TFLite's converter
    #: quantizes every op whose inputs and outputs carry ranges, so there it cannot.
    float_fallback: bool = True
    #: Whether the int8 pipeline stores embedding tables (Gather on a constant table) in int8, one scale per
    #: row (``quantize-embeddings``): the artefact's runtime reads ``Gather -> Cast -> Mul`` as plain ops.
    int8_embeddings: bool = False


#: Ops x86 runs as integer kernels only next to other integer kernels (a Q/DQ round trip around an
#: island costs more than it saves).
_X86_ISLANDS = frozenset(
    {
        "Add",
        "Mul",
        "Concat",
        "GlobalAveragePool",
        "AveragePool",
        "Sigmoid",
        "LeakyRelu",
        "Softmax",
        "Resize",
        "Where",
    }
)

X86_VNNI = TargetProfile(
    name="x86-vnni",
    description="x86-64 CPU with AVX512-VNNI, onnxruntime CPU execution provider",
    activation_dtype="u8",  # s8 activations miss the u8 x s8 VNNI path: 2-4x slower (FIELD-NOTES)
    activation_symmetric=False,
    weight_dtype="s8",
    weight_per_channel=True,
    static_ops=frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"}) | _X86_ISLANDS,
    island_ops=_X86_ISLANDS,
    passthrough_ops=PASSTHROUGH,
    dynamic_ops=frozenset({"MatMul", "Gemm", "Gather"}),  # ConvInteger is 7-20x slower on CPU
    float_output_ops=frozenset({"MatMul"}),  # DQ -> MatMul runs as MatMulIntegerToFloat
    int8_embeddings=True,
)

X86_AVX2 = replace(
    X86_VNNI,
    name="x86-avx2",
    description="x86-64 CPU with AVX2 but no VNNI, onnxruntime CPU execution provider",
    pairwise_int16=True,  # measured: unconstrained ±127 weights put QLinearConv/MatMul 2-14 steps off fake-quant
)

OPENVINO = replace(
    X86_VNNI,
    name="openvino",
    # measured (benchmarks/bench_runtimes.py): OpenVINO's CPU plugin runs the x86-vnni QDQ form as it is,
    # every quantized convolution and linear as a u8 layer, 2-3x faster than onnxruntime runs the same file
    description="OpenVINO CPU plugin reading ncc's QDQ ONNX: int8 layers, bf16 elsewhere on AMX",
    # OpenVINO fuses attention (scores, softmax, context) into one bf16/f32 subgraph: the int8 Q/DQ
    # x86-vnni puts on those activation-by-activation MatMuls never runs in int8 there (its check shows it)
    activation_matmul=False,
    int8_kernels="onednn",  # measured: OpenVINO's CPU plugin pairs as Inductor and TensorFlow do
)

INDUCTOR = TargetProfile(
    name="inductor",
    description="PyTorch Inductor on x86 (oneDNN int8 convolutions and linears, freezing)",
    activation_dtype="u8",  # int8 activations match Inductor's patterns but fail at run time (FIELD-NOTES)
    activation_symmetric=False,
    weight_dtype="s8",
    weight_per_channel=True,
    static_ops=frozenset({"Conv", "Gemm", "MatMul"}),  # onednn qconv_pointwise / qlinear_pointwise
    island_ops=frozenset(),
    passthrough_ops=PASSTHROUGH,
    dynamic_ops=frozenset({"MatMul", "Gemm"}),
    int8_kernels="onednn",
    # a quantize after a convolution fuses into it (u8 output, int8 between layers); a linear's output
    # mostly feeds float ops (a residual Add, LayerNorm, GELU): requantizing it would only add error
    float_output_ops=frozenset({"MatMul", "Gemm"}),
    activation_matmul=False,  # Inductor lowers int8 linears (a constant weight), no int8 batched matmul
    fused_activations=frozenset({"Relu", "Gelu", "Clip", "HardSwish"}),  # qlinear_pointwise unary post-ops
    dynamic_form="qdq",  # choose_qparams -> quantize -> dequantize -> linear: oneDNN's dynamic int8 linear
    woq_format="qdq",
)

AOTI = replace(
    INDUCTOR,
    name="aoti",
    description="AOTInductor package for x86 (Inductor's int8 lowering compiled ahead of time, no Python graph)",
)

TF = TargetProfile(
    name="tf",
    description="TensorFlow SavedModel on x86: oneDNN quantized convolutions and matmuls (graph mode)",
    # oneDNN's quantized kernels in TensorFlow take SCALED-mode tensors (no zero point): u8 after a ReLU, s8
    # symmetric elsewhere; any u8/s8 mix of input and output per convolution
    activation_dtype="u8",
    activation_symmetric=False,
    activation_scheme="scaled",
    mixed_io_types=True,
    weight_dtype="s8",
    weight_per_channel=True,
    # _FusedQuantizedConv2D / _FusedQuantizedDepthwiseConv2D, _QuantizedMatMul
    static_ops=frozenset({"Conv", "Gemm", "MatMul"}),
    island_ops=frozenset(),
    passthrough_ops=frozenset(
        {"MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity"}
    ),
    dynamic_ops=frozenset({"MatMul", "Gemm"}),
    float_output_ops=frozenset({"MatMul", "Gemm"}),  # _QuantizedMatMul dequantizes its output in the kernel
    int8_kernels="onednn",
    signed_conv_halves_weights=True,
    activation_matmul=False,  # no int8 batched matmul kernel in stock TensorFlow
)

TFLITE = replace(
    X86_VNNI,
    name="tflite",
    description="TensorFlow Lite (LiteRT with XNNPACK): a full-integer .tflite, float only at its inputs and outputs",
    # the converter needs a range on every tensor to quantize the op reading it: every op TFLite has an int8
    # kernel for is quantized, wherever it is, and so is the last layer's output (u8 asymmetric maps onto
    # TFLite's int8 by shifting the zero point by 128)
    static_ops=frozenset({"Conv", "MatMul", "Gemm"}) | _X86_ISLANDS,
    island_ops=frozenset(),
    float_output_ops=frozenset(),
    quantize_graph_outputs=True,
    float_fallback=False,
    fixed_outputs=(("Softmax", 1 / 256, 0), ("Sigmoid", 1 / 256, 0)),
    int8_embeddings=False,  # the converter reads a float table, not the int8 one's Cast and Mul
)

TARGETS: dict[str, TargetProfile] = {
    t.name: t for t in (X86_VNNI, X86_AVX2, OPENVINO, INDUCTOR, AOTI, TF, TFLITE)
}
#: Targets whose artefact is a torch program (``.pt2``), not an ONNX model.
TORCH_TARGETS = frozenset({INDUCTOR.name, AOTI.name})
#: Targets whose artefact is a TensorFlow SavedModel folder.
TF_TARGETS = frozenset({TF.name})
#: ``host`` resolves to the profile of the CPU ncc runs on (see :func:`host_target`).
DEFAULT_TARGET = "host"


@cache
def host_target() -> str:
    """The profile matching this machine's CPU: VNNI when the CPU has it, AVX2 otherwise."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return X86_VNNI.name
    return X86_VNNI.name if {"avx512_vnni", "avx_vnni"} & set(flags) else X86_AVX2.name


def get_target(name: str) -> TargetProfile:
    """The profile called ``name``; ``host`` is this CPU's onnxruntime profile, and a oneDNN profile pairs
    its weights where this CPU has no VNNI (:attr:`TargetProfile.int8_kernels`)."""
    if name == "host":
        name = host_target()
    try:
        profile = TARGETS[name]
    except KeyError:
        raise NccError(
            f"unknown target {name!r}; known targets: host, {', '.join(sorted(TARGETS))}."
        ) from None
    if profile.int8_kernels == "onednn" and host_target() == X86_AVX2.name:
        profile = replace(profile, pairwise_int16=True)
    return profile
