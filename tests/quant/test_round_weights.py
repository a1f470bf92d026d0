"""round-weights: the patches it measures are what the Conv multiplies, its rounding never worsens the
objective, stays within one grid step and keeps int16 pairs safe; and the pass lowers a real model's
output error (the digits CNN)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from ncc.frontends.onnx import load_onnx
from ncc.passes.base import PassContext
from ncc.passes.manager import PassManager
from ncc.passes.quant import round_weights as rw
from ncc.passes.quant.calib_data import load_calibration_data
from ncc.passes.quant.pairs import PAIR_LIMIT
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "examples" / "digits_cnn.onnx"
CALIB = REPO / "examples" / "digits_calib.npz"


def _conv_model(x_shape, w, **attrs) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "cin,cout,group,k,stride,pad,dilation",
    [
        (6, 6, 6, 3, 2, 1, 1),  # depthwise, strided
        (5, 5, 5, 5, 1, 2, 1),  # depthwise 5x5
        (4, 5, 1, 3, 1, 1, 2),  # dense 3x3, dilated
        (8, 3, 1, 1, 1, 0, 1),  # pointwise
    ],
)
def test_patches_are_what_the_conv_multiplies(cin, cout, group, k, stride, pad, dilation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, cin, 11, 9)).astype(np.float32)
    w = rng.standard_normal((cout, cin // group, k, k)).astype(np.float32)
    attrs = dict(group=group, strides=[stride] * 2, pads=[pad] * 4, dilations=[dilation] * 2)
    proto = _conv_model(x.shape, w, **attrs)
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    model = ir.serde.deserialize_model(proto)
    layer = rw._Layer(
        node=next(iter(model.graph)),
        value=model.graph.initializers["w"],
        codes=np.zeros((cout, w[0].size)),
        exact=None,
        restore=None,
        depthwise=group > 1,
        partner=None,
    )
    if group > 1:
        chunks = list(layer.depthwise_patches(x))
        patches = np.concatenate([columns for _, columns in chunks])
        assert [start for start, _ in chunks] == [0]
    else:
        patches = layer.patches(x)
    rows = w.reshape(cout, -1)
    got = np.einsum("ck,ckp->cp", rows, patches) if group > 1 else rows @ patches[0]
    np.testing.assert_allclose(got, y.reshape(cout, -1), atol=1e-4)

    # from u8 codes: windows sampled first (padding holds the zero point), then dequantized, are exactly
    # the windows of the dequantized input
    codes = rng.integers(0, 256, x.shape).astype(np.uint8)
    source = rw._Source("x", np.float32(0.05), 3)
    dequantized = (codes.astype(np.int32) - 3).astype(np.float32) * np.float32(0.05)
    for sampled, whole in zip(
        layer.windows(codes, chunked=True, fill=source.fill), layer.windows(dequantized, chunked=True)
    ):
        assert sampled[0] == whole[0]
        np.testing.assert_array_equal(source.dequantize(sampled[1]), whole[1])


def _problem(rows, cols, shared, seed=0):
    rng = np.random.default_rng(seed)
    mix = np.eye(cols) + 0.5 * rng.standard_normal((cols, cols)) / np.sqrt(cols)
    groups = 1 if shared else rows
    cov = np.stack([np.cov((rng.standard_normal((4 * cols, cols)) @ mix).T) for _ in range(groups)])
    exact = rng.uniform(-127, 127, (rows, cols))
    exact[:, 0] = 127  # the channel's largest weight sits on the grid's end
    return exact, np.clip(np.rint(exact), -127, 127), cov


def _objective(q, exact, cov):
    d = q - exact
    return np.einsum("ck,ckl,cl->c", d, np.broadcast_to(cov, (len(d), *cov.shape[1:])), d)


@pytest.mark.parametrize("shared", [True, False])
def test_rounding_lowers_every_rows_error_within_one_step(shared):
    exact, nearest, cov = _problem(40, 300 if shared else 25, shared)
    q, before, after = rw._round(exact, nearest, cov, sweeps=2)
    assert np.all(np.abs(q - exact) < 1) and np.abs(q).max() <= 127
    assert np.all(_objective(q, exact, cov) <= _objective(nearest, exact, cov) + 1e-9)
    assert after < 0.8 * before  # correlated inputs: a real gain, not a rounding of noise
    assert np.isclose(after, _objective(q, exact, cov).sum())


def test_blocked_updates_change_nothing(monkeypatch):
    exact, nearest, cov = _problem(30, 300, shared=True, seed=1)
    q_blocked, _, after = rw._round(exact, nearest, cov, sweeps=2)
    monkeypatch.setattr(rw, "BLOCK", 10_000)
    q_whole, _, after_whole = rw._round(exact, nearest, cov, sweeps=2)
    np.testing.assert_array_equal(q_blocked, q_whole)
    assert np.isclose(after, after_whole)


def test_int16_pairs_stay_within_the_limit():
    exact, _, cov = _problem(50, 64, shared=True, seed=2)
    exact *= 0.6  # pair-safe scales put weights below +-127
    nearest = np.rint(exact)
    partner = rw._adjacent_partner(64)
    a, b = nearest[:, 0::2], nearest[:, 1::2]
    safe = ~(((a * b) > 0) & (np.abs(a) + np.abs(b) > PAIR_LIMIT))
    nearest[:, 0::2] = np.where(safe, a, 0)  # a start every pair of which is within the limit
    q, _, _ = rw._round(exact, nearest, cov, sweeps=2, partner=partner)
    a, b = q[:, 0::2], q[:, 1::2]
    assert not np.any((a * b > 0) & (np.abs(a) + np.abs(b) > PAIR_LIMIT))
    assert np.any(q != nearest)


def test_conv_partner_follows_the_gemm_k_order():
    # weight [M, C=3, 2, 2] flattened (c, kh, kw); onnxruntime's K is (kh, kw, c), channel fastest:
    # K = (p0c0, p0c1), (p0c2, p1c0), (p1c1, p1c2), ... with our column of (c, p) = 4c + p
    partner = rw._conv_partner((7, 3, 2, 2))
    assert partner[0] == 4 and partner[4] == 0  # p0c0 - p0c1
    assert partner[8] == 1 and partner[1] == 8  # p0c2 - p1c0
    assert partner[5] == 9  # p1c1 - p1c2
    assert sorted(partner) == list(range(12))


def test_pass_lowers_each_layers_output_error_on_the_digits_cnn():
    """Each quantized layer's own output error (quantized weights against float weights on the same
    dequantized input, as correct-bias measures it) has a smaller variance after round-weights."""
    from ncc.passes.quant import correct_bias, fallback

    base = "fuse-conv-bn,fuse-activation,calibrate,insert-qdq"

    def layer_errors(spec):
        model, ctx = load_onnx(MODEL), PassContext()
        ctx.data["calibration_data"] = load_calibration_data(str(CALIB))
        ctx.data["progress"] = False
        report = PassManager(spec).run(model, ctx)
        probe, pairs = correct_bias._probe(model, requantized=False)
        feeds = fallback.samples(ctx.data["calibration_data"], 64)
        results = fallback.run(probe, feeds, [n for p in pairs for n in p[2:]])
        errors = {}
        for node, _, local, observed in pairs:
            diff = np.concatenate([a - b for a, b in zip(results[local], results[observed])])
            axis = 1 if diff.ndim > 2 else -1
            centered = diff - diff.mean(
                axis=tuple(d for d in range(diff.ndim) if d != axis % diff.ndim), keepdims=True
            )
            errors[node.name] = float(np.mean(centered**2))
        return errors, report

    before, _ = layer_errors(base)
    after, report = layer_errors(base + ",round-weights")
    assert report.records[-1].stats["weights re-rounded"] > 0
    assert set(before) == set(after) and len(before) == 5  # 3 Conv + 2 Gemm
    # measured: every layer 1.6-7.7x lower, in all 4x
    assert all(after[name] < before[name] for name in before), (before, after)
    assert sum(after.values()) < 0.5 * sum(before.values()), (before, after)


@pytest.mark.parametrize("paired", [False, True])
def test_low_rank_rounding_matches_the_covariance_form(paired):
    # a Gemm after a global pool sees one patch per sample, far fewer than its K: rounding from the
    # patches (O(n) per weight) must make the choices the K x K covariance makes
    rng = np.random.default_rng(3)
    n, k, rows = 12, 160, 40
    patches = (rng.standard_normal((n, k)) * rng.uniform(0.1, 2, k)).astype(np.float32)
    moments = rw._Moments(1, k)
    moments.add(patches.T[None])
    assert moments.patches() is not None and moments.patches().shape == (n, k)
    exact = rng.uniform(-60, 60, (rows, k))
    nearest = np.rint(exact)
    partner = rw._adjacent_partner(k) if paired else None
    dense, d0, d1 = rw._round(exact, nearest, moments.covariance(0.1), 2, partner)
    low, l0, l1 = rw._round_low_rank(exact, nearest, moments.patches(), 0.1, 2, partner)
    np.testing.assert_array_equal(low, dense)
    assert np.isclose(l0, d0, rtol=1e-6) and np.isclose(l1, d1, rtol=1e-6)  # float32 products in the moments
    assert l1 < 0.5 * l0  # the rounding does lower the objective
    many = rw._Moments(1, k)
    many.add(np.tile(patches.T[None], (1, 1, 4)))  # 48 patches > K / 8: the covariance form
    assert many.patches() is None
