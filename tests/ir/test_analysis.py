"""Analyses on small builder graphs with answers worked out by hand."""

from __future__ import annotations

import sys

import numpy as np
import onnx_ir as ir
import pytest
from ncc.errors import VerificationError
from ncc.ir import analysis
from ncc.ir.builder import GraphBuilder


def diamond() -> ir.Model:
    """x -> a:Relu -> {b:Sigmoid, c:Tanh} -> d:Add(b, c) -> e:Relu."""
    g = GraphBuilder("diamond", opset=17)
    x = g.input("x", "f32", [4])
    a = g.op("Relu", [x], name="a")
    b = g.op("Sigmoid", [a], name="b")
    c = g.op("Tanh", [a], name="c")
    d = g.op("Add", [b, c], name="d")
    g.output(g.op("Relu", [d], name="e"))
    return g.build()


def by_name(model: ir.Model) -> dict[str, ir.Node]:
    return {n.name: n for n in model.graph}


def test_import_ncc_ir_does_not_import_networkx():
    import subprocess

    code = "import sys, ncc.ir; import ncc.ir.analysis, ncc.ir.verifier; print('networkx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_to_networkx_nodes_edges_and_sources():
    model = diamond()
    g = analysis.to_networkx(model.graph)
    assert sorted(g.nodes) == [0, 1, 2, 3, 4]
    assert [g.nodes[k]["op_type"] for k in range(5)] == ["Relu", "Sigmoid", "Tanh", "Add", "Relu"]
    assert g.nodes[3]["name"] == "d" and g.nodes[3]["node"] is by_name(model)["d"]
    edges = sorted((u, v, data["value"], data["input"]) for u, v, data in g.edges(data=True))
    assert edges == [(0, 1, "a", 0), (0, 2, "a", 0), (1, 3, "b", 0), (2, 3, "c", 1), (3, 4, "d", 0)]

    with_sources = analysis.to_networkx(model.graph, sources=True)
    assert with_sources.nodes["x"]["kind"] == "input"
    assert list(with_sources.successors("x")) == [0]


def test_to_networkx_keeps_parallel_edges():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [4])
    r = b.op("Relu", [x])
    b.output(b.op("Mul", [r, r]))
    g = analysis.to_networkx(b.build().graph)
    assert sorted(d["input"] for _, _, d in g.edges(data=True)) == [0, 1]


def if_model(*, producer_after_if: bool = False) -> ir.Model:
    """%y = Relu(x); If(cond) whose branches read %y (an implicit dependency)."""
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [3])
    cond = b.input("cond", "bool", [])
    y = b.op("Relu", [x], name="producer")
    then = b.subgraph("then")
    then.output(then.op("Neg", [y]))
    other = b.subgraph("else")
    other.output(other.op("Identity", [y]))
    b.output(b.op("If", [cond], then_branch=then, else_branch=other, name="if0"))
    model = b.build()
    if producer_after_if:
        producer = by_name(model)["producer"]
        model.graph.remove(producer)
        model.graph.append(producer)
    return model


def test_subgraph_reads_are_implicit_edges():
    model = if_model()
    g = analysis.to_networkx(model.graph)
    producer, if0 = (ir_id for ir_id in sorted(g.nodes))
    (data,) = g.get_edge_data(producer, if0).values()
    assert data["value"] == "producer" and data["input"] is None


def test_topological_order_is_stable_and_repairs():
    model = diamond()
    nodes = list(model.graph)
    assert analysis.topological_order(model.graph) == nodes
    a = nodes[0]
    model.graph.remove(a)
    model.graph.append(a)  # a now comes last, after everything that reads it
    assert [n.name for n in analysis.topological_order(model.graph)] == ["a", "b", "c", "d", "e"]


def test_topological_order_keeps_independent_nodes_in_place():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [4])
    names = ["p", "q", "r", "s"]
    for name in names:
        b.output(b.op("Relu", [x], name=name))
    model = b.build()
    assert [n.name for n in analysis.topological_order(model.graph)] == names


def test_topological_order_follows_subgraph_reads():
    model = if_model(producer_after_if=True)
    assert [n.name for n in model.graph] == ["if0", "producer"]
    assert [n.name for n in analysis.topological_order(model.graph)] == ["producer", "if0"]


def test_topological_order_of_a_cycle_raises():
    model = diamond()
    nodes = by_name(model)
    nodes["a"].replace_input_with(0, nodes["d"].outputs[0])
    with pytest.raises(VerificationError, match="has a cycle Relu 'a' -> Sigmoid 'b' -> Add 'd' -> Relu 'a'"):
        analysis.topological_order(model.graph)


def test_find_cycles():
    model = diamond()
    assert analysis.find_cycles(model.graph) == []
    nodes = by_name(model)
    nodes["a"].replace_input_with(0, nodes["d"].outputs[0])
    nodes["e"].replace_input_with(0, nodes["e"].outputs[0])
    cycles = analysis.find_cycles(model.graph)
    assert [[n.name for n in c] for c in cycles] == [["a", "b", "d"], ["e"]]


def test_dominators():
    model = diamond()
    idom = {n.name: (d.name if d is not None else None) for n, d in analysis.dominators(model.graph).items()}
    assert idom == {"a": None, "b": "a", "c": "a", "d": "a", "e": "d"}


def test_dominators_with_two_sources():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [4])
    y = b.input("y", "f32", [4])
    p = b.op("Relu", [x], name="p")
    q = b.op("Relu", [y], name="q")
    s = b.op("Add", [p, q], name="s")
    b.output(b.op("Relu", [s], name="t"))
    idom = {
        n.name: (d.name if d is not None else None) for n, d in analysis.dominators(b.build().graph).items()
    }
    assert idom == {"p": None, "q": None, "s": None, "t": "s"}


def conv_block_model() -> ir.Model:
    """conv0 -> relu0 -> pool -> conv1 -> relu1 (+ a Conv-free side branch from relu0)."""
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [1, 3, 8, 8])
    w0 = b.const("w0", np.ones((4, 3, 3, 3), np.float32))
    w1 = b.const("w1", np.ones((4, 4, 1, 1), np.float32))
    y = b.op("Conv", [x, w0], pads=[1, 1, 1, 1], name="conv0")
    y = b.op("Relu", [y], name="relu0")
    side = b.op("Sigmoid", [y], name="side")
    y = b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2], name="pool")
    y = b.op("Conv", [y, w1], name="conv1")
    y = b.op("Relu", [y], name="relu1")
    b.output(y)
    b.output(side)
    return b.build()


def test_partition_into_connected_islands():
    model = conv_block_model()
    groups = analysis.partition(model.graph, lambda n: n.op_type in {"Conv", "Relu"})
    assert [[n.name for n in grp] for grp in groups] == [["conv0", "relu0"], ["conv1", "relu1"]]
    groups = analysis.partition(model.graph, lambda n: n.op_type != "MaxPool")
    assert [[n.name for n in grp] for grp in groups] == [["conv0", "relu0", "side"], ["conv1", "relu1"]]
    assert analysis.partition(model.graph, lambda n: False) == []


def test_subgraph_matches_conv_relu():
    model = conv_block_model()
    p = GraphBuilder("pattern", opset=17)
    x = p.input("x")
    w = p.input("w")
    conv = p.op("Conv", [x, w])
    p.output(p.op("Relu", [conv]))
    pattern = p.graph
    pconv, prelu = list(pattern)
    matches = analysis.subgraph_matches(model.graph, pattern)
    assert [(m[pconv].name, m[prelu].name) for m in matches] == [("conv0", "relu0"), ("conv1", "relu1")]


def test_subgraph_matches_respects_input_positions_when_asked():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [4])
    r = b.op("Relu", [x], name="r")
    n = b.op("Neg", [x], name="n")
    b.output(b.op("Sub", [n, r], name="s"))  # Sub(Neg, Relu)
    graph = b.build().graph

    p = GraphBuilder("pattern", opset=17)
    px = p.input("x")
    pr = p.op("Relu", [px])
    pn = p.op("Neg", [px])
    p.output(p.op("Sub", [pr, pn]))  # Sub(Relu, Neg)
    assert len(analysis.subgraph_matches(graph, p.graph)) == 1
    assert analysis.subgraph_matches(graph, p.graph, inputs=True) == []


def test_subgraph_matches_induced():
    model = diamond()
    p = GraphBuilder("pattern", opset=17)
    px = p.input("x")
    a = p.op("Relu", [px])
    b = p.op("Sigmoid", [a])
    c = p.op("Tanh", [a])
    p.output(b)
    p.output(c)
    p.output(p.op("Add", [b, px]))  # pattern: Relu -> Sigmoid -> Add, Relu -> Tanh, no Tanh -> Add
    assert len(analysis.subgraph_matches(model.graph, p.graph)) == 1
    assert analysis.subgraph_matches(model.graph, p.graph, induced=True) == []
