"""``--target tf``: TensorFlow's oneDNN int8 ops as ncc builds them, and the SavedModel they make.

The op tests compare each kernel with a float reference computed on the same quantized inputs and
weights (``fq``): the only difference left is the kernel's rounding of its output, so the bound is one
output step (the kernels are exact to half a step where they round like numpy; a step is allowed for
ties rounded the other way). The weights are the ones ncc writes for this CPU: on x86 without VNNI
oneDNN adds u8 x s8 products in saturating int16 pairs (input channels at each tap, a matmul's K) and
halves the weights of a convolution reading s8, so there they are pair-safe, or 7-bit for s8 input.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import Attrs

tf = pytest.importorskip("tensorflow", reason="the tf target needs tensorflow-cpu (the tensorflow extra)")

from ncc.backends.tensorflow import onednn  # noqa: E402
from ncc.passes.quant.pairs import node_pairs, symmetric_int8  # noqa: E402
from ncc.targets import get_target  # noqa: E402


def fq(x: np.ndarray, scale: float, signed: bool) -> np.ndarray:
    """``x`` through SCALED-mode quantization: the float value of its 8-bit code."""
    lo, hi = (-127, 127) if signed else (0, 255)
    return (np.clip(np.rint(x / scale), lo, hi) * scale).astype(np.float32)


#: Whether this CPU's oneDNN pairs int8 products (x86 without VNNI), as ``--target tf`` resolves it here.
PAIRED = get_target("tf").pairwise_int16


def _weights(rng, shape, depthwise, signed_in):
    """HWIO int8 codes as ncc writes them for this CPU, their per-channel scales, and their float values."""
    w = (rng.standard_normal(shape) * 0.2).astype(np.float32)
    onnx_layout = (2, 3, 0, 1) if depthwise else (3, 2, 0, 1)  # HWIO -> [M, C/group, kh, kw]
    oihw = w.transpose(onnx_layout)
    layout, qmax = None, 127
    if PAIRED and signed_in:
        qmax = 63
    elif PAIRED:
        attrs = Attrs(group=shape[2] if depthwise else 1)
        layout = node_pairs("Conv", oihw.shape, attrs, "onednn")
    q, scales = symmetric_int8(oihw, 0, qmax=qmax, pairs=layout)
    codes = q.transpose(np.argsort(onnx_layout))
    per_channel = scales.reshape(1, 1, -1, 1) if depthwise else scales
    return codes, scales, (codes * per_channel).astype(np.float32)


CASES = list(
    itertools.product([False, True], [1, 2], ["SAME", "VALID", "EXPLICIT"], [False, True], [False, True])
)


@pytest.mark.parametrize("depthwise,stride,padding,signed_in,signed_out", CASES)
def test_conv_matches_float_on_quantized_values(depthwise, stride, padding, signed_in, signed_out):
    rng = np.random.default_rng(stride * 7 + depthwise)
    channels = 16
    out_channels = channels if depthwise else 24
    x = rng.standard_normal((2, 9, 9, channels)).astype(np.float32)
    if not signed_in:
        x = np.maximum(x, 0)
    shape = (3, 3, channels, 1) if depthwise else (3, 3, channels, out_channels)
    codes, w_scales, w = _weights(rng, shape, depthwise, signed_in)
    bias = (rng.standard_normal(out_channels) * 0.1).astype(np.float32)
    x_scale = float(np.abs(x).max()) / (127 if signed_in else 255)
    explicit = [1, 1, 0, 1] if padding == "EXPLICIT" else None
    xq = fq(x, x_scale, signed_in)
    if explicit:
        xq = np.pad(xq, [[0, 0], explicit[:2], explicit[2:], [0, 0]])
    conv = tf.nn.depthwise_conv2d if depthwise else tf.nn.conv2d
    strides = [1, stride, stride, 1]
    y = np.maximum(conv(xq, w, strides, "VALID" if explicit else padding).numpy() + bias, 0)
    out_scale = float(np.abs(y).max()) / (127 if signed_out else 255)

    @tf.function
    def run(t):
        q = onednn.quantize(t, x_scale, signed_in, "q")
        out = onednn.conv2d(
            q,
            codes,
            w_scales,
            bias,
            depthwise=depthwise,
            strides=[stride, stride],
            dilations=[1, 1],
            padding=padding,
            explicit=explicit,
            activation="Relu",
            out_scale=out_scale,
            out_signed=signed_out,
            name="conv",
        )
        return onednn.dequantize(out, "dq")

    got = run(tf.constant(x)).numpy()
    assert np.abs(got - fq(y, out_scale, signed_out)).max() <= out_scale * 1.001


@pytest.mark.parametrize("signed_in", [False, True])
def test_matmul_dequantizes_in_the_kernel(signed_in):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    if not signed_in:
        x = np.maximum(x, 0)
    w = (rng.standard_normal((64, 10)) * 0.1).astype(np.float32)
    codes, scales = symmetric_int8(
        w, 1, pairs=node_pairs("MatMul", w.shape, Attrs(), "onednn") if PAIRED else None
    )
    bias = rng.standard_normal(10).astype(np.float32)
    x_scale = float(np.abs(x).max()) / (127 if signed_in else 255)
    want = fq(x, x_scale, signed_in) @ (codes * scales) + bias

    @tf.function
    def run(t):
        return onednn.matmul(onednn.quantize(t, x_scale, signed_in, "q"), codes, scales, bias, "mm")

    got = run(tf.constant(x)).numpy()
    # float output: only the float32 accumulation order differs
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_max_pool_keeps_codes():
    x = np.maximum(np.random.default_rng(4).standard_normal((2, 8, 8, 4)), 0).astype(np.float32)
    scale = float(x.max() / 255)

    @tf.function
    def run(t):
        return onednn.dequantize(
            onednn.max_pool(onednn.quantize(t, scale, False, "q"), [2, 2], [2, 2], "VALID", "mp"), "dq"
        )

    want = tf.nn.max_pool2d(fq(x, scale, False), 2, 2, "VALID").numpy()
    np.testing.assert_array_equal(run(tf.constant(x)).numpy(), want)


# -- ncc compile --target tf, through the CLI ------------------------------------------------------

import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from realmodels import fer_h5, fer_inputs  # noqa: E402

RELOAD = """
import sys, numpy as np, tensorflow as tf
fn = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
x = np.load(sys.argv[2])["x"]
out = fn(input_1=tf.constant(x))
np.save(sys.argv[3], out["predictions"].numpy())
print(sorted({n.op for f in fn.graph.as_graph_def().library.function for n in f.node_def}))
"""


def ncc(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", *map(str, args)], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def fer_int8(tmp_path_factory):
    """fer's emotion CNN compiled for the tf target on 64 face crops; the report and the folder."""
    tmp = tmp_path_factory.mktemp("fer_tf")
    np.savez(tmp / "calib.npz", input_1=fer_inputs(64, seed=0))
    out = tmp / "fer_int8"
    proc = ncc(
        "compile", fer_h5(), "--pass", "int8", "--calib", tmp / "calib.npz", "--target", "tf", "-o", out
    )
    assert proc.returncode == 0, proc.stderr
    return tmp, out, proc.stderr


def test_fer_runs_int8_in_a_fresh_tensorflow_process(fer_int8):
    tmp, out, report = fer_int8
    # every convolution ncc quantized is a oneDNN int8 kernel in the written graph
    done, total = re.search(
        r"on TensorFlow .*: (\d+)/(\d+) quantized nodes run as integer kernels", report
    ).groups()
    assert done == total and int(total) >= 20, report
    x = fer_inputs(128, seed=1)  # held out: other crops than calibration's
    np.savez(tmp / "x.npz", x=x)
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, out, tmp / "x.npz", tmp / "y.npy"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "_FusedQuantizedConv2D" in proc.stdout and "_FusedQuantizedDepthwiseConv2D" in proc.stdout
    got = np.load(tmp / "y.npy")
    # the fresh process reproduces what ncc's own runner (the report's fidelity) computes here, bit for bit
    from ncc.tools.runtimes import TensorFlowRunner

    here = TensorFlowRunner(out, None).outputs({"input_1": x})["predictions"]
    np.testing.assert_array_equal(got, here)
    import keras

    want = np.asarray(keras.models.load_model(fer_h5(), compile=False)(x, training=False))
    agreement = float((got.argmax(1) == want.argmax(1)).mean())
    rel_l2 = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    # issue 14's bar: at least 15/16 top-1 agreement (INC's TF path reaches 4/16 on this model); measured
    # 0.97 with rel-L2 0.04 here: the bound leaves room for another CPU's rounding, not for a broken layer
    assert agreement >= 15 / 16, (agreement, rel_l2)
    assert rel_l2 < 0.1, rel_l2


def test_same_input_gives_a_byte_identical_folder(fer_int8, tmp_path):
    tmp, out, _ = fer_int8
    again = tmp_path / "again"
    proc = ncc(
        "compile", fer_h5(), "--pass", "int8", "--calib", tmp / "calib.npz", "--target", "tf", "-o", again
    )
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_ncc_bench_times_the_int8_saved_model(fer_int8, tmp_path):
    tmp, out, _ = fer_int8
    np.savez(tmp_path / "x.npz", input_1=fer_inputs(32, seed=2))
    fp32 = tmp_path / "fer.onnx"
    assert ncc("compile", fer_h5(), "-o", fp32).returncode == 0
    proc = ncc("bench", fp32, out, "--data", tmp_path / "x.npz", "--batch", 8, "--runs", 3, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["quant_runtime"] == "tensorflow" and result["runtimes"][-1]["precision"] == "int8"
    assert result["fidelity"]["predictions"]["cosine"] > 0.99


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["-o", "{tmp}/out.onnx"], "writes a SavedModel folder"),
        (["-o", "{tmp}/out", "--format", "qdq"], "lowers QOperator form"),
        (["-o", "{tmp}/out", "--external-data", "w.bin"], "not a SavedModel"),
        (["-o", "{tmp}/notes"], "holds no SavedModel"),
    ],
)
def test_tf_target_refusals_are_one_sentence(tmp_path, args, fragment):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    args = [a.format(tmp=tmp_path) for a in args]
    proc = ncc("compile", fer_h5(), "--pass", "optimize", "--target", "tf", *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("ncc: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert fragment in proc.stderr
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_an_onnx_model_compiles_for_tensorflow_with_only_ncc_on_stderr(tmp_path):
    """The built-in digits CNN (an NCHW ONNX model, no TensorFlow in its past) as an int8 SavedModel and an
    int8 .tflite; TensorFlow's and LiteRT's start-up notices stay off the user's terminal."""
    repo = Path(__file__).resolve().parents[2]
    example, calib = repo / "examples" / "digits_cnn.onnx", repo / "examples" / "digits_calib.npz"
    for out in (tmp_path / "digits_int8", tmp_path / "digits.int8.tflite"):
        target = ["--target", "tf"] if out.suffix == "" else []
        proc = ncc("compile", example, "--pass", "int8", "--calib", calib, *target, "-o", out)
        assert proc.returncode == 0, proc.stderr
        assert all(line.startswith("ncc:") for line in proc.stderr.splitlines()), proc.stderr
        assert re.search(r"(\d+)/\1 (quantized nodes run as integer kernels|ops run int8)", proc.stderr), (
            proc.stderr
        )


def test_a_zero_point_folds_into_the_biases_of_1x1_convolutions(tmp_path):
    """An Add's output, skewed negative-to-positive and read only by a 1x1 convolution, is u8 with a zero
    point (scheme ``scaled``); the SavedModel takes it off that convolution's bias, so it computes what the
    same QDQ IR computes in onnxruntime."""
    import keras
    import onnxruntime as ort

    keras.utils.set_random_seed(1)
    image = keras.Input((12, 12, 3), name="image")
    a = keras.layers.Conv2D(8, 1, bias_initializer=keras.initializers.Constant(1.5))(image)  # skewed up
    b = keras.layers.Conv2D(8, 3, padding="same")(image)
    s = keras.layers.Add()([a, b])
    y = keras.layers.Conv2D(6, 1)(s)
    model = keras.Model(image, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(y)))
    model.save(tmp_path / "m.keras")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", image=rng.random((32, 12, 12, 3), dtype=np.float32))
    common = ["--pass", "int8", "--calib", tmp_path / "calib.npz", "--target", "tf"]
    for out in (tmp_path / "m.ncc", tmp_path / "m_int8"):
        proc = ncc("compile", tmp_path / "m.keras", *common, "-o", out)
        assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "m.ncc").read_text()
    assert re.search(r'_zero_point" : u8\[\] = dense<[1-9]', text), (
        "no u8 zero point: the case is not exercised"
    )
    assert ncc("compile", tmp_path / "m.ncc", "-o", tmp_path / "m.onnx").returncode == 0
    x = rng.random((16, 12, 12, 3), dtype=np.float32)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    want = session.run(None, {"image": x})[0]
    from ncc.tools.runtimes import TensorFlowRunner

    name = session.get_outputs()[0].name
    got = TensorFlowRunner(tmp_path / "m_int8", None).outputs({"image": x})[name]
    # the same integer arithmetic; float accumulation order and ties rounded apart move an output step at most
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
