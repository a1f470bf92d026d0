"""Golden pass tests: ``tests/passes/golden/<pass-name>.ncc``.

File format
===========

A file is a list of cases separated by a line ``// =====``. A case is::

    // CASE: folds-add-of-constants            (required, unique in the file)
    // RUN: fold-constants{size-limit=4}       (optional; default: the file's pass name)
    // STATS: nodes folded=1, shapes folded=0  (optional; each listed stat must equal)
    // NUMERICS: off                           (optional; "off", or "atol=1e-5 rtol=1e-5")
    // CALIB: samples=16 seed=0                (optional; calibration data for passes that need it)
    // any other comment line: free text explaining the case
    <input: ncc text>
    // -----
    <expected: the pass's output as printed by ncc.ir.printer.print_model, exactly>

Directive lines come first; the input starts at its first line that is not a
``//`` comment (usually ``// ncc.ir 1`` — kept as part of the input). The
expected text is compared exactly (ignoring leading and trailing blank lines).

For every case the runner parses the input, runs the pass (an instance built
from the RUN spec) with a fresh :class:`PassContext`, verifies the result with
:func:`ncc.ir.verifier.verify`, prints it and compares; then, unless NUMERICS is
off, it runs the input and the output in onnxruntime (optimizations disabled)
on seeded random inputs and compares every graph output: atol = rtol = 1e-6 for
cleanup passes, 1e-5 for ``fuse-*`` passes. With CALIB, the pass context holds that
many seeded random samples of the input model's inputs (normal, or small integers for
integer inputs) as calibration data, in batches of 8.

``NCC_UPDATE_GOLDEN=1 pytest tests/passes/test_golden.py`` rewrites the expected
sections from the current output (directives and inputs are kept as written).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import assert_same_outputs
from ncc.ir.parser import parse
from ncc.ir.printer import print_model
from ncc.passes.base import PassContext
from ncc.passes.spec import parse_pipeline

GOLDEN = Path(__file__).parent / "golden"
CASE_SEP = "// ====="
IO_SEP = "// -----"
_DIRECTIVE = re.compile(r"//\s*(CASE|RUN|STATS|NUMERICS|CALIB):\s*(.*?)\s*$")
UPDATE = os.environ.get("NCC_UPDATE_GOLDEN") == "1"


@dataclass
class Case:
    path: Path
    index: int
    header: list[str]
    input: str
    expected: str
    name: str = ""
    run: str = ""
    stats: dict[str, int] = field(default_factory=dict)
    numerics: str = ""
    calib: str = ""


def split_cases(path: Path) -> list[Case]:
    text = path.read_text(encoding="utf-8")
    cases = []
    chunks = re.split(rf"^{re.escape(CASE_SEP)}[^\n]*\n?", text, flags=re.M)
    for index, chunk in enumerate(c for c in chunks if c.strip()):
        lines = chunk.strip("\n").split("\n")
        header = []
        while lines and lines[0].startswith("//") and not lines[0].startswith("// ncc.ir"):
            header.append(lines.pop(0))
        body = "\n".join(lines)
        parts = re.split(rf"^{re.escape(IO_SEP)}\s*$", body, maxsplit=1, flags=re.M)
        expected = (parts[1].strip("\n") + "\n") if len(parts) > 1 else ""
        case = Case(path, index, header, parts[0].strip("\n") + "\n", expected)
        for line in header:
            m = _DIRECTIVE.match(line)
            if not m:
                continue
            key, value = m.groups()
            if key == "CASE":
                case.name = value
            elif key == "RUN":
                case.run = value
            elif key == "NUMERICS":
                case.numerics = value
            elif key == "CALIB":
                case.calib = value
            else:
                for item in filter(None, (s.strip() for s in value.split(","))):
                    k, _, v = item.rpartition("=")
                    case.stats[k.strip()] = int(v)
        case.run = case.run or path.stem
        case.name = case.name or f"case{index}"
        cases.append(case)
    return cases


def write_cases(path: Path, cases: list[Case], outputs: dict[int, str]) -> None:
    chunks = []
    for case in cases:
        expected = outputs.get(case.index, case.expected)
        chunks.append("\n".join(case.header) + "\n" + case.input + IO_SEP + "\n" + expected)
    path.write_text(("\n" + CASE_SEP + "\n\n").join(chunks), encoding="utf-8")


def _all_cases() -> list:
    params = []
    for path in sorted(GOLDEN.glob("*.ncc")):
        for case in split_cases(path):
            params.append(pytest.param(case, id=f"{path.stem}:{case.name}"))
    return params


_updated: dict[Path, dict[int, str]] = {}


def run_case(case: Case) -> tuple[str, object, object, object]:
    before = parse(case.input, filename=f"{case.path.name}:{case.name}")
    model = parse(case.input, filename=f"{case.path.name}:{case.name}")
    results = []
    ctx = PassContext()
    if case.calib:
        ctx.data["calibration_data"] = _calibration_data(before, case.calib)
    for p in parse_pipeline(case.run):
        results.append(p.run(model, ctx))
    return print_model(model), before, model, results


def _calibration_data(model, spec: str):
    """``samples=N seed=S``: N seeded random samples of ``model``'s inputs, as calibration data."""
    import numpy as np
    from conftest import _ort_feeds
    from ncc.passes.quant.calib_data import CalibrationData

    options = dict(item.partition("=")[::2] for item in spec.split())
    samples, seed = int(options.get("samples", 16)), int(options.get("seed", 0))
    rows = [_ort_feeds(model, seed + i, sym=1) for i in range(samples)]
    arrays = {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}
    return CalibrationData(f"seeded random (seed {seed})", lambda: iter([arrays]), num_samples=samples)


@pytest.mark.parametrize("case", _all_cases())
def test_golden(case: Case) -> None:
    text, before, after, results = run_case(case)
    from ncc.ir.verifier import verify

    verify(after)
    if UPDATE:
        _updated.setdefault(case.path, {})[case.index] = text
        write_cases(case.path, split_cases(case.path), _updated[case.path])
    else:
        assert case.expected, (
            f"{case.path.name}:{case.name} has no expected section (run with NCC_UPDATE_GOLDEN=1)"
        )
        assert text.strip("\n") == case.expected.strip("\n"), (
            f"{case.path.name}:{case.name}: output differs from the golden text\n--- got ---\n{text}"
        )
    stats: dict[str, int] = {}
    for r in results:
        stats.update(r.stats)
    for key, want in case.stats.items():
        assert stats.get(key) == want, (
            f"{case.name}: stat {key!r} = {stats.get(key)}, expected {want} ({stats})"
        )
    # A pass must also say it changed something exactly when the text changed.
    changed = print_model(before) != text
    assert any(r.modified for r in results) == changed, f"{case.name}: modified flag disagrees with the IR"
    if case.numerics.strip().lower() == "off":
        return
    tol = 1e-5 if case.run.startswith("fuse-") else 1e-6
    atol = rtol = tol
    for item in case.numerics.split():
        k, _, v = item.partition("=")
        if k == "atol":
            atol = float(v)
        elif k == "rtol":
            rtol = float(v)
    assert_same_outputs(before, after, atol=atol, rtol=rtol)


def test_every_cleanup_and_fusion_pass_has_golden_cases() -> None:
    from ncc.passes.registry import all_passes

    names = {p.stem for p in GOLDEN.glob("*.ncc")}
    families = ("ncc.passes.cleanup.", "ncc.passes.fusion.")
    mine = {name for name, cls in all_passes().items() if cls.__module__.startswith(families)}
    assert len(mine) >= 11
    assert mine <= names, f"missing golden files: {sorted(mine - names)}"
