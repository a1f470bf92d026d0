"""Pair-safe int8 weights: onnxruntime's integer kernels give exact sums with them, on this CPU.

On x86 without VNNI onnxruntime adds u8 x s8 products in saturating int16 pairs along K. The K
orders in :mod:`ncc.passes.quant.pairs` were measured; these tests check them on whatever CPU
runs the suite, with the activations that stress them most (0 and 255 only), against exact int64
sums. Where the kernels do not pair (VNNI) the sums are exact anyway.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import Attrs
from ncc.passes.quant.pairs import PAIR_LIMIT, ConvPairs, fit_pairs, node_pairs, symmetric_int8
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def _session(nodes, inputs, outputs, inits, microsoft=False):
    opsets = [h.make_opsetid("", 17)] + ([h.make_opsetid("com.microsoft", 1)] if microsoft else [])
    model = h.make_model(h.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _heavy_tailed(rng, shape):
    """Weights like a trained layer's: mostly small, a few large of either sign (Student t, 3 dof)."""
    return rng.standard_t(3, size=shape).astype(np.float32)


def _paired_int8(op_type, w, attrs, channel_axis):
    """Per-channel s8 weights as insert-qdq and quantize-dynamic make them on a pairing target."""
    return symmetric_int8(w, channel_axis, pairs=node_pairs(op_type, w.shape, attrs))[0]


def _extremes(rng, shape):
    return rng.choice(np.array([0, 255], np.uint8), size=shape)


def test_fit_pairs_moves_only_overflowing_pairs_to_the_limit():
    rng = np.random.default_rng(0)
    exact = rng.uniform(-127, 127, size=(64, 9))
    q = np.rint(exact).astype(np.int8)
    fitted = fit_pairs(q, exact, 0).astype(np.int32)
    a, b = fitted[0::2], fitted[1::2]
    assert (np.maximum(a, 0) + np.maximum(b, 0)).max() <= PAIR_LIMIT
    assert (np.minimum(a, 0) + np.minimum(b, 0)).min() >= -PAIR_LIMIT
    qa, qb = q[0::2].astype(np.int32), q[1::2].astype(np.int32)
    safe = (np.maximum(qa, 0) + np.maximum(qb, 0) <= PAIR_LIMIT) & (
        np.minimum(qa, 0) + np.minimum(qb, 0) >= -PAIR_LIMIT
    )
    assert safe.mean() < 0.9  # the data has overflowing pairs to move
    np.testing.assert_array_equal(a[safe], qa[safe])
    np.testing.assert_array_equal(b[safe], qb[safe])
    moved = ~safe  # on the limit line, as close to the exact values as it allows
    assert np.all(np.abs(a[moved]) + np.abs(b[moved]) == PAIR_LIMIT)
    ea, eb = exact[0::2][moved], exact[1::2][moved]
    shift = np.abs((np.abs(ea) - np.abs(a[moved])) - (np.abs(eb) - np.abs(b[moved])))
    assert shift.max() <= 1.0 + 1e-9  # the excess is split evenly, up to rounding


@pytest.mark.parametrize("m,k,n", [(1, 384, 1536), (128, 384, 384), (64, 1536, 384), (7, 67, 5)])
def test_matmul_kernels_exact_with_paired_weights(m, k, n):
    rng = np.random.default_rng(k)
    wq = _paired_int8("MatMul", _heavy_tailed(rng, (k, n)), Attrs(), 1)
    a = _extremes(rng, (m, k))
    exact = a.astype(np.int64) @ wq.astype(np.int64)
    integer = _session(
        [h.make_node("MatMulInteger", ["a", "w"], ["y"])],
        [h.make_tensor_value_info("a", T.UINT8, [m, k])],
        [h.make_tensor_value_info("y", T.INT32, [m, n])],
        [nh.from_array(wq, "w")],
    )
    np.testing.assert_array_equal(integer.run(None, {"a": a})[0], exact)
    to_float = _session(
        [h.make_node("MatMulIntegerToFloat", ["a", "w", "sa", "sw"], ["y"], domain="com.microsoft")],
        [h.make_tensor_value_info("a", T.UINT8, [m, k])],
        [h.make_tensor_value_info("y", T.FLOAT, [m, n])],
        [
            nh.from_array(wq, "w"),
            nh.from_array(np.array(1.0, np.float32), "sa"),
            nh.from_array(np.ones(n, np.float32), "sw"),
        ],
        microsoft=True,
    )
    np.testing.assert_array_equal(to_float.run(None, {"a": a})[0], exact.astype(np.float32))


def _k_index(c, kh, kw, channels):
    """Where weight (c, kh, kw) of a 3x3 filter sits in the K order pairs.py assumes: (kh, kw, c)."""
    return (kh * 3 + kw) * channels + c


@pytest.mark.parametrize(
    "c,group,m",
    [(3, 1, 2), (5, 1, 2), (8, 2, 4), (8, 8, 8), (8, 8, 16)],
    ids=["rgb", "odd", "grouped", "depthwise", "depthwise-multiplier-2"],
)
def test_qlinearconv_pairs_are_the_k_pairs_assumed(c, group, m):
    # two weights of 127 against activations of 255: 2 * 255 * 127 overflows int16 exactly when the
    # kernel pairs them. Which pairs do overflow must be the K pairs pairs.py keeps safe (none where
    # the kernel does not pair: VNNI, or a depthwise conv with one output channel per group).
    cg = c // group
    x = np.full((1, c, 5, 5), 255, np.uint8)
    inits = [
        nh.from_array(np.array(1.0, np.float32), "xs"),
        nh.from_array(np.array(0, np.uint8), "xz"),
        nh.from_array(np.array(1.0, np.float32), "ws"),
        nh.from_array(np.array(0, np.int8), "wz"),
        nh.from_array(np.array(256.0, np.float32), "ys"),
        nh.from_array(np.array(0, np.uint8), "yz"),
    ]
    positions = [(ch, i, j) for ch in range(cg) for i in range(3) for j in range(3)]
    overflowing, assumed = set(), set()
    for first in range(len(positions)):
        for second in range(first + 1, len(positions)):
            p, q = positions[first], positions[second]
            w = np.zeros((m, cg, 3, 3), np.int8)
            w[(0, *p)] = w[(0, *q)] = 127
            conv = _session(
                [
                    h.make_node(
                        "QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], group=group
                    )
                ],
                [h.make_tensor_value_info("x", T.UINT8, [1, c, 5, 5])],
                [h.make_tensor_value_info("y", T.UINT8, None)],
                [*inits, nh.from_array(w, "w")],
            )
            if int(conv.run(None, {"x": x})[0][0, 0, 1, 1]) != round(2 * 255 * 127 / 256):
                overflowing.add((p, q))
            ka, kb = _k_index(*p, cg), _k_index(*q, cg)
            if min(ka, kb) % 2 == 0 and abs(ka - kb) == 1 and not (cg == 1 and m == group > 1):
                assumed.add((p, q))
            safe = ConvPairs(group).fit(w, w.astype(np.float64))
            assert np.array_equal(safe, w) == ((p, q) not in assumed)  # the assumed pairs are the ones fixed
    assert overflowing <= assumed
    if overflowing:  # a pairing CPU: every assumed pair does overflow
        assert overflowing == assumed


@pytest.mark.parametrize("host", ["x86-avx2", "x86-vnni"])
def test_onednn_targets_pair_where_the_compiling_cpu_has_no_vnni(monkeypatch, host):
    from ncc import targets

    monkeypatch.setattr(targets, "host_target", lambda: host)
    for name in ("inductor", "aoti", "tf"):
        assert targets.get_target(name).pairwise_int16 == (host == "x86-avx2"), name
    assert not targets.get_target("x86-vnni").pairwise_int16  # a named onnxruntime profile stays as named
    assert targets.get_target("host").name == host


def test_onednn_pairs_odd_channel_counts_not_at_all():
    """oneDNN pads each tap's channels, onnxruntime flattens the taps: with an odd count per group the pairs
    differ, and the weights (read by both: ncc measures in onnxruntime) keep ±63."""
    assert node_pairs("Conv", (16, 3, 3, 3), Attrs(), "onednn") is None
    assert node_pairs("Conv", (16, 3, 3, 3), Attrs(), "onnxruntime") == ConvPairs(1)
    assert node_pairs("Conv", (16, 8, 3, 3), Attrs(), "onednn") == ConvPairs(1)
    assert node_pairs("Conv", (8, 1, 3, 3), Attrs(group=8), "onednn") == ConvPairs(8)  # depthwise: unpaired
    assert node_pairs("Conv", (8, 3, 3, 3), Attrs(group=2), "onednn") is None
    assert node_pairs("Relu", (4, 4), Attrs()) is None


def test_tf_keeps_7_bit_weights_for_a_convolution_reading_s8_where_onednn_halves_them(monkeypatch, tmp_path):
    """On a CPU without VNNI oneDNN's s8-input convolutions halve the weights (the TF backend stores ±63
    doubled); a convolution reading u8 (after a Relu) keeps full-range pair-safe weights."""
    from ncc import targets
    from ncc.frontends.onnx import load_onnx
    from ncc.ir.rewrite import constant_array
    from ncc.passes.base import PassContext
    from ncc.passes.manager import PassManager
    from ncc.passes.quant.calib_data import load_calibration_data

    monkeypatch.setattr(targets, "host_target", lambda: "x86-avx2")
    rng = np.random.default_rng(0)
    weights = {"w1": _heavy_tailed(rng, (8, 4, 3, 3)) * 0.1, "w2": _heavy_tailed(rng, (8, 8, 3, 3)) * 0.1}
    graph = h.make_graph(
        [
            h.make_node("Conv", ["x", "w1"], ["c1"], name="signed_in", pads=[1, 1, 1, 1]),
            h.make_node("Relu", ["c1"], ["r1"], name="relu"),
            h.make_node("Conv", ["r1", "w2"], ["y"], name="unsigned_in", pads=[1, 1, 1, 1]),
        ],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 6, 6])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 8, 6, 6])],
        [nh.from_array(w, name) for name, w in weights.items()],
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((8, 4, 6, 6)).astype(np.float32))
    model = load_onnx(tmp_path / "m.onnx")
    ctx = PassContext()
    ctx.data["calibration_data"] = load_calibration_data(str(tmp_path / "calib.npz"))
    ctx.data["progress"] = False
    report = PassManager(
        "fuse-activation,calibrate{target=tf scheme=scaled},insert-qdq{target=tf scheme=scaled}"
    ).run(model, ctx)
    codes = {
        name: np.abs(constant_array(model.graph.initializers[f"{name}_quantized"])).max() for name in weights
    }
    assert codes["w1"] <= 63 < codes["w2"], codes
    assert any("tf on a CPU without VNNI" in note for note in report.notes), report.notes


@pytest.mark.parametrize("safe", [False, True])
def test_measurements_compute_full_range_weights_exactly_on_a_pairing_cpu(monkeypatch, tmp_path, safe):
    """Full-range weights are for kernels that do not pair (VNNI, TFLite's XNNPACK); on a CPU that pairs,
    onnxruntime's fused kernels would saturate them, so ncc's measurements (every pass that runs a quantized
    model, the report) run such a model with Q/DQ unfused and get the exact integer sums; pair-safe weights
    run fused as they are. Checked as if the CPU paired, on any CPU."""
    from ncc import targets
    from ncc.frontends.onnx import load_onnx
    from ncc.passes.quant import fallback
    from ncc.passes.quant.pairs import overflowing_layer

    monkeypatch.setattr(targets, "host_target", lambda: "x86-avx2")
    rng = np.random.default_rng(1)
    k, n = 64, 16
    w = _heavy_tailed(rng, (k, n))
    attrs = Attrs()
    if safe:
        wq = _paired_int8("MatMul", w, attrs, 1)
    else:  # a trained layer's weights at full range, with every channel's largest weight at ±127
        wq = symmetric_int8(w, 1)[0]
        wq[0:2] = np.where(wq[0:2] >= 0, 127, -127)  # two rows of one sign paired: 254 > PAIR_LIMIT
    graph = h.make_graph(
        [
            h.make_node("QuantizeLinear", ["x", "one", "zero"], ["xq"]),
            h.make_node("DequantizeLinear", ["xq", "one", "zero"], ["xd"]),
            h.make_node("DequantizeLinear", ["wq", "one"], ["wd"]),
            h.make_node("MatMul", ["xd", "wd"], ["y"], name="layer"),
        ],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, ["M", k])],
        [h.make_tensor_value_info("y", T.FLOAT, ["M", n])],
        [
            nh.from_array(np.array(1.0, np.float32), "one"),
            nh.from_array(np.array(0, np.uint8), "zero"),
            nh.from_array(wq, "wq"),
        ],
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "m.onnx")
    model = load_onnx(tmp_path / "m.onnx")
    layer = overflowing_layer(model)
    assert (layer is None) if safe else (layer is not None and layer.name == "layer")
    assert fallback.saturates_here(model) is layer
    a = _extremes(rng, (32, k))
    got = fallback.run(model, [{"x": a.astype(np.float32)}], ["y"])["y"][0]
    np.testing.assert_array_equal(got, (a.astype(np.int64) @ wq.astype(np.int64)).astype(np.float32))
