"""Static INT8 through the public interfaces: the CLI and the pass manager, checked in onnxruntime.

Fixture: the digits CNN shipped in examples/ (trained on scikit-learn's real digits) and its
calibration set; the held-out digits measure accuracy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ncc.backends.onnx import save_onnx
from ncc.frontends.onnx import load_onnx
from ncc.passes.base import PassContext
from ncc.passes.manager import PassManager
from ncc.passes.quant.calib_data import load_calibration_data
from ncc.passes.quant.plan import binned_values, observed_values
from ncc.targets import get_target
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "examples" / "digits_cnn.onnx"
CALIB = REPO / "examples" / "digits_calib.npz"


def ncc(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", *map(str, args)], capture_output=True, text=True
    )


def heldout() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images[1400:] / 16.0).astype(np.float32)[:, None], digits.target[1400:]


def session(path, optimize=True):
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def accuracy(path: Path) -> float:
    x, y = heldout()
    return float((session(path).run(None, {"image": x})[0].argmax(1) == y).mean())


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "digits.int8.onnx"
    proc = ncc(
        "compile",
        MODEL,
        "--pass",
        "int8",
        "--calib",
        CALIB,
        "-o",
        out,
        "--cache-dir",
        tmp_path_factory.mktemp("cache"),
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_int8_cli_reports_and_runs_integer_kernels(int8_model):
    onnx.checker.check_model(onnx.load(int8_model))
    ops = {n.op_type for n in onnx.load(int8_model).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x, _ = heldout()
    assert session(int8_model).run(None, {"image": x[:4]})[0].shape == (4, 10)


def test_int8_accuracy_close_to_float(int8_model):
    assert accuracy(int8_model) >= accuracy(MODEL) - 0.02


def test_every_qdq_pair_matches_numpy_fake_quant(int8_model):
    """Each QuantizeLinear output equals round(x / scale) + zp (saturated) on real inputs, within one step."""
    proto = onnx.load(int8_model)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    pairs = [
        (n.input[0], n.output[0], inits[n.input[1]], inits[n.input[2]])
        for n in proto.graph.node
        if n.op_type == "QuantizeLinear"
    ]
    assert len(pairs) >= 5
    wanted = sorted({name for p in pairs for name in p[:2]})
    for name in wanted:
        if name not in {o.name for o in proto.graph.output}:
            proto.graph.output.append(helper.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x, _ = heldout()
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": x[:64]})))
    for src, dst, scale, zp in pairs:
        info = np.iinfo(zp.dtype)
        expected = np.clip(np.rint(values[src] / scale) + zp.astype(np.int32), info.min, info.max)
        assert np.abs(values[dst].astype(np.int32) - expected).max() <= 1, dst
        inside = (values[src] >= (info.min - zp) * scale) & (values[src] <= (info.max - zp) * scale)
        dequantized = (values[dst].astype(np.float32) - zp) * scale
        assert np.abs(dequantized - values[src])[inside].max() <= scale * 1.0001, dst


def test_weights_are_int8_per_channel_within_a_step(int8_model):
    proto = onnx.load(int8_model)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    floats = {i.name: numpy_helper.to_array(i) for i in onnx.load(MODEL).graph.initializer}
    conv_weight = (
        inits["features.3.weight_bn_quantized"] if "features.3.weight_bn_quantized" in inits else None
    )
    assert conv_weight is not None and conv_weight.dtype == np.int8
    scale = inits["features.3.weight_bn_scale"]
    assert scale.shape == (32,)  # one scale per output channel
    assert np.abs(conv_weight).max() <= 127
    if get_target("host").pairwise_int16:  # no int16 pair of the GEMM (K order kh, kw, c) can overflow
        k_major = conv_weight.transpose(2, 3, 1, 0).reshape(-1, 2, conv_weight.shape[0]).astype(np.int32)
        assert np.maximum(k_major, 0).sum(1).max() <= 128 and np.minimum(k_major, 0).sum(1).min() >= -128
    # round-weights rounds each weight to the grid point below or above it (not always the nearest)
    gemm_w = inits["head.3.weight_quantized"].astype(np.float32) * inits["head.3.weight_scale"][:, None]
    assert np.abs(gemm_w - floats["head.3.weight"]).max() <= inits["head.3.weight_scale"].max() * 1.0001


def test_int8_onnx_output_leaves_out_intermediate_shapes(tmp_path, int8_model):
    # onnxruntime fuses Add + LayerNormalization into its slower SkipLayerNormalization only when it knows
    # the shapes: INT8 artefacts are written without them unless --value-info; float outputs keep them
    assert len(onnx.load(int8_model).graph.value_info) == 0
    kept = tmp_path / "kept.onnx"
    proc = ncc(
        "compile",
        MODEL,
        "--pass",
        "int8",
        "--calib",
        CALIB,
        "-o",
        kept,
        "--cache-dir",
        tmp_path / "c",
        "--format",
        "qoperator",
        "--value-info",
    )
    assert proc.returncode == 0, proc.stderr
    assert len(onnx.load(kept).graph.value_info) > 0
    optimized = tmp_path / "opt.onnx"
    assert ncc("compile", MODEL, "--pass", "optimize", "-o", optimized).returncode == 0
    assert len(onnx.load(optimized).graph.value_info) > 0


def test_qoperator_format_matches_qdq(tmp_path, int8_model):
    out = tmp_path / "digits.qop.onnx"
    proc = ncc(
        "compile",
        MODEL,
        "--pass",
        "int8",
        "--calib",
        CALIB,
        "--format",
        "qoperator",
        "-o",
        out,
        "--cache-dir",
        tmp_path / "cache",
    )
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(onnx.load(out))
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops
    x, _ = heldout()
    qop, qdq = session(out).run(None, {"image": x})[0], session(int8_model).run(None, {"image": x})[0]
    assert (qop.argmax(1) == qdq.argmax(1)).mean() >= 0.99


def test_second_compile_reuses_calibration_statistics(tmp_path):
    # histogram statistics (the default mse) serve every other option and method; minmax statistics
    # carry no histograms, so the first histogram method after them runs the model again

    def from_cache(cache: str, name: str, *options: str) -> bool:
        proc = ncc(
            "compile",
            MODEL,
            "--pass",
            "int8",
            "--calib",
            CALIB,
            "-o",
            tmp_path / f"{name}.onnx",
            "--cache-dir",
            tmp_path / cache,
            "--pass-statistics",
            *options,
        )
        assert proc.returncode == 0, proc.stderr
        assert ("0 from cache" in proc.stderr) != ("1 from cache" in proc.stderr), proc.stderr
        return "1 from cache" in proc.stderr

    assert not from_cache("a", "mse")
    assert from_cache("a", "other", "--per-tensor", "--format", "qoperator", "--activations", "s8")
    assert from_cache("a", "minmax", "--calib-method", "minmax")
    assert from_cache("a", "entropy", "--calib-method", "entropy")
    assert from_cache("a", "mse-again")
    assert (tmp_path / "mse.onnx").read_bytes() == (tmp_path / "mse-again.onnx").read_bytes()
    assert not from_cache("b", "minmax-first", "--calib-method", "minmax")
    assert from_cache("b", "minmax-again", "--calib-method", "minmax", "--per-tensor")
    assert not from_cache("b", "percentile", "--calib-method", "percentile")
    assert from_cache("b", "minmax-last", "--calib-method", "minmax")
    assert (tmp_path / "minmax.onnx").read_bytes() == (tmp_path / "minmax-last.onnx").read_bytes()


def test_compile_int8_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert (
            ncc(
                "compile",
                MODEL,
                "--pass",
                "int8",
                "--calib",
                CALIB,
                "-o",
                tmp_path / f"{name}.onnx",
                "--cache-dir",
                tmp_path / f"cache-{name}",
            ).returncode
            == 0
        )
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_masking_sentinels_keep_ops_in_float(tmp_path):
    """An attention-style Add of a float32-minimum mask and its Softmax stay in float, with the reason."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["s"], name="scores"),
        helper.make_node("Add", ["s", "mask"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["p"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["p", "x"], ["y"], name="context"),
    ]
    graph = helper.make_graph(
        nodes,
        "attn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 8, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8])],
        [w],
    )
    src = tmp_path / "attn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    mask = np.where(rng.random((16, 8, 8)) < 0.3, np.finfo(np.float32).min, 0).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 8, 8)).astype(np.float32), mask=mask)
    model = load_onnx(src)
    ctx = PassContext()
    ctx.data["calibration_data"] = load_calibration_data(str(tmp_path / "calib.npz"))
    PassManager("calibrate{op-types=MatMul,Add,Softmax},insert-qdq{op-types=MatMul,Add,Softmax}").run(
        model, ctx
    )
    by_name = {n.name: n for n in model.graph}
    assert "masking sentinels" in by_name["add_mask"].metadata_props["ncc.quant.skip"]
    assert "masking sentinels" in by_name["softmax"].metadata_props["ncc.quant.skip"]
    assert by_name["scores"].metadata_props["ncc.quant"] == "int8"
    save_onnx(model, tmp_path / "attn.int8.onnx")
    feeds = {"x": rng.standard_normal((4, 8, 8)).astype(np.float32), "mask": mask[:4]}
    ref, got = session(src).run(None, feeds)[0], session(tmp_path / "attn.int8.onnx").run(None, feeds)[0]
    cos = (ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)
    assert cos > 0.99


def test_int8_stores_an_embedding_table_in_int8_per_row(tmp_path):
    """The int8 pipeline ends with quantize-embeddings: a Gather's constant table becomes int8 rows with one
    scale each (the float table gone from the file), beside the statically quantized MatMul reading it."""
    rng = np.random.default_rng(1)
    table = (rng.standard_normal((200, 32)) * rng.uniform(0.05, 2.0, (200, 1))).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "w"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 16])],
        [
            numpy_helper.from_array(table, "emb"),
            numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32) * 0.2, "w"),
        ],
    )
    src, out = tmp_path / "embed.onnx", tmp_path / "embed.int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    np.savez(tmp_path / "calib.npz", ids=rng.integers(0, 200, (32, 6)))
    proc = ncc("compile", src, "--pass", "int8", "--calib", tmp_path / "calib.npz", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "quantized (int8-weight): Gather 1" in proc.stderr and "quantized (int8): MatMul 1" in proc.stderr
    assert "quantize-embeddings: 1 table(s) in int8, one scale per row: 0.03 MB -> 0.01 MB" in proc.stderr
    written = onnx.load(out)
    inits = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    gather = next(
        n for n in written.graph.node if n.op_type == "Gather" and n.input[0] in inits and n.input[0] != "w"
    )
    codes = inits[gather.input[0]]
    assert codes.dtype == np.int8 and codes.shape == (200, 32)
    assert not any(a.dtype == np.float32 and a.shape == (200, 32) for a in inits.values())  # the float table
    scales = next(a for a in inits.values() if a.shape == (200, 1))
    assert np.all(
        np.abs(codes * scales - table) <= np.abs(table).max(1, keepdims=True) / 254 + 1e-7
    )  # half a step
    ids = rng.integers(0, 200, (64, 6))
    ref, got = session(src).run(None, {"ids": ids})[0], session(out).run(None, {"ids": ids})[0]
    assert (ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got) > 0.999


# --- bad input: one sentence, exit 2, nothing written ------------------------------------------


def test_exclude_patterns_are_searched_in_names_and_unmatched_ones_warned(tmp_path):
    # like grep (and quantize-dynamic, and the weight-only passes): 'features.3' names
    # '/features/features.3/Conv' without spelling it out; a pattern that names nothing is reported
    out = tmp_path / "o.onnx"
    proc = ncc(
        "compile",
        MODEL,
        "--pass",
        "int8",
        "--calib",
        CALIB,
        "-o",
        out,
        "--cache-dir",
        tmp_path / "c",
        "--exclude",
        "features.3",
        "--exclude",
        "featurez",
    )
    assert proc.returncode == 0, proc.stderr
    assert "kept float: Conv x1: excluded by 'features.3'" in proc.stderr, proc.stderr
    assert "warning: exclude pattern 'featurez' matches no node name" in proc.stderr, proc.stderr
    assert "warning: exclude pattern 'features.3'" not in proc.stderr
    graph = onnx.load(out).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = {n.name: n.input[1] in dequantized for n in graph.node if n.op_type == "Conv"}  # int8 weight?
    assert convs == {
        "/features/features.0/Conv": True,
        "/features/features.3/Conv": False,
        "/features/features.7/Conv": True,
    }


def _assert_error(proc, fragment, out: Path):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and fragment in proc.stderr, proc.stderr
    assert not out.exists()


def test_calibration_data_with_wrong_input_name(tmp_path):
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((4, 1, 8, 8), np.float32))
    out = tmp_path / "o.onnx"
    _assert_error(
        ncc("compile", MODEL, "--pass", "int8", "--calib", tmp_path / "bad.npz", "-o", out), "image", out
    )


def test_calibration_data_with_wrong_dtype(tmp_path):
    np.savez(tmp_path / "bad.npz", image=np.zeros((4, 1, 8, 8), np.int64))
    out = tmp_path / "o.onnx"
    _assert_error(
        ncc("compile", MODEL, "--pass", "int8", "--calib", tmp_path / "bad.npz", "-o", out), "image", out
    )


def test_calibration_data_empty(tmp_path):
    np.savez(tmp_path / "empty.npz", image=np.zeros((0, 1, 8, 8), np.float32))
    out = tmp_path / "o.onnx"
    _assert_error(
        ncc("compile", MODEL, "--pass", "int8", "--calib", tmp_path / "empty.npz", "-o", out), "empty", out
    )


def test_missing_calibration_data(tmp_path):
    out = tmp_path / "o.onnx"
    _assert_error(ncc("compile", MODEL, "--pass", "int8", "-o", out), "--calib", out)


def test_already_quantized_model_is_refused(tmp_path, int8_model):
    out = tmp_path / "o.onnx"
    _assert_error(
        ncc("compile", int8_model, "--pass", "int8", "--calib", CALIB, "-o", out), "already quantized", out
    )


def test_nothing_to_quantize(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["y"])],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])],
    )
    src, out = tmp_path / "relu.onnx", tmp_path / "o.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    _assert_error(ncc("compile", src, "--pass", "int8", "--calib", CALIB, "-o", out), "nothing to", out)


def test_unsupported_op_type(tmp_path):
    out = tmp_path / "o.onnx"
    _assert_error(
        ncc("compile", MODEL, "--pass", "int8", "--calib", CALIB, "--op-types", "Conv,Erf", "-o", out),
        "'Erf'",
        out,
    )


def _int8_model_via_api(spec: str):
    model = load_onnx(MODEL)
    ctx = PassContext()
    ctx.data["calibration_data"] = load_calibration_data(str(CALIB))
    ctx.data["progress"] = False
    report = PassManager(spec).run(model, ctx)
    return model, ctx, report


def _serialized(model) -> bytes:
    import onnx_ir as ir

    return ir.serde.serialize_model(model).SerializeToString(deterministic=True)


def _channel_mean(arrays: list[np.ndarray], axis: int) -> np.ndarray:
    """Mean per channel (``axis``) over every other axis and every batch, accumulated in float64."""
    total, count = 0.0, 0
    for a in arrays:
        ax = axis % a.ndim
        others = tuple(d for d in range(a.ndim) if d != ax)
        total = total + a.sum(axis=others, dtype=np.float64)
        count += a.size // a.shape[ax]
    return total / count


def _layer_mean_errors(model, ctx) -> dict[str, float]:
    """Per quantized Conv: mean over channels of |E[float twin - quantized]| (the bias error)."""
    from ncc.passes.quant import correct_bias, fallback

    probe, pairs = correct_bias._probe(model)
    feeds = fallback.samples(ctx.data["calibration_data"], 64)
    results = fallback.run(probe, feeds, [n for p in pairs for n in p[2:]])
    return {
        node.name: float(
            np.abs(_channel_mean(results[local], 1) - _channel_mean(results[observed], 1)).mean()
        )
        for node, _, local, observed in pairs
        if node.op_type == "Conv"
    }


def _relink_float_weights(model, source) -> None:
    """Give ``model``'s quantized nodes the links to their float weights that ``source``'s nodes have."""
    from ncc.ir.ids import ID_KEY
    from ncc.passes.quant.insert_qdq import FLOAT_BIAS, FLOAT_WEIGHT

    links = {n.metadata_props.get(ID_KEY): n.metadata_props for n in source.graph}
    for node in model.graph:
        for key in (FLOAT_WEIGHT, FLOAT_BIAS):
            if key in links.get(node.metadata_props.get(ID_KEY), {}):
                node.metadata_props[key] = links[node.metadata_props[ID_KEY]][key]


def test_correct_bias_shrinks_each_layers_mean_error():
    base = "fuse-conv-bn,fuse-activation,calibrate,insert-qdq"
    plain, plain_ctx, _ = _int8_model_via_api(base)
    corrected, corrected_ctx, report = _int8_model_via_api(base + ",correct-bias")
    assert report.records[-1].stats["biases corrected"] == 5  # 3 Conv + 2 Gemm
    _relink_float_weights(corrected, plain)  # correct-bias dropped the links once it had used them
    before, after = _layer_mean_errors(plain, plain_ctx), _layer_mean_errors(corrected, corrected_ctx)
    assert set(before) == set(after) and len(before) == 3
    for name in before:
        assert after[name] < before[name], (name, before[name], after[name])


def test_correct_bias_compares_with_the_float_layer_whatever_shapes_are_known():
    """The float twins must run in float: onnxruntime's WeightBiasQuantization would give a float Conv
    reading a per-tensor DequantizeLinear int8 weights of its own, and the pass would correct toward them.
    Workarounds in the graph (a per-axis DequantizeLinear) need the channel count; the corrections must come
    out the same without any value shapes."""
    from ncc.passes.quant.correct_bias import CorrectBias, _int32_bias

    base = "fuse-conv-bn,fuse-activation,calibrate,insert-qdq"
    biases = []
    for strip in (False, True):
        model, ctx, _ = _int8_model_via_api(base)
        if strip:
            for node in model.graph:
                for value in node.outputs:
                    value.shape = None
        layers = [(n.name, _int32_bias(n)[0]) for n in model.graph if _int32_bias(n) is not None]
        CorrectBias().run(model, ctx)
        biases.append({name: value.const_value.numpy().copy() for name, value in layers})
    assert len(biases[0]) == 5 and biases[0].keys() == biases[1].keys()
    for name, corrected in biases[0].items():
        np.testing.assert_array_equal(biases[1][name], corrected, err_msg=name)


def test_min_cosine_keeps_sensitive_nodes_in_float():
    model, ctx, report = _int8_model_via_api(
        "fuse-conv-bn,fuse-activation,calibrate,insert-qdq{min-cosine=0.999999 max-float=0.5}"
    )
    record = report.records[-1]
    kept = [n.name for n in model.graph if "excluded" in n.metadata_props.get("ncc.quant.skip", "")]
    assert 1 <= len(kept) <= 2  # half of the 5 quantized compute nodes, rounded down
    assert any(note.startswith("fallback: all quantized") for note in record.notes)
    assert record.stats["output cosine (calibration)"] > 0.9999


def test_every_quantized_activation_has_a_histogram_range(tmp_path):
    # calibrate bins histograms only for the tensors the target's plan quantizes (plan.binned_values):
    # each QuantizeLinear insert-qdq makes reads one of them. A residual block's bias Add reads a
    # float-output MatMul: an island next to no integer kernel, never observed; nor are the MatMul outputs
    # (on x86 the integer MatMul writes float, and no reader quantizes them)
    rng = np.random.default_rng(0)
    w1, w2 = (
        numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), n) for n in ("w1", "w2")
    )
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
        helper.make_node("Add", ["hb", "x"], ["r"], name="residual"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [w1, w2, b],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "block.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 16)).astype(np.float32))
    for path, calib in ((tmp_path / "block.onnx", tmp_path / "calib.npz"), (MODEL, CALIB)):
        model = load_onnx(path)
        ctx = PassContext()
        ctx.data["calibration_data"] = load_calibration_data(str(calib))
        ctx.data["progress"] = False
        PassManager("fuse-conv-bn,fuse-activation").run(model, ctx)
        target = get_target("host")
        observed, binned = set(observed_values(model.graph, target)), binned_values(model.graph, target)
        PassManager("calibrate,insert-qdq").run(model, ctx)
        quantized = [n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear"]
        assert quantized and set(quantized) <= binned, path
        assert not observed - binned, path  # nothing observed for min/max alone in these two models
        assert not {"hb", "h", "y"} & observed


def test_min_cosine_compares_with_the_calibration_runs_float_outputs():
    # calibrate keeps the float model's outputs on the first 8 samples, and insert-qdq measures against
    # them instead of running the float model again: the same decisions as when it runs it itself
    spec = "fuse-conv-bn,fuse-activation,calibrate{reference-samples=%d},insert-qdq{min-cosine=0.999999 max-float=0.5}"
    kept_model, kept_ctx, kept = _int8_model_via_api(spec % 8)
    ran_model, ran_ctx, ran = _int8_model_via_api(spec % 0)
    reference = kept_ctx.data["float_reference"]
    assert reference.count == 8 and "float_reference" not in ran_ctx.data
    assert [a.shape for a in reference.outputs["logits"]] == [(8, 10)]
    assert kept.records[-1].notes == ran.records[-1].notes
    assert any("in float" in note for note in kept.records[-1].notes)
    assert _serialized(kept_model) == _serialized(ran_model)


def test_min_cosine_stops_when_fallbacks_gain_too_little():
    # each float node must close 99% of the gap to cosine 1: none does, so after `patience` misses
    # the fallback gives up and every compute node stays quantized
    model, _, report = _int8_model_via_api(
        "fuse-conv-bn,fuse-activation,calibrate,"
        "insert-qdq{min-cosine=0.999999 max-float=1.0 min-gain=0.99 patience=2}"
    )
    notes = report.records[-1].notes
    kept = [n.name for n in model.graph if "excluded" in n.metadata_props.get("ncc.quant.skip", "")]
    assert kept == []
    assert sum("stays quantized" in note for note in notes) == 2
    assert any(note.startswith("fallback: stopped after 2 fallbacks in a row") for note in notes)


def test_layers_kept_in_float_stay_float_in_onnxruntime(tmp_path):
    """onnxruntime's WeightBiasQuantization gives a float Conv reading a per-tensor DequantizeLinear int8
    weights; insert-qdq feeds such a layer through a per-axis DequantizeLinear, so --exclude (and
    min-cosine) really keep it float, and the report would name it if onnxruntime quantized it anyway."""
    out = tmp_path / "excluded.onnx"
    proc = ncc(
        "compile",
        MODEL,
        "--pass",
        "int8",
        "--calib",
        CALIB,
        "--exclude",
        "features.3/",
        "--cache-dir",
        tmp_path / "cache",
        "-o",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    assert "kept float: Conv x1: excluded by 'features.3/'" in proc.stderr
    assert "runs quantized although ncc kept it in float" not in proc.stderr
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    kernels = {n.name: n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert kernels["/features/features.3/Conv"] == "Conv"
    assert kernels["/features/features.0/Conv"] == "QLinearConv"


def test_the_fallback_never_returns_the_last_int8_node_to_float(tmp_path):
    """With every node allowed in float and a target int8 cannot reach, the fallback keeps the model's one
    quantized MatMul int8 (saying so) instead of failing with nothing left to quantize."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="only")],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [w],
    )
    src = tmp_path / "one.onnx"
    src.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(32, 16)).astype(np.float32))
    model = load_onnx(src)
    ctx = PassContext()
    ctx.data["calibration_data"] = load_calibration_data(str(tmp_path / "calib.npz"))
    ctx.data["progress"] = False
    report = PassManager("calibrate,insert-qdq{min-cosine=0.9999999 max-float=1}").run(model, ctx)
    only = next(n for n in model.graph if n.name == "only")
    assert only.metadata_props.get("ncc.quant") == "int8"
    assert any("only stays quantized: it is the last int8 node" in n for n in report.records[-1].notes)
