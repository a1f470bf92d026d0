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


def attention(tmp_path: Path, *, dead_heads: tuple[int, ...] = ()) -> Path:
    """One self-attention block, 4 heads of 8 over a width of 32, as exporters write it: Q/K/V MatMul + bias,
    Reshape to [B, S, 4, 8] (an explicit head count), Transpose, scores, Softmax, context, Reshape back
    to [B, S, 32] and the output projection; ``dead_heads`` have zero Q, K and V columns and biases."""
    rng = np.random.default_rng(4)
    d, heads, size = 32, 4, 8
    inits = {f"w{k}": rng.normal(size=(d, d)).astype(np.float32) / 4 for k in "qkvo"}
    inits.update({f"b{k}": rng.normal(size=d).astype(np.float32) for k in "qkvo"})
    for h in dead_heads:
        for k in "qkv":
            inits[f"w{k}"][:, h * size : (h + 1) * size] = 0
            inits[f"b{k}"][h * size : (h + 1) * size] = 0
    inits["split"] = np.array([0, 0, heads, size], np.int64)
    inits["merge"] = np.array([0, 0, d], np.int64)
    inits["scale"] = np.array(size**-0.5, np.float32)
    nodes = []
    for k in "qkv":
        nodes += [
            helper.make_node("MatMul", ["x", f"w{k}"], [f"{k}0"], name=f"{k}_proj"),
            helper.make_node("Add", [f"{k}0", f"b{k}"], [f"{k}1"], name=f"{k}_bias"),
            helper.make_node("Reshape", [f"{k}1", "split"], [f"{k}2"], name=f"{k}_split"),
        ]
    nodes += [
        helper.make_node("Transpose", ["q2"], ["q3"], perm=[0, 2, 1, 3], name="q_t"),
        helper.make_node("Transpose", ["k2"], ["k3"], perm=[0, 2, 3, 1], name="k_t"),
        helper.make_node("Transpose", ["v2"], ["v3"], perm=[0, 2, 1, 3], name="v_t"),
        helper.make_node("MatMul", ["q3", "k3"], ["s0"], name="scores"),
        helper.make_node("Mul", ["s0", "scale"], ["s1"], name="scaled"),
        helper.make_node("Softmax", ["s1"], ["p"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["p", "v3"], ["c0"], name="context"),
        helper.make_node("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3], name="c_t"),
        helper.make_node("Reshape", ["c1", "merge"], ["c2"], name="merge_heads"),
        helper.make_node("MatMul", ["c2", "wo"], ["o0"], name="out_proj"),
        helper.make_node("Add", ["o0", "bo"], ["o1"], name="out_bias"),
        helper.make_node("Add", ["o1", "x"], ["y"], name="residual"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6, d])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6, d])
    return _save(tmp_path, nodes, inits, [x], [y], name="attn.onnx")


def attention_inputs(n: int = 4, seed: int = 6) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(n, 6, 32)).astype(np.float32)}


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


def test_slim_removes_zero_heads_and_rewrites_the_head_count(tmp_path):
    src = attention(tmp_path, dead_heads=(1, 3))
    out = tmp_path / "s.onnx"
    proc = ncc("compile", src, "--passes", "slim,dce", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "head group q_proj: 4 -> 2 units" in proc.stderr
    w = weights(out)
    assert w["wq"].shape == (32, 16) and w["wv"].shape == (32, 16) and w["wo"].shape == (16, 32)
    split = [a for k, a in w.items() if a.dtype == np.int64 and a.size == 4]
    assert split and all(list(a) == [0, 0, 2, 8] for a in split)  # the explicit head count follows
    merge = [a for k, a in w.items() if a.dtype == np.int64 and a.size == 3]
    assert merge and all(list(a) == [0, 0, 16] for a in merge)
    np.testing.assert_allclose(
        run(out, attention_inputs()), run(src, attention_inputs()), rtol=1e-5, atol=1e-5
    )


def test_head_pruning_refits_the_output_projection(tmp_path):
    src = attention(tmp_path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, **attention_inputs(64, seed=7))
    out, plain = tmp_path / "h.onnx", tmp_path / "n.onnx"
    flags = ("--pattern", "head", "--sparsity", "0.25", "--calib", calib)
    proc = ncc("compile", src, "--pass", "sparse", *flags, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert weights(out)["wo"].shape == (24, 32)
    assert "parameters:" in proc.stderr and "multiply-adds per sample" in proc.stderr
    spec = "prune{pattern=head sparsity=0.25 refit=false},slim,dce"
    assert ncc("compile", src, "--passes", spec, "--calib", calib, "-o", plain).returncode == 0
    test = attention_inputs(16, seed=8)
    ref = run(src, test)
    err = [np.linalg.norm(run(p, test) - ref) / np.linalg.norm(ref) for p in (out, plain)]
    assert err[0] < err[1], err


def test_kept_channels_round_to_a_multiple(tmp_path):
    src = ffn(tmp_path, hidden=64)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(5).normal(size=(32, 4, 8)).astype(np.float32))
    for multiple, kept in ((16, 48), (1, 45)):  # 30% of 64 is 19.2: 45 kept, or 48 as a multiple of 16
        out = tmp_path / f"m{multiple}.onnx"
        spec = f"prune{{pattern=neuron sparsity=0.3 multiple={multiple}}},slim,dce"
        proc = ncc("compile", src, "--passes", spec, "--calib", calib, "-o", out)
        assert proc.returncode == 0, proc.stderr
        assert weights(out)["w1"].shape == (8, kept)


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
    feeds = realmodels.minilm_inputs(
        160
    )  # about 6,000 real tokens: more rows than a 1536-wide refit has unknowns
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{k: v[:128] for k, v in feeds.items()})
    out = tmp_path / "small.onnx"
    flags = ("--pass", "sparse", "--pattern", "neuron,head", "--sparsity", "0.5,0.3333", "--calib", calib)
    flags += ("--calib-samples", "128")
    proc = ncc("compile", src, *flags, "-o", out)
    assert proc.returncode == 0, proc.stderr
    w = onnx.load(out)
    shapes = {numpy_helper.to_array(t).shape for t in w.graph.initializer}
    assert (384, 768) in shapes and (768, 384) in shapes  # FFN halved
    assert (384, 256) in shapes and (256, 384) in shapes  # 8 of 12 heads left
    test = {k: v[128:] for k, v in feeds.items()}  # sentences the refit did not see
    ref, got = run(src, test), run(out, test)
    m = test["attention_mask"][..., None]
    a, b = (ref * m).sum(1), (got * m).sum(1)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() > 0.8, cos
