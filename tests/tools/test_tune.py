"""``ncc compile --eval``: accuracy-aware tuning with the user's own metric.

On the README example's CNN (real digits) with a metric that needs float nodes: the RMS error of the
logits against FP32 on the 397 held-out digits (lower is better, an absolute bound). The search is checked
through the CLI: it meets the bound with the nodes it says, the written model scores what the tuner
measured, output is deterministic, serial and parallel searches choose the same, an interrupted run
resumes to the same evaluations, and bad requests are refused in one sentence with nothing written.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DIGITS_CALIB as CALIB
from conftest import DIGITS_CNN as FLOAT
from conftest import invoke_ncc as ncc
from sklearn.datasets import load_digits

BOUND = "0.02"  # all int8: ~0.0275; the two most useful layers in float: ~0.019 (this CPU or another)

METRIC = textwrap.dedent(
    """
    import os, signal
    from pathlib import Path
    import numpy as np, onnxruntime as ort
    from sklearn.datasets import load_digits

    FLOAT = {float!r}
    COUNT = Path(__file__).with_suffix(".count")
    _ref = []

    def _logits(path):
        images = (load_digits().images[1400:] / 16.0).astype(np.float32)[:, None]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return session.run(None, {{"image": images}})[0]

    STOP = Path(__file__).with_suffix(".stop")  # holds N: the N-th evaluation is interrupted (Ctrl-C)

    def error(path):
        if STOP.exists():
            calls = int(COUNT.read_text()) + 1 if COUNT.exists() else 1
            COUNT.write_text(str(calls))
            if calls == int(STOP.read_text()):
                os.kill(os.getpid(), signal.SIGINT)
        if not _ref:
            _ref.append(_logits(FLOAT))
        return float(np.sqrt(np.mean((_logits(path) - _ref[0]) ** 2)))

    def raises(path):
        raise ValueError("no labels here")

    def text(path):
        return "good"
    """
)


@pytest.fixture()
def metric(tmp_path) -> Path:
    path = tmp_path / "metric.py"
    path.write_text(METRIC.format(float=str(FLOAT)))
    return path


def tune_args(tmp_path, metric, *extra, function="error", out="tuned.onnx") -> list:
    return [
        "compile", FLOAT, "--pass", "int8", "--calib", CALIB, "--cache-dir", tmp_path / "cache", "-o", tmp_path / out,
        "--eval", f"{metric}:{function}", "--lower-is-better", "--max-loss", BOUND, *extra,
    ]  # fmt: skip


def tune(tmp_path, metric, *extra, function="error", out="tuned.onnx"):
    return ncc(*tune_args(tmp_path, metric, *extra, function=function, out=out)), tmp_path / out


def trials(stderr: str) -> list[tuple[int, str, float]]:
    """(number, phase, metric) of the report's trial table."""
    rows = re.findall(
        r"^\s+(\d+)\s+(fp32|default|screened|bisect|give back|one node|accumulate)\s+(\S+)", stderr, re.M
    )
    return [(int(n), phase, float(m)) for n, phase, m in rows]


def logits_error(path: Path) -> float:
    images = (load_digits().images[1400:] / 16.0).astype(np.float32)[:, None]
    run = [ort.InferenceSession(str(p)).run(None, {"image": images})[0] for p in (FLOAT, path)]
    return float(np.sqrt(np.mean((run[1] - run[0]) ** 2)))


def kept_float(path: Path) -> list[str]:
    model = onnx.load(path)
    return sorted(
        n.name for n in model.graph.node
        if n.op_type in ("Conv", "Gemm") and not any(i.endswith("_dq") or "DequantizeLinear" in i for i in n.input[1:2])
        and not any(m.key == "ncc.quant" for m in n.metadata_props)
    )  # fmt: skip


def test_ranked_search_meets_the_bound_with_few_evaluations(tmp_path, metric):
    result, output = tune(tmp_path, metric)
    assert result.exit_code == 0, result.stderr
    rows = trials(result.stderr)
    assert rows[0][1] == "fp32" and rows[0][2] == 0.0
    assert rows[1][1] == "default" and rows[1][2] > float(BOUND)  # the bound needs float nodes
    chosen = float(re.search(r"^tuned: metric (\S+)", result.stderr, re.M).group(1))
    assert chosen <= float(BOUND)
    # the written model is the one the tuner measured
    assert logits_error(output) == pytest.approx(chosen, rel=1e-5)  # the report prints 6 digits
    # every node the report names as kept in float, measured or ranked above one that is needed
    floats = re.findall(
        r"^    (\S+): (?:[-+][0-9.e-]+ \(kept in float\)|not measured \(kept in float)", result.stderr, re.M
    )
    assert floats and kept_float(output) == sorted(floats)
    assert len(rows) <= 9  # FP32, default, screened, 2 log2(k) bisection steps, log2(k) give-backs
    assert "kept in float by keep-float (the tuner's choice)" in result.stderr
    # the report's rebuild command makes the same file
    rebuild = re.search(r"rebuild: ncc compile .* --passes '([^']+)'", result.stderr).group(1)
    again = tmp_path / "rebuilt.onnx"
    made = ncc(
        "compile", FLOAT, "--calib", CALIB, "--passes", rebuild, "-o", again, "--cache-dir", tmp_path / "c2"
    )
    assert made.exit_code == 0, made.stderr
    assert again.read_bytes() == output.read_bytes()


def test_same_request_same_bytes_and_workers_choose_as_serial(tmp_path, metric):
    first, out1 = tune(tmp_path, metric, out="a.onnx")
    second, out2 = tune(tmp_path, metric, "--workers", "2", out="b.onnx")
    assert first.exit_code == 0 and second.exit_code == 0, second.stderr
    assert out1.read_bytes() == out2.read_bytes()


def test_basic_strategy_tries_one_node_at_a_time_then_accumulates(tmp_path, metric):
    # (which strategy spends fewer evaluations is measured on models with more than 5 layers:
    # benchmarks/bench_tuning.py)
    basic, out = tune(tmp_path, metric, "--strategy", "basic", out="basic.onnx")
    assert basic.exit_code == 0, basic.stderr
    assert logits_error(out) <= float(BOUND)
    phases = [phase for _, phase, _ in trials(basic.stderr)]
    assert phases[:2] == ["fp32", "default"] and "screened" not in phases
    singles = phases.count("one node")
    assert singles == 5 and phases[2:7] == ["one node"] * 5  # every quantized layer alone, none enough
    assert phases[7:] and set(phases[7:]) == {"accumulate"}


def test_interrupted_run_resumes_to_the_same_evaluations(tmp_path, metric):
    whole, out = tune(tmp_path, metric, out="whole.onnx")
    assert whole.exit_code == 0
    total = len(trials(whole.stderr))
    other = tmp_path / "other"
    other.mkdir()
    metric.with_suffix(".stop").write_text("4")
    # a real Ctrl-C interrupts an ncc process: run this one in its own (the metric signals its process, which
    # in-process would be the pytest worker), with SIGINT's default disposition as in a terminal: a suite
    # started as a background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    nothing = other / "stopped.onnx"
    command = [sys.executable, "-m", "ncc.tools.cli", *map(str, tune_args(other, metric, out="stopped.onnx"))]
    stopped = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    metric.with_suffix(".stop").unlink()
    assert stopped.returncode == 130 and not nothing.exists(), stopped.stderr
    assert "interrupted before any configuration met the bound" in stopped.stderr
    log = next((other / "cache" / "tuning").glob("*.jsonl"))
    assert len(log.read_text().splitlines()) == 3
    resumed, out2 = tune(other, metric, "--resume", out="resumed.onnx")
    assert resumed.exit_code == 0, resumed.stderr
    rows = trials(resumed.stderr)
    assert len(rows) == total and resumed.stderr.count("(from the log)") >= 3
    assert out2.read_bytes() == out.read_bytes()


def test_log_lines_are_the_evaluated_configurations(tmp_path, metric):
    result, _ = tune(tmp_path, metric)
    log = next((tmp_path / "cache" / "tuning").glob("*.jsonl"))
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(entries) == len(trials(result.stderr))
    assert entries[0]["config"] == "fp32" and entries[0]["spec"] is None
    assert all("insert-qdq" in e["spec"] for e in entries[1:])


def test_budget_exhausted_without_meeting_writes_nothing(tmp_path, metric):
    result, output = tune(tmp_path, metric, "--max-trials", "2")
    assert result.exit_code == 2 and not output.exists()
    assert (
        "no configuration met --max-loss: --max-trials 2 reached; the best loss reached was" in result.stderr
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-loss", "1%"], "--max-loss tunes with a metric: it needs --eval FILE.py:FUNCTION."),
        (["--eval", "{m}:error", "--max-loss", "lots"], "--max-loss takes a percentage (1%) or an absolute"),
        (["--eval", "{m}:error", "--timeout", "soon"], "--timeout takes a positive duration"),
        (["--eval", "{m}:error", "--workers", "0"], "--workers must be at least 1, got 0."),
        (["--eval", "{m}:missing"], "evaluation module {m} has no function 'missing'."),
        (["--eval", "{d}/absent.py:error"], "evaluation module file {d}/absent.py does not exist"),
        (["--eval", "{m}:raises"], "--eval {m}:raises raised ValueError: no labels here."),
        (["--eval", "{m}:text"], "--eval {m}:text must return a number, got str."),
        (["--eval", "{m}:error", "--min-cosine", "0.99"], "--min-cosine and --eval both choose"),
    ],
)
def test_bad_tuning_requests_are_one_sentence(tmp_path, metric, args, message):
    output = tmp_path / "out.onnx"
    args = [a.format(m=metric, d=tmp_path) for a in args]
    result = ncc(
        "compile", FLOAT, "--pass", "int8", "--calib", CALIB, "--cache-dir", tmp_path, "-o", output, *args
    )
    assert result.exit_code == 2, result.stderr
    assert message.format(m=metric, d=tmp_path) in result.stderr and "Traceback" not in result.stderr
    assert not output.exists()


def test_eval_needs_calibration_and_a_static_int8_pipeline(tmp_path, metric):
    no_calib = ncc("compile", FLOAT, "--pass", "int8", "--eval", f"{metric}:error", "-o", tmp_path / "a.onnx")
    assert (
        no_calib.exit_code == 2
        and "--eval tunes a calibrated pipeline: give --calib DATA too." in no_calib.stderr
    )
    no_qdq = ncc(
        "compile", FLOAT, "--passes", "fold-constants,calibrate", "--calib", CALIB, "--eval", f"{metric}:error",
        "-o", tmp_path / "b.onnx", "--cache-dir", tmp_path,
    )  # fmt: skip
    assert no_qdq.exit_code == 2 and "--eval tunes static int8 pipelines" in no_qdq.stderr
    assert not (tmp_path / "b.onnx").exists()


def test_ray_trials_on_two_workers_choose_as_the_serial_search(tmp_path, metric):
    pytest.importorskip("ray", reason="the optional ray extra is not installed")
    serial, out1 = tune(tmp_path, metric, out="serial.onnx")
    ray_run, out2 = tune(tmp_path, metric, "--ray", "local", "--workers", "2", out="ray.onnx")
    assert ray_run.exit_code == 0, ray_run.stderr
    assert len(trials(ray_run.stderr)) >= 4
    assert out1.read_bytes() == out2.read_bytes()


CHAIN_METRIC = textwrap.dedent(
    """
    import numpy as np, onnxruntime as ort
    X = np.load({data!r})["x"]
    _ref = []

    def _run(path):
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {{"x": X}})[0]

    def error(path):
        if not _ref:
            _ref.append(_run({float!r}))
        return float(np.sqrt(np.mean((_run(path) - _ref[0]) ** 2)))
    """
)


def _chain(tmp_path: Path) -> tuple[Path, Path]:
    """Six 128x128 MatMul + Tanh layers (the third with 4x larger weights) and a metric on 64 inputs.

    Synthetic on purpose: it exercises the weight-only search's mechanics (ranking, 8-bit promotion,
    give-back, sizes) in seconds; what the search achieves on a real model is measured by a benchmark.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(6):
        w = rng.standard_normal((128, 128)) / np.sqrt(128) * (4 if i == 2 else 1)
        weights.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"layer{i}"))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"], name=f"act{i}"))
        x = f"t{i}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 128])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", 128])], weights,
    )  # fmt: skip
    model = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    data = tmp_path / "inputs.npz"
    np.savez(data, x=rng.standard_normal((64, 128)).astype(np.float32))
    metric = tmp_path / "chain_metric.py"
    metric.write_text(CHAIN_METRIC.format(data=str(data), float=str(model)))
    return model, metric


def _trial_rows(stderr: str) -> list[tuple[int, str, float, float]]:
    """(number, phase, metric, MB) of each row of the report's trial table."""
    rows = re.findall(
        r"^\s+(\d+)\s+(fp32|default|screened|finer|bisect|give back)\s+(\S+)\s+\S+\s+([0-9.]+)\s",
        stderr,
        re.M,
    )
    return [(int(n), phase, float(metric), float(mb)) for n, phase, metric, mb in rows]


def _block_sizes(path: Path) -> dict[str, tuple[int, int]]:
    """Per MatMulNBits of ``path``: (bits, block size)."""
    out = {}
    for node in onnx.load(path).graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            out[node.name] = (attrs["bits"], attrs["block_size"])
    return out


def _tune_chain(tmp_path: Path, bound: str, *flags) -> tuple[Path, Path, object]:
    """``ncc compile --pass w4 --eval`` of the chain with ``--max-loss bound``: (model, output, result)."""
    model, metric = _chain(tmp_path)
    out = tmp_path / "chain.tuned.onnx"
    result = ncc(
        "compile", model, "--pass", "w4", "--eval", f"{metric}:error", "--lower-is-better", "--max-loss", bound,
        *flags, "--cache-dir", tmp_path / "cache", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return model, out, result


def test_w4_search_refines_groups_then_raises_layers_to_8_bits(tmp_path):
    model, out, result = _tune_chain(tmp_path, "0.08")
    rows = _trial_rows(result.stderr)
    # all 4-bit in groups of 128 misses the bound, and so does every layer in groups of 32: layers go to 8 bits
    assert [phase for _, phase, _, _ in rows[:3]] == ["fp32", "default", "finer"], result.stderr
    assert rows[1][2] > 0.08 and rows[2][2] > 0.08 and rows[2][2] < rows[1][2]
    assert rows[0][3] > rows[1][3]  # FP32 is the largest
    chosen = float(
        re.search(r"^tuned: metric (\S+) .* with (\d+) nodes at 8 bits", result.stderr, re.M).group(1)
    )
    assert chosen <= 0.08
    import onnxruntime as ort

    x = np.load(tmp_path / "inputs.npz")["x"]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    want = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    assert float(np.sqrt(np.mean((got - want) ** 2))) == pytest.approx(chosen, rel=1e-5)
    kept = re.findall(r"^    (layer\d): .*\(kept at 8 bits", result.stderr, re.M)
    blocks = _block_sizes(out)
    assert kept and {name for name, (bits, _) in blocks.items() if bits == 8} == set(kept)
    # layers went to 8 bits from the step where every layer is in groups of 32
    assert {block for _, block in blocks.values()} == {32}


def test_w4_search_refines_the_groups_of_the_layers_that_need_it(tmp_path):
    model, out, result = _tune_chain(tmp_path, "0.11")
    rows = _trial_rows(result.stderr)
    assert rows[1][2] > 0.11 >= rows[2][2] and rows[2][1] == "finer", result.stderr
    chosen = float(
        re.search(r"^tuned: metric (\S+) .* with (\d+) nodes? in groups of 32", result.stderr, re.M).group(1)
    )
    assert chosen <= 0.11
    fine = re.findall(r"^    (layer\d): .*\(kept in groups of 32", result.stderr, re.M)
    blocks = _block_sizes(out)
    assert all(bits == 4 for bits, _ in blocks.values())
    assert 0 < len(fine) < 6 and {name for name, (_, block) in blocks.items() if block == 32} == set(fine)
    assert {block for name, (_, block) in blocks.items() if name not in fine} == {128}
    # smaller than every layer in groups of 32, the step that met the bound first
    whole = tmp_path / "g32.onnx"
    assert ncc("compile", model, "--pass", "w4", "--group-size", "32", "-o", whole).exit_code == 0
    assert out.stat().st_size < whole.stat().st_size


def test_a_configuration_that_cannot_compile_is_refused_before_any_evaluation(tmp_path):
    model, metric = _chain(tmp_path)
    result = ncc(
        "compile", model, "--pass", "w4", "--group-size", "96", "--eval", f"{metric}:error", "--lower-is-better",
        "--cache-dir", tmp_path / "cache", "-o", tmp_path / "out.onnx",
    )  # fmt: skip
    assert result.exit_code == 2 and "group size 96 does not divide K=128" in result.stderr
    assert "FP32 metric" not in result.stderr and not (tmp_path / "out.onnx").exists()


def test_w4_search_with_calibration_ranks_moves_by_what_they_buy_per_byte(tmp_path):
    _, out, result = _tune_chain(tmp_path, "0.03", "--calib", tmp_path / "inputs.npz")
    refining = re.search(r"ranked (\d+) moves to groups of 32 by measured gain per byte", result.stderr)
    ranking = re.search(r"misses the bound; ranked (\d+) moves to 8 bits by measured gain per byte: (.*)$",
                        result.stderr, re.M)  # fmt: skip
    assert refining is not None and ranking is not None, result.stderr
    assert refining.group(1) == ranking.group(1) == "6"  # per layer: groups of 32, and 8 bits beyond them
    rows = _trial_rows(result.stderr)
    # every layer in groups of 32 (one evaluation) misses the bound: layers go to 8 bits from there
    assert [phase for _, phase, _, _ in rows[3:5]] == ["finer", "bisect"] and rows[3][2] > 0.03, result.stderr
    chosen = float(re.search(r"^tuned: metric (\S+) ", result.stderr, re.M).group(1))
    assert chosen <= 0.03
    wide = re.findall(r"^    (layer\d) \(8 bits\): .*\(kept raised", result.stderr, re.M)
    fine = re.findall(r"^    (layer\d) \(groups of 32\): .*\(kept raised", result.stderr, re.M)
    # the 8-bit move that measurably buys the most per byte is kept, and the layer with 4x larger weights
    # goes to 8 bits; give-back returns layers to groups of 128 where the bound allows
    assert ranking.group(2).split(", ")[0].split(" ")[0] in wide and "layer2" in wide
    blocks = _block_sizes(out)
    assert {name for name, (bits, _) in blocks.items() if bits == 8} == set(wide)
    assert {name for name, (bits, block) in blocks.items() if bits == 4 and block == 32} == set(fine) - set(
        wide
    )
