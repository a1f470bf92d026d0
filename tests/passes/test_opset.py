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
