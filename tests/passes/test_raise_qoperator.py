"""``raise-qoperator``: integer kernels back into QDQ groups, checked through onnxruntime.

onnxruntime's own QOperator quantization of a small CNN with nine kinds of integer kernel (QLinearConv,
QLinearMatMul and the com.microsoft QLinear* ops; Flatten on an 8-bit tensor) is raised and must compute
exactly what the QOperator file computes (onnxruntime fuses the QDQ groups back into the same kernels), with
no integer kernel left; ``ncc diff`` then reads it, every node paired by name and isolated. ncc's own
QOperator output is covered in ``tests/tools/test_diff.py`` (the same table as its QDQ form) and the rewrite
itself by the golden file ``golden/raise-qoperator.ncc``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import invoke_ncc as ncc
from conftest import ort_calibration_reader
from ncc.backends.onnx.check import INTEGER_KERNELS
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


@pytest.fixture(scope="module")
def onnxruntime_qoperator(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(float model, onnxruntime's QOperator form of it, calibration .npz)."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    folder = tmp_path_factory.mktemp("raise")
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return nh.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("Sigmoid", ["c1"], ["s1"], name="sig"),
        h.make_node("Conv", ["x", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        h.make_node("Add", ["s1", "r2"], ["a"], name="add"),
        h.make_node("Mul", ["a", "s1"], ["m"], name="mul"),
        h.make_node("Concat", ["a", "m"], ["cat"], name="cat", axis=1),
        h.make_node("AveragePool", ["cat"], ["ap"], name="avgpool", kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("LeakyRelu", ["ap"], ["lr"], name="leaky", alpha=0.1),
        h.make_node("GlobalAveragePool", ["lr"], ["g"], name="gap"),
        h.make_node("Flatten", ["g"], ["f"], name="flat"),
        h.make_node("MatMul", ["f", "wm"], ["y"], name="mm"),
    ]
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["b", 3, 8, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["b", 10])],
        [weight("w1", 8, 3, 3, 3), weight("w2", 8, 3, 3, 3), weight("b1", 8), weight("wm", 16, 10)],
    )  # fmt: skip
    float_model = folder / "cnn.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), float_model)
    images = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    calib = folder / "calib.npz"
    np.savez(calib, x=images)

    theirs = folder / "cnn.qop.onnx"
    reader = ort_calibration_reader("x", images)
    quantize_static(
        str(float_model), str(theirs), reader, quant_format=QuantFormat.QOperator, per_channel=True
    )
    return float_model, theirs, calib


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_onnxruntime_qoperator_raises_to_the_same_numbers(onnxruntime_qoperator, tmp_path):
    float_model, theirs, calib = onnxruntime_qoperator
    kernels = Counter(n.op_type for n in onnx.load(theirs).graph.node if n.op_type in INTEGER_KERNELS)
    assert len(kernels) == 9 and sum(kernels.values()) == 10, kernels
    raised = tmp_path / "raised.onnx"
    result = ncc("compile", theirs, "--passes", "raise-qoperator", "-o", raised)
    assert result.exit_code == 0, result.stderr
    ops = Counter(n.op_type for n in onnx.load(raised).graph.node)
    assert not set(ops) & INTEGER_KERNELS, ops
    assert ops["Conv"] == 2 and ops["MatMul"] == 1 and ops["LeakyRelu"] == 1 and ops["Flatten"] == 1
    x = np.load(calib)["x"]
    np.testing.assert_allclose(_run(raised, x), _run(theirs, x), rtol=0, atol=1e-6)
    # and it is still a quantization of the float model: within a few output steps of it
    assert float(np.abs(_run(raised, x) - _run(float_model, x)).max()) < 0.1


def test_diff_reads_an_onnxruntime_qoperator_model(onnxruntime_qoperator, tmp_path):
    float_model, theirs, calib = onnxruntime_qoperator
    out = tmp_path / "rows.json"
    result = ncc("diff", float_model, theirs, "--data", calib, "--json", out)
    assert result.exit_code == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    float_outputs = {n.name: n.output[0] for n in onnx.load(float_model).graph.node}
    paired = {r["node"].removesuffix("_quant"): r for r in rows}
    assert set(paired) == set(float_outputs) - {"relu2"}  # the Relu went into QLinearConv's saturation
    for name, row in paired.items():  # by name (onnxruntime's <name>_quant), each isolated on FLOAT's inputs
        assert not row["note"] and row["value"] == float_outputs[name], row
        assert row["added_sqnr_db"] is not None and 20 < row["added_sqnr_db"] < 80, row


def _chain(tmp_path: Path, width: int = 96) -> tuple[Path, Path]:
    """Three MatMul + Tanh layers of ``width`` and 16 inputs: (model, inputs .npz)."""
    rng = np.random.default_rng(1)
    nodes, weights, x = [], [], "x"
    for i in range(3):
        weights.append(nh.from_array((rng.standard_normal((width, width)) / 10).astype(np.float32), f"w{i}"))
        nodes += [h.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"layer{i}"),
                  h.make_node("Tanh", [f"m{i}"], [f"t{i}"], name=f"act{i}")]  # fmt: skip
        x = f"t{i}"
    graph = h.make_graph(
        nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, ["b", width])],
        [h.make_tensor_value_info(x, T.FLOAT, ["b", width])], weights,
    )  # fmt: skip
    model, data = tmp_path / "chain.onnx", tmp_path / "x.npz"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), model)
    np.savez(data, x=rng.standard_normal((16, width)).astype(np.float32))
    return model, data


def _same_diff(model: Path, data: Path, first: Path, second: Path) -> None:
    """``ncc diff`` prints the same table for ``first`` and ``second``."""
    tables = []
    for quantized in (first, second):
        out = quantized.with_suffix(".json")
        result = ncc("diff", model, quantized, "--data", data, "--json", out)
        assert result.exit_code == 0, result.stderr
        tables.append(json.loads(out.read_text()))
    for key in ("output_sqnr_db", "weights_only_sqnr_db", "activations_only_sqnr_db"):
        assert tables[0][key] == pytest.approx(tables[1][key], abs=1e-9), key
    rows = [[(r["node"], r["added_sqnr_db"], r["gain_db"], r["note"]) for r in t["rows"]] for t in tables]
    assert rows[0] == rows[1] and all(not note for *_, note in rows[0])


def test_dynamic_int8_raises_to_its_qdq_form(tmp_path):
    """int8-dynamic's standard form (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul) raised is its
    form=qdq (DequantizeLinear at the run-time scale): the same outputs, the same diff; so is its fused form
    (DynamicQuantizeMatMul)."""
    model, data = _chain(tmp_path)
    standard, qdq, raised = (tmp_path / f"{name}.onnx" for name in ("standard", "qdq", "raised"))
    assert ncc("compile", model, "--pass", "int8-dynamic", "-o", standard).exit_code == 0
    assert ncc("compile", model, "--passes", "quantize-dynamic{form=qdq}", "-o", qdq).exit_code == 0
    assert "MatMulInteger" in {n.op_type for n in onnx.load(standard).graph.node}
    result = ncc("compile", standard, "--passes", "raise-qoperator", "-o", raised)
    assert result.exit_code == 0 and "MatMulInteger 3 as QDQ groups" in result.stderr, result.stderr
    assert {n.op_type for n in onnx.load(raised).graph.node} == {n.op_type for n in onnx.load(qdq).graph.node}
    feeds = np.load(data)["x"]
    np.testing.assert_array_equal(_run(raised, feeds), _run(qdq, feeds))
    _same_diff(model, data, standard, qdq)
    fused = tmp_path / "fused.onnx"  # DynamicQuantizeMatMul, each quantizing its own input
    assert ncc("compile", model, "--passes", "quantize-dynamic{form=fused}", "-o", fused).exit_code == 0
    _same_diff(model, data, fused, qdq)


def test_matmulnbits_raises_to_the_blocked_qdq_form(tmp_path):
    """ncc's w4 output (MatMulNBits, 4-bit codes packed two to a byte, asymmetric zero points) raised is the
    blocked-DequantizeLinear form ``--format qdq`` writes: the same outputs in onnxruntime, the same diff."""
    model, data = _chain(tmp_path)  # K = 96: the last group of 64 is partial
    packed, blocked, raised = (tmp_path / f"{name}.onnx" for name in ("nbits", "qdq", "raised"))
    flags = ("--pass", "w4", "--group-size", "64", "--partial-groups")
    assert ncc("compile", model, *flags, "-o", packed).exit_code == 0
    assert ncc("compile", model, *flags, "--format", "qdq", "-o", blocked).exit_code == 0
    assert {n.op_type for n in onnx.load(packed).graph.node} == {"MatMulNBits", "Tanh"}
    result = ncc("compile", packed, "--passes", "raise-qoperator", "-o", raised)
    assert result.exit_code == 0 and "MatMulNBits 3 as QDQ groups" in result.stderr, result.stderr
    feeds = np.load(data)["x"]
    np.testing.assert_array_equal(_run(raised, feeds), _run(blocked, feeds))
    _same_diff(model, data, packed, blocked)
