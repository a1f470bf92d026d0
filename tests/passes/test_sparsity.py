"""prune and slim through the CLI: exact patterns, lossless slimming, refusals with reasons, numerics in
onnxruntime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "digits_cnn.onnx"
DIGITS = REPO / "examples" / "digits_calib.npz"


def ncc(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", *map(str, args)], capture_output=True, text=True
    )


def run(path: Path, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def _save(tmp_path: Path, nodes, inits, inputs, outputs, name="m.onnx") -> Path:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / name
    onnx.save(model, path)
    return path


def ffn(tmp_path: Path, *, dead: tuple[int, ...] = (), norm: bool = False, hidden: int = 16) -> Path:
    """x[B,S,8] -> MatMul(8x16) + b -> Relu -> MatMul(16x8) + b (-> LayerNorm): an FFN; ``dead`` neurons have
    zero weights and bias."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, hidden)).astype(np.float32)
    b1 = rng.normal(size=hidden).astype(np.float32)
    w1[:, list(dead)] = 0
    b1[list(dead)] = 0
    inits = {
        "w1": w1,
        "b1": b1,
        "w2": rng.normal(size=(hidden, 8)).astype(np.float32),
        "b2": rng.normal(size=8).astype(np.float32),
        "g": np.ones(8, np.float32),
        "beta": np.zeros(8, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "b2"], ["y" if not norm else "ob"], name="fc2_bias"),
    ]
    if norm:  # the FFN's output units go into a LayerNorm: fc2's outputs cannot be slimmed
        nodes.append(helper.make_node("LayerNormalization", ["ob", "g", "beta"], ["y"], name="ln", axis=-1))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8])
    return _save(tmp_path, nodes, inits, [x], [y])


def cnn(tmp_path: Path, *, dead: tuple[int, ...] = ()) -> Path:
    """Conv(3->8) + BN -> Relu -> depthwise Conv(8) -> Clip(0,6) -> Conv 1x1 (8->4) -> GlobalAveragePool ->
    Flatten -> Gemm(4->3); ``dead`` channels of the first conv zero (weight, and BN scale and bias)."""
    rng = np.random.default_rng(1)
    inits = {
        "wc": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "bias": rng.normal(size=8).astype(np.float32),
        "mean": rng.normal(size=8).astype(np.float32) * 0.1,
        "var": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "wd": rng.normal(size=(8, 1, 3, 3)).astype(np.float32),
        "bd": rng.normal(size=8).astype(np.float32),
        "wp": rng.normal(size=(4, 8, 1, 1)).astype(np.float32),
        "wg": rng.normal(size=(3, 4)).astype(np.float32),
        "lo": np.array(0, np.float32),
        "hi": np.array(6, np.float32),
    }
    for c in dead:
        inits["wc"][c] = 0
        inits["wd"][c] = 0
        inits["bd"][c] = 0
        inits["scale"][c] = 0
        inits["bias"][c] = 0
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wd", "bd"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["d", "lo", "hi"], ["dc"], name="relu6"),
        helper.make_node("Conv", ["dc", "wp"], ["p"], name="project"),
        helper.make_node("GlobalAveragePool", ["p"], ["gp"], name="gap"),
        helper.make_node("Flatten", ["gp"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wg"], ["y"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    return _save(tmp_path, nodes, inits, [x], [y])


def tokens(n: int = 5) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(2).normal(size=(n, 4, 8)).astype(np.float32)}


def images(n: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(3).normal(size=(n, 3, 8, 8)).astype(np.float32)}


# -- element patterns ------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["2:4", "1:2", "4x1", "2x1", "unstructured"])
def test_element_patterns_are_exact(tmp_path, pattern):
    src = ffn(tmp_path)
    out = tmp_path / "p.onnx"
    proc = ncc("compile", src, "--pass", "sparse", "--pattern", pattern, "--sparsity", "0.75", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "zeros in dense weights run at dense speed" in proc.stderr
    for name in ("w1", "w2"):
        view = weights(out)[name].T  # [outputs, inputs]
        nonzero = view != 0
        if ":" in pattern:
            n, m = map(int, pattern.split(":"))
            groups = nonzero.reshape(view.shape[0], -1, m).sum(-1)
            assert (groups == n).all(), groups
        else:
            r, c = (1, 1) if pattern == "unstructured" else map(int, pattern.split("x"))
            blocks = nonzero.reshape(view.shape[0] // r, r, -1, c).sum(axis=(1, 3))
            assert set(np.unique(blocks)) <= {0, r * c}
            assert (blocks == 0).mean() == pytest.approx(0.75, abs=1 / blocks.size)
    assert run(out, tokens()).shape == (5, 4, 8)


def test_activation_criterion_uses_calibration(tmp_path):
    src = ffn(tmp_path)
    calib = tmp_path / "calib.npz"
    x = tokens(16)["x"]
    x[..., 3] *= 50  # a loud input feature: its weights survive under 'activation', not under 'magnitude'
    np.savez(calib, x=x)
    out_a, out_m = tmp_path / "a.onnx", tmp_path / "mag.onnx"
    common = ("--pass", "sparse", "--pattern", "unstructured", "--sparsity", "0.9")
    assert ncc("compile", src, *common, "--calib", calib, "-o", out_a).returncode == 0
    proc = ncc(
        "compile",
        src,
        "--passes",
        "prune{pattern=unstructured sparsity=0.9 criterion=magnitude}",
        "-o",
        out_m,
    )
    assert proc.returncode == 0, proc.stderr
    kept_a = (weights(out_a)["w1"][3] != 0).sum()
    kept_m = (weights(out_m)["w1"][3] != 0).sum()
    assert kept_a > kept_m


# -- slim ------------------------------------------------------------------------------------------


def test_slim_removes_zero_neurons_and_keeps_outputs(tmp_path):
    src = ffn(tmp_path, dead=(1, 4, 5, 9))
    out = tmp_path / "s.onnx"
    proc = ncc("compile", src, "--passes", "slim,dce", "-o", out)
    assert proc.returncode == 0, proc.stderr
    w = weights(out)
    assert w["w1"].shape == (8, 12) and w["w2"].shape == (12, 8) and w["b1"].shape == (12,)
    np.testing.assert_allclose(run(out, tokens()), run(src, tokens()), rtol=1e-5, atol=1e-5)


def test_slim_cnn_through_bn_depthwise_pool_flatten(tmp_path):
    src = cnn(tmp_path, dead=(0, 3, 6))
    out = tmp_path / "s.onnx"
    proc = ncc("compile", src, "--passes", "slim,dce", "-o", out)
    assert proc.returncode == 0, proc.stderr
    w = weights(out)
    assert w["wc"].shape == (5, 3, 3, 3) and w["wd"].shape == (5, 1, 3, 3) and w["wp"].shape == (4, 5, 1, 1)
    dw = next(n for n in onnx.load(out).graph.node if n.name == "dw")
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 5
    np.testing.assert_allclose(run(out, images()), run(src, images()), rtol=1e-4, atol=1e-4)


def test_slim_changes_nothing_without_zero_units(tmp_path):
    src = cnn(tmp_path)
    out = tmp_path / "s.onnx"
    assert ncc("compile", src, "--passes", "slim", "-o", out).returncode == 0
    assert {k: v.shape for k, v in weights(out).items()} == {k: v.shape for k, v in weights(src).items()}


def test_slim_names_what_blocks_it(tmp_path):
    src = ffn(tmp_path, norm=True)
    w2 = weights(src)["w2"]
    model = onnx.load(src)
    for init in model.graph.initializer:  # fc2's output unit 2 is zero, but a LayerNorm reads the units
        if init.name in ("w2", "b2"):
            array = numpy_helper.to_array(init).copy()
            array[..., 2] = 0
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, src)
    proc = ncc("compile", src, "--passes", "slim", "-o", tmp_path / "s.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "kept 1 zero units of fc2" in proc.stderr and "LayerNormalization ln" in proc.stderr
    assert weights(tmp_path / "s.onnx")["w2"].shape == w2.shape


# -- structured pruning ----------------------------------------------------------------------------


def test_neuron_pruning_with_refit_is_smaller_and_close(tmp_path):
    src = ffn(tmp_path, hidden=32)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(5).normal(size=(64, 4, 8)).astype(np.float32))
    out, plain = tmp_path / "r.onnx", tmp_path / "n.onnx"
    flags = ("--pass", "sparse", "--pattern", "neuron", "--sparsity", "0.25", "--calib", calib)
    proc = ncc("compile", src, *flags, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "slim: neuron group fc1: 32 -> 24 units" in proc.stderr
    assert weights(out)["w1"].shape == (8, 24)
    spec = "prune{pattern=neuron sparsity=0.25 refit=false},slim,dce"
    assert ncc("compile", src, "--passes", spec, "--calib", calib, "-o", plain).returncode == 0
    ref = run(src, tokens(32))
    err = [np.linalg.norm(run(p, tokens(32)) - ref) / np.linalg.norm(ref) for p in (out, plain)]
    assert err[0] < err[1]  # the refit beats zeroing alone on held-out inputs


def test_channel_pruning_on_digits_example(tmp_path):
    out = tmp_path / "d.onnx"
    proc = ncc(
        "compile",
        EXAMPLE,
        "--pass",
        "sparse",
        "--pattern",
        "channel",
        "--sparsity",
        "0.25",
        "--calib",
        DIGITS,
        "-o",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    assert "slim: channel group" in proc.stderr
    before, after = onnx.load(EXAMPLE), onnx.load(out)
    size = lambda m: sum(numpy_helper.to_array(t).size for t in m.graph.initializer)  # noqa: E731
    assert size(after) < 0.9 * size(before)
    x = np.load(DIGITS)["image"][:64]
    name = before.graph.input[0].name
    agree = (run(out, {name: x}).argmax(1) == run(EXAMPLE, {name: x}).argmax(1)).mean()
    assert agree >= 0.8, agree


def test_sparse_then_int8(tmp_path):
    out = tmp_path / "q.onnx"
    proc = ncc(
        "compile", EXAMPLE, "--passes", "sparse,int8", "--pattern", "channel", "--sparsity", "0.25",
        "--calib", DIGITS, "-o", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_prune_is_deterministic(tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"d{i}.onnx"
        flags = ("--pass", "sparse", "--pattern", "channel", "--sparsity", "0.25", "--calib", DIGITS)
        assert ncc("compile", EXAMPLE, *flags, "-o", out).returncode == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


# -- what users get wrong --------------------------------------------------------------------------


def _user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_bad_pruning_options(tmp_path):
    src = ffn(tmp_path)
    out = tmp_path / "o.onnx"
    _user_error(ncc("compile", src, "--pass", "sparse", "--pattern", "3:2", "-o", out), "not a pattern")
    _user_error(ncc("compile", src, "--pass", "sparse", "--sparsity", "1.5", "-o", out), "sparsity must be")
    _user_error(
        ncc("compile", src, "--pass", "sparse", "--sparsity", "half", "-o", out), "--sparsity takes numbers"
    )
    _user_error(ncc("compile", src, "--pass", "int8", "--pattern", "2:4", "-o", out), "one prune pass")
    _user_error(
        ncc(
            "compile",
            src,
            "--pass",
            "sparse",
            "--pattern",
            "neuron,head",
            "--sparsity",
            "0.1,0.2,0.3",
            "-o",
            out,
        ),
        "3 values for 2 patterns",
    )
    _user_error(
        ncc("compile", src, "--passes", "prune{criterion=snip-momentum}", "-o", out), "ncc.torch.train"
    )
    _user_error(
        ncc("compile", src, "--passes", "prune{criterion=activation}", "-o", out), "needs calibration data"
    )
    _user_error(ncc("compile", src, "--passes", "slim{refit=true}", "-o", out), "needs calibration data")
    assert not out.exists()


def test_pattern_that_does_not_tile_a_layer(tmp_path):
    src = ffn(tmp_path)
    proc = ncc("compile", src, "--pass", "sparse", "--pattern", "3x1", "-o", tmp_path / "o.onnx")
    _user_error(proc, "pattern 3x1 does not fit fc1", "3x1 blocks")


@pytest.mark.slow
def test_minilm_heads_and_neurons(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    import realmodels

    src = realmodels.minilm_onnx("legacy")
    feeds = realmodels.minilm_inputs(16)
    calib = tmp_path / "calib.npz"
    np.savez(calib, **feeds)
    out = tmp_path / "small.onnx"
    flags = ("--pass", "sparse", "--pattern", "neuron,head", "--sparsity", "0.5,0.3333", "--calib", calib)
    proc = ncc("compile", src, *flags, "-o", out)
    assert proc.returncode == 0, proc.stderr
    w = onnx.load(out)
    shapes = {numpy_helper.to_array(t).shape for t in w.graph.initializer}
    assert (384, 768) in shapes and (768, 384) in shapes  # FFN halved
    assert (384, 256) in shapes and (256, 384) in shapes  # 8 of 12 heads left
    test = realmodels.minilm_inputs(8)
    ref, got = run(src, test), run(out, test)
    m = test["attention_mask"][..., None]
    a, b = (ref * m).sum(1), (got * m).sum(1)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() > 0.8, cos
