"""Remove nodes that compute ``y = x``.

Removed, in every graph, subgraph and function body:

- ``Identity(x)``;
- ``Dropout(x)`` in inference form (no ``training_mode`` input, or a constant
  false one; opsets 7-11 are inference only; before 7 only with ``is_test=1``)
  whose ``mask`` output is absent or unused;
- ``Cast(x, to=T)`` where ``x``'s element type is already known to be ``T``.

Every use of ``y`` (including uses inside subgraphs) is pointed at ``x``. When
``y`` is a graph output its name is part of the model's interface: ``x`` is
renamed to ``y``'s name, which is only done when ``x`` is produced by a node of
the same graph and is not itself a graph input, output or initializer. Otherwise
the node stays (and is counted as kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.ir.ops import is_onnx_domain, onnx_opset
from ncc.ir.rewrite import Rewriter
from ncc.passes.base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class EliminateIdentity(Pass):
    """Remove Identity nodes (and inference Dropout, same-type Cast), keeping graph output names."""

    name: ClassVar[str] = "eliminate-identity"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        stats = {"Identity removed": 0, "Dropout removed": 0, "Cast removed": 0, "kept (graph output)": 0}
        graphs = [*model.graphs()]
        for function in model.functions.values():
            graphs.extend([function.graph, *function.graph.subgraphs()])
        opset = onnx_opset(model, default=21)
        for graph in graphs:
            rewriter = Rewriter(model, graph)
            for node in list(graph):
                if not is_onnx_domain(node) or not _is_noop(node, opset):
                    continue
                if _eliminate(rewriter, node):
                    stats[f"{node.op_type} removed"] += 1
                else:
                    stats["kept (graph output)"] += 1
        stats = {k: v for k, v in stats.items() if v or k == "Identity removed"}
        removed = sum(v for k, v in stats.items() if k.endswith("removed"))
        return PassResult(modified=removed > 0, stats=stats)


def _is_noop(node: ir.Node, opset: int) -> bool:
    if not node.inputs or node.inputs[0] is None:
        return False
    if node.op_type == "Identity":
        return len(node.outputs) == 1 and len(node.inputs) == 1
    if node.op_type == "Dropout":
        if opset < 7 and node.attributes.get_int("is_test", 0) == 0:
            return False  # before opset 7 Dropout trains unless is_test=1
        if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            return False
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            training = node.inputs[2].const_value
            if (
                training is None
                or node.inputs[2].is_graph_input()
                or bool(np.asarray(training.numpy()).any())
            ):
                return False
        return True
    if node.op_type == "Cast":
        source = node.inputs[0]
        to = node.attributes.get_int("to")
        return source.dtype is not None and to is not None and int(source.dtype) == to
    return False


def _eliminate(rewriter: Rewriter, node: ir.Node) -> bool:
    x, y = node.inputs[0], node.outputs[0]
    if y.is_graph_output():
        producer = x.producer()
        if producer is None or producer.graph is not rewriter.graph:
            return False
        if x.is_graph_output() or x.is_graph_input() or x.is_initializer():
            return False
    if x.type is None:
        x.type = y.type
    if x.shape is None and y.shape is not None:
        x.shape = y.shape
    rewriter.replace_all_uses(y, x)  # x takes a graph output's name
    rewriter.graph.remove(node, safe=True)
    return True
