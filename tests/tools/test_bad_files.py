"""Bad files and a hostile environment, through the CLI as a user meets them.

Every case asserts what the user sees (exit code, the message's key words, no traceback) and what is
left on disk: the folder of the run is snapshotted before and compared after, so no output, no
``.ncc-tmp-*`` folder and no change to the input's files (byte for byte) can slip through.

One section per class of bad input (numbered as in the issue that reported them); each holds the
cases that once failed and nearby ones that already passed, so the whole class stays covered.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "digits_cnn.onnx"
CALIB = REPO / "examples" / "digits_calib.npz"
CLI = [sys.executable, "-m", "ncc.tools.cli"]


def ncc(*args, cwd: Path | None = None, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    args = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, **kw
    )


def snapshot(folder: Path) -> dict[str, object]:
    """Every entry under ``folder`` (hidden ones too): file bytes, symlink targets, folders."""
    entries: dict[str, object] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            key = os.fsdecode(path.relative_to(folder))
            if path.is_symlink():
                entries[key] = ("link", os.readlink(path))
            elif path.is_dir():
                entries[key] = "dir"
            else:
                entries[key] = path.read_bytes()
    return entries


def assert_refused(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2 and one ``ncc: error:`` sentence (a parse error adds its source line and caret)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("ncc: error: "), proc.stderr
    assert proc.stderr.count("ncc: error:") == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


# -- models -------------------------------------------------------------------------------------


def mlp(folder: Path, name: str = "model.onnx", data: str | None = "weights.bin") -> Path:
    """y = x @ w + b; with ``data``, both weights in that external data file (288 bytes: w, then b)."""
    w = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8) / 64, "w")
    b = numpy_helper.from_array(np.arange(8, dtype=np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Add", ["h", "b"], ["y"], name="add"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if data:
        onnx.save(model, path, save_as_external_data=True, location=data, size_threshold=0)
    else:
        onnx.save(model, path)
    return path


def with_location(path: Path, location: str, out: Path) -> Path:
    """A copy of the ONNX model ``path`` whose external tensors name ``location`` instead."""
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, out)
    return out


def full_dump(folder: Path) -> tuple[Path, str]:
    """``m.ncc`` with its sidecar ``m.ncc.data`` (the mlp's w, 256 bytes), and its text."""
    src = mlp(folder / "src", data=None)
    text = folder / "m.ncc"
    proc = ncc("dump", "--full", src, "-o", text)
    assert proc.returncode == 0, proc.stderr
    return text, text.read_text()


def graph_text(*body: str, opsets: str = '"" = 17', header: str = "ir_version = 8") -> str:
    lines = "\n".join(f"  {line}" for line in body)
    return (
        f"// ncc.ir 1\nmodel {{{header}, opset_import = {{{opsets}}}}}\n"
        f"graph @g(%x: f32[2,3]) -> (%y: f32[3,2]) {{\n{lines}\n  return %y\n}}\n"
    )


TRANSPOSE = '%y = Transpose(%x) {perm = [1, 0]} : f32[3,2]  loc("t" #0)'
PAST_INT64 = "9223372036854775808"  # 2**63


# -- 1. a text file's sidecars stay in its folder; the sha256 check means it ---------------------


def _sidecar_case(tmp: Path, case: str) -> tuple[list, tuple[str, ...]]:
    text, body = full_dump(tmp / "t")
    secret = tmp / "secret.bin"
    secret.write_bytes(bytes(range(256)))
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    real = hashlib.sha256((tmp / "t" / "m.ncc.data").read_bytes()).hexdigest()
    evil = tmp / "t" / "evil.ncc"
    out = tmp / "t" / "out.onnx"

    def sidecar(location: str, sha: str) -> list:
        pattern = r'external<"m\.ncc\.data"(.*)sha256:[0-9a-f]+>'
        evil.write_text(re.sub(pattern, rf'external<"{location}"\1sha256:{sha}>', body))
        return ["compile", evil, "-o", out]

    if case == "parent folder":
        return sidecar("../secret.bin", digest), ("evil.ncc:4:", "outside", "refusing to read it")
    if case == "symlink out of the folder":
        (tmp / "t" / "inside.bin").symlink_to(secret)
        return sidecar("inside.bin", digest), ("evil.ncc:4:", "outside")
    if case == "absolute path":
        return sidecar(str(secret), digest), ("evil.ncc:4:", str(secret))
    if case == "one-digit sha256 prefix":
        return sidecar("m.ncc.data", real[:1]), ("evil.ncc:4:", "at least 16 hex digits")
    if case == "wrong sha256 keeps the real one secret":
        return sidecar("m.ncc.data", "0" * 16), ("evil.ncc:4:", "does not match")
    if case == "missing sidecar":
        return sidecar("gone.bin", real), ("evil.ncc:4:", "'gone.bin' not found")
    if case == "onnx external data out of the folder":
        inner = mlp(tmp / "t" / "onnx")
        with_location(inner, "../../secret.bin", tmp / "t" / "onnx" / "evil.onnx")
        return ["compile", tmp / "t" / "onnx" / "evil.onnx", "-o", out], ("outside", "refusing to read it")
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "parent folder",
        "symlink out of the folder",
        "one-digit sha256 prefix",
        "wrong sha256 keeps the real one secret",
        # these already passed
        "absolute path",
        "missing sidecar",
        "onnx external data out of the folder",
    ],
)
def test_sidecar_paths_and_digests(tmp_path, case):
    args, fragments = _sidecar_case(tmp_path, case)
    before = snapshot(tmp_path)
    proc = ncc(*args)
    assert_refused(proc, *fragments)
    if case == "wrong sha256 keeps the real one secret":
        real = hashlib.sha256((tmp_path / "t" / "m.ncc.data").read_bytes()).hexdigest()
        assert real[:8] not in proc.stderr
    assert snapshot(tmp_path) == before


def test_full_dump_carries_the_whole_digest_and_rebuilds(tmp_path):
    text, body = full_dump(tmp_path)
    real = hashlib.sha256((tmp_path / "m.ncc.data").read_bytes()).hexdigest()
    assert f"sha256:{real}>" in body
    proc = ncc("compile", text, "-o", tmp_path / "back.onnx")
    assert proc.returncode == 0, proc.stderr
    # a hand-shortened digest of 16 digits is still accepted
    text.write_text(body.replace(real, real[:16]))
    proc = ncc("compile", text, "-o", tmp_path / "back16.onnx")
    assert proc.returncode == 0, proc.stderr


# -- 2. no output replaces a file the command reads ---------------------------------------------


def _clobber_case(tmp: Path, case: str) -> tuple[list, tuple[str, ...]]:
    w = tmp / "w"
    if case == "dump --full sidecar is the input's data":
        src = mlp(w, data="m.ncc.data")
        return ["dump", "--full", src, "-o", w / "m.ncc"], ("sidecar data file", "input's external data")
    if case == "compile output is the input's data":
        src = mlp(w, data="weights.onnx")
        return ["compile", src, "-o", w / "weights.onnx"], ("the output", "input's external data")
    if case == "output hard-linked to the input's data":
        src = mlp(w)
        os.link(w / "weights.bin", w / "hard.onnx")
        return ["compile", src, "-o", w / "hard.onnx"], ("the output", "input's external data")
    if case == "output symlinked to the input's data":
        src = mlp(w)
        (w / "alias.onnx").symlink_to("weights.bin")
        return ["compile", src, "-o", w / "alias.onnx"], ("the output", "input's external data")
    if case == "ncc input's sidecar named by the output":
        text, body = full_dump(w)
        (w / "m.ncc.data").rename(w / "b.ncc.data")
        text.write_text(body.replace('"m.ncc.data"', '"b.ncc.data"'))
        return ["compile", text, "-o", w / "b.ncc"], ("sidecar data file", "input's sidecar data file")
    if case == "layer report is the input":
        src = mlp(w)
        return (
            ["compile", src, "--pass", "w4", "--group-size", "0", "-o", w / "o.onnx", "--layer-report", src],
            ("--layer-report", "is the input"),
        )
    if case == "layer report is the calibration data":
        src = mlp(w)
        np.savez(w / "calib.npz", x=np.ones((4, 8), np.float32))
        args = ["compile", src, "--pass", "w4", "--algo", "gptq", "--group-size", "0", "--calib"]
        return (
            [*args, w / "calib.npz", "-o", w / "o.onnx", "--layer-report", w / "calib.npz"],
            ("--layer-report", "calibration data"),
        )
    # these already passed
    if case == "output is the input":
        src = mlp(w)
        (w / "sub").mkdir()
        return ["compile", src, "-o", w / "sub" / ".." / "model.onnx"], ("model.onnx", "is the input")
    if case == "--external-data is the input's data":
        src = mlp(w)
        args = ["compile", src, "-o", w / "o.onnx", "--external-data", "weights.bin"]
        return args, ("weights.bin", "input's")
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "dump --full sidecar is the input's data",
        "compile output is the input's data",
        "output hard-linked to the input's data",
        "output symlinked to the input's data",
        "ncc input's sidecar named by the output",
        "layer report is the input",
        "layer report is the calibration data",
        "output is the input",
        "--external-data is the input's data",
    ],
)
def test_outputs_never_replace_inputs(tmp_path, case):
    args, fragments = _clobber_case(tmp_path, case)
    before = snapshot(tmp_path)
    assert_refused(ncc(*args), *fragments, "choose another")
    assert snapshot(tmp_path) == before


# -- 7. the onnxruntime check comes before the rename; SIGTERM cleans up like Ctrl-C ---------------

MARK_PASS = """
from dataclasses import dataclass
from typing import ClassVar

from ncc.passes import Pass, PassResult


@dataclass(frozen=True)
class MarkQuantized(Pass):
    '''Mark every node as int8-quantized, so that the compile checks the result in onnxruntime.'''

    name: ClassVar[str] = "mark-quantized"

    def run(self, model, ctx):
        for node in model.graph:
            node.metadata_props["ncc.quant"] = "int8"
        return PassResult(modified=True)
"""

SLOW_CHECK = """
import time
import ncc.backends.onnx.check as check

_real = check.check_on_onnxruntime


def _slow(path, model, **kw):
    open({marker!r}, "w").close()
    time.sleep(120)
    return _real(path, model, **kw)


check.check_on_onnxruntime = _slow
"""

SLOW_CALIB = """
import time
import numpy as np


def data():
    open({marker!r}, "w").close()
    time.sleep(120)
    yield {{"image": np.load({calib!r})["image"][:4]}}
"""


def test_failed_check_leaves_no_output(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Mystery", ["x"], ["y"], name="m", domain="com.example")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), tmp_path / "mystery.onnx")
    (tmp_path / "mark.py").write_text(MARK_PASS)
    before = snapshot(tmp_path)
    proc = ncc(
        "compile",
        "mystery.onnx",
        "--plugin",
        "mark.py",
        "--passes",
        "mark-quantized",
        "-o",
        "o.onnx",
        cwd=tmp_path,
    )
    assert_refused(proc, "onnxruntime cannot load the emitted model o.onnx", "com.example:Mystery")
    assert ".ncc-tmp-" not in proc.stderr
    assert snapshot(tmp_path) == before


def _stop_midway(tmp: Path, args: list, marker: Path, signum: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [*CLI, *map(str, args)],
        cwd=tmp,
        stderr=subprocess.PIPE,
        text=True,
        # a runner started in the background ignores SIGINT, and Python keeps an inherited SIG_IGN
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"ncc never reached the slow step: {proc.communicate()[1]}")
        time.sleep(0.05)
    proc.send_signal(signum)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc, stderr


@pytest.mark.parametrize(
    ("where", "signum", "code", "word"),
    [
        ("check", signal.SIGTERM, 143, "terminated"),
        ("calibration", signal.SIGTERM, 143, "terminated"),
        ("check", signal.SIGINT, 130, "interrupted"),
    ],
)
def test_signal_midway_leaves_nothing(tmp_path, where, signum, code, word):
    marker = tmp_path / "reached"
    (tmp_path / "in").mkdir()
    mlp(tmp_path / "in", data=None)
    if where == "check":
        (tmp_path / "slow.py").write_text(MARK_PASS + SLOW_CHECK.format(marker=str(marker)))
        args = [
            "compile",
            "in/model.onnx",
            "--plugin",
            "slow.py",
            "--passes",
            "mark-quantized",
            "-o",
            "o.onnx",
        ]
    else:
        (tmp_path / "slow.py").write_text(SLOW_CALIB.format(marker=str(marker), calib=str(CALIB)))
        args = ["compile", EXAMPLE, "--pass", "int8", "--calib", "slow.py:data", "-o", "o.onnx"]
        args += ["--cache-dir", "cache"]
    before = snapshot(tmp_path)
    proc, stderr = _stop_midway(tmp_path, args, marker, signum)
    assert proc.returncode == code, stderr
    assert f"ncc: {word}; no output written." in stderr and "Traceback" not in stderr, stderr
    marker.unlink()
    after = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("__pycache__")}
    assert after == before  # no o.onnx, no .ncc-tmp-* folder, no cache entry half written


# -- 9. the environment: cache, disk, stdout, file names, integers ---------------------------------


@pytest.mark.parametrize("where", ["NCC_CACHE", "HOME"])
def test_unwritable_calibration_cache_is_a_warning(tmp_path, where):
    # /proc takes no new folders, even from root
    env = {"NCC_CACHE": "/proc/ncc-cache"} if where == "NCC_CACHE" else {"HOME": "/proc/ncc-home"}
    environ = {k: v for k, v in os.environ.items() if where == "NCC_CACHE" or k != "NCC_CACHE"}
    proc = subprocess.run(
        [*CLI, "compile", EXAMPLE, "--pass", "int8", "--calib", CALIB, "-o", tmp_path / "q.onnx"],
        capture_output=True,
        text=True,
        env={**environ, **env},
    )
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("ncc: warning: cannot write")]
    assert len(warnings) == 1 and "calibration cache" in warnings[0], proc.stderr
    assert "Traceback" not in proc.stderr
    onnx.checker.check_model(onnx.load(tmp_path / "q.onnx"))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 16 KB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", mount], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", mount], check=True)


def test_full_disk_while_writing_the_sidecar(tiny_disk):
    proc = ncc("dump", "--full", EXAMPLE, "-o", tiny_disk / "d.ncc")
    assert_refused(proc, f"cannot write {tiny_disk / 'd.ncc'}", "No space left on device")
    assert list(tiny_disk.iterdir()) == []


def test_full_disk_while_writing_the_sidecar_in_process(tmp_path, monkeypatch):
    """The same without a mount: the sidecar's file is /dev/full, whose writes fail with ENOSPC."""
    from click.testing import CliRunner
    from ncc.ir import printer
    from ncc.tools.cli import cli

    real_init = printer._Sidecar.__init__

    def on_full_disk(self, path):
        real_init(self, path)
        self.file.close()
        self.file = open("/dev/full", "wb", buffering=0)  # noqa: SIM115 - closed by _Sidecar.close

    monkeypatch.setattr(printer._Sidecar, "__init__", on_full_disk)
    result = CliRunner().invoke(cli, ["dump", "--full", str(EXAMPLE), "-o", str(tmp_path / "d.ncc")])
    assert result.exit_code == 2, result.output
    assert "ncc: error: cannot write" in result.output and "No space left on device" in result.output
    assert list(tmp_path.iterdir()) == []


def test_stdout_full():
    with open("/dev/full", "w") as full:
        proc = subprocess.run([*CLI, "passes"], stdout=full, stderr=subprocess.PIPE, text=True)
    assert_refused(proc, "cannot write to standard output: No space left on device")


def test_stdout_closed(tmp_path):
    command = " ".join(shlex.quote(str(a)) for a in [*CLI, "dump", EXAMPLE]) + " >&-"
    proc = subprocess.run(command, shell=True, capture_output=True, text=True)
    assert_refused(proc, "cannot write to standard output: it is closed")


@pytest.mark.parametrize("args", [["passes"], ["dump", EXAMPLE]])
def test_stdout_pipe_closed_by_its_reader_ends_quietly(args):
    read, write = os.pipe()
    os.close(read)  # like `| head -1` after its line
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 141 and stderr == "", stderr


def _non_utf8_case(tmp: Path, case: str) -> list:
    src = mlp(tmp / "w", data=None)
    bad = os.fsencode(tmp / "w") + b"/m\xff"
    if case == "input":
        os.link(src, bad + b".onnx")
        return ["dump", bad + b".onnx"]
    if case == "output":
        return ["compile", src, "-o", bad + b".onnx"]
    if case == "--external-data":
        return ["compile", src, "-o", tmp / "w" / "o.onnx", "--external-data", b"d\xff.bin"]
    if case == "dump --full sidecar":
        return ["dump", "--full", src, "-o", bad + b".ncc"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["input", "output", "--external-data", "dump --full sidecar"])
def test_non_utf8_file_names(tmp_path, case):
    args = _non_utf8_case(tmp_path, case)
    before = snapshot(tmp_path)
    assert_refused(ncc(*args), r"\xff", "not UTF-8")
    assert snapshot(tmp_path) == before


def test_utf8_names_beyond_ascii_work(tmp_path):
    src = mlp(tmp_path / "é", name="modèle.onnx", data="poids€.bin")
    out = tmp_path / "é" / "sortie.ncc"
    assert ncc("dump", "--full", src, "-o", out).returncode == 0
    proc = ncc("compile", out, "-o", tmp_path / "é" / "retour.onnx")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("line", "token", "fragment"),
    [
        (
            '%y = Transpose(%x) {perm = [1, 0], k = 99999999999999999999} : f32[3,2]  loc("t" #0)',
            "9999",
            "64 bits",
        ),
        (f'%y = Transpose(%x) {{perm = [1, {PAST_INT64}]}} : f32[3,2]  loc("t" #0)', PAST_INT64, "64 bits"),
        (
            f'%y = Transpose(%x) {{perm = [1, -{PAST_INT64}1]}} : f32[3,2]  loc("t" #0) meta {{"a" = "b"}}',
            f"-{PAST_INT64}",
            "64 bits",
        ),
        (f'%y = Transpose(%x) : f32[3,{PAST_INT64}]  loc("t" #0)', PAST_INT64, "64 bits"),
        (f"const @k : i64[1] = dense<[{PAST_INT64}]>", PAST_INT64, "does not fit in i64"),
        ("const @k : i8[2] = dense<[1, 300]>", "300", "does not fit in i8"),
        (
            f'%c = Constant() {{value = i64[1] dense<[-{PAST_INT64}1]>}} : i64[1]  loc("c" #1)',
            f"-{PAST_INT64}1",
            "does not fit in i64",
        ),
        # already a ParseError with file:line:col
        ("const @k : i64[1] = dense<[1.5]>", "1.5", "expected an integer"),
    ],
)
def test_integers_past_their_type_in_text(tmp_path, line, token, fragment):
    path = tmp_path / "big.ncc"
    body = [line] if line.startswith("%y =") else [line, TRANSPOSE]
    path.write_text(graph_text(*body))
    before = snapshot(tmp_path)
    proc = ncc("compile", path, "-o", tmp_path / "o.onnx")
    column = 2 + line.index(token) + 1  # two spaces of indent
    assert_refused(proc, f"{path}:4:{column}: ", fragment, "^")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("header", "opsets", "where"),
    [
        (f"ir_version = {PAST_INT64}", '"" = 17', "2:21"),
        ("ir_version = 8", f'"" = {PAST_INT64}', "2:45"),
    ],
)
def test_integers_past_int64_in_the_header(tmp_path, header, opsets, where):
    path = tmp_path / "big.ncc"
    path.write_text(graph_text(TRANSPOSE, header=header, opsets=opsets))
    assert_refused(ncc("compile", path, "-o", tmp_path / "o.onnx"), f"{path}:{where}: ", "64 bits")
    assert not (tmp_path / "o.onnx").exists()


# -- 10. messages that say what is wrong -----------------------------------------------------------


def _dataflow_model(tmp: Path, case: str) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    if case == "cycle":
        nodes = [
            helper.make_node("Add", ["x", "b"], ["a"], name="add0"),
            helper.make_node("Relu", ["a"], ["b"], name="relu0"),
            helper.make_node("Identity", ["b"], ["y"], name="out"),
        ]
    else:
        nodes = [helper.make_node("Add", ["x", "nope"], ["y"], name="add0")]
    path = tmp / f"{case}.onnx"
    onnx.save(
        helper.make_model(
            helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
        ),
        path,
    )
    return path


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("cycle", ("the graph has a cycle through node 'relu0'", "'add0'")),
        ("undefined", ("node 'add0' reads value 'nope', which nothing defines",)),
    ],
)
def test_onnx_cycle_and_undefined_value_are_named(tmp_path, case, fragments):
    path = _dataflow_model(tmp_path, case)
    proc = ncc("dump", path)
    assert_refused(proc, *fragments)
    assert proc.stderr.rstrip().endswith(".") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("opsets", "fragments"),
    [
        ('"" = 999', ('opset_import {"" = 999}', f'domain "" is {onnx.defs.onnx_opset_version()}')),
        ('"" = 17, "ai.onnx.ml" = 99', ('opset_import {"ai.onnx.ml" = 99}', 'domain "ai.onnx.ml"')),
    ],
)
@pytest.mark.parametrize("kind", [".ncc", ".onnx"])
def test_opsets_newer_than_onnx_knows(tmp_path, opsets, fragments, kind):
    path = tmp_path / "m.ncc"
    path.write_text(graph_text(TRANSPOSE, opsets=opsets))
    if kind == ".onnx":
        proto = helper.make_model(
            helper.make_graph(
                [helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])],
                "g",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])],
            ),
            opset_imports=[
                helper.make_opsetid(d.strip('" '), int(v))
                for d, v in (o.split("=") for o in opsets.split(","))
            ],
        )
        path = tmp_path / "m.onnx"
        path.write_bytes(proto.SerializeToString())
    before = snapshot(tmp_path)
    assert_refused(
        ncc("compile", path, "-o", tmp_path / "o.onnx"), *fragments, "newer than the installed onnx"
    )
    assert snapshot(tmp_path) == before


def test_custom_domain_opsets_are_not_onnx_to_judge(tmp_path):
    path = tmp_path / "m.ncc"
    path.write_text(graph_text(TRANSPOSE, opsets='"" = 17, "com.example" = 99'))
    proc = ncc("compile", path, "-o", tmp_path / "o.onnx")
    assert proc.returncode == 0, proc.stderr
    assert {o.domain: o.version for o in onnx.load(tmp_path / "o.onnx").opset_import}["com.example"] == 99


def test_ncc_cycle_is_named(tmp_path):
    # already passed: the verifier names the cycle in text input
    path = tmp_path / "c.ncc"
    path.write_text(
        '// ncc.ir 1\nmodel {ir_version = 8, opset_import = {"" = 17}}\n'
        "graph @g(%x: f32[2]) -> (%b: f32[2]) {\n"
        '  %a = Add(%x, %b) : f32[2]  loc("add0" #0)\n  %b = Relu(%a) : f32[2]  loc("relu0" #1)\n'
        "  return %b\n}\n"
    )
    proc = ncc("compile", path, "-o", tmp_path / "o.onnx")
    assert proc.returncode == 2 and "cycle" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "o.onnx").exists()
