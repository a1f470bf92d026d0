"""Bad options and awkward inputs through the CLI: one sentence, exit code 2, no output file.

Each case runs ``ncc compile`` in a subprocess, as a user does. Out-of-range pass options are
checked where the option is declared (``option(..., min=1)``), so the message names the pass,
the option, the value and what is allowed. The models built here (a Conv + Relu + Gemm at old
opsets, the same without node names) must compile to INT8 models that run in onnxruntime and
agree with the float model on inputs the calibration never saw.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "examples" / "digits_cnn.onnx"
DIGITS_CALIB = REPO / "examples" / "digits_calib.npz"


def ncc(*args, warnings: str | None = None) -> subprocess.CompletedProcess:
    flags = ["-W", warnings] if warnings else []
    return subprocess.run(
        [sys.executable, *flags, "-m", "ncc.tools.cli", *map(str, args)], capture_output=True, text=True
    )


# -- models and data, built with onnx.helper --------------------------------------------------------


def _conv_relu_gemm(path: Path, opset: int, *, named: bool = True, softmax_axis: int | None = None) -> Path:
    """x[N,3,8,8] -> Conv 3x3 (8 channels) -> Relu -> Flatten -> Gemm (10 outputs), at ``opset``; with
    ``softmax_axis``, a Softmax over that axis of the Conv's output instead of Relu/Flatten/Gemm."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(0, 0.1, (10, 8 * 6 * 6)).astype(np.float32), "g"),
        numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "gb"),
    ]

    def node(op, inputs, outputs, name, **attrs):
        return helper.make_node(op, inputs, outputs, **({"name": name} if named else {}), **attrs)

    if softmax_axis is None:
        nodes = [
            node("Conv", ["x", "w", "b"], ["c"], "conv"),
            node("Relu", ["c"], ["r"], "relu"),
            node("Flatten", ["r"], ["f"], "flatten", axis=1),
            node("Gemm", ["f", "g", "gb"], ["y"], "gemm", transB=1),
        ]
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])
    else:
        nodes = [
            node("Conv", ["x", "w", "b"], ["c"], "conv"),
            node("Softmax", ["c"], ["y"], "softmax", axis=softmax_axis),
        ]
        inits = inits[:2]
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=6)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _deep_unnamed(path: Path) -> Path:
    """Twelve Conv + Relu layers, no node names: enough quantized layers for min-cosine to try fallbacks."""
    rng = np.random.default_rng(1)
    nodes, inits, x = [], [], "x"
    for i in range(12):
        w = rng.normal(0, 0.3, (8, 8 if i else 3, 3, 3)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 8, 8, 8])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def _matmuls(path: Path, *, named: bool = True) -> Path:
    """x[N,64] -> MatMul (64x64) -> Relu -> MatMul (64x32): what the weight-only passes quantize."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    for node, name in zip(nodes, ("mm1", "relu", "mm2")):
        node.name = name if named else ""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [
            numpy_helper.from_array(rng.normal(0, 0.1, (64, 64)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.normal(0, 0.1, (64, 32)).astype(np.float32), "w2"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32)
    out = {
        "DIGITS": DIGITS,
        "DIGITS_CALIB": DIGITS_CALIB,
        "MATMULS": _matmuls(root / "matmuls.onnx"),
        "CNN": _conv_relu_gemm(root / "cnn13.onnx", 13),
        "UPSAMPLE9": root / "upsample9.onnx",
    }
    for name, data in {
        "CALIB": {"x": x},
        "NAN_CALIB": {"x": np.full_like(x, np.nan)},
        "INF_CALIB": {"x": np.full_like(x, np.inf)},
        "MM_CALIB": {"x": rng.normal(0, 1, (16, 64)).astype(np.float32)},
        "MM_NAN_CALIB": {"x": np.full((16, 64), np.nan, np.float32)},
        "MM_WRONG_CALIB": {"input": rng.normal(0, 1, (16, 64)).astype(np.float32)},
    }.items():
        out[name] = root / f"{name.lower()}.npz"
        np.savez(out[name], **data)
    # opset 9 with Upsample, whose scales moved from an attribute to an input at opset 10
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv")
    up = helper.make_node("Upsample", ["c", "scales"], ["y"], name="up")
    weights = onnx.load(out["CNN"]).graph.initializer[:2]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    graph = helper.make_graph(
        [conv, up],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])],
        [*weights, scales],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)]), out["UPSAMPLE9"])
    return out


def _args(template: list[str], files: dict[str, Path]) -> list[str]:
    return [str(files.get(a, a)) for a in template]


# -- errors: (arguments after `compile MODEL -o OUT`, fragments the message has, fragments it must not have)

INT8 = ["--pass", "int8", "--calib", "DIGITS_CALIB"]
CNN_INT8 = ["--pass", "int8", "--calib", "CALIB"]


def _passes(spec: str, calib: str | None = None) -> list[str]:
    """``--passes SPEC`` (and ``--calib`` naming one of the ``files`` fixture's data files)."""
    return ["--passes", spec] + (["--calib", calib] if calib else [])


ERRORS = {
    # 8. out-of-range option values, checked where the option is declared
    "percentile 200": (
        [*INT8, "--calib-method", "percentile", "--percentile", "200"],
        ["calibrate: percentile must be in (0, 100], got 200.0."],
    ),
    "percentile 0": ([*INT8, "--percentile", "0"], ["calibrate: percentile must be in (0, 100], got 0.0."]),
    "percentile nan": (
        [*INT8, "--percentile", "nan"],
        ["calibrate: percentile must be a finite number, got nan."],
    ),
    "percentile inf in a spec": (
        _passes("calibrate{percentile=inf},insert-qdq", "DIGITS_CALIB"),
        ["calibrate: percentile must be a finite number, got inf."],
    ),
    "include bad regex": (
        [*INT8, "--include", "("],
        ["insert-qdq: include has '('", "not a regular expression"],
    ),
    "exclude bad regex": (
        [*INT8, "--exclude", "[a"],
        ["insert-qdq: exclude has '[a'", "not a regular expression"],
    ),
    "calibrate batch-size 0": (
        _passes("calibrate{batch-size=0},insert-qdq", "DIGITS_CALIB"),
        ["calibrate: batch-size must be at least 1, got 0."],
    ),
    "calibrate samples -1": (
        _passes("calibrate{samples=-1},insert-qdq", "DIGITS_CALIB"),
        ["calibrate: samples must be at least 0, got -1."],
    ),
    "min-cosine 5": ([*INT8, "--min-cosine", "5"], ["insert-qdq: min-cosine must be in [0, 1], got 5.0."]),
    "min-cosine -0.5": (
        [*INT8, "--min-cosine", "-0.5"],
        ["insert-qdq: min-cosine must be in [0, 1], got -0.5."],
    ),
    "max-float 2": (
        _passes("calibrate,insert-qdq{max-float=2}", "DIGITS_CALIB"),
        ["insert-qdq: max-float must be in [0, 1], got 2.0."],
    ),
    "fallback-samples 0": (
        _passes("calibrate,insert-qdq{fallback-samples=0}", "DIGITS_CALIB"),
        ["insert-qdq: fallback-samples must be at least 1, got 0."],
    ),
    "patience 0": (
        _passes("calibrate,insert-qdq{patience=0}", "DIGITS_CALIB"),
        ["insert-qdq: patience must be at least 1, got 0."],
    ),
    "min-gain nan": (
        _passes("calibrate,insert-qdq{min-gain=nan}", "DIGITS_CALIB"),
        ["insert-qdq: min-gain must be a finite number, got nan."],
    ),
    "size-limit -5": (
        _passes("fold-constants{size-limit=-5}"),
        ["fold-constants: size-limit must be at least 0, got -5."],
    ),
    "cse max-constant-bytes -1": (
        _passes("cse{max-constant-bytes=-1}"),
        ["cse: max-constant-bytes must be at least 0, got -1."],
    ),
    "correct-bias rounds -1": (
        _passes("calibrate,insert-qdq,correct-bias{rounds=-1}", "DIGITS_CALIB"),
        ["correct-bias: rounds must be at least 1, got -1."],
    ),
    "passes empty": (_passes(""), ["the pipeline is empty: --passes '' names no pass."]),
    "pass empty": (["--pass", ""], ["the pipeline is empty: --pass '' names no pass."]),
    "woq group-size -4": (
        ["--pass", "w4", "--group-size", "-4"],
        ["woq-rtn: group-size must be at least 0, got -4."],
    ),
    "gptq batch-size 0": (
        _passes("woq-gptq{batch-size=0},pack-int4", "MM_CALIB"),
        ["woq-gptq: batch-size must be at least 1, got 0."],
    ),
    "gptq block 0": (
        _passes("woq-gptq{block=0},pack-int4", "MM_CALIB"),
        ["woq-gptq: block must be at least 1, got 0."],
    ),
    "gptq damp -1": (
        _passes("woq-gptq{damp=-1},pack-int4", "MM_CALIB"),
        ["woq-gptq: damp must be at least 0, got -1.0."],
    ),
    "awq grid 0": (
        _passes("woq-awq{grid=0},pack-int4", "MM_CALIB"),
        ["woq-awq: grid must be at least 1, got 0."],
    ),
    "gptq calibration input names": (
        ["--pass", "w4", "--algo", "gptq", "--group-size", "32", "--calib", "MM_WRONG_CALIB"],
        ["has inputs ['input'] but the model expects ['x']", "missing 'x'"],
    ),
    "awq calibration input names": (
        ["--pass", "w4", "--algo", "awq", "--group-size", "32", "--calib", "MM_WRONG_CALIB"],
        ["has inputs ['input'] but the model expects ['x']", "missing 'x'"],
    ),
    # 8. nearby bad options that were already caught: keep them caught
    "smooth-quant alpha 1.5": (
        _passes("calibrate,smooth-quant{alpha=1.5},insert-qdq", "DIGITS_CALIB"),
        ["smooth-quant", "alpha must be", "1.5"],
    ),
    "woq group-size 1": (
        ["--pass", "w4", "--group-size", "1"],
        ["woq-rtn: group-size must be 0 (", "or at least 2", "1."],
    ),
    "woq bits 3 in a spec": (
        _passes("woq-rtn{bits=3},pack-int4"),
        ["woq-rtn: bits must be 4 or 8", "3."],
    ),
    "woq exclude bad regex": (
        ["--pass", "w4", "--exclude", "["],
        ["woq-rtn:", "'['", "not a regular expression"],
    ),
    "pack-int4 accuracy-level 5 in a spec": (
        _passes("woq-rtn{group-size=32},pack-int4{accuracy-level=5}"),
        ["pack-int4: accuracy-level must be", "5."],
    ),
    "quantize-dynamic exclude bad regex": (
        _passes("quantize-dynamic{exclude='('}"),
        ["quantize-dynamic", "exclude", "'('"],
    ),
    "unknown option": (
        _passes("insert-qdq{min-cosin=0.9}"),
        ["pass 'insert-qdq' has no option 'min-cosin'; did you mean 'min-cosine'?"],
    ),
    "option not an integer": (
        _passes("calibrate{batch-size=eight}"),
        ["option 'batch-size' of pass 'calibrate' must be an integer; got 'eight'."],
    ),
    "unknown pass": (_passes("fold-constant"), ["fold-constant"]),
    "malformed spec": (_passes(" , "), ["malformed pass pipeline at column 2"]),
    "calib-method choice": ([*INT8, "--calib-method", "median"], ["--calib-method", "median"]),
    "bits choice": (["--pass", "w4", "--bits", "3"], ["--bits", "3"]),
    "accuracy-level range": (["--pass", "w4", "--accuracy-level", "5"], ["--accuracy-level", "5"]),
    "int8 calibration input names": (
        ["--pass", "int8", "--calib", "MM_WRONG_CALIB"],
        ["has inputs ['input'] but the model expects ['image']"],
    ),
    "int8 without calibration data": (["--pass", "int8"], ["calibrate", "--calib"]),
    # 3. sample counts below 1
    "calib-samples 0": ([*INT8, "--calib-samples", "0"], ["--calib-samples must be at least 1, got 0."]),
    "calib-samples -3": (
        [*INT8, "--calib-samples", "-3"],
        ["--calib-samples must be at least 1, got -3."],
        ["is empty"],
    ),
    "correct-bias samples 0": (
        _passes("calibrate,insert-qdq,correct-bias{samples=0}", "DIGITS_CALIB"),
        ["correct-bias: samples must be at least 1, got 0."],
    ),
    "calib-samples not a number": ([*INT8, "--calib-samples", "all"], ["--calib-samples", "'all'"]),
    # 10. calibration data that holds no finite value
    "all-NaN calibration data": (
        CNN_INT8[:-1] + ["NAN_CALIB"],
        ["calibration input 'x'", "is all NaN or infinite (samples 0 to 31)"],
        ["nothing to quantize"],
    ),
    "all-infinite calibration data": (
        CNN_INT8[:-1] + ["INF_CALIB"],
        ["calibration input 'x'", "is all NaN or infinite"],
        ["nothing to quantize"],
    ),
    "all-NaN calibration data for gptq": (
        ["--pass", "w4", "--algo", "gptq", "--group-size", "32", "--calib", "MM_NAN_CALIB"],
        ["calibration input 'x'", "is all NaN or infinite"],
    ),
    # 4. QuantizeLinear does not exist before opset 10, and Upsample keeps this model at 9
    "int8 at opset 9 that cannot be raised": (
        ["--pass", "int8", "--calib", "CALIB"],
        ["INT8 needs QuantizeLinear (opset 10)", "opset 9 cannot be raised safely because of Upsample"],
    ),
}

#: The model each case compiles (default: the digits CNN).
MODEL = {
    "gptq batch-size 0": "MATMULS",
    "gptq block 0": "MATMULS",
    "gptq damp -1": "MATMULS",
    "awq grid 0": "MATMULS",
    "woq group-size 1": "MATMULS",
    "woq group-size -4": "MATMULS",
    "woq bits 3 in a spec": "MATMULS",
    "woq exclude bad regex": "MATMULS",
    "pack-int4 accuracy-level 5 in a spec": "MATMULS",
    "gptq calibration input names": "MATMULS",
    "awq calibration input names": "MATMULS",
    "bits choice": "MATMULS",
    "accuracy-level range": "MATMULS",
    "all-NaN calibration data": "CNN",
    "all-infinite calibration data": "CNN",
    "all-NaN calibration data for gptq": "MATMULS",
    "int8 at opset 9 that cannot be raised": "UPSAMPLE9",
}


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_bad_option_is_one_sentence_exit_2_and_no_output(case, files, tmp_path):
    args, present, *absent = ERRORS[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = ncc("compile", files[MODEL.get(case, "DIGITS")], *_args(args, files), "-o", out_dir / "model.onnx")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    for fragment in present:
        assert fragment in proc.stderr, proc.stderr
    for fragment in absent[0] if absent else ():
        assert fragment not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("ncc: error:", "Error:"))]
    assert len(errors) == 1, proc.stderr  # one error (click's own are "Error: ..." after a usage line)
    assert list(out_dir.iterdir()) == []


def test_ncc_passes_shows_option_ranges():
    proc = ncc("passes")
    assert proc.returncode == 0, proc.stderr
    assert "min-cosine: float in [0, 1] = 0.0" in proc.stdout
    assert "percentile: float in (0, 100] = 99.999" in proc.stdout
    assert "batch-size: int >= 1 = 8" in proc.stdout


# -- 3. the report's fidelity is measured on the model that is written --------------------------------

_FIDELITY = re.compile(r"fidelity: output cosine ([0-9.]+) on (\d+) calibration samples")
_FALLBACK = re.compile(r"fallback: all quantized: output cosine ([0-9.]+)")

#: A plugin pass that, after insert-qdq, saturates every int32 bias: what correct-bias{samples=0} did.
_SATURATE = '''
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.passes.base import Pass, PassResult


@dataclass(frozen=True)
class SaturateBiases(Pass):
    """Test plugin: set every int32 initializer to the int32 minimum."""

    name: ClassVar[str] = "test-saturate-biases"

    def run(self, model, ctx):
        for value in model.graph.initializers.values():
            if value.const_value.dtype == ir.DataType.INT32:
                value.const_value = ir.tensor(np.full_like(value.const_value.numpy(), -(2**31)))
        return PassResult(modified=True)
'''


def _cosine(reference: np.ndarray, got: np.ndarray) -> float:
    ref, out = (
        reference.reshape(len(reference), -1).astype(np.float64),
        got.reshape(len(got), -1).astype(np.float64),
    )
    return float(((ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))).mean())


@pytest.mark.parametrize("corrupt", [False, True], ids=["int8", "int8 then saturated biases"])
def test_reported_fidelity_is_measured_on_the_written_model(corrupt, tmp_path):
    out = tmp_path / "digits.int8.onnx"
    if corrupt:
        plugin = tmp_path / "saturate.py"
        plugin.write_text(_SATURATE)
        args = ["--plugin", plugin, "--passes", "int8,test-saturate-biases"]
    else:
        args = ["--pass", "int8"]
    proc = ncc("compile", DIGITS, *args, "--calib", DIGITS_CALIB, "-o", out)
    assert proc.returncode == 0, proc.stderr
    reported, count = _FIDELITY.search(proc.stderr).groups()
    images = np.load(DIGITS_CALIB)["image"][: int(count)]
    reference = ort.InferenceSession(str(DIGITS)).run(None, {"image": images})[0]
    written = ort.InferenceSession(str(out)).run(None, {"image": images})[0]
    assert abs(float(reported) - _cosine(reference, written)) <= 1e-5  # printed with 5 decimals
    insert_qdq = float(_FALLBACK.search(proc.stderr).group(1))
    assert insert_qdq > 0.999  # what insert-qdq measured before the passes after it
    if corrupt:
        assert float(reported) < 0.9
    else:
        assert float(reported) > 0.999


# -- 4. old opsets ----------------------------------------------------------------------------------


def _relative_error(float_path: Path, int8_path: Path) -> float:
    x = np.random.default_rng(7).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)  # not calibration data
    reference = ort.InferenceSession(str(float_path)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(int8_path)).run(None, {"x": x})[0]
    return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))


def _axes(path: Path) -> list[int]:
    return [
        a.i
        for n in onnx.load(path).graph.node
        if n.op_type == "DequantizeLinear"
        for a in n.attribute
        if a.name == "axis"
    ]


@pytest.mark.parametrize("opset", [9, 11, 12])
def test_int8_raises_an_old_opset_to_13_for_per_channel_weights(opset, files, tmp_path):
    src = _conv_relu_gemm(tmp_path / f"cnn{opset}.onnx", opset)
    out = tmp_path / "cnn.int8.onnx"
    proc = ncc("compile", src, "--pass", "int8", "--calib", files["CALIB"], "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert f"opset: raised from {opset} to 13 for Q/DQ" in proc.stderr
    assert onnx.load(out).opset_import[0].version == 13
    assert _axes(out) == [0, 0, 0, 0]  # Conv weight, Conv bias, Gemm weight, Gemm bias: per channel
    assert "2/2 quantized nodes run as integer kernels" in proc.stderr
    # measured: 1.05% at every opset (the same model as at opset 13); 8-bit noise through two layers
    assert _relative_error(src, out) < 0.02


def test_int8_keeps_an_opset_it_cannot_raise_and_quantizes_weights_per_tensor(files, tmp_path):
    # Softmax-11 over axis 1 of [N,8,6,6] normalizes a flattened [N,288] view; Softmax-13 only the channels
    src = _conv_relu_gemm(tmp_path / "softmax11.onnx", 11, softmax_axis=1)
    out = tmp_path / "softmax11.int8.onnx"
    proc = ncc("compile", src, "--pass", "int8", "--calib", files["CALIB"], "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "warning: weights quantized per tensor" in proc.stderr
    assert "opset 11 cannot be raised safely because of Softmax" in proc.stderr
    assert onnx.load(out).opset_import[0].version == 11
    assert _axes(out) == []
    assert _relative_error(src, out) < 0.03  # measured 1.8%


# -- 6. nodes without names ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["conv-relu-gemm", "twelve-conv-relu"])
def test_int8_of_a_model_whose_nodes_have_no_names(model, files, tmp_path):
    if model == "conv-relu-gemm":
        src, quantized, bound = _conv_relu_gemm(tmp_path / "unnamed.onnx", 13, named=False), "Conv 1", 0.02
    else:
        src, quantized, bound = _deep_unnamed(tmp_path / "deep.onnx"), "Conv 12", 0.06  # measured 4.2%
    assert all(not n.name for n in onnx.load(src).graph.node)
    out = tmp_path / "unnamed.int8.onnx"
    proc = ncc("compile", src, "--pass", "int8", "--calib", files["CALIB"], "-o", out)
    assert proc.returncode == 0, proc.stderr
    # min-cosine names nodes by id, so it may return unnamed ones to float too (reported as #id)
    count = int(re.search(r"quantized \(int8\): Conv (\d+)", proc.stderr).group(1))
    back = re.findall(r"fallback: \+ #\d+ in float", proc.stderr)
    assert f"Conv {count + len(back)}" == quantized, proc.stderr
    assert "quantized nodes without a unique name" in proc.stderr  # the runtime check matches by name
    names = [n.name for n in onnx.load(out).graph.node if n.name]
    assert len(names) == len(set(names))
    assert _relative_error(src, out) < bound


def test_int8_dynamic_of_a_model_whose_nodes_have_no_names(tmp_path):
    src, out = _matmuls(tmp_path / "unnamed.onnx", named=False), tmp_path / "unnamed.dyn.onnx"
    proc = ncc("compile", src, "--pass", "int8-dynamic", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "2/2 quantized nodes run as integer kernels" in proc.stderr
    names = [n.name for n in onnx.load(out).graph.node if n.name]
    assert len(names) == len(set(names))
    x = np.random.default_rng(7).normal(0, 1, (8, 64)).astype(np.float32)
    reference = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 0.025  # measured 1.25%


# -- 10. no numpy warnings on stderr ------------------------------------------------------------------


@pytest.mark.parametrize("model", ["digits", "opset 11", "unnamed"])
def test_int8_compiles_without_runtime_warnings(model, files, tmp_path):
    if model == "digits":
        src, calib = DIGITS, DIGITS_CALIB
    else:
        src = _conv_relu_gemm(
            tmp_path / "m.onnx", 11 if model == "opset 11" else 13, named=model != "unnamed"
        )
        calib = files["CALIB"]
    proc = ncc(
        "compile",
        src,
        "--pass",
        "int8",
        "--calib",
        calib,
        "-o",
        tmp_path / "q.onnx",
        warnings="error::RuntimeWarning",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr
