"""ncc.torch on a small transformer: one encoder block (attention, LayerNorm, GELU MLP) trained here on
scikit-learn's real digits, each image's 8 rows read as 8 tokens of 8 pixels (seconds to train).

Each pipeline is checked for what a PyTorch user relies on: the accuracy holds, every linear ncc
quantized runs as a oneDNN int8 kernel (Inductor's counters), and the Inductor-compiled module agrees
with the same graph run eagerly (the reference quantized arithmetic).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BATCH = 8
TRAIN, TEST = slice(0, 1400), slice(1400, None)  # as examples/make_digits_cnn.py trains


class DigitsTransformer(torch.nn.Module):
    def __init__(self, width: int = 64, heads: int = 4, hidden: int = 128):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Linear(8, width)
        self.position = torch.nn.Parameter(torch.zeros(8, width))
        self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width) for _ in range(4))
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.up, self.down = torch.nn.Linear(width, hidden), torch.nn.Linear(hidden, width)
        self.head = torch.nn.Linear(width, 10)

    def forward(self, x):  # x: [B, 8, 8], rows as tokens
        h = self.embed(x) + self.position
        b, t, d = h.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        context = (scores @ v).transpose(1, 2).reshape(b, t, d)
        h = self.norm1(h + self.o(context))
        h = self.norm2(h + self.down(torch.nn.functional.gelu(self.up(h))))
        return self.head(h.mean(1))


@pytest.fixture(scope="module")
def digits_transformer():
    spec = importlib.util.spec_from_file_location("make_digits_cnn", REPO / "examples" / "make_digits_cnn.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    images, y = example.digits()
    x = images[:, 0]  # [N, 8, 8]: rows as tokens
    torch.manual_seed(0)
    return example.fit(DigitsTransformer(), x, y, epochs=25), x, y


def _batches(x):
    n = len(x) // BATCH * BATCH
    return [x[i : i + BATCH] for i in range(0, n, BATCH)], n


@pytest.fixture(scope="module", params=["int8", "int8-dynamic"])
def compiled(request, digits_transformer):
    import ncc.torch

    model, x, _ = digits_transformer
    calib = [(x[TRAIN][i : i + BATCH],) for i in range(0, 64, BATCH)]
    return request.param, ncc.torch.compile(model, (x[:BATCH],), pipeline=request.param, calib=calib)


def test_accuracy_holds(digits_transformer, compiled):
    model, x, y = digits_transformer
    pipeline, module = compiled
    batches, n = _batches(x[TEST])
    with torch.no_grad():
        want = torch.cat([model(b) for b in batches]).argmax(1)
        got = torch.cat([module(b) for b in batches]).argmax(1)
    labels = y[TEST][:n]
    float_acc, quant_acc = ((p == labels).float().mean().item() for p in (want, got))
    assert float_acc > 0.9, float_acc
    assert quant_acc >= float_acc - 0.01, (pipeline, quant_acc, float_acc)
    assert (got == want).float().mean().item() >= 0.97


def test_every_quantized_linear_runs_as_an_int8_kernel(digits_transformer, compiled):
    _, x, _ = digits_transformer
    pipeline, module = compiled
    mode = {"int8": "int8", "int8-dynamic": "int8-dynamic"}[pipeline]
    quantized = [n for n in module.ir.graph if n.metadata_props.get("ncc.quant") == mode]
    check = module.check
    # 8 linears; the two attention products multiply activations and stay float on this target
    assert check.convs == 0 and 6 <= check.linears == len(quantized) <= 8, check
    assert check.ok, check.summary()
    images = x[TEST][:BATCH]
    with torch.no_grad():
        eager = module.graph_module(images)
        got = module(images)
    # oneDNN's kernels against the reference arithmetic (dequantize -> float op): rounding apart
    step = float(eager.abs().max()) / 127
    assert float((got - eager).abs().max()) < 4 * step, pipeline
    assert torch.equal(got.argmax(1), eager.argmax(1))


def test_a_broadcast_gather_of_the_attention_mask_becomes_a_view():
    """Exported attention masks spell ``mask[batch, None, None, key]`` as a GatherND on constant indices;
    lowered element by element, Inductor recomputed it inside every layer's softmax (1.5x its time)."""
    import numpy as np
    import onnx
    from ncc.backends.torch.fx import to_graph_module
    from ncc.frontends.onnx import from_proto
    from ncc.runtime import run
    from onnx import TensorProto as T
    from onnx import helper as h

    batch, keys = 3, 5
    b = np.broadcast_to(np.arange(batch).reshape(batch, 1, 1, 1), (batch, 1, 4, keys))
    k = np.broadcast_to(np.arange(keys).reshape(1, 1, 1, keys), (batch, 1, 4, keys))
    indices = np.stack([b, k], axis=-1).astype(np.int64)
    shuffled = indices[..., ::-1].copy()  # mask[key, batch] read through a transposed mask
    graph = h.make_graph(
        [
            h.make_node("GatherND", ["mask", "indices"], ["y"]),
            h.make_node("Transpose", ["mask"], ["mask_t"], perm=[1, 0]),
            h.make_node("GatherND", ["mask_t", "shuffled"], ["z"]),
        ],
        "g",
        [h.make_tensor_value_info("mask", T.FLOAT, [batch, keys])],
        [h.make_tensor_value_info(n, T.FLOAT, [batch, 1, 4, keys]) for n in ("y", "z")],
        [
            onnx.numpy_helper.from_array(indices, "indices"),
            onnx.numpy_helper.from_array(shuffled, "shuffled"),
        ],
    )
    model = from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))
    mask = np.random.default_rng(0).standard_normal((batch, keys)).astype(np.float32)
    want = run(model, [mask])
    module = to_graph_module(model)
    assert "index" not in module.code  # views only
    got = module(torch.from_numpy(mask))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w)


@pytest.mark.parametrize(
    "options",
    [
        "group-size=32 partial-groups=true",
        "group-size=64 scheme=sym partial-groups=true",
        "bits=8 group-size=0 scheme=sym",
    ],
)
def test_weight_only_runs_packed_kernels_for_a_few_rows(digits_transformer, options):
    """w4 / w8 on one image (8 rows: decoding-sized): every weight-only linear whose layout a CPU kernel
    takes runs ATen's packed-weight kernel on bf16 activations; the 8-input embedding (K=8, no 4-bit
    group fits) is dequantized and named in the check with its reason."""
    import ncc.torch
    from ncc.ir.rewrite import dequantized_array

    model, x, y = digits_transformer
    pipeline = "w8" if "bits=8" in options else "w4"
    module = ncc.torch.compile(model, (x[:1],), pipeline=pipeline, options=options)
    check = module.check
    four_bit = pipeline == "w4"
    # 8 linears, all weight-only (the head reads a [1, 64] input and exports as a Gemm, which the weight-only
    # passes rewrite as a MatMul); the embedding's K=8 fits neither kernel (no 4-bit group; torch's int8
    # kernel needs K % 16 == 0) and the head's N=10 not the int4 kernel (N % 16 == 0)
    floats = ["embed.weight.T_q)", "head.weight.T_q)"] if four_bit else ["embed.weight.T_q)"]
    assert check.weight_only == 8 and check.weight_only_kernels == 8 - len(floats), check.summary()
    assert [name.split("weight ")[-1] for name, _ in check.weight_only_float] == floats
    why = "group size 32 with K=8" if options.startswith("group-size=32") else "group size 64 with K=8"
    if four_bit:
        assert (
            f"2 run as float linears (N=10: the int4 kernel takes N divisible by 16; {why}" in check.summary()
        )
    else:
        assert "1 run as float linears (K=8" in check.summary(), check.summary()
    kernel = "aten._weight_int4pack_mm_for_cpu" if four_bit else "aten._weight_int8pack_mm"
    assert module.graph_module.code.count(kernel) == check.weight_only_kernels
    # against the IR's arithmetic: the weights dequantized in float32, activations in bf16 in the kernel
    reference = _dequantized_copy(model, module.ir, dequantized_array)
    images = x[TEST][:64]
    with torch.no_grad():
        got = torch.cat([module(images[i : i + 1]) for i in range(64)])
        want = reference(images)
        float_logits = model(images)
    step = float(want.abs().max()) / 127
    assert float((got - want).abs().max()) < step, options  # bf16 activations: ~3 significant digits
    assert (got.argmax(1) == float_logits.argmax(1)).float().mean().item() >= 0.95


def _dequantized_copy(model, quantized_ir, dequantized_array):
    """``model`` with each linear's weight replaced by the IR's dequantized weight-only weight (the IR's
    MatMuls are in forward() order, which is the modules' order here)."""
    import copy

    twin = copy.deepcopy(model)
    linears = [m for m in twin.modules() if isinstance(m, torch.nn.Linear)]
    matmuls = [n for n in quantized_ir.graph if n.metadata_props.get("ncc.quant", "").startswith("w")]
    assert len(matmuls) == len(linears)
    for linear, node in zip(linears, matmuls):
        weight = dequantized_array(node.inputs[1].producer())  # [K, N]
        assert weight.shape == tuple(linear.weight.T.shape), node.name
        linear.weight.data = torch.from_numpy(weight.T.copy())
    return twin


def test_aliased_example_inputs_are_traced_as_two_inputs():
    """The same zero tensor passed as two arguments (two empty caches): torch.export alone traces them as
    one input, and the program then reads the first where the second was meant."""
    import ncc.torch
    from ncc.runtime import run

    class Pick(torch.nn.Module):
        def forward(self, a, b):
            return a * 2 + b

    zeros = torch.zeros(2, 3)
    model = ncc.torch.lower(Pick(), (zeros, zeros), dynamic_batch=False)
    a, b = torch.ones(2, 3), torch.full((2, 3), 5.0)
    (got,) = run(model, [a.numpy(), b.numpy()])
    assert (got == 7.0).all(), got


def test_attention_runs_as_batched_gemms_not_inductors_flash_attention(digits_transformer, compiled):
    """The activation-by-activation MatMuls are spelled ``bmm`` on 3-D views, so Inductor keeps attention
    as two batched GEMMs around a fused softmax (PT2E's form) instead of rewriting it into its CPU
    flash-attention kernel, slower at these lengths."""
    from torch._dynamo.utils import counters

    _, x, _ = digits_transformer
    pipeline, module = compiled
    targets = [str(n.target) for n in module.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count("aten.bmm.default") == 2 and "aten.matmul.default" not in targets, pipeline
    torch._dynamo.reset()
    counters.clear()
    recompiled = torch.compile(module.graph_module)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        got = recompiled(x[TEST][:BATCH])
    assert counters["inductor"]["fuse_attention"] == 0, pipeline
    with torch.no_grad():
        want = module.graph_module(x[TEST][:BATCH])
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max())), pipeline
