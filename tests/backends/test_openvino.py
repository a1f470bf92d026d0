"""``--target openvino``: ncc's QDQ output checked on OpenVINO's CPU plugin (what it runs in int8).

The README example's CNN (real digits) through ``int8`` for the openvino target: the report must say
how many quantized layers OpenVINO's compiled graph runs in u8/i8 (all five here), OpenVINO's outputs
must agree with the float model's, and the check must name a layer OpenVINO runs in floating point
(a quantized convolution whose weights were made float behind ncc's back).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import DIGITS_CALIB as CALIB
from conftest import DIGITS_CNN as FLOAT
from conftest import invoke_ncc as ncc


def int8(out, *options):
    """``ncc compile`` of the digits CNN through ``int8`` into ``out``, with ``options``."""
    return ncc("compile", FLOAT, "--pass", "int8", "--calib", CALIB, *options, "-o", out)


ov = pytest.importorskip(
    "openvino", reason="the openvino extra is not installed (pip install -e '.[openvino]')"
)


def test_openvino_runs_every_quantized_layer_in_int8(tmp_path):
    out = tmp_path / "digits.openvino.int8.onnx"
    result = int8(out, "--target", "openvino")
    assert result.exit_code == 0, result.stderr
    assert "on OpenVINO" in result.stderr and "5/5 quantized nodes run as integer kernels" in result.stderr
    assert "Convolution u8 3" in result.stderr and "FullyConnected u8 2" in result.stderr, result.stderr
    images = np.load(CALIB)["image"]
    compiled = ov.Core().compile_model(str(out), "CPU")
    got = np.array(compiled(images)[compiled.output(0)])
    import onnxruntime as ort

    session = ort.InferenceSession(str(FLOAT), providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: images})[0]
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95


def test_the_check_names_a_layer_openvino_runs_in_float(tmp_path):
    out = tmp_path / "digits.openvino.int8.onnx"
    assert int8(out, "--target", "openvino").exit_code == 0
    from ncc.backends.openvino.check import check_on_openvino
    from ncc.tools.modelio import load_model

    model = onnx.load(out)
    conv = next(n for n in model.graph.node if n.name == "/features/features.3/Conv")
    dq = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    # the weight read directly as float (its DequantizeLinear bypassed): OpenVINO has no int8 weight
    codes = next(t for t in model.graph.initializer if t.name == dq.input[0])
    scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
    weight = onnx.numpy_helper.to_array(codes).astype(np.float32) * onnx.numpy_helper.to_array(scale).reshape(
        -1, 1, 1, 1
    )
    model.graph.initializer.append(onnx.numpy_helper.from_array(weight, "float_weight"))
    conv.input[1] = "float_weight"
    broken = tmp_path / "broken.onnx"
    onnx.save(model, broken)
    check = check_on_openvino(broken, load_model(out))
    assert len(check.integer) == 4 and list(check.float_) == ["/features/features.3/Conv"], check.summary()
    assert "runs as Convolution in" in check.float_["/features/features.3/Conv"]


def test_openvino_ir_output_holds_the_checked_model(tmp_path):
    xml = tmp_path / "digits.int8.xml"
    result = int8(xml)  # .xml: target openvino
    assert result.exit_code == 0, result.stderr
    assert "on OpenVINO" in result.stderr and "5/5 quantized nodes run as integer kernels" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.int8.bin", "digits.int8.xml"]
    onnx_out = tmp_path / "digits.int8.onnx"
    assert int8(onnx_out, "--target", "openvino").exit_code == 0
    images = np.load(CALIB)["image"]
    core = ov.Core()
    from_xml, from_onnx = core.compile_model(str(xml), "CPU"), core.compile_model(str(onnx_out), "CPU")
    got = np.array(from_xml(images)[from_xml.output(0)])
    want = np.array(from_onnx(images)[from_onnx.output(0)])
    np.testing.assert_array_equal(got, want)  # the same graph, the same weights (no fp16 compression)


def test_openvino_ir_refusals(tmp_path):
    wrong = int8(tmp_path / "m.xml", "--target", "x86-vnni")
    assert wrong.exit_code == 2 and "--target openvino" in wrong.stderr and "Traceback" not in wrong.stderr
    qop = int8(tmp_path / "m.xml", "--format", "qoperator")
    assert qop.exit_code == 2 and "QDQ form" in qop.stderr
    (tmp_path / "in.xml").write_text("<net/>")
    read = ncc("dump", tmp_path / "in.xml")
    assert read.exit_code == 2 and "output format" in read.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.xml"]
