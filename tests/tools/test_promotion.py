"""``ncc.tune.promotion``: the dequantized weights of a weight-only model and what 8 bits buy per layer."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import invoke_ncc as ncc
from ncc.tune.promotion import dequantized_weights, promotion_gains
from onnx import TensorProto, helper, numpy_helper


def _mlp(path, scales=(1.0, 3.0, 1.0)):
    """Three 64x64 MatMul + Tanh layers, the second with larger weights; logits over the last axis."""
    rng = np.random.default_rng(1)
    nodes, weights, x = [], [], "x"
    for i, s in enumerate(scales):
        w = rng.standard_normal((64, 64)).astype(np.float32) / 8 * s
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"layer{i}"))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]))
        x = f"t{i}"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", 64])], weights,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("bits", ["w4", "w8"])
def test_dequantized_weights_are_what_dequantizelinear_computes(tmp_path, bits):
    model = _mlp(tmp_path / "mlp.onnx")
    out = tmp_path / f"{bits}.onnx"
    result = ncc("compile", model, "--pass", bits, "--group-size", "32", "--format", "qdq", "-o", out)
    assert result.exit_code == 0, result.stderr
    got = dequantized_weights(ir.load(out))
    assert sorted(got) == ["layer0", "layer1", "layer2"]
    # onnxruntime's own DequantizeLinear outputs, fetched from the written model
    written = onnx.load(out)
    producers = {o: n for n in written.graph.node for o in n.output}
    reads = {n.name: n.input[1] for n in written.graph.node if n.op_type == "MatMul"}
    assert all(producers[v].op_type == "DequantizeLinear" for v in reads.values())
    for v in reads.values():
        written.graph.output.append(helper.make_empty_tensor_value_info(v))
    session = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])
    fetched = session.run(list(reads.values()), {"x": np.zeros((1, 64), np.float32)})
    for (name, _), want in zip(reads.items(), fetched):
        np.testing.assert_array_equal(got[name], want)
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(model).graph.initializer}
    error = max(
        np.abs(got[f"layer{i}"] - original[f"w{i}"]).max() / np.abs(original[f"w{i}"]).max() for i in range(3)
    )
    assert error < (0.1 if bits == "w4" else 0.01)  # the weights, quantized: within a grid step


def test_promotion_gains_measure_the_layers_8_bits_help(tmp_path):
    path = _mlp(tmp_path / "mlp.onnx")
    model = ir.load(path)
    floats = {f"layer{i}": ir.load(path).graph.initializers[f"w{i}"].const_value.numpy() for i in range(3)}
    rng = np.random.default_rng(2)
    noise = {
        n: w + rng.standard_normal(w.shape).astype(np.float32) * 0.05 * (4 if n == "layer1" else 1)
        for n, w in floats.items()
    }
    feeds = [{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(2)]
    base, gains = promotion_gains(model, noise, floats, feeds)
    assert base > 0
    assert max(gains, key=gains.get) == "layer1"  # the noisiest layer buys the most when made exact
    assert all(g > 0 for g in gains.values())
    # a layer whose "8-bit" weights are its 4-bit ones buys exactly nothing
    _, same = promotion_gains(model, noise, {**floats, "layer0": noise["layer0"]}, feeds)
    assert same["layer0"] == 0.0
    # every layer exact: no divergence left
    exact, _ = promotion_gains(model, floats, floats, feeds)
    assert exact == pytest.approx(0.0, abs=1e-9)
