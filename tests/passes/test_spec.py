"""Pipeline spec strings: parse, print, round trip, and the exact error sentences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest
from ncc.errors import PassSpecError
from ncc.passes import Pass, PassResult, option
from ncc.passes.base import regex
from ncc.passes.pipelines import PIPELINES
from ncc.passes.registry import all_passes
from ncc.passes.spec import describe_pass, format_pass, format_pipeline, parse_pipeline


@dataclass(frozen=True)
class SpecProbe(Pass):
    """A pass with one option of every supported type."""

    name: ClassVar[str] = "test-spec-probe"

    scheme: Literal["sym", "asym"] = option("sym", "quantization scheme")
    granularity: Literal["per-tensor", "per-channel"] = option("per-tensor", "scale granularity")
    bits: int = option(8, "bit width")
    alpha: float = option(0.5, "smoothing strength")
    enabled: bool = option(True, "on or off")
    label: str = option("x", "a free string")
    ops: tuple[str, ...] = option(("Conv", "MatMul"), "op types")
    axes: tuple[int, ...] = option((), "axes")
    limit: int | None = option(None, "optional limit")
    note: str | None = option(None, "optional string")

    def run(self, model, ctx):
        return PassResult(modified=False)


@dataclass(frozen=True)
class SpecPlain(Pass):
    """A pass without options."""

    name: ClassVar[str] = "test-spec-plain"

    def run(self, model, ctx):
        return PassResult(modified=False)


def valid_passes() -> str:
    return ", ".join(sorted(all_passes())) + "; pipelines: " + ", ".join(sorted(PIPELINES)) + "."


# -- parsing and printing ------------------------------------------------------------


def test_defaults_print_as_bare_name():
    (p,) = parse_pipeline("test-spec-probe")
    assert p == SpecProbe()
    assert format_pass(p) == "test-spec-probe"
    assert p.spec() == "test-spec-probe"


def test_options_of_every_type():
    (p,) = parse_pipeline(
        "test-spec-probe{scheme=asym granularity=per-channel bits=4 alpha=0.25 enabled=false "
        "label='a b' ops=Gemm,Conv axes=0,-1 limit=3 note=none}"
    )
    assert p == SpecProbe(
        scheme="asym",
        granularity="per-channel",
        bits=4,
        alpha=0.25,
        enabled=False,
        label="a b",
        ops=("Gemm", "Conv"),
        axes=(0, -1),
        limit=3,
        note=None,
    )
    assert format_pass(p) == (
        'test-spec-probe{scheme=asym granularity=per-channel bits=4 alpha=0.25 enabled=false label="a b" '
        "ops=Gemm,Conv axes=0,-1 limit=3}"
    )


def test_snake_case_keys_are_accepted_and_printed_kebab():
    @dataclass(frozen=True)
    class Snake(Pass):
        name: ClassVar[str] = "test-spec-snake"
        max_sweeps: int = option(10, "bound")

    (p,) = parse_pipeline("test-spec-snake{max_sweeps=3}")
    assert p == Snake(max_sweeps=3)
    assert p.spec() == "test-spec-snake{max-sweeps=3}"
    assert parse_pipeline("test-spec-snake{max-sweeps=3}") == [p]


@pytest.mark.parametrize(
    "spec",
    [
        "test-spec-plain",
        "test-spec-plain,test-spec-probe{bits=4}",
        "test-spec-probe{ops=() axes=1,2,3}",
        'test-spec-probe{label="" note="none"}',
        'test-spec-probe{label="quote \\" and \\\\ slash" note="a,b"}',
        "test-spec-probe{alpha=1e-05 limit=-2}",
        "test-spec-probe{label=true}",
    ],
)
def test_round_trip(spec):
    passes = parse_pipeline(spec)
    text = format_pipeline(passes)
    assert text == spec
    assert parse_pipeline(text) == passes


def test_format_is_canonical():
    messy = "  test-spec-probe { bits=8  scheme=asym   ops='Gemm' } ,test-spec-plain{} "
    passes = parse_pipeline(messy)
    canonical = format_pipeline(passes)
    assert canonical == "test-spec-probe{scheme=asym ops=Gemm},test-spec-plain"
    assert format_pipeline(parse_pipeline(canonical)) == canonical


def test_instances_round_trip():
    passes = [SpecProbe(label="needs quoting{}", note="none", ops=()), SpecPlain(), SpecProbe(alpha=2.0)]
    assert parse_pipeline(format_pipeline(passes)) == passes


def test_empty_spec_is_empty_pipeline():
    assert parse_pipeline("") == []
    assert parse_pipeline("   ") == []
    assert format_pipeline([]) == ""


def test_named_pipeline_expands():
    assert "cleanup" in PIPELINES and "optimize" in PIPELINES
    expected = parse_pipeline(PIPELINES["cleanup"])
    assert parse_pipeline("cleanup") == expected
    assert parse_pipeline("test-spec-plain,cleanup") == [SpecPlain(), *expected]
    assert format_pipeline(parse_pipeline("cleanup")) == PIPELINES["cleanup"]


def test_describe_pass_lists_options():
    text = describe_pass(SpecProbe)
    assert text.splitlines()[0] == "test-spec-probe  A pass with one option of every supported type."
    assert "    scheme: sym|asym = sym  quantization scheme" in text
    assert "    ops: list[str] = Conv,MatMul  op types" in text
    assert "    limit: int | none = none  optional limit" in text


# -- errors -----------------------------------------------------------------------------


def spec_error(spec: str) -> str:
    with pytest.raises(PassSpecError) as info:
        parse_pipeline(spec)
    return str(info.value)


def test_unknown_pass_suggests():
    assert spec_error("fold-constant") == (
        f"unknown pass 'fold-constant'; did you mean 'fold-constants'? Valid passes: {valid_passes()}"
    )


def test_unknown_pass_without_suggestion():
    assert spec_error("zzzzzz") == f"unknown pass 'zzzzzz'. Valid passes: {valid_passes()}"


def test_unknown_option_lists_valid_ones():
    assert spec_error("test-spec-probe{bitz=4}") == (
        "pass 'test-spec-probe' has no option 'bitz'; did you mean 'bits'? Valid options: "
        "scheme, granularity, bits, alpha, enabled, label, ops, axes, limit, note."
    )
    assert (
        spec_error("test-spec-plain{x=1}") == "pass 'test-spec-plain' has no option 'x'; it takes no options."
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "test-spec-probe{scheme=symm}",
            "option 'scheme' of pass 'test-spec-probe' must be one of sym, asym; got 'symm'.",
        ),
        (
            "test-spec-probe{bits=eight}",
            "option 'bits' of pass 'test-spec-probe' must be an integer; got 'eight'.",
        ),
        (
            "test-spec-probe{bits=4.5}",
            "option 'bits' of pass 'test-spec-probe' must be an integer; got '4.5'.",
        ),
        (
            "test-spec-probe{alpha=big}",
            "option 'alpha' of pass 'test-spec-probe' must be a number; got 'big'.",
        ),
        (
            "test-spec-probe{enabled=yes}",
            "option 'enabled' of pass 'test-spec-probe' must be true or false; got 'yes'.",
        ),
        (
            "test-spec-probe{bits=4,8}",
            "option 'bits' of pass 'test-spec-probe' must be an integer (a single value, not a list); got '4,8'.",
        ),
        (
            "test-spec-probe{axes=0,x}",
            "option 'axes' of pass 'test-spec-probe' must be a comma-separated list of integers; got '0,x'.",
        ),
        (
            "test-spec-probe{limit=lots}",
            "option 'limit' of pass 'test-spec-probe' must be an integer or none; got 'lots'.",
        ),
        (
            "test-spec-probe{bits=()}",
            "option 'bits' of pass 'test-spec-probe' must be an integer (a single value, not a list); got an empty list.",
        ),
    ],
)
def test_bad_values_name_pass_option_and_type(spec, message):
    assert spec_error(spec) == message


@pytest.mark.parametrize(
    "spec, first_line",
    [
        (
            "test-spec-probe{bits=4",
            "malformed pass pipeline at column 23: missing '}' closing the options of pass 'test-spec-probe'.",
        ),
        (
            "test-spec-probe{bits}",
            "malformed pass pipeline at column 21: expected '=' after option 'bits' of pass 'test-spec-probe'.",
        ),
        (
            "test-spec-plain,",
            "malformed pass pipeline at column 17: expected a pass name, found the end.",
        ),
        (
            "test-spec-plain,,dce",
            "malformed pass pipeline at column 17: expected a pass name, found ','.",
        ),
        (
            "test-spec-plain test-spec-plain",
            "malformed pass pipeline at column 17: expected ',' or the end after pass 'test-spec-plain', found 't'.",
        ),
        (
            "test-spec-probe{label='abc}",
            "malformed pass pipeline at column 23: unterminated string in option 'label' of pass 'test-spec-probe'.",
        ),
        (
            "test-spec-probe{bits=4 bits=5}",
            "malformed pass pipeline at column 24: option 'bits' given twice for pass 'test-spec-probe'.",
        ),
    ],
)
def test_syntax_errors_point_at_a_column(spec, first_line):
    lines = spec_error(spec).splitlines()
    assert lines[0] == first_line
    assert lines[1] == f"  {spec}"
    column = int(first_line.split("column ")[1].split(":")[0])
    assert lines[2] == "  " + " " * (column - 1) + "^"


def test_pipeline_takes_no_options():
    assert (
        spec_error("cleanup{x=1}")
        == "pipeline 'cleanup' takes no options; give options to its passes instead."
    )


def test_post_init_validation_becomes_spec_error():
    @dataclass(frozen=True)
    class Checked(Pass):
        name: ClassVar[str] = "test-spec-checked"
        bits: int = option(8, "bit width")

        def __post_init__(self):
            if self.bits not in (4, 8):
                raise ValueError(f"bits must be 4 or 8, not {self.bits}")

    message = "invalid options for pass 'test-spec-checked': bits must be 4 or 8, not 3"
    assert spec_error("test-spec-checked{bits=3}") == message


@dataclass(frozen=True)
class RangedProbe(Pass):
    """A pass whose options carry their valid values."""

    name: ClassVar[str] = "test-spec-ranged"

    samples: int = option(8, "samples", min=1)
    fraction: float = option(0.5, "a fraction", min=0, max=1)
    percent: float = option(99.0, "a percentile", gt=0, max=100)
    patterns: tuple[str, ...] = option((), "regexes", check=regex)
    limit: int | None = option(None, "optional limit", min=0)

    def run(self, model, ctx):
        return PassResult(modified=False)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{samples=0}", "test-spec-ranged: samples must be at least 1, got 0."),
        ("{fraction=5}", "test-spec-ranged: fraction must be in [0, 1], got 5.0."),
        ("{fraction=-0.1}", "test-spec-ranged: fraction must be in [0, 1], got -0.1."),
        ("{percent=0}", "test-spec-ranged: percent must be in (0, 100], got 0.0."),
        ("{fraction=nan}", "test-spec-ranged: fraction must be a finite number, got nan."),
        ("{percent=inf}", "test-spec-ranged: percent must be a finite number, got inf."),
        ("{patterns=a,'('}", "test-spec-ranged: patterns has '(', which is not a regular expression"),
        ("{limit=-1}", "test-spec-ranged: limit must be at least 0, got -1."),
    ],
)
def test_option_ranges_are_checked_when_a_pass_is_built(spec, message):
    assert spec_error(f"test-spec-ranged{spec}").startswith(message)


def test_option_ranges_hold_for_python_construction_and_replace_and_take_their_bounds():
    import dataclasses

    p = RangedProbe(samples=1, fraction=0.0, percent=100.0, patterns=("^a$",), limit=None)
    assert (p.samples, p.fraction, p.percent, p.limit) == (1, 0.0, 100.0, None)
    with pytest.raises(PassSpecError, match=r"samples must be at least 1, got 0\."):
        RangedProbe(samples=0)
    with pytest.raises(PassSpecError, match=r"fraction must be in \[0, 1\], got 1\.5\."):
        dataclasses.replace(p, fraction=1.5)
    text = describe_pass(RangedProbe)
    assert "    samples: int >= 1 = 8  samples" in text
    assert "    fraction: float in [0, 1] = 0.5  a fraction" in text
    assert "    percent: float in (0, 100] = 99.0  a percentile" in text
