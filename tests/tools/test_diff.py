"""``ncc diff``: per quantized node, what its fallback to float gains, what it adds, what it carries.

On the README example's CNN (real digits): ncc's own int8 output, the same output with one layer's weight
scale damaged (which diff must put first), and onnxruntime's own QDQ quantization of the same model
(paired by node name). Also: ncc's int8 output of a model with a GELU reads back (its com.microsoft::Gelu
has no value_info in the file).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DIGITS_CALIB as CALIB
from conftest import DIGITS_CNN as FLOAT
from conftest import invoke_ncc as ncc
from conftest import ort_calibration_reader
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("diff") / "digits.int8.onnx"
    result = ncc("compile", FLOAT, "--pass", "int8", "--calib", CALIB, "--min-cosine", "0", "-o", out)
    assert result.exit_code == 0, result.stderr
    return out


def _diff(model: Path, tmp_path: Path, source: Path = FLOAT, calib: Path = CALIB) -> dict:
    out = tmp_path / "rows.json"
    result = ncc("diff", source, model, "--data", calib, "--json", out)
    assert result.exit_code == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["samples"] == 8 and data["output_sqnr_db"] > 0
    for row in data["rows"]:  # the gain is the fallback's output SQNR over the quantized model's own
        assert row["gain_db"] == pytest.approx(row["fallback_sqnr_db"] - data["output_sqnr_db"], abs=1e-9)
    return data


def _rows(model: Path, tmp_path: Path, source: Path = FLOAT, calib: Path = CALIB) -> list[dict]:
    return _diff(model, tmp_path, source, calib)["rows"]


def _damaged(int8_model: Path, tmp_path: Path, node: str, which: str) -> Path:
    """``int8_model`` with the scale of ``node``'s input (``which="input"``: most activations clip) or of
    its weight (``"weight"``) made 4x too small."""
    model = onnx.load(int8_model)
    layer = next(n for n in model.graph.node if n.name == node)
    dq = next(n for n in model.graph.node if n.output[0] == layer.input[0 if which == "input" else 1])
    names = {dq.input[1]}
    if which == "input":
        names.add(next(n for n in model.graph.node if n.output[0] == dq.input[0]).input[1])
    for name in names:
        scale = next(t for t in model.graph.initializer if t.name == name)
        scale.CopyFrom(nh.from_array(nh.to_array(scale) / 4, scale.name))
    damaged = tmp_path / f"damaged-{which}.onnx"
    onnx.save(model, damaged)
    return damaged


def test_every_quantized_layer_pairs_with_its_float_value_and_costs_little(int8_model, tmp_path):
    rows = _rows(int8_model, tmp_path)
    convs = [r for r in rows if r["op_type"] in ("Conv", "Gemm")]
    assert len(convs) == 5 and not any(r["note"] for r in rows)
    # a Conv with its BatchNormalization folded in stands for the float BatchNormalization's output
    assert {r["value"] for r in convs if r["op_type"] == "Conv"} == {
        f"/features/features.{i}/BatchNormalization_output_0" for i in (1, 4, 8)
    }
    for row in rows:
        assert 30 < row["added_sqnr_db"] < 80 and -1 < row["gain_db"] < 10, row
    # the stem reads the graph input: what it carries is exactly what it adds
    stem = next(r for r in rows if r["node"] == "/features/features.0/Conv")
    assert stem["carried_sqnr_db"] == pytest.approx(stem["added_sqnr_db"], abs=1e-6)
    gains = [r["gain_db"] for r in rows]
    assert gains == sorted(gains, reverse=True)  # the most worth keeping in float first


def test_a_damaged_layer_comes_first(int8_model, tmp_path):
    rows = _rows(_damaged(int8_model, tmp_path, "/features/features.3/Conv", "input"), tmp_path)
    first, rest = rows[0], rows[1:]
    assert first["node"] == "/features/features.3/Conv", [r["node"] for r in rows]
    assert first["added_sqnr_db"] < 15 and first["gain_db"] > 10  # in float, it reads the unclipped input
    assert min(r["added_sqnr_db"] for r in rest) > 25 and max(r["gain_db"] for r in rest) < 3


def test_the_error_splits_into_weights_and_activations(int8_model, tmp_path):
    """Above the table: the output SQNR with only the weights quantized and with only the activations
    quantized (FLOAT's weights and biases). In this CNN the activations carry most of the error; a damaged
    activation scale or weight scale shows up on its own side only."""
    clean = _diff(int8_model, tmp_path)
    whole, weights, activations = (
        clean[k] for k in ("output_sqnr_db", "weights_only_sqnr_db", "activations_only_sqnr_db")
    )
    assert weights > whole + 3 and abs(activations - whole) < 3, clean
    assert clean["float_weights_kept"] == 3  # the three Convs with a BatchNormalization folded in
    assert not any("rescaled" in row["note"] for row in clean["rows"])
    clipped = _diff(_damaged(int8_model, tmp_path, "/features/features.3/Conv", "input"), tmp_path)
    assert clipped["activations_only_sqnr_db"] < whole - 10
    assert clipped["weights_only_sqnr_db"] == pytest.approx(weights, abs=1e-6)  # its activations in float
    # a weight scale wrong for no reason a pass gives (its input is FLOAT's) is not explained away by
    # rescaling FLOAT's weight: the Gemm keeps its damaged weights on both sides
    coarse = _diff(_damaged(int8_model, tmp_path, "/head/head.1/Gemm", "weight"), tmp_path)
    assert coarse["weights_only_sqnr_db"] < whole - 10 and coarse["activations_only_sqnr_db"] < whole - 10
    assert coarse["float_weights_kept"] == 4


def test_an_onnxruntime_quantized_model_pairs_by_node_name(tmp_path):
    from onnxruntime.quantization import QuantFormat, quantize_static

    reader = ort_calibration_reader("image", np.load(CALIB)["image"][:64])
    theirs = tmp_path / "ort.int8.onnx"
    quantize_static(str(FLOAT), str(theirs), reader, quant_format=QuantFormat.QDQ, per_channel=True)
    rows = _rows(theirs, tmp_path)
    convs = {r["node"]: r for r in rows if r["op_type"] in ("Conv", "Gemm")}
    assert len(convs) == 5
    float_outputs = {n.name: n.output[0] for n in onnx.load(FLOAT).graph.node}
    for row in convs.values():  # no ncc ids: paired by name, compared with the float node's own output
        assert not row["note"] and row["value"] == float_outputs[row["node"]]
        assert 20 < row["added_sqnr_db"] < 80, row


def test_top_plot_and_refusals(int8_model, tmp_path):
    plot = tmp_path / "diff.png"
    result = ncc("diff", FLOAT, int8_model, "--data", CALIB, "--top", "2", "--plot", plot)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("output SQNR of the quantized model:")
    assert lines[1].startswith("with only its weights quantized:") and "with only its activations" in lines[1]
    assert (
        lines[2].split()[:3] == ["rank", "in", "float:"] and len(lines) == 6 and "more quantized" in lines[5]
    )
    fast = ncc("diff", FLOAT, int8_model, "--data", CALIB, "--fast")  # no fallback runs: no gain column
    assert fast.exit_code == 0 and fast.stdout.splitlines()[3].split()[1] == "-", fast.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG"
    same = ncc("diff", FLOAT, FLOAT, "--data", CALIB)
    assert same.exit_code == 2 and "no quantized nodes" in same.stderr and "Traceback" not in same.stderr
    gather = tmp_path / "gather.onnx"  # a dynamic model whose only quantized op has no DequantizeLinear form
    table = nh.from_array(np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32), "table")
    graph = h.make_graph(
        [h.make_node("Gather", ["table", "ids"], ["rows"], name="embed")], "g",
        [h.make_tensor_value_info("ids", T.INT64, ["n"])], [h.make_tensor_value_info("rows", T.FLOAT, ["n", 8])],
        [table],
    )  # fmt: skip
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "embed.onnx")
    ids = tmp_path / "ids.npz"
    np.savez(ids, ids=np.arange(16, dtype=np.int64))
    assert ncc("compile", tmp_path / "embed.onnx", "--pass", "int8-dynamic", "-o", gather).exit_code == 0
    unread = ncc("diff", tmp_path / "embed.onnx", gather, "--data", ids)
    assert unread.exit_code == 2 and "no quantized nodes" in unread.stderr, unread.stderr
    swapped = ncc("diff", int8_model, int8_model, "--data", CALIB)  # the float model must come first
    assert swapped.exit_code == 2 and "the first model is quantized too" in swapped.stderr, swapped.stderr
    clobber = ncc("diff", FLOAT, int8_model, "--data", CALIB, "--json", int8_model)
    assert clobber.exit_code == 2 and "Traceback" not in clobber.stderr, clobber.stderr
    assert onnx.load(int8_model).graph.node  # the input is untouched


def test_a_qoperator_output_diffs_as_its_qdq_form(int8_model, tmp_path):
    """ncc's --format qoperator output (QLinearConv, QGemm, MaxPool and Flatten on 8-bit tensors) is read back
    as QDQ groups (raise-qoperator): the same table as the QDQ file it was lowered from, number for number."""
    qoperator = tmp_path / "digits.qop.onnx"
    made = ncc(
        "compile", FLOAT, "--pass", "int8", "--format", "qoperator", "--calib", CALIB, "--min-cosine", "0",
        "-o", qoperator,
    )  # fmt: skip
    assert made.exit_code == 0, made.stderr
    assert {n.op_type for n in onnx.load(qoperator).graph.node} >= {"QLinearConv", "QGemm"}
    out = tmp_path / "qop.json"
    result = ncc("diff", FLOAT, qoperator, "--data", CALIB, "--json", out)
    assert result.exit_code == 0, result.stderr
    assert "read as QDQ: " in result.stdout and "QLinearConv 3" in result.stdout, result.stdout
    raised, qdq = json.loads(out.read_text()), _diff(int8_model, tmp_path)
    assert raised["float_weights_kept"] == qdq["float_weights_kept"]
    assert [(r["node"], r["op_type"], r["value"], r["note"]) for r in raised["rows"]] == [
        (r["node"], r["op_type"], r["value"], r["note"]) for r in qdq["rows"]
    ]
    # the same numbers up to the kernels' float rounding (a wrong pairing or scale is whole dBs off)
    for key in ("output_sqnr_db", "weights_only_sqnr_db", "activations_only_sqnr_db"):
        assert raised[key] == pytest.approx(qdq[key], abs=1e-3), key
    for ours, theirs in zip(raised["rows"], qdq["rows"]):
        for key in ("carried_sqnr_db", "added_sqnr_db", "gain_db"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-3), (ours["node"], key)


@pytest.mark.parametrize("form", ["qdq", "standard", "fused"])
def test_a_dynamic_gemm_compares_its_output_with_the_bias(form, tmp_path):
    """quantize-dynamic splits a Gemm into MatMul + bias Add (or a kernel that adds it, raised back to that):
    the row compares the Add's output with the float Gemm's, so the classifier's carried SQNR is the model's
    output SQNR (the bias-less MatMul's was ~10 dB off it on the digits CNN)."""
    model = tmp_path / f"digits.{form}.onnx"
    made = ncc("compile", FLOAT, "--passes", f"quantize-dynamic{{form={form}}}", "-o", model)
    assert made.exit_code == 0, made.stderr
    data = _diff(model, tmp_path)
    rows = {r["node"]: r for r in data["rows"]}
    assert set(rows) == {"/head/head.1/Gemm", "/head/head.3/Gemm"}
    last = rows["/head/head.3/Gemm"]
    assert last["value"] == "logits"
    assert last["carried_sqnr_db"] == pytest.approx(data["output_sqnr_db"], abs=1e-6)
    # its copy on the float input adds only its own error: above what the whole model carries
    assert last["added_sqnr_db"] > data["output_sqnr_db"] - 3
    hidden = rows["/head/head.1/Gemm"]
    # the first quantized layer reads the float input: what it carries is what it adds
    assert hidden["carried_sqnr_db"] == pytest.approx(hidden["added_sqnr_db"], abs=1e-6)


def test_an_int8_model_with_a_gelu_reads_back(tmp_path):
    """fuse-gelu writes com.microsoft::Gelu, and INT8 output has no value_info: its type must be inferred
    on reading (it used to fail the verifier, so neither dump nor diff could read ncc's own output)."""
    rng = np.random.default_rng(0)
    nodes = [
        h.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        h.make_node("Div", ["h", "sqrt2"], ["d"], name="div"),
        h.make_node("Erf", ["d"], ["e"], name="erf"),
        h.make_node("Add", ["e", "one"], ["a"], name="add"),
        h.make_node("Mul", ["h", "a"], ["m"], name="mul"),
        h.make_node("Mul", ["m", "half"], ["g"], name="half_mul"),
        h.make_node("MatMul", ["g", "w2"], ["y"], name="down"),
    ]
    constants = {
        "w1": rng.standard_normal((16, 32)).astype(np.float32) * 0.3,
        "w2": rng.standard_normal((32, 8)).astype(np.float32) * 0.3,
        "sqrt2": np.array(1.4142135, np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
    }
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, ["n", 16])],
        [h.make_tensor_value_info("y", T.FLOAT, ["n", 8])],
        [nh.from_array(v, k) for k, v in constants.items()],
    )
    source, calib, out = tmp_path / "gelu.onnx", tmp_path / "calib.npz", tmp_path / "gelu.int8.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8), source)
    np.savez(calib, x=rng.standard_normal((32, 16)).astype(np.float32))
    assert ncc("compile", source, "--pass", "int8", "--calib", calib, "-o", out).exit_code == 0
    assert any(n.op_type == "Gelu" and n.domain == "com.microsoft" for n in onnx.load(out).graph.node)
    dump = ncc("dump", out)
    assert dump.exit_code == 0, dump.stderr
    assert (
        "com.microsoft::Gelu" in dump.stdout and ": f32[n,32]" in dump.stdout.split("com.microsoft::Gelu")[1]
    )
    rows = _rows(out, tmp_path, source, calib)
    assert [r["op_type"] for r in rows if r["op_type"] == "MatMul"] == ["MatMul", "MatMul"]
