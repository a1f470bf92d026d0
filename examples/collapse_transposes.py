"""An example ncc plugin: the pass `collapse-transposes`.

Run it with ``ncc compile model.onnx --plugin examples/collapse_transposes.py
--passes collapse-transposes,dce -o out.onnx``; ``ncc passes --plugin
examples/collapse_transposes.py`` lists it.

Transpose(Transpose(x, p1), p2) is one Transpose with perm q[i] = p1[p2[i]];
when q is the identity permutation both transposes disappear. Exporters leave
such pairs around attention heads and NHWC/NCHW boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
from ncc.ir.ops import is_onnx_domain
from ncc.ir.rewrite import MatchResult, Pattern, Rewriter
from ncc.passes import Pass, PassContext, PassResult, option, run_patterns


class TransposeOfTranspose(Pattern):
    root = "Transpose"

    def __init__(self, keep_identity: bool):
        self.keep_identity = keep_identity

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        inner = node.inputs[0].producer()
        if inner is None or inner.op_type != "Transpose" or not is_onnx_domain(inner):
            return MatchResult.fail("input is not produced by a Transpose")
        p1, p2 = inner.attributes.get_ints("perm"), node.attributes.get_ints("perm")
        if p1 is None or p2 is None:
            return MatchResult.fail("a Transpose has no explicit perm")
        composed = [p1[i] for i in p2]
        x = inner.inputs[0]
        if composed == sorted(composed) and not self.keep_identity:
            replacement = x
            if node.outputs[0].is_graph_output() and (x.is_graph_input() or x.is_graph_output()):
                return MatchResult.fail("would alias a graph input to a graph output")
        else:
            replacement = rewriter.create(
                "Transpose", [x], {"perm": composed}, name=node.name, absorbed=[inner, node]
            ).outputs[0]
        rewriter.replace_op(node, [replacement])
        return MatchResult.ok()


@dataclass(frozen=True)
class CollapseTransposes(Pass):
    """Merge chains of Transpose nodes; drop them when they cancel out."""

    name: ClassVar[str] = "collapse-transposes"
    keep_identity: bool = option(False, "keep an identity Transpose instead of removing it")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return run_patterns(model, [TransposeOfTranspose(self.keep_identity)])
