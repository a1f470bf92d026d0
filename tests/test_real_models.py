"""Real models (offline wheels): all-MiniLM-L6-v2 from both torch exporters and EfficientNet-Lite0.

Each must survive ONNX → IR → text → IR → ONNX with identical outputs, and the
cleanup/fusion pipeline must shrink it while keeping outputs within 1e-5.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import realmodels
from ncc.backends.onnx import save_onnx
from ncc.frontends.onnx import load_onnx
from ncc.ir.parser import parse
from ncc.ir.printer import print_model

pytestmark = pytest.mark.slow

PIPELINE = "fold-constants,cse,dce,fuse-conv-bn,fuse-matmul-add"
MODELS = {
    "minilm-legacy": lambda: (realmodels.minilm_onnx("legacy"), realmodels.minilm_inputs(4)),
    "minilm-dynamo": lambda: (realmodels.minilm_onnx("dynamo"), realmodels.minilm_inputs(4)),
    "efficientnet-lite0": lambda: (realmodels.efficientnet_onnx(), {"image": realmodels.photo_crops(4)}),
}


def run(path: Path, feeds: dict, *, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:  # the graph as written: same graph, bit-identical results
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_text_round_trip_gives_identical_outputs(tmp_path, name):
    path, feeds = MODELS[name]()
    model = load_onnx(path)
    text = print_model(model, full=True, data_file=tmp_path / "m.ncc.data")
    rebuilt = parse(text, base_dir=tmp_path)
    assert print_model(rebuilt, full=True, data_file=tmp_path / "again.ncc.data") == text.replace(
        "m.ncc.data", "again.ncc.data"
    )
    save_onnx(rebuilt, tmp_path / "rebuilt.onnx")
    np.testing.assert_array_equal(
        run(tmp_path / "rebuilt.onnx", feeds, optimize=False), run(path, feeds, optimize=False)
    )
    # With onnxruntime's optimizations the inferred value types ncc adds may enable other
    # fusions (different summation order), so there the bar is float rounding.
    expected = run(path, feeds)
    np.testing.assert_allclose(
        run(tmp_path / "rebuilt.onnx", feeds), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cleanup_pipeline_shrinks_and_keeps_outputs(tmp_path, name):
    path, feeds = MODELS[name]()
    out = tmp_path / "opt.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", "compile", str(path), "--passes", PIPELINE, "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    before = len(onnx.load(path, load_external_data=False).graph.node)
    after = len(onnx.load(out).graph.node)
    assert after < before, f"{name}: {before} -> {after} nodes"
    expected, got = run(path, feeds), run(out, feeds)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


def test_compiling_twice_is_byte_identical(tmp_path):
    path, _ = MODELS["minilm-dynamo"]()
    outputs = []
    for i in range(2):
        files = []
        for suffix in (".onnx", ".ncc"):
            out = tmp_path / f"run{i}{suffix}"
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "ncc.tools.cli",
                    "compile",
                    str(path),
                    "--passes",
                    PIPELINE,
                    "-o",
                    str(out),
                ],
                capture_output=True,
                text=True,
            )
            assert proc.returncode == 0, proc.stderr
            files.append(out.read_bytes())
        outputs.append(files)
    assert outputs[0][0] == outputs[1][0]
    assert outputs[0][1].replace(b"run0", b"run1") == outputs[1][1]
