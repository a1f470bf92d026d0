"""``ncc diff FLOAT QUANT --data DATA``: which quantized node costs how much fidelity, and which to keep in float.

For every quantized node of QUANT (a node other than Quantize/DequantizeLinear reading a
DequantizeLinear output: ncc's QDQ form, or onnxruntime's; a QOperator model's integer kernels are read
as QDQ groups first, :mod:`ncc.passes.lowering.raise_qoperator`), against FLOAT on the same inputs:

- **in float: gain**: how many dB QUANT's output SQNR rises when only this node runs in float (its
  activations without their Q/DQ, its weights FLOAT's; a fused node keeps QUANT's weights, dequantized,
  since FLOAT has no weights of the fused layer): about what ``--exclude`` of this one node buys. The
  table is sorted by it, largest first. One run of QUANT per node (``gains=False``/``--fast`` skips
  them and sorts by the next column).
- **adds**: the SQNR of the node run quantized *on FLOAT's inputs* (its own Q/DQ around it, with QUANT's
  scales and weights, fed the float model's values) against the float output: the error it alone brings.
- **carries**: the SQNR and cosine of the node's output in QUANT against the same value in FLOAT: the
  error everything up to and including it has built up.

Above the table, the error's two sources apart: QUANT's output SQNR with only its weights quantized
(every activation read without its Q/DQ) and with only its activations quantized (its nodes given FLOAT's
weights and biases). The second is about what any weight method (learned rounding, GPTQ-style updates)
can reach: on EfficientNet-Lite0 it sits less than 2 dB above the int8 model's own SQNR. It is not a strict
bound: a bias correction for the activations' mean shift can add to it (QUANT's biases carry one, which
also compensates its own weights' rounding, so they are not kept there).

Ranking by fallback gain is what predicts which nodes to keep in float: on all-MiniLM-L6-v2 the five
nodes with the largest gain, kept in float together, recover far more than five random ones, while the
five worst by the local columns do no better than random (``benchmarks/bench_diff.py``).

Nodes pair up by ncc's stable node ids (:mod:`ncc.ir.ids`): a node QUANT built by fusing FLOAT's nodes
(a Conv with its BatchNormalization folded in) records their ids, and its output stands for the last of
them. Where ids do not match (a model onnxruntime quantized) nodes pair by name (``<name>_quant`` in its
QOperator form), then by output name.
Padded positions (an ``attention_mask`` input's zeros) are left out of every number. A float activation
times a dequantized weight is computed in float (:data:`ncc.runtime.WEIGHT_ONLY_IN_FLOAT`): onnxruntime
would otherwise quantize that activation itself, in the weights-only run and in a weight-only model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.ids import COMPLETED_BY_KEY, carries_ids, fused_ids, node_id
from ncc.ir.ops import onnx_opset
from ncc.ir.rewrite import dequantized_array
from ncc.metrics import position_mask, relative_l2_error, token_masks
from ncc.passes.quant import fallback
from ncc.runtime import WEIGHT_ONLY_IN_FLOAT

QDQ = ("QuantizeLinear", "DequantizeLinear")
RESCALED = 1.5
"""A value whose norm is more than this factor off FLOAT's same-named one was rescaled by a pass that kept its
name (smooth-quant's division, an attention scale folded into a projection): comparing the two would measure
the scaling, not the quantization, whose error leaves the norm nearly as it was."""
RESCALE_FIT = 0.35
"""The relative L2 error within which fitted factors must bring FLOAT's value to QUANT's for it to count as
rescaled (quantization error on top of a pass's scaling stays below it; damage does not)."""
CHANNEL_FIT_VALUES = 256
"""Values per channel a per-channel fit needs (with fewer, one factor per channel fits anything)."""
MATCHING_WEIGHT = 0.25
"""The largest relative L2 difference at which FLOAT's weight stands in for QUANT's dequantized one: 8- and
4-bit rounding stay far below it, a weight a pass rescaled is far above."""
KEEPS_WEIGHTS = frozenset({"Pad"})
"""Ops whose fusion into a node leaves that node's weights FLOAT's (a BatchNormalization's does not)."""


@dataclass
class Diff:
    """The rows, worst first, and QUANT's own output SQNR against FLOAT on ``samples`` samples; with only
    QUANT's weights quantized, and with only its activations quantized (``float_weights_kept`` quantized
    nodes keep their quantized weights there: FLOAT has none of theirs)."""

    rows: list
    output_sqnr_db: float
    samples: int
    weights_only_sqnr_db: float | None = None
    activations_only_sqnr_db: float | None = None
    float_weights_kept: int = 0
    raised: str = ""  # what of QUANT's integer kernels was read as QDQ groups


@dataclass
class Row:
    """One quantized node: where it is, what it carries and what it adds."""

    index: int  # position among QUANT's nodes (graph order)
    node: str  # name (or #id)
    op_type: str
    value: str  # FLOAT's value it is compared with
    carried_sqnr_db: float | None
    carried_cosine: float | None
    added_sqnr_db: float | None
    fallback_sqnr_db: float | None = None  # QUANT's output SQNR with only this node in float
    gain_db: float | None = None  # how much that raises QUANT's output SQNR
    note: str = ""


def diff(
    float_model: ir.Model,
    quant_model: ir.Model,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    gains: bool = True,
    budget: bool = True,
) -> Diff:
    """The table for ``quant_model`` against ``float_model`` on ``feeds`` (batches): with ``gains``
    (one run of QUANT per node, with only that node in float) the node whose fallback gains the most
    output SQNR first; without, the node adding the most error locally first. ``budget``: also the output
    SQNR with only the weights and with only the activations quantized (two runs)."""
    quantized_first = sum(1 for node in float_model.graph if _reads_dequantized(node))
    if quantized_first:
        raise NccError(
            f"the first model is quantized too ({quantized_first} nodes read a DequantizeLinear output): "
            "ncc diff compares a float model with its QDQ form; give the float model first."
        )
    with_ids = carries_ids(quant_model)  # before any clone: a clone forgets it
    quant_model, raised = _as_qdq(quant_model)
    pairs = _pairs(float_model, quant_model, with_ids)
    if not pairs:
        from ncc.backends.onnx.check import INTEGER_KERNELS

        if any(n.op_type == "DynamicQuantizeLinear" for n in quant_model.graph):
            raise NccError(
                "the second model quantizes its activations at run time (DynamicQuantizeLinear) in a form ncc "
                "diff cannot read as DequantizeLinear + float op: compile it with quantize-dynamic{form=qdq}."
            )
        integer = sorted({n.op_type for n in quant_model.graph if n.op_type in INTEGER_KERNELS})
        if integer:
            raise NccError(
                f"the second model computes in integer operators ncc diff cannot read as QDQ "
                f"({', '.join(integer)}): compile the same pipeline with --format qdq (the default) and "
                "diff that file."
            )
        raise NccError(
            "the second model has no quantized nodes (nodes reading a DequantizeLinear output): "
            "ncc diff compares a float model with its QDQ form."
        )
    isolation, needed = _isolation(float_model, quant_model, pairs)
    masks = token_masks(feeds)
    carried, added, final, ref = _compare(float_model, quant_model, isolation, needed, pairs, feeds, masks)
    baseline = min(sums.sqnr() for sums in final.values())
    float_names = {v.name for n in float_model.graph for v in n.outputs} | {
        v.name for v in float_model.graph.inputs
    }
    rescaled = {name for name, sums in carried.items() if sums.rescaled()}
    for pair in pairs:  # a pass moved a scale into this node's weights: its input is rescaled or new
        rescaled_input = any(
            (source := _activation_source(v)) is not None
            and (source in rescaled or source not in float_names)
            for v in pair.node.inputs
        )
        pair.float_constants = _float_constants(pair.node, pair.twin, rescaled_input)
    fallbacks = _fallback_outputs(quant_model, pairs, feeds, ref, masks) if gains else {}
    weights_only, activations_only, kept = (
        _budget(quant_model, pairs, feeds, ref, masks) if budget else (None, None, 0)
    )
    rows = []
    for pair in pairs:
        label = pair.node.name or f"#{node_id(pair.node)}"
        if pair.float_value is None:
            rows.append(
                Row(pair.index, label, pair.node.op_type, "", None, None, None, "no float counterpart")
            )
            continue
        sums = carried[pair.compared]
        if sums.shapes_differ:
            rows.append(
                Row(pair.index, label, pair.node.op_type, pair.float_value, None, None, None, "shapes differ")
            )
            continue
        alone, notes = added.get(pair.isolated), [pair.note] if pair.note else []
        moved = [(n, carried[n].scale()) for n in pair.reads if n in carried and carried[n].rescaled()]
        if moved:
            alone = None
            notes += [
                f"not isolated: its input {n!r} is {x:.3g}x FLOAT's (rescaled by a pass)" for n, x in moved
            ]
        if sums.rescaled():
            notes.append(f"its output is {sums.scale():.3g}x FLOAT's (rescaled by a pass): not compared")
        rows.append(
            Row(
                pair.index,
                label,
                pair.node.op_type,
                pair.float_value,
                None if sums.rescaled() else sums.sqnr(),
                None if sums.rescaled() else sums.cosine(),
                alone.sqnr() if alone is not None and not alone.shapes_differ else None,
                fallbacks.get(pair.index),
                fallbacks[pair.index] - baseline if pair.index in fallbacks else None,
                "; ".join(notes),
            )
        )
    samples = sum(len(next(iter(f.values()))) for f in feeds)
    return Diff(
        sorted(rows, key=_worst_first), baseline, samples, weights_only, activations_only, kept, raised
    )


def _as_qdq(quant_model: ir.Model) -> tuple[ir.Model, str]:
    """``quant_model``, with its integer kernels (a QOperator model) raised to QDQ groups on a copy
    (:mod:`ncc.passes.lowering.raise_qoperator`), and what was raised ("" when nothing was)."""
    from ncc.passes.base import PassContext
    from ncc.passes.lowering.raise_qoperator import RaiseQOperator, raises

    if not any(raises(node) for node in quant_model.graph):
        return quant_model, ""
    model = quant_model.clone()
    result = RaiseQOperator().run(model, PassContext())
    return model, result.notes[0] if result.modified else ""


def format_table(result: Diff, top: int | None = None) -> str:
    """The rows as a text table (the ``top`` first), under QUANT's own output SQNR."""
    rows = result.rows
    shown = list(rows)[:top] if top else list(rows)
    kept = result.float_weights_kept
    lines = [
        f"output SQNR of the quantized model: {_db(result.output_sqnr_db)} dB ({result.samples} samples)",
        f"with only its weights quantized: {_db(result.weights_only_sqnr_db)} dB; with only its activations "
        f"quantized: {_db(result.activations_only_sqnr_db)} dB"
        + (f" ({kept} node{'s' * (kept != 1)} keep quantized weights: no float twin)" if kept else ""),
        *([f"read as QDQ: {result.raised.removeprefix('raise-qoperator: ')}"] if result.raised else []),
        f"{'rank':>4}  {'in float: gain dB':>17}  {'adds SQNR dB':>12}  {'carries SQNR dB':>15}  "
        f"{'cosine':>8}  {'op':<14} node",
    ]
    for rank, row in enumerate(shown, 1):
        note = f"  ({row.note})" if row.note else ""
        gain = "-" if row.gain_db is None else f"{row.gain_db:+.2f}"
        lines.append(
            f"{rank:>4}  {gain:>17}  {_db(row.added_sqnr_db):>12}  {_db(row.carried_sqnr_db):>15}  "
            f"{'' if row.carried_cosine is None else f'{row.carried_cosine:.5f}':>8}  "
            f"{row.op_type:<14} {row.node}{note}"
        )
    if top and len(rows) > top:
        lines.append(f"... {len(rows) - top} more quantized nodes (--top {len(rows)} shows all)")
    return "\n".join(lines)


def as_json(result: Diff) -> dict:
    """The result as JSON-ready data (an infinite SQNR as null: the outputs are equal)."""
    rows = []
    for row in result.rows:
        item = asdict(row)
        for key in ("carried_sqnr_db", "added_sqnr_db", "fallback_sqnr_db", "gain_db"):
            if item[key] is not None and not math.isfinite(item[key]):
                item[key] = None
        rows.append(item)
    finite = {
        key: value if value is not None and math.isfinite(value) else None
        for key, value in (
            ("output_sqnr_db", result.output_sqnr_db),
            ("weights_only_sqnr_db", result.weights_only_sqnr_db),
            ("activations_only_sqnr_db", result.activations_only_sqnr_db),
        )
    }
    return {
        **finite,
        "float_weights_kept": result.float_weights_kept,
        "samples": result.samples,
        "rows": rows,
    }


def plot(result: Diff, path) -> None:
    """Per-node SQNR along QUANT's graph order (carried and added) as an image at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NccError('--plot needs matplotlib (pip install -e ".[plot]").') from None
    ordered = sorted(result.rows, key=lambda r: r.index)
    xs = range(len(ordered))
    fig, ax = plt.subplots(figsize=(max(6.0, len(ordered) * 0.12), 3.5))
    series = (
        ("carried_sqnr_db", "carries (its output vs float)"),
        ("added_sqnr_db", "adds (the node alone)"),
        ("fallback_sqnr_db", "model output with only it in float"),
    )
    for key, label in series:
        ys = [getattr(r, key) if getattr(r, key) is not None else np.nan for r in ordered]
        ax.plot(list(xs), [min(y, 80.0) for y in ys], marker=".", label=label)
    ax.set_xlabel("quantized node (graph order)")
    ax.set_ylabel("SQNR dB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format=str(path).rsplit(".", 1)[-1] if "." in str(path) else "png")
    plt.close(fig)


# -- pairing ------------------------------------------------------------------------------------------


@dataclass
class _Pair:
    index: int
    node: ir.Node  # QUANT's quantized node
    float_value: str | None  # the FLOAT value its output stands for
    twin: ir.Node | None = None  # FLOAT's same node (same id or name, not a fusion), whose weights it has
    isolated: str = ""  # its copy's output in the isolation model ("" when it could not be built)
    reads: tuple[str, ...] = ()  # the FLOAT values its copy reads
    # (input index, FLOAT's constant, tensor) for each dequantized constant it reads in float (the fallback and
    # activations-only runs); None where FLOAT has none that stands in for them
    float_constants: tuple[tuple[int, ir.Value, ir.TensorProtocol], ...] | None = None
    note: str = ""
    #: (QUANT's value, FLOAT's) for the op that completes the node's output (:data:`COMPLETED_BY_KEY`)
    activation: tuple[str, str] | None = None

    @property
    def completed(self) -> bool:
        """Whether the op after the node, not the node, gives the value ``float_value`` stands for (the bias
        Add of a Gemm split into MatMul + Add): that op's output is what is compared."""
        return self.activation is not None and self.activation[1] == self.float_value

    @property
    def compared(self) -> str:
        """QUANT's value compared with FLOAT's ``float_value``."""
        return self.activation[0] if self.completed else self.node.outputs[0].name


def _pairs(float_model: ir.Model, quant_model: ir.Model, with_ids: bool = True) -> list[_Pair]:
    """QUANT's quantized nodes and their FLOAT counterparts; by id only ``with_ids`` (QUANT kept the ids ncc
    gave: ids given to another tool's file when it was loaded match nothing)."""
    by_id = {i: n for n in float_model.graph if (i := node_id(n)) is not None} if with_ids else {}
    by_name = {n.name: n for n in float_model.graph if n.name}
    float_values = {v.name for n in float_model.graph for v in n.outputs} | {
        v.name for v in float_model.graph.inputs
    }
    pairs = []
    for index, node in enumerate(quant_model.graph):
        if not _reads_dequantized(node):
            continue
        if not node.outputs or node.outputs[0].dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, None):
            continue
        pair = _Pair(index, node, *_counterpart(node, by_id, by_name, float_values, with_ids))
        pair.activation = _completion(node, by_id, by_name, pair.float_value)
        pairs.append(pair)
    return pairs


def _counterpart(
    node: ir.Node, by_id, by_name, float_values, with_ids: bool = True
) -> tuple[str | None, ir.Node | None]:
    """The FLOAT value ``node``'s output stands for, and FLOAT's same node when there is one: its id's node,
    else the last node of those it absorbed (no twin: a fusion), else the node of its name (onnxruntime's
    QOperator form names it ``<name>_quant``), else a value of its output's name."""
    own = node_id(node)
    if own is not None and own in by_id and by_id[own].op_type == node.op_type:
        return by_id[own].outputs[0].name, by_id[own]
    fused = fused_ids(node) if with_ids else ()
    # the op that completes the node's output (a Relu, a bias Add) is a node of its own again
    inserted = node.metadata_props.get(COMPLETED_BY_KEY)
    absorbed = [by_id[i] for i in fused if i in by_id and by_id[i].op_type != inserted]
    if absorbed:
        inside = {id(n) for n in absorbed}
        last = [n for n in absorbed if not any(id(u.node) in inside for u in n.outputs[0].uses())]
        if len(last) == 1:
            # a Pad folded into a Conv leaves its weights as they were: the Conv is still a twin
            same = [n for n in absorbed if n.op_type == node.op_type]
            keeps_weights = len(same) == 1 and all(
                n.op_type in KEEPS_WEIGHTS for n in absorbed if n is not same[0]
            )
            return last[0].outputs[0].name, same[0] if keeps_weights else None
    twin = _named(node, by_name)
    if twin is not None and twin.op_type == node.op_type:
        return twin.outputs[0].name, None if fused else twin
    name = node.outputs[0].name
    return (name if name in float_values else None), None


def _named(node: ir.Node, by_name) -> ir.Node | None:
    if not node.name:
        return None
    return by_name.get(node.name) or by_name.get(node.name.removesuffix("_quant"))


def _completion(node: ir.Node, by_id, by_name, float_value: str | None) -> tuple[str, str] | None:
    """The output of the op that completes ``node``'s (:data:`COMPLETED_BY_KEY`: a Relu, a bias Add), and what it
    stands for in FLOAT: FLOAT's same op (absorbed by id, else reading FLOAT's node of the same name), else,
    where FLOAT has none (a Relu the output's saturation implies, a Gemm's bias), the node's own
    ``float_value``."""
    inserted = node.metadata_props.get(COMPLETED_BY_KEY)
    act = [u.node for u in node.outputs[0].uses() if u.node.op_type == inserted] if inserted else []
    if len(act) != 1:
        return None
    same = [by_id[i] for i in fused_ids(node) if i in by_id and by_id[i].op_type == inserted]
    if not same and (twin := _named(node, by_name)) is not None and twin.op_type == node.op_type:
        same = [u.node for u in twin.outputs[0].uses() if u.node.op_type == inserted]
    if len(same) == 1:
        return act[0].outputs[0].name, same[0].outputs[0].name
    return (act[0].outputs[0].name, float_value) if not same and float_value else None


def _quantizer(dq: ir.Node) -> ir.Node | None:
    """The node quantizing what DequantizeLinear ``dq`` reads: a QuantizeLinear, or the DynamicQuantizeLinear
    of an activation quantized at run time (whose scale and zero point ``dq`` reads too); None for a
    constant."""
    q = dq.inputs[0].producer()
    if q is None or q.op_type not in ("QuantizeLinear", "DynamicQuantizeLinear"):
        return None
    return q if q.outputs[0] is dq.inputs[0] else None


def _activation_source(value: ir.Value | None) -> str | None:
    """The name of the activation a quantizer -> DequantizeLinear pair feeding ``value`` quantizes."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = _quantizer(dq)
    return q.inputs[0].name if q is not None else None


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def _reads_dequantized(node: ir.Node) -> bool:
    """Whether ``node`` is a quantized node: one other than Quantize/DequantizeLinear reading a
    DequantizeLinear output."""
    return node.op_type not in QDQ and any(_dequantized(v) for v in node.inputs)


def _dequantized(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear"


# -- rebuilding a quantized node where float values are ------------------------------------------


class _Rebuilder:
    """Copies of QUANT's quantized nodes, each with its own Q/DQ, built into ``graph`` and reading float
    values that ``lookup(FLOAT name)`` provides (graph inputs of an isolation model, or the values of a
    FLOAT clone). A node it cannot rebuild raises LookupError naming the missing value."""

    def __init__(self, graph: ir.Graph, lookup, float_names: set[str], float_of: dict[str, str]):
        self.graph, self.lookup = graph, lookup
        self.float_names, self.float_of = float_names, float_of
        self.copies: dict[int, ir.Value] = {}
        self.count = 0

    def node(self, node: ir.Node) -> ir.Value:
        """The copy of ``node`` (its output); on LookupError nothing is left in the graph."""
        mark = len(self.graph)
        try:
            return self.copy(node, [self.rebuilt(v) for v in node.inputs])
        except LookupError:
            for extra in list(self.graph)[mark:]:
                self.graph.remove(extra)
            raise

    def fresh(self, value: ir.Value) -> str:
        self.count += 1
        return f"ncc.diff.{self.count}.{value.name}"

    def float_input(self, value: ir.Value) -> ir.Value:
        name = value.name if value.name in self.float_names else self.float_of.get(value.name)
        if name is None:
            producer = value.producer()
            if producer is not None and producer.op_type == "Identity":
                return self.float_input(producer.inputs[0])
            raise LookupError(value.name)
        return self.lookup(name)

    def constant(self, value: ir.Value) -> ir.Value:
        if id(value) not in self.copies:
            copy = ir.Value(
                name=self.fresh(value), type=value.type, shape=value.shape, const_value=value.const_value
            )
            self.graph.register_initializer(copy)
            self.copies[id(value)] = copy
        return self.copies[id(value)]

    def rebuilt(self, value: ir.Value | None) -> ir.Value | None:
        """``value`` as the copy reads it: a DequantizeLinear of QUANT's (re-quantizing the float value with
        QUANT's parameters when it is an activation), a constant, or the float value."""
        if value is None:
            return None
        if value.const_value is not None and value.producer() is None:
            return self.constant(value)
        if id(value) in self.copies:  # a run-time scale or zero point of a quantizer copied already
            return self.copies[id(value)]
        dq = value.producer()
        if dq is not None and dq.op_type == "DequantizeLinear":
            source = dq.inputs[0]
            q = _quantizer(dq)
            if q is not None:
                source = self.copy(q, [self.float_input(q.inputs[0]), *map(self.rebuilt, q.inputs[1:])])
            elif source.const_value is None:
                raise LookupError(source.name)
            else:
                source = self.constant(source)
            return self.copy(dq, [source, *map(self.rebuilt, dq.inputs[1:])])
        return self.float_input(value)

    def copy(self, node: ir.Node, new_inputs) -> ir.Value:
        """A copy of ``node`` reading ``new_inputs``; its first output (the others are remembered for the
        values that read them: a DynamicQuantizeLinear's scale and zero point)."""
        outputs = [ir.Value(name=self.fresh(out), type=out.type, shape=out.shape) for out in node.outputs]
        self.graph.append(
            ir.Node(node.domain, node.op_type, new_inputs, list(node.attributes.values()), outputs=outputs)
        )
        for old, new in zip(node.outputs[1:], outputs[1:]):
            self.copies[id(old)] = new
        return outputs[0]


def _isolation(float_model: ir.Model, quant_model: ir.Model, pairs: list[_Pair]):
    """A model holding a copy of each paired node with its own Q/DQ, reading FLOAT's values as graph
    inputs; and the FLOAT values it reads. Nodes it cannot rebuild keep ``isolated`` empty."""
    float_values = {v.name: v for n in float_model.graph for v in n.outputs}
    float_values.update({v.name: v for v in float_model.graph.inputs})
    float_of = {p.compared: p.float_value for p in pairs if p.float_value}
    float_of.update(p.activation for p in pairs if p.activation is not None)
    graph = ir.Graph([], [], nodes=[], opset_imports=dict(quant_model.opset_imports), name="isolation")
    model = ir.Model(graph, ir_version=max(quant_model.ir_version, 8))
    inputs: dict[str, ir.Value] = {}
    reads: list[str] = []

    def lookup(name: str) -> ir.Value:
        reads.append(name)
        if name not in inputs:
            source = float_values[name]
            if source.dtype is None:
                raise LookupError(name)
            inputs[name] = ir.Value(name=name, type=source.type, shape=source.shape)
            graph.inputs.append(inputs[name])
        return inputs[name]

    rebuild = _Rebuilder(graph, lookup, set(float_values), float_of)
    for pair in pairs:
        if pair.float_value is None or len(pair.node.outputs) != 1 or _has_subgraph(pair.node):
            continue
        reads.clear()
        try:
            output = rebuild.node(pair.node)
            if pair.completed:  # the op completing the node's output is copied with it
                (use,) = [
                    u.node for u in pair.node.outputs[0].uses() if u.node.outputs[0].name == pair.compared
                ]
                output = rebuild.copy(
                    use, [output if v is pair.node.outputs[0] else rebuild.rebuilt(v) for v in use.inputs]
                )
        except LookupError as missing:
            pair.note = f"not isolated: no float value for {missing.args[0]!r}"
            continue
        graph.outputs.append(output)
        pair.isolated, pair.reads = output.name, tuple(dict.fromkeys(reads))
    if not graph.outputs:
        return None, []
    if onnx_opset(model) < 13 and any(
        n.op_type in QDQ and n.attributes.get_int("axis", None) is not None for n in graph
    ):
        model.opset_imports[""] = 13
    return model, list(inputs)


def _compare(float_model, quant_model, isolation, needed, pairs, feeds, masks):
    """FLOAT, QUANT and the isolation model run batch by batch, each batch's values folded into running
    sums and dropped (a CNN's activations for a few hundred samples are tens of gigabytes): per QUANT output
    (each pair's) against FLOAT's, the carried :class:`_Sums`; per isolated copy, the added ones; per graph
    output, QUANT's against FLOAT's; and FLOAT's graph outputs per batch, which the fallback runs compare
    with."""
    outputs = [v.name for v in float_model.graph.outputs]
    fed = {v.name for v in float_model.graph.inputs}
    compared = {p.compared: p.float_value for p in pairs if p.float_value}
    isolated = {p.isolated: p.float_value for p in pairs if p.isolated}
    wanted = list(dict.fromkeys([*compared.values(), *needed, *outputs]))
    # QUANT's own values of the names the isolated copies read: where a pass rescaled one (and kept its
    # name), FLOAT's is not what QUANT's node reads, and the copy's error would be the scaling
    written = {v.name for n in quant_model.graph for v in n.outputs if v.name}
    shared = [n for n in needed if n in written and n not in compared]
    float_session = fallback.measuring_session(
        float_model, [n for n in wanted if n not in fed], config=WEIGHT_ONLY_IN_FLOAT
    )
    quant_session = fallback.measuring_session(quant_model, [*compared, *shared], config=WEIGHT_ONLY_IN_FLOAT)
    alone_session = (
        fallback.measuring_session(isolation, config=WEIGHT_ONLY_IN_FLOAT) if isolation is not None else None
    )
    carried = {name: _Sums() for name in compared}
    added = {name: _Sums() for name in isolated}
    final = {name: _Sums() for name in outputs}
    read = {name: _Sums() for name in shared}
    reference: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    for index, feed in enumerate(feeds):
        where = f"calibration batch {index}"
        ref = float_session.run(feed, where=where)
        ref.update({n: feed[n] for n in wanted if n in fed})
        got = quant_session.run(feed, where=where)
        mask = masks[index] if index < len(masks) else None
        for name, float_name in compared.items():
            carried[name].add(ref[float_name], got[name], mask)
        for name in outputs:
            final[name].add(ref[name], got[name], mask)
        for name in shared:
            read[name].add(ref[name], got[name], mask)
        if alone_session is not None:
            alone = alone_session.run({v.name: ref[v.name] for v in isolation.graph.inputs}, where=where)
            for name, float_name in isolated.items():
                added[name].add(ref[float_name], alone[name], mask)
        for name in outputs:
            reference[name].append(ref[name])
    carried.update({name: sums for name, sums in read.items() if name not in carried})
    return carried, added, final, reference


class _Sums:
    """Running sums comparing a value with FLOAT's over batches, padded positions left out: the SQNR as
    :func:`ncc.metrics.relative_l2_error` computes it (in the arrays' own precision, at least float32), the
    cosine and the norms in float64."""

    def __init__(self) -> None:
        self.num = self.den = self.gg = 0.0
        self.shapes_differ = False
        # per channel of the last axis: sum(ref * got), sum(ref * ref) (their totals give the cosine and the
        # norms, the channels the best per-channel rescaling)
        self.channel_dot: np.ndarray | float = 0.0
        self.channel_rr: np.ndarray | float = 0.0
        self.count = 0

    def add(self, ref: np.ndarray, got: np.ndarray, mask) -> None:
        if ref.shape != got.shape:
            self.shapes_differ = True
            return
        keep = position_mask(ref, mask)
        diff = np.subtract(ref, got, dtype=np.result_type(ref, np.float32))
        r = ref
        if keep is not None:
            diff *= keep
            r = ref * keep
        flat_r, flat_d = r.reshape(-1), diff.reshape(-1)
        self.num += float(np.dot(flat_d, flat_d))
        self.den += float(np.dot(flat_r, flat_r))
        r64, g64 = ref.astype(np.float64), got.astype(np.float64)
        if keep is not None:
            r64, g64 = r64 * keep, g64 * keep
        rows_r = r64.reshape(-1, r64.shape[-1] if r64.ndim else 1)
        rows_g = g64.reshape(rows_r.shape)
        self.channel_dot = self.channel_dot + np.einsum("ij,ij->j", rows_r, rows_g)
        self.channel_rr = self.channel_rr + np.einsum("ij,ij->j", rows_r, rows_r)
        flat_g = g64.reshape(-1)
        self.gg += float(np.dot(flat_g, flat_g))
        self.count += r64.size

    @property
    def dot(self) -> float:
        return float(np.sum(self.channel_dot))

    @property
    def rr(self) -> float:
        return float(np.sum(self.channel_rr))

    def scale(self) -> float:
        """How many times FLOAT's norm the compared value's is (1.0 where either is zero)."""
        return math.sqrt(self.gg / self.rr) if self.rr > 0 and self.gg > 0 else 1.0

    def rescaled(self) -> bool:
        """Whether the value is not FLOAT's but a rescaled one: its norm off FLOAT's by more than
        :data:`RESCALED`, while FLOAT's value scaled by fitted factors comes within :data:`RESCALE_FIT` of it:
        one factor per channel of the last axis where each channel has :data:`CHANNEL_FIT_VALUES` values or
        more (smooth-quant's per-channel division), else one for all. Quantization damage (clipping) moves
        the norm too, but no rescaling undoes it."""
        if 1 / RESCALED <= self.scale() <= RESCALED or self.gg <= 0 or self.rr <= 0:
            return False
        rr = np.asarray(self.channel_rr, dtype=np.float64)
        dot = np.asarray(self.channel_dot, dtype=np.float64)
        if rr.size > 1 and self.count >= CHANNEL_FIT_VALUES * rr.size:
            explained = float(np.sum(np.divide(dot * dot, rr, out=np.zeros_like(dot), where=rr > 0)))
        else:
            explained = self.dot * self.dot / self.rr
        return max(self.gg - explained, 0.0) <= RESCALE_FIT**2 * self.gg

    def sqnr(self) -> float:
        if self.den <= 0 or self.num == 0:
            return math.inf
        return -20.0 * math.log10(math.sqrt(self.num / self.den))

    def cosine(self) -> float:
        if self.rr > 0 and self.gg > 0:
            return self.dot / math.sqrt(self.rr * self.gg)
        return 1.0 if self.rr == self.gg else 0.0


def _fallback_outputs(quant_model, pairs, feeds, reference, masks) -> dict[int, float]:
    """Per pair (by index): the SQNR of QUANT's outputs against FLOAT's when only that node runs in float:
    its activations read without their Q/DQ, its weights FLOAT's (:func:`_float_constants`), else QUANT's,
    dequantized."""
    result = {}
    for pair in pairs:
        clone = quant_model.clone()
        node = list(clone.graph)[pair.index]
        _float_activations(node)
        _float_weights(clone.graph, node, pair.float_constants)
        result[pair.index] = _output_sqnr(clone, feeds, reference, masks)
    return result


def _budget(quant_model, pairs, feeds, reference, masks) -> tuple[float, float, int]:
    """QUANT's output SQNR with only its weights quantized (every activation read without its Q/DQ) and
    with only its activations quantized (every paired node given its twin's float weights); and how many
    nodes keep QUANT's weights in the latter (no twin: a fusion). Biases are FLOAT's there too: QUANT's were
    corrected for its own weights' rounding. The float weights read quantized inputs, so onnxruntime must
    not quantize them itself (WeightBiasQuantization)."""
    from ncc.passes.quant.correct_bias import KEEP_TWINS_FLOAT

    weights, activations = quant_model.clone(), quant_model.clone()
    weight_nodes, activation_nodes = list(weights.graph), list(activations.graph)
    kept = 0
    for pair in pairs:
        _float_activations(weight_nodes[pair.index])
        kept += not _float_weights(activations.graph, activation_nodes[pair.index], pair.float_constants)
    return (
        _output_sqnr(weights, feeds, reference, masks),
        _output_sqnr(activations, feeds, reference, masks, disabled=KEEP_TWINS_FLOAT),
        kept,
    )


def _float_activations(node: ir.Node) -> None:
    """``node`` reads its activations without their Q/DQ pairs."""
    for i, value in enumerate(node.inputs):
        dq = value.producer() if value is not None else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        if (q := _quantizer(dq)) is not None:
            node.replace_input_with(i, q.inputs[0])


def _float_constants(node: ir.Node, twin: ir.Node | None, rescaled_input: bool):
    """What ``node`` reads in float in place of its dequantized constants (weights, bias): its ``twin``'s,
    all or none. Each needs a twin constant of the same shape at the same position, and each weight (not the
    int32 bias, which bias correction moves) must be QUANT's up to rounding (:data:`MATCHING_WEIGHT`), or,
    where the node's input is a rescaled value (``rescaled_input``), a matrix QUANT's up to rounding once
    its rows and columns are rescaled (:func:`_refit`: smooth-quant's factors, an attention scale folded
    in), which is then read instead. A weight whose scale is wrong for no such reason keeps QUANT's.
    ``(input index, FLOAT's constant, tensor)`` per constant (none for a node without dequantized constants), or
    None."""
    constants = []
    for i, value in enumerate(node.inputs):
        dq = value.producer() if value is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].const_value is None:
            continue
        weight = twin.inputs[i] if twin is not None and i < len(twin.inputs) else None
        if weight is None or weight.const_value is None or weight.shape != value.shape:
            return None
        tensor = weight.const_value
        if dq.inputs[0].dtype != ir.DataType.INT32:
            if any(v is not None and v.const_value is None for v in dq.inputs):
                return None
            ours, theirs = dequantized_array(dq).astype(np.float64), tensor.numpy().astype(np.float64)
            if not _close(ours, theirs):
                fitted = _refit(ours, theirs) if rescaled_input and theirs.ndim == 2 else None
                if fitted is None:
                    return None
                tensor = ir.tensor(np.ascontiguousarray(fitted, dtype=tensor.numpy().dtype))
        constants.append((i, weight, tensor))
    return tuple(constants)


def _float_weights(graph: ir.Graph, node: ir.Node, constants) -> bool:
    """``node`` (in ``graph``, a clone) reads ``constants`` (:func:`_float_constants`); whether it could."""
    if constants is None:
        return False
    for i, weight, tensor in constants:
        copy = ir.Value(
            name=f"ncc.diff.float.{weight.name}", type=weight.type, shape=weight.shape, const_value=tensor
        )
        graph.register_initializer(copy)
        node.replace_input_with(i, copy)
    return True


def _close(ours: np.ndarray, candidate: np.ndarray) -> bool:
    """Whether ``candidate`` is QUANT's dequantized ``ours`` up to rounding (:data:`MATCHING_WEIGHT`)."""
    return float(np.linalg.norm(ours - candidate)) <= MATCHING_WEIGHT * float(np.linalg.norm(candidate))


def _refit(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray | None:
    """``diag(s) theirs diag(t)`` with the row and column factors that fit ``ours`` best (three alternating
    least-squares rounds), where that is :func:`_close`; else None."""
    rows, cols = np.ones(theirs.shape[0]), np.ones(theirs.shape[1])
    for _ in range(3):
        scaled = theirs * cols
        rows = np.sum(ours * scaled, axis=1) / np.maximum(np.sum(scaled * scaled, axis=1), 1e-300)
        scaled = theirs * rows[:, None]
        cols = np.sum(ours * scaled, axis=0) / np.maximum(np.sum(scaled * scaled, axis=0), 1e-300)
    candidate = theirs * rows[:, None] * cols
    return candidate if _close(ours, candidate) else None


def _output_sqnr(model: ir.Model, feeds, reference, masks, disabled: Sequence[str] = ()) -> float:
    """The lowest SQNR of ``model``'s outputs against FLOAT's (``reference``) on ``feeds``."""
    got = fallback.run(model, feeds, disabled_optimizers=disabled, config=WEIGHT_ONLY_IN_FLOAT)
    return min(_sqnr(reference[v.name], got[v.name], masks) for v in model.graph.outputs)


# -- numbers ------------------------------------------------------------------------------------------


def _sqnr(ref: list[np.ndarray], got: list[np.ndarray], masks) -> float:
    error = relative_l2_error(ref, got, masks)
    return math.inf if error == 0 else -20.0 * math.log10(error)


def _db(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) and value > 0 else f"{value:.2f}"


def _worst_first(row: Row) -> tuple:
    """The largest fallback gain first; without one, the most error added locally first."""
    if row.gain_db is not None:
        return (0, -row.gain_db, row.index)
    added = row.added_sqnr_db
    return (1 if added is not None else 2, math.inf if added is None else added, row.index)
