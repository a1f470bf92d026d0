"""``ncc diff FLOAT QUANT --data DATA``: which quantized node costs how much fidelity.

For every quantized node of QUANT (a node other than Quantize/DequantizeLinear reading a
DequantizeLinear output: ncc's QDQ form, or onnxruntime's), two numbers against FLOAT on the same
inputs:

- **carries**: the SQNR (dB) and cosine of the node's output in QUANT against the same value in FLOAT:
  the error everything up to and including this node has built up;
- **adds**: the SQNR of the node run quantized *on FLOAT's inputs*: its own Q/DQ (activations with
  QUANT's scales, weights as QUANT stores them) around the node, fed the float model's values, against
  the float output. This is the error the node alone brings; the table is sorted by it, worst first.

Nodes pair up by ncc's stable node ids (:mod:`ncc.ir.ids`): a node QUANT built by fusing FLOAT's nodes
(a Conv with its BatchNormalization folded in) records their ids, and its output stands for the last of
them. Where ids do not match (a model onnxruntime quantized) nodes pair by name, then by output name.

Three onnxruntime runs on the first ``samples`` samples: FLOAT with the values the table needs exposed,
QUANT with its quantized nodes' outputs exposed, and one *isolation* model holding, side by side, a copy
of each quantized node with its Q/DQ, whose inputs are FLOAT's values. Padded positions (an
``attention_mask`` input's zeros) are left out of every number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.ids import fused_ids, node_id
from ncc.ir.ops import onnx_opset
from ncc.metrics import position_mask, relative_l2_error, token_masks

QDQ = ("QuantizeLinear", "DequantizeLinear")


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
    output_sqnr_db: float | None = None  # FLOAT's outputs with only this node quantized
    note: str = ""


def diff(
    float_model: ir.Model,
    quant_model: ir.Model,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    output_cost: bool = True,
) -> list[Row]:
    """The table for ``quant_model`` against ``float_model`` on ``feeds`` (batches), the node costing the
    output most first. ``output_cost`` runs FLOAT once per node with only that node quantized (the
    ranking); without it the rows are ranked by the error each node adds locally."""
    from ncc.runtime import open_session

    pairs = _pairs(float_model, quant_model)
    if not pairs:
        raise NccError(
            "the second model has no quantized nodes (nodes reading a DequantizeLinear output): "
            "ncc diff compares a float model with its QDQ form."
        )
    isolation, needed = _isolation(float_model, quant_model, pairs)
    outputs = [v.name for v in float_model.graph.outputs]
    wanted = list(dict.fromkeys([p.float_value for p in pairs if p.float_value] + needed + outputs))
    fed = {v.name for v in float_model.graph.inputs}
    computed = [n for n in wanted if n not in fed]
    masks = token_masks(feeds)
    ref = _run(open_session(float_model, outputs=computed, what="the float model"), feeds, computed)
    ref.update({n: [feed[n] for feed in feeds] for n in wanted if n in fed})
    names = [p.node.outputs[0].name for p in pairs]
    got = _run(open_session(quant_model, outputs=names, what="the quantized model"), feeds, names)
    alone: dict[str, list[np.ndarray]] = {}
    if isolation is not None:
        outs = [v.name for v in isolation.graph.outputs]
        session = open_session(isolation, what="the isolated quantized nodes")
        for i in range(len(feeds)):
            result = session.run({n: ref[n][i] for n in session.input_names}, outs)
            for name in outs:
                alone.setdefault(name, []).append(result[name])
    costs = _output_costs(float_model, pairs, feeds, ref, masks) if output_cost else {}
    rows = []
    for pair in pairs:
        label = pair.node.name or f"#{node_id(pair.node)}"
        if pair.float_value is None:
            rows.append(
                Row(pair.index, label, pair.node.op_type, "", None, None, None, "no float counterpart")
            )
            continue
        want = ref[pair.float_value]
        have = got[pair.node.outputs[0].name]
        if any(w.shape != h.shape for w, h in zip(want, have)):
            rows.append(
                Row(pair.index, label, pair.node.op_type, pair.float_value, None, None, None, "shapes differ")
            )
            continue
        added = alone.get(pair.isolated)
        rows.append(
            Row(
                pair.index,
                label,
                pair.node.op_type,
                pair.float_value,
                _sqnr(want, have, masks),
                _cosine(want, have, masks),
                _sqnr(want, added, masks) if added is not None else None,
                costs.get(pair.index),
                pair.note,
            )
        )
    return sorted(rows, key=_worst_first)


def format_table(rows: Sequence[Row], top: int | None = None) -> str:
    """The rows as a text table (the ``top`` worst by added error)."""
    shown = list(rows)[:top] if top else list(rows)
    head = (
        f"{'rank':>4}  {'output SQNR dB alone':>20}  {'adds SQNR dB':>12}  {'carries SQNR dB':>15}  "
        f"{'cosine':>8}  {'op':<14} node"
    )
    lines = [head]
    for rank, row in enumerate(shown, 1):
        note = f"  ({row.note})" if row.note else ""
        lines.append(
            f"{rank:>4}  {_db(row.output_sqnr_db):>20}  {_db(row.added_sqnr_db):>12}  {_db(row.carried_sqnr_db):>15}  "
            f"{'' if row.carried_cosine is None else f'{row.carried_cosine:.5f}':>8}  "
            f"{row.op_type:<14} {row.node}{note}"
        )
    if top and len(rows) > top:
        lines.append(f"... {len(rows) - top} more quantized nodes (--top {len(rows)} shows all)")
    return "\n".join(lines)


def as_json(rows: Sequence[Row]) -> list[dict]:
    """The rows as JSON-ready dicts (infinite SQNR as null: the outputs are equal)."""
    out = []
    for row in rows:
        item = asdict(row)
        for key in ("carried_sqnr_db", "added_sqnr_db", "output_sqnr_db"):
            if item[key] is not None and not math.isfinite(item[key]):
                item[key] = None if item[key] > 0 else item[key]
        out.append(item)
    return out


def plot(rows: Sequence[Row], path) -> None:
    """Per-node SQNR along QUANT's graph order (carried and added) as an image at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NccError('--plot needs matplotlib (pip install -e ".[plot]").') from None
    ordered = sorted(rows, key=lambda r: r.index)
    xs = range(len(ordered))
    fig, ax = plt.subplots(figsize=(max(6.0, len(ordered) * 0.12), 3.5))
    series = (
        ("carried_sqnr_db", "carries (its output vs float)"),
        ("added_sqnr_db", "adds (the node alone)"),
        ("output_sqnr_db", "model output with only it quantized"),
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
    isolated: str = ""  # its copy's output in the isolation model ("" when it could not be built)
    note: str = ""


def _pairs(float_model: ir.Model, quant_model: ir.Model) -> list[_Pair]:
    by_id = {i: n for n in float_model.graph if (i := node_id(n)) is not None}
    by_name = {n.name: n for n in float_model.graph if n.name}
    float_values = {v.name for n in float_model.graph for v in n.outputs} | {
        v.name for v in float_model.graph.inputs
    }
    pairs = []
    for index, node in enumerate(quant_model.graph):
        if node.op_type in QDQ or not any(_dequantized(v) for v in node.inputs):
            continue
        if not node.outputs or node.outputs[0].dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, None):
            continue
        pairs.append(_Pair(index, node, _counterpart(node, by_id, by_name, float_values)))
    return pairs


def _counterpart(node: ir.Node, by_id, by_name, float_values) -> str | None:
    """The FLOAT value ``node``'s output stands for: its id's node, else the last node of those it absorbed,
    else the node of its name, else a value of its output's name."""
    own = node_id(node)
    if own is not None and own in by_id and by_id[own].op_type == node.op_type:
        return by_id[own].outputs[0].name
    absorbed = [by_id[i] for i in fused_ids(node) if i in by_id]
    if absorbed:
        inside = {id(n) for n in absorbed}
        last = [n for n in absorbed if not any(id(u.node) in inside for u in n.outputs[0].uses())]
        if len(last) == 1:
            return last[0].outputs[0].name
    if node.name and node.name in by_name and by_name[node.name].op_type == node.op_type:
        return by_name[node.name].outputs[0].name
    name = node.outputs[0].name
    return name if name in float_values else None


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


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
        dq = value.producer()
        if dq is not None and dq.op_type == "DequantizeLinear":
            source = dq.inputs[0]
            q = source.producer()
            if q is not None and q.op_type == "QuantizeLinear":
                source = self.copy(q, [self.float_input(q.inputs[0]), *map(self.rebuilt, q.inputs[1:])])
            elif source.const_value is None:
                raise LookupError(source.name)
            else:
                source = self.constant(source)
            return self.copy(dq, [source, *map(self.rebuilt, dq.inputs[1:])])
        return self.float_input(value)

    def copy(self, node: ir.Node, new_inputs) -> ir.Value:
        out = node.outputs[0]
        value = ir.Value(name=self.fresh(out), type=out.type, shape=out.shape)
        self.graph.append(
            ir.Node(node.domain, node.op_type, new_inputs, list(node.attributes.values()), outputs=[value])
        )
        return value


def _float_maps(float_model: ir.Model, pairs: list[_Pair]) -> tuple[dict[str, ir.Value], dict[str, str]]:
    values = {v.name: v for n in float_model.graph for v in n.outputs}
    values.update({v.name: v for v in float_model.graph.inputs})
    return values, {p.node.outputs[0].name: p.float_value for p in pairs if p.float_value}


def _rebuildable(pair: _Pair) -> bool:
    return pair.float_value is not None and len(pair.node.outputs) == 1 and not _has_subgraph(pair.node)


def _isolation(float_model: ir.Model, quant_model: ir.Model, pairs: list[_Pair]):
    """A model holding a copy of each paired node with its own Q/DQ, reading FLOAT's values as graph
    inputs; and the FLOAT values it reads. Nodes it cannot rebuild keep ``isolated`` empty."""
    float_values, float_of = _float_maps(float_model, pairs)
    graph = ir.Graph([], [], nodes=[], opset_imports=dict(quant_model.opset_imports), name="isolation")
    model = ir.Model(graph, ir_version=max(quant_model.ir_version, 8))
    inputs: dict[str, ir.Value] = {}

    def lookup(name: str) -> ir.Value:
        if name not in inputs:
            source = float_values[name]
            if source.dtype is None:
                raise LookupError(name)
            inputs[name] = ir.Value(name=name, type=source.type, shape=source.shape)
            graph.inputs.append(inputs[name])
        return inputs[name]

    rebuild = _Rebuilder(graph, lookup, set(float_values), float_of)
    for pair in filter(_rebuildable, pairs):
        try:
            output = rebuild.node(pair.node)
        except LookupError as missing:
            pair.note = f"not isolated: no float value for {missing.args[0]!r}"
            continue
        graph.outputs.append(output)
        pair.isolated = output.name
    if not graph.outputs:
        return None, []
    if onnx_opset(model) < 13 and any(
        n.op_type in QDQ and n.attributes.get_int("axis", None) is not None for n in graph
    ):
        model.opset_imports[""] = 13
    return model, list(inputs)


def _output_costs(float_model: ir.Model, pairs: list[_Pair], feeds, reference, masks) -> dict[int, float]:
    """Per pair (by index): the SQNR of FLOAT's outputs when only that node runs quantized (its copy
    spliced in place of the float value it stands for), against FLOAT's own outputs."""
    from ncc.runtime import open_session

    outputs = [v.name for v in float_model.graph.outputs]
    costs = {}
    for pair in pairs:
        if not pair.isolated:
            continue
        clone = float_model.clone()
        graph = clone.graph
        values, float_of = _float_maps(clone, pairs)
        rebuild = _Rebuilder(graph, values.__getitem__, set(values), float_of)
        mark = len(graph)
        try:
            new = rebuild.node(pair.node)
        except LookupError:
            continue
        added = list(graph)[mark:]
        if onnx_opset(clone) < 13 and any(n.op_type in QDQ and "axis" in n.attributes for n in added):
            continue  # per-axis Q/DQ needs opset 13; raising the float model's could change its other nodes
        old = values[pair.float_value]
        for node in added:  # in order, right after the float node the copy stands in for
            graph.remove(node)
        graph.insert_after(old.producer(), added)
        new.name, old.name = old.name, f"{old.name}.float"
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        session = open_session(clone, what=f"the float model with {pair.node.name or 'a node'} quantized")
        got = _run(session, feeds, outputs)
        costs[pair.index] = min(_sqnr(reference[n], got[n], masks) for n in outputs)
    return costs


# -- numbers ------------------------------------------------------------------------------------------


def _run(session, feeds, names: list[str]) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for index, feed in enumerate(feeds):
        result = session.run(feed, names, where=f"batch {index}")
        for name in names:
            out[name].append(result[name])
    return out


def _sqnr(ref: list[np.ndarray], got: list[np.ndarray], masks) -> float:
    error = relative_l2_error(ref, got, masks)
    return math.inf if error == 0 else -20.0 * math.log10(error)


def _cosine(ref: list[np.ndarray], got: list[np.ndarray], masks) -> float:
    dot = rr = gg = 0.0
    for i, (r, g) in enumerate(zip(ref, got)):
        r, g = r.astype(np.float64), g.astype(np.float64)
        keep = position_mask(r, masks[i] if i < len(masks) else None)
        if keep is not None:
            r, g = r * keep, g * keep
        dot += float(np.sum(r * g))
        rr += float(np.sum(r * r))
        gg += float(np.sum(g * g))
    return dot / math.sqrt(rr * gg) if rr > 0 and gg > 0 else (1.0 if rr == gg else 0.0)


def _db(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) and value > 0 else f"{value:.2f}"


def _worst_first(row: Row) -> tuple:
    key = row.output_sqnr_db if row.output_sqnr_db is not None else row.added_sqnr_db
    return (row.output_sqnr_db is None, key is None, math.inf if key is None else key, row.index)
