"""Check an emitted model against its target: what really runs as integer kernels.

onnxruntime rewrites a QDQ graph when it loads it (DQ → Conv → Q becomes
QLinearConv, DQ → MatMul becomes MatMulIntegerToFloat, …) and silently keeps
a node in float when its pattern does not fit. This loads the artefact the way
a user will (CPU provider, all optimizations), reads back the optimized graph
and matches it to the nodes ncc quantized (by node name, which onnxruntime's
fusions keep), so the compile report can say how many quantized nodes run as
integer kernels and which do not. Weight-only quantized MatMuls (``w4g128``
...) count as running quantized when they are MatMulNBits after loading: as
emitted (``--format matmulnbits``) or fused by onnxruntime from blocked
DequantizeLinear + MatMul (``--format qdq``).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.ops import DATA_MOVEMENT as _MOVEMENT

INTEGER_KERNELS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
        "QLinearConcat",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QLinearWhere",
        "QLinearResize",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "MatMulNBits",
        "GatherBlockQuantized",
        "QAttention",
        "QEmbedLayerNormalization",
        "QLinearReduceMean",
    }
)


@dataclass
class RuntimeCheck:
    runtime: str
    #: Quantized ncc nodes (compute ops marked ``ncc.quant``) and the kernel each became.
    integer: dict[str, str] = field(default_factory=dict)
    #: Quantized ncc nodes onnxruntime runs in float, with the reason we can tell.
    float_: dict[str, str] = field(default_factory=dict)
    kernels: Counter = field(default_factory=Counter)
    #: Quantized nodes whose name is empty or repeated: matched by name, so not checked.
    unnamed: int = 0
    #: Conv/Gemm nodes ncc left in float that onnxruntime nevertheless runs as integer kernels.
    requantized: dict[str, str] = field(default_factory=dict)
    #: What the checked nodes are and what they should run as (bf16 models: "bf16 layers", "bf16 kernels").
    label: str = "quantized nodes"
    low_label: str | None = None
    #: What else the runtime does to the checked layers that changes their numbers (one sentence each).
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.integer) + len(self.float_)

    def summary(self) -> str:
        weight_only = bool(self.kernels) and set(self.kernels) <= {"MatMulNBits", "GatherBlockQuantized"}
        kind = self.low_label or ("weight-only quantized kernels" if weight_only else "integer kernels")
        lines = [
            f"on {self.runtime}: {len(self.integer)}/{self.total} {self.label} run as {kind}"
            + (
                " (" + ", ".join(f"{k} {n}" for k, n in sorted(self.kernels.items())) + ")"
                if self.kernels
                else ""
            )
        ]
        for name, why in sorted(self.float_.items())[:20]:
            lines.append(f"  runs in float: {name}: {why}")
        if len(self.float_) > 20:
            lines.append(f"  ... and {len(self.float_) - 20} more")
        if self.unnamed:
            lines.append(f"  not checked: {self.unnamed} quantized nodes without a unique name")
        for name, kernel in sorted(self.requantized.items()):
            lines.append(f"  runs quantized although ncc kept it in float: {name} ({kernel})")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def check_on_onnxruntime(
    path: str | Path, model: ir.Model, *, shown: str | Path | None = None
) -> RuntimeCheck:
    """Load ``path`` (the emitted file of ``model``) in onnxruntime and classify ``model``'s quantized nodes;
    ``shown`` names the file in messages (the final name, when ``path`` is its temporary)."""
    import onnx
    import onnxruntime as ort
    from ncc.runtime import open_session, session_options

    marked = [
        n
        for n in model.graph
        if n.metadata_props.get("ncc.quant", "").startswith(("int8", "w4", "w8"))
        and n.op_type not in _MOVEMENT
    ]
    names = Counter(n.name for n in model.graph)
    quantized = {n.name: n.op_type for n in marked if n.name and names[n.name] == 1}
    with tempfile.TemporaryDirectory(prefix="ncc-check-") as tmp:
        optimized_path = Path(tmp) / "optimized.onnx"
        options = session_options(optimization="extended", optimized_model=optimized_path)
        # a failure to load is the finding; it names the file the user will get, not the temporary one
        try:
            open_session(path, options=options, what=f"the emitted model {shown or path}")
        except NccError as err:
            raise NccError(str(err).replace(str(path), str(shown or path))) from None
        optimized = onnx.load(str(optimized_path), load_external_data=False)
    by_name = {n.name: n for n in optimized.graph.node}
    check = RuntimeCheck(
        runtime=f"onnxruntime {ort.__version__} CPUExecutionProvider", unnamed=len(marked) - len(quantized)
    )
    for name, op in quantized.items():
        node = by_name.get(name) or next(
            (n for n in optimized.graph.node if name and n.name.startswith(name)), None
        )
        if node is None:
            check.float_[name] = f"{op} not found after onnxruntime's optimizations"
        elif node.op_type in INTEGER_KERNELS:
            check.integer[name] = node.op_type
            check.kernels[node.op_type] += 1
        else:
            check.float_[name] = f"{op} stays {node.op_type} in float ({_why(node, optimized)})"
    for node in model.graph:  # what ncc keeps in float must stay float (see insert-qdq's per-axis DQ)
        if (
            node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
            and "ncc.quant" not in node.metadata_props
        ):
            got = by_name.get(node.name) if node.name and names[node.name] == 1 else None
            if got is not None and got.op_type in INTEGER_KERNELS:
                check.requantized[node.name] = got.op_type
    return check


def _why(node, graph) -> str:
    producers = {o: n for n in graph.graph.node for o in n.output}
    consumers = Counter(i for n in graph.graph.node for i in n.input)
    dq_inputs = [i for i in node.input if i in producers and producers[i].op_type == "DequantizeLinear"]
    if not dq_inputs:
        return "its inputs are not dequantized integers"
    out = node.output[0] if node.output else ""
    if out and consumers[out] != 1:
        return "its output has several consumers, so no QuantizeLinear can be fused"
    return "onnxruntime has no fused kernel for this pattern"
