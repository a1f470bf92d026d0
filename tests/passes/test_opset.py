"""passes/opset: raising a model's opset keeps every node's meaning, or names what blocks it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_ort
from ncc.ir.ops import onnx_opset
from ncc.passes.opset import raise_opset, upgrade_blockers
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def _model(nodes, inits=(), opset=13, x_shape=(2, 3, 8), y_shape=None):
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, list(x_shape))],
        [h.make_tensor_value_info("y", T.FLOAT, y_shape)],
        list(inits),
    )
    return ir.serde.deserialize_model(h.make_model(graph, opset_imports=[h.make_opsetid("", opset)]))


def test_reduce_axes_attribute_becomes_an_input_and_outputs_are_unchanged():
    nodes = [
        h.make_node("ReduceMean", ["x"], ["m"], axes=[-1], keepdims=1),
        h.make_node("ReduceMax", ["m"], ["y0"], axes=[1], keepdims=0),
        h.make_node("Reshape", ["y0", "shape"], ["y"]),
    ]
    model = _model(nodes, [nh.from_array(np.array([-1], np.int64), "shape")], y_shape=[2])
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    before = run_ort(model, {"x": x})["y"]
    assert raise_opset(model, 21) == []
    assert onnx_opset(model) == 21 and model.ir_version >= 10
    reduces = [n for n in model.graph if n.op_type.startswith("Reduce")]
    assert all("axes" not in n.attributes and len(n.inputs) == 2 for n in reduces)
    assert [int(a) for n in reduces for a in n.inputs[1].const_value.numpy()] == [-1, 1]
    onnx.checker.check_model(ir.serde.serialize_model(model))
    np.testing.assert_array_equal(run_ort(model, {"x": x})["y"], before)


@pytest.mark.parametrize(
    "op, attrs, opset, target",
    [
        ("RoiAlign", {}, 13, 21),  # 16: coordinate_transformation_mode default changed
        ("GroupNormalization", {"num_groups": 1}, 18, 21),  # 21: scale and bias per channel, not per group
    ],
)
def test_meaning_changes_block_the_upgrade(op, attrs, opset, target):
    if op == "RoiAlign":
        node = h.make_node(op, ["x", "rois", "idx"], ["y"])
    else:
        node = h.make_node(op, ["x", "s", "b"], ["y"], **attrs)
    model = _model([node], opset=opset)
    assert upgrade_blockers(model, target) == [op]
    assert raise_opset(model, target) == [op]
    assert onnx_opset(model) == opset  # untouched


def test_type_only_changes_do_not_block():
    nodes = [
        h.make_node("Cast", ["x"], ["c"], to=T.FLOAT),
        h.make_node("Pad", ["c", "pads"], ["p"]),
        h.make_node("Transpose", ["p"], ["y"], perm=[0, 2, 1]),
    ]
    model = _model(nodes, [nh.from_array(np.zeros(6, np.int64), "pads")])
    assert upgrade_blockers(model, 21) == []
    assert raise_opset(model, 21) == [] and onnx_opset(model) == 21


def test_already_at_target_is_left_alone():
    model = _model([h.make_node("Relu", ["x"], ["y"])], opset=21)
    assert raise_opset(model, 17) == [] and onnx_opset(model) == 21


def test_attributes_that_became_inputs_at_13_are_moved_and_outputs_are_unchanged():
    nodes = [
        h.make_node("Split", ["x"], ["s0", "s1"], axis=2, split=[3, 5]),
        h.make_node("Unsqueeze", ["s0"], ["u"], axes=[0]),
        h.make_node("Squeeze", ["u"], ["q"], axes=[0]),
        h.make_node("Concat", ["q", "s1"], ["c"], axis=2),
        h.make_node("ReduceSum", ["c"], ["y"], axes=[1], keepdims=1),
    ]
    model = _model(nodes, opset=11, y_shape=[2, 1, 8])
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    before = run_ort(model, {"x": x})["y"]
    assert raise_opset(model, 13) == []
    assert onnx_opset(model) == 13 and model.ir_version >= 7
    moved = {n.op_type: n for n in model.graph if n.op_type in ("Split", "Unsqueeze", "Squeeze", "ReduceSum")}
    assert all(len(n.inputs) == 2 and not ({"axes", "split"} & set(n.attributes)) for n in moved.values())
    assert moved["Split"].inputs[1].const_value.numpy().tolist() == [3, 5]
    assert moved["ReduceSum"].inputs[1].const_value.numpy().tolist() == [1]
    onnx.checker.check_model(ir.serde.serialize_model(model))
    np.testing.assert_array_equal(run_ort(model, {"x": x})["y"], before)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
@pytest.mark.parametrize("axis, keeps_meaning", [(2, True), (-1, True), (1, False), (0, False)])
def test_softmax_before_13_keeps_its_meaning_only_on_the_last_axis(op, axis, keeps_meaning):
    model = _model([h.make_node(op, ["x"], ["y"], axis=axis)], opset=11, y_shape=[2, 3, 8])
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    before = run_ort(model, {"x": x})["y"]
    assert raise_opset(model, 13) == ([] if keeps_meaning else [op])
    assert onnx_opset(model) == (13 if keeps_meaning else 11)
    np.testing.assert_allclose(run_ort(model, {"x": x})["y"], before, rtol=1e-6, atol=1e-7)


def test_opset_9_raises_to_13_through_compatible_changes_and_names_what_blocks():
    conv = h.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1])
    nodes = [conv, h.make_node("Relu", ["c"], ["r"]), h.make_node("Flatten", ["r"], ["y"], axis=1)]
    w = nh.from_array(np.random.default_rng(1).standard_normal((4, 3, 1)).astype(np.float32), "w")
    model = _model(nodes, [w], opset=9, y_shape=[2, 32])
    assert upgrade_blockers(model, 13) == []
    slicing = _model([h.make_node("Slice", ["x"], ["y"], starts=[0], ends=[1], axes=[0])], opset=9)
    clipping = _model([h.make_node("Clip", ["x"], ["y"], min=0.0, max=6.0)], opset=9)
    assert raise_opset(slicing, 13) == ["Slice"] and raise_opset(clipping, 13) == ["Clip"]
