"""Cleanup and fusion passes on graphs built with onnx.helper, checked in onnxruntime.

Every test runs the model before and after the pass on seeded random inputs and
compares the outputs (1e-6 for cleanup rewrites, 1e-5 for fusions), and checks
what the pass says it did (stats, node counts, absorbed ids).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import assert_same_outputs
from ncc.errors import NccError
from ncc.frontends.onnx import from_proto
from ncc.ir import ids
from ncc.ir.verifier import verify
from ncc.passes.base import PassContext
from ncc.passes.cleanup.cse import CommonSubexpressionElimination
from ncc.passes.cleanup.dce import DeadCodeElimination
from ncc.passes.cleanup.eliminate_identity import EliminateIdentity
from ncc.passes.cleanup.fold_constants import FoldConstants
from ncc.passes.cleanup.shape_inference import ShapeInference
from ncc.passes.cleanup.toposort import TopologicalSort
from ncc.passes.fusion.fuse_conv_bn import FuseConvBN
from ncc.passes.fusion.fuse_matmul_add import FuseMatMulAdd
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

REWRITE_TOL = 1e-6
FUSION_TOL = 1e-5


def _init(name: str, array) -> onnx.TensorProto:
    return nh.from_array(np.asarray(array), name)


def _model(nodes, inputs, outputs, inits=(), opset=17, check=True) -> ir.Model:
    graph = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", opset)]), check=check)


def _run(pass_, build):
    """Build the model twice, run ``pass_`` on one copy; return (before, after, result)."""
    before, after = build(), build()
    result = pass_.run(after, PassContext())
    verify(after)
    return before, after, result


def _conv_bn(rng, name, x, cin, cout, group=1, k=3, bias=True):
    """Conv (+bias) -> BatchNormalization with random, BN-realistic parameters."""
    w = (rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
    inits = [
        _init(f"{name}.w", w),
        _init(f"{name}.gamma", rng.uniform(0.5, 1.5, cout).astype(np.float32)),
        _init(f"{name}.beta", rng.normal(0, 0.1, cout).astype(np.float32)),
        _init(f"{name}.mean", rng.normal(0, 0.1, cout).astype(np.float32)),
        _init(f"{name}.var", rng.uniform(0.5, 2.0, cout).astype(np.float32)),
    ]
    conv_inputs = [x, f"{name}.w"]
    if bias:
        inits.append(_init(f"{name}.b", rng.normal(0, 0.1, cout).astype(np.float32)))
        conv_inputs.append(f"{name}.b")
    nodes = [
        h.make_node(
            "Conv",
            conv_inputs,
            [f"{name}.conv"],
            name=f"{name}/conv",
            group=group,
            kernel_shape=[k, k],
            pads=[k // 2] * 4,
        ),
        h.make_node(
            "BatchNormalization",
            [f"{name}.conv", f"{name}.gamma", f"{name}.beta", f"{name}.mean", f"{name}.var"],
            [f"{name}.bn"],
            name=f"{name}/bn",
            epsilon=1e-5,
        ),
        h.make_node("Relu", [f"{name}.bn"], [f"{name}.out"], name=f"{name}/relu"),
    ]
    return nodes, inits, f"{name}.out"


def small_cnn() -> ir.Model:
    """A MobileNet-like block stack: conv-bn-relu, depthwise conv-bn-relu, pointwise conv-bn, pool, fc."""
    rng = np.random.default_rng(42)
    nodes, inits = [], []
    x = "input"
    for name, cin, cout, group, k, bias in [
        ("stem", 3, 8, 1, 3, False),
        ("dw", 8, 8, 8, 3, True),
        ("pw", 8, 16, 1, 1, False),
        ("grouped", 16, 16, 4, 3, True),
    ]:
        n, i, x = _conv_bn(rng, name, x, cin, cout, group, k, bias)
        nodes += n
        inits += i
    inits += [
        _init("fc.w", rng.standard_normal((16, 10)).astype(np.float32) / 4),
        _init("fc.b", rng.standard_normal(10).astype(np.float32)),
    ]
    nodes += [
        h.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"),
        h.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        h.make_node("MatMul", ["flat", "fc.w"], ["logits_mm"], name="fc/matmul"),
        h.make_node("Add", ["logits_mm", "fc.b"], ["logits"], name="fc/add"),
    ]
    return _model(
        nodes,
        [h.make_tensor_value_info("input", TP.FLOAT, ["N", 3, 16, 16])],
        [h.make_tensor_value_info("logits", TP.FLOAT, ["N", 10])],
        inits,
    )


def mlp() -> ir.Model:
    rng = np.random.default_rng(7)
    nodes, inits, x = [], [], "x"
    sizes = [12, 32, 32, 4]
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        inits += [
            _init(f"w{i}", (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)),
            _init(f"b{i}", rng.standard_normal(b).astype(np.float32)),
        ]
        nodes += [
            h.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"fc{i}/matmul"),
            h.make_node("Add", [f"mm{i}", f"b{i}"], [f"h{i}"], name=f"fc{i}/add"),
        ]
        x = f"h{i}"
        if i < len(sizes) - 2:
            nodes.append(h.make_node("Tanh", [x], [f"a{i}"], name=f"act{i}"))
            x = f"a{i}"
    nodes.append(h.make_node("Identity", [x], ["y"], name="out"))
    return _model(
        nodes,
        [h.make_tensor_value_info("x", TP.FLOAT, ["batch", 12])],
        [h.make_tensor_value_info("y", TP.FLOAT, ["batch", 4])],
        inits,
    )


def messy() -> ir.Model:
    """Constants to fold, duplicates to merge, identities and dead code, out of order."""
    nodes = [
        h.make_node("Identity", ["r1"], ["i1"], name="id1"),
        h.make_node("Relu", ["x"], ["r1"], name="relu1"),
        h.make_node("Relu", ["x"], ["r2"], name="relu2"),
        h.make_node("Constant", [], ["two"], value=_init("two_t", np.float32(2.0)), name="const2"),
        h.make_node("Mul", ["two", "half"], ["one"], name="mul_const"),
        h.make_node("Mul", ["i1", "one"], ["s1"], name="scale1"),
        h.make_node("Mul", ["r2", "one"], ["s2"], name="scale2"),
        h.make_node("Add", ["s1", "s2"], ["sum"], name="sum"),
        h.make_node("Shape", ["sum"], ["shape"], name="shape"),
        h.make_node("Reshape", ["sum", "shape"], ["reshaped"], name="reshape"),
        h.make_node("Dropout", ["reshaped"], ["y"], name="dropout"),
        h.make_node("Neg", ["x"], ["dead"], name="dead"),
    ]
    return _model(
        nodes,
        [h.make_tensor_value_info("x", TP.FLOAT, [2, 5])],
        [h.make_tensor_value_info("y", TP.FLOAT, [2, 5])],
        [_init("half", np.float32(0.75))],
        check=False,
    )


def _count(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


# -- fusions ---------------------------------------------------------------------


def test_fuse_conv_bn_on_small_cnn():
    before, after, result = _run(FuseConvBN(), small_cnn)
    assert result.modified and result.stats["ConvBNPattern hits"] == 4
    assert not [n for n in after.graph if n.op_type == "BatchNormalization"]
    assert _count(before) - _count(after) == 4
    assert_same_outputs(before, after, atol=FUSION_TOL, rtol=FUSION_TOL)
    # Each new Conv lists the ids of the Conv and the BN it replaced.
    old = {n.name: ids.node_id(n) for n in before.graph}
    for layer in ("stem", "dw", "pw", "grouped"):
        conv = next(n for n in after.graph if n.name == f"{layer}/conv")
        assert ids.fused_ids(conv) == tuple(sorted((old[f"{layer}/conv"], old[f"{layer}/bn"])))
        assert ids.node_id(conv) not in old.values()


def test_fuse_conv_bn_matches_batchnorm_in_float64():
    # The folded weights, computed in float64, agree with BN applied to the conv output.
    before, after, _ = _run(FuseConvBN(), small_cnn)
    conv = next(n for n in after.graph if n.name == "pw/conv")
    w_new = conv.inputs[1].const_value.numpy().astype(np.float64)
    graph = before.graph
    p = {
        k: graph.initializers[f"pw.{k}"].const_value.numpy().astype(np.float64)
        for k in ("w", "gamma", "beta", "mean", "var")
    }
    s = p["gamma"] / np.sqrt(p["var"] + 1e-5)
    np.testing.assert_allclose(w_new, p["w"] * s[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(
        conv.inputs[2].const_value.numpy(), p["beta"] - p["mean"] * s, rtol=1e-6, atol=1e-7
    )


def test_fuse_conv_bn_reports_why_not():
    def build():
        rng = np.random.default_rng(0)
        nodes, inits, out = _conv_bn(rng, "l", "x", 2, 2, k=1)
        nodes.append(h.make_node("Add", ["l.conv", out], ["y"]))  # Conv output read twice
        return _model(
            nodes,
            [h.make_tensor_value_info("x", TP.FLOAT, [1, 2, 3, 3])],
            [h.make_tensor_value_info("y", TP.FLOAT, [1, 2, 3, 3])],
            inits,
        )

    _, after, result = _run(FuseConvBN(), build)
    assert not result.modified
    assert any("Conv output has other uses" in note for note in result.notes)


def test_fuse_matmul_add_on_mlp():
    before, after, result = _run(FuseMatMulAdd(), mlp)
    assert result.stats["MatMulAddPattern hits"] == 3
    gemms = [n for n in after.graph if n.op_type == "Gemm"]
    assert len(gemms) == 3 and not [n for n in after.graph if n.op_type in ("MatMul", "Add")]
    assert all(len(ids.fused_ids(g)) == 2 for g in gemms)
    assert [v.name for v in after.graph.outputs] == ["y"]
    assert_same_outputs(before, after, atol=FUSION_TOL, rtol=FUSION_TOL)


def test_fuse_matmul_add_on_cnn_head_and_leaves_rank3():
    before, after, result = _run(FuseMatMulAdd(), small_cnn)
    assert result.stats["MatMulAddPattern hits"] == 1
    assert_same_outputs(before, after, atol=FUSION_TOL, rtol=FUSION_TOL)

    def rank3():
        w = np.ones((4, 3), np.float32)
        return _model(
            [h.make_node("MatMul", ["x", "w"], ["m"]), h.make_node("Add", ["m", "b"], ["y"])],
            [h.make_tensor_value_info("x", TP.FLOAT, ["B", "S", 4])],
            [h.make_tensor_value_info("y", TP.FLOAT, ["B", "S", 3])],
            [_init("w", w), _init("b", np.zeros(3, np.float32))],
        )

    _, after, result = _run(FuseMatMulAdd(), rank3)
    assert not result.modified
    assert any("rank 3" in n and "onnxruntime" in n for n in result.notes)


# -- cleanup -----------------------------------------------------------------------


def test_cleanup_pipeline_on_messy_graph():
    model = messy()
    reference = messy()
    stats = {}
    # ONNX shape inference needs a sorted graph: sort, then type, then clean.
    for p in (
        TopologicalSort(),
        ShapeInference(),
        FoldConstants(),
        EliminateIdentity(),
        CommonSubexpressionElimination(),
        DeadCodeElimination(),
    ):
        result = p.run(model, PassContext())
        if p.name != "toposort":
            verify(model)
        stats[p.name] = result.stats
        assert_same_outputs(reference, model, atol=REWRITE_TOL, rtol=REWRITE_TOL)
    assert stats["toposort"]["nodes moved"] > 0
    assert stats["shape-inference"]["values typed"] == 4
    assert stats["fold-constants"]["nodes folded"] == 1
    assert stats["fold-constants"]["shapes folded"] == 1
    assert stats["fold-constants"]["constants to initializers"] == 1
    assert stats["eliminate-identity"]["Identity removed"] == 1
    assert stats["eliminate-identity"]["Dropout removed"] == 1
    assert stats["cse"]["nodes merged"] == 2  # relu2 = relu1, then scale2 = scale1
    assert stats["dce"]["nodes removed"] == 1
    assert [n.op_type for n in model.graph] == ["Relu", "Mul", "Add", "Reshape"]
    assert [v.name for v in model.graph.outputs] == ["y"]


@pytest.mark.parametrize(
    "pass_",
    [
        ShapeInference(),
        FoldConstants(),
        DeadCodeElimination(),
        CommonSubexpressionElimination(),
        EliminateIdentity(),
        TopologicalSort(),
    ],
)
def test_cleanup_passes_keep_numerics_on_real_graphs(pass_):
    for build in (small_cnn, mlp):
        before, after, _ = _run(pass_, build)
        assert_same_outputs(before, after, atol=REWRITE_TOL, rtol=REWRITE_TOL)
        assert [v.name for v in after.graph.outputs] == [v.name for v in before.graph.outputs]


def test_passes_are_deterministic():
    from ncc.ir.printer import print_model

    texts = set()
    for _ in range(2):
        model = messy()
        for p in (
            TopologicalSort(),
            ShapeInference(),
            FoldConstants(),
            EliminateIdentity(),
            CommonSubexpressionElimination(),
            DeadCodeElimination(),
            FuseConvBN(),
            FuseMatMulAdd(),
        ):
            p.run(model, PassContext())
        texts.add(print_model(model))
    assert len(texts) == 1


def test_shape_inference_fills_types_and_strict_errors():
    def untyped():
        proto = h.make_model(
            h.make_graph(
                [h.make_node("MatMul", ["x", "w"], ["m"]), h.make_node("Relu", ["m"], ["y"])],
                "g",
                [h.make_tensor_value_info("x", TP.FLOAT, ["N", 4])],
                [h.make_tensor_value_info("y", TP.FLOAT, None)],
                [_init("w", np.ones((4, 3), np.float32))],
            ),
            opset_imports=[h.make_opsetid("", 17)],
        )
        model = ir.serde.deserialize_model(proto)
        ids.assign_ids(model)
        return model

    model = untyped()
    result = ShapeInference().run(model, PassContext())
    assert result.stats["values typed"] == 1  # %m (y had a dtype already)
    m = model.graph.node(0).outputs[0]
    assert m.dtype == ir.DataType.FLOAT and str(m.shape) == "[N,3]"
    assert model.graph.outputs[0].shape is not None

    def broken():
        model = untyped()
        model.graph.initializers["w"].const_value = ir.tensor(np.ones((5, 3), np.float32))
        model.graph.initializers["w"].shape = ir.Shape([5, 3])
        return model

    result = ShapeInference().run(broken(), PassContext())
    assert not result.modified and result.stats["values still untyped"] == 1
    with pytest.raises(NccError, match="shape-inference"):
        ShapeInference(strict=True).run(broken(), PassContext())


def test_weights_are_not_read(tmp_path):
    """A 4M-element external weight behind a Transpose is never loaded by the cleanup passes."""
    missing = tmp_path / "weights.bin"  # never created: reading it would raise

    def build():
        model = _model(
            [h.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), h.make_node("MatMul", ["x", "wt"], ["y"])],
            [h.make_tensor_value_info("x", TP.FLOAT, [1, 2048])],
            [h.make_tensor_value_info("y", TP.FLOAT, [1, 2048])],
            [_init("w", np.zeros((1, 1), np.float32))],
        )
        w = model.graph.initializers["w"]
        w.const_value = ir.ExternalTensor(
            missing.name,
            offset=0,
            length=2048 * 2048 * 4,
            dtype=ir.DataType.FLOAT,
            shape=ir.Shape([2048, 2048]),
            name="w",
            base_dir=str(tmp_path),
        )
        w.shape = ir.Shape([2048, 2048])
        return model

    for p in (
        ShapeInference(),
        FoldConstants(),
        DeadCodeElimination(),
        CommonSubexpressionElimination(),
        EliminateIdentity(),
        TopologicalSort(),
        FuseMatMulAdd(),
        FuseConvBN(),
    ):
        model = build()
        result = p.run(model, PassContext())
        assert model.graph.initializers["w"].const_value.__class__ is ir.ExternalTensor
        if p.name == "fold-constants":
            assert result.stats["skipped (size limit)"] == 1 and result.stats["nodes folded"] == 0


def test_fold_constants_output_names_and_types_are_stable():
    def build():
        return _model(
            [
                h.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
                h.make_node("Cast", ["wt"], ["wt16"], to=TP.FLOAT16),
                h.make_node("Cast", ["x"], ["x16"], to=TP.FLOAT16),
                h.make_node("MatMul", ["x16", "wt16"], ["y"]),
            ],
            [h.make_tensor_value_info("x", TP.FLOAT, [1, 3])],
            [h.make_tensor_value_info("y", TP.FLOAT16, [1, 2])],
            [_init("w", np.arange(6, dtype=np.float32).reshape(2, 3))],
        )

    before, after, result = _run(FoldConstants(), build)
    assert result.stats["nodes folded"] == 2
    wt16 = after.graph.initializers["wt16"]
    assert wt16.dtype == ir.DataType.FLOAT16 and wt16.shape == ir.Shape([3, 2])
    assert_same_outputs(before, after, atol=1e-3, rtol=1e-3)


def test_toposort_reports_cycles():
    model = _model(
        [h.make_node("Relu", ["x"], ["y"])],
        [h.make_tensor_value_info("x", TP.FLOAT, [2])],
        [h.make_tensor_value_info("y", TP.FLOAT, [2])],
    )
    a = ir.Node("", "Neg", [None], name="a")
    b = ir.Node("", "Abs", [a.outputs[0]], name="b")
    a.replace_input_with(0, b.outputs[0])
    model.graph.extend([a, b])
    with pytest.raises(NccError, match="cycle"):
        TopologicalSort().run(model, PassContext())


def test_dce_removes_unused_functions():
    fn = h.make_function(
        "custom", "Unused", ["a"], ["b"], [h.make_node("Neg", ["a"], ["b"])], [h.make_opsetid("", 17)]
    )
    fn2 = h.make_function(
        "custom", "Used", ["a"], ["b"], [h.make_node("Relu", ["a"], ["b"])], [h.make_opsetid("", 17)]
    )
    graph = h.make_graph(
        [h.make_node("Used", ["x"], ["y"], domain="custom")],
        "g",
        [h.make_tensor_value_info("x", TP.FLOAT, [2])],
        [h.make_tensor_value_info("y", TP.FLOAT, [2])],
    )
    proto = h.make_model(
        graph, functions=[fn, fn2], opset_imports=[h.make_opsetid("", 17), h.make_opsetid("custom", 1)]
    )
    before, after = from_proto(proto), from_proto(proto)
    result = DeadCodeElimination().run(after, PassContext())
    assert result.stats["functions removed"] == 1
    assert [f.name for f in after.functions.values()] == ["Used"]
    assert_same_outputs(before, after, atol=REWRITE_TOL, rtol=REWRITE_TOL)


def test_fold_constants_never_materializes_a_huge_constant_of_shape():
    def build():
        return _model(
            [
                h.make_node("ConstantOfShape", ["big"], ["a"]),
                h.make_node("ReduceSum", ["a"], ["s"]),
                h.make_node("ConstantOfShape", ["small"], ["b"]),
                h.make_node("Add", ["x", "b"], ["t"]),
                h.make_node("Add", ["t", "s"], ["y"]),
            ],
            [h.make_tensor_value_info("x", TP.FLOAT, [2, 3])],
            [h.make_tensor_value_info("y", TP.FLOAT, [2, 3])],
            [_init("big", np.array([100000, 100000], np.int64)), _init("small", np.array([2, 3], np.int64))],
        )

    model = build()
    result = FoldConstants().run(model, PassContext())
    assert result.stats["nodes folded"] == 1 and result.stats["skipped (size limit)"] == 1
    # the small ConstantOfShape folds to zeros, and x + 0 then goes too
    assert result.stats["identities removed"] == 1
    assert [n.op_type for n in model.graph] == ["ConstantOfShape", "ReduceSum", "Add"]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["efficientnet", "minilm-legacy", "minilm-dynamo"])
def test_cleanup_pipeline_on_real_models(which):
    """The whole cleanup + fusion pipeline on real exported models keeps their outputs."""
    import realmodels
    from conftest import run_ort
    from ncc.frontends.onnx import load_onnx
    from ncc.passes.manager import PassManager

    if which == "efficientnet":
        path = realmodels.efficientnet_onnx()
    else:
        path = realmodels.minilm_onnx(which.split("-")[1])
    before, after = load_onnx(path), load_onnx(path)
    pipeline = (
        "shape-inference,toposort,fold-constants,eliminate-identity,cse,fuse-conv-bn,fuse-matmul-add,dce"
    )
    PassManager(pipeline).run(after)
    names = [v.name for v in before.graph.inputs]
    if which == "efficientnet":
        feeds = {names[0]: realmodels.photo_crops(2)}
    else:
        feeds = {k: v for k, v in realmodels.minilm_inputs(2).items() if k in names}
    want, got = run_ort(before, feeds), run_ort(after, feeds)
    assert list(want) == list(got)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=FUSION_TOL, rtol=FUSION_TOL)
    assert sum(1 for _ in after.graph) <= sum(1 for _ in before.graph)
