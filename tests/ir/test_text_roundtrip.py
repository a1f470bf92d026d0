"""Text form round trips: text -> IR -> text is the identity, in both modes."""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from ncc.backends.onnx.emit import to_proto
from ncc.errors import NccError, ParseError
from ncc.frontends.onnx import from_proto
from ncc.ir import parser as parser_module
from ncc.ir.parser import parse, parse_file
from ncc.ir.printer import fingerprint, format_float, print_model, print_node
from ncc.ir.tensors import ElidedTensor
from onnx import TensorProto as TP
from onnx import helper as oh

RICH = r"""// ncc.ir 1
model {ir_version = 10, opset_import = {"" = 21, "com.microsoft" = 1, custom = 1}, producer_name = "pytorch", producer_version = "2.13.0", domain = "ai.ncc", model_version = 3, doc_string = "a \"doc\"\nline\x00\xff", metadata_props = {"k" = "v", "author" = "me"}}
graph @main_graph(%x: f32[N,3,32,32], %mask: i64[N,?], @w: f32[8,3,3,3], %"/layer.0/in": f32, %seqin: seq<f32>, %o: opt<seq<i64>>, %u: ?, %sp: sparse<f32>[2,2], %s2: ?[3]) -> (%out: f32[N,8,32,32], %y: f32[N,8,32,32], @w: f32[8,3,3,3], %x: f32[N,3,32,32]) with {doc_string = "graph doc", metadata_props = {"gk" = "gv"}} {
  const @x_scale : f32[] = dense<0.02>
  const @w : f32[8,3,3,3] = elided<sha256:9f2c41e0aa12bb34>
  const @b : f32[8] = dense<[0.011, 0.009, 0.01, 0.012, nan, inf, -inf, -0.0]>
  const @strs : str[2] = dense<["a\n", "\xff\x00"]>
  const @h : f16[2] = dense<[0.1, 65500.0]>
  const @bf : bf16[2] = dense<[0.1, 3.0]>
  const @d : f64[1] = dense<[0.1]>
  const @c : c64[2] = dense<[(1.0, -2.0), (nan, 0.5)]>
  const @q : i4[3] = dense<[-8, 0, 7]>
  const @uq : u4[3] = dense<[15, 0, 7]>
  const @i2 : i2[2] = dense<[-2, 1]>
  const @u2 : u2[2] = dense<[3, 1]>
  const @f8 : f8e4m3fn[2] = dense<[0.5, 448.0]>
  const @f8b : f8e5m2[1] = dense<[0.5]>
  const @f8c : f8e4m3fnuz[1] = dense<[0.5]>
  const @f8d : f8e5m2fnuz[1] = dense<[0.5]>
  const @f8e : f8e8m0[1] = dense<[0.5]>
  const @f4 : f4e2m1[2] = dense<[0.5, -6.0]>
  const @bo : bool[2] = dense<[true, false]>
  const @u64 : u64[1] = dense<[18446744073709551615]>
  const @i64 : i64[1] = dense<[-9223372036854775808]>
  const @empty : f32[0,3] = dense<[]>
  %y = Conv(%x, @w, @b) {pads = [1, 1, 1, 1], strides = [1, 1], f = 1.0, e = ints[], ef = floats[], es = strings[], et = tensors[], eg = graphs[], t = type<seq<f32>>, ts = [type<f32[2]>, type<?>], tl = [f32[1] dense<[1.0]>, i64[] dense<3> named "t"], "weird attr" = "x"} : f32[N,8,32,32]  loc("conv0" #3)
  %a, none = com.microsoft::Foo(%y, none, %"/layer.0/in") {alpha = 0.5} : f32[N,8,32,32], ?  loc("foo" #4 fused[#1, #2]) meta {"note" = "hi", "ncc.id2" = "x"}
  %"onnx::Relu_3" = Relu[version = 21](%a) : f32[N,8,32,32]  loc(#5)
  %lp, %ls = Loop(none, %cond, %a) {body = graph @body(%i: i64[], %c: bool[], %acc: f32[N,8,32,32]) -> (%c2: bool[], %acc2: f32[N,8,32,32], %sc: f32) {
    const @one : f32[] = dense<1.0>
    %c2 = Identity(%c) : bool[]
    %acc2 = Add(%acc, %"onnx::Relu_3") : f32[N,8,32,32]  loc("" #7)
    %sc = If(%c) {then_branch = graph @t() -> (%tt: f32) {
      %tt = Mul(%acc2, @x_scale) : f32
      return %tt
    }, else_branch = graph() -> (%ee: f32) {
      %ee = Identity(@one) : f32
      return %ee
    }} : f32
    return %c2, %acc2, %sc
  }} : f32[N,8,32,32], f32[?,N,8,32,32]  loc("loop" #6)
  %cond = Constant() {value = bool[] dense<true>} : bool[]
  %out = custom::MyFn[overload = "v2"](%"onnx::Relu_3", %lp) {alpha = 2.0} : f32[N,8,32,32]
  Print(%out)
  return %out, %y, @w, %x
}
func custom::MyFn[overload = "v2"](%p: ?, %q: ?) -> (%r: ?) attrs {alpha = 1.0, beta = unset<int>} with {opset_import = {"" = 21}, doc_string = "fn"} {
  %s = Mul(%p, %q) {alpha = ref<"alpha", float>} : ?
  %r = Add(%s, %p)
  return %r
}
func Other(%p: ?) -> (%p: ?) {
  return %p
}
"""

HEAD = '// ncc.ir 1\nmodel {ir_version = 10, opset_import = {"" = 21}}\n'


def roundtrip(text: str, **kw) -> str:
    """Parse, print and check the printed text parses back to itself."""
    model = parse(text, **{k: v for k, v in kw.items() if k == "base_dir"})
    printed = print_model(model, **{k: v for k, v in kw.items() if k != "base_dir"})
    assert (
        print_model(
            parse(printed, **{k: v for k, v in kw.items() if k == "base_dir"}),
            **{k: v for k, v in kw.items() if k != "base_dir"},
        )
        == printed
    )
    return printed


def test_rich_text_is_a_fixed_point():
    printed = roundtrip(RICH)
    assert roundtrip(printed) == printed
    # The hand-written text comes back line for line, up to the node names onnx-ir gives unnamed nodes
    # and the normalizations the printer applies (quoted keys, shortest f16/f8 floats, field order).
    normalized = re.sub(r'  loc[(]"node_[A-Za-z0-9_]+"[)]', "", printed)
    normalized = re.sub(r'loc[(]"node_[A-Za-z0-9_]+" ', "loc(", normalized)
    theirs = set(normalized.splitlines())
    missing = [line for line in RICH.splitlines() if line not in theirs]
    assert missing == [
        RICH.splitlines()[1],  # custom = 1 prints as "custom" = 1
        "  const @h : f16[2] = dense<[0.1, 65500.0]>",  # shortest f16 form is 6.55e+04
        "  const @f8 : f8e4m3fn[2] = dense<[0.5, 448.0]>",
        'func custom::MyFn[overload = "v2"](%p: ?, %q: ?) -> (%r: ?) attrs {alpha = 1.0, beta = unset<int>} '
        'with {opset_import = {"" = 21}, doc_string = "fn"} {',  # with {...} fields print in a fixed order
        "  %r = Add(%s, %p)",  # an untyped output prints its type: ?
    ], missing


def test_rich_text_model_contents():
    model = parse(RICH)
    g = model.graph
    assert model.ir_version == 10 and g.opset_imports == {"": 21, "com.microsoft": 1, "custom": 1}
    assert model.doc_string == 'a "doc"\nline\x00\udcff'
    assert model.metadata_props == {"k": "v", "author": "me"}
    assert [v.name for v in g.inputs][:4] == ["x", "mask", "w", "/layer.0/in"]
    assert g.inputs[2].is_initializer() and g.inputs[2] is g.initializers["w"]
    assert isinstance(g.initializers["w"].const_value, ElidedTensor)
    assert str(g.inputs[0].shape) == "[N,3,32,32]" and g.inputs[1].shape[1].value is None
    assert g.inputs[3].shape is None  # unknown rank
    assert isinstance(g.inputs[4].type, ir.SequenceType)
    assert isinstance(g.inputs[5].type, ir.OptionalType) and isinstance(
        g.inputs[5].type.elem_type, ir.SequenceType
    )
    assert g.inputs[6].type is None and g.inputs[8].type is None and list(g.inputs[8].shape) == [3]
    b = g.initializers["b"].const_value.numpy()
    assert b[:4].tolist() == [np.float32(x) for x in (0.011, 0.009, 0.01, 0.012)]
    assert (
        math.isnan(b[4]) and b[5] == np.inf and b[6] == -np.inf and b[7] == 0 and math.copysign(1, b[7]) < 0
    )
    assert g.initializers["strs"].const_value.numpy().tolist() == [b"a\n", b"\xff\x00"]
    assert g.initializers["q"].const_value.numpy().astype(int).tolist() == [-8, 0, 7]
    assert g.initializers["u64"].const_value.numpy().tolist() == [2**64 - 1]
    assert g.initializers["c"].const_value.numpy()[0] == 1 - 2j
    conv = g.node(0)
    assert conv.attributes["f"].type == ir.AttributeType.FLOAT and conv.attributes["f"].value == 1.0
    assert conv.attributes["pads"].type == ir.AttributeType.INTS
    for name, kind in [
        ("e", "INTS"),
        ("ef", "FLOATS"),
        ("es", "STRINGS"),
        ("et", "TENSORS"),
        ("eg", "GRAPHS"),
    ]:
        assert (
            conv.attributes[name].type == getattr(ir.AttributeType, kind)
            and list(conv.attributes[name].value) == []
        )
    assert conv.attributes["tl"].value[1].name == "t"
    assert conv.metadata_props == {"ncc.id": "3"} and conv.name == "conv0"
    foo = g.node(1)
    assert foo.domain == "com.microsoft" and foo.inputs[1] is None and foo.outputs[1].name == ""
    assert foo.metadata_props == {"ncc.id": "4", "ncc.fused": "1,2", "note": "hi", "ncc.id2": "x"}
    assert g.node(2).version == 21
    loop = g.node(3)
    body = loop.attributes["body"].value
    add = body.node(1)
    assert add.inputs[1] is g.node(2).outputs[0]  # outer-scope reference resolved
    inner_if = body.node(2)
    mul = inner_if.attributes["then_branch"].value.node(0)
    assert mul.inputs[0] is add.outputs[0] and mul.inputs[1] is g.initializers["x_scale"]
    assert loop.inputs[1] is g.node(4).outputs[0]  # used before its definition
    fn = model.functions[("custom", "MyFn", "v2")]
    assert fn.attributes["alpha"].value == 1.0 and fn.attributes["beta"].value is None
    mul = fn.graph.node(0)
    assert mul.attributes["alpha"].is_ref() and mul.attributes["alpha"].ref_attr_name == "alpha"
    assert fn.opset_imports == {"": 21}
    assert g.node(5).overload == "v2"


def test_parse_is_the_same_with_and_without_the_fast_path(monkeypatch):
    fast = print_model(parse(RICH))
    monkeypatch.setattr(parser_module, "USE_FAST_PATH", False)
    assert print_model(parse(RICH)) == fast


def _conv_model(n_out: int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_out, 3, 3, 3)).astype(np.float32)
    nodes = [
        oh.make_node("Conv", ["x", "w", ""], ["onnx::Relu_3"], name="conv0", pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["onnx::Relu_3"], ["/layer.0/out"], name="dup"),
        oh.make_node("Constant", [], ["c"], name="dup", value_float=0.1),
        oh.make_node("Constant", [], ["cs"], value_strings=["a", "b\u00e9"]),
        oh.make_node("Constant", [], ["ci"], value_ints=[1, -2]),
        oh.make_node("Mul", ["/layer.0/out", "c"], ["y"]),
        oh.make_node("Dropout", ["y"], ["out", ""]),
    ]
    g = oh.make_graph(
        nodes,
        "g",
        [
            oh.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 8, 8]),
            oh.make_tensor_value_info("w", TP.FLOAT, [n_out, 3, 3, 3]),
        ],
        [oh.make_tensor_value_info("out", TP.FLOAT, ["N", n_out, 8, 8])],
        initializer=[onnx.numpy_helper.from_array(w, "w")],
    )
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)], producer_name="test", doc_string="d")


def test_onnx_model_roundtrips_in_both_modes(tmp_path):
    model = from_proto(_conv_model(), check=False)
    short = print_model(model)
    assert re.search(r"const @w : f32\[8,3,3,3\] = elided<sha256:[0-9a-f]{16}>", short)
    assert "graph @g(%x: f32[N,3,8,8], @w: f32[8,3,3,3])" in short
    assert '%"onnx::Relu_3" = Conv(%x, @w, none)' in short and '%"/layer.0/out"' in short
    assert "%out, none = Dropout(%y)" in short
    assert "{value_float = 0.1}" in short and 'value_strings = ["a", "b\u00e9"]' in short
    assert print_model(parse(short)) == short
    full = print_model(model, full=True)
    assert "b64<" in full and "elided" not in full
    rebuilt = parse(full)
    assert print_model(rebuilt, full=True) == full
    assert print_model(rebuilt) == short
    original, again = to_proto(model), to_proto(rebuilt)
    assert [n.name for n in again.graph.node] == ["conv0", "dup", "dup"] + [
        n.name for n in original.graph.node
    ][3:]
    assert again.graph.initializer[0].raw_data == original.graph.initializer[0].raw_data or np.array_equal(
        onnx.numpy_helper.to_array(again.graph.initializer[0]),
        onnx.numpy_helper.to_array(original.graph.initializer[0]),
    )
    assert [list(n.metadata_props) for n in again.graph.node] == [
        list(n.metadata_props) for n in original.graph.node
    ]
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    outs = [
        ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        for p in (original, again)
    ]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_onnx_functions_roundtrip():
    fn = oh.make_function(
        "custom",
        "Scale",
        ["a"],
        ["b"],
        [oh.make_node("Constant", [], ["s"], value_float=2.0), oh.make_node("Mul", ["a", "s"], ["b"])],
        opset_imports=[oh.make_opsetid("", 17)],
        attributes=["unused"],
    )
    g = oh.make_graph(
        [oh.make_node("Scale", ["x"], ["y"], domain="custom")],
        "g",
        [oh.make_tensor_value_info("x", TP.FLOAT, [2])],
        [oh.make_tensor_value_info("y", TP.FLOAT, [2])],
    )
    proto = oh.make_model(
        g, functions=[fn], opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("custom", 1)]
    )
    model = from_proto(proto, check=False)
    text = print_model(model, full=True)
    assert (
        "func custom::Scale(%a: ?) -> (%b: ?) attrs {unused = unset<undefined>}" in text
        or "func custom::Scale(" in text
    )
    again = parse(text)
    assert print_model(again, full=True) == text
    import onnxruntime as ort

    x = np.array([1.5, -2.0], dtype=np.float32)
    got = ort.InferenceSession(to_proto(again).SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    np.testing.assert_array_equal(got[0], x * 2)


def test_unnamed_values_get_stable_fresh_names():
    x = ir.Value(name="_unnamed0", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    a = ir.Node("", "Relu", [x])
    b = ir.Node("", "Neg", [a.outputs[0]])
    a.outputs[0].name = None
    b.outputs[0].name = None
    graph = ir.Graph([x], [b.outputs[0]], nodes=[a, b], name="g", opset_imports={"": 17})
    a.outputs[0].name = None
    b.outputs[0].name = None
    model = ir.Model(graph, ir_version=8)
    text = print_model(model)
    # Fresh names never clash with real ones (the input is really called _unnamed0).
    assert "-> (%_unnamed1: ?)" in text
    assert "%_unnamed2 = Relu(%_unnamed0)" in text and "%_unnamed1 = Neg(%_unnamed2)" in text
    assert print_model(model) == text
    assert print_model(parse(text)) == text


def test_sidecar_full_mode(tmp_path):
    model = from_proto(_conv_model(n_out=16), check=False)
    data = tmp_path / "m.ncc.data"
    text = print_model(model, full=True, data_file=data)
    match = re.search(r'external<"m.ncc.data", offset=0, length=1728, sha256:([0-9a-f]{64})>', text)
    assert match, text
    assert data.stat().st_size == 1728
    assert print_model(model, full=True, data_file=data) == text  # deterministic, file rewritten identically
    (tmp_path / "m.ncc").write_text(text)
    again = parse_file(tmp_path / "m.ncc")
    w = again.graph.initializers["w"].const_value
    assert isinstance(w, ir.ExternalTensor)
    np.testing.assert_array_equal(w.numpy(), model.graph.initializers["w"].const_value.numpy())
    assert print_model(again) == print_model(model)
    other = tmp_path / "o.ncc.data"
    assert print_model(again, full=True, data_file=other) == text.replace("m.ncc.data", "o.ncc.data")
    assert other.read_bytes() == data.read_bytes()


def test_sidecar_alignment_and_order(tmp_path):
    rng = np.random.default_rng(0)
    inits = []
    for i, n in enumerate((17, 100, 33)):
        t = ir.Tensor(rng.standard_normal(n).astype(np.float32), name=f"t{i}")
        inits.append(
            ir.Value(name=f"t{i}", const_value=t, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([n]))
        )
    node = ir.Node("", "Concat", inits, [ir.AttrInt64("axis", 0)])
    node.outputs[0].name = "y"
    graph = ir.Graph(
        [], [node.outputs[0]], nodes=[node], initializers=inits, name="g", opset_imports={"": 17}
    )
    text = print_model(ir.Model(graph, ir_version=8), full=True, data_file=tmp_path / "d.bin")
    offsets = [int(m) for m in re.findall(r"offset=(\d+)", text)]
    assert offsets == [0, 128, 576]
    assert all(o % 64 == 0 for o in offsets)


def test_sidecar_hash_mismatch_and_missing(tmp_path):
    model = from_proto(_conv_model(), check=False)
    text = print_model(model, full=True, data_file=tmp_path / "m.ncc.data")
    (tmp_path / "m.ncc").write_text(text)
    raw = bytearray((tmp_path / "m.ncc.data").read_bytes())
    raw[5] ^= 0xFF
    (tmp_path / "m.ncc.data").write_bytes(bytes(raw))
    with pytest.raises(
        ParseError, match=r"m\.ncc:4:\d+: sha256 of m\.ncc\.data\[0:864\] does not match"
    ) as err:
        parse_file(tmp_path / "m.ncc")
    real = hashlib.sha256(bytes(raw[:864])).hexdigest()
    assert real[:8] not in str(err.value).splitlines()[0]  # a guess is never answered with the real digest
    (tmp_path / "m.ncc.data").unlink()
    with pytest.raises(ParseError, match="sidecar data file 'm.ncc.data' not found"):
        parse_file(tmp_path / "m.ncc")


def test_elided_placeholder():
    model = from_proto(_conv_model(), check=False)
    short = print_model(model)
    again = parse(short)
    w = again.graph.initializers["w"].const_value
    assert isinstance(w, ElidedTensor) and w.dtype == ir.DataType.FLOAT and list(w.shape) == [8, 3, 3, 3]
    message = "constant @w was elided from the dump; re-dump with --full to rebuild the model."
    for call in (w.numpy, w.tobytes):
        with pytest.raises(NccError) as err:
            call()
        assert str(err.value) == message
    with pytest.raises(NccError, match="re-dump with --full"):
        print_model(again, full=True)
    assert fingerprint(again) == fingerprint(model)


def test_hash_is_cached_and_streams_external(tmp_path):
    arr = np.arange(1000, dtype=np.float32)
    (tmp_path / "w.bin").write_bytes(b"\0" * 16 + arr.tobytes())
    t = ir.ExternalTensor(
        "w.bin", 16, arr.nbytes, ir.DataType.FLOAT, shape=ir.Shape([1000]), name="w", base_dir=tmp_path
    )
    v = ir.Value(name="w", const_value=t, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1000]))
    node = ir.Node("", "Identity", [v])
    node.outputs[0].name = "y"
    model = ir.Model(
        ir.Graph([], [node.outputs[0]], nodes=[node], initializers=[v], opset_imports={"": 17}), ir_version=8
    )

    text = print_model(model)
    assert f"elided<sha256:{hashlib.sha256(arr.tobytes()).hexdigest()[:16]}>" in text
    assert t.meta["ncc.sha256"] == hashlib.sha256(arr.tobytes()).hexdigest()
    t.meta["ncc.sha256"] = "ab" * 32  # a cached hash is trusted, not recomputed
    assert "elided<sha256:abababababababab>" in print_model(model)


def test_fingerprint_tracks_changes():
    model = from_proto(_conv_model(), check=False)
    before = fingerprint(model)
    assert fingerprint(model) == before and len(before) == 64
    model.graph.node(1).op_type = "Sigmoid"
    assert fingerprint(model) != before


def test_print_node_is_one_line():
    model = parse(RICH)
    line = print_node(model.graph.node(1))
    assert line == (
        '%a, none = com.microsoft::Foo(%y, none, %"/layer.0/in") {alpha = 0.5} : f32[N,8,32,32], ?  '
        'loc("foo" #4 fused[#1, #2]) meta {"note" = "hi", "ncc.id2" = "x"}'
    )


@pytest.mark.parametrize(
    ("value", "dtype", "text"),
    [
        (0.02, ir.DataType.FLOAT, "0.02"),
        (np.float32(0.1), ir.DataType.FLOAT, "0.1"),
        (1.0, ir.DataType.FLOAT, "1.0"),
        (1e-5, ir.DataType.FLOAT, "1e-05"),
        (3.4028234663852886e38, ir.DataType.FLOAT, "3.4028235e+38"),
        (float("nan"), ir.DataType.FLOAT, "nan"),
        (float("-inf"), ir.DataType.FLOAT, "-inf"),
        (-0.0, ir.DataType.FLOAT, "-0.0"),
        (0.1, ir.DataType.DOUBLE, "0.1"),
        (0.1 + 2**-40, ir.DataType.DOUBLE, repr(0.1 + 2**-40)),
        (0.0999755859375, ir.DataType.FLOAT16, "0.1"),
        (0.10009765625, ir.DataType.BFLOAT16, "0.1"),
        (448.0, ir.DataType.FLOAT8E4M3FN, "4.5e+02"),
    ],
)
def test_shortest_floats(value, dtype, text):
    assert format_float(value, dtype) == text
    back = float(text)
    np_dtype = np.float64 if dtype == ir.DataType.DOUBLE else dtype.numpy().type
    assert np.array(back, dtype=np_dtype).tobytes() == np.array(
        value, dtype=np_dtype
    ).tobytes() or math.isnan(back)


def test_every_dtype_small_constant_roundtrips():
    lines = []
    values = {"f": "[1.5, -0.0]", "i": "[-1, 1]", "u": "[0, 1]"}
    for dt in ir.DataType:
        if dt in (ir.DataType.UNDEFINED,):
            continue
        from ncc.ir.printer import DTYPE_NAMES

        name = DTYPE_NAMES[dt]
        if dt == ir.DataType.STRING:
            data = '["x", "\\xff"]'
        elif dt == ir.DataType.BOOL:
            data = "[true, false]"
        elif dt in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128):
            data = "[(1.0, 2.0), (-0.0, nan)]"
        elif dt.is_floating_point():
            data = "[0.5, -0.0]" if "FNUZ" not in dt.name and dt != ir.DataType.FLOAT8E8M0 else "[0.5, 2.0]"
        else:
            data = values["i" if dt.is_signed() else "u"]
        lines.append(f"  const @c_{name} : {name}[2] = dense<{data}>")
    text = HEAD + "graph @g() -> () {\n" + "\n".join(lines) + "\n  return\n}\n"
    assert roundtrip(text) == text
    assert roundtrip(text, full=True) == text
    model = parse(text)
    proto = to_proto(model)
    assert len(proto.graph.initializer) == len(lines)
    again = from_proto(proto, check=False)
    assert print_model(again) == text


def test_large_constants_of_every_dtype_roundtrip_in_full_mode(tmp_path):
    rng = np.random.default_rng(0)
    inits = []
    for dt in ir.DataType:
        if dt in (ir.DataType.UNDEFINED,):
            continue
        if dt == ir.DataType.STRING:
            arr = np.array([f"s{i}".encode() for i in range(20)], dtype=object)
            tensor = ir.StringTensor(arr, name=f"c{dt.value}")
        else:
            arr = (
                rng.integers(0, 2, 20).astype(dt.numpy())
                if dt != ir.DataType.BOOL
                else rng.integers(0, 2, 20).astype(bool)
            )
            tensor = ir.Tensor(arr, dtype=dt, name=f"c{dt.value}")
        inits.append(
            ir.Value(name=f"c{dt.value}", const_value=tensor, type=ir.TensorType(dt), shape=ir.Shape([20]))
        )
    model = ir.Model(
        ir.Graph([], [], nodes=[], initializers=inits, name="g", opset_imports={"": 21}), ir_version=10
    )
    full = print_model(model, full=True)
    assert full.count("b64<") == len(inits) - 1
    again = parse(full)
    assert print_model(again, full=True) == full
    side = print_model(model, full=True, data_file=tmp_path / "d")
    assert print_model(parse(side, base_dir=tmp_path), full=True, data_file=tmp_path / "e") == side.replace(
        '"d"', '"e"'
    )
    for v in model.graph.initializers.values():
        a = again.graph.initializers[v.name].const_value
        assert a.tobytes() == v.const_value.tobytes() if v.const_value.dtype != ir.DataType.STRING else True


def test_strings_escape_any_bytes():
    every = bytes(range(256))
    t = ir.StringTensor(np.array([every, b"", "é\u2028".encode()], dtype=object), name="s")
    v = ir.Value(name="s", const_value=t, type=ir.TensorType(ir.DataType.STRING), shape=ir.Shape([3]))
    attr_text = 'tab\there "q" \\ \x01 é \u2028 end'
    node = ir.Node("", "Identity", [v], [ir.AttrString("note", attr_text)], name='n\n"x"')
    node.outputs[0].name = 'weird "name"\n'
    graph = ir.Graph([], [node.outputs[0]], nodes=[node], initializers=[v], name="g", opset_imports={"": 17})
    text = print_model(ir.Model(graph, ir_version=8))
    assert "\n" not in text.split("\n", 4)[3][:-1]  # one line per statement
    again = parse(text)
    assert again.graph.initializers["s"].const_value.numpy().tolist() == [every, b"", "é\u2028".encode()]
    assert again.graph.node(0).attributes["note"].value == attr_text
    assert again.graph.node(0).name == 'n\n"x"'
    assert again.graph.outputs[0].name == 'weird "name"\n'
    assert print_model(again) == text


def test_output_is_deterministic_across_parses():
    texts = {print_model(parse(RICH)) for _ in range(3)}
    assert len(texts) == 1


def test_chain_scales_linearly():
    """Work grows linearly with the graph: counted as function calls (deterministic, unlike seconds on a
    shared machine), 10x the nodes must cost under 11x the calls (a quadratic step would cost 100x)."""
    import sys

    def chain(n: int) -> str:
        lines = [HEAD + "graph @g(%v0: f32[N,8]) -> (%v" + str(n) + ": f32[N,8]) {"]
        lines += [f'  %v{i + 1} = Relu(%v{i}) : f32[N,8]  loc("r{i}" #{i})' for i in range(n)]
        lines += [f"  return %v{n}", "}", ""]
        return "\n".join(lines)

    def calls(text: str) -> int:
        count = 0

        def count_calls(frame, event, arg):
            nonlocal count
            if event in ("call", "c_call"):
                count += 1

        sys.setprofile(count_calls)
        try:
            again = print_model(parse(text))
        finally:
            sys.setprofile(None)
        assert again == text
        return count

    small, large = calls(chain(2000)), calls(chain(20000))
    assert large < 11 * small, (small, large)
