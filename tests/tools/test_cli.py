"""The ncc CLI through its public interface: a subprocess, like a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "digits_cnn.onnx"
PLUGIN = REPO / "examples" / "collapse_transposes.py"


def ncc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def run_ort(path: Path, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def digits(n: int = 16) -> np.ndarray:
    return np.load(REPO / "examples" / "digits_calib.npz")["image"][:n]


def test_version_and_help_do_not_import_frameworks():
    code = (
        "import sys\nfrom ncc.tools import cli\n"
        "try:\n    cli.cli(['--help'], prog_name='ncc')\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in ('torch', 'tensorflow', 'onnx', 'onnxruntime') if m in sys.modules]\n"
        "print('IMPORTED', bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "IMPORTED []" in proc.stdout, proc.stdout + proc.stderr
    assert ncc("--version").stdout.strip().startswith("ncc, version ")


EXIT = """
import atexit, sys
atexit.register(lambda: print("exit handlers ran", file=sys.stderr))
sys.argv = ["ncc", *sys.argv[1:]]
from ncc.tools.cli import console_main
console_main()
"""


@pytest.mark.parametrize("args,code", [(["passes"], 0), (["compile", "missing.onnx", "-o", "x.onnx"], 2)])
def test_the_command_exits_without_teardown_but_with_its_output_and_exit_handlers(tmp_path, args, code):
    proc = subprocess.run([sys.executable, "-c", EXIT, *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.endswith("exit handlers ran\n"), proc.stderr
    if code == 0:
        assert proc.stdout.rstrip().splitlines()[-1].startswith("  w8 "), proc.stdout[-300:]  # all of it
    else:
        assert proc.stderr.startswith("ncc: error: ") and not list(tmp_path.iterdir())


def test_compile_example_optimize_keeps_outputs(tmp_path):
    out = tmp_path / "digits.opt.onnx"
    proc = ncc("compile", EXAMPLE, "--pass", "optimize", "-o", out)
    assert proc.returncode == 0, proc.stderr
    before, after = onnx.load(EXAMPLE), onnx.load(out)
    assert len(after.graph.node) < len(before.graph.node)
    assert "BatchNormalization" not in {n.op_type for n in after.graph.node}
    x = digits()
    np.testing.assert_allclose(
        run_ort(out, {"image": x})[0], run_ort(EXAMPLE, {"image": x})[0], rtol=1e-5, atol=1e-5
    )


def test_compile_is_deterministic(tmp_path):
    outputs = []
    for i in range(2):
        onnx_out, ncc_out = tmp_path / f"a{i}.onnx", tmp_path / f"a{i}.ncc"
        assert ncc("compile", EXAMPLE, "--pass", "optimize", "-o", onnx_out).returncode == 0
        assert ncc("compile", EXAMPLE, "--pass", "optimize", "-o", ncc_out).returncode == 0
        text = ncc_out.read_bytes().replace(f"a{i}.ncc".encode(), b"a.ncc")
        outputs.append((onnx_out.read_bytes(), text, Path(str(ncc_out) + ".data").read_bytes()))
    assert outputs[0] == outputs[1]


def test_ncc_dump_full_rebuilds_the_model(tmp_path):
    text = tmp_path / "digits.ncc"
    assert ncc("dump", EXAMPLE, "--full", "-o", text).returncode == 0
    rebuilt = tmp_path / "rebuilt.onnx"
    proc = ncc("compile", text, "-o", rebuilt)
    assert proc.returncode == 0, proc.stderr
    x = digits()
    np.testing.assert_array_equal(run_ort(rebuilt, {"image": x})[0], run_ort(EXAMPLE, {"image": x})[0])


def test_elided_dump_cannot_rebuild_and_says_why(tmp_path):
    text = tmp_path / "digits.ncc"
    assert ncc("dump", EXAMPLE, "-o", text).returncode == 0
    out = tmp_path / "x.onnx"
    assert_user_error(ncc("compile", text, "-o", out), "--full")
    assert not out.exists()


def test_opt_text_in_text_out(tmp_path):
    text = tmp_path / "digits.ncc"
    assert ncc("dump", EXAMPLE, "--full", "-o", text).returncode == 0
    proc = ncc("opt", text, "--passes", "fuse-conv-bn,dce")
    assert proc.returncode == 0, proc.stderr
    assert "= BatchNormalization(" not in proc.stdout and proc.stdout.count("= Conv(") == 3


def test_passes_lists_builtins_pipelines_and_plugin():
    proc = ncc("passes", "--plugin", PLUGIN)
    assert proc.returncode == 0, proc.stderr
    for name in (
        "shape-inference",
        "fold-constants",
        "dce",
        "cse",
        "eliminate-identity",
        "toposort",
        "fuse-conv-bn",
        "fuse-matmul-add",
        "collapse-transposes",
        "optimize",
    ):
        assert name in proc.stdout
    assert str(PLUGIN) in proc.stdout


def test_plugin_pass_runs(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4, 2])
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
        helper.make_node("Transpose", ["t"], ["y"], perm=[0, 2, 1]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    src, out = tmp_path / "t.onnx", tmp_path / "t.out.onnx"
    onnx.save(model, src)
    proc = ncc("compile", src, "--plugin", PLUGIN, "--passes", "collapse-transposes,dce", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Transpose"]
    feed = {"x": np.random.default_rng(0).standard_normal((2, 3, 4), dtype=np.float32)}
    np.testing.assert_array_equal(run_ort(out, feed)[0], run_ort(src, feed)[0])


def test_instruments(tmp_path):
    dump_dir = tmp_path / "ir"
    proc = ncc(
        "compile",
        EXAMPLE,
        "--passes",
        "fuse-conv-bn,dce,toposort",
        "-o",
        tmp_path / "o.onnx",
        "--print-ir-after-change",
        "--time-passes",
        "--dump-ir-dir",
        dump_dir,
    )
    assert proc.returncode == 0, proc.stderr
    assert "IR Dump After fuse-conv-bn" in proc.stderr
    # fuse-conv-bn drops the parameters it folded, so dce and toposort leave the fingerprint unchanged
    assert "IR Dump After dce" not in proc.stderr and "IR Dump After toposort" not in proc.stderr
    assert "Total" in proc.stderr.split("IR Dump")[-1]
    dumps = sorted(p.name for p in dump_dir.iterdir())
    assert dumps[0].startswith("00") and len(dumps) == 4


# --- bad input: one sentence, exit 2, no traceback, nothing written ----------------------------


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    not_onnx = tmp / "notes.onnx"
    not_onnx.write_text("this is not a model\n" * 20)
    truncated = tmp / "truncated.onnx"
    truncated.write_bytes(EXAMPLE.read_bytes()[:5000])
    checker = tmp / "checker.onnx"
    bad = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    bad.ir_version = 99
    checker.write_bytes(bad.SerializeToString())
    cycle = tmp / "cycle.ncc"
    cycle.write_text(
        '// ncc.ir 1\nmodel {ir_version = 8, opset_import = {"" = 17}}\n'
        "graph @g(%x: f32[2]) -> (%b: f32[2]) {\n"
        "  %a = Add(%x, %b) : f32[2]\n  %b = Relu(%a) : f32[2]\n  return %b\n}\n"
    )
    undefined = tmp / "undef.ncc"
    undefined.write_text(
        '// ncc.ir 1\nmodel {ir_version = 8, opset_import = {"" = 17}}\n'
        "graph @g(%x: f32[2]) -> (%y: f32[2]) {\n  %y = Add(%x, %nope) : f32[2]\n  return %y\n}\n"
    )
    syntax = tmp / "syntax.ncc"
    syntax.write_text(
        '// ncc.ir 1\nmodel {ir_version = 8, opset_import = {"" = 17}}\n'
        "graph @g(%x: f32[2]) -> (%y: f32[2]) {\n  %y = Relu(%x : f32[2]\n  return %y\n}\n"
    )
    return {
        "missing": (tmp / "nope.onnx", "no such file"),
        "folder": (tmp, "folder"),
        "not onnx": (not_onnx, "not"),
        "truncated": (truncated, "truncated.onnx"),
        "checker": (checker, "checker"),
        "cycle": (cycle, "cycle"),
        "undefined": (undefined, "%nope"),
        "syntax": (syntax, f"{syntax}:4:"),
        "unknown format": (tmp / "model.txt", "unknown model format"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "folder",
        "not onnx",
        "truncated",
        "checker",
        "cycle",
        "undefined",
        "syntax",
        "unknown format",
    ],
)
def test_bad_input_files(tmp_path, case):
    path, fragment = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    assert_user_error(ncc("compile", path, "-o", out, "--pass", "optimize"), fragment)
    assert list(out.parent.iterdir()) == []


def test_syntax_error_shows_caret(tmp_path):
    path, _ = _bad_inputs(tmp_path)["syntax"]
    proc = ncc("dump", path)
    assert_user_error(proc, "^")
    assert "%y = Relu(%x : f32[2]" in proc.stderr


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--passes", "fold-constant"], "did you mean 'fold-constants'"),
        (["--passes", "fold-constants{size_limt=3}"], "did you mean 'size-limit'"),
        (["--pass", "dce", "--passes", "cse"], "either --pass or --passes"),
        (["--plugin", "missing_plugin.py", "--pass", "dce"], "missing_plugin.py"),
    ],
)
def test_bad_pipeline(tmp_path, args, fragment):
    out = tmp_path / "o.onnx"
    assert_user_error(ncc("compile", EXAMPLE, "-o", out, *args), fragment)
    assert not out.exists()


def test_output_equal_to_input_is_refused(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(EXAMPLE.read_bytes())
    assert_user_error(ncc("compile", src, "-o", src), "is the input")
    assert src.read_bytes() == EXAMPLE.read_bytes()


def test_unwritable_output():
    # /proc refuses new files even to root (CI runs as root, so a chmod-ed folder would not do).
    assert_user_error(ncc("compile", EXAMPLE, "-o", "/proc/ncc-out.onnx"), "cannot write /proc/ncc-out.onnx")


def test_output_folder_missing(tmp_path):
    assert_user_error(ncc("compile", EXAMPLE, "-o", tmp_path / "no" / "o.onnx"), "does not exist")


def test_failed_pass_leaves_no_output(tmp_path):
    plugin = tmp_path / "breaks.py"
    plugin.write_text(
        "from dataclasses import dataclass\nfrom typing import ClassVar\n"
        "from ncc.passes import Pass, PassResult\n"
        "@dataclass(frozen=True)\nclass BreakIt(Pass):\n"
        "    '''Disconnect the first node's input (a broken pass).'''\n"
        "    name: ClassVar[str] = 'break-it'\n"
        "    def run(self, model, ctx):\n"
        "        import onnx_ir as ir\n"
        "        node = next(iter(model.graph))\n"
        "        node.replace_input_with(0, ir.Value(name='dangling'))\n"
        "        return PassResult(modified=True)\n"
    )
    out = tmp_path / "o.onnx"
    proc = ncc("compile", EXAMPLE, "--plugin", plugin, "--passes", "break-it", "-o", out)
    assert_user_error(proc, "break-it")
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".ncc")] == []


def test_dump_reads_a_qoperator_model_ncc_wrote(tmp_path):
    """Contrib ops' outputs (QGemm) keep their types in the file: ONNX's inference cannot give them back."""
    out = tmp_path / "digits.qop.onnx"
    calib = str(REPO / "examples" / "digits_calib.npz")
    proc = ncc(
        "compile", str(EXAMPLE), "--pass", "int8", "--calib", calib, "--format", "qoperator", "-o", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    dumped = ncc("dump", str(out))
    assert dumped.returncode == 0, dumped.stderr
    assert "com.microsoft::QGemm" in dumped.stdout
