"""Accuracy-driven fallback: keep the few most sensitive nodes in float.

After quantizing, ``insert-qdq{min-cosine=C}`` runs the float and the
quantized model on a few calibration samples and keeps nodes in float that
buy fidelity, up to ``max-float`` of the quantized compute nodes:

- *sensitivity* of a node is how much relative error it adds: the relative
  L2 error of its output (quantized model vs float model) minus the largest
  relative error among its inputs. One run of each model with the candidate
  outputs exposed ranks every node at once.
- each step re-quantizes the float model with the chosen nodes excluded, so a
  fallback is exactly what ``--exclude`` would give, and is measured again.

Transformers pad their inputs: where the model takes an ``attention_mask``
input, positions it masks out (its zeros) are left out of every comparison
(:func:`ncc.metrics.worst_output_cosine`,
:func:`ncc.metrics.relative_l2_error`).

The layers at the model's edges — those reading a graph input (a CNN's stem
sees the raw image) and those producing a graph output — are always tried,
even when the target is met (one layer each, often a large share of the
error); the rest by sensitivity only while the outputs are below the target
(the ranking runs both models once more). A fallback that does not close
``min-gain`` of the gap to 1 is undone.

A MatMul whose input ``smooth-quant`` left unsmoothed because a Mul there would
break the target's fusion (:data:`~ncc.passes.quant.plan.SMOOTH_LATER`) gets
the cheaper move first: that input smoothed through a Mul, the MatMul staying
int8; float only if that does not close ``min-gain`` of the gap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from ncc.ir.ids import ID_KEY
from ncc.metrics import relative_l2_error, token_masks
from ncc.passes.quant.calib_data import CalibrationData
from ncc.passes.quant.pairs import overflowing_layer
from ncc.runtime import open_session
from ncc.targets import get_target


def samples(data: CalibrationData, count: int) -> list[dict[str, np.ndarray]]:
    """The first ``count`` calibration samples, as batches of up to 8."""
    out, seen = [], 0
    for batch in data.batches(8):
        n = next(iter(batch.values())).shape[0]
        take = min(n, count - seen)
        out.append({k: v[:take] for k, v in batch.items()})
        seen += take
        if seen >= count:
            break
    return out


def run(
    model: ir.Model,
    feeds: list[dict],
    outputs: list[str] = (),
    *,
    disabled_optimizers: Sequence[str] = (),
    config: Mapping[str, str] | None = None,
) -> dict[str, list[np.ndarray]]:
    """Run ``model`` on ``feeds`` with ``outputs`` (node outputs of its main graph) exposed; per output
    name, one array per feed (``disabled_optimizers``, ``config``: see :func:`ncc.runtime.open_session`)."""
    session = measuring_session(model, outputs, disabled_optimizers=disabled_optimizers, config=config)
    results: dict[str, list[np.ndarray]] = {n: [] for n in session.output_names}
    for index, feed in enumerate(feeds):
        for name, array in session.run(feed, where=f"calibration batch {index}").items():
            results[name].append(array)
    return results


def measuring_session(
    model: ir.Model,
    outputs: Sequence[str] = (),
    *,
    disabled_optimizers: Sequence[str] = (),
    prune: bool = False,
    config: Mapping[str, str] | None = None,
):
    """An onnxruntime session (:func:`ncc.runtime.open_session`) that computes what ``model``'s integers
    mean: with QDQ unfused where :func:`saturates_here` finds a layer, fused otherwise. With ``prune``,
    ``outputs`` are its only outputs and only what they need runs."""
    return open_session(
        model,
        outputs=list(outputs),
        prune=prune,
        disabled_optimizers=disabled_optimizers,
        fuse_qdq=saturates_here(model) is None,
        config=config,
    )


def saturates_here(model: ir.Model) -> ir.Node | None:
    """The first layer of ``model`` that onnxruntime's integer kernels would compute wrong on this CPU, or
    None: without VNNI they add u8 x s8 products in saturating int16 pairs, which full-range weights (for a
    target whose kernels do not pair: a VNNI CPU, TFLite's XNNPACK) overflow
    (:func:`ncc.passes.quant.pairs.overflowing_layer`). Measuring such a model fused would score, and
    correct-bias and round-weights would correct, the saturation of this CPU instead of the model."""
    if not get_target("host").pairwise_int16:
        return None
    return overflowing_layer(model)


def candidates(quantized: ir.Model) -> list[ir.Node]:
    """The quantized compute nodes of ``quantized``: what min-cosine may return to float, by node id
    (:mod:`ncc.ir.ids`; names may be empty or repeated, ids are neither)."""
    from ncc.passes.quant.plan import ROLES

    return [
        n
        for n in quantized.graph
        if n.metadata_props.get("ncc.quant") == "int8" and n.op_type in ROLES and node_key(n) is not None
    ]


def node_key(node: ir.Node) -> str | None:
    """How min-cosine names a node: its stable id."""
    return node.metadata_props.get(ID_KEY)


def labels(model: ir.Model) -> dict[str, str]:
    """Node id -> how the report names the node: its name, or ``#id`` when it has none."""
    return {key: node.name or f"#{key}" for node in model.graph if (key := node_key(node)) is not None}


def edges(quantized: ir.Model) -> list[str]:
    """Ids of the candidates at the model's edges, tried before any ranking: those reading a graph
    input (a CNN's stem sees the raw image), then those producing a graph output."""
    nodes = candidates(quantized)
    inputs = _graph_inputs(quantized)
    first = [node_key(n) for n in nodes if any(v is not None and _float_name(v) in inputs for v in n.inputs)]
    first += [node_key(n) for n in nodes if n.outputs[0].is_graph_output()]
    return list(dict.fromkeys(first))


def rank(float_model: ir.Model, quantized: ir.Model, feeds: list[dict]) -> list[str]:
    """Ids of the quantized compute nodes of ``quantized``, most sensitive first (see the module docstring)."""
    nodes = candidates(quantized)
    wanted: dict[str, None] = {}
    for node in nodes:
        wanted[node.outputs[0].name] = None
        for value in node.inputs:
            if value is not None and value.const_value is None:
                wanted[_float_name(value)] = None
    in_float, in_quantized = _produced(float_model), _produced(quantized)
    names = [n for n in wanted if n in in_float]
    masks = token_masks(feeds)
    ref = run(float_model, feeds, names)
    got = run(quantized, feeds, [n for n in names if n in in_quantized])
    errors = {n: relative_l2_error(ref[n], got[n], masks) for n in names if n in ref and n in got}
    del ref, got
    scores = []
    for node in nodes:
        out = node.outputs[0].name
        if out not in errors:
            continue
        err_in = max(
            (errors.get(_float_name(v), 0.0) for v in node.inputs if v is not None and v.const_value is None),
            default=0.0,
        )
        scores.append((errors[out] - err_in, node_key(node)))
    return [key for _, key in sorted(scores, key=lambda s: -s[0])]


def _graph_inputs(model: ir.Model) -> set[str]:
    return {v.name for v in model.graph.inputs}


def _float_name(value: ir.Value) -> str:
    """The float tensor a dequantized input stands for (the input of its QuantizeLinear), else itself."""
    dq = value.producer()
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = dq.inputs[0].producer()
        if q is not None and q.op_type == "QuantizeLinear":
            return q.inputs[0].name
    return value.name


def _produced(model: ir.Model) -> set[str]:
    """Names of the values the nodes of ``model``'s main graph produce."""
    return {o.name for n in model.graph for o in n.outputs}
