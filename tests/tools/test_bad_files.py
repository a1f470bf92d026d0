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
