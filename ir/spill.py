"""Spill files: tensors a pass produces, written to disk as they are made.

A pass that rewrites weights of a model too large for memory (weight-only
quantization of an LLM) appends each result to a spill file and puts an
``ir.ExternalTensor`` pointing at it into the IR; nothing it produced stays
resident. Saving the model copies those bytes into the output's data file
like any other external tensor.

Spill files live in one folder per process (``NCC_SPILL_DIR`` or the system
temporary folder) that is removed when the process exits. Sub-byte tensors
(int4/uint4) are stored packed two to a byte, low nibble first, as ONNX
stores them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading

import numpy as np
import onnx_ir as ir

_lock = threading.Lock()
_folder: str | None = None


def _spill_folder() -> str:
    global _folder
    with _lock:
        if _folder is None:
            _folder = tempfile.mkdtemp(prefix="ncc-spill-", dir=os.environ.get("NCC_SPILL_DIR") or None)
            atexit.register(shutil.rmtree, _folder, True)
        return _folder


class SpillFile:
    """An append-only file of tensors; :meth:`put` returns an external tensor reading them back."""

    def __init__(self, stem: str = "tensors") -> None:
        folder = _spill_folder()
        fd, path = tempfile.mkstemp(prefix=f"{stem}-", suffix=".bin", dir=folder)
        self._file = os.fdopen(fd, "wb")
        self._base = folder
        self._name = os.path.basename(path)

    def put(self, array: np.ndarray, dtype: ir.DataType, name: str) -> ir.ExternalTensor:
        """Write ``array`` (of ``dtype``; a 4-bit dtype may come as any integer array of codes) and return its tensor."""
        shape = tuple(int(d) for d in array.shape)
        data = pack_4bit(array) if dtype.bitwidth == 4 else np.ascontiguousarray(array, dtype.numpy())
        offset = self._file.tell()
        align = -offset % 64  # keep every tensor 64-byte aligned, as onnx-ir's writer does
        if align:
            self._file.write(b"\0" * align)
            offset += align
        data.tofile(self._file)
        self._file.flush()
        return ir.ExternalTensor(
            self._name, offset, data.nbytes, dtype, shape=ir.Shape(shape), name=name, base_dir=self._base
        )


def pack_4bit(codes: np.ndarray) -> np.ndarray:
    """Codes (any integer dtype, values in int4 or uint4 range) packed two per byte in row-major order."""
    flat = np.asarray(codes).reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def packed_tensor(codes: np.ndarray, dtype: ir.DataType, name: str) -> ir.TensorProtocol:
    """An in-memory tensor of ``codes``: packed for 4-bit dtypes, plain otherwise."""
    if dtype.bitwidth == 4:
        return ir.PackedTensor(pack_4bit(codes), dtype, shape=ir.Shape(codes.shape), name=name)
    return ir.Tensor(np.ascontiguousarray(codes, dtype.numpy()), name=name)
