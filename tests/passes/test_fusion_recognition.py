"""fuse-gelu, fuse-layer-norm, fuse-matmul-scale and fuse-activation on real exported models.

Each test counts what the pass found against what the model holds, and runs the
model before and after through onnxruntime on real inputs: every output must
agree within 1e-5 of the largest reference magnitude.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import run_ort
from ncc.ir.verifier import verify
from ncc.passes.base import PassContext
from ncc.passes.fusion.fuse_activation import FUSED_ACTIVATION_KEY, FUSED_INTO_KEY, FuseActivation
from ncc.passes.fusion.fuse_gelu import FuseGelu
from ncc.passes.fusion.fuse_layer_norm import FuseLayerNorm
from ncc.passes.fusion.fuse_matmul_scale import FuseMatMulScale

RTOL = 1e-5


def _nodes(model) -> int:
    return sum(1 for _ in model.graph)


def _ops(model, op_type: str, domain: str = "") -> list:
    return [n for n in model.graph if n.op_type == op_type and n.domain == domain]


def _assert_same(before, after, feeds) -> None:
    want, got = run_ort(before, feeds), run_ort(after, feeds)
    assert list(want) == list(got)
    for name in want:
        scale = float(np.abs(want[name]).max())
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=RTOL * scale, err_msg=name)


@pytest.mark.slow
def test_fuse_gelu_on_minilm_legacy():
    import realmodels
    from ncc.frontends.onnx import load_onnx

    path = realmodels.minilm_onnx("legacy")
    before, after = load_onnx(path), load_onnx(path)
    assert len(_ops(before, "Erf")) == 6
    result = FuseGelu().run(after, PassContext())
    verify(after)
    assert result.stats["GeluErfPattern hits"] == 6 and result.stats["GeluTanhPattern hits"] == 0
    gelus = _ops(after, "Gelu", "com.microsoft")  # the export is opset 17 < 20
    assert len(gelus) == 6 and not _ops(after, "Erf")
    assert after.opset_imports["com.microsoft"] == 1
    # Per GELU: Div, Erf, Add, Mul, Mul and their three Constant nodes become one node.
    assert _nodes(before) - _nodes(after) == 6 * (5 + 3 - 1)
    assert all(len(n.metadata_props["ncc.fused"].split(",")) == 5 for n in gelus)
    names = [v.name for v in before.graph.inputs]
    feeds = {k: v for k, v in realmodels.minilm_inputs(4).items() if k in names}
    _assert_same(before, after, feeds)
    # A second run finds nothing.
    assert not FuseGelu().run(after, PassContext()).modified


@pytest.mark.slow
def test_fuse_gelu_leaves_minilm_dynamo_alone():
    """The opset-20 dynamo export already has 6 standard Gelu nodes: nothing to do."""
    import realmodels
    from ncc.frontends.onnx import load_onnx

    model = load_onnx(realmodels.minilm_onnx("dynamo"))
    assert len(_ops(model, "Gelu")) == 6
    assert not FuseGelu().run(model, PassContext()).modified


def _hand_written_layer_norm_onnx(opset: int = 13):
    """A small torch MLP with a hand-written LayerNorm, exported by the TorchScript exporter."""
    import onnx
    import torch
    from ncc.frontends.onnx import from_proto

    class LayerNorm(torch.nn.Module):
        def __init__(self, dim: int, eps: float):
            super().__init__()
            self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(dim))
            self.bias = torch.nn.Parameter(0.1 * torch.randn(dim))
            self.eps = eps

        def forward(self, x):
            mean = x.mean(-1, keepdim=True)
            var = ((x - mean) ** 2).mean(-1, keepdim=True)
            return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.ln1 = torch.nn.Linear(16, 32), LayerNorm(32, 1e-5)
            self.fc2, self.ln2 = torch.nn.Linear(32, 32), LayerNorm(32, 1e-12)
            self.fc3, self.ln3 = torch.nn.Linear(32, 8), LayerNorm(8, 1e-6)

        def forward(self, x):
            h = self.ln1(self.fc1(x))
            h = h + self.ln2(torch.relu(self.fc2(h)))
            return self.ln3(self.fc3(h))

    torch.manual_seed(0)
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            Block().eval(),
            (torch.randn(2, 7, 16),),
            buffer,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}},
            opset_version=opset,
            dynamo=False,
        )
    return lambda: from_proto(onnx.load_from_string(buffer.getvalue()))


@pytest.mark.slow
def test_fuse_layer_norm_on_exported_torch_module():
    build = _hand_written_layer_norm_onnx(13)
    before, after = build(), build()
    assert before.opset_imports[""] == 13 and not _ops(before, "LayerNormalization")
    n_reduce = len(_ops(before, "ReduceMean"))
    assert n_reduce == 6
    result = FuseLayerNorm().run(after, PassContext())
    verify(after)
    assert result.stats["LayerNormPattern hits"] == 3
    lns = _ops(after, "LayerNormalization")
    assert len(lns) == 3 and not _ops(after, "ReduceMean") and after.opset_imports[""] == 17
    assert sorted(n.attributes.get_float("epsilon") for n in lns) == sorted(
        float(np.float32(e)) for e in (1e-5, 1e-12, 1e-6)
    )
    # Per LayerNorm: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add and two Constant nodes.
    assert _nodes(before) - _nodes(after) == 3 * (9 + 2 - 1)
    rng = np.random.default_rng(0)
    _assert_same(before, after, {"x": rng.standard_normal((4, 9, 16)).astype(np.float32)})


@pytest.mark.slow
def test_fuse_layer_norm_keeps_minilm_layer_norms():
    """MiniLM's exports already use LayerNormalization (13 each): nothing to fuse."""
    import realmodels
    from ncc.frontends.onnx import load_onnx

    model = load_onnx(realmodels.minilm_onnx("legacy"))
    assert len(_ops(model, "LayerNormalization")) == 13
    assert not FuseLayerNorm().run(model, PassContext()).modified


@pytest.mark.slow
def test_fuse_matmul_scale_folds_minilm_attention_scales():
    """all-MiniLM-L6-v2 scales each layer's scores, Mul(MatMul(Q, Kt), 1/sqrt(32)): all six go into the
    query projections, and the embeddings agree with the original on real tweets."""
    import sys
    from pathlib import Path

    import realmodels

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from int8_models import minilm_tweets_file
    from ncc.frontends.onnx import load_onnx
    from ncc.passes.cleanup.fold_constants import FoldConstants

    path = realmodels.minilm_onnx("legacy")
    before, after = load_onnx(path), load_onnx(path)
    FoldConstants().run(after, PassContext())  # the scale is a Constant node until folded

    def scaled_scores(model):
        return [
            n
            for n in model.graph
            if n.op_type == "Mul"
            and n.inputs[0].producer() is not None
            and n.inputs[0].producer().op_type == "MatMul"
        ]

    assert len(scaled_scores(after)) == 6
    result = FuseMatMulScale().run(after, PassContext())
    verify(after)
    assert result.stats["MatMulScalePattern hits"] == 6 and not scaled_scores(after)
    queries = [
        n
        for n in after.graph
        if n.op_type == "MatMul" and any(v.name and v.name.endswith("_scaled") for v in n.inputs)
    ]
    assert len(queries) == 6 and all("attention/self/query/MatMul" in n.name for n in queries)
    with np.load(minilm_tweets_file()) as data:
        feeds = {k: data[k][:4] for k in ("input_ids", "attention_mask", "token_type_ids")}
    _assert_same(before, after, feeds)


@pytest.mark.slow
@pytest.mark.parametrize("emit", [False, True], ids=["mark", "fused-conv"])
def test_fuse_activation_on_efficientnet(emit):
    import realmodels
    from ncc.frontends.onnx import load_onnx
    from ncc.ir import ids

    path = realmodels.efficientnet_onnx()
    before, after = load_onnx(path), load_onnx(path)
    pairs = [(n.inputs[0].producer(), n) for n in before.graph if n.op_type == "Clip"]
    pairs = [(p, c) for p, c in pairs if p is not None and p.op_type == "Conv"]
    assert len(pairs) == 33  # every Clip(0, 6) of EfficientNet-Lite0 follows a Conv
    result = FuseActivation(emit_fused_conv=emit).run(after, PassContext())
    verify(after)
    if emit:
        assert result.stats["Conv+Clip fused"] == len(pairs)
        fused = _ops(after, "FusedConv", "com.microsoft")
        assert len(fused) == len(pairs) and not _ops(after, "Clip")
        assert all(list(n.attributes["activation_params"].as_floats()) == [0.0, 6.0] for n in fused)
    else:
        assert result.stats["Conv+Clip marked"] == len(pairs) and result.stats["Conv+Relu marked"] == 0
        assert _nodes(after) == _nodes(before)
        by_id = {ids.node_id(n): n for n in after.graph}
        marked = [n for n in after.graph if FUSED_ACTIVATION_KEY in n.metadata_props]
        assert len(marked) == len(pairs)
        for conv in marked:
            clip = by_id[int(conv.metadata_props[FUSED_ACTIVATION_KEY])]
            assert clip.op_type == "Clip" and clip.inputs[0].producer() is conv
            assert clip.metadata_props[FUSED_INTO_KEY] == str(ids.node_id(conv))
        assert not FuseActivation().run(after, PassContext()).modified  # idempotent
    _assert_same(before, after, {"image": realmodels.photo_crops(4)})
