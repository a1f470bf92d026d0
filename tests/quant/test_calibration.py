"""collect_statistics against a direct onnxruntime run; caching; external data; bad data."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from ncc import runtime
from ncc.errors import NccError
from ncc.passes.quant.calib_data import load_calibration_data
from ncc.passes.quant.calibration import collect_statistics
from onnx import TensorProto, helper, numpy_helper


def _mlp_proto(seed: int = 0, hidden: int = 32):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((64, hidden)) / 8).astype(np.float32)
    b = rng.standard_normal(hidden).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["mm"], name="matmul"),
            helper.make_node("Add", ["mm", "B"], ["add"], name="add"),
            helper.make_node("Relu", ["add"], ["y"], name="relu"),
            helper.make_node("Shape", ["y"], ["shape"], name="shape"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", hidden]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _digits_npz(path, n=200):
    from sklearn.datasets import load_digits

    pixels = load_digits().data[:n].astype(np.float32) / 16.0  # real 8x8 digits, flattened
    np.savez(path, x=pixels)
    return pixels


def _reference(proto, pixels):
    """Run the same model in onnxruntime with the intermediates as outputs, all at once."""
    proto = type(proto).FromString(proto.SerializeToString())
    for name in ("mm", "add"):
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"x": pixels})))


def test_matches_onnxruntime_run(tmp_path):
    proto = _mlp_proto()
    pixels = _digits_npz(tmp_path / "calib.npz")
    model = ir.serde.deserialize_model(proto)
    data = load_calibration_data(str(tmp_path / "calib.npz"))
    stats = collect_statistics(
        model, ["x", "mm", "add", "y", "shape", "W"], data, batch_size=16, progress=False
    )
    assert list(stats) == ["x", "mm", "add", "y", "W"]  # 'shape' is int64: not observed
    ref = _reference(proto, pixels)
    ref["x"] = pixels
    ref["W"] = numpy_helper.to_array(proto.graph.initializer[0])
    for name, s in stats.items():
        assert s.count == ref[name].size, name
        assert s.minmax() == pytest.approx(
            (float(ref[name].min()), float(ref[name].max())), rel=1e-6, abs=1e-6
        ), name
    assert stats["y"].min == 0.0 and stats["y"].zero_count == int(np.count_nonzero(ref["y"] == 0))
    assert (
        model.graph.outputs[0].name == "y" and len(model.graph.outputs) == 2
    )  # the caller's model is untouched


def test_cache_skips_onnxruntime(tmp_path, monkeypatch):
    model = ir.serde.deserialize_model(_mlp_proto())
    _digits_npz(tmp_path / "calib.npz", n=50)
    data = load_calibration_data(str(tmp_path / "calib.npz"))
    cache = tmp_path / "cache"
    first = collect_statistics(model, ["add", "y"], data, progress=False, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1

    def forbidden(*args, **kwargs):
        raise AssertionError("onnxruntime must not run on a cache hit")

    monkeypatch.setattr(ort, "InferenceSession", forbidden)
    again = collect_statistics(
        model,
        ["y", "add"],
        load_calibration_data(str(tmp_path / "calib.npz")),
        progress=False,
        cache_dir=cache,
    )
    for name in first:
        assert again[name].minmax() == first[name].minmax()
        np.testing.assert_array_equal(again[name].hist, first[name].hist)
    with pytest.raises(AssertionError, match="must not run"):  # another key misses the cache
        collect_statistics(model, ["y"], data, progress=False, cache_dir=cache, extra_key="other")
    other_model = ir.serde.deserialize_model(_mlp_proto(seed=1))
    with pytest.raises(AssertionError, match="must not run"):
        collect_statistics(other_model, ["add", "y"], data, progress=False, cache_dir=cache)


def test_external_data_model_weights_as_arrays_or_in_proto(tmp_path, monkeypatch):
    proto = _mlp_proto()
    pixels = _digits_npz(tmp_path / "calib.npz", n=40)
    ir.save(
        ir.serde.deserialize_model(proto),
        tmp_path / "m.onnx",
        external_data="m.onnx.data",
        size_threshold_bytes=0,
    )
    model = ir.load(tmp_path / "m.onnx")
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)
    ref = _reference(proto, pixels)
    data = load_calibration_data(str(tmp_path / "calib.npz"))
    as_arrays = collect_statistics(model, ["add"], data, progress=False)
    monkeypatch.setattr(runtime, "HANDOFF_BYTES", 1 << 62)  # every weight inside the proto
    in_proto = collect_statistics(model, ["add"], data, progress=False)
    for stats in (as_arrays, in_proto):
        assert stats["add"].minmax() == pytest.approx(
            (float(ref["add"].min()), float(ref["add"].max())), rel=1e-6
        )
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)


def test_value_without_type_is_fetched_as_float(tmp_path):
    model = ir.serde.deserialize_model(_mlp_proto())
    model.graph.node(1).outputs[0].type = None  # 'add' lost its type
    model.graph.node(1).outputs[0].shape = None
    _digits_npz(tmp_path / "calib.npz", n=10)
    stats = collect_statistics(
        model, ["add"], load_calibration_data(str(tmp_path / "calib.npz")), progress=False
    )
    assert stats["add"].count == 10 * 32


def test_fixed_batch_dimension_is_respected(tmp_path):
    proto = _mlp_proto()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # a model exported with batch 1
    model = ir.serde.deserialize_model(proto)
    _digits_npz(tmp_path / "calib.npz", n=7)
    stats = collect_statistics(
        model, ["y"], load_calibration_data(str(tmp_path / "calib.npz")), batch_size=8, progress=False
    )
    assert stats["y"].count == 7 * 32


def test_bad_data_fails_before_running(tmp_path, monkeypatch):
    model = ir.serde.deserialize_model(_mlp_proto())
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 63), np.float32))
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: pytest.fail("ran onnxruntime"))
    spec = str(tmp_path / "calib.npz")
    with pytest.raises(NccError) as info:
        collect_statistics(model, ["y"], load_calibration_data(spec), progress=False)
    assert str(info.value) == (
        f"calibration input 'x' in {spec} has shape [4, 63] but the model expects [?, 64]: dimension 1 is 63, expected 64."
    )
    with pytest.raises(ValueError, match="not in the model"):
        collect_statistics(
            model, ["nope"], load_calibration_data(str(tmp_path / "calib.npz")), progress=False
        )


def test_onnxruntime_failure_on_data_is_one_sentence(tmp_path):
    proto = _mlp_proto()
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "K"  # the width is not declared
    model = ir.serde.deserialize_model(proto)
    np.savez(tmp_path / "calib.npz", x=np.ones((3, 10), np.float32))
    spec = str(tmp_path / "calib.npz")
    with pytest.raises(NccError) as info:
        collect_statistics(model, ["y"], load_calibration_data(spec), progress=False)
    message = str(info.value)
    assert message.startswith(f"onnxruntime failed to run the float model on calibration batch 0 of {spec}: ")
    assert "\n" not in message and "matmul" in message.lower()
