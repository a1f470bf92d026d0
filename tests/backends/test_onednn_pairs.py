"""oneDNN's int8 kernels (Inductor, OpenVINO) give exact sums with the weights ncc writes for this CPU.

On x86 without VNNI oneDNN adds u8 x s8 products in saturating int16 pairs: a linear's K, a
convolution's input channels at each kernel tap (an odd count pads each tap), never a depthwise
filter's (:func:`ncc.passes.quant.pairs.node_pairs` with ``kernels="onednn"``). ``--target inductor``
and ``--target openvino`` (OpenVINO's CPU plugin pairs alike) then keep those pairs within 128 (weights
of unknown pairing within ±63). Checked here on whatever
CPU runs the suite, with the activations that stress the pairs most (0 and 255 only), against exact
integer sums; on a pairing CPU, unpaired full-range weights must miss them (the check can fail).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Attrs

torch = pytest.importorskip("torch", reason="Inductor's int8 kernels need torch (the torch extra)")

from ncc.passes.quant.pairs import node_pairs, symmetric_int8  # noqa: E402
from ncc.targets import get_target  # noqa: E402

PAIRED = get_target("inductor").pairwise_int16
assert get_target("openvino").pairwise_int16 == PAIRED

#: (name, weight shape [M, C/group, kh, kw] or [N, K], group)
LAYERS = [
    ("linear", (16, 64), 1),
    ("conv3", (16, 3, 3, 3), 1),
    ("conv8", (16, 8, 3, 3), 1),
    ("depthwise", (8, 1, 3, 3), 8),
]


def _codes(shape, group, paired: bool) -> np.ndarray:
    """Heavy-tailed weights (Student t, like a trained layer's) as s8 codes, per output channel."""
    w = np.random.default_rng(len(shape) * 10 + shape[1]).standard_t(3, size=shape).astype(np.float32)
    op = "Gemm" if len(shape) == 2 else "Conv"
    layout = node_pairs(op, shape, Attrs(group=group, transB=1), "onednn") if paired else None
    return symmetric_int8(w, 0, qmax=63 if paired and layout is None else 127, pairs=layout)[0]


class _Int8Layers(torch.nn.Module):
    """Each layer reads u8 activations (scale 1, zero point 0) and s8 weights (scale 1): integer outputs."""

    def __init__(self, codes: dict[str, np.ndarray]):
        super().__init__()
        self.codes = {name: torch.from_numpy(np.ascontiguousarray(c)) for name, c in codes.items()}
        self.scales = {name: torch.ones(c.shape[0]) for name, c in codes.items()}
        self.zeros = {name: torch.zeros(c.shape[0], dtype=torch.int64) for name, c in codes.items()}

    def forward(self, vector, image):
        qd = torch.ops.quantized_decomposed
        out = []
        for name, _, group in LAYERS:
            c = self.codes[name]
            x = vector if name == "linear" else image[:, : c.shape[1] * group]
            q = qd.quantize_per_tensor.default(x, 1.0, 0, 0, 255, torch.uint8)
            x = qd.dequantize_per_tensor.default(q, 1.0, 0, 0, 255, torch.uint8)
            w = qd.dequantize_per_channel.default(
                c, self.scales[name], self.zeros[name], 0, -128, 127, torch.int8
            )
            y = (
                torch.nn.functional.linear(x, w)
                if name == "linear"
                else torch.nn.functional.conv2d(x, w, groups=group)
            )
            out.append(y.flatten(1))
        return torch.cat(out, 1)


def _exact(codes, vector, image) -> np.ndarray:
    """The same layers in float64 on the codes: every sum is an exact integer."""
    out = []
    for name, _, group in LAYERS:
        w = torch.from_numpy(np.ascontiguousarray(codes[name])).double()
        if name == "linear":
            y = vector.double() @ w.T
        else:
            x = image[:, : w.shape[1] * group].double()
            y = torch.nn.functional.conv2d(x, w, groups=group)
        out.append(y.flatten(1))
    return torch.cat(out, 1).numpy()


def _inductor(codes, vector, image) -> np.ndarray:
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)
    from torch._dynamo.utils import counters
    from torch._inductor import config

    torch._dynamo.reset()
    counters.clear()
    with config.patch(freezing=True), torch.no_grad():
        got = torch.compile(_Int8Layers(codes))(vector, image).numpy()
    lowered = counters["inductor"]
    assert lowered["qlinear_unary_lower_count"] == 1 and lowered["qconv_unary_lower_count"] == 3, dict(
        lowered
    )
    return got


def _openvino(codes, vector, image) -> np.ndarray:
    """The layers as a QDQ ONNX model (u8 activations and s8 weights at scale 1), run by OpenVINO in f32."""
    ov = pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outputs = [], [], []
    inits += [
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.uint8(0), "u0"),
    ]
    for name, _, group in LAYERS:
        c = np.ascontiguousarray(codes[name])
        x = "vector" if name == "linear" else f"{name}_x"
        if name != "linear":
            inits.append(numpy_helper.from_array(np.array([c.shape[1] * group], np.int64), f"{name}_end"))
            inits.append(numpy_helper.from_array(np.array([0], np.int64), f"{name}_start"))
            inits.append(numpy_helper.from_array(np.array([1], np.int64), f"{name}_axis"))
            nodes.append(
                helper.make_node("Slice", ["image", f"{name}_start", f"{name}_end", f"{name}_axis"], [x])
            )
        inits += [
            numpy_helper.from_array(c, f"{name}_q"),
            numpy_helper.from_array(np.ones(c.shape[0], np.float32), f"{name}_s"),
            numpy_helper.from_array(np.zeros(c.shape[0], np.int8), f"{name}_z"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", [x, "one", "u0"], [f"{name}_xq"]),
            helper.make_node("DequantizeLinear", [f"{name}_xq", "one", "u0"], [f"{name}_xd"]),
            helper.make_node(
                "DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_w"], axis=0
            ),
        ]
        if name == "linear":
            nodes.append(helper.make_node("Gemm", [f"{name}_xd", f"{name}_w"], [name], transB=1))
        else:
            nodes.append(helper.make_node("Conv", [f"{name}_xd", f"{name}_w"], [name], group=group))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    inputs = [
        helper.make_tensor_value_info("vector", TensorProto.FLOAT, list(vector.shape)),
        helper.make_tensor_value_info("image", TensorProto.FLOAT, list(image.shape)),
    ]
    graph = helper.make_graph(nodes, "layers", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(model.SerializeToString(), b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    result = compiled({"vector": vector.numpy(), "image": image.numpy()})
    return np.concatenate([result[i].reshape(len(image), -1) for i in range(len(LAYERS))], 1)


RUNTIMES = {"inductor": _inductor, "openvino": _openvino}


@pytest.fixture(scope="module")
def extremes():
    rng = np.random.default_rng(0)
    vector = rng.choice(np.array([0.0, 255.0], np.float32), size=(2, 64))
    image = rng.choice(np.array([0.0, 255.0], np.float32), size=(2, 8, 6, 6))
    return torch.from_numpy(vector), torch.from_numpy(image)


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_ncc_weights_for_this_cpu_give_exact_int8_sums(extremes, runtime):
    codes = {name: _codes(shape, group, PAIRED) for name, shape, group in LAYERS}
    got = RUNTIMES[runtime](codes, *extremes)
    np.testing.assert_array_equal(got, _exact(codes, *extremes).astype(np.float32))


@pytest.mark.skipif(
    not PAIRED, reason="this CPU's oneDNN does not pair int8 products (VNNI): nothing saturates"
)
@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_unpaired_full_range_weights_saturate_on_this_cpu(extremes, runtime):
    codes = {name: _codes(shape, group, False) for name, shape, group in LAYERS}
    got, want = RUNTIMES[runtime](codes, *extremes), _exact(codes, *extremes)
    wrong = np.abs(got - want) > 0.5
    sizes = [16, 16 * 4 * 4, 16 * 4 * 4, 8 * 4 * 4]  # outputs per sample of each layer, in LAYERS order
    bounds = np.cumsum([0, *sizes])
    per_layer = [bool(wrong[:, a:b].any()) for a, b in zip(bounds[:-1], bounds[1:])]
    assert per_layer == [True, True, True, False], per_layer  # the depthwise kernel never pairs
