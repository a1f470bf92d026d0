"""Tensor helpers for the text form: content hashes, streamed raw bytes, elided placeholders.

A tensor's identity in the text form is the sha256 of its raw little-endian
bytes (ONNX ``raw_data`` layout; 4- and 2-bit types packed). String tensors
hash as each element's length (8 bytes, little-endian) followed by its bytes.
Hashes are computed by streaming: a memory-mapped :class:`onnx_ir.ExternalTensor`
is read from its file 16 MB at a time, never materialized. The digest is
cached in ``tensor.meta`` so printing a model twice hashes each tensor once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from onnx_ir._core import TensorBase

CHUNK = 16 * 2**20
HASH_KEY = "ncc.sha256"


def from_array(array: np.ndarray, name: str | None = None) -> ir.TensorProtocol:
    """``ir.tensor(array, name=name)``, without its runtime Protocol checks when ``array`` is a numpy array:
    on Python 3.11 each ``isinstance`` against a ``runtime_checkable`` Protocol walks the Protocol's
    members (tens of microseconds), and passes create a tensor per scale, zero point and weight."""
    if type(array) is np.ndarray:
        return ir.Tensor(array, name=name)
    return ir.tensor(array, name=name)


def num_elements(tensor: ir.TensorProtocol) -> int:
    n = 1
    for d in tensor.shape:
        n *= int(d)
    return n


def raw_chunks(tensor: ir.TensorProtocol) -> Iterator[bytes | memoryview]:
    """The tensor's raw bytes in chunks of at most :data:`CHUNK` (not for string tensors)."""
    if isinstance(tensor, ir.ExternalTensor):
        offset = tensor.offset or 0
        length = tensor.length
        with open(tensor.path, "rb") as f:
            f.seek(offset)
            remaining = length if length is not None else -1
            while remaining != 0:
                size = CHUNK if remaining < 0 else min(CHUNK, remaining)
                block = f.read(size)
                if not block:
                    if remaining > 0:
                        raise NccError(
                            f"external data {tensor.path!r} of tensor {tensor.name!r} is truncated."
                        )
                    break
                yield block
                if remaining > 0:
                    remaining -= len(block)
        return
    data = tensor.tobytes()
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        yield view[start : start + CHUNK]
    if len(view) == 0:
        yield b""


def string_elements(tensor: ir.TensorProtocol) -> list[bytes]:
    arr = tensor.numpy().reshape(-1)
    return [x if isinstance(x, bytes) else str(x).encode("utf-8") for x in arr]


def sha256_hex(tensor: ir.TensorProtocol) -> str:
    """The full sha256 hex digest of the tensor's content (cached in ``tensor.meta``)."""
    meta = getattr(tensor, "meta", None)
    if meta is not None and HASH_KEY in meta:
        return meta[HASH_KEY]
    h = hashlib.sha256()
    if tensor.dtype == ir.DataType.STRING:
        for item in string_elements(tensor):
            h.update(len(item).to_bytes(8, "little"))
            h.update(item)
    else:
        for chunk in raw_chunks(tensor):
            h.update(chunk)
    digest = h.hexdigest()
    if meta is not None:
        meta[HASH_KEY] = digest
    return digest


class ElidedTensor(TensorBase):
    """A constant whose data was left out of a dump: it knows dtype, shape and hash, nothing more."""

    __slots__ = ("_dtype", "_shape", "digest")

    def __init__(self, dtype: ir.DataType, shape: ir.Shape, digest: str, *, name: str | None = None) -> None:
        super().__init__(name=name)
        self._dtype = dtype
        self._shape = shape
        self._shape.freeze()
        self.digest = digest

    @property
    def dtype(self) -> ir.DataType:
        return self._dtype

    @property
    def shape(self) -> ir.Shape:
        return self._shape

    @property
    def raw(self) -> None:
        """No backing data: the dump left it out (``numpy()`` and ``tobytes()`` explain)."""
        return None

    def _missing(self):
        raise NccError(
            f"constant @{self.name} was elided from the dump; re-dump with --full to rebuild the model."
        )

    def numpy(self) -> np.ndarray:
        self._missing()

    def __array__(self, dtype=None, copy=None):
        self._missing()

    def tobytes(self) -> bytes:
        self._missing()

    def __repr__(self) -> str:
        return f"ElidedTensor<{self._dtype},{self._shape}, sha256:{self.digest}>"
