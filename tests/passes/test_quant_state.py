"""Quantization state lives on the IR: a dump taken after calibrate replays through insert-qdq."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "digits_cnn.onnx"
CALIB = REPO / "examples" / "digits_calib.npz"
PREFIX = "fuse-conv-bn,fuse-activation,calibrate,smooth-quant"


def ncc(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", *map(str, args)], capture_output=True, text=True
    )


def _text(path: Path) -> str:
    """The dump with its sidecar's file name taken out (the two runs write different names)."""
    return path.read_text().replace(path.name + ".data", "SIDECAR")


def test_dump_after_calibrate_replays_through_insert_qdq(tmp_path):
    after = tmp_path / "after-calibrate.ncc"
    proc = ncc("opt", EXAMPLE, "--passes", PREFIX, "--calib", CALIB, "--full", "-o", after)
    assert proc.returncode == 0, proc.stderr
    assert '"ncc.calib" = "method=mse levels=256 scheme=asym"' in after.read_text()

    replay, direct = tmp_path / "replay.ncc", tmp_path / "direct.ncc"
    proc = ncc("opt", after, "--passes", "insert-qdq", "--full", "-o", replay)
    assert proc.returncode == 0, proc.stderr
    proc = ncc("opt", EXAMPLE, "--passes", PREFIX + ",insert-qdq", "--calib", CALIB, "--full", "-o", direct)
    assert proc.returncode == 0, proc.stderr

    assert "QuantizeLinear" in replay.read_text() and "ncc.calib" not in replay.read_text()
    assert _text(replay) == _text(direct)
    assert (tmp_path / "replay.ncc.data").read_bytes() == (tmp_path / "direct.ncc.data").read_bytes()


def test_ranges_chosen_for_another_scheme_are_refused(tmp_path):
    after = tmp_path / "after-calibrate.ncc"
    assert ncc("opt", EXAMPLE, "--passes", PREFIX, "--calib", CALIB, "--full", "-o", after).returncode == 0
    proc = ncc("opt", after, "--passes", "insert-qdq{scheme=sym}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "calibrated for 256 levels, scheme asym" in proc.stderr


def test_ranges_observed_for_other_op_types_are_refused(tmp_path):
    # calibrate observes only what insert-qdq may quantize for its op types; quantizing other op types
    # with those ranges would keep them float for want of statistics, so it is refused instead
    after = tmp_path / "after-calibrate.ncc"
    assert ncc("opt", EXAMPLE, "--passes", PREFIX, "--calib", CALIB, "--full", "-o", after).returncode == 0
    proc = ncc("opt", after, "--passes", "insert-qdq{op-types=Conv,Add}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "observed for op types of the target profile" in proc.stderr
    assert "give calibrate the same op-types and target options" in proc.stderr
    # the CLI's --op-types sets both, so the pipeline agrees with itself
    out = tmp_path / "conv.onnx"
    proc = ncc("compile", EXAMPLE, "--pass", "int8", "--calib", CALIB, "--op-types", "Conv", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "quantized (int8): Conv" in proc.stderr


def test_insert_qdq_without_calibrated_ranges_says_what_to_run(tmp_path):
    proc = ncc("opt", EXAMPLE, "--passes", "insert-qdq")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "run 'calibrate' before it" in proc.stderr


def test_malformed_range_metadata_is_one_sentence(tmp_path):
    after = tmp_path / "after-calibrate.ncc"
    assert ncc("opt", EXAMPLE, "--passes", PREFIX, "--calib", CALIB, "--full", "-o", after).returncode == 0
    text = after.read_text()
    start = text.index('"ncc.calib/')
    value = text.index('"range=', start)
    after.write_text(text[:value] + '"range=oops' + text[text.index('"', value + 1) :])
    proc = ncc("opt", after, "--passes", "insert-qdq")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "expected 'range=LO,HI" in proc.stderr
