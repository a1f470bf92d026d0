"""Check an emitted model on OpenVINO: which quantized layers its CPU plugin really runs in int8 or int4.

OpenVINO reads ncc's QDQ ONNX as it is; its low-precision transformations turn each
DequantizeLinear -> Conv/MatMul/Gemm -> QuantizeLinear group into an int8 layer when the pattern
fits, and silently run it in floating point (bf16 or f32) when it does not. A weight-only layer
(``w4``/``w8``: a MatMulNBits, or a blocked DequantizeLinear -> MatMul) becomes a FullyConnected
layer that reads the packed weight and reports the weight's precision (u4/i4/u8/i8) as its own; by
default OpenVINO also quantizes such a layer's activations to int8 at run time, per group of input
channels (``DYNAMIC_QUANTIZATION_GROUP_SIZE``), which the check notes: those numbers are not
onnxruntime's float-activation MatMulNBits'. This compiles the
artefact for the CPU the way a user will (default configuration) and reads the compiled graph back
(``compiled.get_runtime_model()``): each executed layer names the original layers it absorbed
(``originalLayersNames``) and the precision it runs in (``runtimePrecision``). Every convolution and
linear ncc quantized is matched to the executed layer that absorbed it, by node name, and counted as
int8 when that layer runs in u8/i8.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx_ir as ir
from ncc.backends.onnx.check import RuntimeCheck
from ncc.errors import NccError

COMPUTE = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "MatMulNBits"})
INT8 = frozenset({"u8", "i8"})
#: Runtime precisions of a weight-only layer that really reads its packed weight.
PACKED = frozenset({"u4", "i4", "u8", "i8"})
#: Executed layer types a convolution or linear can end up in (a fused attention block: ``Subgraph``).
LAYERS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution", "Subgraph")


def executed_layers(compiled) -> list[tuple[list[str], str, str]]:
    """The layers of an OpenVINO compiled model's executed graph, in order: (the source layers it absorbed
    and its own name, its layer type such as ``FullyConnected``, the precision it runs in such as ``u8``)."""
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else ""
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else ""
        original = info["originalLayersNames"].astype(str).split(",") if "originalLayersNames" in info else []
        layers.append((original + [op.get_friendly_name()], kind, precision))
    return layers


def check_on_openvino(path: str | Path, model: ir.Model, *, shown: str | Path | None = None) -> RuntimeCheck:
    """Compile ``path`` (the emitted file of ``model``: ONNX or OpenVINO IR) on OpenVINO's CPU plugin and
    classify ``model``'s quantized convolutions and linears; ``shown`` names the file in messages."""
    try:
        import openvino as ov
    except ImportError:
        raise NccError('--target openvino needs OpenVINO (pip install -e ".[openvino]").') from None
    names = Counter(n.name for n in model.graph)
    bf16 = model.metadata_props.get("ncc.precision") == "bf16"
    marked = [
        n
        for n in model.graph
        if n.op_type in COMPUTE
        and (
            n.metadata_props.get("ncc.quant", "").startswith(("int8", "w4", "w8"))
            or n.metadata_props.get("ncc.precision") == "bf16"
        )
    ]
    quantized = {n.name: n.op_type for n in marked if n.name and names[n.name] == 1}
    weight_only = {n.name for n in marked if n.metadata_props.get("ncc.quant", "").startswith(("w4", "w8"))}
    try:
        # an .xml carries the bf16 hint the backend wrote; an .onnx cannot: the user passes it, as here
        config = {"INFERENCE_PRECISION_HINT": "bf16"} if bf16 and Path(path).suffix == ".onnx" else {}
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    except Exception as err:  # OpenVINO raises RuntimeError with a long log; its first line says what
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NccError(f"OpenVINO cannot compile the emitted model {shown or path}: {first}") from None
    layers = executed_layers(compiled)
    check = RuntimeCheck(
        runtime=f"OpenVINO {ov.__version__.split('-')[0]} CPU", unnamed=len(marked) - len(quantized)
    )
    if bf16:
        check.label = "bf16 layers"
        check.low_label = "bf16 kernels"
    elif weight_only and weight_only >= set(quantized):
        check.low_label = "weight-only quantized kernels"
    # a float MatMul fused with its bias Add (or attention's scale Mul) is named after that op in
    # OpenVINO's executed graph, a layer producing a graph output after the output
    aliases = {
        n.name: {n.name}
        | ({n.outputs[0].name} if n.outputs[0].is_graph_output() else set())
        | {
            u.node.name
            for u in n.outputs[0].uses()
            if u.node.op_type in ("Add", "Mul", "Div") and u.node.name
        }
        for n in marked
        if n.name in quantized
    }
    for name, op in quantized.items():
        found = [
            (kind, precision)
            for absorbed, kind, precision in layers
            if kind in LAYERS
            and any(a == alias or a.startswith(alias + "/") for a in absorbed for alias in aliases[name])
        ]
        found.sort(key=lambda f: LAYERS.index(f[0]))  # a compute layer before a fused subgraph
        if not found:
            check.float_[name] = f"{op} not found among OpenVINO's executed layers"
            continue
        kind, precision = found[0]
        if (
            precision in INT8
            or (bf16 and precision == "bf16")
            or (name in weight_only and kind == "FullyConnected" and precision in PACKED)
        ):
            check.integer[name] = kind
            check.kernels[f"{kind} {precision}"] += 1
        else:
            check.float_[name] = f"{op} runs as {kind} in {precision or 'an unknown precision'}"
    packed = sum(1 for name in check.integer if name in weight_only)
    group = int(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")) if packed else 0
    if group:
        check.notes.append(
            f"OpenVINO quantizes the activations of these {packed} weight-only layers to int8 at run time, in "
            f"groups of {group} input channels (DYNAMIC_QUANTIZATION_GROUP_SIZE={group}; 0 keeps them in float)"
        )
    return check
