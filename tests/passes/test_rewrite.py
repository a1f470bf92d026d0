"""The rewrite layer of ir/rewrite.py: the greedy driver (hits, failure reasons, the sweep bound, node ids),
the Rewriter's replacements and names, and the reading helpers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from ncc.ir import ids
from ncc.ir.builder import GraphBuilder
from ncc.ir.rewrite import (
    MatchResult,
    Pattern,
    Rewriter,
    apply_patterns,
    constant_array,
    constant_tensor,
    consumers,
    is_constant,
    single_consumer,
)
from ncc.ir.verifier import verify
from ncc.passes.base import PassResult
from ncc.runtime import run


def chain(*ops: str, shape=(2, 3)) -> ir.Model:
    """x -> ops[0] -> ops[1] -> ... -> output."""
    b = GraphBuilder("g", opset=17)
    v = b.input("x", "f32", list(shape))
    for op in ops:
        v = b.op(op, [v])
    b.output(v)
    return b.build()


class CollapseRelu(Pattern):
    """Relu(Relu(x)) -> Relu(x)."""

    root = "Relu"

    def match_and_rewrite(self, node, rewriter):
        inner = node.inputs[0].producer()
        if inner is None or inner.op_type != "Relu":
            return MatchResult.fail("input is not produced by a Relu")
        if len(inner.outputs[0].uses()) != 1:
            return MatchResult.fail("inner Relu has other uses")
        new = rewriter.create("Relu", [inner.inputs[0]], absorbed=[inner, node], name="relu_collapsed")
        rewriter.replace_op(node, new.outputs)
        rewriter.erase(inner)
        return MatchResult.ok()


class NegNegToIdentity(Pattern):
    """Neg(Neg(x)) -> Identity(x), higher benefit than DropNeg."""

    root = "Neg"
    benefit = 2

    def match_and_rewrite(self, node, rewriter):
        inner = node.inputs[0].producer()
        if inner is None or inner.op_type != "Neg":
            return MatchResult.fail("input is not a Neg")
        new = rewriter.create("Identity", [inner.inputs[0]], absorbed=[inner, node])
        rewriter.replace_op(node, new.outputs)
        rewriter.erase(inner)
        return MatchResult.ok()


class NeverMatches(Pattern):
    root = "Neg"
    benefit = 1

    def match_and_rewrite(self, node, rewriter):
        return MatchResult.fail("never")


class Churn(Pattern):
    """Replaces a Relu by a fresh Relu forever: the driver must stop."""

    root = "Relu"

    def match_and_rewrite(self, node, rewriter):
        new = rewriter.create("Relu", [node.inputs[0]], absorbed=[node])
        rewriter.replace_op(node, new.outputs)
        return MatchResult.ok()


def test_hits_and_numerics():
    model = chain("Relu", "Relu", "Relu", "Relu")
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    (expected,) = run(model, [x])
    stats = apply_patterns(model, [CollapseRelu()])
    verify(model)
    assert [n.op_type for n in model.graph] == ["Relu"]
    assert stats.hits == {"CollapseRelu": 3}
    assert stats.converged
    (got,) = run(model, [x])
    np.testing.assert_array_equal(got, expected)


def test_graph_output_name_is_kept():
    model = chain("Relu", "Relu")
    name = model.graph.outputs[0].name
    apply_patterns(model, [CollapseRelu()])
    assert model.graph.outputs[0].name == name
    assert model.graph.outputs[0].producer().name == "relu_collapsed"


def test_failure_reasons_are_counted_from_the_last_sweep():
    model = chain("Relu", "Neg", "Relu")
    stats = apply_patterns(model, [CollapseRelu()])
    assert not stats.hits
    assert stats.converged and stats.sweeps == 1
    assert stats.failures == {("CollapseRelu", "input is not produced by a Relu"): 2}
    result = PassResult.from_patterns(stats, [CollapseRelu()])
    assert not result.modified and result.stats == {"CollapseRelu hits": 0}
    assert result.notes == ["CollapseRelu: no match 2x: input is not produced by a Relu"]


def test_benefit_orders_patterns_on_the_same_root():
    model = chain("Neg", "Neg")
    stats = apply_patterns(model, [NeverMatches(), NegNegToIdentity()])
    assert stats.hits == {"NegNegToIdentity": 1}
    assert [n.op_type for n in model.graph] == ["Identity"]
    # The second sweep tried nothing that matched: the remaining failures are from it.
    assert stats.sweeps == 2


def test_new_nodes_are_stamped_with_the_ids_they_absorb():
    model = chain("Relu", "Relu", "Relu")
    before = [ids.node_id(n) for n in model.graph]
    assert before == [0, 1, 2]
    apply_patterns(model, [CollapseRelu()])
    (node,) = model.graph
    # First sweep: Relu#1 + Relu#0 -> new #3; then Relu#2 + #3 -> new #4 absorbing 0, 1, 2, 3.
    assert ids.node_id(node) == 4
    assert ids.fused_ids(node) == (0, 1, 2, 3)
    assert node.metadata_props[ids.FUSED_KEY] == "0,1,2,3"


def test_sweep_bound_reports_non_convergence():
    model = chain("Relu")
    stats = apply_patterns(model, [Churn()], max_sweeps=3)
    assert not stats.converged
    assert stats.sweeps == 3
    assert stats.hits == {"Churn": 3}
    result = PassResult.from_patterns(stats, [Churn()])
    assert result.modified
    assert result.stats == {"Churn hits": 3}
    assert result.notes == ["pattern driver stopped after 3 sweeps without converging"]
    (node,) = model.graph
    assert ids.fused_ids(node) == (0, 1, 2)


def test_subgraphs_are_rewritten():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [2])
    cond = b.input("c", "bool", [])
    then = b.subgraph("then")
    then.output(then.op("Relu", [then.op("Relu", [x])]))
    other = b.subgraph("else")
    other.output(other.op("Neg", [x]))
    b.output(b.op("If", [cond], then_branch=then, else_branch=other))
    model = b.build()
    stats = apply_patterns(model, [CollapseRelu()])
    verify(model)
    assert stats.hits == {"CollapseRelu": 1}
    then_graph = next(iter(model.graph)).attributes["then_branch"].as_graph()
    assert [n.op_type for n in then_graph] == ["Relu"]


def test_rewriter_fresh_names_and_constants():
    model = chain("Relu")
    rewriter = Rewriter(model, model.graph)
    taken = model.graph.outputs[0].name
    assert rewriter.fresh_name(taken) == f"{taken}_1"
    assert rewriter.fresh_name(taken) == f"{taken}_2"
    value = rewriter.constant(np.ones((2,), np.float32), "w")
    assert value.name == "w" and value.is_initializer()
    assert rewriter.constant(np.zeros((1,), np.float32), "w").name == "w_1"


def test_replace_value_gives_the_new_value_the_old_name():
    model = chain("Relu", "Neg", "Relu")
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    (expected,) = run(model, [x])
    _, neg, _ = model.graph
    old = neg.outputs[0]
    name, dtype, shape = old.name, old.dtype, old.shape
    rewriter = Rewriter(model, model.graph)
    rewriter.set_insertion_point(neg)
    new = rewriter.create("Neg", [neg.inputs[0]], absorbed=[neg])
    rewriter.replace_value(old, new.outputs[0])
    rewriter.erase(neg)
    verify(model)
    assert new.outputs[0].name == name and new.outputs[0].dtype == dtype and new.outputs[0].shape == shape
    assert [n.op_type for n in model.graph] == ["Relu", "Neg", "Relu"]
    np.testing.assert_array_equal(run(model, [x])[0], expected)


def test_replace_value_of_a_graph_output_keeps_the_interface():
    model = chain("Relu")
    (relu,) = model.graph
    name = model.graph.outputs[0].name
    rewriter = Rewriter(model, model.graph)
    rewriter.set_insertion_point(relu)
    new = rewriter.create("Relu", [relu.inputs[0]], absorbed=[relu])
    rewriter.replace_value(relu.outputs[0], new.outputs[0])
    rewriter.erase(relu)
    verify(model)
    assert model.graph.outputs[0] is new.outputs[0] and new.outputs[0].name == name


def test_an_interface_value_standing_in_for_an_output_goes_through_identity():
    model = chain("Relu")
    (relu,) = model.graph
    x, y = model.graph.inputs[0], model.graph.outputs[0]
    name = y.name
    rewriter = Rewriter(model, model.graph)
    rewriter.set_insertion_point(relu)
    rewriter.replace_all_uses(y, x)  # a graph input cannot also carry the output's name
    rewriter.erase(relu)
    verify(model)
    (ident,) = model.graph
    out = model.graph.outputs[0]
    assert ident.op_type == "Identity" and ident.name == relu.name and ids.fused_ids(ident) == (0,)
    assert out.producer() is ident and out.name == name and out.dtype == ir.DataType.FLOAT
    assert x.name == "x"


def test_nodes_inserted_after_a_node_keep_their_order_and_kept_readers_keep_the_old_value():
    model = chain("Relu", "Neg")
    x = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    (expected,) = run(model, [x])
    relu, neg = model.graph
    y = relu.outputs[0]
    rewriter = Rewriter(model, model.graph)
    rewriter.set_insertion_point(relu, after=True)
    first = rewriter.create("Identity", [y])
    second = rewriter.create("Identity", first.outputs)
    for node in (first, second):
        node.outputs[0].type, node.outputs[0].shape = y.type, y.shape
    rewriter.replace_all_uses(y, second.outputs[0], keep=[first])
    verify(model)
    assert list(model.graph) == [relu, first, second, neg]
    assert first.inputs[0] is y and neg.inputs[0] is second.outputs[0]
    np.testing.assert_array_equal(run(model, [x])[0], expected)


def test_a_kept_output_is_renamed_as_asked_and_uses_are_replaced_selectively():
    model = chain("Relu", "Neg")
    relu, neg = model.graph
    y = relu.outputs[0]
    model.graph.outputs.append(y)
    name = y.name
    rewriter = Rewriter(model, model.graph)
    rewriter.set_insertion_point(neg)
    copy = rewriter.create("Identity", [y])
    copy.outputs[0].type, copy.outputs[0].shape = y.type, y.shape
    rewriter.replace_uses_if(y, copy.outputs[0], lambda reader: reader is neg)
    assert neg.inputs[0] is copy.outputs[0] and copy.inputs[0] is y and model.graph.outputs[1] is y
    rewriter.replace_all_uses(y, copy.outputs[0], keep=[copy], renamed="float")
    verify(model)
    assert model.graph.outputs[1] is copy.outputs[0] and copy.outputs[0].name == name
    assert y.name == f"{name}_float" and copy.inputs[0] is y


def test_erase_all_removes_consumers_first_and_unread_constant_nodes():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [2])
    c = b.op("Constant", [], value=np.ones(2, np.float32))
    y = b.op("Neg", [b.op("Add", [x, c])])
    b.output(b.op("Relu", [y]))
    model = b.build()
    const, add, neg, relu = model.graph
    rewriter = Rewriter(model, model.graph)
    rewriter.set_insertion_point(relu)
    new = rewriter.create("Sub", [rewriter.constant(np.full(2, -1, np.float32), "minus_one"), x])
    rewriter.replace_value(neg.outputs[0], new.outputs[0])
    rewriter.erase_all([add, neg])
    verify(model)
    assert [n.op_type for n in model.graph] == ["Sub", "Relu"]


def test_fresh_names_are_unique_in_every_graph_of_the_model_and_never_empty():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [2])
    cond = b.input("c", "bool", [])
    then = b.subgraph("then")
    then.output(then.op("Relu", [x], name="inner"))
    other = b.subgraph("else")
    other.output(other.op("Neg", [x], name="other"))
    b.output(b.op("If", [cond], then_branch=then, else_branch=other))
    model = b.build()
    rewriter = Rewriter(model, model.graph)
    assert rewriter.fresh_name("inner") == "inner_1"  # "inner" is a value of the then-branch
    assert rewriter.fresh_name("") == "value"
    assert rewriter.fresh_name("") == "value_1"
    node = rewriter.create("Neg", [x], output_names=["explicit"])
    assert node.outputs[0].name == "explicit" and rewriter.fresh_name("explicit") == "explicit_1"


def test_reading_helpers():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [2])
    w = b.const("w", np.arange(2, dtype=np.float32))
    c = b.op("Constant", [], value_floats=[1.0, 2.0])
    s = b.op("Add", [x, w])
    b.output(b.op("Mul", [s, s]))
    b.output(b.op("Sub", [s, c]))
    model = b.build()
    _, add, mul, sub = model.graph
    np.testing.assert_array_equal(constant_array(w), [0, 1])
    np.testing.assert_array_equal(constant_array(c), [1, 2])
    assert constant_tensor(x) is None and constant_array(None) is None
    assert is_constant(w) and is_constant(c) and not is_constant(s)
    assert consumers(s) == [mul, sub]
    assert single_consumer(x, add) and not single_consumer(s, mul)
    model.graph.inputs.append(w)  # an initializer that is also an input is only a default
    assert constant_tensor(w) is None and not is_constant(w)
