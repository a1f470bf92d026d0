"""ncc.runtime: the one place sessions are made — batching to a fixed batch size, errors in one sentence.

The oracle here is a plain onnxruntime session opened by the test itself, fed one sample at a time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from ncc.errors import NccError
from ncc.runtime import open_session, run

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "digits_cnn.onnx"


def _fixed_batch(tmp_path: Path, batch: int) -> Path:
    """The digits CNN exported with a fixed batch dimension (as a model traced at batch 1 is)."""
    proto = onnx.load(EXAMPLE)
    for value in [*proto.graph.input, *proto.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    del proto.graph.value_info[:]
    path = tmp_path / f"digits_b{batch}.onnx"
    onnx.save(proto, path)
    return path


def _images(n: int) -> np.ndarray:
    return np.load(REPO / "examples" / "digits_calib.npz")["image"][:n]


def _one_by_one(path: Path, x: np.ndarray, batch: int) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [session.run(None, {"image": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


@pytest.mark.parametrize("batch, samples", [(1, 7), (4, 10), (4, 8)])
def test_fixed_batch_model_runs_any_number_of_samples(tmp_path, batch, samples):
    path = _fixed_batch(tmp_path, batch)
    x = _images(12)
    rows = -(-samples // batch) * batch  # the last slice padded with its last sample
    padded = np.concatenate([x[:samples], np.repeat(x[samples - 1 : samples], rows - samples, axis=0)])
    want = _one_by_one(path, padded, batch)[:samples]
    for source in (path, ir.load(path)):
        session = open_session(source)
        assert session.batch == batch
        got = session.run({"image": x[:samples]})
        (name,) = got
        assert got[name].shape[0] == samples
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-5)


def test_dynamic_batch_model_runs_whole_batch():
    session = open_session(EXAMPLE)
    assert session.batch is None
    x = _images(5)
    (got,) = run(EXAMPLE, {"image": x})
    assert got.shape[0] == 5


def test_failures_are_one_sentence(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(NccError, match=r"^onnxruntime cannot load .*bad\.onnx: "):
        open_session(bad)
    session = open_session(EXAMPLE, what="the digits CNN")
    with pytest.raises(NccError, match=r"^onnxruntime failed to run the digits CNN on batch 3: ") as err:
        session.run({"image": np.zeros((2, 1, 5, 5), np.float32)}, where="batch 3")
    assert "\n" not in str(err.value)


def test_int8_compile_of_a_fixed_batch_model(tmp_path):
    """Calibration, the min-cosine fallback and correct-bias all run the batch-1 model on 16 samples."""
    path = _fixed_batch(tmp_path, 1)
    out = tmp_path / "q.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", "compile", str(path), "--pass", "int8"]
        + ["--calib", str(REPO / "examples" / "digits_calib.npz"), "--cache-dir", str(tmp_path / "cache")]
        + ["-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "correct-bias" in proc.stderr
    x = _images(16)
    want, got = _one_by_one(path, x, 1), _one_by_one(out, x, 1)
    assert np.mean(want.argmax(1) == got.argmax(1)) >= 15 / 16
