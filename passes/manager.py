"""The pass manager: runs a pipeline and owns everything around the passes.

For each pass: ``requires`` → ``run`` → ``ensures`` → the verifier (unless
``verify=False``). Instruments, like MLIR's, live outside the passes:

=========================  ==========================  =====================================
Instruments field           CLI flag                    effect
=========================  ==========================  =====================================
``print_ir_before``         ``--print-ir-before=NAME``  IR before each pass named NAME
``print_ir_after``          ``--print-ir-after=NAME``   IR after each pass named NAME
``print_ir_after_all``      ``--print-ir-after-all``    IR after every pass
``print_ir_after_change``   ``--print-ir-after-change`` IR after passes that changed its fingerprint
``print_ir_after_failure``  ``--print-ir-after-failure`` IR as left by a failing pass, then re-raise
``print_ir_full``           ``--print-ir-full``         dumps print every constant in full
``dump_ir_dir``             ``--dump-ir-dir=DIR``       ``00-input.ncc``, ``01-<pass>.ncc``, ...
``time_passes``             ``--time-passes``           timing table at the end of the run
``pass_statistics``         ``--pass-statistics``       statistics table at the end of the run
=========================  ==========================  =====================================

"Changed" is decided by comparing :func:`ncc.ir.printer.fingerprint` before
and after a pass (computed only when ``print_ir_after_change`` is on), never
by the pass's own ``modified`` claim. :meth:`PassManager.run` returns a
:class:`RunReport` with one row per pass.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import ncc.runtime  # noqa: F401  (registers onnxruntime's contrib op schemas with the verifier)
import onnx_ir as ir
from ncc.errors import NccError, PassSpecError, VerificationError
from ncc.passes.base import Pass, PassContext, PassResult

_DUMP_RE = re.compile(r"\d{2,}-[^/\\]+\.ncc\Z")


@dataclass(frozen=True)
class Instruments:
    """What the manager prints, dumps and measures around the passes (the CLI flags map 1:1)."""

    print_ir_before: tuple[str, ...] = ()
    print_ir_after: tuple[str, ...] = ()
    print_ir_after_all: bool = False
    print_ir_after_change: bool = False
    print_ir_after_failure: bool = False
    #: Print every constant in full in dumps (the default elides large ones with a content hash).
    print_ir_full: bool = False
    dump_ir_dir: Path | None = None
    time_passes: bool = False
    pass_statistics: bool = False
    #: Where printed IR and tables go; None means ``sys.stderr`` at the time of the run.
    stream: TextIO | None = None


@dataclass
class PassRecord:
    """One row of a :class:`RunReport`."""

    index: int
    name: str
    spec: str
    seconds: float
    verify_seconds: float
    #: The pass's own claim (PassResult.modified).
    modified: bool
    #: Whether the IR fingerprint changed; None when not measured.
    changed: bool | None
    stats: dict[str, Any]
    notes: list[str]
    nodes_before: int
    nodes_after: int


@dataclass
class RunReport:
    """What a pipeline run did, pass by pass."""

    records: list[PassRecord] = field(default_factory=list)
    total_seconds: float = 0.0

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)

    @property
    def notes(self) -> list[str]:
        return [f"{r.name}: {note}" for r in self.records for note in r.notes]

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_seconds": self.total_seconds,
            "passes": [dict(vars(r)) for r in self.records],
        }

    def format_timing(self) -> str:
        """A wall-time table like MLIR's ``-mlir-timing``."""
        total = self.total_seconds or sum(r.seconds + r.verify_seconds for r in self.records)
        verify = sum(r.verify_seconds for r in self.records)
        rest = max(0.0, total - verify - sum(r.seconds for r in self.records))
        rows: list[tuple[float, str]] = [(r.seconds, r.spec) for r in self.records]
        if verify:
            rows.append((verify, "(verifier)"))
        rows.append((rest, "(instrumentation and overhead)"))
        rows.append((total, "Total"))
        lines = [
            _banner("Execution time report"),
            f"  Total Execution Time: {total:.4f} seconds",
            "",
            "  ----Wall Time----  ----Name----",
        ]
        for seconds, label in rows:
            pct = 100.0 * seconds / total if total > 0 else 0.0
            lines.append(f"  {seconds:9.4f} ({pct:5.1f}%)  {label}")
        return "\n".join(lines) + "\n"

    def format_stats(self) -> str:
        """Per-pass statistics: node counts, the pass's counters and notes."""
        lines = [_banner("Pass statistics report")]
        for r in self.records:
            changed = "" if r.changed is None else f", {'changed' if r.changed else 'unchanged'}"
            lines.append(f"{r.spec}  ({'modified' if r.modified else 'not modified'}{changed})")
            lines.append(f"  (S) {r.nodes_before:>6} -> {r.nodes_after} nodes")
            width = max((len(str(v)) for v in r.stats.values()), default=0)
            for key, value in r.stats.items():
                lines.append(f"  (S) {value!s:>{max(width, 6)}} {key}")
            for note in r.notes:
                lines.append(f"  note: {note}")
        return "\n".join(lines) + "\n"


def _banner(title: str) -> str:
    rule = "===" + "-" * 73 + "==="
    return f"{rule}\n{('... ' + title + ' ...').center(len(rule)).rstrip()}\n{rule}"


def count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


class PassManager:
    """Runs ``passes`` in order over a model, in place."""

    def __init__(
        self, passes: Sequence[Pass] | str, *, verify: bool = True, instruments: Instruments | None = None
    ):
        if isinstance(passes, str):
            from ncc.passes.spec import parse_pipeline

            passes = parse_pipeline(passes)
        self.passes: list[Pass] = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"PassManager takes Pass instances, got {p!r}")
        self.verify = verify
        self.instruments = instruments or Instruments()
        _check_names(self.instruments.print_ir_before, "--print-ir-before")
        _check_names(self.instruments.print_ir_after, "--print-ir-after")

    @property
    def spec(self) -> str:
        from ncc.passes.spec import format_pipeline

        return format_pipeline(self.passes)

    def run(self, model: ir.Model, ctx: PassContext | None = None) -> RunReport:
        ctx = ctx if ctx is not None else PassContext()
        inst = self.instruments
        stream = inst.stream if inst.stream is not None else sys.stderr
        report = RunReport()
        start = time.perf_counter()
        dump = _Dumper(inst.dump_ir_dir, len(self.passes), inst.print_ir_full) if inst.dump_ir_dir else None
        if dump:
            dump.write(model, 0, "input")
        fingerprint = _fingerprint(model) if inst.print_ir_after_change else None
        nodes = count_nodes(model)
        for index, p in enumerate(self.passes, 1):
            spec = p.spec()
            if p.name in inst.print_ir_before:
                _print_ir(stream, f"IR Dump Before {spec}", model, inst.print_ir_full)
            t0 = time.perf_counter()
            verify_seconds = 0.0
            try:
                try:
                    p.requires(model)
                except NccError as err:
                    raise NccError(f"pass '{p.name}' cannot run on this model: {err}") from err
                result = p.run(model, ctx)
                if not isinstance(result, PassResult):
                    raise TypeError(f"pass '{p.name}' returned {type(result).__name__}, not a PassResult")
                try:
                    p.ensures(model)
                except NccError as err:
                    raise NccError(f"pass '{p.name}' broke its own postcondition: {err}") from err
                seconds = time.perf_counter() - t0
                if self.verify:
                    t1 = time.perf_counter()
                    _verify_after(model, p.name)
                    verify_seconds = time.perf_counter() - t1
            except BaseException:
                if inst.print_ir_after_failure:
                    _print_ir(stream, f"IR Dump After {spec} Failed", model, inst.print_ir_full)
                raise
            changed = None
            if fingerprint is not None:
                after = _fingerprint(model)
                changed, fingerprint = after != fingerprint, after
            if inst.print_ir_after_all or p.name in inst.print_ir_after or changed:
                _print_ir(stream, f"IR Dump After {spec}", model, inst.print_ir_full)
            if dump:
                dump.write(model, index, p.name)
            nodes_after = count_nodes(model)
            report.records.append(
                PassRecord(
                    index=index,
                    name=p.name,
                    spec=spec,
                    seconds=seconds,
                    verify_seconds=verify_seconds,
                    modified=bool(result.modified),
                    changed=changed,
                    stats=dict(result.stats),
                    notes=list(result.notes),
                    nodes_before=nodes,
                    nodes_after=nodes_after,
                )
            )
            nodes = nodes_after
        report.total_seconds = time.perf_counter() - start
        if inst.time_passes:
            stream.write(report.format_timing())
        if inst.pass_statistics:
            stream.write(report.format_stats())
        return report


def _check_names(names: Iterable[str], flag: str) -> None:
    if isinstance(names, str):
        raise TypeError(f"{flag} takes a tuple of pass names, not the string {names!r}")
    from ncc.passes.registry import get_pass

    for name in names:
        try:
            get_pass(name)
        except PassSpecError as err:
            raise PassSpecError(f"{flag}: {err}") from None


def _verify_after(model: ir.Model, name: str) -> None:
    from ncc.ir.verifier import verify

    try:
        verify(model)
    except VerificationError as err:
        raise VerificationError(f"IR invalid after pass '{name}': {err}") from err


def _fingerprint(model: ir.Model) -> str:
    from ncc.ir.printer import fingerprint

    return fingerprint(model)


def _render(model: ir.Model, full: bool) -> str:
    from ncc.ir.printer import print_model

    try:
        text = print_model(model, full=full)
    except Exception as err:  # a broken IR must not hide the original failure
        return f"// (the IR could not be printed: {type(err).__name__}: {err})\n"
    return text if text.endswith("\n") else text + "\n"


def _print_ir(stream: TextIO, title: str, model: ir.Model, full: bool) -> None:
    stream.write(f"// -----// {title} //----- //\n")
    stream.write(_render(model, full))


class _Dumper:
    """Writes ``NN-<pass>.ncc`` files; stale numbered dumps from an earlier run are removed first."""

    def __init__(self, directory: Path, count: int, full: bool):
        self.dir = Path(directory)
        self.width = max(2, len(str(count)))
        self.full = full
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise NccError(f"{self.dir}: cannot create the IR dump folder ({err.strerror}).") from None
        if not self.dir.is_dir():
            raise NccError(f"{self.dir}: is not a folder.")
        for old in self.dir.iterdir():
            if _DUMP_RE.match(old.name) and old.is_file():
                old.unlink()

    def write(self, model: ir.Model, index: int, name: str) -> None:
        path = self.dir / f"{index:0{self.width}d}-{name}.ncc"
        try:
            path.write_text(_render(model, self.full), encoding="utf-8")
        except OSError as err:
            raise NccError(f"{path}: cannot write the IR dump ({err.strerror}).") from None
