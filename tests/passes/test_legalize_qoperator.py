"""QOperator legalization: QDQ groups -> onnxruntime integer kernels, checked numerically.

Each model is written once as a function of a small builder (:class:`Net`)
that emits a float graph (to calibrate activation ranges on seeded data) or
its QDQ form in ncc's conventions (u8 asymmetric activations, s8 symmetric
per-channel weights, int32 biases at ``x_scale * w_scale``). The QDQ model run
with onnxruntime's graph optimizations disabled is the fake-quant reference;
the QOperator model must agree with it within one quantization step of each
output.

Weights use 7 bits (|q| <= 63) by default: onnxruntime's u8 x s8 kernels on
CPUs without VNNI (AVX2's vpmaddubsw) saturate pairs of products in int16, so
full-range s8 weights can put the fused result several steps away from
fake-quant. With 8-bit weights the QOperator model is checked bit for bit
against onnxruntime's own fusion of the QDQ model instead.
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
from ncc.backends.onnx import to_proto
from ncc.frontends.onnx import from_proto
from ncc.ir import ids, verify
from ncc.passes.lowering.legalize_qoperator import to_qoperator
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as onp

OPSET = 17


# -- building QDQ models -------------------------------------------------------------------------


class Net:
    """Emit a float graph (``ranges=None``) or its QDQ form (``ranges`` from calibration)."""

    def __init__(
        self,
        ranges: dict[str, tuple[float, float]] | None = None,
        *,
        weight_bits: int = 7,
        signed: bool = False,
    ):
        self.ranges = ranges
        self.signed = signed
        self.qmax = 2 ** (weight_bits - 1) - 1
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.observed: list[str] = []  # float mode: tensors whose range is needed
        self.params: dict[str, tuple[np.float32, np.uint8]] = {}
        self.w_scales: dict[str, np.ndarray] = {}
        self._dq: dict[str, str] = {}
        self._n = 0

    @property
    def qdq(self) -> bool:
        return self.ranges is not None

    def op(
        self, op_type: str, inputs: list[str], *, name: str | None = None, domain: str = "", **attrs
    ) -> str:
        name = name or f"{op_type.lower()}{self._n}"
        self._n += 1
        self.nodes.append(oh.make_node(op_type, inputs, [name], name=name, domain=domain, **attrs))
        return name

    def const(self, name: str, array) -> str:
        self.inits[name] = np.asarray(array)
        return name

    def act_params(self, t: str) -> tuple[np.float32, np.uint8]:
        if t not in self.params:
            lo, hi = self.ranges[t]
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            scale = np.float32((hi - lo) / 255.0 or 1.0)
            zp = np.clip(np.round(-lo / scale), 0, 255)
            zp = np.int8(zp - 128) if self.signed else np.uint8(zp)
            self.params[t] = (scale, zp)
        return self.params[t]

    def q(self, t: str, *, like: str | None = None) -> str:
        """Quantize activation ``t`` (sharing ``like``'s parameters); returns the tensor to read."""
        if not self.qdq:
            self.observed.append(t)
            return t
        if t in self._dq:
            return self._dq[t]
        if like is not None:
            self.params[t] = self.act_params(like)
        scale, zp = self.act_params(t)
        self.const(f"{t}_scale", scale)
        self.const(f"{t}_zero_point", zp)
        self.nodes.append(
            oh.make_node("QuantizeLinear", [t, f"{t}_scale", f"{t}_zero_point"], [f"{t}_q"], name=f"q_{t}")
        )
        self.nodes.append(
            oh.make_node(
                "DequantizeLinear", [f"{t}_q", f"{t}_scale", f"{t}_zero_point"], [f"{t}_dq"], name=f"dq_{t}"
            )
        )
        self._dq[t] = f"{t}_dq"
        return f"{t}_dq"

    def w(self, name: str, array: np.ndarray, axis: int) -> str:
        """A weight: float, or s8 symmetric per-channel along ``axis`` behind a DequantizeLinear."""
        array = np.asarray(array, np.float32)
        if not self.qdq:
            return self.const(name, array)
        other = tuple(i for i in range(array.ndim) if i != axis)
        scale = (np.abs(array).max(axis=other) / self.qmax).astype(np.float32)
        shape = [1] * array.ndim
        shape[axis] = -1
        q = np.clip(np.round(array / scale.reshape(shape)), -self.qmax, self.qmax).astype(np.int8)
        self.w_scales[name] = scale
        self.const(f"{name}_quantized", q)
        self.const(f"{name}_scale", scale)
        self.const(f"{name}_zero_point", np.zeros_like(scale, dtype=np.int8))
        self.nodes.append(
            oh.make_node(
                "DequantizeLinear",
                [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                [f"{name}_dq"],
                name=f"dq_{name}",
                axis=axis,
            )
        )
        return f"{name}_dq"

    def b(self, name: str, array: np.ndarray, x: str, w: str) -> str:
        """A bias: float, or int32 at scale ``x_scale * w_scale`` behind a DequantizeLinear."""
        array = np.asarray(array, np.float32)
        if not self.qdq:
            return self.const(name, array)
        scale = (self.act_params(x)[0] * self.w_scales[w]).astype(np.float32)
        self.const(f"{name}_quantized", np.round(array / scale).astype(np.int32))
        self.const(f"{name}_scale", scale)
        self.const(f"{name}_zero_point", np.zeros(scale.shape, np.int32))
        self.nodes.append(
            oh.make_node(
                "DequantizeLinear",
                [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                [f"{name}_dq"],
                name=f"dq_{name}",
                axis=0,
            )
        )
        return f"{name}_dq"


def build(define, inputs: dict[str, list], outputs: dict[str, list], net: Net) -> onnx.ModelProto:
    define(net)
    graph = oh.make_graph(
        net.nodes,
        "g",
        [oh.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [oh.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in outputs.items()],
        [onp.from_array(v, k) for k, v in net.inits.items()],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def session(proto: onnx.ModelProto, *, optimize: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def feeds(inputs: dict[str, list], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v).astype(np.float32) for k, v in inputs.items()}


def quantized_model(
    define, inputs: dict[str, list], outputs: dict[str, list], *, weight_bits: int = 7, signed: bool = False
):
    """(float proto, QDQ proto, QDQ Net) with activation ranges calibrated on seeded data."""
    float_net = Net()
    float_proto = build(define, inputs, outputs, float_net)
    observed = list(dict.fromkeys(float_net.observed))
    probe = onnx.ModelProto()
    probe.CopyFrom(float_proto)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(oh.make_empty_tensor_value_info(t) for t in observed if t not in known)
    sess = session(probe)
    names = [o.name for o in sess.get_outputs()]
    lo = {t: np.inf for t in names}
    hi = {t: -np.inf for t in names}
    for seed in range(100, 108):
        for name, value in zip(names, sess.run(None, feeds(inputs, seed))):
            lo[name], hi[name] = min(lo[name], float(value.min())), max(hi[name], float(value.max()))
    net = Net({t: (lo[t], hi[t]) for t in names}, weight_bits=weight_bits, signed=signed)
    return float_proto, build(define, inputs, outputs, net), net


def convert(qdq_proto: onnx.ModelProto):
    model = from_proto(qdq_proto)
    report = to_qoperator(model)
    verify(model)
    proto = to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    return model, proto, report


def worst_steps(qdq_proto, qop_proto, inputs, steps: dict[str, float], seeds=(0, 1, 2)) -> dict[str, float]:
    """Largest |QOperator - QDQ reference| per output, in units of that output's quantization step."""
    ref, got = session(qdq_proto), session(qop_proto)
    got_optimized = session(qop_proto, optimize=True)
    worst: dict[str, float] = {}
    for seed in seeds:
        data = feeds(inputs, seed)
        want = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, data)))
        for sess in (got, got_optimized):
            have = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, data)))
            assert list(have) == list(want)
            for name in want:
                assert have[name].shape == want[name].shape and have[name].dtype == want[name].dtype
                err = float(np.abs(have[name] - want[name]).max()) / steps[name]
                worst[name] = max(worst.get(name, 0.0), err)
    return worst


def op_types(model) -> list[str]:
    return [n.op_type for n in model.graph]


def lowered(define, inputs: dict[str, list], outputs: dict[str, list], expected: str, **options):
    """Quantize ``define``'s model (see :func:`quantized_model`), convert it and check that it lowered to
    ``expected``, its op types in graph order separated by spaces; (QDQ proto, QDQ Net, model, QOperator
    proto, report)."""
    _, qdq, net = quantized_model(define, inputs, outputs, **options)
    model, proto, report = convert(qdq)
    assert op_types(model) == expected.split()
    return qdq, net, model, proto, report


def float_output_step(qdq: onnx.ModelProto, net: Net, activation: str, weight: str) -> float:
    """The quantization step of a float output computed by an integer kernel: one step of its quantized
    input ``activation`` times the largest column sum of the dequantized ``weight``."""
    inits = {t.name: t for t in qdq.graph.initializer}
    w = onp.to_array(inits[f"{weight}_quantized"]).astype(np.float32) * onp.to_array(inits[f"{weight}_scale"])
    return float(net.act_params(activation)[0] * np.abs(w).sum(axis=0).max())


def node_id_by_name(proto: onnx.ModelProto) -> dict[str, int]:
    model = from_proto(proto)
    return {n.name: ids.node_id(n) for n in model.graph}


# -- models --------------------------------------------------------------------------------------


def _kaiming(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


CNN_INPUTS = {"x": [2, 3, 16, 16]}


def cnn(net: Net) -> None:
    """Conv+Relu, MaxPool, Conv, residual Add, Concat, GlobalAveragePool, Flatten, Gemm."""
    rng = np.random.default_rng(7)
    w0, b0 = _kaiming(rng, (8, 3, 3, 3), 27), rng.standard_normal(8).astype(np.float32) * 0.1
    w1, b1 = _kaiming(rng, (8, 8, 3, 3), 72), rng.standard_normal(8).astype(np.float32) * 0.1
    w2 = _kaiming(rng, (4, 8, 1, 1), 8)
    wf, bf = _kaiming(rng, (10, 12), 12), rng.standard_normal(10).astype(np.float32) * 0.1
    x = net.q("x")
    y = net.op("Conv", [x, net.w("w0", w0, 0), net.b("b0", b0, "x", "w0")], name="conv0", pads=[1, 1, 1, 1])
    r = net.op("Relu", [y], name="relu0")
    rq = net.q(r)
    m = net.op("MaxPool", [rq], name="pool0", kernel_shape=[2, 2], strides=[2, 2])
    mq = net.q(m, like=r)
    c1 = net.op("Conv", [mq, net.w("w1", w1, 0), net.b("b1", b1, m, "w1")], name="conv1", pads=[1, 1, 1, 1])
    c1q = net.q(c1)
    s = net.op("Add", [c1q, mq], name="add0")
    sr = net.op("Relu", [s], name="relu1")
    srq = net.q(sr)
    c2 = net.op("Conv", [srq, net.w("w2", w2, 0)], name="conv2")
    c2q = net.q(c2)
    cat = net.op("Concat", [srq, c2q], name="cat0", axis=1)
    catq = net.q(cat)
    g = net.op("GlobalAveragePool", [catq], name="gap0")
    gq = net.q(g)
    f = net.op("Flatten", [gq], name="flatten0")
    fq = net.q(f, like=g)
    logits = net.op("Gemm", [fq, net.w("wf", wf, 0), net.b("bf", bf, f, "wf")], name="fc0", transB=1)
    net.op("Identity", [net.q(logits)], name="out")


MLP_INPUTS = {"x": [4, 16]}


def mlp(quantized_output: bool):
    def define(net: Net) -> None:
        rng = np.random.default_rng(11)
        w1, b1 = _kaiming(rng, (16, 32), 16), rng.standard_normal(32).astype(np.float32) * 0.1
        w2, b2 = _kaiming(rng, (32, 8), 32), rng.standard_normal(8).astype(np.float32) * 0.1
        h = net.op("MatMul", [net.q("x"), net.w("w1", w1, 1)], name="fc1")
        a = net.op("Add", [h, net.const("b1", b1)], name="fc1_bias")
        r = net.op("Relu", [a], name="relu1")
        h2 = net.op("MatMul", [net.q(r), net.w("w2", w2, 1)], name="fc2")
        if quantized_output:
            net.op("Identity", [net.q(h2)], name="out")
        else:
            net.op("Add", [h2, net.const("b2", b2)], name="out")

    return define


def fake_quant(x, scale, zp):
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp).astype(np.float32) * scale


ATTN_INPUTS = {"x": [2, 6, 16]}


def attention(net: Net) -> None:
    """Single-head self-attention with a sigmoid gate: activations x activations MatMul, Softmax."""
    rng = np.random.default_rng(5)
    wq, wk, wv, wo = (_kaiming(rng, (16, 16), 16) for _ in range(4))
    wq = wq / 4.0  # 1/sqrt(d) folded in
    bo = rng.standard_normal(16).astype(np.float32) * 0.1
    x = net.q("x")
    q = net.q(net.op("MatMul", [x, net.w("wq", wq, 1)], name="proj_q"))
    k = net.op("MatMul", [x, net.w("wk", wk, 1)], name="proj_k")
    kq = net.q(k)
    kt = net.q(net.op("Transpose", [kq], name="k_t", perm=[0, 2, 1]), like=k)
    v = net.q(net.op("MatMul", [x, net.w("wv", wv, 1)], name="proj_v"))
    s = net.q(net.op("MatMul", [q, kt], name="scores"))
    p = net.op("Softmax", [s], name="softmax", axis=-1)
    if net.qdq:
        net.ranges[p] = (0.0, 255.0 / 256.0)
    ctx = net.q(net.op("MatMul", [net.q(p), v], name="context"))
    gate = net.q(net.op("Sigmoid", [ctx], name="gate"))
    gated = net.q(net.op("Mul", [ctx, gate], name="gated"))
    y = net.op("MatMul", [gated, net.w("wo", wo, 1)], name="proj_o")
    net.op("Add", [y, net.const("bo", bo)], name="out")


MISC_INPUTS = {"x": [1, 4, 8, 8]}


def misc(net: Net) -> None:
    """LeakyRelu, AveragePool, Pad, Reshape, Transpose, Resize(nearest), Sigmoid and a Gemm with float output."""
    rng = np.random.default_rng(3)
    w0 = _kaiming(rng, (6, 4, 3, 3), 36)
    wf, bf = _kaiming(rng, (6 * 4 * 4, 5), 96), rng.standard_normal(5).astype(np.float32) * 0.1
    c = net.q(net.op("Conv", [net.q("x"), net.w("w0", w0, 0)], name="conv0", pads=[1, 1, 1, 1]))
    lr = net.q(net.op("LeakyRelu", [c], name="lrelu0", alpha=0.1))
    ap = net.op("AveragePool", [lr], name="avg0", kernel_shape=[2, 2], strides=[2, 2])
    apq = net.q(ap)
    pads = net.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    pad = net.q(net.op("Pad", [apq, pads], name="pad0"), like=ap)
    up_scales = net.const("up_scales", np.array([1, 1, 2, 2], np.float32))
    up = net.q(net.op("Resize", [pad, "", up_scales], name="up0", mode="nearest"), like=ap)
    pool = net.q(net.op("MaxPool", [up], name="pool0", kernel_shape=[3, 3], strides=[3, 3]), like=ap)
    sg = net.q(net.op("Sigmoid", [pool], name="sig0"))
    t = net.q(net.op("Transpose", [sg], name="t0", perm=[0, 2, 3, 1]), like="sig0")
    flat = net.q(
        net.op("Reshape", [t, net.const("shape", np.array([1, -1], np.int64))], name="flat0"), like="sig0"
    )
    net.op("Gemm", [flat, net.w("wf", wf, 1), net.b("bf", bf, "flat0", "wf")], name="out")


# -- tests ---------------------------------------------------------------------------------------


def test_cnn_converts_every_group_and_matches_the_qdq_reference():
    qdq, net, model, proto, report = lowered(
        cnn,
        CNN_INPUTS,
        {"out": [2, 10]},
        "QuantizeLinear QLinearConv MaxPool QLinearConv QLinearAdd QLinearConv QLinearConcat "
        "QLinearGlobalAveragePool Flatten QGemm DequantizeLinear Identity",
    )
    assert dict(report.emitted) == {
        "QLinearConv": 3,
        "com.microsoft::QGemm": 1,
        "com.microsoft::QLinearAdd": 1,
        "com.microsoft::QLinearConcat": 1,
        "com.microsoft::QLinearGlobalAveragePool": 1,
    }
    assert dict(report.passthrough) == {"MaxPool": 1, "Flatten": 1}
    assert report.kept == []
    assert model.opset_imports["com.microsoft"] == 1
    # tensors stay u8 between the integer kernels; no float weights or orphaned initializers remain
    assert all(v.uses() for v in model.graph.initializers.values())
    by_name = {n.name: n for n in model.graph}
    assert by_name["pool0"].outputs[0].dtype.name == "UINT8"
    worst = worst_steps(qdq, proto, CNN_INPUTS, {"out": float(net.act_params("fc0")[0])})
    assert worst["out"] <= 1.0 + 1e-4, worst


def test_new_nodes_record_the_ids_they_absorbed_and_keep_the_op_name():
    _, qdq, _ = quantized_model(cnn, CNN_INPUTS, {"out": [2, 10]})
    before = node_id_by_name(qdq)
    model, proto, _ = convert(qdq)
    conv0 = next(n for n in model.graph if n.name == "conv0")
    assert conv0.op_type == "QLinearConv"
    absorbed = {"dq_x", "dq_w0", "dq_b0", "conv0", "relu0", "q_relu0"}
    assert set(ids.fused_ids(conv0)) == {before[n] for n in absorbed}
    assert ids.node_id(conv0) not in before.values()
    pool = next(n for n in model.graph if n.name == "pool0")
    assert set(ids.fused_ids(pool)) == {before[n] for n in ("dq_relu0", "pool0", "q_pool0")}
    # ids survive the ONNX file as node metadata
    reread = from_proto(proto)
    assert ids.fused_ids(next(n for n in reread.graph if n.name == "conv0")) == ids.fused_ids(conv0)


def test_cnn_with_full_8bit_weights_is_bit_exact_with_onnxruntimes_own_qdq_fusion():
    # On CPUs without VNNI, u8 x s8 kernels saturate in int16 with full-range weights, so the
    # fused result can differ from fake-quant; it must still be what onnxruntime itself runs.
    _, qdq, _ = quantized_model(cnn, CNN_INPUTS, {"out": [2, 10]}, weight_bits=8)
    _, proto, _ = convert(qdq)
    fused, ours = session(qdq, optimize=True), session(proto)
    for seed in range(3):
        data = feeds(CNN_INPUTS, seed)
        np.testing.assert_array_equal(ours.run(None, data)[0], fused.run(None, data)[0])


@pytest.mark.parametrize("quantized_output", [False, True], ids=["float-output", "quantized-output"])
def test_mlp_matmul_add(quantized_output):
    second = "QLinearMatMul DequantizeLinear Identity" if quantized_output else "MatMulIntegerToFloat"
    expected = f"QuantizeLinear MatMulIntegerToFloat Relu QuantizeLinear {second}"
    qdq, net, model, proto, report = lowered(mlp(quantized_output), MLP_INPUTS, {"out": [4, 8]}, expected)
    if quantized_output:
        step = float(net.act_params("fc2")[0])
    else:
        (last,) = [n for n in model.graph if n.name == "fc2"]
        assert len(last.inputs) == 7 and last.inputs[6].name == "b2"  # the bias Add was folded
        assert last.outputs[0].name == "out"
        step = float_output_step(qdq, net, "relu1", "w2")
    first = next(n for n in model.graph if n.name == "fc1")
    assert first.inputs[6].name == "b1" and first.domain == "com.microsoft"
    worst = worst_steps(qdq, proto, MLP_INPUTS, {"out": step})
    assert worst["out"] <= 1.0 + 1e-4, worst
    if not quantized_output:
        # the QDQ reference itself is the numpy fake-quant of the float model
        inits = {t.name: onp.to_array(t) for t in qdq.graph.initializer}
        data = feeds(MLP_INPUTS, 0)
        w1 = inits["w1_quantized"] * inits["w1_scale"]
        w2 = inits["w2_quantized"] * inits["w2_scale"]
        h = (
            fake_quant(data["x"], inits["x_scale"], inits["x_zero_point"].astype(np.float32)) @ w1
            + inits["b1"]
        )
        r = fake_quant(np.maximum(h, 0), inits["relu1_scale"], inits["relu1_zero_point"].astype(np.float32))
        want = r @ w2 + inits["b2"]
        got = session(proto).run(None, data)[0]
        assert np.abs(got - want).max() <= step


def test_attention_block():
    qdq, net, model, proto, report = lowered(
        attention,
        ATTN_INPUTS,
        {"out": [2, 6, 16]},
        "QuantizeLinear QLinearMatMul QLinearMatMul Transpose QLinearMatMul QLinearMatMul QLinearSoftmax "
        "QLinearMatMul QLinearSigmoid QLinearMul MatMulIntegerToFloat",
    )
    softmax = next(n for n in model.graph if n.op_type == "QLinearSoftmax")
    assert softmax.attributes["opset"].value == OPSET and softmax.attributes["axis"].value == -1
    assert report.kept == []
    worst = worst_steps(qdq, proto, ATTN_INPUTS, {"out": float_output_step(qdq, net, "gated", "wo")})
    assert worst["out"] <= 1.0 + 1e-4, worst


def test_pooling_activations_and_passthrough_ops():
    qdq, net, model, proto, report = lowered(
        misc,
        MISC_INPUTS,
        {"out": [1, 5]},
        "QuantizeLinear QLinearConv QLinearLeakyRelu QLinearAveragePool Pad Resize MaxPool QLinearSigmoid "
        "Transpose Reshape QGemm",
    )
    (pad,) = [n for n in model.graph if n.op_type == "Pad"]
    assert pad.inputs[2].const_value.numpy() == net.act_params("avg0")[1]  # pads with the zero point
    gemm = model.graph.outputs[0].producer()
    assert gemm.op_type == "QGemm" and len(gemm.inputs) == 7  # no y_scale: float output
    worst = worst_steps(qdq, proto, MISC_INPUTS, {"out": float_output_step(qdq, net, "flat0", "wf")})
    assert worst["out"] <= 1.0 + 1e-4, worst


def unmatched(net: Net) -> None:
    rng = np.random.default_rng(9)
    w0, w1 = _kaiming(rng, (4, 2, 3, 3), 18), _kaiming(rng, (4, 4, 1, 1), 4)
    x = net.q("x")
    c0 = net.op("Conv", [x, net.w("w0", w0, 0)], name="conv0", pads=[1, 1, 1, 1])
    net.op("Identity", [c0], name="raw")  # conv0 is read in float as well as quantized
    c0q = net.q(c0)
    scales = net.const("sc", np.array([1, 1, 2, 2], np.float32))
    up = net.q(net.op("Resize", [c0q, "", scales], name="up0", mode="cubic"))
    th = net.q(net.op("Tanh", [up], name="tanh0"))
    c1 = net.q(net.op("Conv", [th, net.w("w1", w1, 0)], name="conv1"))
    net.op("Identity", [c1], name="out")


def test_unmatched_groups_stay_qdq_with_a_reason():
    outputs = {"out": [1, 4, 12, 12], "raw": [1, 4, 6, 6]}
    _, qdq, net = quantized_model(unmatched, {"x": [1, 2, 6, 6]}, outputs)
    # conv1's input scale is computed, not a constant
    graph = qdq.graph
    (dq,) = [n for n in graph.node if n.name == "dq_tanh0"]
    half = onp.to_array(next(t for t in graph.initializer if t.name == "tanh0_scale")) / 2
    graph.initializer.append(onp.from_array(np.float32(half), "half_scale"))
    graph.initializer.append(onp.from_array(np.float32(2.0), "two"))
    mul = oh.make_node("Mul", ["half_scale", "two"], ["computed_scale"], name="scale_mul")
    dq.input[1] = "computed_scale"
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([mul, *nodes])
    model, proto, report = convert(qdq)
    reasons = {k.node: k.reason for k in report.kept}
    assert reasons == {
        "conv0": "its output is read both through QuantizeLinear and by float ops",
        "up0": "Resize mode 'cubic' has no 8-bit kernel",
        "tanh0": "Tanh: no QOperator kernel on this target (x86-vnni)",
        "conv1": "DequantizeLinear 'dq_tanh0' has a non-constant scale",
    }
    assert dict(report.emitted) == {} and "Conv" in op_types(model)
    assert "kept QDQ: Resize 'up0'" in report.summary()
    steps = {"out": float(net.act_params("conv1")[0]), "raw": 1e-6}
    assert worst_steps(qdq, proto, {"x": [1, 2, 6, 6]}, steps)["out"] == 0.0


def test_requantize_round_trip_between_integer_ops_is_removed():
    def define(net: Net) -> None:
        rng = np.random.default_rng(1)
        c = net.op("Conv", [net.q("x"), net.w("w0", _kaiming(rng, (4, 2, 1, 1), 2), 0)], name="conv0")
        cq = net.q(c)
        if net.qdq:  # a second Q/DQ of the same tensor with equal parameters
            params = ["conv0_scale", "conv0_zero_point"]
            net.nodes.append(oh.make_node("QuantizeLinear", [cq, *params], ["again_q"], name="q_again"))
            net.nodes.append(
                oh.make_node("DequantizeLinear", ["again_q", *params], ["again"], name="dq_again")
            )
            cq = "again"
        net.op("Sigmoid", [cq], name="sig0")
        net.op("Identity", [net.q("sig0")], name="out")

    qdq, net, model, proto, report = lowered(
        define,
        {"x": [1, 2, 4, 4]},
        {"out": [1, 4, 4, 4]},
        "QuantizeLinear QLinearConv QLinearSigmoid DequantizeLinear Identity",
    )
    assert report.requantize_removed == 1
    assert (
        worst_steps(qdq, proto, {"x": [1, 2, 4, 4]}, {"out": float(net.act_params("sig0")[0])})["out"] <= 1.0
    )


def test_result_verifies_and_prints():
    from ncc.ir import print_model

    _, qdq, _ = quantized_model(attention, ATTN_INPUTS, {"out": [2, 6, 16]})
    model, _, _ = convert(qdq)
    verify(model)
    text = print_model(model)
    assert "com.microsoft::QLinearSoftmax" in text or "QLinearSoftmax" in text


def test_cnn_with_s8_activations():
    _, qdq, net = quantized_model(cnn, CNN_INPUTS, {"out": [2, 10]}, signed=True)
    model, proto, report = convert(qdq)
    assert report.kept == [] and sum(report.emitted.values()) == 7
    assert model.graph.node(1).outputs[0].dtype.name == "INT8"
    worst = worst_steps(qdq, proto, CNN_INPUTS, {"out": float(net.act_params("fc0")[0])})
    assert worst["out"] <= 1.0 + 1e-4, worst


VARIANT_INPUTS = {"x": [1, 2, 4, 4]}


def variants(net: Net) -> None:
    """Float Conv bias, Clip absorbed as Relu6, Where, Gemm with alpha/beta, Relu that cannot be absorbed."""
    rng = np.random.default_rng(21)
    w0, w1 = _kaiming(rng, (4, 2, 3, 3), 18), _kaiming(rng, (4, 2, 1, 1), 2)
    wg, bg = _kaiming(rng, (6, 64), 64), rng.standard_normal(6).astype(np.float32) * 0.1
    w3, w4 = _kaiming(rng, (64, 3), 64), _kaiming(rng, (4, 2, 1, 1), 2)
    x = net.q("x")
    c0 = net.op(
        "Conv",
        [x, net.w("w0", w0, 0), net.const("b0", rng.standard_normal(4).astype(np.float32))],
        name="conv0",
        pads=[1, 1, 1, 1],
    )
    clip = net.op("Clip", [c0, net.const("lo", np.float32(0)), net.const("hi", np.float32(6))], name="relu6")
    if net.qdq:
        net.ranges[clip] = (0.0, 6.0)
    c1 = net.q(net.op("Conv", [x, net.w("w1", w1, 0)], name="conv1"))
    cond = net.const("cond", np.random.default_rng(0).random((1, 4, 4, 4)) < 0.5)
    where = net.q(net.op("Where", [cond, net.q(clip), c1], name="where0"))
    flat = net.q(net.op("Flatten", [where], name="flat0"), like="where0")
    gemm = net.op(
        "Gemm",
        [flat, net.w("wg", wg, 0), net.b("bg", bg, "flat0", "wg")],
        name="fc0",
        transB=1,
        alpha=0.5,
        beta=2.0,
    )
    net.op("Identity", [net.q(gemm)], name="out")
    mm = net.op("Relu", [net.op("MatMul", [flat, net.w("w3", w3, 1)], name="fc1")], name="relu_fc1")
    c4 = net.op("Relu", [net.op("Conv", [x, net.w("w4", w4, 0)], name="conv4")], name="relu_c4")
    if net.qdq:  # zero points above the minimum: the Relu is not the quantizer's clamp
        net.ranges[mm] = (-1.0, max(net.ranges[mm][1], 1.0))
        net.ranges[c4] = (-1.0, max(net.ranges[c4][1], 1.0))
    net.op("Identity", [net.q(mm)], name="out2")
    net.op("Identity", [net.q(c4)], name="out3")


def test_variants_bias_requantization_activation_absorption_and_where():
    outputs = {"out": [1, 6], "out2": [1, 3], "out3": [1, 4, 4, 4]}
    _, qdq, net = quantized_model(variants, VARIANT_INPUTS, outputs)
    model, proto, report = convert(qdq)
    by_name = {n.name: n for n in model.graph}
    assert by_name["conv0"].op_type == "QLinearConv" and "relu6" not in by_name
    assert by_name["conv0"].inputs[8].const_value.dtype.name == "INT32"
    assert by_name["where0"].op_type == "QLinearWhere"
    assert by_name["fc0"].op_type == "QGemm" and "beta" not in by_name["fc0"].attributes
    assert by_name["fc1"].op_type == "MatMulIntegerToFloat" and by_name["relu_fc1"].op_type == "Relu"
    assert {k.node: k.reason for k in report.kept} == {
        "conv4": "Relu 'relu_c4' clamps at 0, above the output's quantized minimum",
    }
    steps = {
        o: float(net.act_params(t)[0]) for o, t in (("out", "fc0"), ("out2", "relu_fc1"), ("out3", "relu_c4"))
    }
    worst = worst_steps(qdq, proto, VARIANT_INPUTS, steps)
    assert max(worst.values()) <= 1.0 + 1e-4, worst


def test_second_run_and_float_model_change_nothing():
    float_proto, qdq, _ = quantized_model(cnn, CNN_INPUTS, {"out": [2, 10]})
    model, _, _ = convert(qdq)
    again = to_qoperator(model)
    assert not again.modified and again.kept == [] and again.qdq_nodes_removed == 0
    plain = from_proto(float_proto)
    report = to_qoperator(plain)
    assert not report.modified and report.kept == [] and "com.microsoft" not in plain.opset_imports


def shuffles(net: Net) -> None:
    """Split (two outputs), Slice, Unsqueeze/Squeeze, Gather, DepthToSpace, Resize(linear) on 8-bit tensors."""
    rng = np.random.default_rng(4)
    w0 = _kaiming(rng, (8, 2, 3, 3), 18)
    c = net.q(net.op("Conv", [net.q("x"), net.w("w0", w0, 0)], name="conv0", pads=[1, 1, 1, 1]))
    a, b = "split0_0", "split0_1"
    parts = net.const("parts", np.array([4, 4], np.int64))
    net.nodes.append(oh.make_node("Split", [c, parts], [a, b], name="split0", axis=1))
    a, b = net.q(a, like="conv0"), net.q(b, like="conv0")
    starts, ends, axes = (
        net.const(n, np.array(v, np.int64)) for n, v in (("st", [1]), ("en", [3]), ("ax", [2]))
    )
    sl = net.q(net.op("Slice", [a, starts, ends, axes], name="slice0"), like="conv0")
    un = net.q(
        net.op("Unsqueeze", [sl, net.const("uax", np.array([0], np.int64))], name="unsq0"), like="conv0"
    )
    sq = net.q(net.op("Squeeze", [un, net.const("sax", np.array([0], np.int64))], name="sq0"), like="conv0")
    g = net.q(
        net.op("Gather", [b, net.const("idx", np.array([0, 2, 1, 3], np.int64))], name="gather0", axis=1),
        like="conv0",
    )
    d2s = net.q(net.op("DepthToSpace", [g], name="d2s0", blocksize=2), like="conv0")
    scales = net.const("sc", np.array([1, 1, 0.5, 0.5], np.float32))
    rs = net.q(net.op("Resize", [d2s, "", scales], name="down0", mode="linear"), like="conv0")
    net.op("Identity", [sq], name="out")
    net.op("Identity", [rs], name="out2")


def test_more_passthrough_ops_run_on_the_8bit_tensor():
    outputs = {"out": [1, 4, 2, 6], "out2": [1, 1, 6, 6]}
    _, qdq, net = quantized_model(shuffles, {"x": [1, 2, 6, 6]}, outputs)
    model, proto, report = convert(qdq)
    assert dict(report.passthrough) == {
        "Split": 1,
        "Slice": 1,
        "Unsqueeze": 1,
        "Squeeze": 1,
        "Gather": 1,
        "DepthToSpace": 1,
        "Resize": 1,
    }
    assert report.kept == []
    split = next(n for n in model.graph if n.op_type == "Split")
    assert [o.dtype.name for o in split.outputs] == ["UINT8", "UINT8"]
    step = float(net.act_params("conv0")[0])
    worst = worst_steps(qdq, proto, {"x": [1, 2, 6, 6]}, {"out": step, "out2": step})
    assert worst["out"] == 0.0 and worst["out2"] <= 1.0 + 1e-4, worst


def test_format_qoperator_is_a_pass_the_instruments_see(tmp_path):
    """--format qoperator appends legalize-qoperator: printed after, timed, listed in the pipeline."""
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "q.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", "compile", str(repo / "examples" / "digits_cnn.onnx")]
        + ["--pass", "int8", "--calib", str(repo / "examples" / "digits_calib.npz"), "--format", "qoperator"]
        + ["--print-ir-after", "legalize-qoperator", "--time-passes", "--cache-dir", str(tmp_path / "c")]
        + ["-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "IR Dump After legalize-qoperator" in proc.stderr + proc.stdout
    assert "QLinearConv(" in proc.stderr + proc.stdout
    timing = [
        line
        for line in proc.stderr.splitlines()
        if re.match(r"\s+[\d.]+ \(\s*[\d.]+%\)\s+legalize-qoperator$", line)
    ]
    assert len(timing) == 1, proc.stderr
    assert "5/5 quantized nodes run as integer kernels" in proc.stderr
    assert {n.op_type for n in onnx.load(out).graph.node} >= {"QLinearConv", "QGemm"}
