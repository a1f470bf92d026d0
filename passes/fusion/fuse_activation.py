"""Pair Conv / Gemm / MatMul with the Relu or Clip that follows it.

A rectifier right after a linear op is free on every integer backend: the
quantized kernel (QLinearConv, QLinearMatMul, QGemm, or onnxruntime's fusion of
``DQ → Conv → Relu → Q``) clamps its output range instead of running a second
op. ``Relu(y) = max(y, 0)`` and ``Clip(y, lo, hi) = min(max(y, lo), hi)`` are
absorbed by choosing the output quantization range inside ``[lo, hi]`` — as
long as no Quantize/Dequantize pair is put between the two ops.

Recognized pairs: a ``Conv``, ``Gemm`` or ``MatMul`` (standard domain) whose
output is read by exactly one node, not a graph output, and that node is

- ``Relu``;
- ``Clip`` with a constant ``min`` and optionally a constant ``max``
  (``Relu6`` exports as ``Clip(y, 0, 6)``; a Clip with min only is a shifted
  Relu); opset < 11 Clips carry ``min``/``max`` as attributes and are accepted.

A Clip whose bounds are not constants is not paired (the failure reason says
so), nor is a Clip with no bounds at all (an identity).

**Default: mark, do not rewrite** (the contract with ``insert-qdq``). The graph
stays float and unchanged in structure; the pass writes two node metadata
entries per pair:

- on the producer: ``metadata_props["ncc.fused_activation"] = "<activation's ncc.id>"``
- on the activation: ``metadata_props["ncc.fused_into"] = "<producer's ncc.id>"``

``insert-qdq`` reads them and inserts no Q/DQ on the producer's output (the
edge into the activation): the activation's output is quantized instead, so
onnxruntime fuses ``Conv + Relu + Q`` into ``QLinearConv``. Marks are only
hints: a later pass that rewrites either node drops them with the node, and a
consumer must check that the ids still name a producer → activation edge.
Running the pass twice changes nothing the second time.

**``emit-fused-conv=true``**: for a float deployment, ``Conv → Relu`` and
``Conv → Clip`` are instead rewritten into onnxruntime's
``com.microsoft::FusedConv`` (``activation = "Relu"`` or ``"Clip"`` with
``activation_params = [min, max]``, an absent max being +inf), adding the
``com.microsoft`` opset import if missing. Gemm and MatMul pairs are still
only marked (onnxruntime has no such float contrib op for them).

Statistics: pairs marked (or fused) per kind, e.g. ``Conv+Clip marked``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.ir import ids
from ncc.ir.ops import ensure_opset, is_onnx_domain
from ncc.ir.rewrite import Rewriter
from ncc.passes.base import Pass, PassContext, PassResult, option
from ncc.passes.fusion.fuse_gelu import MS_DOMAIN, scalar_constant

FUSED_ACTIVATION_KEY = "ncc.fused_activation"
FUSED_INTO_KEY = "ncc.fused_into"
PRODUCERS = ("Conv", "Gemm", "MatMul")
ACTIVATIONS = ("Relu", "Clip")


def clip_bounds(clip: ir.Node) -> tuple[float, float | None] | str:
    """A Clip's constant (min, max-or-None), or why its bounds are not usable."""
    if "min" in clip.attributes or "max" in clip.attributes:  # opset < 11
        lo = clip.attributes.get_float("min", float(np.finfo(np.float32).min))
        hi = clip.attributes.get_float("max", float(np.finfo(np.float32).max))
        return lo, hi
    lo_value = clip.inputs[1] if len(clip.inputs) > 1 else None
    hi_value = clip.inputs[2] if len(clip.inputs) > 2 else None
    if lo_value is None:
        return "Clip has no min"
    lo = scalar_constant(lo_value)
    if lo is None:
        return "Clip min is not a one-element constant"
    if hi_value is None:
        return lo, None
    hi = scalar_constant(hi_value)
    if hi is None:
        return "Clip max is not a one-element constant"
    return lo, hi


def pair_problem(producer: ir.Node | None, act: ir.Node) -> str:
    """Why ``producer → act`` is not a pair to mark ('' when it is)."""
    if producer is None or not is_onnx_domain(producer) or producer.op_type not in PRODUCERS:
        return "input is not produced by Conv, Gemm or MatMul"
    if producer.graph is not act.graph:
        return "producer is in another graph"
    out = act.inputs[0]
    if out.is_graph_output():
        return f"{producer.op_type} output is a graph output"
    if len(out.uses()) != 1:
        return f"{producer.op_type} output has other consumers"
    if act.op_type == "Clip":
        bounds = clip_bounds(act)
        if isinstance(bounds, str):
            return bounds
    return ""


@dataclass(frozen=True)
class FuseActivation(Pass):
    """Pair Conv/Gemm/MatMul with a following Relu/Clip for quantization (or emit FusedConv).

    y = act(conv(x))  ->  marks ncc.fused_activation / ncc.fused_into, or com.microsoft::FusedConv
    """

    name: ClassVar[str] = "fuse-activation"

    emit_fused_conv: bool = option(
        False, "rewrite Conv+Relu/Clip into com.microsoft::FusedConv instead of marking"
    )

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        reasons: Counter = Counter()
        if any(ids.node_id(n) is None for n in ids.all_nodes(model)):
            ids.assign_ids(model)
        changed = False
        for graph in [model.graph, *model.graph.subgraphs()]:
            rewriter = Rewriter(model, graph)
            for act in list(graph):
                if act.graph is not graph or not is_onnx_domain(act) or act.op_type not in ACTIVATIONS:
                    continue
                if not act.inputs or act.inputs[0] is None:
                    continue
                producer = act.inputs[0].producer()
                problem = pair_problem(producer, act)
                if problem:
                    reasons[f"{act.op_type}: {problem}"] += 1
                    continue
                kind = f"{producer.op_type}+{act.op_type}"
                if self.emit_fused_conv and producer.op_type == "Conv":
                    self._fuse(rewriter, producer, act)
                    stats[f"{kind} fused"] += 1
                    changed = True
                    continue
                act_id, prod_id = str(ids.node_id(act)), str(ids.node_id(producer))
                if (
                    producer.metadata_props.get(FUSED_ACTIVATION_KEY) != act_id
                    or act.metadata_props.get(FUSED_INTO_KEY) != prod_id
                ):
                    producer.metadata_props[FUSED_ACTIVATION_KEY] = act_id
                    act.metadata_props[FUSED_INTO_KEY] = prod_id
                    changed = True
                stats[f"{kind} marked"] += 1
        for kind in ("Conv+Relu", "Conv+Clip", "Gemm+Relu", "Gemm+Clip", "MatMul+Relu", "MatMul+Clip"):
            fused = self.emit_fused_conv and kind.startswith("Conv")
            stats.setdefault(f"{kind} {'fused' if fused else 'marked'}", 0)
        notes = [f"not paired {n}x: {reason}" for reason, n in sorted(reasons.items())]
        return PassResult(modified=changed, stats=dict(sorted(stats.items())), notes=notes)

    @staticmethod
    def _fuse(rewriter: Rewriter, conv: ir.Node, act: ir.Node) -> None:
        rewriter.set_insertion_point(act)
        attrs = [ir.Attr(a.name, a.type, a.value) for a in conv.attributes.values()]
        if act.op_type == "Relu":
            attrs.append(ir.AttrString("activation", "Relu"))
        else:
            lo, hi = clip_bounds(act)  # type: ignore[misc]
            hi = float(np.finfo(np.float32).max) if hi is None else hi
            attrs += [ir.AttrString("activation", "Clip"), ir.AttrFloat32s("activation_params", [lo, hi])]
        ensure_opset(rewriter.model, MS_DOMAIN)
        fused = rewriter.create(
            "FusedConv", list(conv.inputs), attrs, domain=MS_DOMAIN, name=conv.name, absorbed=[conv, act]
        )
        rewriter.replace_value(act.outputs[0], fused.outputs[0])
        rewriter.erase_all([conv, act])
