"""Fill value types and shapes with ONNX shape inference.

The work is :func:`ncc.ir.inference.infer_types` (weights never read, types copied back without losing
information, contradictions reported); this pass turns its outcome into a result: a failure or a
contradiction is a note, or an error with ``strict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.inference import InferenceFailed, infer_types, values_of
from ncc.passes.base import Pass, PassContext, PassResult, option


@dataclass(frozen=True)
class ShapeInference(Pass):
    """Fill value types and shapes with ONNX shape inference (weights never loaded)."""

    name: ClassVar[str] = "shape-inference"

    strict: bool = option(
        False, "fail when inference fails or contradicts a declared type (else note and go on)"
    )

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        try:
            inferred = infer_types(model, strict=self.strict)
        except InferenceFailed as err:
            if self.strict:
                raise NccError(f"shape-inference: ONNX shape inference failed: {err}") from None
            note = f"ONNX shape inference failed, types left as they were: {err}"
            return PassResult(modified=False, notes=[note])
        if inferred.conflicts and self.strict:
            raise NccError(f"shape-inference: {inferred.conflicts[0]}.")
        notes = [msg + "; kept the declared type" for msg in inferred.conflicts]
        untyped = sum(1 for g in model.graphs() for v in values_of(g) if v.type is None)
        stats = {"values typed": inferred.typed, "shapes refined": inferred.refined}
        if inferred.conflicts:
            stats["type conflicts"] = len(inferred.conflicts)
        if untyped:
            stats["values still untyped"] = untyped
        return PassResult(modified=bool(inferred.typed or inferred.refined), stats=stats, notes=notes)
