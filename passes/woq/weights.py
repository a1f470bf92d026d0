"""Finding weight MatMuls and rewriting them into the blocked-DequantizeLinear form.

:func:`weight_matmuls` lists the candidates (one entry per weight, with every
MatMul that reads it as its ``B``); :func:`write_quantized` puts one quantized
weight into the IR. Both are shared by the ``woq-*`` passes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.ops import is_onnx_domain
from ncc.ir.rewrite import Rewriter
from ncc.ir.spill import SpillFile, packed_tensor
from ncc.passes.woq.kernels import GroupSpec, QuantizedWeight

QUANT_KEY = "ncc.quant"
ALGO_KEY = "ncc.woq.algo"
ERROR_KEY = "ncc.woq.error"
_FLOATS = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


@dataclass
class WeightUse:
    """A constant ``[K, N]`` float weight and the MatMuls that read it as ``B``."""

    weight: ir.Value
    matmuls: list[ir.Node] = field(default_factory=list)

    @property
    def k(self) -> int:
        return int(self.weight.const_value.shape[0])

    @property
    def n(self) -> int:
        return int(self.weight.const_value.shape[1])

    @property
    def activations(self) -> list[str]:
        """Names of the activations this weight multiplies (one per distinct MatMul input), in graph order."""
        return list(dict.fromkeys(node.inputs[0].name for node in self.matmuls))

    @property
    def layer(self) -> str:
        return self.matmuls[0].name or self.weight.name

    @property
    def dtype(self) -> ir.DataType:
        return self.weight.const_value.dtype


def weight_matmuls(
    graph: ir.Graph, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[WeightUse]:
    """Weights read as ``B`` by a standard MatMul: rank-2 float initializers, in graph order."""
    chosen = _WeightFilter(graph, include, exclude)
    uses: dict[str, WeightUse] = {}
    for node in graph:
        if node.op_type != "MatMul" or not is_onnx_domain(node) or len(node.inputs) != 2:
            continue
        b = node.inputs[1]
        if chosen(node, b) is not None:
            uses.setdefault(b.name, WeightUse(b)).matmuls.append(node)
    return list(uses.values())


class _WeightFilter:
    """Which node reads a weight the weight-only passes take: a constant float matrix (not a graph output)
    whose node or weight name passes ``include`` / ``exclude`` (regexes searched in either name)."""

    def __init__(self, graph: ir.Graph, include: Sequence[str], exclude: Sequence[str]):
        self.include = [re.compile(p) for p in include]
        self.exclude = [re.compile(p) for p in exclude]
        self.outputs = {v.name for v in graph.outputs}

    def __call__(self, node: ir.Node, weight: ir.Value | None):
        """The weight's tensor when ``node`` reading ``weight`` is taken, else None."""
        tensor = weight.const_value if weight is not None and weight.is_initializer() else None
        if (
            tensor is None
            or tensor.dtype not in _FLOATS
            or len(tensor.shape) != 2
            or weight.name in self.outputs
        ):
            return None
        names = (node.name or "", weight.name or "")
        if self.include and not any(p.search(s) for p in self.include for s in names):
            return None
        return None if any(p.search(s) for p in self.exclude for s in names) else tensor


def gemms_as_matmuls(model: ir.Model, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> int:
    """Rewrite each ``Gemm(A, W, C)`` with a constant float rank-2 ``W`` (``alpha = beta = 1``, ``A`` not
    transposed, names passing the filters) as ``Add(MatMul(A, W_kn), C)``, so the weight-only passes
    quantize it like any linear: a rank-2 ``nn.Linear`` exports as a Gemm, and its ``[N, K]`` weight
    (``transB``) becomes the ``[K, N]`` one a MatMul reads. The MatMul takes the Gemm's name. Returns how
    many Gemms were rewritten."""
    graph = model.graph
    chosen = _WeightFilter(graph, include, exclude)
    rw = Rewriter(model, graph)
    transposed: dict[str, ir.Value] = {}
    count = 0
    for node in list(graph):
        if node.op_type != "Gemm" or not is_onnx_domain(node) or len(node.inputs) < 2:
            continue
        attrs = node.attributes
        if (
            attrs.get_int("transA", 0)
            or attrs.get_float("alpha", 1.0) != 1.0
            or attrs.get_float("beta", 1.0) != 1.0
        ):
            continue
        a, w = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        tensor = chosen(node, w)
        if tensor is None:
            continue
        weight = w
        if attrs.get_int("transB", 0):
            weight = transposed.get(w.name)
            if weight is None:
                weight = rw.constant(np.ascontiguousarray(tensor.numpy().T), f"{w.name}.T")
                transposed[w.name] = weight
        rw.set_insertion_point(node)
        out = node.outputs[0]
        matmul = rw.create("MatMul", [a, weight], name=node.name or None, absorbed=[node])
        result = matmul.outputs[0]
        result.type = out.type
        result.shape = out.shape
        if c is not None:
            add = rw.create(
                "Add", [result, c], name=f"{node.name}_bias" if node.name else None, absorbed=[node]
            )
            result = add.outputs[0]
            result.type, result.shape = out.type, out.shape
        rw.replace_op(node, [result])
        count += 1
    return count


def check_group_sizes(layers: list[tuple[str, str, int, int]], spec: GroupSpec, partial_groups: bool) -> None:
    """Refuse a group size that does not divide a layer's K (unless ``partial_groups``), naming what would work.

    ``layers`` are ``(layer, weight name, K, N)``, K being the axis the groups run along.
    """
    if not spec.group_size or partial_groups:
        return
    bad = [item for item in layers if item[2] % spec.group_size]
    if not bad:
        return
    ks = sorted({k for _, _, k, _ in layers})
    common = [g for g in (16, 32, 64, 128, 256, 512) if all(k % g == 0 for k in ks)]
    works = ", ".join(map(str, common)) if common else "none of 16..512"
    layer, weight, k, n = bad[0]
    more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    raise NccError(
        f"group size {spec.group_size} does not divide K={k} of {layer} (weight {weight} [{k}, {n}]){more}; "
        f"group sizes that divide every layer's K: {works}; or 0 for one scale per output channel, or "
        f"--partial-groups to give the last {k % spec.group_size} channels a shorter group."
    )


def read_weight_t(use: WeightUse) -> np.ndarray:
    """The weight transposed to ``[N, K]`` float32, in memory; a memory-mapped source is released."""
    tensor = use.weight.const_value
    wt = np.array(tensor.numpy().T, dtype=np.float32, order="C")
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
    return wt


def code_dtype(spec: GroupSpec) -> ir.DataType:
    if spec.bits == 4:
        return ir.DataType.INT4 if spec.symmetric else ir.DataType.UINT4
    return ir.DataType.INT8 if spec.symmetric else ir.DataType.UINT8


def write_quantized(
    rewriter: Rewriter,
    use: WeightUse,
    qw: QuantizedWeight,
    *,
    algo: str,
    error: float,
    spill: SpillFile | None,
) -> int:
    """Replace ``use``'s weight by ``DequantizeLinear(codes, scale, zero_point)``; returns the bytes written."""
    spec = qw.spec
    graph = rewriter.graph
    base = use.weight.name
    dtype = code_dtype(spec)
    scale_np = _FLOATS[use.dtype]
    pieces = [(f"{base}_q", dtype, qw.codes.T), (f"{base}_scale", use.dtype, qw.scales.T.astype(scale_np))]
    if qw.zero_points is not None:
        pieces.append((f"{base}_zero_point", dtype, qw.zero_points.T))
    values = add_initializers(rewriter, pieces, spill)
    written = sum(v.const_value.nbytes for v in values)
    k = use.k
    attrs = {"axis": 0, "block_size": spec.group(k)}
    rewriter.set_insertion_point(use.matmuls[0])
    dq = rewriter.create(
        "DequantizeLinear",
        values,
        attrs,
        name=_node_name(use, "DequantizeLinear"),
        output_names=[rewriter.fresh_name(f"{base}_dq")],
    )
    out = dq.outputs[0]
    out.type = ir.TensorType(use.dtype)
    out.shape = ir.Shape([k, use.n])
    for node in use.matmuls:
        node.replace_input_with(1, out)
        node.metadata_props[QUANT_KEY] = spec.label()
        node.metadata_props[ALGO_KEY] = algo
        node.metadata_props[ERROR_KEY] = f"{error:.4g}"
    if not use.weight.uses():
        graph.initializers.pop(use.weight.name)
    return written


def add_initializers(
    rewriter: Rewriter, pieces: list[tuple[str, ir.DataType, np.ndarray]], spill: SpillFile | None
) -> list[ir.Value]:
    """Register ``(name, dtype, array)`` pieces as initializers (spilled when ``spill`` is given), in order."""
    values = []
    for name, dt, array in pieces:
        name = rewriter.fresh_name(name)
        tensor = spill.put(array, dt, name) if spill is not None else packed_tensor(array, dt, name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dt), const_value=tensor)
        rewriter.graph.register_initializer(value)
        values.append(value)
    return values


def _node_name(use: WeightUse, op: str) -> str:
    layer = use.matmuls[0].name
    if layer:
        return layer.rsplit("/", 1)[0] + f"/{op}" if "/" in layer else f"{layer}_{op}"
    return f"{use.weight.name}_{op}"
