"""The pass manager: the pass contract around each pass, verification and the instruments."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
import pytest
from ncc.errors import NccError, PassSpecError, VerificationError
from ncc.ir import ids
from ncc.ir.builder import GraphBuilder
from ncc.ir.printer import fingerprint, print_model
from ncc.passes import Pass, PassContext, PassResult, option
from ncc.passes.manager import Instruments, PassManager, RunReport


def relu_model() -> ir.Model:
    """x: f32[N,4] -> Relu -> y."""
    b = GraphBuilder("g", opset=17)
    x = b.input("x", "f32", ["N", 4])
    b.output(b.op("Relu", [x]))
    return b.build()


# -- test passes ----------------------------------------------------------------------


@dataclass(frozen=True)
class AppendRelu(Pass):
    """Append a Relu to the graph output (changes the IR)."""

    name: ClassVar[str] = "test-mgr-append-relu"
    count: int = option(1, "how many Relus")

    def run(self, model, ctx):
        for _ in range(self.count):
            out = model.graph.outputs[0]
            node = ir.Node("", "Relu", [out])
            ids.stamp(model, node)
            new = node.outputs[0]
            new.name, new.type, new.shape = f"{out.name}_r", out.type, out.shape
            model.graph.append(node)
            model.graph.outputs[0] = new
        ctx.data.setdefault("appended", 0)
        ctx.data["appended"] += self.count
        return PassResult(modified=True, stats={"relus appended": self.count})


@dataclass(frozen=True)
class Liar(Pass):
    """Claim a change without making one."""

    name: ClassVar[str] = "test-mgr-liar"

    def run(self, model, ctx):
        return PassResult(modified=True, stats={"imagined": 3}, notes=["nothing really happened"])


@dataclass(frozen=True)
class Breaker(Pass):
    """Leave a node reading a value nothing defines."""

    name: ClassVar[str] = "test-mgr-breaker"

    def run(self, model, ctx):
        ghost = ir.Value(name="ghost", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4]))
        node = ir.Node("", "Relu", [ghost], name="broken")
        ids.stamp(model, node)
        node.outputs[0].name = "broken_out"
        node.outputs[0].type = ghost.type
        node.outputs[0].shape = ghost.shape
        model.graph.append(node)
        return PassResult(modified=True)


@dataclass(frozen=True)
class Raiser(Pass):
    """Change the IR, then crash."""

    name: ClassVar[str] = "test-mgr-raiser"

    def run(self, model, ctx):
        AppendRelu().run(model, ctx)
        raise RuntimeError("pass bug")


@dataclass(frozen=True)
class Picky(Pass):
    """Refuse every model."""

    name: ClassVar[str] = "test-mgr-picky"

    def requires(self, model):
        raise NccError("the model has no Conv.")

    def run(self, model, ctx):  # pragma: no cover - never reached
        raise AssertionError


@dataclass(frozen=True)
class WrongReturn(Pass):
    name: ClassVar[str] = "test-mgr-wrong-return"

    def run(self, model, ctx):
        return True


def header(kind: str, spec: str) -> str:
    return f"// -----// IR Dump {kind} {spec} //----- //"


def run(spec: str, model=None, **instruments):
    stream = io.StringIO()
    model = model if model is not None else relu_model()
    report = PassManager(spec, instruments=Instruments(stream=stream, **instruments)).run(model)
    return model, report, stream.getvalue()


# -- running ---------------------------------------------------------------------------


def test_runs_passes_in_order_and_reports():
    model, report, out = run("test-mgr-append-relu{count=2},test-mgr-liar")
    assert out == ""
    assert isinstance(report, RunReport)
    assert [r.spec for r in report.records] == ["test-mgr-append-relu{count=2}", "test-mgr-liar"]
    first, second = report.records
    assert (first.nodes_before, first.nodes_after) == (1, 3)
    assert (second.nodes_before, second.nodes_after) == (3, 3)
    assert first.stats == {"relus appended": 2}
    assert second.notes == ["nothing really happened"]
    assert first.modified and second.modified
    assert first.changed is None  # not measured unless print-ir-after-change is on
    assert report.notes == ["test-mgr-liar: nothing really happened"]
    assert [n.op_type for n in model.graph] == ["Relu"] * 3


def test_accepts_pass_instances_and_shares_the_context():
    ctx = PassContext()
    PassManager([AppendRelu(), AppendRelu(count=2)]).run(relu_model(), ctx)
    assert ctx.data["appended"] == 3


def test_empty_pipeline():
    _, report, _ = run("")
    assert report.records == []


def test_requires_failure_names_the_pass():
    with pytest.raises(NccError) as info:
        run("test-mgr-picky")
    assert str(info.value) == "pass 'test-mgr-picky' cannot run on this model: the model has no Conv."


def test_run_must_return_a_pass_result():
    with pytest.raises(TypeError, match="pass 'test-mgr-wrong-return' returned bool, not a PassResult"):
        run("test-mgr-wrong-return")


def test_unknown_pass_name_in_print_flags():
    expected = r"^--print-ir-after: unknown pass 'test-mgr-lair'; did you mean 'test-mgr-liar'\?"
    with pytest.raises(PassSpecError, match=expected):
        PassManager("test-mgr-liar", instruments=Instruments(print_ir_after=("test-mgr-lair",)))


# -- verification ----------------------------------------------------------------------


def test_verification_failure_names_the_pass():
    with pytest.raises(VerificationError) as info:
        run("test-mgr-append-relu,test-mgr-breaker,test-mgr-liar")
    message = str(info.value)
    assert message.startswith("IR invalid after pass 'test-mgr-breaker': ")
    assert "ghost" in message


def test_verification_can_be_turned_off():
    model = relu_model()
    report = PassManager("test-mgr-breaker", verify=False).run(model)
    assert report.records[0].verify_seconds == 0.0
    assert [n.name for n in model.graph][-1] == "broken"


# -- printing --------------------------------------------------------------------------


def test_print_ir_after_change_uses_the_fingerprint():
    model, report, out = run("test-mgr-liar,test-mgr-append-relu,test-mgr-liar", print_ir_after_change=True)
    assert out == header("After", "test-mgr-append-relu") + "\n" + print_model(model)
    assert [r.changed for r in report.records] == [False, True, False]
    assert [r.modified for r in report.records] == [True, True, True]


def test_print_ir_before_and_after_by_name():
    before = print_model(relu_model())
    model, _, out = run(
        "test-mgr-liar,test-mgr-append-relu",
        print_ir_before=("test-mgr-append-relu",),
        print_ir_after=("test-mgr-liar",),
    )
    assert out == (
        header("After", "test-mgr-liar")
        + "\n"
        + before
        + header("Before", "test-mgr-append-relu")
        + "\n"
        + before
    )


def test_print_ir_after_all_uses_the_spec():
    model, _, out = run("test-mgr-append-relu{count=2},test-mgr-liar", print_ir_after_all=True)
    lines = [line for line in out.splitlines() if line.startswith("// -----//")]
    assert lines == [header("After", "test-mgr-append-relu{count=2}"), header("After", "test-mgr-liar")]
    assert out.endswith(print_model(model))


def test_print_ir_after_failure_shows_the_ir_the_pass_left():
    model = relu_model()
    stream = io.StringIO()
    instruments = Instruments(stream=stream, print_ir_after_failure=True)
    manager = PassManager("test-mgr-liar,test-mgr-raiser", instruments=instruments)
    with pytest.raises(RuntimeError, match="pass bug"):
        manager.run(model)
    assert stream.getvalue() == header("After", "test-mgr-raiser Failed") + "\n" + print_model(model)
    assert len(list(model.graph)) == 2  # the Relu the raiser appended is in the dump


def test_print_ir_after_failure_on_verification_error():
    stream = io.StringIO()
    manager = PassManager(
        "test-mgr-breaker", instruments=Instruments(stream=stream, print_ir_after_failure=True)
    )
    with pytest.raises(VerificationError):
        manager.run(relu_model())
    text = stream.getvalue()
    assert text.startswith(header("After", "test-mgr-breaker Failed") + "\n")
    assert "ghost" in text


def test_no_failure_print_unless_asked():
    stream = io.StringIO()
    with pytest.raises(RuntimeError):
        PassManager("test-mgr-raiser", instruments=Instruments(stream=stream)).run(relu_model())
    assert stream.getvalue() == ""


def test_default_stream_is_stderr_at_run_time(capsys):
    PassManager("test-mgr-append-relu", instruments=Instruments(print_ir_after_all=True)).run(relu_model())
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(header("After", "test-mgr-append-relu"))


# -- dumps, timing, statistics ---------------------------------------------------------------


def test_dump_ir_dir(tmp_path):
    dump = tmp_path / "dumps"
    dump.mkdir()
    (dump / "07-stale.ncc").write_text("old")
    (dump / "notes.txt").write_text("mine")
    input_text = print_model(relu_model())
    model, _, out = run("test-mgr-liar,test-mgr-append-relu", dump_ir_dir=dump)
    assert out == ""
    assert sorted(p.name for p in dump.iterdir()) == [
        "00-input.ncc",
        "01-test-mgr-liar.ncc",
        "02-test-mgr-append-relu.ncc",
        "notes.txt",
    ]
    assert (dump / "00-input.ncc").read_text() == input_text
    assert (dump / "01-test-mgr-liar.ncc").read_text() == input_text
    assert (dump / "02-test-mgr-append-relu.ncc").read_text() == print_model(model)


def test_dump_ir_dir_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(NccError, match="cannot create the IR dump folder"):
        run("test-mgr-liar", dump_ir_dir=target)


def test_time_passes_prints_a_table():
    _, report, out = run("test-mgr-append-relu,test-mgr-liar", time_passes=True)
    assert out == report.format_timing()
    lines = out.splitlines()
    assert "... Execution time report ..." in lines[1]
    assert lines[3].startswith("  Total Execution Time: ") and lines[3].endswith(" seconds")
    assert lines[5] == "  ----Wall Time----  ----Name----"
    rows = lines[6:]
    assert [row[22:] for row in rows] == [
        "test-mgr-append-relu",
        "test-mgr-liar",
        "(verifier)",
        "(instrumentation and overhead)",
        "Total",
    ]
    assert rows[-1].endswith("(100.0%)  Total")
    assert sum(float(row[2:12]) for row in rows[:-1]) == pytest.approx(float(rows[-1][2:12]), abs=5e-4)


def test_format_timing_is_deterministic_given_times():
    report = RunReport(total_seconds=2.0)
    _, r, _ = run("test-mgr-liar")
    record = r.records[0]
    record.seconds, record.verify_seconds = 1.5, 0.25
    report.records.append(record)
    assert report.format_timing().splitlines()[3:] == [
        "  Total Execution Time: 2.0000 seconds",
        "",
        "  ----Wall Time----  ----Name----",
        "     1.5000 ( 75.0%)  test-mgr-liar",
        "     0.2500 ( 12.5%)  (verifier)",
        "     0.2500 ( 12.5%)  (instrumentation and overhead)",
        "     2.0000 (100.0%)  Total",
    ]


def test_pass_statistics():
    spec = "test-mgr-append-relu{count=2},test-mgr-liar"
    _, report, out = run(spec, pass_statistics=True, print_ir_after_change=True)
    assert out.count("// -----//") == 1
    stats = out[out.index("===") :]
    assert stats == report.format_stats()
    assert stats.splitlines()[3:] == [
        "test-mgr-append-relu{count=2}  (modified, changed)",
        "  (S)      1 -> 3 nodes",
        "  (S)      2 relus appended",
        "test-mgr-liar  (modified, unchanged)",
        "  (S)      3 -> 3 nodes",
        "  (S)      3 imagined",
        "  note: nothing really happened",
    ]


def test_fingerprint_only_computed_when_needed(monkeypatch):
    import ncc.ir.printer as printer

    calls = []
    real = printer.fingerprint
    monkeypatch.setattr(printer, "fingerprint", lambda m: calls.append(1) or real(m))
    run("test-mgr-liar,test-mgr-liar")
    assert calls == []
    run("test-mgr-liar,test-mgr-liar", print_ir_after_change=True)
    assert len(calls) == 3
    assert fingerprint(relu_model()) == real(relu_model())
