"""SmolLM2-135M weight-only INT4 in onnxruntime and OpenVINO: the ``smollm2`` table of
``benchmarks/bench_runtimes.py`` (issue 16's ``w4`` point).

Two graphs of the same model: the decode step with a static KV cache (``llm_torch.decode_onnx``, one
token per run, the graph whose speed is tokens/s) and the full-sequence model
(``realmodels.smollm2_onnx``, for perplexity). Each is compiled the same way per row:

- ncc ``w4`` (RTN, group 32: 576, SmolLM2's hidden size, has no group 128) for onnxruntime
  (MatMulNBits, float activations; and ``pack-int4{accuracy-level=4}``: activations quantized to int8
  per block at run time) and with ``--target openvino``, which OpenVINO runs as it chooses by default
  (int8 activations per group of 32, ``DYNAMIC_QUANTIZATION_GROUP_SIZE``) and with that set to 0; and
  with NNCF's choice of layers (the embedding and ``lm_head`` in 8 bits, RTN groups of 32: a second
  ``woq-rtn`` pass in the pipeline);
- NNCF's ``nncf.compress_weights`` (OpenVINO's own weight compressor, data-free, INT4_ASYM, group 32)
  on the OpenVINO model read from the same ONNX file: with its defaults (the embedding and the last
  layer, ``lm_head``, kept in INT8_ASYM) and with ``all_layers=True`` (INT4 everywhere, embedding too).

Decode speed: one decode step at cache position :data:`POSITION` of :data:`llm_torch.CACHE_LEN`,
batch 1, 2 threads, the runners timed side by side in blocks (``ncc.tools.timing``); tokens/s is
1 / the median step time (a static cache: every step costs the same). Next-token agreement: the
decode step fed the first :data:`AGREE_TOKENS` tokens of an evaluation window one by one, its argmax
against onnxruntime FP32's at every position. Perplexity: ``llm_models``' windows (pydoc topics, next-token
NLL in float64), each model in the runtime it is timed in.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llm_models as L  # noqa: E402
import llm_torch  # noqa: E402

GROUP = 32
POSITION = 64
AGREE_TOKENS = 96
QUICK_WINDOWS = 16


F32 = {"INFERENCE_PRECISION_HINT": "f32"}
"""Every OpenVINO row runs its float parts in f32 (an AMX CPU would otherwise pick bf16 for all but ORT's)."""


def open_row(runtime: str, path: Path, config: dict | None = None):
    """``path`` in ``runtime`` (:func:`ncc.tools.runtimes.open_runner`), OpenVINO at :data:`F32` plus ``config``."""
    from ncc.tools.runtimes import open_runner

    return open_runner(runtime, path, L.THREADS, {**F32, **(config or {})} if runtime == "openvino" else None)


def packed_layers(runner) -> str:
    """OpenVINO: the FullyConnected layers by their runtime precision (``u4 198, u8 2``); "" for onnxruntime."""
    if runner.runtime == "onnxruntime":
        return ""
    counts = runner.layer_precisions(("FullyConnected",))
    return ", ".join(f"{p} {n}" for p, n in sorted(counts.items()))


def nncf_int4(path: Path, out: Path, all_layers: bool) -> float:
    """``nncf.compress_weights`` (INT4_ASYM, group :data:`GROUP`) on ``path`` read by OpenVINO, saved as IR;
    returns the wall seconds of read + compress + save."""
    import logging

    import nncf
    import openvino as ov

    nncf.set_log_level(logging.WARNING)  # its bit-width table is logged on stdout, into the table
    start = time.perf_counter()
    model = ov.Core().read_model(str(path))
    with contextlib.redirect_stdout(sys.stderr):  # and its progress bar
        compressed = nncf.compress_weights(
            model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=GROUP, ratio=1.0, all_layers=all_layers
        )
    ov.save_model(compressed, str(out))
    return time.perf_counter() - start


def step_feed(decode: Path, position: int) -> dict[str, np.ndarray]:
    """The decode step's inputs at cache ``position`` (slots before it in use, their keys and values zero:
    the step's cost does not depend on them)."""
    import onnx

    graph = onnx.load(str(decode), load_external_data=False).graph
    shape = next(
        tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in graph.input if i.name == "past_k"
    )
    cache = np.zeros(shape, np.float32)
    mask = np.full((1, shape[3] + 1), llm_torch.MASKED, np.float32)
    mask[0, :position] = 0.0
    mask[0, -1] = 0.0
    return {
        "token": np.array([[198]], np.int64),
        "position": np.array([[position]], np.int64),
        "mask": mask,
        "past_k": cache,
        "past_v": cache.copy(),
    }


def next_tokens(runner, decode: Path, ids: np.ndarray) -> np.ndarray:
    """The decode step's argmax after each of ``ids`` (fed one per step, the cache kept as a caller would)."""
    feed = step_feed(decode, 0)
    out = []
    for p, token in enumerate(ids):
        feed["token"][0, 0], feed["position"][0, 0] = token, p
        result = runner.outputs(feed)
        feed["past_k"][:, :, :, p] = result["k"][:, :, :, 0]
        feed["past_v"][:, :, :, p] = result["v"][:, :, :, 0]
        feed["mask"][0, p] = 0.0
        out.append(int(result["logits"][0].argmax()))
    return np.asarray(out)


def perplexity(runner, windows: np.ndarray) -> float:
    nll = []
    for i in range(0, len(windows), L.EVAL_BATCH):
        ids = windows[i : i + L.EVAL_BATCH]
        logits = runner.outputs({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
        nll.extend(L.logits_nll(logits, ids))
    return float(np.exp(np.sum(nll) / (windows.shape[0] * (windows.shape[1] - 1))))


def ncc_w4(src: Path, out: Path, *options: str) -> float:
    """``ncc compile SRC`` + ``options`` -> ``out`` (+ ``out.data``) in a fresh process; returns its wall s."""
    import subprocess

    ncc = Path(sys.executable).parent / "ncc"
    cmd = [str(ncc), "compile", str(src), *options, "-o", str(out), "--external-data", out.name + ".data"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return time.perf_counter() - start


def run(quick: bool, workdir: Path) -> list[str]:
    import realmodels
    from bench_int8 import speed_cells
    from ncc.tools.timing import time_blocks

    decode, full = llm_torch.decode_onnx(), realmodels.smollm2_onnx()
    files: dict[str, dict[str, Path]] = {"decode": {"fp32": decode}, "full": {"fp32": full}}
    seconds: dict[str, float] = {}
    w4 = ("--pass", "w4", "--group-size", str(GROUP))
    level4 = (*w4, "--accuracy-level", "4")  # onnxruntime's int8-activation kernels
    head8 = (
        "--passes",
        f"fold-constants,woq-rtn{{group-size={GROUP} exclude=lm_head}},"
        f"woq-rtn{{bits=8 group-size={GROUP} include=lm_head embeddings=true}},pack-int4",
        "--target",
        "openvino",
    )
    for kind, src in (("decode", decode), ("full", full)):
        out = files[kind]
        for key, options in (
            ("ort", w4),
            ("ort-level4", level4),
            ("ov", (*w4, "--target", "openvino")),
            ("ov-head8", head8),
        ):
            out[key] = workdir / f"smollm2-{kind}.{key}.w4.onnx"
            seconds[f"ncc {key} {kind}"] = ncc_w4(src, out[key], *options)
        out["nncf"] = workdir / f"smollm2-{kind}.nncf.xml"
        seconds[f"nncf {kind}"] = nncf_int4(src, out["nncf"], all_layers=False)
        out["nncf-all"] = workdir / f"smollm2-{kind}.nncf-all.xml"
        nncf_int4(src, out["nncf-all"], all_layers=True)
        print(f"[smollm2] {kind} compiled", file=sys.stderr)
    float_activations = {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    rows = [
        ("onnxruntime FP32", "onnxruntime", "fp32", None),
        (f"onnxruntime, ncc w4 G{GROUP} (MatMulNBits)", "onnxruntime", "ort", None),
        (
            f"onnxruntime, ncc w4 G{GROUP}, accuracy_level 4 (int8 activations)",
            "onnxruntime",
            "ort-level4",
            None,
        ),
        ("OpenVINO FP32 (precision hint f32)", "openvino", "fp32", None),
        (f"OpenVINO, ncc w4 G{GROUP} --target openvino", "openvino", "ov", None),
        (
            f"OpenVINO, ncc w4 G{GROUP} --target openvino, DYNAMIC_QUANTIZATION_GROUP_SIZE=0",
            "openvino",
            "ov",
            float_activations,
        ),
        (
            f"OpenVINO, ncc w4 G{GROUP}, embedding + lm_head w8 G{GROUP} --target openvino",
            "openvino",
            "ov-head8",
            None,
        ),
        (f"OpenVINO, NNCF INT4_ASYM G{GROUP} (defaults: embedding, lm_head INT8)", "openvino", "nncf", None),
        (f"OpenVINO, NNCF INT4_ASYM G{GROUP} all_layers=True", "openvino", "nncf-all", None),
    ]
    ov_fp32 = next(i for i, row in enumerate(rows) if row[1] == "openvino")

    def opened(kind: str, runtime: str, key: str, config: dict | None):
        return open_row(runtime, files[kind][key], config)

    # decode speed and next-token agreement
    runners = [opened("decode", *row[1:]) for row in rows]
    layers = [packed_layers(r) for r in runners]
    text = L.eval_windows(1, AGREE_TOKENS)[0]
    reference = next_tokens(runners[0], decode, text)
    agreement = [float(np.mean(next_tokens(r, decode, text) == reference)) for r in runners]
    timing = time_blocks(
        runners, step_feed(decode, POSITION), runs=20 if quick else 40, rounds=5 if quick else 9
    )
    for r in runners:
        r.close()
    print("[smollm2] decode timed", file=sys.stderr)
    # perplexity of the full-sequence twins, each in its runtime
    windows = L.eval_windows()[: QUICK_WINDOWS if quick else L.N_EVAL]
    ppl = []
    for row in rows:
        runner = opened("full", *row[1:])
        ppl.append(perplexity(runner, windows))
        runner.close()
        print(f"[smollm2] perplexity {ppl[-1]:.3f}", file=sys.stderr)

    head = "| SmolLM2-135M decode step | weights (MB) | FullyConnected precisions (OpenVINO) | perplexity |"
    head += " next-token agreement | tokens/s | vs onnxruntime FP32 | vs OpenVINO FP32 |"
    lines = ["", head, "|" + "---|" * (head.count("|") - 1)]
    for i, (name, _, key, _) in enumerate(rows):
        path = files["decode"][key]
        size = sum(
            f.stat().st_size
            for f in (L.model_files(path) if path.suffix == ".onnx" else [path.with_suffix(".bin")])
        )
        line = f"| {name} | {size / 1e6:.0f} | {layers[i]} | {ppl[i]:.3f} | {agreement[i]:.3f} |"
        line += speed_cells(1 / timing.median(i), timing.ratio(i, 0))
        ov = timing.ratio(i, ov_fp32)
        line += f" {ov['median']:.2f}x ({ov['q25']:.2f}-{ov['q75']:.2f}) |"
        lines.append(line)
    lines.append(
        f"\nperplexity: {len(windows)} windows x {L.SEQ} tokens of pydoc_data.topics; decode: batch 1, cache "
        f"position {POSITION} of {llm_torch.CACHE_LEN}; next-token agreement over {AGREE_TOKENS} tokens against "
        f"onnxruntime FP32. Compile wall time of the decode step: ncc w4 --target openvino (fresh process) "
        f"{seconds['ncc ov decode']:.1f} s, NNCF compress_weights (in process) {seconds['nncf decode']:.1f} s"
    )
    return lines
