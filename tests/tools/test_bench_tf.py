"""``ncc bench`` on TensorFlow artefacts: a small Keras CNN trained on scikit-learn's digits, as a SavedModel
(``model.export``), a float and an int8 ``.tflite`` (the int8 one calibrated on real digits) and its ONNX
(``ncc compile model.keras``), benched against each other in every runtime through the command.

The cosine and top-1 agreement ``ncc bench`` prints are recomputed here from the models' own outputs (Keras
for the float model, LiteRT's interpreter fed by hand for the int8 one) on held-out digits. Benches that
run TensorFlow go through a fresh ``ncc`` process: TensorFlow takes its thread counts only before it
first runs, and this test process trained the model already.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke_ncc
from onnx import TensorProto, helper
from sklearn.datasets import load_digits

tf = pytest.importorskip(
    "tensorflow", reason="tensorflow-cpu is not installed (pip install -e '.[tensorflow]')"
)
pytest.importorskip(
    "ai_edge_litert", reason="ai-edge-litert is not installed (pip install -e '.[tensorflow]')"
)
import keras  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

TRAIN = 1400  # digits 0..1399 train the model (and calibrate the int8 .tflite); the other 397 are benched
FAST = ("--threads", "1", "--warmup", "1", "--runs", "2")
ROW = re.compile(
    r"^\| (onnxruntime|tensorflow|litert) \| (\S+) \| (f32|int8) \| (-?[0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|",
    re.M,
)


def ncc(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", *map(str, args)], capture_output=True, text=True
    )


def one_sentence_error(run, *fragments: str) -> str:
    stderr = run.stderr if isinstance(run, subprocess.CompletedProcess) else run.output
    code = run.returncode if isinstance(run, subprocess.CompletedProcess) else run.exit_code
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("ncc: error:")]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert lines[0].endswith("."), lines[0]
    return lines[0]


def rows(stdout: str) -> list[tuple]:
    return [(r[0], r[1], r[2], float(r[3]), float(r[4]), float(r[5])) for r in ROW.findall(stdout)]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    """The .tflite on ``x``, its int8 input and output (de)quantized here by hand."""
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    (in_scale, in_zero), (out_scale, out_zero) = inp["quantization"], out["quantization"]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8  # a fully integer model
    interpreter.set_tensor(inp["index"], np.clip(np.round(x / in_scale) + in_zero, -128, 127).astype(np.int8))
    interpreter.invoke()
    return (interpreter.get_tensor(out["index"]).astype(np.float32) - out_zero) * out_scale


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits CNN in every form, the held-out digits and what Keras and LiteRT make of them."""
    folder = tmp_path_factory.mktemp("bench-tf")
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]  # [1797, 8, 8, 1] in [0, 1]
    y = data.target.astype(np.int64)
    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(image)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    model = keras.Model(image, keras.layers.Dense(10, name="logits")(h))
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:TRAIN], y[:TRAIN], epochs=15, batch_size=32, verbose=0)  # held-out accuracy about 0.95
    paths = {"keras": folder / "digits.keras", "saved_model": folder / "digits_savedmodel"}
    model.save(paths["keras"])
    model.export(str(paths["saved_model"]), verbose=False)
    paths["tflite"] = folder / "digits.tflite"
    paths["tflite"].write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(paths["saved_model"])).convert())
    converter = tf.lite.TFLiteConverter.from_saved_model(str(paths["saved_model"]))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[i : i + 1]] for i in range(0, TRAIN, 7))  # 200 digits
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    paths["int8_tflite"] = folder / "digits.int8.tflite"
    paths["int8_tflite"].write_bytes(converter.convert())
    paths["onnx"] = folder / "digits.onnx"
    compiled = invoke_ncc("compile", paths["keras"], "-o", paths["onnx"])
    assert compiled.exit_code == 0, compiled.output
    paths["data"], paths["labels"] = folder / "digits.npz", folder / "labels.npy"
    np.savez(paths["data"], image=x[TRAIN:])
    np.save(paths["labels"], y[TRAIN:])
    test = x[TRAIN:]
    return {
        **paths,
        "folder": folder,
        "x": test,
        "y": y[TRAIN:],
        "fp32": model(test, training=False).numpy(),
        "int8": run_tflite(paths["int8_tflite"], test),
    }


def test_the_models_are_real(digits):
    fp32, int8, y = digits["fp32"], digits["int8"], digits["y"]
    assert np.mean(fp32.argmax(1) == y) > 0.9  # trained: held-out accuracy
    assert np.mean(int8.argmax(1) == y) > 0.9
    assert 0.99 < cosine(fp32, int8) < 1.0  # int8 for real, and close


def test_savedmodel_against_int8_tflite_is_one_command(digits):
    run = ncc(
        "bench", digits["saved_model"], digits["int8_tflite"], "--data", digits["data"],
        "--metric", f"accuracy:{digits['labels']}", *FAST,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # TensorFlow's and LiteRT's log lines are not the user's business
    got = rows(run.stdout)
    assert [r[:3] for r in got] == [
        ("tensorflow", "digits_savedmodel", "f32"), ("litert", "digits.int8.tflite", "int8"),
    ]  # fmt: skip
    (_, _, _, cos_fp, agree_fp, speed_fp), (_, _, _, cos_q, agree_q, speed_q) = got
    assert (cos_fp, agree_fp) == (1.0, 1.0)  # the reference against itself
    # what LiteRT computes on the held-out digits, fed by hand: the same cosine and agreement
    want_cos = cosine(digits["fp32"], digits["int8"])
    want_agree = float(np.mean(digits["fp32"].argmax(1) == digits["int8"].argmax(1)))
    assert cos_q == pytest.approx(want_cos, abs=2e-6)
    assert agree_q == pytest.approx(want_agree, abs=1e-4)
    # 8-bit weights (per channel) and activations over three layers: 25-45 dB of SQNR, so 1 - cos is
    # about 0.5 * 10^(-SQNR/10): between 2e-5 and 2e-3; the argmax moves on at most a few of 397 digits
    assert 0.998 < cos_q < 0.99998 and agree_q >= 0.98
    assert speed_fp > 0 and speed_q > 0
    headline = re.search(r"^\| digits_savedmodel \| ([0-9.]+) \| ([0-9.]+) \|", run.stdout, re.M)
    assert float(headline[1]) == pytest.approx(np.mean(digits["fp32"].argmax(1) == digits["y"]), abs=1e-4)
    assert float(headline[2]) == pytest.approx(np.mean(digits["int8"].argmax(1) == digits["y"]), abs=1e-4)
    assert "FP32 (tensorflow) median" in run.stdout and "INT8 (litert) median" in run.stdout
    assert "cosine vs tensorflow FP32" in run.stdout


def test_onnx_against_savedmodel_pairs_outputs_in_order(digits):
    run = ncc("bench", digits["onnx"], digits["saved_model"], "--data", digits["data"], "--json", *FAST)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert (result["float_runtime"], result["quant_runtime"]) == ("onnxruntime", "tensorflow")
    # ONNX's "logits" is the signature's "output_0": paired by position, reported under the float name
    assert list(result["fidelity"]) == ["logits"] and result["samples"] == len(digits["y"])
    fidelity = result["fidelity"]["logits"]
    assert fidelity["cosine"] > 0.99999 and fidelity["top1_agreement"] == 1.0  # the same float model
    assert [(r["runtime"], r["precision"]) for r in result["runtimes"]] == [
        ("onnxruntime", "f32"), ("tensorflow", "f32"),
    ]  # fmt: skip
    files = [Path(f) for f in result["size"]["int8_files"]]
    assert digits["saved_model"] / "saved_model.pb" in files  # a SavedModel's size is all its files
    assert result["size"]["int8_bytes"] == sum(f.stat().st_size for f in files)


def test_float_and_int8_tflite_need_no_tensorflow(digits):
    """Two .tflite files run in LiteRT alone: the command never imports TensorFlow for them."""
    script = (
        "import sys\n"
        f"sys.argv = ['ncc', 'bench', {str(digits['tflite'])!r}, {str(digits['int8_tflite'])!r}, "
        f"'--data', {str(digits['data'])!r}, '--batch', '8', '--json', *{FAST!r}]\n"
        "from ncc.tools.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print(sorted({'tensorflow', 'keras', 'tf2onnx'} & set(sys.modules)))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out, _, imported = run.stdout.rstrip().rpartition("\n")
    assert imported == "[]"
    result = json.loads(out)
    assert [(r["runtime"], r["precision"]) for r in result["runtimes"]] == [
        ("litert", "f32"),
        ("litert", "int8"),
    ]
    float_tflite = result["runtimes"][0]["fidelity"]["cosine"]
    assert float_tflite == pytest.approx(1.0, abs=1e-9)
    # the int8 file against the float .tflite (which computes what Keras does): the cosine recomputed here
    assert result["fidelity"]["output_0"]["cosine"] == pytest.approx(
        cosine(digits["fp32"], digits["int8"]), abs=1e-5
    )
    assert result["batch"] == 8


def test_an_onnx_bench_imports_no_tensorflow(digits):
    script = (
        "import sys\n"
        f"sys.argv = ['ncc', 'bench', {str(digits['onnx'])!r}, {str(digits['onnx'])!r}, *{FAST!r}]\n"
        "from ncc.tools.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print(sorted({'tensorflow', 'keras', 'tf2onnx', 'ai_edge_litert'} & set(sys.modules)))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.rstrip().endswith("[]"), run.stdout


def test_int8_savedmodel_against_float_savedmodel(digits, tmp_path):
    """FP32 TF vs INT8 TF: a SavedModel whose graph quantizes the image to 8 bits (QuantizeV2, Dequantize)
    before the CNN is int8, and its outputs stay close to the float model's."""
    model = keras.models.load_model(digits["keras"], compile=False)

    class Quantized(tf.Module):
        def __init__(self):
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32, name="image")])
        def serve(self, image):
            q = tf.quantization.quantize(image, 0.0, 1.0, tf.quint8)
            return {"output_0": self.model(tf.quantization.dequantize(q.output, q.output_min, q.output_max))}

    module = Quantized()
    tf.saved_model.save(
        module, str(tmp_path / "int8_savedmodel"), signatures={"serving_default": module.serve}
    )
    run = ncc("bench", digits["saved_model"], tmp_path / "int8_savedmodel", "--data", digits["data"], *FAST)
    assert run.returncode == 0, run.stderr
    got = rows(run.stdout)
    assert [r[:3] for r in got] == [
        ("tensorflow", "digits_savedmodel", "f32"), ("tensorflow", "int8_savedmodel", "int8"),
    ]  # fmt: skip
    # the digits are k/16: 8 bits over [0, 1] move each pixel by at most 1/510, far below the CNN's margins
    assert 0.9999 < got[1][3] < 1.0 and got[1][4] == 1.0


# -- errors -----------------------------------------------------------------------------------------


def _onnx_model(path: Path, input_shape: list, classes: int, name: str = "image") -> Path:
    """``Flatten -> MatMul`` from input ``name`` of ``input_shape`` to ``classes`` logits."""
    size = int(np.prod(input_shape[1:]))
    weight = helper.make_tensor("w", TensorProto.FLOAT, [size, classes], np.ones(size * classes, np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", [name], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["scores"]),
        ],
        "other",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", classes])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize(
    "case, fragments",
    [
        (
            "other input shape",
            ["the models have different inputs", "image [?, 8, 8, 1]", "image [batch, 64]"],
        ),
        ("other outputs", ["the models have different outputs", "output_0 [?, 10]", "scores [batch, 5]"]),
        ("keras file", ["is a Keras file, which ncc bench does not run", "model.export(DIR)"]),
        ("folder", ["is a folder without saved_model.pb"]),
        ("signature without a SavedModel", ["--signature serve applies to a SavedModel folder"]),
        ("not a tflite", ["not a TFLite model"]),
        ("openvino without onnx", ["--runtime openvino times ONNX artefacts; neither model is an ONNX file"]),
    ],
)
def test_user_errors_are_one_sentence(digits, tmp_path, case, fragments):
    """In this process: none of these reaches TensorFlow (LiteRT and onnx read the files)."""
    fp, args = digits["int8_tflite"], []
    if case == "other input shape":
        q = _onnx_model(tmp_path / "other.onnx", ["batch", 64], 10)
    elif case == "other outputs":
        q = _onnx_model(tmp_path / "other.onnx", ["batch", 8, 8, 1], 5)
    elif case == "keras file":
        q = digits["keras"]
    elif case == "folder":
        q = tmp_path
    elif case == "signature without a SavedModel":
        q, args = digits["onnx"], ["--signature", "serve"]
    elif case == "not a tflite":
        q = tmp_path / "notes.tflite"
        q.write_text("not a flatbuffer\n" * 4)
    else:
        q, args = digits["tflite"], ["--runtime", "openvino"]
    one_sentence_error(invoke_ncc("bench", fp, q, *args, *FAST), *fragments)


def test_data_keyed_by_the_quantized_models_names(digits, tmp_path):
    """The ONNX's input is ``pixels``, the .tflite's ``image``: paired in order, and data keyed either way."""
    other = _onnx_model(tmp_path / "pixels.onnx", ["batch", 8, 8, 1], 10, name="pixels")
    np.savez(tmp_path / "pixels.npz", pixels=digits["x"][:40])
    run = invoke_ncc("bench", digits["int8_tflite"], other, "--data", tmp_path / "pixels.npz", *FAST)
    assert run.exit_code == 0, run.output
    assert [r[:3] for r in rows(run.stdout)] == [
        ("litert", "digits.int8.tflite", "int8"), ("onnxruntime", "pixels.onnx", "f32"),
    ]  # fmt: skip
    assert "40 samples from" in run.stdout


def test_tensorflow_takes_its_threads_once_per_process(digits):
    """This process ran TensorFlow (training the model) with its default threads: a bench asking for one
    thread says it needs a fresh process instead of timing with other threads than it reports."""
    from ncc.errors import NccError
    from ncc.tools.bench import benchmark

    if tf.config.threading.get_intra_op_parallelism_threads() == 1:
        pytest.skip("this process runs TensorFlow on one intra-op thread already")
    with pytest.raises(
        NccError, match=r"already runs in this process with .* --threads 1 needs a fresh process"
    ):
        benchmark(digits["saved_model"], digits["int8_tflite"], threads=1, warmup=0, runs=1)


@pytest.mark.parametrize("case", ["unknown signature", "unreadable SavedModel"])
def test_savedmodel_errors_are_one_sentence(digits, tmp_path, case):
    if case == "unknown signature":
        run = ncc("bench", digits["saved_model"], digits["int8_tflite"], "--signature", "predict", *FAST)
        # Keras's export writes two signatures; the sentence lists them
        one_sentence_error(run, "has no signature 'predict' (it has: serve, serving_default)")
    else:
        broken = tmp_path / "broken_savedmodel"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"\x08\x01garbage, not a SavedModel")
        run = ncc("bench", broken, digits["int8_tflite"], *FAST)
        one_sentence_error(run, "broken_savedmodel: not a readable SavedModel")


@pytest.mark.parametrize("artefact", ["saved_model", "int8_tflite"])
def test_without_tensorflow_installed_the_sentence_names_the_extra(digits, artefact):
    script = (
        "import sys\n"
        "for name in ('tensorflow', 'ai_edge_litert', 'ai_edge_litert.interpreter'):\n"
        "    sys.modules[name] = None  # as if not installed: importing it raises ImportError\n"
        f"sys.argv = ['ncc', 'bench', {str(digits['onnx'])!r}, {str(digits[artefact])!r}, *{FAST!r}]\n"
        "from ncc.tools.cli import main\n"
        "main()\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    needs = "TensorFlow" if artefact == "saved_model" else "LiteRT"
    one_sentence_error(run, f"needs {needs}", 'pip install -e ".[tensorflow]"')
