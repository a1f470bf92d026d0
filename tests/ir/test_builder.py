"""GraphBuilder: graphs in a few lines, typed by inference, runnable in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from ncc.errors import NccError
from ncc.ir import ids
from ncc.ir.builder import DTYPES_BY_NAME, GraphBuilder, dtype
from ncc.ir.verifier import diagnose
from ncc.runtime import run


def conv_split_model() -> tuple[ir.Model, np.ndarray]:
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3), dtype=np.float32)
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", ["N", 3, 8, 8])
    wv = b.const("w", w)
    y = b.op("Conv", [x, wv], pads=[1, 1, 1, 1], name="conv0")
    a, c = b.op("Split", [y], num_outputs=2, axis=1)
    b.output(b.op("Relu", [a]))
    b.output(c)
    b.output(y, "f32", ["N", 4, 8, 8])
    return b.build(), w


def test_conv_split_example_builds_typed_named_and_with_ids():
    model, _ = conv_split_model()
    conv, split, relu = model.graph
    assert [n.name for n in model.graph] == ["conv0", "split0", "relu0"]
    assert [ids.node_id(n) for n in model.graph] == [0, 1, 2]
    assert conv.outputs[0].name == "conv0"
    assert [v.name for v in split.outputs] == ["split0_0", "split0_1"]
    assert split.outputs[1].shape == ir.Shape(["N", 2, 8, 8])
    assert relu.outputs[0].dtype == ir.DataType.FLOAT
    assert model.opset_imports == {"": 17}
    assert model.ir_version == 8
    assert list(conv.attributes["pads"].value) == [1, 1, 1, 1]
    assert diagnose(model) == []


def test_run_matches_numpy():
    model, w = conv_split_model()
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8), dtype=np.float32)
    relu, c, y = run(model, [x])
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # N,C,H,W,3,3
    expected = np.einsum("nchwij,ocij->nohw", windows, w)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(relu, np.maximum(expected[:, :2], 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c, expected[:, 2:], rtol=1e-5, atol=1e-5)
    (by_name,) = run(model, {"x": x}, outputs=["conv0"])
    np.testing.assert_array_equal(by_name, y)


def test_split_18_gets_num_outputs_as_attribute_too():
    b = GraphBuilder("g", opset=18)
    x = b.input("x", "f32", [4])
    parts = b.op("Split", [x], num_outputs=2)
    for p in parts:
        b.output(p)
    model = b.build()
    assert next(iter(model.graph)).attributes["num_outputs"].value == 2
    np.testing.assert_array_equal(run(model, [np.arange(4, dtype=np.float32)])[1], [2.0, 3.0])


def test_names_are_unique_and_deterministic():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [3])
    r1 = b.op("Relu", [x], name="act")
    r2 = b.op("Relu", [r1], name="act")
    r3 = b.op("Relu", [r2])
    r4 = b.op("Relu", [r3], outputs=["x"])  # clashes with the input's name
    assert [n.name for n in b.graph] == ["act", "act_1", "relu0", "relu1"]
    assert [r.name for r in (r1, r2, r3, r4)] == ["act", "act_1", "relu0", "x_1"]


def test_numpy_inputs_become_initializers_and_attributes_convert():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [2, 2])
    y = b.op("Add", [x, np.ones((2, 2), np.float32)], name="add")
    z = b.op("Cast", [y], to=ir.DataType.FLOAT16)
    c = b.op("Constant", [], value=np.array([1.5], np.float32))
    b.output(z)
    b.output(c)
    model = b.build()
    assert "add_in1" in model.graph.initializers
    assert z.dtype == ir.DataType.FLOAT16
    out, const = run(model, [np.zeros((2, 2), np.float32)])
    assert out.dtype == np.float16 and out.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert const.tolist() == [1.5]


def test_if_subgraph_reads_outer_values():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [3])
    cond = b.input("cond", "bool", [])
    two = b.const("two", np.full((3,), 2.0, np.float32))
    then = b.subgraph("then")
    then.output(then.op("Mul", [x, two]))
    other = b.subgraph("else")
    other.output(other.op("Neg", [x]))
    y = b.op("If", [cond], then_branch=then, else_branch=other, name="if0")
    b.output(y)
    model = b.build()
    assert y.dtype == ir.DataType.FLOAT
    assert sorted(ids.node_id(n) for n in ids.all_nodes(model)) == [0, 1, 2]
    data = np.array([1.0, -2.0, 3.0], np.float32)
    np.testing.assert_array_equal(run(model, [data, np.array(True)])[0], data * 2)
    np.testing.assert_array_equal(run(model, [data, np.array(False)])[0], -data)


def test_loop_body_with_its_own_inputs():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [2])
    body = b.subgraph("body")
    body.input("i", "i64", [])
    cond_in = body.input("cond_in", "bool", [])
    acc = body.input("acc", "f32", [2])
    body.output(body.op("Identity", [cond_in]))
    body.output(body.op("Add", [acc, x]))
    trips = b.const("trips", np.array(3, np.int64))
    keep_going = b.const("keep_going", np.array(True))
    zero = b.const("zero", np.zeros(2, np.float32))
    total = b.op("Loop", [trips, keep_going, zero], body=body)
    b.output(total)
    model = b.build()
    np.testing.assert_array_equal(run(model, [np.array([1.0, 2.0], np.float32)])[0], [3.0, 6.0])


def test_custom_domain_is_imported_and_left_untyped():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [3])
    y = b.op("Fancy", [x], domain="my.ops")
    b.output(b.op("Identity", [y]), "f32", [3])
    model = b.build()
    assert model.opset_imports == {"": 17, "my.ops": 1}
    assert y.type is None


def test_build_verifies_by_default():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [3])
    b.output(b.op("Relu", [x], alpha=1.0))
    with pytest.raises(NccError, match="has attribute 'alpha', unknown to Relu-14"):
        b.build()


def test_shape_inference_failure_is_an_error():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", [3])
    y = b.input("y", "f32", [4])
    b.output(b.op("Add", [x, y]))
    with pytest.raises(NccError, match="ONNX shape inference failed on graph 'g'"):
        b.build()


def test_dtype_names():
    assert dtype("f32") == ir.DataType.FLOAT
    assert dtype("bool") == ir.DataType.BOOL
    assert dtype("str") == ir.DataType.STRING
    assert dtype(np.int8) == ir.DataType.INT8
    assert dtype(ir.DataType.BFLOAT16) == ir.DataType.BFLOAT16
    for name in "f32 f16 bf16 f64 i8 i16 i32 i64 u8 u16 u32 u64 bool str".split():
        assert name in DTYPES_BY_NAME
    with pytest.raises(NccError, match="unknown dtype 'float32'"):
        dtype("float32")


def test_subgraph_builder_has_no_model():
    b = GraphBuilder("g")
    with pytest.raises(NccError, match="subgraph builder 'body' has no model of its own"):
        b.subgraph("body").build()
