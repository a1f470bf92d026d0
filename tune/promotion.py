"""What raising each weight-only layer from 4 to 8 bits buys, measured on the model's outputs.

The w4 search keeps at 8 bits the layers the bound needs, by bisection over a ranking, so the ranking
decides how many layers it keeps and how large the model ends up. The error 4 bits give a layer on its
own input (the weight-only pass's layer table) ranks poorly: on SmolLM2-135M the 16 layers it puts first
recover none of the perplexity 4 bits lose. This module measures instead what each promotion does to the
outputs: one onnxruntime session of the float model whose weight-only MatMuls read their weights from
graph inputs, fed every layer's dequantized 4-bit weights but one layer's 8-bit ones; a layer's gain is
how much that lowers the divergence of the outputs from the float model's on a few calibration samples.
One forward pass per layer, no evaluation of the user's metric.

The divergence is the KL divergence of the softmax over each output's last axis (a language model's
next-token distribution, what perplexity feels), averaged over positions (padded ones left out; an
output with one value per position counts its squared error relative to its mean square instead). On a
language model it finds the layers whose 8 bits recover perplexity better than the gain in the logits'
SQNR does; the numbers are in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
from ncc.ir.ops import is_onnx_domain
from ncc.ir.rewrite import dequantized_array
from ncc.metrics import position_mask, token_masks


def dequantized_weights(model: ir.Model) -> dict[str, np.ndarray]:
    """Per MatMul of ``model``'s main graph whose second input a DequantizeLinear of constants writes (the
    weight-only passes' form before packing): its name and the float32 weight that DequantizeLinear
    computes."""
    weights = {}
    for node in model.graph:
        if node.op_type != "MatMul" or not is_onnx_domain(node) or len(node.inputs) < 2 or not node.name:
            continue
        dq = node.inputs[1].producer() if node.inputs[1] is not None else None
        if (
            dq is not None
            and dq.op_type == "DequantizeLinear"
            and is_onnx_domain(dq)
            and all(v is None or v.const_value is not None for v in dq.inputs)
        ):
            weights[node.name] = dequantized_array(dq)
    return weights


def promotion_gains(
    float_model: ir.Model,
    low: dict[str, np.ndarray],
    high: dict[str, np.ndarray],
    feeds: Sequence[dict[str, np.ndarray]],
    progress: Callable[[str], None] | None = None,
) -> tuple[float, dict[str, float]]:
    """The outputs' divergence from ``float_model``'s with every layer at its ``low`` weights, and per layer
    of both ``low`` and ``high`` (MatMul names, dequantized weights) how much lower it is with that layer at
    its ``high`` weights, on ``feeds`` (batches)."""
    from ncc.runtime import open_session

    probe = float_model.clone()
    inputs, floats = _weights_as_inputs(probe, sorted(set(low) & set(high)))
    names = sorted(inputs)
    outputs = [v.name for v in probe.graph.outputs]
    session = open_session(probe, what="the float model with fed weights")
    masks = token_masks(feeds)

    def run(weights: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        feed_weights = {inputs[n]: w for n, w in weights.items()}
        return [session.run({**feed, **feed_weights}, outputs) for feed in feeds]

    reference = run(floats)
    logs = [{n: _log_softmax(a) for n, a in batch.items() if _distribution(a)} for batch in reference]
    probs = [{n: np.exp(a) for n, a in batch.items()} for batch in logs]

    def divergence(weights: dict[str, np.ndarray]) -> float:
        total = count = 0.0
        for i, batch in enumerate(run(weights)):
            for name, got in batch.items():
                if not np.issubdtype(got.dtype, np.floating):
                    continue
                if name in logs[i]:  # KL(reference || got) of the softmax over the last axis
                    ref = logs[i][name]
                    per = np.sum(probs[i][name] * (ref - _log_softmax(got)), axis=-1, dtype=np.float64)
                else:  # one value per position: its squared error relative to the reference's mean square
                    ref = reference[i][name].astype(np.float64)
                    per = (got - ref) ** 2 / max(float(np.mean(ref * ref)), 1e-30)
                    per = per.reshape(per.shape[:-1]) if per.ndim else per
                keep = position_mask(per, masks[i] if i < len(masks) else None)
                if keep is not None:
                    per = per[np.broadcast_to(keep, per.shape)]
                total += float(np.sum(per))
                count += per.size
        return total / count if count else 0.0

    base_weights = {n: np.asarray(low[n], dtype=np.float32) for n in names}
    base = divergence(base_weights)
    gains = {}
    for i, name in enumerate(names):
        gains[name] = base - divergence({**base_weights, name: np.asarray(high[name], dtype=np.float32)})
        if progress is not None and (i + 1) % 25 == 0:
            progress(f"measured {i + 1} of {len(names)} layers at 8 bits")
    return base, gains


def _weights_as_inputs(model: ir.Model, names: Sequence[str]) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Give each MatMul of ``names`` whose weight is a constant a float graph input of its own to read it
    from instead (the constant is left for open_session to drop once nothing reads it); returns per MatMul
    the input's name and the float weight."""
    from ncc.ir.rewrite import Rewriter

    wanted = set(names)
    rewriter = Rewriter(model, model.graph)
    inputs, floats = {}, {}
    for node in model.graph:
        if node.name not in wanted or node.op_type != "MatMul" or node.inputs[1] is None:
            continue
        weight = node.inputs[1]
        if weight.const_value is None:
            continue
        array = weight.const_value.numpy()
        value = ir.Value(
            name=rewriter.fresh_name(f"{weight.name}.fed"),
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape(array.shape),
        )
        model.graph.inputs.append(value)
        node.replace_input_with(1, value)
        inputs[node.name] = value.name
        floats[node.name] = np.asarray(array, dtype=np.float32)
    return inputs, floats


def _distribution(a: np.ndarray) -> bool:
    return np.ndim(a) > 0 and np.shape(a)[-1] > 1 and np.issubdtype(a.dtype, np.floating)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
