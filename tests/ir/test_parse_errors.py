"""Parse errors: ``file:line:col: message``, the source line and a caret under the offending token."""

from __future__ import annotations

import pytest
from ncc.errors import NccError, ParseError
from ncc.ir import parser as parser_module
from ncc.ir.parser import parse, parse_file

HEAD = '// ncc.ir 1\nmodel {ir_version = 8, opset_import = {"" = 17}}\n'


def graph(*body: str, sig: str = "(%x: f32[2]) -> (%y: f32[2])") -> str:
    return HEAD + f"graph @g{sig} {{\n" + "\n".join(f"  {line}" for line in body) + "\n}\n"


def error_of(text: str) -> ParseError:
    with pytest.raises(ParseError) as info:
        parse(text, filename="m.ncc")
    return info.value


def caret_column(err: ParseError) -> int:
    """The column the caret line points at (1-based)."""
    lines = str(err).split("\n")
    return len(lines[2]) - len(lines[2].lstrip(" ")) - 2 + 1


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    ("body", "line", "column", "message"),
    [
        (["%y = Relu(%x : f32[2]", "return %y"], 4, 16, "expected ')' or ',' but found ':'"),
        (["%y = Add(%x, %zz) : f32[2]", "return %y"], 4, 16, "undefined value %zz"),
        (
            ["%y = Relu(%x) : f32[2]", "%y = Relu(%x) : f32[2]", "return %y"],
            5,
            3,
            "value %y is defined twice",
        ),
        (["%y = Relu(%x) : g32[2]", "return %y"], 4, 19, "unknown dtype 'g32'"),
        (["%y = Relu(%x) ; f32[2]", "return %y"], 4, 17, "unexpected character ';'"),
        (['%y = Relu(%x) {a = "abc} : f32[2]', "return %y"], 4, 22, "unterminated string"),
        (["%y = Relu(%x) : f32[2], f32[2]", "return %y"], 4, 8, "Relu has 1 outputs but 2 types"),
        (
            [
                "const @c : f32[] = dense<1.0>",
                "const @c : f32[] = dense<1.0>",
                "%y = Relu(%x) : f32[2]",
                "return %y",
            ],
            5,
            9,
            "constant @c is declared twice",
        ),
        (
            ["const @c : f32[3] = dense<[1.0, 2.0]>", "%y = Relu(%x) : f32[2]", "return %y"],
            4,
            30,
            "expected 3 values for shape [3] but found 2",
        ),
        (
            ["const @c : i8[2] = dense<[1, 2.5]>", "%y = Relu(%x) : f32[2]", "return %y"],
            4,
            32,
            "expected an integer for INT8 data but found 2.5",
        ),
        (["%y = Relu(%x) : f32[2]", "return %q"], 5, 10, "undefined value %q"),
        (["%y = Relu(%x) : f32[2]"], 3, 7, "graph has no return statement"),
    ],
)
def test_errors_point_at_the_token(body, line, column, message, fast, monkeypatch):
    monkeypatch.setattr(parser_module, "USE_FAST_PATH", fast)
    text = graph(*body)
    err = error_of(text)
    first = str(err).split("\n")[0]
    assert first.startswith(f"m.ncc:{line}:{column}: {message}")
    assert (err.line, err.column) == (line, column)
    assert str(err).split("\n")[1] == "  " + text.split("\n")[line - 1]
    assert caret_column(err) == column


def test_unknown_dtype_in_signature():
    err = error_of(graph("%y = Relu(%x) : f32[2]", "return %y", sig="(%x: f33[2]) -> (%y: f32[2])"))
    assert str(err).startswith("m.ncc:3:14: unknown dtype 'f33'")


def test_end_of_input():
    text = HEAD + "graph @g(%x: f32[2]) -> (%y: f32[2]) {\n  %y = Relu(%x) : f32[2]\n"
    err = error_of(text)
    assert "but found end of input" in str(err).split("\n")[0]
    assert str(err).startswith("m.ncc:4:")


def test_message_is_not_a_lark_dump():
    err = error_of(graph("%y = = Relu(%x)", "return %y"))
    text = str(err)
    assert "Token" not in text and "Expected one of" not in text and "lark" not in text.lower()
    assert text.startswith("m.ncc:4:8: expected ")


def test_node_line_where_no_statement_can_stand():
    text = HEAD + "%y = Relu(%x) : f32[2]\ngraph @g() -> () {\n  return\n}\n"
    err = error_of(text)
    assert str(err).startswith("m.ncc:3:1: expected 'graph' but found a node statement")


def test_output_mismatch_and_bad_fields():
    err = error_of(graph("%y = Relu(%x) : f32[2]", "%z = Relu(%x) : f32[2]", "return %z"))
    assert "output %y is declared but 'z' is returned" in str(err)
    err = error_of(HEAD.replace("ir_version", "ir_versoin") + "graph @g() -> () {\n  return\n}\n")
    assert str(err).startswith("m.ncc:2:8: unknown field 'ir_versoin'")
    err = error_of(graph("%y = Foo[versio = 3](%x) : f32[2]", "return %y"))
    assert "unknown operator option 'versio'" in str(err)


def test_input_declared_constant_needs_a_value():
    err = error_of(
        graph("%y = Relu(%x) : f32[2]", "return %y", sig="(%x: f32[2], @w: f32[2]) -> (%y: f32[2])")
    )
    assert "input @w has no const declaration" in str(err)


def test_bad_escape_and_base64():
    err = error_of(graph('%y = Relu(%x) {a = "\\q"} : f32[2]', "return %y"))
    assert "unknown escape '\\q' in string" in str(err)
    text = graph('const @c : f32[20] = b64<"AAAA">', "%y = Relu(%x) : f32[2]", "return %y")
    assert "expected 80 bytes of FLOAT data but found 3" in str(error_of(text))


def test_parse_file_errors(tmp_path):
    with pytest.raises(NccError, match="no such file"):
        parse_file(tmp_path / "missing.ncc")
    bad = tmp_path / "bad.ncc"
    bad.write_text(graph("%y = Relu(%x) : f32[2]", "return %nope"))
    with pytest.raises(ParseError) as info:
        parse_file(bad)
    assert str(info.value).startswith(f"{bad}:5:10: undefined value %nope")
