"""GraphSurgeon functions as passes: registration, in-place result, node ids, numerics."""

from __future__ import annotations

import numpy as np
from ncc.ir import ids
from ncc.ir.builder import GraphBuilder
from ncc.ir.printer import print_model
from ncc.ir.verifier import verify
from ncc.passes import Pass, PassContext
from ncc.passes.graphsurgeon import graphsurgeon_pass
from ncc.passes.manager import PassManager
from ncc.passes.registry import get_pass
from ncc.runtime import run


@graphsurgeon_pass("test-gs-remove-identity")
def remove_identity(graph) -> None:
    """Bypass every Identity node."""
    for node in graph.nodes:
        if node.op == "Identity":
            source = node.inputs[0]
            for consumer in list(node.outputs[0].outputs):
                consumer.inputs[consumer.inputs.index(node.outputs[0])] = source
            node.outputs.clear()


@graphsurgeon_pass("test-gs-add-neg-neg", doc="Append Neg(Neg(.)) to the output.")
def add_neg_neg(graph) -> None:
    import onnx_graphsurgeon as gs

    out = graph.outputs[0]
    mid = gs.Variable("mid", dtype=out.dtype, shape=out.shape)
    new = gs.Variable("out2", dtype=out.dtype, shape=out.shape)
    graph.nodes.append(gs.Node("Neg", inputs=[out], outputs=[mid]))
    graph.nodes.append(gs.Node("Neg", inputs=[mid], outputs=[new]))
    graph.outputs = [new]


def identity_model():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", ["N", 4])
    a = b.op("Relu", [x])
    i = b.op("Identity", [a])
    s = b.op("Sigmoid", [i])
    y = b.op("Add", [s, np.ones((4,), np.float32)])
    b.output(y)
    return b.build()


def test_decorator_returns_a_registered_pass():
    assert isinstance(remove_identity, type) and issubclass(remove_identity, Pass)
    assert get_pass("test-gs-remove-identity") is remove_identity
    assert remove_identity.__name__ == "TestGsRemoveIdentity"
    assert remove_identity.doc() == "Bypass every Identity node."
    assert add_neg_neg.doc() == "Append Neg(Neg(.)) to the output."
    assert remove_identity().spec() == "test-gs-remove-identity"


def test_remove_identity_same_outputs_and_ids():
    model = identity_model()
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    (expected,) = run(model, [x])
    graph_before = model.graph
    ids_before = {n.name: ids.node_id(n) for n in model.graph}
    next_id = model.meta[ids._NEXT_KEY]

    report = PassManager("test-gs-remove-identity").run(model)  # verified after the pass

    assert report.records[0].modified
    assert [n.op_type for n in model.graph] == ["Relu", "Sigmoid", "Add"]
    assert {n.name: ids.node_id(n) for n in model.graph} == {
        name: i for name, i in ids_before.items() if name in {n.name for n in model.graph}
    }
    assert model.graph is not graph_before  # the model object is the one updated
    assert model.meta[ids._NEXT_KEY] == next_id
    (got,) = run(model, [x])
    np.testing.assert_allclose(got, expected, rtol=0, atol=0)


def test_no_change_is_not_modified():
    b = GraphBuilder("g", opset=17)
    b.output(b.op("Relu", [b.input("x", "f32", [2])]))
    model = b.build()
    text = print_model(model)
    result = remove_identity().run(model, PassContext())
    assert not result.modified
    assert print_model(model) == text


def test_new_nodes_get_fresh_ids_and_unnamed_nodes_keep_their_ids():
    model = identity_model()
    for node in model.graph:
        node.name = None  # gs keys nodes by name: unnamed ones still keep their ids
    before = [ids.node_id(n) for n in model.graph]
    next_id = model.meta[ids._NEXT_KEY]
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    (expected,) = run(model, [x])

    add_neg_neg().run(model, PassContext())
    verify(model)

    nodes = list(model.graph)
    assert [n.op_type for n in nodes] == ["Relu", "Identity", "Sigmoid", "Add", "Neg", "Neg"]
    assert [ids.node_id(n) for n in nodes] == [*before, next_id, next_id + 1]
    assert all(not n.name or not n.name.startswith("__ncc") for n in nodes)
    assert [n.name for n in nodes[:4]] == [None] * 4
    (got,) = run(model, [x])
    np.testing.assert_allclose(got, expected, rtol=0, atol=0)
