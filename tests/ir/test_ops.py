"""ir/ops.py: the two spellings of the standard domain, the opset look-up, the op families."""

from __future__ import annotations

import onnx_ir as ir
from ncc.ir.ops import (
    DATA_MOVEMENT,
    PASSTHROUGH,
    VALUE_MOVES,
    ensure_opset,
    is_onnx_domain,
    onnx_opset,
    set_onnx_opset,
)
from ncc.targets import TARGETS


def _model(imports: dict[str, int]) -> ir.Model:
    return ir.Model(ir.Graph([], [], nodes=[], opset_imports=imports), ir_version=8)


def test_both_spellings_of_the_standard_domain():
    assert is_onnx_domain("") and is_onnx_domain("ai.onnx")
    assert not is_onnx_domain("com.microsoft") and not is_onnx_domain("ai.onnx.ml")
    node = ir.Node("ai.onnx", "Relu", [ir.Value(name="x")])
    assert is_onnx_domain(node) and not is_onnx_domain(ir.Node("com.microsoft", "Gelu", []))


def test_the_standard_opset_under_either_spelling():
    assert onnx_opset(_model({"": 17})) == 17
    assert onnx_opset(_model({"ai.onnx": 13, "com.microsoft": 1})) == 13
    assert onnx_opset(_model({"custom": 1})) == 1 and onnx_opset(_model({}), default=21) == 21
    spelled = _model({"ai.onnx": 13})
    set_onnx_opset(spelled, 17)
    assert dict(spelled.opset_imports) == {"ai.onnx": 17}
    plain = _model({"": 13})
    set_onnx_opset(plain, 17)
    ensure_opset(plain, "com.microsoft")
    ensure_opset(plain, "", 1)  # imported already: untouched
    assert dict(plain.opset_imports) == {"": 17, "com.microsoft": 1}


def test_families_are_nested_and_the_targets_take_theirs_from_them():
    assert VALUE_MOVES < DATA_MOVEMENT < PASSTHROUGH
    assert PASSTHROUGH - DATA_MOVEMENT == {"Resize"}
    for target in TARGETS.values():
        assert target.passthrough_ops <= PASSTHROUGH
