"""ONNX in and out: lazy external data, escape refusal, opsets, custom domains, functions, saving."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from ncc.backends.onnx import emit, save_onnx
from ncc.errors import NccError
from ncc.frontends.onnx import load_onnx
from ncc.ir import ids
from onnx import TensorProto, helper, numpy_helper


def _mlp(opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 32), dtype=np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal((32,), dtype=np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_external_data_is_not_read_on_load(tmp_path):
    onnx.save(
        _mlp(), tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0
    )
    model = load_onnx(tmp_path / "m.onnx")
    w = model.graph.initializers["w"].const_value
    assert isinstance(w, ir.ExternalTensor)
    assert [ids.node_id(n) for n in model.graph] == [0, 1, 2]


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "sub/../../x.data"])
def test_external_data_leaving_the_folder_is_refused(tmp_path, location):
    inner = tmp_path / "inner"
    inner.mkdir()
    onnx.save(_mlp(), inner / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    proto = onnx.load(inner / "m.onnx", load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, inner / "evil.onnx")
    with pytest.raises(NccError, match="outside the model's folder"):
        load_onnx(inner / "evil.onnx")


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_opsets_round_trip_through_onnx(tmp_path, opset):
    onnx.save(_mlp(opset), tmp_path / "m.onnx")
    model = load_onnx(tmp_path / "m.onnx")
    assert model.opset_imports[""] == opset
    save_onnx(model, tmp_path / "o.onnx")
    x = np.random.default_rng(1).standard_normal((3, 64), dtype=np.float32)
    np.testing.assert_array_equal(_run(tmp_path / "o.onnx", x), _run(tmp_path / "m.onnx", x))


def test_constant_nodes_custom_domain_and_functions_load(tmp_path):
    fn = helper.make_function(
        "my.fns",
        "Scale2",
        ["a"],
        ["b"],
        [
            helper.make_node(
                "Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))
            ),
            helper.make_node("Mul", ["a", "two"], ["b"]),
        ],
        [helper.make_opsetid("", 17)],
    )
    nodes = [
        helper.make_node("Scale2", ["x"], ["s"], domain="my.fns"),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(4, np.float32))),
        helper.make_node("Add", ["s", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    proto = helper.make_model(
        graph, functions=[fn], opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.fns", 1)]
    )
    onnx.save(proto, tmp_path / "f.onnx")
    model = load_onnx(tmp_path / "f.onnx")
    assert ("my.fns", "Scale2", "") in model.functions
    save_onnx(model, tmp_path / "o.onnx")
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(_run(tmp_path / "o.onnx", x), 2 * x + 1)


def test_save_external_data_when_asked_and_when_over_the_limit(tmp_path, monkeypatch):
    onnx.save(_mlp(), tmp_path / "m.onnx")
    model = load_onnx(tmp_path / "m.onnx")
    assert save_onnx(model, tmp_path / "a.onnx", external_data="a.bin") == tmp_path / "a.bin"
    assert (tmp_path / "a.bin").stat().st_size >= 64 * 32 * 4
    monkeypatch.setattr(emit, "PROTOBUF_LIMIT", 1024)  # pretend the weights exceed protobuf's limit
    assert save_onnx(load_onnx(tmp_path / "m.onnx"), tmp_path / "b.onnx") == tmp_path / "b.onnx.data"
    x = np.ones((2, 64), np.float32)
    for name in ("a.onnx", "b.onnx"):
        np.testing.assert_array_equal(_run(tmp_path / name, x), _run(tmp_path / "m.onnx", x))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.bin",
        "a.onnx",
        "b.onnx",
        "b.onnx.data",
        "m.onnx",
    ]


def test_inline_save_of_externally_stored_model_is_self_contained(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(_mlp(), src / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    save_onnx(load_onnx(src / "m.onnx"), tmp_path / "o.onnx")
    proto = onnx.load(tmp_path / "o.onnx", load_external_data=False)
    assert all(t.data_location == TensorProto.DEFAULT for t in proto.graph.initializer)
