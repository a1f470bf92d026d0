"""The ``quantize-embeddings`` pass: embedding tables stored in int8, one scale per row.

A transformer's word embedding is most of its float bytes once its linears are int8 (all-MiniLM-L6-v2:
47 of 59 MB), and no integer kernel reads it: a ``Gather(E, ids)`` on a constant ``[V, H]`` float table
becomes ``Cast(Gather(E_q, ids)) * Gather(e_s, ids)`` with ``E_q`` int8 (symmetric, per row) and
``e_s`` ``[V, 1]``, so a run dequantizes only the rows it gathers (``quantize-dynamic``'s Gather rewrite,
which this pass runs on a statically quantized model too). Per-row int8 keeps each row within half a
step of ``max |row| / 127``.

It runs last in the ``int8`` pipeline (the passes before it measure the activations, and the report's
fidelity, the written model against the float one, includes the tables' rounding) and after the
weight-only quantizer in ``w4`` and ``w8`` (a language model's token table is a sixth of its weights;
NNCF's weight compression keeps it in int8 too). Targets whose backend reads the model otherwise
(``inductor``, ``tf``, ``tflite``: ``int8_embeddings`` in the target profile) keep their tables float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
from ncc.ir import ids
from ncc.ir.ops import is_onnx_domain
from ncc.passes.base import Pass, PassContext, PassResult, option
from ncc.passes.quant.quantize_dynamic import QUANT_KEY, QuantizeDynamic, embedding_table
from ncc.targets import DEFAULT_TARGET, get_target

MODE = "int8-weight"
"""The mark of a table this pass stored in int8 (its Gather's ``ncc.quant``)."""


@dataclass(frozen=True)
class QuantizeEmbeddings(Pass):
    """Store embedding tables (Gather on a constant float table) in int8, one scale per row."""

    name: ClassVar[str] = "quantize-embeddings"
    target: str = option(
        DEFAULT_TARGET, "target profile (tables stay float where its backend reads no int8 table)"
    )

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if not get_target(self.target).int8_embeddings or not any(
            _candidate(node) for node in ids.all_nodes(model)
        ):
            return PassResult(modified=False)
        result = QuantizeDynamic(op_types=("Gather",), target=self.target).rewrite(model, mode=MODE)
        stats = result.stats
        before, after = stats.get("weight bytes before", 0), stats.get("weight bytes after", 0)
        note = (
            f"quantize-embeddings: {stats.get('Gather quantized', 0)} table(s) in int8, one scale per row: "
            f"{before / 1e6:.2f} MB -> {after / 1e6:.2f} MB"
        )
        return PassResult(modified=True, stats=stats, notes=[note, *result.notes])


def _candidate(node: ir.Node) -> bool:
    """A Gather quantize-dynamic's rewrite takes (:func:`embedding_table`), not marked by a quantization pass."""
    if node.op_type != "Gather" or not is_onnx_domain(node) or QUANT_KEY in node.metadata_props:
        return False
    return embedding_table(node)[0] is not None
