"""SmolLM2-135M, text, metrics and quantizers for the weight-only INT4 checks (issue 4), shared by
``benchmarks/bench_woq.py`` and ``tests/test_woq_models.py``.

- Model: :func:`realmodels.smollm2_onnx` (float32, 211 weight MatMuls incl. the untied lm_head).
- Text: every topic of Python's ``pydoc_data.topics`` (sorted keys, joined by blank lines), tokenized
  once with the model's own tokenizer (no BOS/EOS added); the token ids are cached as ``.npy``.
- Evaluation: :data:`N_EVAL` windows of :data:`SEQ` tokens evenly spaced over the first
  :data:`EVAL_FRACTION` of the token stream; calibration: :data:`N_CALIB` windows evenly spaced over the
  rest (disjoint by construction).
- :func:`perplexity`: exp of the mean next-token negative log-likelihood (float64) over all predicted
  positions of all evaluation windows (``SEQ - 1`` per window), onnxruntime CPU.
- :func:`prefill_latencies_ms`: batch-1 prefill of :data:`PREFILL_TOKENS` tokens, median of rounds of
  one prefill per model (``ncc.tools.timing.time_blocks``) after warm-up, :data:`THREADS` intra-op threads.
- :func:`weight_matmul_bytes`: bytes of the weights feeding MatMul / MatMulNBits, from the graph alone.
- :func:`ort_rtn`: onnxruntime's ``MatMulNBitsQuantizer`` (RTN, ``DefaultWeightOnlyQuantConfig``);
  :func:`ncc_w4`: ``ncc compile --pass w4`` in a subprocess.

Everything derived (token ids, calibration ``.npz``, FP32 perplexity, onnxruntime baselines) lives under
``realmodels.CACHE / "woq"``, keyed by a hash of the float model (and the onnxruntime version for its
quantizer's output).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

import realmodels  # noqa: E402
from ncc.ir.ops import is_onnx_domain  # noqa: E402
from ncc.runtime import WEIGHT_ONLY_IN_FLOAT  # noqa: E402
from ncc.tools.timing import time_blocks  # noqa: E402

CACHE = realmodels.CACHE / "woq"
SEQ = 256
N_EVAL, N_CALIB = 48, 32
EVAL_FRACTION = 0.6  # evaluation windows come from the first 60% of the tokens, calibration from the rest
THREADS = 2
PREFILL_TOKENS = 128
EVAL_BATCH = 4


# -- helpers ------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> Path:
    """``write(tmp_path)`` then rename to ``path`` (parallel writers at worst do the work twice)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def model_files(path: Path | str) -> list[Path]:
    """The ``.onnx`` file and the external-data files its tensors reference (each once); any other file alone."""
    import onnx
    from ncc.frontends.onnx import external_data_files

    path = Path(path)
    files = [path]
    if path.suffix != ".onnx":
        return files
    for data in external_data_files(path, onnx.load(str(path), load_external_data=False)):
        if data.resolve() not in {f.resolve() for f in files}:
            files.append(data)
    return files


def file_bytes(path: Path | str) -> int:
    """Bytes on disk of the model and its external data."""
    return sum(f.stat().st_size for f in model_files(path))


@functools.cache
def model_hash(path: Path | str) -> str:
    """sha256 (16 hex digits) of a file (a model: with its external data, in that order)."""
    h = hashlib.sha256()
    for f in model_files(path):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# onnxruntime fuses DequantizeLinear(int4, blocked) + MatMul into MatMulNBits at ORT_ENABLE_ALL with
# accuracy_level 4 (int8 activations) unless told otherwise; 0 keeps float compute, as in the MatMulNBits
# models both quantizers write (accuracy_level unset). The qdq form is scored with this config.
FLOAT_QDQ_MATMULNBITS = WEIGHT_ONLY_IN_FLOAT


def session(path: Path | str, threads: int = THREADS, config: dict[str, str] | None = None):
    """An onnxruntime CPU session with ncc bench's options (ORT_ENABLE_ALL, ``threads`` intra-op, 1 inter-op)
    and the session config entries ``config``."""
    from ncc.runtime import open_session
    from ncc.tools.bench import session_options

    options = session_options(threads)
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return open_session(path, options=options).ort


def _cached_json(path: Path, compute) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    return result


# -- text and windows ---------------------------------------------------------------------------------


def corpus_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))


def token_stream() -> np.ndarray:
    """The whole text as token ids (int64), cached by a hash of the text."""
    text = corpus_text()
    path = CACHE / f"pydoc-topics-{hashlib.sha256(text.encode()).hexdigest()[:16]}.npy"
    if path.exists():
        return np.load(path)
    ids = np.asarray(realmodels.smollm2_tokenizer()(text, add_special_tokens=False)["input_ids"], np.int64)
    _atomic_write(path, lambda tmp: np.save(tmp, ids))
    return ids


def _windows(ids: np.ndarray, start: int, stop: int, n: int, seq: int) -> np.ndarray:
    if stop - start < n * seq:
        raise ValueError(f"{n} windows of {seq} tokens do not fit in tokens [{start}, {stop})")
    starts = np.linspace(start, stop - seq, n).round().astype(np.int64)
    return np.stack([ids[s : s + seq] for s in starts])


def eval_windows(n: int = N_EVAL, seq: int = SEQ) -> np.ndarray:
    """int64 [n, seq], evenly spaced over the first EVAL_FRACTION of the tokens."""
    ids = token_stream()
    return _windows(ids, 0, int(len(ids) * EVAL_FRACTION), n, seq)


def calibration_windows(n: int = N_CALIB, seq: int = SEQ) -> np.ndarray:
    """int64 [n, seq], evenly spaced over the tokens after the evaluation part (disjoint from it)."""
    ids = token_stream()
    return _windows(ids, int(len(ids) * EVAL_FRACTION), len(ids), n, seq)


def calibration_npz(path: Path | str | None = None, n: int = N_CALIB, seq: int = SEQ) -> Path:
    """Write ``input_ids`` and ``attention_mask`` (int64 [n, seq]) for ``ncc compile --calib``; default
    path ``CACHE/smollm2-calib-{n}x{seq}.npz`` (kept if it exists)."""
    path = Path(path) if path is not None else CACHE / f"smollm2-calib-{n}x{seq}.npz"
    if path.exists():
        return path
    ids = calibration_windows(n, seq)
    return _atomic_write(path, lambda tmp: np.savez(tmp, input_ids=ids, attention_mask=np.ones_like(ids)))


# -- metrics ------------------------------------------------------------------------------------------


def window_nll(
    model_path: Path | str,
    windows: np.ndarray | None = None,
    batch: int = EVAL_BATCH,
    threads: int = THREADS,
    config: dict[str, str] | None = None,
) -> np.ndarray:
    """Summed next-token negative log-likelihood (float64) of each window: positions 0..seq-2 predict 1..seq-1."""
    windows = eval_windows() if windows is None else windows
    sess = session(model_path, threads, config)
    out = []
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch]
        logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        out.extend(logits_nll(logits, ids))
    return np.asarray(out)


def logits_nll(logits: np.ndarray, ids: np.ndarray) -> list[float]:
    """Per window, the summed next-token negative log-likelihood (float64) of ``logits`` [batch, seq, vocab]."""
    out = []
    for row, target in zip(logits, ids):
        x = row[:-1].astype(np.float64)
        peak = x.max(axis=-1, keepdims=True)
        logz = np.log(np.exp(x - peak).sum(axis=-1)) + peak[:, 0]
        out.append(float(np.sum(logz - x[np.arange(len(x)), target[1:]])))
    return out


def perplexity(
    model_path: Path | str,
    windows: np.ndarray | None = None,
    batch: int = EVAL_BATCH,
    config: dict[str, str] | None = None,
) -> float:
    """exp(mean next-token NLL) over all predicted positions of the evaluation windows."""
    windows = eval_windows() if windows is None else windows
    nll = window_nll(model_path, windows, batch, config=config)
    return float(np.exp(nll.sum() / (windows.shape[0] * (windows.shape[1] - 1))))


def fp32_perplexity(model_path: Path | str) -> float:
    """:func:`perplexity` of the float model, cached by its hash."""
    path = CACHE / f"fp32-ppl-{model_hash(model_path)}-{N_EVAL}x{SEQ}.json"
    return _cached_json(path, lambda: {"perplexity": perplexity(model_path)})["perplexity"]


def prefill_feed(tokens: int = PREFILL_TOKENS) -> dict[str, np.ndarray]:
    ids = eval_windows(1, max(tokens, 2))[:, :tokens]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def prefill_latencies_ms(
    paths: list[Path | str], tokens: int = PREFILL_TOKENS, repeats: int = 10, warmup: int = 2
) -> list[float]:
    """Median ms of a batch-1 prefill of ``tokens`` tokens for each model, :data:`THREADS` intra-op
    threads, side by side in ``repeats`` rounds of one run per model (:func:`ncc.tools.timing.time_blocks`:
    each run after the previous model's idle workers stopped spinning) so drift hits all alike."""
    timing = time_blocks(
        [session(p) for p in paths],
        prefill_feed(tokens),
        runs=repeats,
        rounds=repeats,
        warmup=warmup,
        min_block_s=0,
        outputs=["logits"],
    )
    return [1000 * timing.median(i) for i in range(len(paths))]


def paired_latency_ratio(
    path_a: Path | str, path_b: Path | str, tokens: int = PREFILL_TOKENS, rounds: int = 40, warmup: int = 3
) -> dict[str, float]:
    """Side by side: ``rounds`` rounds of one prefill of A and one of B (:func:`ncc.tools.timing.time_blocks`,
    order alternating), each round's A/B time ratio; returns its median and quartiles, and each model's
    median ms. Pairing adjacent runs cancels the drift of a shared machine that separate medians keep."""
    timing = time_blocks(
        [session(path_a), session(path_b)],
        prefill_feed(tokens),
        runs=rounds,
        rounds=rounds,
        warmup=warmup,
        min_block_s=0,
        outputs=["logits"],
    )
    r = timing.ratio(1, 0)
    return {
        "ratio": r["median"],
        "q25": r["q25"],
        "q75": r["q75"],
        "a_ms": 1000 * timing.median(0),
        "b_ms": 1000 * timing.median(1),
        "rounds": rounds,
    }


def packed_weight_digests(model_path: Path | str) -> list[str]:
    """sha256 of every MatMulNBits weight, scale and zero-point tensor, sorted, with the padding of a partial
    last block (and of the last packed zero point) cleared: two models with equal lists run the same
    kernels on the same numbers, whatever each quantizer leaves in bytes no kernel reads."""
    import hashlib

    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=True)
    init = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, bits, block = attrs["K"], attrs["bits"], attrs["block_size"]
        blocks = -(-k // block)
        arrays = [numpy_helper.to_array(init[n]).copy() if n in init else None for n in node.input[1:4]]
        weight = arrays[0]
        tail_bits = (k - (blocks - 1) * block) * bits
        weight[:, -1, -(-tail_bits // 8) :] = 0
        if tail_bits % 8:
            weight[:, -1, tail_bits // 8] &= (1 << tail_bits % 8) - 1
        zero_point = arrays[2] if len(arrays) > 2 else None
        if zero_point is not None and zero_point.dtype == np.uint8 and (blocks * bits) % 8:
            zero_point[..., -1] &= (1 << (blocks * bits) % 8) - 1
        out.append(hashlib.sha256(b"".join(a.tobytes() for a in arrays if a is not None)).hexdigest())
    return sorted(out)


def prefill_latency_ms(model_path: Path | str, tokens: int = PREFILL_TOKENS, repeats: int = 10) -> float:
    return prefill_latencies_ms([model_path], tokens, repeats)[0]


# -- sizes --------------------------------------------------------------------------------------------

_SUB_BYTE_BITS = {"INT4": 4, "UINT4": 4, "INT2": 2, "UINT2": 2, "FLOAT4E2M1": 4}
_PASS_THROUGH = {"Reshape", "Transpose", "Cast", "Identity"}  # data movement between a weight and its MatMul


def _tensor_bytes(tensor) -> float:
    import onnx

    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    name = onnx.TensorProto.DataType.Name(tensor.data_type)
    if name in _SUB_BYTE_BITS:
        return count * _SUB_BYTE_BITS[name] / 8
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def weight_matmul_bytes(model_path: Path | str) -> float:
    """Bytes of the weights feeding MatMul / MatMulNBits nodes, read from the graph (no external data).

    A MatMul on a float initializer counts its elements x itemsize; a MatMulNBits its packed ``B``, its
    scales and zero points; a MatMul fed by DequantizeLinear (directly or through Reshape / Transpose /
    Cast) the DQ's quantized input (int4 0.5 byte an element), scale and zero point. Shared weights count once.
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    init = {t.name: t for t in graph.initializer}
    for node in graph.node:  # Constant nodes holding tensors count like initializers
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            init[node.output[0]] = node.attribute[0].t
    producer = {o: n for n in graph.node for o in n.output}
    counted: set[str] = set()

    def add(names) -> float:
        total = 0.0
        for name in names:
            if name and name in init and name not in counted:
                counted.add(name)
                total += _tensor_bytes(init[name])
        return total

    total = 0.0
    for node in graph.node:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            total += add(node.input[1:4])  # B, scales, zero_points
        elif node.op_type == "MatMul" and is_onnx_domain(node.domain):
            b = node.input[1]
            while b in producer and producer[b].op_type in _PASS_THROUGH:
                b = producer[b].input[0]
            if b in init:
                total += add([b])
            elif b in producer and producer[b].op_type == "DequantizeLinear" and producer[b].input[0] in init:
                total += add(producer[b].input[:3])
    return total


def quantized_matmuls(model_path: Path | str) -> dict[str, int]:
    """How many MatMulNBits nodes, DequantizeLinear-fed MatMuls and float-weight MatMuls a model has."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    init = {t.name for t in graph.initializer}
    producer = {o: n.op_type for n in graph.node for o in n.output}
    counts = {"MatMulNBits": 0, "DQ->MatMul": 0, "float MatMul": 0}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            counts["MatMulNBits"] += 1
        elif node.op_type == "MatMul" and node.input[1] in init:
            counts["float MatMul"] += 1
        elif node.op_type == "MatMul" and producer.get(node.input[1]) == "DequantizeLinear":
            counts["DQ->MatMul"] += 1
    return counts


# -- quantizers ---------------------------------------------------------------------------------------


def ort_rtn(
    float_path: Path | str,
    out_path: Path | str,
    block_size: int = 128,
    symmetric: bool = False,
    accuracy_level: int | None = None,
) -> float:
    """onnxruntime ``MatMulNBitsQuantizer`` (4 bits, RTN through ``DefaultWeightOnlyQuantConfig``, QOperator
    MatMulNBits), saved with external data ``<out>.data``; returns the wall time in seconds (load,
    quantize and save)."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )
    from onnxruntime.quantization.quant_utils import QuantFormat

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(
        logging.WARNING
    )  # INFO per node
    start = time.perf_counter()
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        quant_format=QuantFormat.QOperator,
        bits=4,
    )
    with contextlib.redirect_stdout(sys.stderr):
        quantizer = MatMulNBitsQuantizer(str(float_path), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out_path), use_external_data_format=True)
    return time.perf_counter() - start


def _cached_model(name: str, produce, config: dict[str, str] | None = None) -> dict:
    """A quantized model kept in ``CACHE/name/model.onnx`` with ``result.json``: what ``produce(out_path)``
    returns (its wall time etc.) plus the model's perplexity, weight-MatMul bytes, file bytes and MatMul
    kinds (perplexity with the session config entries ``config``). Built in a temporary folder and
    renamed, so an interrupted build leaves nothing behind."""

    def build(tmp: Path) -> None:
        out = tmp / "model.onnx"
        result = dict(produce(out))
        result.update(
            perplexity=perplexity(out, config=config),
            session_config=config or {},
            weight_matmul_bytes=weight_matmul_bytes(out),
            file_bytes=file_bytes(out),
            matmuls=quantized_matmuls(out),
        )
        (tmp / "result.json").write_text(json.dumps(result, indent=2))

    folder = realmodels._cached(CACHE / name, build, "result.json").parent
    result = json.loads((folder / "result.json").read_text())
    result["path"] = folder / "model.onnx"
    return result


def _key(*parts) -> str:
    return hashlib.sha256("-".join(map(str, parts)).encode()).hexdigest()[:16]


def _settings(group_size: int, symmetric: bool) -> str:
    return f"g{group_size}-{'sym' if symmetric else 'asym'}"


def ort_rtn_cached(
    float_path: Path | str, block_size: int = 128, symmetric: bool = False, accuracy_level: int | None = None
) -> dict:
    """:func:`ort_rtn`'s model with its scores (see :func:`_cached_model`), keyed by the onnxruntime version,
    the float model, the settings and the evaluation windows (its output depends on nothing else)."""
    import onnxruntime as ort

    settings = _settings(block_size, symmetric) + (f"-acc{accuracy_level}" if accuracy_level else "")
    key = _key(ort.__version__, model_hash(float_path), settings, N_EVAL, SEQ)
    return _cached_model(
        f"ort-rtn-{settings}-{key}",
        lambda out: {
            "quantize_s": ort_rtn(float_path, out, block_size, symmetric, accuracy_level),
            "onnxruntime": ort.__version__,
            "settings": settings,
        },
    )


NCC = Path(sys.executable).parent / "ncc"
NCC_SOURCES = (
    "__init__.py",
    "errors.py",
    "files.py",
    "targets.py",
    "backends",
    "frontends",
    "ir",
    "passes",
    "tools",
)


def ncc_source_hash() -> str:
    """sha256 (16 hex digits) of ncc's own code (``.py`` and ``.lark`` files of the package, not tests or
    benchmarks): cached ncc outputs are rebuilt whenever it changes."""
    h = hashlib.sha256()
    for entry in NCC_SOURCES:
        root = REPO / entry
        files = (
            [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in (".py", ".lark"))
        )
        for f in files:
            h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def weight_ks(model_path: Path | str) -> set[int]:
    """The K (rows) of every [K, N] initializer feeding a MatMul."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    init = {t.name: t for t in graph.initializer}
    return {
        init[n.input[1]].dims[0]
        for n in graph.node
        if n.op_type == "MatMul" and n.input[1] in init and len(init[n.input[1]].dims) == 2
    }


def ncc_w4_command(
    float_path: Path | str,
    out_path: Path | str,
    algo: str = "rtn",
    group_size: int = 128,
    symmetric: bool = False,
    calib: Path | str | None = None,
    fmt: str | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The ``ncc compile --pass w4`` command; ``--partial-groups`` is added when ``group_size`` does not divide
    every layer's K (SmolLM2: K=576 at G128 ends in a group of 64, as onnxruntime's padded last block)."""
    out_path = Path(out_path)
    cmd = [
        str(NCC),
        "compile",
        str(float_path),
        "--pass",
        "w4",
        "--algo",
        algo,
        "--group-size",
        str(group_size),
    ]
    if group_size and any(k % group_size for k in weight_ks(float_path)):
        cmd.append("--partial-groups")
    if symmetric:
        cmd.append("--symmetric")
    if calib is not None:
        cmd += ["--calib", str(calib)]
    if fmt is not None:
        cmd += ["--format", fmt]
    return [*cmd, *extra, "-o", str(out_path), "--external-data", out_path.name + ".data"]


def ncc_w4(
    float_path: Path | str,
    out_path: Path | str,
    algo: str = "rtn",
    group_size: int = 128,
    symmetric: bool = False,
    calib: Path | str | None = None,
    fmt: str | None = None,
    extra: tuple[str, ...] = (),
) -> tuple[float, list[str], str]:
    """``ncc compile --pass w4`` in a subprocess (GPTQ / AWQ get ``calib``, default :func:`calibration_npz`;
    RTN none), with a fresh cache folder; returns (wall s, command, ncc's report)."""
    if algo in ("gptq", "awq") and calib is None:
        calib = calibration_npz()
    if algo == "rtn":
        calib = None
    with tempfile.TemporaryDirectory(prefix="ncc-cache-") as cache_dir:
        cmd = ncc_w4_command(
            float_path, out_path, algo, group_size, symmetric, calib, fmt, (*extra, "--cache-dir", cache_dir)
        )
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        cmd = [c if c != cache_dir else "$EMPTY_TMP_DIR" for c in cmd]
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}) after {wall:.0f}s:\n{proc.stdout}\n{proc.stderr}"
        )
    return wall, cmd, proc.stdout + proc.stderr


def ncc_w4_cached(
    float_path: Path | str,
    algo: str = "rtn",
    group_size: int = 128,
    symmetric: bool = False,
    fmt: str | None = None,
) -> dict:
    """:func:`ncc_w4`'s model with its scores (see :func:`_cached_model`), keyed by ncc's source hash, the
    onnxruntime version, the float model, the calibration data (GPTQ / AWQ), the options and the
    evaluation windows: any change to ncc's code compiles again."""
    import onnxruntime as ort

    calib = calibration_npz() if algo in ("gptq", "awq") else None
    settings = f"{algo}-{_settings(group_size, symmetric)}" + (f"-{fmt}" if fmt else "")
    source = ncc_source_hash()
    config = FLOAT_QDQ_MATMULNBITS if fmt == "qdq" else None
    key = _key(
        source,
        ort.__version__,
        model_hash(float_path),
        model_hash(calib) if calib else "",
        settings,
        N_EVAL,
        SEQ,
        json.dumps(config, sort_keys=True),
    )

    def produce(out: Path) -> dict:
        wall, cmd, report = ncc_w4(float_path, out, algo, group_size, symmetric, calib, fmt)
        cmd = [c.replace(str(out.parent), "$OUT") for c in cmd]
        # ncc_source_after differs from ncc_source if ncc's code changed while this compiled
        return {
            "quantize_s": wall,
            "command": cmd,
            "report": report,
            "ncc_source": source,
            "ncc_source_after": ncc_source_hash(),
            "settings": settings,
        }

    name = f"ncc-{settings}-{key}"
    for stale in CACHE.glob(
        f"ncc-{settings}-" + "?" * len(key)
    ):  # one cached build per setting: older code's go
        if stale.name != name:
            shutil.rmtree(stale, ignore_errors=True)
    return _cached_model(name, produce, config)
