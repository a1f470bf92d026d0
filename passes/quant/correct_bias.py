"""The ``correct-bias`` pass: remove the mean output shift that quantization adds.

Rounding weights is not zero-mean per output channel: a channel whose 9
depthwise weights all round up is systematically too large, and
MobileNet/EfficientNet-style networks compound such shifts layer after layer.
Empirical bias correction (Nagel et al., "Data-Free Quantization", 2019,
section 4.2, measured instead of predicted) runs the quantized model on
calibration samples with, beside every quantized Conv and Gemm, a float twin
reading the same dequantized input with the float weights, and adds the mean
difference per output channel

    b' = b + E[y_float_twin - y_quantized]       (mean over batch and spatial axes)

to the int32 bias, re-rounded on the bias's own scale. Each layer is
corrected for its own error only (its input is the quantized model's), so
all layers are corrected at once without double counting. The difference is measured
after a fused Relu/Clip when there is one (what the activation clips away
does not matter downstream), and after the requantization the next layer
reads, applied to the twin too (the same QuantizeLinear -> DequantizeLinear):
the quantized model has no float tensor between a kernel and its
QuantizeLinear, and a probe reading one makes onnxruntime run every layer in
float, several times slower than the model itself. ``rounds`` > 1 measures
again on the corrected model.
Needs ``insert-qdq`` right before it (the float weights it replaced stay in the
graph, linked from each quantized node by ``ncc.quant.float_weight`` and
``ncc.quant.float_bias``; this pass removes the links and ``dce`` the tensors)
and the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.rewrite import Rewriter
from ncc.ir.tensors import from_array
from ncc.passes.base import Pass, PassContext, PassResult, option
from ncc.passes.quant.insert_qdq import FLOAT_BIAS, FLOAT_WEIGHT

KEEP_TWINS_FLOAT = ("WeightBiasQuantization",)
"""onnxruntime's transformer that gives a float Conv, ConvTranspose or Gemm reading a per-tensor
DequantizeLinear int8 weights of its own (per tensor, asymmetric): it would turn the probe's float twins
into integer kernels, and the pass would correct each layer toward onnxruntime's rounding instead of
the float layer. The probe's session runs without it."""


@dataclass(frozen=True)
class CorrectBias(Pass):
    """Add the measured mean output error of each quantized Conv/Gemm to its int32 bias."""

    name: ClassVar[str] = "correct-bias"
    samples: int = option(16, "calibration samples the correction is measured on", min=1)
    rounds: int = option(1, "measure-and-correct rounds", min=1)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from ncc.passes.quant import fallback

        data = ctx.data.get("calibration_data")
        if data is None:
            raise NccError("pass 'correct-bias' needs calibration data (--calib).")
        layers = [n for n in model.graph if _int32_bias(n) is not None]
        if layers and not any(FLOAT_WEIGHT in n.metadata_props for n in layers):
            raise NccError(
                "pass 'correct-bias' needs the float weights insert-qdq keeps beside the quantized ones; "
                "run it right after insert-qdq (no dce between them)."
            )
        feeds = fallback.samples(data, self.samples)
        shifts = []
        count = 0
        for _ in range(self.rounds):
            probe, pairs = _probe(model)
            if not pairs:
                break
            shift_names = _mean_differences(probe, pairs)
            results = fallback.run(probe, feeds, shift_names, disabled_optimizers=KEEP_TWINS_FLOAT)
            total = 0.0
            for (_, (q_value, scale), _, _), name in zip(pairs, shift_names):
                # per sample, the channel means of (float twin - quantized): their mean over the samples
                delta = np.concatenate(results[name]).astype(np.float64).mean(axis=0)
                q = q_value.const_value.numpy().astype(np.int64)
                step = np.rint(delta / scale).astype(np.int64)
                q_value.const_value = from_array(np.clip(q + step, -(2**31), 2**31 - 1).astype(np.int32))
                total += float(np.abs(delta).mean())
            count = len(pairs)
            shifts.append(total / len(pairs))
        _forget_float_weights(model)
        notes = [
            f"correct-bias: mean |shift| per layer, round {i + 1}: {s:.3g}" for i, s in enumerate(shifts)
        ]
        return PassResult(modified=count > 0, stats={"biases corrected": count}, notes=notes)


def _probe(model: ir.Model, *, requantized: bool = True):
    """A copy of ``model`` where every quantized Conv/Gemm also runs in float on the same (dequantized)
    input, with the float weights insert-qdq kept: the difference of the two is that layer's own error.

    With ``requantized`` (the pass's way) both sides are compared after the requantization the next layer
    reads, where the model has one; else right after the layer (and its fused activation), where
    onnxruntime then runs every layer of the probe in float. The twins read the layer's own dequantized
    input; the probe's session keeps them float (:data:`KEEP_TWINS_FLOAT`)."""
    from ncc.ir.ids import ID_KEY

    probe = model.clone()
    rw = Rewriter(probe, probe.graph)
    pairs = []
    for node in list(probe.graph):
        key = node.metadata_props.get(ID_KEY)
        bias = _int32_bias(node)
        weight = probe.graph.initializers.get(node.metadata_props.get(FLOAT_WEIGHT, ""))
        float_bias = probe.graph.initializers.get(node.metadata_props.get(FLOAT_BIAS, ""))
        if bias is None or weight is None or float_bias is None:
            continue
        if weight.const_value is None or float_bias.const_value is None:
            continue
        after = _requantized(_observed(node)) if requantized else None
        local = _float_twin(rw, node, [node.inputs[0], weight, float_bias])
        observed = _observed(node)
        act = observed.producer()
        if act is not node:  # measure after the fused activation, on both sides
            local = _float_twin(rw, act, [local, *act.inputs[1:]])
        if after is not None:  # compare what the next layer reads, on both sides
            q, dq = after.producer().inputs[0].producer(), after.producer()
            local = _float_twin(rw, q, [local, *q.inputs[1:]])
            local = _float_twin(rw, dq, [local, *dq.inputs[1:]])
            observed = after
        pairs.append((key, local.name, observed.name))
    # pairs refer to the probe's nodes; the caller corrects the model's own bias tensors
    by_id = {n.metadata_props.get(ID_KEY): n for n in model.graph}
    return probe, [(by_id[key], _int32_bias(by_id[key]), local, observed) for key, local, observed in pairs]


def _mean_differences(probe: ir.Model, pairs) -> list[str]:
    """Append to ``probe``, per pair, ``twin - quantized`` averaged over the spatial axes (``[N, C]``);
    returns those values' names. onnxruntime then hands back one row per sample and layer instead of two
    whole activations per layer; the batch axis stays, so a model with a fixed batch runs in slices."""
    from ncc.ir.ops import onnx_opset
    from ncc.ir.rewrite import Rewriter

    values = {o.name: o for n in probe.graph for o in n.outputs if o.name}
    rewriter = Rewriter(probe, probe.graph)
    axes_as_input = onnx_opset(probe) >= 18
    names = []
    for node, _, local, observed in pairs:
        diff = rewriter.create("Sub", [values[local], values[observed]], name=f"{local}__shift_diff")
        diff.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        shape = values[local].shape
        rank = len(shape) if shape is not None else (4 if node.op_type == "Conv" else 2)
        if node.op_type != "Conv" or rank <= 2:  # Gemm: [N, C] already
            names.append(diff.outputs[0].name)
            continue
        axes, base = list(range(2, rank)), f"{local}__shift"
        if axes_as_input:
            axes_value = rewriter.constant(np.array(axes, np.int64), f"{base}_axes")
            mean = rewriter.create("ReduceMean", [diff.outputs[0], axes_value], {"keepdims": 0}, name=base)
        else:
            mean = rewriter.create("ReduceMean", [diff.outputs[0]], {"axes": axes, "keepdims": 0}, name=base)
        mean.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        names.append(mean.outputs[0].name)
    return names


def _float_twin(rw: Rewriter, node: ir.Node, inputs: list[ir.Value]) -> ir.Value:
    """A copy of ``node`` reading ``inputs``, right after it; node and output named ``<name>__float`` (made
    unique whatever the model's own names are)."""
    rw.set_insertion_point(node, after=True)
    twin = rw.create(
        node.op_type,
        inputs,
        list(node.attributes.values()),
        domain=node.domain,
        name=rw.fresh_name(f"{node.name or node.op_type}__float"),
        output_names=[rw.fresh_name(f"{node.outputs[0].name}__float")],
    )
    return twin.outputs[0]


def _forget_float_weights(model: ir.Model) -> None:
    """The float weights served their purpose: drop the links (dce drops the tensors)."""
    for node in model.graph:
        node.metadata_props.pop(FLOAT_WEIGHT, None)
        node.metadata_props.pop(FLOAT_BIAS, None)


def _observed(node: ir.Node) -> ir.Value:
    """Where the node's error is measured: after its fused Relu/Clip, which is what the next layer sees."""
    from ncc.passes.quant.plan import fused_activation

    act = fused_activation(node)
    return (act or node).outputs[0]


def _requantized(value: ir.Value) -> ir.Value | None:
    """The output of the DequantizeLinear behind the QuantizeLinear reading ``value``, if the quantized model
    requantizes it. The probe reads that rather than ``value`` itself: a float tensor between a kernel and
    its QuantizeLinear exists only in the probe, and a second reader of it would stop onnxruntime from
    running the layer as an integer kernel (every layer of the probe would then run in float)."""
    uses = value.uses()
    if len(uses) != 1 or uses[0].node.op_type != "QuantizeLinear" or uses[0].idx != 0:
        return None
    readers = [u.node for u in uses[0].node.outputs[0].uses()]
    if not readers or readers[0].op_type != "DequantizeLinear":
        return None
    return readers[0].outputs[0]


def _int32_bias(node: ir.Node) -> tuple[ir.Value, np.ndarray] | None:
    """(the int32 bias initializer, its per-channel scale) of a quantized Conv/Gemm, else None."""
    if (
        node.metadata_props.get("ncc.quant") != "int8"
        or node.op_type not in ("Conv", "Gemm")
        or len(node.inputs) < 3
    ):
        return None
    bias = node.inputs[2]
    dq = bias.producer() if bias is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].const_value is None:
        return None
    q_value, scale = dq.inputs[0], dq.inputs[1]
    if q_value.const_value.dtype != ir.DataType.INT32 or scale.const_value is None:
        return None
    if len(q_value.uses()) != 1:
        return None
    return q_value, np.broadcast_to(scale.const_value.numpy().astype(np.float64), q_value.const_value.shape)
