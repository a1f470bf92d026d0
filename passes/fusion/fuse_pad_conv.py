"""Fold a zero ``Pad`` into the ``Conv`` (or pooling op) that reads it.

``Conv(Pad(x, p), W)`` with constant-mode padding of zeros on the spatial axes
only equals ``Conv(x, W)`` with ``pads`` increased by ``p``: the convolution
window sees the same zeros either way. Exporters of TensorFlow-style "same"
padding (EfficientNet-Lite's PyTorch port) emit such explicit Pads; folding
them removes a full copy of the activation per layer and, for INT8, a
dequantize–pad–quantize round trip the runtime cannot fuse.

Preconditions: Pad mode ``constant`` with an absent or zero constant value and
constant pads that are zero on the batch and channel axes (and no ``axes``
input); the Pad output is read only by the Conv, which has explicit pads
(``auto_pad`` NOTSET). AveragePool is left alone (its ``count_include_pad``
would change the result); MaxPool is not (its implicit padding is -inf, not 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.ir.ops import is_onnx_domain
from ncc.ir.rewrite import MatchResult, Pattern, Rewriter, constant_tensor, single_consumer
from ncc.passes.base import Pass, PassContext, PassResult, run_patterns


class PadConvPattern(Pattern):
    root = "Conv"

    def match_and_rewrite(self, node: ir.Node, rewriter: Rewriter) -> MatchResult:
        conv = node
        pad = conv.inputs[0].producer() if conv.inputs and conv.inputs[0] is not None else None
        if pad is None or pad.op_type != "Pad" or not is_onnx_domain(pad):
            return MatchResult.fail("Conv input is not produced by a Pad")
        if pad.graph is not conv.graph or not single_consumer(pad.outputs[0], conv):
            return MatchResult.fail("Pad output has other uses")
        if pad.attributes.get_string("mode", "constant") != "constant":
            return MatchResult.fail("Pad mode is not constant")
        if conv.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
            return MatchResult.fail("Conv uses auto_pad")
        if len(pad.inputs) > 3 and pad.inputs[3] is not None:
            return MatchResult.fail("Pad has an axes input")
        if len(pad.inputs) > 2 and pad.inputs[2] is not None:
            value = constant_tensor(pad.inputs[2])
            if value is None or np.any(value.numpy() != 0):
                return MatchResult.fail("Pad value is not a constant zero")
        if len(pad.inputs) < 2 or pad.inputs[1] is None:
            return MatchResult.fail("Pad has no pads input")
        pads_tensor = constant_tensor(pad.inputs[1])
        if pads_tensor is None:
            return MatchResult.fail("Pad pads are not constant")
        pads = [int(p) for p in pads_tensor.numpy().reshape(-1)]
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        if rank < 3 or any(begin[:2]) or any(end[:2]) or min(pads) < 0:
            return MatchResult.fail("Pad pads the batch or channel axis, or crops")
        spatial = rank - 2
        conv_pads = conv.attributes.get_ints("pads", [0] * (2 * spatial))
        merged = [conv_pads[i] + begin[2 + i] for i in range(spatial)]
        merged += [conv_pads[spatial + i] + end[2 + i] for i in range(spatial)]
        attrs = {a.name: a for a in conv.attributes.values() if a.name != "pads"}
        attrs["pads"] = ir.AttrInt64s("pads", merged)
        new = rewriter.create(
            "Conv",
            [pad.inputs[0], *conv.inputs[1:]],
            list(attrs.values()),
            name=conv.name,
            absorbed=[pad, conv],
        )
        rewriter.replace_value(conv.outputs[0], new.outputs[0])
        rewriter.erase(conv)
        rewriter.erase(pad)
        return MatchResult.ok()


@dataclass(frozen=True)
class FusePadConv(Pass):
    """Fold zero Pad nodes into the pads of the Conv that reads them."""

    name: ClassVar[str] = "fuse-pad-conv"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return run_patterns(model, [PadConvPattern()])
