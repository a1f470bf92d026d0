"""``ncc bench FLOAT.onnx QUANT.onnx``: quality ratio, speed ratio and sizes, like the published tables.

One row per model pair::

    | model | FP32 quality | INT8 quality | ratio | FP32 samples/s | INT8 samples/s | speed-up | FP32 MB | INT8 MB | threads | batch |

Quality is output fidelity by default: for each model output, the mean per-sample
cosine, the top-1 agreement (outputs of rank >= 2 whose last axis > 1) and the SQNR
of the quantized model's output against the float model's, as :mod:`ncc.metrics`
defines them; the headline quality is the cosine of the first output (the float
model scores 1 against itself). ``--metric accuracy:LABELS.npy`` scores both models' top-1 accuracy on
their first output against the labels instead.

Throughput runs both models in onnxruntime (CPU EP, ``ORT_ENABLE_ALL``,
``intra_op_num_threads=T``, ``inter_op_num_threads=1``) on one batch, side by side
in blocks (:mod:`ncc.tools.timing`: W warm-up runs each, then rounds of one block per
model, each block starting after the other model's idle workers stopped spinning);
at least R timed runs per model, more for a fast model. samples/s is batch / median
latency; the speed-up is the median over rounds of the ratio of the two models'
block medians in the same round, so machine drift between rounds cancels. Its
quartiles are in the JSON (``throughput.speedup_q25``, ``speedup_q75``). Sizes count
the model file and every external-data file it references.

TensorFlow artefacts: either model can be a SavedModel folder, run in TensorFlow, or a ``.tflite``
file, run in LiteRT (:mod:`ncc.tools.runtimes`: the same threads, timed in the same blocks), in any
combination with ONNX (FP32 SavedModel vs INT8 ``.tflite`` is one command). Their inputs and outputs
come from the signature or the interpreter; the quantized model's are paired with the float model's
by name, else in order when the counts match, and the shapes must agree (a SavedModel's ``output_0`` is
its ONNX's ``logits``); data is keyed by the float model's input names. Such a pair also prints one row
per model with its runtime and precision (``result["runtimes"]``), measured against the FP32 model.

numpy, onnx and onnxruntime are imported inside the functions so ``ncc --help``
stays fast; TensorFlow and LiteRT only when a model is a TensorFlow artefact. :func:`benchmark` is
the Python entry point for benchmark scripts.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click
from ncc.errors import NccError, first_line
from ncc.tools.timing import MIN_BLOCK_S, SETTLE_S, time_blocks

DEFAULT_WARMUP = 5
DEFAULT_RUNS = 20
TIMING_ROUNDS = 5  # blocks per model; the speed-up is the median of the rounds' ratios
DEFAULT_SEQ_LEN = 128
SYNTHETIC_SAMPLES = 32
SYNTHETIC_SEED = 0
TOKEN_ID_HIGH = 1000
MB = 1e6

TABLE_HEADER = (
    "| model | FP32 quality | INT8 quality | ratio | FP32 samples/s | INT8 samples/s | speed-up "
    "| FP32 MB | INT8 MB | threads | batch |"
)


# -- models -----------------------------------------------------------------------------------------


class _ModelInfo:
    """What bench needs to know about one model file: its inputs, outputs and size on disk, and the
    runtime it runs in (an ONNX file in onnxruntime: ``runner`` is None, bench opens its sessions)."""

    runtime = "onnxruntime"
    runner = None

    def __init__(self, path: Path, role: str):
        import onnx

        self.path = path
        if not path.exists():
            raise NccError(f"{role} model {path}: no such file.")
        if path.is_dir():
            raise NccError(f"{role} model {path} is a folder, not an ONNX file.")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as err:  # DecodeError, or anything else protobuf raises on garbage
            raise NccError(f"{role} model {path} is not an ONNX model ({type(err).__name__}).") from None
        if proto.ir_version == 0 or not proto.HasField("graph") or not proto.graph.output:
            raise NccError(f"{role} model {path} is not an ONNX model (no graph with outputs).")
        initializers = {t.name for t in proto.graph.initializer}
        # name -> (numpy dtype, dims: int for static, str/None for dynamic)
        self.inputs: dict[str, tuple[Any, list]] = {}
        self.optional_inputs: set[str] = set()
        for value in proto.graph.input:
            self.inputs[value.name] = _value_type(value, path)
            if value.name in initializers:
                self.optional_inputs.add(value.name)
        self.outputs = [value.name for value in proto.graph.output]
        self.output_dims = {value.name: _output_dims(value) for value in proto.graph.output}
        self.size_bytes, self.files = _model_size(path, proto)

    @property
    def required_inputs(self) -> list[str]:
        return [name for name in self.inputs if name not in self.optional_inputs]

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()


class _TfModelInfo(_ModelInfo):
    """A SavedModel folder or a ``.tflite`` file: its runner (:func:`ncc.tools.runtimes.open_tf_runner`,
    opened here) says what it takes and gives; its size is every file it is made of."""

    def __init__(self, path: Path, fmt: str, threads: int, signature: str | None):
        from ncc.tools.runtimes import open_tf_runner

        self.path = path
        self.runner = open_tf_runner(fmt, path, threads, signature=signature)
        self.runtime = self.runner.runtime
        self.inputs = dict(self.runner.input_types)
        self.optional_inputs: set[str] = set()
        self.outputs = list(self.runner.names)
        self.output_dims = dict(self.runner.output_dims)
        self.files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        self.size_bytes = sum(f.stat().st_size for f in self.files)


#: Files ncc bench cannot time as they are, and what to make of them first.
_NOT_TIMED = {
    ".keras": "a Keras file",
    ".h5": "a Keras HDF5 file",
    ".hdf5": "a Keras HDF5 file",
    ".pb": "a frozen GraphDef",
}


def _artefact(path: Path, role: str) -> tuple[Path, str]:
    """``path`` (a ``saved_model.pb`` stands for its folder) and its format: ``onnx``, ``saved_model`` or
    ``tflite``, judged by name, before anything is read."""
    if path.name == "saved_model.pb" and path.is_file():
        path = path.parent
    if not path.exists():
        raise NccError(f"{role} model {path}: no such file.")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return path, "saved_model"
        raise NccError(
            f"{role} model {path} is a folder without saved_model.pb, neither an ONNX file nor a SavedModel."
        )
    suffix = path.suffix.lower()
    if suffix == ".tflite":
        return path, "tflite"
    if suffix in _NOT_TIMED:
        raise NccError(
            f"{role} model {path} is {_NOT_TIMED[suffix]}, which ncc bench does not run: give its ONNX "
            "(ncc compile), its SavedModel (Keras: model.export(DIR)) or its .tflite."
        )
    return path, "onnx"


def _output_dims(value) -> list:
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
        return []
    return [
        int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
    ]


def _value_type(value, path: Path):
    import numpy as np
    import onnx

    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type") or tensor_type.elem_type == 0:
        raise NccError(
            f"{path}: input {value.name!r} is not a tensor with a known element type; ncc bench needs tensor inputs."
        )
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    dims: list = []
    if tensor_type.HasField("shape"):
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or None)
    return dtype, dims


def _model_size(path: Path, proto) -> tuple[int, list[Path]]:
    """Bytes on disk of ``path`` plus the external-data files its tensors reference (each once)."""
    from ncc.frontends.onnx import external_data_files

    files = [path]
    for data_path in external_data_files(path, proto):
        if not data_path.exists():
            raise NccError(f"{path}: external data file {data_path.name!r} does not exist.")
        if data_path.resolve() not in {f.resolve() for f in files}:
            files.append(data_path)
    return sum(f.stat().st_size for f in files), files


_PAIRING = "ncc bench pairs them by name, else in order, and their shapes must agree"


def _pair_interfaces(fp: _ModelInfo, q: _ModelInfo) -> tuple[dict[str, str], dict[str, str]]:
    """The quantized model's input for each of the float model's required inputs, and its output for each
    float output: by name when both have the same names, else in order when the counts are equal (a
    SavedModel's ``output_0`` and its ONNX's ``logits``); either way every pair's shapes must agree."""
    fp_dims = {name: fp.inputs[name][1] for name in fp.required_inputs}
    q_dims = {name: q.inputs[name][1] for name in q.required_inputs}
    inputs = _pair(fp.required_inputs, q.required_inputs, fp_dims, q_dims)
    if inputs is None:
        raise NccError(
            f"the models have different inputs: {fp.path.name} takes {_interface_text(fp_dims)}, "
            f"{q.path.name} takes {_interface_text(q_dims)}; {_PAIRING}."
        )
    for name, other in inputs.items():
        if fp.inputs[name][0] != q.inputs[other][0]:
            which = repr(name) if name == other else f"{name!r} ({other!r})"
            raise NccError(
                f"the models disagree on input {which}: {fp.path.name} takes {fp.inputs[name][0]}, "
                f"{q.path.name} takes {q.inputs[other][0]}."
            )
    outputs = _pair(fp.outputs, q.outputs, fp.output_dims, q.output_dims)
    if outputs is None:
        raise NccError(
            f"the models have different outputs: {fp.path.name} gives {_interface_text(fp.output_dims)}, "
            f"{q.path.name} gives {_interface_text(q.output_dims)}; {_PAIRING}."
        )
    return inputs, outputs


def _pair(names: list[str], others: list[str], dims: Mapping, other_dims: Mapping) -> dict[str, str] | None:
    if set(names) == set(others):
        pairs = {name: name for name in names}
    elif len(names) == len(others):
        pairs = dict(zip(names, others))
    else:
        return None
    return pairs if all(_dims_agree(dims[a], other_dims[b]) for a, b in pairs.items()) else None


def _dims_agree(a: list, b: list) -> bool:
    """Same rank and the same size on every axis after the batch (axis 0) that both fix; an unknown shape
    agrees with any (fixed batches are checked against each other and the data later)."""
    if not a or not b:
        return True
    return len(a) == len(b) and all(
        not (isinstance(x, int) and isinstance(y, int) and x != y) for x, y in zip(a[1:], b[1:])
    )


def _interface_text(dims: Mapping) -> str:
    return "[" + ", ".join(f"{name} {_dims_text(d)}" for name, d in dims.items()) + "]"


def _feed_for(feed: Mapping, info: _ModelInfo, inputs: Mapping[str, str]) -> dict:
    """A feed keyed by the float model's input names, keyed as ``info``'s (``inputs``: float -> its names)."""
    return {inputs.get(k, k): v for k, v in feed.items() if inputs.get(k, k) in info.inputs}


def session_options(threads: int):
    """How every throughput number in ncc is measured: CPU EP, all optimizations, ``threads``
    intra-op threads, one inter-op thread, sequential execution."""
    from ncc.runtime import session_options as options

    return options(threads=threads, sequential=True)


def _session(info: _ModelInfo, threads: int):
    from ncc.runtime import open_session

    return open_session(info.path, options=session_options(threads))


# -- data -------------------------------------------------------------------------------------------


def _load_data(spec) -> dict:
    """A data spec -> arrays by name (samples on axis 0).

    A ``.npz`` file is read here (bench evaluates every sample, so it loads them all); folders and
    ``module.py:function`` go through ``ncc.passes.quant.calib_data`` when it is installed.
    """
    import numpy as np

    path = Path(spec)
    if path.suffix.lower() == ".npz" and not path.is_dir():
        if not path.exists():
            raise NccError(f"data {path}: no such file.")
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        except Exception as err:
            raise NccError(f"data {path} is not a readable .npz file ({first_line(err)}).") from None
    try:
        from ncc.passes.quant.calib_data import load_calibration_data
    except ImportError:
        load_calibration_data = None
    if load_calibration_data is None:
        if not path.exists():
            raise NccError(f"data {path}: no such file.")
        raise NccError(f"data {path}: expected a .npz file of arrays keyed by input name.")
    return _as_arrays(load_calibration_data(str(spec)), str(spec))


def _as_arrays(data, what: str) -> dict:
    """Mapping of arrays (samples on axis 0) or an iterable of feed dicts -> arrays by name."""
    import numpy as np

    if isinstance(data, Mapping):
        return {str(k): np.asarray(v) for k, v in data.items()}
    if callable(getattr(data, "pieces", None)):  # ncc.passes.quant.calib_data.CalibrationData
        data = data.pieces()
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise NccError(f"data {what}: expected arrays keyed by input name or an iterable of such dicts.")
    parts: dict[str, list] = {}
    for i, feed in enumerate(data):
        if not isinstance(feed, Mapping):
            raise NccError(
                f"data {what}: item {i} is a {type(feed).__name__}, not a dict of arrays keyed by input name."
            )
        if parts and set(feed) != set(parts):
            raise NccError(
                f"data {what}: item {i} has inputs {sorted(feed)}, earlier items have {sorted(parts)}."
            )
        for key, value in feed.items():
            parts.setdefault(str(key), []).append(np.asarray(value))
    arrays = {}
    for key, chunks in parts.items():
        try:
            arrays[key] = np.concatenate(chunks, axis=0) if chunks[0].ndim else np.stack(chunks)
        except ValueError as err:
            raise NccError(
                f"data {what}: the arrays for input {key!r} do not stack ({first_line(err)})."
            ) from None
    return arrays


def _same_kind(data_dtype, want) -> bool:
    import numpy as np

    def kind(dt):
        dt = np.dtype(dt)
        return "int" if dt.kind in "iu" else dt.kind

    return kind(data_dtype) == kind(want)


def _check_data(arrays: dict, info: _ModelInfo, what: str) -> tuple[dict, int]:
    """Validate ``arrays`` against the model's inputs; returns (feeds cast to the input dtypes, sample count)."""
    import numpy as np

    if not arrays:
        raise NccError(f"data {what} is empty.")
    missing = [name for name in info.required_inputs if name not in arrays]
    unknown = [name for name in arrays if name not in info.inputs]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"lacks input(s) {missing}")
        if unknown:
            parts.append(f"has array(s) {unknown} that are not model inputs")
        raise NccError(f"data {what} {' and '.join(parts)}; the model takes {info.required_inputs}.")
    feeds, counts = {}, set()
    for name, array in arrays.items():
        dtype, dims = info.inputs[name]
        if not _same_kind(array.dtype, dtype):
            raise NccError(f"data {what}: input {name!r} is {array.dtype}, the model expects {dtype}.")
        if dims and array.ndim != len(dims):
            raise NccError(
                f"data {what}: input {name!r} has shape {list(array.shape)}, the model expects rank {len(dims)} "
                f"({_dims_text(dims)}) with samples on axis 0."
            )
        for axis, (have, want) in enumerate(zip(array.shape, dims)):
            if axis > 0 and isinstance(want, int) and have != want:
                raise NccError(
                    f"data {what}: input {name!r} has shape {list(array.shape)}, the model expects {_dims_text(dims)}."
                )
        if array.ndim == 0:
            feeds[name] = array.astype(dtype)
            continue
        counts.add(array.shape[0])
        feeds[name] = np.ascontiguousarray(array, dtype=dtype)
    if len(counts) > 1:
        raise NccError(f"data {what}: inputs have different sample counts {sorted(counts)} on axis 0.")
    n = counts.pop() if counts else 1
    if n == 0:
        raise NccError(f"data {what} has no samples.")
    return feeds, n


def _dims_text(dims) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"


def synthetic_inputs(
    info: _ModelInfo,
    samples: int,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    dims: Mapping[str, int] | None = None,
    seed: int = SYNTHETIC_SEED,
) -> dict:
    """Deterministic inputs from the model's input types.

    Axis 0 holds ``samples``; a dynamic second dim of an integer input is ``seq_len``; other dynamic
    dims come from ``dims`` (by dim name) or a dim of the same name already fixed, else 1. Floats are
    standard normal; integer inputs named like token ids are uniform in [0, 1000), attention masks
    ones, token type / segment ids zeros, position ids 0..L-1, other integers zeros; bools true.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    named: dict[str, int] = dict(dims or {})
    shapes = {}
    for name in info.required_inputs:  # fix named dims first so float inputs agree with integer ones
        dtype, in_dims = info.inputs[name]
        shape = []
        for axis, dim in enumerate(in_dims):
            if isinstance(dim, int):
                shape.append(dim)
                continue
            if axis == 0:
                value = samples
            elif dim in named:
                value = named[dim]
            elif axis == 1 and np.issubdtype(dtype, np.integer):
                value = seq_len
            else:
                value = None
            if value is not None and dim and axis > 0:
                named.setdefault(dim, value)
            shape.append(value)
        shapes[name] = shape
    feeds = {}
    for name in info.required_inputs:
        dtype = info.inputs[name][0]
        in_dims = info.inputs[name][1]
        shape = [v if v is not None else named.get(in_dims[a], 1) for a, v in enumerate(shapes[name])]
        lower = name.lower()
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = np.ones(shape, dtype=bool)
        elif "mask" in lower:
            feeds[name] = np.ones(shape, dtype=dtype)
        elif "token_type" in lower or "segment" in lower:
            feeds[name] = np.zeros(shape, dtype=dtype)
        elif "position" in lower:
            feeds[name] = np.broadcast_to(np.arange(shape[-1] if shape else 1), shape).astype(dtype)
        elif "ids" in lower or "token" in lower or "input" in lower:
            feeds[name] = rng.integers(0, TOKEN_ID_HIGH, size=shape).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


def _take(feeds: dict, start: int, stop: int) -> dict:
    return {k: (v[start:stop] if v.ndim else v) for k, v in feeds.items()}


def _tile_batch(feeds: dict, n: int, batch: int) -> dict:
    """One batch of ``batch`` samples: the first ones, repeated when there are fewer than ``batch``."""
    import numpy as np

    index = np.arange(batch) % n
    return {k: (np.ascontiguousarray(v[index]) if v.ndim else v) for k, v in feeds.items()}


# -- quality ----------------------------------------------------------------------------------------


def _run_all(session, feeds: dict, n: int, chunk: int, synthetic: bool) -> dict:
    """Run ``session`` (an :class:`ncc.runtime.Session`) over the samples ``chunk`` at a time; outputs by
    name, samples concatenated."""
    import numpy as np

    where = "synthetic inputs (pass --data with real inputs)" if synthetic else ""
    parts: dict[str, list] = {name: [] for name in session.output_names}
    for start in range(0, n, chunk):
        outs = session.run(_take(feeds, start, min(start + chunk, n)), where=where)
        for name, out in outs.items():
            parts[name].append(np.asarray(out))
    return {
        name: (np.concatenate(chunks, axis=0) if chunks[0].ndim else np.stack(chunks))
        for name, chunks in parts.items()
    }


def output_metrics(ref, got, mask=None) -> dict:
    """Cosine (mean over samples), top-1 agreement and SQNR in dB of ``got`` vs ``ref`` (:mod:`ncc.metrics`).

    ``mask`` (``[samples, seq]``, a transformer's ``attention_mask``) leaves padded positions out of all
    three when the outputs start with those dimensions and have more: nothing reads a padded token's output.
    """
    import numpy as np
    from ncc.metrics import sample_cosines, sqnr_db, top1_agreement, unpadded

    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        raise NccError(f"the models' outputs differ in shape: {list(ref.shape)} vs {list(got.shape)}.")
    if ref.ndim > 2:
        ref, got = unpadded(ref, mask), unpadded(got, mask)
    return {
        "cosine": float(np.mean(sample_cosines(ref, got))),
        "top1_agreement": top1_agreement(ref, got, mask),
        "sqnr_db": sqnr_db(ref, got),
    }


def _predictions(out, output_name: str):
    import numpy as np

    if np.issubdtype(out.dtype, np.integer):
        return out
    if out.ndim >= 2 and out.shape[-1] > 1:
        return np.argmax(out, axis=-1)
    raise NccError(
        f"accuracy needs output {output_name!r} to hold class scores (last axis > 1) or class ids; "
        f"it has shape {list(out.shape)}."
    )


def _accuracy(out, labels, output_name: str) -> float:
    import numpy as np

    pred = _predictions(out, output_name)
    if pred.shape != labels.shape:
        if pred.size != labels.size:
            raise NccError(
                f"labels have shape {list(labels.shape)} but output {output_name!r} gives predictions of shape "
                f"{list(pred.shape)}."
            )
        pred = pred.reshape(labels.shape)
    return float(np.mean(pred == labels))


def _parse_metric(metric: str) -> tuple[str, Path | None]:
    if metric == "fidelity":
        return "fidelity", None
    if metric.startswith("accuracy:") and len(metric) > len("accuracy:"):
        return "accuracy", Path(metric[len("accuracy:") :])
    raise NccError(f"unknown metric {metric!r}; use 'fidelity' or 'accuracy:LABELS.npy'.")


def _load_labels(path: Path):
    import numpy as np

    if not path.exists():
        raise NccError(f"labels {path}: no such file.")
    try:
        labels = np.load(path, allow_pickle=False)
    except Exception as err:
        raise NccError(f"labels {path} is not a readable .npy file ({first_line(err)}).") from None
    if not isinstance(labels, np.ndarray):  # an .npz
        with labels as npz:
            if len(npz.files) != 1:
                raise NccError(
                    f"labels {path} holds {len(npz.files)} arrays; give a .npy with one label per sample."
                )
            labels = npz[npz.files[0]]
    if labels.ndim == 0:
        raise NccError(f"labels {path} is a scalar; give one label per sample.")
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise NccError(f"labels {path} are {labels.dtype}; give integer class ids.")
    return labels


# -- timing -----------------------------------------------------------------------------------------


def _latency_stats(timing, i: int, batch: int) -> dict:
    median = timing.median(i)
    return {
        "median_ms": median * 1e3,
        "p90_ms": timing.p90(i) * 1e3,
        "samples_per_s": batch / median if median > 0 else math.inf,
        "runs": len(timing.seconds[i]),
    }


# -- the benchmark ----------------------------------------------------------------------------------


def benchmark(
    float_path,
    quant_path,
    feeds_or_data=None,
    *,
    batch: int | None = None,
    threads: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    runs: int = DEFAULT_RUNS,
    metric: str = "fidelity",
    seq_len: int = DEFAULT_SEQ_LEN,
    dims: Mapping[str, int] | None = None,
    seed: int = SYNTHETIC_SEED,
    synthetic_samples: int = SYNTHETIC_SAMPLES,
    min_block_s: float = MIN_BLOCK_S,
    settle_s: float = SETTLE_S,
    runtimes: tuple[str, ...] = ("onnxruntime",),
    signature: str | None = None,
) -> dict:
    """Compare a float model with its quantized counterpart: quality, throughput and size.

    Each model is an ONNX file (run in onnxruntime), a SavedModel folder (in TensorFlow, its
    ``signature``, default ``serving_default``) or a ``.tflite`` file (in LiteRT), in any combination;
    the quantized model's inputs and outputs are paired with the float model's by name, else in order
    (:func:`_pair_interfaces`). ``feeds_or_data`` is ``None`` (deterministic synthetic inputs), a dict of
    arrays keyed by input name (samples on axis 0), an iterable of such dicts, or a data spec (a ``.npz``
    path; folders and ``module.py:function`` when ``ncc.passes.quant.calib_data`` is installed), keyed by
    the float model's input names (or the quantized model's). ``batch`` defaults to
    the model's static batch dim, else 1; ``threads`` to ``os.cpu_count()``. ``metric`` is
    ``"fidelity"`` or ``"accuracy:LABELS.npy"``. ``min_block_s`` and ``settle_s`` size the timing
    blocks (:func:`ncc.tools.timing.time_blocks`; 0 and 0 time exactly ``runs`` runs with no settling).
    ``runtimes`` other than onnxruntime (:mod:`ncc.tools.runtimes`) add one row per runtime and ONNX model,
    timed in the same blocks and measured against the FP32 model's outputs (``result["runtimes"]``); a
    TensorFlow artefact always has its row there.
    Returns a JSON-ready dict (see :func:`format_table`).
    Anything a user can get wrong raises :class:`NccError`.
    """
    kind, labels_path = _parse_metric(metric)
    threads = threads if threads is not None else (os.cpu_count() or 1)
    for option, value, least in (
        ("threads", threads, 1),
        ("warmup", warmup, 0),
        ("runs", runs, 1),
        ("seq-len", seq_len, 1),
        ("batch", batch if batch is not None else 1, 1),
    ):
        if value < least:
            raise NccError(f"--{option} must be at least {least}, got {value}.")

    (fp_path, fp_fmt), (q_path, q_fmt) = (
        _artefact(Path(float_path), "float"),
        _artefact(Path(quant_path), "quantized"),
    )
    if signature is not None and "saved_model" not in (fp_fmt, q_fmt):
        raise NccError(f"--signature {signature} applies to a SavedModel folder; neither model is one.")
    if "onnx" not in (fp_fmt, q_fmt) and tuple(runtimes) != ("onnxruntime",):
        other = next(r for r in runtimes if r != "onnxruntime")
        raise NccError(f"--runtime {other} times ONNX artefacts; neither model is an ONNX file.")
    infos: list[_ModelInfo] = []
    try:
        for path, fmt, role in ((fp_path, fp_fmt, "float"), (q_path, q_fmt, "quantized")):
            infos.append(
                _ModelInfo(path, role) if fmt == "onnx" else _TfModelInfo(path, fmt, threads, signature)
            )
        return _benchmark(
            *infos,
            feeds_or_data,
            kind=kind,
            labels_path=labels_path,
            batch=batch,
            threads=threads,
            warmup=warmup,
            runs=runs,
            seq_len=seq_len,
            dims=dims,
            seed=seed,
            synthetic_samples=synthetic_samples,
            min_block_s=min_block_s,
            settle_s=settle_s,
            runtimes=runtimes,
        )
    finally:
        for info in infos:
            info.close()


def _benchmark(
    fp: _ModelInfo,
    q: _ModelInfo,
    feeds_or_data,
    *,
    kind: str,
    labels_path: Path | None,
    batch: int | None,
    threads: int,
    warmup: int,
    runs: int,
    seq_len: int,
    dims: Mapping[str, int] | None,
    seed: int,
    synthetic_samples: int,
    min_block_s: float,
    settle_s: float,
    runtimes: tuple[str, ...],
) -> dict:
    in_map, out_map = _pair_interfaces(fp, q)

    static_batches = {
        info.inputs[name][1][0]
        for info in (fp, q)
        for name in info.required_inputs
        if info.inputs[name][1] and isinstance(info.inputs[name][1][0], int)
    }
    if len(static_batches) > 1:
        raise NccError(f"the models' inputs have different fixed sizes on axis 0: {sorted(static_batches)}.")
    static_batch = static_batches.pop() if static_batches else None
    if batch is None:
        batch = static_batch or 1
    elif static_batch is not None and batch != static_batch:
        raise NccError(f"the models take a fixed batch of {static_batch}; --batch {batch} cannot run.")

    synthetic = feeds_or_data is None
    if synthetic:
        if kind == "accuracy":
            raise NccError("the accuracy metric needs --data with the inputs the labels belong to.")
        n = max(batch, synthetic_samples)
        n = -(-n // batch) * batch
        feeds = synthetic_inputs(fp, n, seq_len=seq_len, dims=dims, seed=seed)
        data_desc = f"synthetic (seed {seed})"
    else:
        if isinstance(feeds_or_data, (str, os.PathLike)):
            what = str(feeds_or_data)
            arrays = _load_data(feeds_or_data)
        else:
            what = "(given arrays)"
            arrays = _as_arrays(feeds_or_data, what)
        feeds, n = _check_data(_keyed_as_float(arrays, fp, q, in_map), fp, what)
        data_desc = what

    chunk, n_data = batch, n
    if static_batch is not None and n % static_batch:
        if n < static_batch:
            raise NccError(
                f"the models take a fixed batch of {static_batch} but the data has only {n} samples."
            )
        n -= n % static_batch  # a fixed-batch model cannot run the partial last batch
    labels = None
    if kind == "accuracy":
        labels = _load_labels(labels_path)
        if labels.shape[0] != n_data:
            raise NccError(
                f"labels {labels_path} hold {labels.shape[0]} labels but the data has {n_data} samples."
            )
        labels = labels[:n]

    q_feeds = _feed_for(feeds, q, in_map)
    sess_fp = _session(fp, threads) if fp.runner is None else None
    sess_q = _session(q, threads) if q.runner is None else None
    out_fp = _outputs_of(fp, sess_fp, feeds, n, chunk, synthetic)
    out_q = _as_float_outputs(_outputs_of(q, sess_q, q_feeds, n, chunk, synthetic), out_map)

    from ncc.metrics import MASK_INPUT

    mask = feeds.get(MASK_INPUT)
    mask = mask[:n] if mask is not None else None
    details = {name: output_metrics(out_fp[name], out_q[name], mask) for name in fp.outputs}
    first = fp.outputs[0]
    if kind == "fidelity":
        quality = {"name": "cosine", "output": first, "fp32": 1.0, "int8": details[first]["cosine"]}
    else:
        quality = {
            "name": "accuracy",
            "output": first,
            "labels": str(labels_path),
            "fp32": _accuracy(out_fp[first], labels, first),
            "int8": _accuracy(out_q[first], labels, first),
        }
    quality["ratio"] = quality["int8"] / quality["fp32"] if quality["fp32"] else None

    others = []  # (runtime, role, runner) beyond the models' own runtimes: ONNX files in OpenVINO
    rows = []
    try:
        if tuple(runtimes) != ("onnxruntime",):
            from ncc.tools.runtimes import open_runner

            for runtime in runtimes:
                for role, info in (("fp32", fp), ("int8", q)):
                    if runtime != "onnxruntime" and info.runner is None:
                        others.append((runtime, role, open_runner(runtime, info.path, threads)))
        feed = _tile_batch(feeds, n, batch)
        q_feed = _feed_for(feed, q, in_map)
        timed = [
            sess_fp.ort if sess_fp is not None else fp.runner,
            sess_q.ort if sess_q is not None else q.runner,
            *(runner for _, _, runner in others),
        ]
        try:
            timing = time_blocks(
                timed,
                [feed, q_feed, *(feed if role == "fp32" else q_feed for _, role, _ in others)],
                runs=runs,
                rounds=min(runs, TIMING_ROUNDS),
                warmup=warmup,
                min_block_s=min_block_s,
                settle_s=settle_s,
            )
        except NccError:
            raise
        except Exception as err:
            where = " or ".join(dict.fromkeys([fp.runtime, q.runtime, *(r for r, _, _ in others)]))
            raise NccError(f"{where} failed to run a batch of {batch}: {first_line(err)}") from None
        perf_fp, perf_q = _latency_stats(timing, 0, batch), _latency_stats(timing, 1, batch)
        perf_fp["runtime"], perf_q["runtime"] = fp.runtime, q.runtime
        speedup = timing.ratio(1, 0)
        if others or fp.runner is not None or q.runner is not None:
            from ncc.tools.runtimes import OrtRunner

            entries = []  # (runtime, role, precision, index in the timing, outputs)
            for index, (role, info, outs) in enumerate((("fp32", fp, out_fp), ("int8", q, out_q))):
                if info.runner is not None or "onnxruntime" in runtimes:
                    precision = (
                        OrtRunner.precision_of(info.path) if info.runner is None else info.runner.precision
                    )
                    entries.append((info.runtime, role, precision, index, outs))
            for index, (runtime, role, runner) in enumerate(others, start=2):
                got = _runner_outputs(runner, feeds if role == "fp32" else q_feeds, n, chunk, synthetic)
                entries.append(
                    (
                        runtime,
                        role,
                        runner.precision,
                        index,
                        got if role == "fp32" else _as_float_outputs(got, out_map),
                    )
                )
            for runtime, role, precision, index, got in entries:
                ratio = timing.ratio(index, 0)
                rows.append(
                    {
                        "runtime": runtime,
                        "model": str(fp.path if role == "fp32" else q.path),
                        "role": role,
                        "precision": precision,
                        "fidelity": output_metrics(out_fp[first], got[first], mask),
                        **_latency_stats(timing, index, batch),
                        "speedup": ratio["median"],
                        "speedup_q25": ratio["q25"],
                        "speedup_q75": ratio["q75"],
                    }
                )
    finally:
        for _, _, runner in others:
            runner.close()
        del others

    return {
        "model": fp.path.stem,
        "float_model": str(fp.path),
        "quant_model": str(q.path),
        "float_runtime": fp.runtime,
        "quant_runtime": q.runtime,
        "data": data_desc,
        "synthetic": synthetic,
        "samples": int(n),
        "metric": kind,
        "quality": quality,
        "fidelity": details,
        "throughput": {
            "fp32": perf_fp,
            "int8": perf_q,
            "speedup": speedup["median"],
            "speedup_q25": speedup["q25"],
            "speedup_q75": speedup["q75"],
            "rounds": speedup["rounds"],
        },
        "size": {
            "fp32_bytes": fp.size_bytes,
            "int8_bytes": q.size_bytes,
            "fp32_mb": fp.size_bytes / MB,
            "int8_mb": q.size_bytes / MB,
            "ratio": q.size_bytes / fp.size_bytes,
            "fp32_files": [str(f) for f in fp.files],
            "int8_files": [str(f) for f in q.files],
        },
        "threads": threads,
        "batch": batch,
        "warmup": warmup,
        "runs": runs,
        "seq_len": seq_len if synthetic else None,
        "runtimes": rows,
    }


def _keyed_as_float(arrays: dict, fp: _ModelInfo, q: _ModelInfo, inputs: Mapping[str, str]) -> dict:
    """Data keyed by the quantized model's input names (where they differ from the float model's) rekeyed as
    the float model's; anything else is left for :func:`_check_data` to judge."""
    if set(arrays) <= set(fp.inputs) or not set(arrays) <= set(q.inputs):
        return arrays
    back = {other: name for name, other in inputs.items()}
    return {back.get(k, k): v for k, v in arrays.items()}


def _outputs_of(info: _ModelInfo, session, feeds: dict, n: int, chunk: int, synthetic: bool) -> dict:
    if info.runner is None:
        return _run_all(session, feeds, n, chunk, synthetic)
    return _runner_outputs(info.runner, feeds, n, chunk, synthetic)


def _as_float_outputs(outputs: Mapping, pairs: Mapping[str, str]) -> dict:
    """The quantized model's outputs keyed by the float model's output names (``pairs``: float -> quantized)."""
    return {name: outputs[other] for name, other in pairs.items()}


# -- output -----------------------------------------------------------------------------------------


def _runner_outputs(runner, feeds: dict, n: int, chunk: int, synthetic: bool) -> dict:
    """A runner's outputs over the first ``n`` samples, ``chunk`` at a time (as :func:`_run_all`)."""
    import numpy as np
    from ncc.tools.runtimes import OrtRunner

    on = " (synthetic inputs; pass --data with real inputs)" if synthetic else ""
    parts: dict[str, list] = {}
    for start in range(0, n, chunk):
        try:
            got = runner.outputs(_take(feeds, start, min(start + chunk, n)))
        except Exception as err:  # noqa: BLE001 - the runtime's first line says what failed
            where = "onnxruntime" if isinstance(runner, OrtRunner) else runner.runtime
            raise NccError(
                f"{where} failed to run samples {start}-{min(start + chunk, n) - 1}{on}: {first_line(err)}"
            ) from None
        for name, array in got.items():
            parts.setdefault(name, []).append(np.asarray(array))
    return {
        name: (np.concatenate(chunks, axis=0) if chunks[0].ndim else np.stack(chunks))
        for name, chunks in parts.items()
    }


def _num(x, fmt: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, fmt)


def format_table(result: dict) -> str:
    """The markdown row of the published tables, then the fidelity details and latencies."""
    quality, perf, size = result["quality"], result["throughput"], result["size"]
    q_fmt = ".4f"
    row = (
        f"| {result['model']} | {_num(quality['fp32'], q_fmt)} | {_num(quality['int8'], q_fmt)} "
        f"| {_num(None if quality['ratio'] is None else 100 * quality['ratio'], '.2f')}% "
        f"| {_num(perf['fp32']['samples_per_s'], '.1f')} | {_num(perf['int8']['samples_per_s'], '.1f')} "
        f"| {_num(perf['speedup'], '.2f')}x | {_num(size['fp32_mb'], '.3f')} | {_num(size['int8_mb'], '.3f')} "
        f"| {result['threads']} | {result['batch']} |"
    )
    lines = []
    if result["synthetic"]:
        lines.append(
            f"note: fidelity measured on synthetic inputs (seeded, {result['samples']} samples); "
            "pass --data for real inputs."
        )
    lines += [TABLE_HEADER, "|" + "---|" * 11, row, ""]
    if quality["name"] == "cosine":
        lines.append(
            f"quality: mean cosine of output {quality['output']!r} with FP32 (FP32 is the reference), "
            f"{result['samples']} samples from {result['data']}"
        )
    else:
        lines.append(
            f"quality: top-1 accuracy of output {quality['output']!r} against {quality['labels']}, "
            f"{result['samples']} samples from {result['data']}"
        )
    lines += ["", "| output | cosine | top-1 agreement | SQNR dB |", "|---|---|---|---|"]
    for name, f in result["fidelity"].items():
        lines.append(
            f"| {name} | {_num(f['cosine'], '.6f')} | {_num(f['top1_agreement'], '.4f')} | {_num(f['sqnr_db'], '.2f')} |"
        )
    in_fp, in_q = "", ""
    reference = result.get("float_runtime", "onnxruntime")
    if (reference, result.get("quant_runtime", "onnxruntime")) != ("onnxruntime", "onnxruntime"):
        in_fp, in_q = f" ({reference})", f" ({result['quant_runtime']})"
    lines += [
        "",
        f"latency per batch of {result['batch']} (ms): FP32{in_fp} median {perf['fp32']['median_ms']:.3f} "
        f"p90 {perf['fp32']['p90_ms']:.3f}; INT8{in_q} median {perf['int8']['median_ms']:.3f} "
        f"p90 {perf['int8']['p90_ms']:.3f} ({result['warmup']} warm-up + {perf['fp32']['runs']} / "
        f"{perf['int8']['runs']} timed runs, in {perf['rounds']} rounds of one block each, {result['threads']} threads); "
        f"speed-up per round: quartiles {perf['speedup_q25']:.2f}-{perf['speedup_q75']:.2f}x",
    ]
    if result.get("runtimes"):
        lines += [
            "",
            f"| runtime | model | precision | cosine vs {reference} FP32 | top-1 agreement | samples/s "
            f"| speed-up vs {reference} FP32 (quartiles) |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in result["runtimes"]:
            f = row["fidelity"]
            lines.append(
                f"| {row['runtime']} | {Path(row['model']).name} | {row['precision']} | {_num(f['cosine'], '.6f')} "
                f"| {_num(f['top1_agreement'], '.4f')} | {_num(row['samples_per_s'], '.1f')} "
                f"| {_num(row['speedup'], '.2f')}x ({_num(row['speedup_q25'], '.2f')}-{_num(row['speedup_q75'], '.2f')}) |"
            )
    return "\n".join(lines)


def to_json(result: dict) -> str:
    """Strict JSON: infinities (a bit-exact SQNR) become null."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(result), indent=2, allow_nan=False)


def _parse_dims(values) -> dict[str, int]:
    dims = {}
    for text in values:
        match = re.fullmatch(r"\s*([^=\s]+)\s*=\s*(\d+)\s*", text)
        if not match or int(match.group(2)) < 1:
            raise NccError(
                f"--dim {text!r}: expected NAME=SIZE with a positive SIZE, e.g. --dim sequence=64."
            )
        dims[match.group(1)] = int(match.group(2))
    return dims


_PATH = click.Path(path_type=Path, dir_okay=True, exists=False)


@click.command()
@click.argument("float_model", metavar="FLOAT.onnx", type=_PATH)
@click.argument("quant_model", metavar="QUANT.onnx", type=_PATH)
@click.option(
    "--data",
    metavar="DATA",
    help="Inputs: a .npz keyed by input name (samples on axis 0), a folder of .npz, or module.py:function. Default: synthetic.",
)
@click.option(
    "--metric",
    default="fidelity",
    show_default=True,
    metavar="METRIC",
    help="'fidelity' (cosine, top-1 agreement, SQNR) or 'accuracy:LABELS.npy'.",
)
@click.option(
    "--batch",
    type=int,
    help="Batch size for timing and evaluation (default: the model's fixed batch, else 1).",
)
@click.option(
    "--seq-len",
    type=int,
    default=DEFAULT_SEQ_LEN,
    show_default=True,
    help="Dynamic second dim of integer inputs (synthetic data).",
)
@click.option(
    "--dim",
    "dims",
    multiple=True,
    metavar="NAME=SIZE",
    help="Size of a named dynamic dim (synthetic data); other dynamic dims are 1.",
)
@click.option("--threads", type=int, help="intra-op threads (default: all CPUs).")
@click.option(
    "--warmup", type=int, default=DEFAULT_WARMUP, show_default=True, help="Untimed runs per model first."
)
@click.option(
    "--runs",
    type=int,
    default=DEFAULT_RUNS,
    show_default=True,
    help="Timed runs per model, at least (a fast model gets more, so each of its 5 timing blocks "
    "lasts 0.25 s); median and p90 reported.",
)
@click.option(
    "--runtime",
    "runtime",
    default="onnxruntime",
    show_default=True,
    metavar="A,B",
    help="Runtimes to time the ONNX models in, side by side: onnxruntime, openvino (e.g. onnxruntime,openvino).",
)
@click.option(
    "--signature",
    metavar="NAME",
    help="The signature a SavedModel folder runs (default: serving_default).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of the table.")
def bench(
    float_model: Path,
    quant_model: Path,
    data: str | None,
    metric: str,
    batch: int | None,
    seq_len: int,
    dims: tuple[str, ...],
    threads: int | None,
    warmup: int,
    runs: int,
    runtime: str,
    signature: str | None,
    as_json: bool,
) -> None:
    """Compare FLOAT.onnx with QUANT.onnx: quality and its ratio, samples/s and speed-up, sizes.

    Either model can also be a TensorFlow SavedModel folder (run in TensorFlow) or a .tflite file (run in
    LiteRT; pip install -e ".[tensorflow]"); the quantized model's inputs and outputs are paired with the
    float model's by name, else in order; their shapes must agree.

    \b
    ncc bench model.onnx model.int8.onnx --data calib.npz
    ncc bench model_savedmodel/ model.int8.tflite --data digits.npz   # FP32 TF vs INT8 TFLite
    ncc bench model.onnx model.int8.onnx --data test.npz --metric accuracy:labels.npy --batch 8
    ncc bench model.onnx model.int8.onnx --runtime onnxruntime,openvino   # which runtime serves it fastest
    """
    from ncc.tools.runtimes import parse_runtimes

    runtimes = parse_runtimes(runtime)
    result = benchmark(
        float_model,
        quant_model,
        data,
        batch=batch,
        threads=threads,
        warmup=warmup,
        runs=runs,
        metric=metric,
        seq_len=seq_len,
        dims=_parse_dims(dims),
        runtimes=runtimes,
        signature=signature,
    )
    click.echo(to_json(result) if as_json else format_table(result))
