"""Collect activation statistics by running the float model in onnxruntime.

:func:`collect_statistics` is what the ``calibrate`` pass calls. It

1. checks the calibration data against the model's inputs (one clear error
   before anything runs);
2. looks in ``cache_dir`` for statistics stored under a key made of the model
   fingerprint (its serialized proto without weights, the in-memory weights'
   bytes, and each external data file's size and mtime), the data digest, the
   sorted value names, the per-channel axes, the histogram-less values and
   ``extra_key``;
3. otherwise clones the model (tensors are shared, not copied), makes every
   requested intermediate value a graph output (a value of unknown type is
   declared float), and opens one onnxruntime session on the CPU provider with
   its full graph optimizations: a graph output is never fused away, so every
   requested value survives, and a CNN runs in onnxruntime's blocked layout
   (EfficientNet-Lite0's 64 samples: 2.5 s against 4.3 s with optimizations off);
4. runs the data batch by batch and folds each requested output into its
   :class:`~ncc.passes.quant.observers.TensorStats` on a worker thread while
   onnxruntime runs the next batch: memory holds two batches' activations and
   the histograms, nothing more. A value that only rearranges another's (a
   Reshape or Transpose output) is not fetched: it gets its source's statistics.

The session gets the graph as a proto and the weights as arrays
(:func:`ncc.runtime.open_session`): nothing is written to disk. Protobuf appears only in
the serialized bytes handed to onnxruntime; no backend is imported.

Only float tensors are observed: a requested value that turns out not to be
float (by its IR type or the array onnxruntime returns) is left out of the
result. Graph inputs are observed from the feeds, constants once from their
tensor. The batch size follows the model when its inputs have a fixed batch
dimension.

The progress bar (rich, on stderr) shows only when ``progress`` is true and
stderr is a terminal, so tests and piped logs stay clean.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.ops import VALUE_MOVES
from ncc.passes.quant.calib_data import CalibrationData, validate
from ncc.passes.quant.observers import TensorStats
from ncc.runtime import detach_weights, open_session

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_CACHE_VERSION = "ncc-calib-v2"


def model_inputs(model: ir.Model) -> dict[str, tuple[np.dtype, list[int | None] | None]]:
    """``{name: (dtype, shape)}`` of the graph inputs that are fed (not initializers); dynamic dims are None."""
    out = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        if value.dtype is None:
            raise NccError(f"model input {value.name!r} has no element type; calibration cannot feed it.")
        shape = None if value.shape is None else [d if isinstance(d, int) else None for d in value.shape.dims]
        out[value.name] = (value.dtype.numpy(), shape)
    return out


def model_fingerprint(model: ir.Model) -> str:
    """sha256 of the serialized model without its in-memory weights, of those weights' bytes, and of each
    external file's size and mtime (external tensors are serialized by reference, never read)."""
    clone = model.clone()
    h = hashlib.sha256()
    for name, array in detach_weights(clone, memory_mapped=False):
        h.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        h.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    h.update(ir.serde.serialize_model(clone).SerializeToString(deterministic=True))
    for value in sorted(_initializers(model), key=lambda v: v.name or ""):
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            path = Path(tensor.base_dir) / tensor.location
            try:
                stat = path.stat()
                h.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            except OSError:
                h.update(f"{path}\0missing\0".encode())
    return h.hexdigest()


def cache_key(
    model: ir.Model,
    values: Iterable[str],
    data: CalibrationData,
    extra_key: str = "",
    axes: dict[str, int] | None = None,
    minmax_only: Iterable[str] = (),
) -> str:
    h = hashlib.sha256(_CACHE_VERSION.encode())
    parts = (
        model_fingerprint(model),
        data.digest(),
        json.dumps(sorted(set(values))),
        extra_key,
        json.dumps(sorted(axes.items())) if axes else "",
        json.dumps(sorted(set(minmax_only))),
    )
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def stats_cache_file(
    model: ir.Model,
    values: Iterable[str],
    data: CalibrationData,
    cache_dir: Path,
    extra_key: str = "",
    axes: dict[str, int] | None = None,
    minmax_only: Iterable[str] = (),
) -> Path:
    """Where :func:`collect_statistics` keeps these statistics under ``cache_dir``."""
    return Path(cache_dir) / f"{cache_key(model, values, data, extra_key, axes, minmax_only)}.npz"


def cache_file_for(cache_file: Path, histograms: bool) -> tuple[Path, bool]:
    """``(file, histograms)``: where statistics of ``cache_file``'s key are read or written.

    Statistics without histograms (``minmax`` only) are kept apart, in ``<key>.minmax.npz``; but a
    cached file with histograms serves them too, so it is chosen (with histograms) when it exists."""
    if histograms or cache_file.is_file():
        return cache_file, True
    return cache_file.with_name(cache_file.stem + ".minmax.npz"), False


def collect_statistics(
    model: ir.Model,
    values: list[str],
    data: CalibrationData,
    *,
    batch_size: int = 8,
    progress: bool = True,
    cache_dir: Path | None = None,
    extra_key: str = "",
    axes: dict[str, int] | None = None,
    cache_file: Path | None = None,
    reference: FloatReference | None = None,
    histograms: bool = True,
    minmax_only: frozenset[str] = frozenset(),
) -> dict[str, TensorStats]:
    """Run ``model`` on ``data`` and return streaming statistics for each float value named in ``values``
    (per-channel min/max too along ``axes[name]`` where given).

    ``histograms=False`` collects only what ``minmax`` needs (see :class:`TensorStats`), cached apart
    (:func:`cache_file_for`); ``minmax_only`` names the values that need no histogram either way
    (part of the cache key). When the model does run (statistics not cached) and ``reference`` is
    given, the run also fills it with the first ``reference.samples`` samples and the graph outputs
    on them.

    Cached under ``cache_dir`` by :func:`stats_cache_file`, or in ``cache_file`` when the caller has
    already derived it (the key fingerprints the whole model: worth computing once)."""
    requested = list(dict.fromkeys(values))
    by_name = _values_by_name(model)
    unknown = [n for n in requested if n not in by_name]
    if unknown:
        raise ValueError(f"values not in the model's main graph: {unknown}")
    inputs = model_inputs(model)
    validate(data, inputs)
    observed = [n for n in requested if by_name[n].dtype is None or by_name[n].dtype in _FLOAT_TYPES]

    if cache_file is None and cache_dir is not None:
        full = stats_cache_file(model, requested, data, cache_dir, extra_key, axes, minmax_only)
        cache_file, histograms = cache_file_for(full, histograms)
    if cache_file is not None:
        if cache_file.is_file():
            cached = load_stats(cache_file)
            if cached is not None:
                return cached

    stats = _run(
        model,
        observed,
        by_name,
        data,
        _batch_size(inputs, batch_size),
        progress,
        axes or {},
        reference,
        histograms,
        minmax_only,
    )
    if cache_file is not None:
        try:
            save_stats(cache_file, stats)
        except OSError as err:  # a read-only or full cache folder costs the cache, not the compile
            print(
                f"ncc: warning: cannot write the calibration cache in {cache_file.parent}: "
                f"{err.strerror or err}; continuing without it.",
                file=sys.stderr,
            )
    return stats


@dataclass
class FloatReference:
    """The float model's graph outputs on the first ``samples`` calibration samples, kept by the
    calibration run so that later passes (min-cosine) need not run the float model again."""

    samples: int
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    count: int = 0

    @property
    def complete(self) -> bool:
        return self.count == self.samples > 0

    def add(self, batch: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        take = min(next(iter(batch.values())).shape[0], self.samples - self.count)
        if take <= 0:
            return
        self.count += take
        self.feeds.append({k: v[:take] for k, v in batch.items()})
        for name, array in outputs.items():
            self.outputs.setdefault(name, []).append(array[:take])


def _batch_size(inputs: dict, default: int) -> int:
    fixed = {shape[0] for _, shape in inputs.values() if shape and isinstance(shape[0], int) and shape[0] > 0}
    if len(fixed) == 1:
        return fixed.pop()
    return default


def _initializers(model: ir.Model) -> list[ir.Value]:
    return [v for g in model.graphs() for v in g.initializers.values() if v.const_value is not None]


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    graph = model.graph
    out: dict[str, ir.Value] = {}
    for value in graph.inputs:
        out[value.name] = value
    for value in graph.initializers.values():
        out.setdefault(value.name, value)
    for node in graph:
        for value in node.outputs:
            if value.name:
                out[value.name] = value
    return out


def _run(
    model: ir.Model,
    names: list[str],
    by_name: dict[str, ir.Value],
    data: CalibrationData,
    batch_size: int,
    progress: bool,
    axes: dict[str, int],
    reference: FloatReference | None = None,
    histograms: bool = True,
    minmax_only: frozenset[str] = frozenset(),
) -> dict[str, TensorStats]:
    # a tensor that only rearranges another's values has that tensor's statistics: observe the source
    aliases = {n: root for n in names if n not in axes and (root := _moved_from(by_name[n])) is not None}
    binned = {n for n in names if n not in minmax_only}  # a root is binned when it or an alias of it is
    binned |= {root for alias, root in aliases.items() if alias in binned}
    names = list(dict.fromkeys([*(n for n in names if n not in aliases), *aliases.values()]))
    stats = {
        name: TensorStats(axis=axes.get(name), histogram=histograms and name in binned) for name in names
    }
    feed_names = {v.name for v in model.graph.inputs if not v.is_initializer()}
    constants = [n for n in names if n not in feed_names and by_name[n].producer() is None]
    for name in constants:
        stats[name].update(by_name[name].const_value.numpy())
    fetched = [n for n in names if n not in feed_names and n not in constants]
    from_feeds = [n for n in names if n in feed_names]
    graph_outputs = [v.name for v in model.graph.outputs]
    fetched += [n for n in graph_outputs if n not in fetched] if reference is not None else []
    done: set[str] = set()

    def fold(batch: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        for name in from_feeds:
            stats[name].update(batch[name])
        for name, array in outputs.items():
            if isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.floating):
                stats[name].update(array)
                done.add(name)

    # Batch i's statistics are folded on a worker thread while onnxruntime runs batch i + 1 (both
    # release the GIL): one batch in flight, folded in order, so the result does not depend on timing.
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = None
        for batch, outputs in iterate_outputs(model, fetched, data, batch_size=batch_size, progress=progress):
            if reference is not None:
                reference.add(batch, {n: outputs[n] for n in graph_outputs})
                outputs = {n: a for n, a in outputs.items() if n in stats}
            if pending is not None:
                pending.result()
            pending = worker.submit(fold, batch, outputs)
            del outputs
        if pending is not None:
            pending.result()
    skipped = set(fetched) - done
    for alias, root in aliases.items():
        if root in stats and root not in skipped:
            stats[alias] = stats[root].without_channels()
    return {name: s for name, s in stats.items() if name not in skipped}


def _moved_from(value: ir.Value) -> str | None:
    """The float tensor whose values ``value`` merely rearranges (through a chain of such ops), or None."""
    root = None
    node = value.producer()
    while (
        node is not None and node.domain == "" and node.op_type in VALUE_MOVES and node.inputs[0] is not None
    ):
        source = node.inputs[0]
        if (
            source.const_value is not None
            or not source.name
            or (source.dtype is not None and source.dtype not in _FLOAT_TYPES)
        ):
            break
        root = source.name
        node = source.producer()
    return root


def iterate_outputs(
    model: ir.Model,
    names: list[str],
    data: CalibrationData,
    *,
    batch_size: int = 8,
    progress: bool = True,
    prune: bool = False,
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Run ``model`` in onnxruntime on ``data``; yield ``(feeds, {name: array})`` per batch for the values ``names``.

    One session (CPU, full optimizations: requested values are graph outputs,
    which no fusion removes) for the whole run; an onnxruntime failure on a batch is a user error naming
    the batch. With no ``names`` the model is not run and the outputs are empty.
    ``prune`` runs only the nodes ``names`` depend on (onnxruntime itself runs
    every node whatever is fetched): the graph's own outputs are dropped.
    """
    session = open_session(model, outputs=names, prune=prune, what="the float model") if names else None
    with _progress_bar(progress, data.num_samples) as advance:
        for index, batch in enumerate(data.batches(batch_size)):
            outputs: dict[str, np.ndarray] = {}
            if session is not None:
                # the data passed validation (dynamic dims) but the graph may still fail on it
                outputs = session.run(batch, names, where=f"calibration batch {index} of {data.spec}")
            yield batch, outputs
            del outputs
            advance(next(iter(batch.values())).shape[0])


class _progress_bar:  # noqa: N801 - used as a context manager function
    """A rich progress bar on stderr when asked for and stderr is a terminal; otherwise a no-op."""

    def __init__(self, enabled: bool, total: int | None):
        self.enabled = enabled and sys.stderr.isatty()
        self.total = total
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("calibrating"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.start()
        task = self._progress.add_task("calibrating", total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False


# -- cache files ----------------------------------------------------------------------------------


def save_stats(path: Path, stats: dict[str, TensorStats]) -> None:
    """Write ``stats`` to ``path`` (an ``.npz``) atomically: each field of every tensor's statistics
    concatenated into one array with per-tensor lengths (a few archive members, not thousands)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    per_tensor = [s.to_arrays() for s in stats.values()]
    arrays: dict[str, np.ndarray] = {"__names__": np.asarray(json.dumps(list(stats)))}
    for key in sorted({k for fields in per_tensor for k in fields}):
        present = [np.asarray(fields[key]) for fields in per_tensor if key in fields]
        arrays[key] = np.concatenate([a.reshape(-1) for a in present])
        arrays[f"{key}.len"] = np.array(
            [np.asarray(f[key]).size if key in f else -1 for f in per_tensor], np.int64
        )
        arrays[f"{key}.ndim"] = np.array(present[0].ndim, np.int64)
    fd, temp = tempfile.mkstemp(prefix=".ncc-calib-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez(file, **arrays)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def load_stats(path: Path) -> dict[str, TensorStats] | None:
    """Read statistics written by :func:`save_stats`; ``None`` if the file is unreadable (then it is recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = json.loads(str(npz["__names__"]))
            fields = [{} for _ in names]
            for key in (k for k in npz.files if k != "__names__" and not k.endswith((".len", ".ndim"))):
                values, lengths, ndim = npz[key], npz[f"{key}.len"], int(npz[f"{key}.ndim"])
                offset = 0
                for i, length in enumerate(lengths):
                    if length >= 0:
                        part = values[offset : offset + length]
                        fields[i][key] = part.reshape(()) if ndim == 0 else part
                        offset += int(length)
            return {name: TensorStats.from_arrays(f) for name, f in zip(names, fields)}
    except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, not fatal
        return None
