"""The verifier: each rule on a graph broken on purpose, and clean passes over real models."""

from __future__ import annotations

import time

import ncc.runtime  # noqa: F401  (registers onnxruntime's com.microsoft schemas with the verifier)
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from ncc.errors import VerificationError
from ncc.frontends.onnx import from_proto
from ncc.ir import ids
from ncc.ir.builder import GraphBuilder
from ncc.ir.verifier import diagnose, format_diagnostics, register_schemas, verify
from onnx import TensorProto, helper


def chain(n: int = 3, *, infer: bool = True) -> ir.Model:
    """x -> relu0 -> relu1 -> ... -> relu{n-1} (output)."""
    b = GraphBuilder("g", opset=17)
    v = b.input("x", "f32", ["N", 4])
    for _ in range(n):
        v = b.op("Relu", [v])
    b.output(v)
    return b.build(infer=infer, verify=infer)


def only(model: ir.Model, rule: str | None = None):
    problems = diagnose(model)
    assert len(problems) == 1, [str(p) for p in problems]
    if rule is not None:
        assert problems[0].rule == rule
    return problems[0]


def nodes(model: ir.Model) -> list[ir.Node]:
    return list(model.graph)


# --------------------------------------------------------------------------- clean models


def test_clean_builder_model_verifies():
    model = chain(5)
    verify(model)
    assert diagnose(model) == []


def _if_model_proto() -> onnx.ModelProto:
    """Conv -> If(cond) whose branches read the outer values %y and %bias, then Relu."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 1, 1], np.ones(6, np.float32).tolist())
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [1], [0.5])
    then_graph = helper.make_graph(
        [helper.make_node("Add", ["y", "bias"], ["then_out"], name="then_add")],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [1, 2, 4, 4])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Sub", ["y", "bias"], ["else_out"], name="else_sub")],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [1, 2, 4, 4])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["y"], name="conv0"),
            helper.make_node(
                "If", ["cond"], ["z"], name="if0", then_branch=then_graph, else_branch=else_graph
            ),
            helper.make_node("Relu", ["z"], ["out"], name="relu0"),
        ],
        "if_model",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 4, 4])],
        initializer=[w, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_real_onnx_model_with_if_reading_outer_scope_verifies():
    model = from_proto(_if_model_proto())
    verify(model)


def test_subgraph_reading_a_value_defined_later_in_the_enclosing_graph():
    model = from_proto(_if_model_proto())
    conv, if0, relu = nodes(model)
    model.graph.remove(conv)
    model.graph.insert_after(if0, conv)  # the branches now read %y before conv0 defines it
    problems = diagnose(model)
    messages = [p.message for p in problems]
    assert (
        "Add node 'then_add' (id 3) reads %y (input 0) from an enclosing graph, where Conv node 'conv0' (id 0) "
        "defines it only after the node that owns graph 'if_model/if0.then_branch'." in messages
    )
    assert {p.rule for p in problems} == {"order"}
    assert {p.graph_path for p in problems} == {"if_model/if0.then_branch", "if_model/if0.else_branch"}


def test_function_bodies_are_untyped_and_calls_pass_unchecked():
    a, b_ = ir.Value(name="a"), ir.Value(name="b")
    body = ir.node("Add", [a, b_], name="add")
    body.outputs[0].name = "c"
    graph = ir.Graph([a, b_], body.outputs, nodes=[body], opset_imports={"": 17})
    function = ir.Function("custom", "MyAdd", graph=graph, attributes=[])
    builder = GraphBuilder("g", opset=17)
    x = builder.input("x", "f32", [3])
    y = builder.op("MyAdd", [x, x], domain="custom")
    builder.function(function)
    builder.output(y, "f32", [3])
    model = builder.build(infer=False)
    assert diagnose(model) == []


def test_contrib_op_checked_for_arity_only():
    b = GraphBuilder("g", opset=17, opsets={"com.microsoft": 1})
    x = b.input("x", "f32", [3])
    y = b.op("QuickGelu", [x], domain="com.microsoft", alpha=1.702, whatever=3)
    b.output(y, "f32", [3])
    model = b.build(infer=False)
    assert diagnose(model) == []
    nodes(model)[0].resize_inputs(2)
    nodes(model)[0].replace_input_with(1, x)
    problem = only(model, "inputs")
    assert problem.message == (
        "com.microsoft::QuickGelu node 'quickgelu0' (id 0) has 2 inputs; com.microsoft::QuickGelu-1 takes exactly 1."
    )


def test_registered_schemas_check_a_domain_for_arity(monkeypatch):
    from ncc.ir import verifier

    class Schema:  # what the verifier reads of an OpSchema
        domain, name, since_version, inputs = "test.ops", "Twice", 1, []
        min_input = max_input = min_output = max_output = 1

    b = GraphBuilder("g", opset=17, opsets={"test.ops": 1})
    x = b.input("x", "f32", [3])
    b.output(b.op("Twice", [x, x], domain="test.ops"), "f32", [3])
    model = b.build(infer=False)
    assert diagnose(model) == []  # no schemas for the domain: structure only
    monkeypatch.setattr(verifier, "_SCHEMA_PROVIDERS", dict(verifier._SCHEMA_PROVIDERS))
    register_schemas({"test.ops"}, lambda: [Schema()])
    try:
        assert only(model, "inputs").message.endswith("has 2 inputs; test.ops::Twice-1 takes exactly 1.")
    finally:
        verifier._contrib_schemas.cache_clear()
        verifier.op_info.cache_clear()


def test_custom_domain_op_passes_through_untyped():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [3])
    y = b.op("Anything", [x, x, None, x], domain="my.ops", num_outputs=2, flavour="odd")[0]
    b.output(b.op("Relu", [y]), "f32", [3])
    model = b.build(infer=False)
    assert diagnose(model) == []


# --------------------------------------------------------------------------- structure


def test_cycle_is_named_in_order():
    model = chain(3)
    relu0, relu1, relu2 = nodes(model)
    relu0.replace_input_with(0, relu1.outputs[0])
    problem = only(model, "cycle")
    assert problem.node is relu0
    assert problem.message == (
        "Relu node 'relu0' (id 0) is on a cycle: Relu node 'relu0' (id 0) -> Relu node 'relu1' (id 1) "
        "-> Relu node 'relu0' (id 0)."
    )


def test_self_loop_is_a_cycle():
    model = chain(2)
    relu0, _ = nodes(model)
    relu0.replace_input_with(0, relu0.outputs[0])
    assert only(model, "cycle").message == (
        "Relu node 'relu0' (id 0) is on a cycle: Relu node 'relu0' (id 0) -> Relu node 'relu0' (id 0)."
    )


def test_use_before_definition_without_cycle():
    model = chain(3)
    relu0, relu1, relu2 = nodes(model)
    model.graph.remove(relu0)
    model.graph.append(relu0)
    assert only(model, "order").message == (
        "Relu node 'relu1' (id 1) reads %relu0 (input 0) before it is defined: its producer Relu node 'relu0' "
        "(id 0) comes later in the graph (sort the graph topologically)."
    )


def test_undefined_value():
    model = chain(2)
    stray = ir.Value(name="stray", type=ir.TensorType(ir.DataType.FLOAT))
    nodes(model)[1].replace_input_with(0, stray)
    assert only(model, "undefined").message == (
        "Relu node 'relu1' (id 1) reads %stray (input 0), but no node, graph input or initializer defines it."
    )


def test_undefined_value_hints_at_a_namesake():
    model = chain(2)
    impostor = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT))
    nodes(model)[0].replace_input_with(0, impostor)
    assert only(model, "undefined").message.endswith("(a different value named %x is in scope).")


def test_input_from_a_removed_node():
    model = chain(3)
    relu0, relu1, _ = nodes(model)
    model.graph.remove(relu0, safe=False)
    problems = diagnose(model)
    assert [p.rule for p in problems] == ["undefined", "uses"]
    assert problems[0].message == (
        "Relu node 'relu1' (id 1) reads %relu0 (input 0), but its producer Relu node 'relu0' (id 0) is in no "
        "graph (was it removed?)."
    )
    # relu0 was removed without detaching: %x still lists it as a user
    assert problems[1].message == (
        "the use list of %x (a graph input) records input 0 of Relu node 'relu0' (id 0), which is not in the "
        "model (removed without clearing its inputs?)."
    )


def test_duplicate_definition():
    model = chain(3)
    nodes(model)[1].outputs[0].name = "relu0"
    problem = only(model, "ssa")
    assert problem.message == (
        "Relu node 'relu1' (id 1): %relu0 is defined twice: as output 0 of Relu node 'relu0' (id 0) and as "
        "output 0 of Relu node 'relu1' (id 1)."
    )


def test_node_output_shadowing_a_graph_input():
    model = chain(2)
    nodes(model)[0].outputs[0].name = "x"
    assert "%x is defined twice: as a graph input and as output 0 of Relu node 'relu0' (id 0)." in (
        only(model, "ssa").message
    )


def test_untyped_node_output():
    model = chain(2, infer=False)  # the builder leaves op outputs untyped without inference
    problems = diagnose(model)
    assert [p.message for p in problems] == [
        "Relu node 'relu0' (id 0): output 0 %relu0 has no type.",
        "Relu node 'relu1' (id 1): output 0 %relu1 has no type.",
    ]


def test_untyped_graph_input():
    model = chain(1)
    model.graph.inputs[0].type = None
    assert only(model, "typed").message == "input of graph 'g' %x has no type."


def test_graph_output_not_defined():
    model = chain(2)
    stray = ir.Value(name="stray", type=ir.TensorType(ir.DataType.FLOAT))
    model.graph.outputs.append(stray)
    assert only(model, "output").message == (
        "output 1 (%stray) of graph 'g' is not defined there: no node, graph input or initializer defines it."
    )


def test_missing_and_duplicate_ids():
    model = chain(3)
    relu0, relu1, relu2 = nodes(model)
    relu1.metadata_props[ids.ID_KEY] = "0"
    del relu2.metadata_props[ids.ID_KEY]
    problems = diagnose(model)
    assert [p.message for p in problems] == [
        "Relu node 'relu1' (id 0) reuses id 0 of Relu node 'relu0' (id 0); ids must be unique.",
        "Relu node 'relu2' (id ?) has no ncc.id (give it one with ncc.ir.ids.stamp).",
    ]


def test_use_list_drift_when_inputs_change_behind_the_mutators():
    model = chain(3)
    relu0, relu1, relu2 = nodes(model)
    relu2._inputs = (relu0.outputs[0],)  # bypass replace_input_with on purpose
    problems = diagnose(model)
    assert [p.rule for p in problems] == ["uses", "uses"]
    assert problems[0].message == (
        "Relu node 'relu2' (id 2) reads %relu0 at input 0, but the use list of %relu0 does not record it "
        "(were inputs changed behind the IR's mutators?)."
    )
    assert problems[1].message == (
        "the use list of %relu1 records input 0 of Relu node 'relu2' (id 2), but that input is %relu0."
    )


def test_output_claiming_another_producer():
    model = chain(2)
    relu0, relu1 = nodes(model)
    relu1.outputs[0]._producer = relu0  # bypass the IR on purpose
    problem = diagnose(model)[0]
    assert problem.rule == "ssa"
    assert problem.message == (
        "Relu node 'relu1' (id 1): output 0 %relu1 records output 0 of Relu node 'relu0' (id 0)."
    )


# --------------------------------------------------------------------------- per-op rules


def test_wrong_input_arity():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [1, 3, 4, 4])
    b.output(b.op("Conv", [x]), "f32", [1, 3, 4, 4])
    model = b.build(infer=False, verify=False)
    assert only(model, "inputs").message == "Conv node 'conv0' (id 0) has 1 input; Conv-11 takes 2 to 3."


def test_empty_required_input():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [1, 3, 4, 4])
    b.output(b.op("Conv", [None, x]), "f32", [1, 3, 4, 4])
    model = b.build(infer=False, verify=False)
    assert (
        only(model, "inputs").message == "Conv node 'conv0' (id 0) lacks required input 0 ('X') of Conv-11."
    )


def test_wrong_output_arity():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [3])
    a, _ = b.op("Relu", [x], num_outputs=2)
    b.output(a, "f32", [3])
    model = b.build(infer=False, verify=False)
    messages = [p.message for p in diagnose(model) if p.rule == "outputs"]
    assert messages == ["Relu node 'relu0' (id 0) has 2 outputs; Relu-14 produces exactly 1."]


def test_trailing_empty_outputs_are_absent():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [3])
    y = b.op("Dropout", [x], outputs=["y", ""])[0]
    b.output(y)
    verify(b.build())


def one_op(op_type: str, **attributes) -> ir.Model:
    """``x: f32[3] -> op_type -> output: f32[3]``, neither inferred nor verified."""
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [3])
    b.output(b.op(op_type, [x], **attributes), "f32", [3])
    return b.build(infer=False, verify=False)


@pytest.mark.parametrize(
    "op_type,attributes,rule,message",
    [
        ("Cast", {}, "attribute", "Cast node 'cast0' (id 0) lacks required attribute 'to' of Cast-13."),
        (
            "Relu",
            {"alpha": 0.1},
            "attribute",
            "Relu node 'relu0' (id 0) has attribute 'alpha', unknown to Relu-14 (valid: none).",
        ),
        (
            "Gelu",
            {},
            "op",
            "Gelu node 'gelu0' (id 0) needs opset 20 or later of the default domain, but the model imports opset 17.",
        ),
        ("Relux", {}, "op", "Relux node 'relux0' (id 0) is not an operator of the default ONNX domain."),
    ],
    ids=["missing-required-attribute", "unknown-attribute", "op-newer-than-the-opset", "unknown-standard-op"],
)
def test_one_op_rule(op_type, attributes, rule, message):
    assert only(one_op(op_type, **attributes), rule).message == message


def test_attribute_of_the_wrong_type():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [1, 3, 4, 4])
    w = b.const("w", np.ones((2, 3, 1, 1), np.float32))
    b.output(b.op("Conv", [x, w], group=1.0), "f32", [1, 2, 4, 4])
    model = b.build(infer=False, verify=False)
    assert only(model, "attribute").message == (
        "Conv node 'conv0' (id 0) has attribute 'group' of type FLOAT; Conv-11 expects INT."
    )


def test_domain_not_imported():
    model = one_op("Foo", domain="my.ops")
    del model.opset_imports["my.ops"]
    assert only(model, "domain").message == (
        "my.ops::Foo node 'foo0' (id 0) is in domain 'my.ops', which the model does not import (imported: '')."
    )


# --------------------------------------------------------------------------- the error


def test_verification_error_names_the_first_problem_and_shows_context():
    model = chain(4)
    relu0, relu1, relu2, relu3 = nodes(model)
    relu1.metadata_props[ids.ID_KEY] = "0"
    stray = ir.Value(name="stray", type=ir.TensorType(ir.DataType.FLOAT))
    relu3.replace_input_with(0, stray)
    with pytest.raises(VerificationError) as info:
        verify(model)
    lines = str(info.value).splitlines()
    assert lines[0] == "Relu node 'relu1' (id 0) reuses id 0 of Relu node 'relu0' (id 0); ids must be unique."
    assert lines[1] == "  in g:"
    marked = [line for line in lines[2:5] if line.lstrip().startswith(">")]
    assert len(lines[2:5]) == 3 and len(marked) == 1
    assert "relu0" in lines[2] and "relu1" in marked[0] and "relu2" in lines[4]
    assert lines[5] == "1 more problem:"
    assert lines[6] == (
        "  - [undefined] Relu node 'relu3' (id 3) reads %stray (input 0), but no node, graph input or "
        "initializer defines it."
    )
    assert lines[7] == "    in g:"
    assert lines[-1].startswith("    > ") and "relu3" in lines[-1]  # the last node: no successor line


def test_long_reports_are_cut_after_ten():
    model = chain(15, infer=False)
    problems = diagnose(model)
    assert len(problems) == 15
    text = format_diagnostics(problems)
    assert text.splitlines()[0] == "Relu node 'relu0' (id 0): output 0 %relu0 has no type."
    assert "14 more problems:" in text
    assert text.count("  - [typed]") == 10
    assert text.splitlines()[-1] == "  ... and 4 more (ncc.ir.verifier.diagnose lists all)."


def test_context_falls_back_when_the_printer_fails(monkeypatch):
    import ncc.ir.printer as printer

    def broken(node):
        raise RuntimeError("printer bug")

    monkeypatch.setattr(printer, "print_node", broken)
    model = chain(2)
    nodes(model)[1].metadata_props[ids.ID_KEY] = "0"
    text = format_diagnostics(diagnose(model))
    assert "  > Relu(%relu0) -> %relu1    # Relu node 'relu1' (id 0)" in text


# --------------------------------------------------------------------------- speed


def test_long_chain_verifies_in_linear_time():
    n = 20_000
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4]))
    made, v = [], x
    for k in range(n):
        node = ir.Node("", "Relu", [v], name=f"r{k}")
        node.outputs[0].name = f"v{k}"
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        made.append(node)
        v = node.outputs[0]
    model = ir.Model(ir.Graph([x], [v], nodes=made, opset_imports={"": 17}), ir_version=8)
    ids.assign_ids(model)
    start = time.perf_counter()
    verify(model)
    assert time.perf_counter() - start < 5.0


def test_subgraphs_of_schema_less_ops_need_no_types():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [3])
    body = b.subgraph("body")
    body.output(body.op("Neg", [body.op("Relu", [x])]))  # untyped: no inference runs inside my.ops::Map
    b.output(b.op("Map", [x], domain="my.ops", fn=body), "f32", [3])
    model = b.build(infer=False)
    assert diagnose(model) == []


@pytest.mark.conformance
@pytest.mark.filterwarnings("ignore")  # ONNX's case generators overflow casts on purpose
def test_onnx_node_conformance_models_verify():
    from onnx.backend.test.case.node import collect_testcases

    failures = []
    for case in collect_testcases(None):
        problems = diagnose(from_proto(case.model))
        failures += [f"{case.name}: {p.message}" for p in problems]
    assert failures == []
