"""Calibration data from ``--calib``: load lazily, validate against the model, hash.

Three sources, each a stream of *pieces* (dicts input name -> array, samples
stacked on axis 0):

- ``data.npz`` — arrays keyed by input name, samples on axis 0. Each array is
  read row-chunk by row-chunk straight from the zip member (no whole-array
  load), so a large file streams in bounded memory.
- a folder — every ``*.npz`` in it, sorted by name, each laid out like the
  single file (one or more samples); files are opened one at a time.
- ``module.py:function`` or ``package.module:function`` — a function taking
  no arguments that returns an iterable of input dicts (like onnxruntime's
  ``CalibrationDataReader``); each dict is one piece. The function is called
  again for every pass over the data (``digest()`` and the calibration run),
  so it must be deterministic.

:meth:`CalibrationData.batches` re-chunks pieces into batches of a given size
along axis 0 (pieces whose per-sample shapes differ are never concatenated).
:meth:`CalibrationData.digest` hashes names, dtypes, shapes and bytes of the
pieces, streamed. :func:`validate` checks the first piece against the model's
inputs up front and arms the object so every later piece is checked as it
streams. Every problem a user can cause is an :class:`~ncc.errors.NccError`
with one sentence.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ncc.errors import NccError

_CHUNK_BYTES = 16 << 20  # rows read per step from an .npz member: about this many bytes

Dim = int | str | None
InputSpec = Mapping[str, tuple[np.dtype, Sequence[Dim] | None]]


class CalibrationData:
    """A lazily read calibration set; iterate with :meth:`batches`."""

    def __init__(
        self,
        spec: str,
        pieces: Callable[[], Iterator[dict[str, np.ndarray]]],
        *,
        num_samples: int | None,
        max_samples: int | None = None,
    ):
        self.spec = spec
        self._pieces = pieces
        self._num_samples = num_samples
        self.max_samples = max_samples
        self._digest: str | None = None
        self._expected: dict[str, tuple[np.dtype, Sequence[Dim] | None]] | None = None

    @property
    def num_samples(self) -> int | None:
        """Number of samples, when known without reading the data (``None`` for a function)."""
        if self._num_samples is None:
            return None
        return self._num_samples if self.max_samples is None else min(self._num_samples, self.max_samples)

    def pieces(self) -> Iterator[dict[str, np.ndarray]]:
        """The source's pieces, truncated to ``max_samples``, checked (if :func:`validate` ran)."""
        remaining = self.max_samples
        seen = 0
        for index, piece in enumerate(self._pieces()):
            piece = _as_piece(piece, self.spec, index)
            n = _piece_samples(piece, self.spec)
            if n == 0:
                continue
            if remaining is not None:
                if remaining <= 0:
                    break
                if n > remaining:
                    piece = {k: v[:remaining] for k, v in piece.items()}
                    n = remaining
                remaining -= n
            if self._expected is not None:
                _check_piece(piece, self._expected, self.spec, first=seen)
            seen += n
            yield piece
        if seen == 0:
            raise NccError(f"calibration data {self.spec} is empty: it holds no samples.")

    def batches(self, batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches of ``batch_size`` samples (the last may be smaller); ``None`` keeps the pieces as they are."""
        if batch_size is None:
            yield from self.pieces()
            return
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pending: list[dict[str, np.ndarray]] = []
        pending_n = 0

        def flush() -> dict[str, np.ndarray]:
            if len(pending) == 1:
                out = pending[0]
            else:
                out = {k: np.concatenate([p[k] for p in pending], axis=0) for k in pending[0]}
            pending.clear()
            return out

        for piece in self.pieces():
            if pending and _sample_signature(piece) != _sample_signature(pending[0]):
                yield flush()
                pending_n = 0
            start = 0
            n = _piece_samples(piece, self.spec)
            while start < n:
                take = min(batch_size - pending_n, n - start)
                pending.append({k: v[start : start + take] for k, v in piece.items()})
                pending_n += take
                start += take
                if pending_n == batch_size:
                    yield flush()
                    pending_n = 0
        if pending:
            yield flush()

    def digest(self) -> str:
        """sha256 over the names, dtypes, shapes and bytes of every piece (streamed, computed once)."""
        if self._digest is None:
            h = hashlib.sha256()
            for piece in self.pieces():
                for name in sorted(piece):
                    array = np.ascontiguousarray(piece[name])
                    h.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
                    h.update(array.tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def __repr__(self) -> str:
        return f"CalibrationData({self.spec!r}, num_samples={self.num_samples})"


# -- loading ------------------------------------------------------------------------------------


def load_calibration_data(spec: str, *, max_samples: int | None = None) -> CalibrationData:
    """Open ``spec`` (``.npz`` file, folder of ``.npz``, or ``module:function``) without reading its arrays."""
    if max_samples is not None and max_samples < 1:
        raise NccError(f"--calib-samples must be at least 1, got {max_samples}.")
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        if not files:
            raise NccError(f"calibration folder {spec} contains no .npz files.")
        counts = [_npz_samples(f) for f in files]
        return CalibrationData(
            spec, lambda: _folder_pieces(files), num_samples=sum(counts), max_samples=max_samples
        )
    if path.suffix == ".npz" or path.is_file():
        if not path.exists():
            raise NccError(f"calibration data {spec} does not exist.")
        if path.suffix != ".npz":
            raise NccError(
                f"calibration data {spec} is not a .npz file, a folder of .npz files or module:function."
            )
        n = _npz_samples(path)
        return CalibrationData(spec, lambda: _npz_pieces(path), num_samples=n, max_samples=max_samples)
    if ":" in spec:
        function = _resolve_function(spec)
        return CalibrationData(
            spec, lambda: _function_pieces(function, spec), num_samples=None, max_samples=max_samples
        )
    raise NccError(
        f"calibration data {spec} does not exist (expected a .npz file, a folder or module:function)."
    )


def _npz_members(path: Path) -> tuple[zipfile.ZipFile, dict[str, str]]:
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise NccError(f"cannot read calibration data {path}: {_reason(err)}.") from None
    members = {n[: -len(".npy")]: n for n in archive.namelist() if n.endswith(".npy")}
    if not members:
        archive.close()
        raise NccError(f"calibration data {path} contains no arrays.")
    return archive, members


def _read_header(stream, path: Path, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(stream)  # (shape, fortran_order, dtype)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(stream)
        return np.lib.format._read_array_header(stream, version)
    except Exception as err:  # noqa: BLE001 - any corruption is the user's file
        raise NccError(f"cannot read array {name!r} in calibration data {path}: {_reason(err)}.") from None


def _npz_samples(path: Path) -> int:
    archive, members = _npz_members(path)
    with archive:
        counts = {}
        for name, member in members.items():
            with archive.open(member) as stream:
                shape, _, _ = _read_header(stream, path, name)
            counts[name] = shape[0] if shape else 1
    if len(set(counts.values())) > 1:
        found = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        raise NccError(f"calibration data {path} has a different number of samples per input ({found}).")
    return next(iter(counts.values()))


def _npz_pieces(path: Path) -> Iterator[dict[str, np.ndarray]]:
    """Stream ``path`` in row chunks: every member is read in step, a few MB at a time."""
    archive, members = _npz_members(path)
    with archive:
        streams, headers = {}, {}
        try:
            for name, member in sorted(members.items()):
                stream = archive.open(member)
                streams[name] = stream
                headers[name] = _read_header(stream, path, name)
            if any(fortran or dtype.hasobject or not shape for shape, fortran, dtype in headers.values()):
                # rare layouts: load whole arrays through numpy
                with np.load(path, allow_pickle=False) as npz:
                    yield {name: np.asarray(npz[name]) for name in sorted(members)}
                return
            n = headers[next(iter(headers))][0][0]
            row_bytes = sum(
                dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
                for shape, _, dtype in headers.values()
            )
            step = max(1, _CHUNK_BYTES // max(row_bytes, 1))
            for start in range(0, n, step):
                rows = min(step, n - start)
                piece = {}
                for name, (shape, _, dtype) in headers.items():
                    count = rows * int(np.prod(shape[1:], dtype=np.int64))
                    want = count * dtype.itemsize
                    buffer = streams[name].read(want)
                    if len(buffer) != want:
                        raise NccError(f"cannot read calibration data {path}: array {name!r} is truncated.")
                    piece[name] = np.frombuffer(buffer, dtype=dtype, count=count).reshape((rows, *shape[1:]))
                yield piece
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
            raise NccError(f"cannot read calibration data {path}: {_reason(err)}.") from None
        finally:
            for stream in streams.values():
                stream.close()


def _folder_pieces(files: list[Path]) -> Iterator[dict[str, np.ndarray]]:
    for file in files:
        yield from _npz_pieces(file)


def _resolve_function(spec: str) -> Callable[[], Any]:
    from ncc.userfn import resolve_function

    if not spec.rpartition(":")[0] or not spec.rpartition(":")[2]:
        raise NccError(
            f"calibration data {spec} is not a .npz file, a folder of .npz files or module:function."
        )
    return resolve_function(spec, "calibration", "--calib")


def _function_pieces(function: Callable[[], Any], spec: str) -> Iterator[Any]:
    try:
        result = function()
    except Exception as err:  # noqa: BLE001 - the user's function failed
        raise NccError(f"calibration function {spec} raised {type(err).__name__}: {err}.") from None
    if isinstance(result, (dict, str, bytes, np.ndarray)) or not isinstance(result, Iterable):
        raise NccError(
            f"calibration function {spec} returned {type(result).__name__}, not an iterable of input dicts."
        )
    iterator = iter(result)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001
            raise NccError(f"calibration function {spec} raised {type(err).__name__}: {err}.") from None
        yield item


def _as_piece(item: Any, spec: str, index: int) -> dict[str, np.ndarray]:
    if not isinstance(item, Mapping):
        raise NccError(
            f"calibration data {spec} gave {type(item).__name__} as item {index}, "
            "expected a dict of input name to array."
        )
    piece = {}
    for name, value in item.items():
        try:
            piece[str(name)] = np.asarray(value)
        except Exception as err:  # noqa: BLE001
            raise NccError(f"calibration input {name!r} in {spec} is not an array: {_reason(err)}.") from None
        if piece[str(name)].dtype.hasobject:
            raise NccError(f"calibration input {name!r} in {spec} is not a numeric array (dtype object).")
    if not piece:
        raise NccError(f"calibration data {spec} gave an empty dict as item {index}.")
    return piece


def _piece_samples(piece: Mapping[str, np.ndarray], spec: str) -> int:
    counts = {name: (a.shape[0] if a.ndim else 1) for name, a in piece.items()}
    if len(set(counts.values())) > 1:
        found = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        raise NccError(f"calibration data {spec} has a different number of samples per input ({found}).")
    return next(iter(counts.values()))


def _sample_signature(piece: Mapping[str, np.ndarray]) -> tuple:
    return tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(piece.items()))


def _reason(err: BaseException) -> str:
    text = str(err).strip().rstrip(".")
    return text or type(err).__name__


# -- validation ---------------------------------------------------------------------------------


def validate(data: CalibrationData, model_inputs: InputSpec) -> CalibrationData:
    """Check ``data`` against the model's inputs: ``{name: (dtype, shape)}``, ``None``/str for dynamic dims.

    The first piece is checked now (per-sample dims; axis 0 is the sample axis and
    batches are cut to the model's batch size by the caller); ``data`` is armed so every later piece is
    checked as it streams. Returns ``data``.
    """
    expected = {name: (np.dtype(dtype), shape) for name, (dtype, shape) in model_inputs.items()}
    data._expected = expected
    data._digest = None
    stream = data.pieces()  # checks each piece, raises on empty data
    try:
        next(stream)
    except StopIteration:
        raise NccError(f"calibration data {data.spec} is empty: it holds no samples.") from None
    finally:
        stream.close()
    return data


def _format_shape(shape: Sequence[Dim] | None) -> str:
    if shape is None:
        return "any shape"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _check_piece(
    piece: Mapping[str, np.ndarray], expected: Mapping[str, tuple[np.dtype, Any]], spec: str, first: int = 0
) -> None:
    """Check one piece (samples ``first`` onwards) against the model's inputs."""
    names, want = sorted(piece), sorted(expected)
    if names != want:
        missing = [n for n in want if n not in piece]
        extra = [n for n in names if n not in expected]
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(map(repr, missing))}" if missing else "",
                f"unexpected {', '.join(map(repr, extra))}" if extra else "",
            )
            if part
        )
        raise NccError(f"calibration data {spec} has inputs {names} but the model expects {want} ({detail}).")
    for name in want:
        array = piece[name]
        dtype, shape = expected[name]
        if array.dtype != dtype:
            raise NccError(
                f"calibration input {name!r} in {spec} is {array.dtype} but the model expects {dtype}; "
                f"cast it with .astype(np.{dtype.name})."
            )
        if array.size and np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).any():
            last = first + (array.shape[0] if array.ndim else 1) - 1
            raise NccError(
                f"calibration input {name!r} in {spec} is all NaN or infinite (samples {first} to {last}): "
                "there is nothing to calibrate on."
            )
        if shape is None:
            continue
        if array.ndim != len(shape):
            raise NccError(
                f"calibration input {name!r} in {spec} has shape {list(array.shape)} ({array.ndim} dimensions) "
                f"but the model expects {_format_shape(shape)} ({len(shape)} dimensions)."
            )
        for axis, (got, dim) in enumerate(zip(array.shape, shape)):
            if axis == 0:
                continue  # the sample axis: batches are cut to the model's batch size later
            if isinstance(dim, int) and dim >= 0 and got != dim:
                raise NccError(
                    f"calibration input {name!r} in {spec} has shape {list(array.shape)} but the model expects "
                    f"{_format_shape(shape)}: dimension {axis} is {got}, expected {dim}."
                )
