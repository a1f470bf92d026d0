"""``--target openvino``: ncc's QDQ output checked on OpenVINO's CPU plugin (what it runs in int8).

The README example's CNN (real digits) through ``int8`` for the openvino target: the report must say
how many quantized layers OpenVINO's compiled graph runs in u8/i8 (all five here), OpenVINO's outputs
must agree with the float model's, and the check must name a layer OpenVINO runs in floating point
(a quantized convolution whose weights were made float behind ncc's back).
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from conftest import DIGITS_CALIB as CALIB
from conftest import DIGITS_CNN as FLOAT
from conftest import invoke_ncc as ncc
from ncc.tools.best import close_enough


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


def _host_has_bf16() -> bool:
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def test_bf16_pipeline_writes_an_ir_that_runs_bf16_without_options(tmp_path):
    xml = tmp_path / "digits.bf16.xml"
    result = ncc("compile", FLOAT, "--pass", "bf16", "--calib", CALIB, "-o", xml)
    assert result.exit_code == 0, result.stderr
    cosine = float(
        re.search(r"bf16: output cosine ([0-9.]+) on 8 calibration samples", result.stderr).group(1)
    )
    assert 0.999 <= cosine < 1.0  # measured (emulated), not assumed
    assert "bf16: 5 Conv/MatMul/Gemm layers in bf16" in result.stderr
    # the IR keeps float32 weights (the hint runs them in bf16) and adds its XML: not called smaller
    assert re.search(r"size: 0\.19 MB -> 0\.2\d MB \(\d+\.\d% larger\)", result.stderr), result.stderr
    core = ov.Core()
    model = core.read_model(str(xml))
    assert model.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str) == "bf16"
    compiled = core.compile_model(model, "CPU")  # no option: the file's hint
    images = np.load(CALIB)["image"]
    got = np.array(compiled(images)[compiled.output(0)])
    import onnxruntime as ort

    session = ort.InferenceSession(str(FLOAT), providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: images})[0]
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95
    if _host_has_bf16():
        assert "5/5 bf16 layers run as bf16 kernels" in result.stderr, result.stderr
    else:  # OpenVINO runs the hint in f32 here, and the report says why
        assert "this CPU has no AVX512-BF16 or AMX-BF16" in result.stderr
        assert "0/5 bf16 layers run as bf16 kernels" in result.stderr, result.stderr


def test_bf16_state_is_in_the_ir_and_refused_where_it_cannot_run(tmp_path):
    text = ncc("opt", FLOAT, "--pass", "bf16")
    assert text.exit_code == 0, text.stderr
    assert 'metadata_props = {"ncc.precision" = "bf16"}' in text.stdout  # the model's hint
    assert text.stdout.count('meta {"ncc.precision" = "bf16"}') == 5  # 3 Conv, 2 Gemm
    wrong = ncc("compile", FLOAT, "--pass", "bf16", "--target", "x86-vnni", "-o", tmp_path / "m.onnx")
    assert wrong.exit_code == 2 and "bf16 runs on --target openvino" in wrong.stderr
    strict = ncc(
        "compile", FLOAT, "--passes", "bf16-precision{target=openvino min-cosine=1}", "--calib", CALIB,
        "-o", tmp_path / "m.xml",
    )  # fmt: skip
    assert strict.exit_code == 2 and "bf16 loses too much: output cosine" in strict.stderr
    assert "/features/features" in strict.stderr  # names the layers that lose most
    assert not any(tmp_path.iterdir())


def test_target_best_times_each_runtime_and_keeps_the_fastest(tmp_path):
    out = tmp_path / "digits.best.onnx"
    result = int8(out, "--target", "best")
    assert result.exit_code == 0, result.stderr
    rows = re.findall(
        r"^ncc:   (\S+) on (\S+): ([0-9.]+) ms per batch, output cosine ([0-9.]+)(  <- chosen)?$",
        result.stderr,
        re.M,
    )
    assert [(t, r) for t, r, *_ in rows][1:] == [("openvino", "openvino")] and rows[0][1] == "onnxruntime"
    chosen = [row for row in rows if row[4]]
    assert len(chosen) == 1
    fastest = min(rows, key=lambda row: float(row[2]))
    best_cosine = max(float(row[3]) for row in rows)
    assert chosen[0] == fastest or not close_enough(float(fastest[3]), best_cosine)
    runtime = {p.key: p.value for p in onnx.load(out).metadata_props}["ncc.runtime"]
    assert runtime == chosen[0][1]
    # the report's check ran in the chosen runtime
    assert ("on OpenVINO" in result.stderr) == (runtime == "openvino")


def test_target_best_weighs_fidelity_by_the_error_not_a_fixed_cosine_margin():
    assert close_enough(0.94743, 0.94805)  # MiniLM on an AVX2 CPU: 1.2% more error, onnxruntime 1.8x faster
    assert not close_enough(0.990, 0.999)  # ten times the error
    assert close_enough(0.9993, 0.9996) and not close_enough(0.9985, 0.9996)


def test_target_best_refusals(tmp_path):
    xml = int8(tmp_path / "m.xml", "--target", "best")
    assert xml.exit_code == 2 and "a .xml output is OpenVINO IR: --target openvino, not best." in xml.stderr
    no_calib = ncc("compile", FLOAT, "--pass", "int8-dynamic", "--target", "best", "-o", tmp_path / "m.onnx")
    assert no_calib.exit_code == 2 and "--target best times candidates on calibration data" in no_calib.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_w4_checks_every_packed_matmul_as_an_int4_layer(tmp_path, fmt):
    """MiniLM's 36 weight MatMuls through ``w4`` for the openvino target, in both weight-only forms: the
    check counts each as a FullyConnected layer OpenVINO runs on its u4 weight (the runtime graph's
    precision) and notes that OpenVINO quantizes their activations at run time; with that off, OpenVINO's
    outputs are onnxruntime's float-activation ones for the same file."""
    from realmodels import minilm_inputs, minilm_onnx

    out = tmp_path / f"minilm.{fmt}.w4.onnx"
    result = ncc(
        "compile", minilm_onnx("legacy"), "--pass", "w4", "--group-size", "32", "--format", fmt,
        "--target", "openvino", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert (
        "36/36 quantized nodes run as weight-only quantized kernels (FullyConnected u4 36)" in result.stderr
    )
    assert re.search(
        r"activations of these 36 weight-only layers to int8 at run time, in groups of \d+", result.stderr
    )
    feed = minilm_inputs(2)
    float_activations = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    compiled = ov.Core().compile_model(str(out), "CPU", float_activations)
    got = np.array(compiled(feed)[compiled.output(0)])
    import onnxruntime as ort

    options = ort.SessionOptions()  # the qdq form fuses into MatMulNBits at this compute type (0: float)
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    want = session.run(None, feed)[0]
    # the same int4 weights, f32 activations in both: only accumulation order differs
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), np.abs(got - want).max()
