"""Embedding tables (``Gather`` on a constant ``[V, H]`` float table) in the weight-only form.

Rows are quantized by RTN in groups of ``g`` along ``H`` (a row is what one
token reads), written as::

    %e_dq = DequantizeLinear(@e_q [V, H], @e_scale [V, ceil(H/g)], @e_zero_point?) {axis = 1, block_size = g}
    %y    = Gather(%e_dq, %ids) {axis = 0}

which ``pack-int4`` turns into ``com.microsoft::GatherBlockQuantized`` so only
the gathered rows are ever dequantized.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from ncc.ir.ops import is_onnx_domain
from ncc.ir.rewrite import Rewriter
from ncc.ir.spill import SpillFile
from ncc.passes.woq.kernels import GroupSpec, rtn
from ncc.passes.woq.weights import ALGO_KEY, ERROR_KEY, QUANT_KEY, add_initializers, code_dtype

_FLOATS = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


def embedding_gathers(graph: ir.Graph) -> dict[str, tuple[ir.Value, list[ir.Node]]]:
    """Tables read by ``Gather(axis=0)`` as rank-2 float initializers, with their Gathers, in graph order."""
    found: dict[str, tuple[ir.Value, list[ir.Node]]] = {}
    outputs = {v.name for v in graph.outputs}
    for node in graph:
        if node.op_type != "Gather" or not is_onnx_domain(node) or node.attributes.get_int("axis", 0) != 0:
            continue
        table = node.inputs[0]
        tensor = table.const_value if table is not None and table.is_initializer() else None
        if tensor is None or tensor.dtype not in _FLOATS or len(tensor.shape) != 2 or table.name in outputs:
            continue
        found.setdefault(table.name, (table, []))[1].append(node)
    return found


def quantize_embedding(
    rewriter: Rewriter, table: ir.Value, gathers: list[ir.Node], spec: GroupSpec, spill: SpillFile | None
) -> tuple[float, int, int]:
    """Rewrite one table; returns ``(relative error, bytes before, bytes after)``."""
    graph = rewriter.graph
    tensor = table.const_value
    e = np.array(tensor.numpy(), dtype=np.float32)
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
    qw = rtn(e, spec)
    error = float(np.linalg.norm(e - qw.dequantize()) / max(np.linalg.norm(e), 1e-30))
    before = int(e.size * tensor.dtype.itemsize)
    del e
    dtype = code_dtype(spec)
    pieces = [
        (f"{table.name}_q", dtype, qw.codes),
        (f"{table.name}_scale", tensor.dtype, qw.scales.astype(_FLOATS[tensor.dtype])),
    ]
    if qw.zero_points is not None:
        pieces.append((f"{table.name}_zero_point", dtype, qw.zero_points))
    values = add_initializers(rewriter, pieces, spill)
    after = sum(v.const_value.nbytes for v in values)
    rewriter.set_insertion_point(gathers[0])
    first = gathers[0].name
    dq = rewriter.create(
        "DequantizeLinear",
        values,
        {"axis": 1, "block_size": spec.group(int(tensor.shape[1]))},
        name=(first.rsplit("/", 1)[0] + "/DequantizeLinear") if "/" in first else f"{table.name}_dq",
        output_names=[rewriter.fresh_name(f"{table.name}_dq")],
    )
    dq.outputs[0].type = ir.TensorType(tensor.dtype)
    dq.outputs[0].shape = ir.Shape(list(tensor.shape))
    for node in gathers:
        node.replace_input_with(0, dq.outputs[0])
        node.metadata_props[QUANT_KEY] = spec.label()
        node.metadata_props[ALGO_KEY] = "rtn"
        node.metadata_props[ERROR_KEY] = f"{error:.4g}"
    if not table.uses():
        graph.initializers.pop(table.name)
    return error, before, after
