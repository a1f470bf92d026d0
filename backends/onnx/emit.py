"""Write an IR model as ``.onnx`` (optionally with external data), all or nothing.

External data is written when asked for, or automatically when the weights
exceed protobuf's 2 GB limit. Saving streams and keeps nothing:

- tensors go to the data file one at a time, in model order, packed densely
  (initializers over :data:`EXTERNAL_THRESHOLD` bytes, and tensor attributes
  that were external already);
- a tensor that lives in a file (memory-mapped from the input's external data,
  or a pass's spill file) is copied file to file — ``copy_file_range``, else
  16 MB reads — never mapped or read whole, so it adds nothing to RSS;
- a tensor held in memory is written from its own buffer;
- the model is left holding exactly the tensors it held before.

Without external data the ``.onnx`` file is streamed the same way: the model
is serialized with a short placeholder in place of each large tensor's
``raw_data``, and the file is written from that skeleton with the tensors'
bytes copied in where the placeholders were (lengths of the enclosing messages
recomputed). The bytes are exactly those protobuf would have written.
:func:`to_proto`, which must return a whole proto, reads each external tensor
only while its bytes are copied into it.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnx_ir as ir
from ncc.errors import NccError
from ncc.files import atomic_outputs
from onnx_ir._core import TensorBase

PROTOBUF_LIMIT = 2**31 - 1
#: Tensors at most this many bytes stay inside the proto when writing external data.
EXTERNAL_THRESHOLD = 1024
#: Buffer of the userspace copy (when the kernel cannot copy file to file).
COPY_CHUNK = 16 * 2**20


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize to a ModelProto with every weight inline (small models only); ``model`` is not changed."""
    _require_weights(model)
    inline = [
        (slot, _read_back(slot.tensor))
        for slot in _slots(model)
        if isinstance(slot.tensor, ir.ExternalTensor)
    ]
    with _replaced(inline):
        return _serialize(model)


def weight_bytes(model: ir.Model) -> int:
    return sum(_tensor_nbytes(slot.tensor) for slot in _slots(model))


def save_onnx(
    model: ir.Model, path: str | os.PathLike, *, external_data: str | None = None, value_info: bool = True
) -> Path | None:
    """Save ``model`` to ``path``; returns the external data file when one was written.

    ``external_data`` names the data file (relative to ``path``'s folder); when
    None it is ``<path name>.data`` and is used only for models over 2 GB.
    ``value_info=False`` leaves out the types and shapes of the main graph's
    intermediate values (graph inputs and outputs keep theirs).
    """
    path = Path(path)
    _require_weights(model)
    if external_data is None and weight_bytes(model) > PROTOBUF_LIMIT - 64 * 2**20:
        external_data = path.name + ".data"
    if external_data is None:
        with atomic_outputs(path) as (tmp_model,):
            _write_inline(model, tmp_model, path, value_info)
        return None
    if os.path.isabs(external_data) or os.sep in external_data or external_data in {"", ".", ".."}:
        raise NccError(f"external data name {external_data!r} must be a plain file name beside {path.name}.")
    if external_data == path.name:
        raise NccError(f"external data name {external_data!r} is the model file's own name; choose another.")
    data_path = path.parent / external_data
    _refuse_overwriting_inputs(model, data_path)
    with atomic_outputs(path, data_path) as (tmp_model, tmp_data):
        replacements = _write_external_data(model, tmp_data, external_data, data_path)
        with _replaced(replacements):
            proto = _serialize(model, value_info)
        _save_proto(proto, tmp_model, path)
    return data_path


# -- tensors of a model, and putting other tensors in their place ---------------------------------


@dataclass
class _Slot:
    """Where a tensor sits in the model: an initializer's value or (an element of) a node attribute."""

    tensor: ir.TensorProtocol
    initializer: bool
    value: ir.Value | None = None
    node: ir.Node | None = None
    attr: str | None = None
    index: int | None = None  # position in a TENSORS attribute


def _slots(model: ir.Model) -> list[_Slot]:
    """Every tensor of ``model`` in a fixed order: initializers (main graph, then subgraphs), then tensor
    attributes of nodes (graph, subgraphs, then functions)."""
    slots = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                slots.append(_Slot(value.const_value, True, value=value))
    nodes = [ir.traversal.RecursiveGraphIterator(model.graph)]
    nodes += [ir.traversal.RecursiveGraphIterator(f) for f in model.functions.values()]
    for node in (n for it in nodes for n in it):
        for name, attr in node.attributes.items():
            if attr.is_ref() or attr.value is None:
                continue
            if attr.type == ir.AttributeType.TENSOR:
                slots.append(_Slot(attr.value, False, node=node, attr=name))
            elif attr.type == ir.AttributeType.TENSORS:
                slots.extend(_Slot(t, False, node=node, attr=name, index=i) for i, t in enumerate(attr.value))
    return slots


@contextlib.contextmanager
def _replaced(replacements: list[tuple[_Slot, ir.TensorProtocol]]) -> Iterator[None]:
    """Put each replacement tensor in its slot for the duration of the block, then restore the model."""
    undo: list[Callable[[], None]] = []
    try:
        for slot, tensor in replacements:
            if slot.value is not None:
                value, old = slot.value, slot.value.const_value
                value.const_value = tensor
                undo.append(lambda value=value, old=old: setattr(value, "const_value", old))
                continue
            node, name = slot.node, slot.attr
            old_attr = node.attributes[name]
            if slot.index is None:
                new_value = tensor
            else:
                new_value = list(old_attr.value)
                new_value[slot.index] = tensor
            node.attributes[name] = ir.Attr(name, old_attr.type, new_value, doc_string=old_attr.doc_string)
            undo.append(
                lambda node=node, name=name, old_attr=old_attr: node.attributes.__setitem__(name, old_attr)
            )
        yield
    finally:
        for step in reversed(undo):
            step()


# -- writing ------------------------------------------------------------------------------------


def _write_external_data(
    model: ir.Model, data_file: Path, location: str, final: Path
) -> list[tuple[_Slot, ir.TensorProtocol]]:
    """Write the tensors that go to external data into ``data_file``, one at a time; return what replaces
    each tensor while the proto is serialized (an external reference, or bytes read back inline)."""
    replacements: list[tuple[_Slot, ir.TensorProtocol]] = []
    try:
        with open(data_file, "wb") as out:
            for slot in _slots(model):
                tensor = slot.tensor
                is_file = isinstance(tensor, ir.ExternalTensor)
                if tensor.dtype == ir.DataType.STRING or not (slot.initializer or is_file):
                    continue  # strings and in-memory attribute tensors stay in the proto, as ONNX keeps them
                if _tensor_nbytes(tensor) <= EXTERNAL_THRESHOLD:
                    if is_file:
                        replacements.append((slot, _read_back(tensor)))
                    continue
                offset = out.tell()
                _write_tensor(tensor, out)
                replacements.append(
                    (
                        slot,
                        ir.ExternalTensor(
                            location,
                            offset,
                            tensor.nbytes,
                            tensor.dtype,
                            shape=tensor.shape,
                            name=tensor.name,
                            doc_string=tensor.doc_string,
                            metadata_props=dict(tensor.metadata_props) or None,
                            base_dir=str(data_file.parent),
                        ),
                    )
                )
    except OSError as err:
        raise NccError(f"cannot write {final}: {err.strerror or err}.") from None
    return replacements


def _write_tensor(tensor: ir.TensorProtocol, out: BinaryIO) -> None:
    """Append ``tensor``'s raw bytes to ``out`` (exactly ``tensor.nbytes`` of them)."""
    start = out.tell()
    if isinstance(tensor, ir.ExternalTensor):
        _copy_external(tensor, out)
    elif hasattr(tensor, "tofile"):
        tensor.tofile(out)  # in-memory tensors write from their own buffer; lazy ones are evaluated here
    else:
        out.write(tensor.tobytes())
    if out.tell() - start != tensor.nbytes:
        raise NccError(
            f"tensor {tensor.name!r} wrote {out.tell() - start} bytes of data, but its type and shape "
            f"({tensor.dtype}, {tensor.shape}) need {tensor.nbytes}."
        )


def _copy_external(tensor: ir.ExternalTensor, out: BinaryIO) -> None:
    """Append ``tensor``'s bytes from its file to ``out`` without mapping or holding them."""
    out.flush()
    with _open_source(tensor) as src:
        position, remaining, dest = tensor.offset or 0, tensor.nbytes, out.tell()
        copy_range = getattr(os, "copy_file_range", None)
        while remaining and copy_range is not None:
            try:
                copied = copy_range(src.fileno(), out.fileno(), min(remaining, 2**30), position, dest)
            except OSError as err:
                if err.errno not in {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM}:
                    raise
                break  # not between these files: copy through a buffer
            if copied == 0:
                break  # end of file (the buffered copy below says so) or a file system that copies nothing
            position, remaining, dest = position + copied, remaining - copied, dest + copied
        out.seek(dest)
        if remaining:
            src.seek(position)
            buffer = memoryview(bytearray(min(COPY_CHUNK, remaining)))
            while remaining:
                got = src.readinto(buffer[: min(len(buffer), remaining)])
                if not got:
                    _truncated(tensor)
                out.write(buffer[:got])
                remaining -= got


def _read_external(tensor: ir.ExternalTensor) -> bytes:
    """``tensor``'s bytes, read (not mapped) from its file."""
    with _open_source(tensor) as src:
        src.seek(tensor.offset or 0)
        data = src.read(tensor.nbytes)
    if len(data) != tensor.nbytes:
        _truncated(tensor)
    return data


@contextlib.contextmanager
def _open_source(tensor: ir.ExternalTensor) -> Iterator[BinaryIO]:
    if not tensor.valid():
        raise NccError(f"tensor {tensor.name!r}: its external data was overwritten or deleted.")
    try:
        src = open(tensor.path, "rb")
    except OSError as err:
        raise NccError(
            f"cannot read external data of tensor {tensor.name!r} from {tensor.path}: {err.strerror or err}."
        ) from None
    with src:
        yield src


def _truncated(tensor: ir.ExternalTensor) -> None:
    raise NccError(
        f"external data file {tensor.path} of tensor {tensor.name!r} is shorter than its "
        f"offset {tensor.offset or 0} plus {tensor.nbytes} bytes (truncated?)."
    )


class _StandIn(TensorBase):
    """Takes a tensor's place while the model is serialized: same name, type and shape, and ``tobytes``
    (the proto's raw_data) from ``data`` — an external tensor's bytes read from its file when asked for,
    or a placeholder. Maps nothing and caches nothing."""

    __slots__ = ("_data", "_source")

    def __init__(self, source: ir.TensorProtocol, data: Callable[[], bytes]) -> None:
        super().__init__(
            name=source.name, doc_string=source.doc_string, metadata_props=dict(source.metadata_props) or None
        )
        self._source = source
        self._data = data

    @property
    def dtype(self) -> ir.DataType:
        return self._source.dtype

    @property
    def shape(self) -> ir.Shape:
        return self._source.shape

    @property
    def raw(self) -> ir.TensorProtocol:
        return self._source

    def numpy(self) -> np.ndarray:
        return self._source.numpy()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self._source.__array__(dtype)

    def tobytes(self) -> bytes:
        return self._data()


def _read_back(tensor: ir.ExternalTensor) -> _StandIn:
    return _StandIn(tensor, lambda: _read_external(tensor))


# -- streaming a whole .onnx file -----------------------------------------------------------------

_HOLE = b"\xffncc-hole\x00"


def _write_inline(model: ir.Model, tmp: Path, final: Path, value_info: bool = True) -> None:
    """Write ``model`` as one self-contained ``.onnx`` file, each large tensor streamed into its place."""
    nonce = os.urandom(16)  # placeholders cannot collide with anything else in the skeleton
    holes: dict[bytes, ir.TensorProtocol] = {}
    replacements = []
    for slot in _slots(model):
        tensor = slot.tensor
        if isinstance(tensor, ir.ExternalTensor) and _tensor_nbytes(tensor) <= EXTERNAL_THRESHOLD:
            replacements.append((slot, _read_back(tensor)))
        elif _streamable(tensor):
            token = _HOLE + nonce + len(holes).to_bytes(8, "little")
            holes[token] = tensor
            replacements.append((slot, _StandIn(tensor, lambda token=token: token)))
    with _replaced(replacements):
        skeleton = _serialize(model, value_info).SerializeToString()
    pieces = _split(skeleton, holes, _HOLE + nonce)
    if _length(pieces) > PROTOBUF_LIMIT:
        raise NccError(
            f"cannot write {final}: the model is over protobuf's 2 GB limit; write the weights as "
            "external data (--external-data)."
        )
    try:
        with open(tmp, "wb") as out:
            _emit(pieces, out)
    except OSError as err:
        raise NccError(f"cannot write {final}: {err.strerror or err}.") from None


def _streamable(tensor: ir.TensorProtocol) -> bool:
    """Large tensors whose serialized form is exactly ``raw_data = tobytes()``."""
    if tensor.dtype == ir.DataType.STRING or _tensor_nbytes(tensor) <= EXTERNAL_THRESHOLD:
        return False
    # A tensor read from an inline proto is copied as it is (float_data, int64_data, ... stay so).
    return not isinstance(tensor, ir.TensorProtoTensor) or tensor.raw.HasField("raw_data")


# A skeleton piece: bytes kept as they are, or a length-delimited field (its tag bytes) whose payload is a
# tensor's raw data or a message that holds one somewhere inside.
_Piece = bytes | tuple[bytes, "ir.TensorProtocol | list"]


def _split(message: bytes, holes: dict[bytes, ir.TensorProtocol], marker: bytes) -> list[_Piece]:
    """Cut a serialized message at every length-delimited field that is, or contains, a placeholder."""
    pieces: list[_Piece] = []
    pos = kept = 0
    while pos < len(message):
        field = pos
        key, pos = _read_varint(message, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _read_varint(message, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, body = _read_varint(message, pos)
            payload = message[body : body + length]
            if marker in payload:
                pieces.append(message[kept:field])
                pieces.append(
                    (
                        message[field:pos],
                        holes[payload] if payload in holes else _split(payload, holes, marker),
                    )
                )
                kept = body + length
            pos = body + length
        else:  # groups (3, 4) are not used by ONNX
            raise ValueError(f"unexpected protobuf wire type {wire}")
    pieces.append(message[kept:])
    return pieces


def _length(pieces: list[_Piece]) -> int:
    total = 0
    for piece in pieces:
        if isinstance(piece, bytes):
            total += len(piece)
            continue
        tag, inner = piece
        size = _length(inner) if isinstance(inner, list) else inner.nbytes
        total += len(tag) + len(_varint(size)) + size
    return total


def _emit(pieces: list[_Piece], out: BinaryIO) -> None:
    for piece in pieces:
        if isinstance(piece, bytes):
            out.write(piece)
            continue
        tag, inner = piece
        out.write(tag)
        if isinstance(inner, list):
            out.write(_varint(_length(inner)))
            _emit(inner, out)
            continue
        out.write(_varint(inner.nbytes))
        _write_tensor(inner, out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _serialize(model: ir.Model, value_info: bool = True) -> onnx.ModelProto:
    """``ir.serde.serialize_model``, letting an NccError raised while reading a tensor through (onnx-ir wraps it);
    without the main graph's ``value_info`` when asked, except for the outputs of contrib ops (QLinearAdd,
    MatMulIntegerToFloat, ...): ONNX's shape inference cannot type those, so a reader (``ncc dump`` of the
    written file) would not know them."""
    try:
        proto = ir.serde.serialize_model(model)
        if not value_info:
            contrib = {o for n in proto.graph.node if n.domain not in ("", "ai.onnx") for o in n.output}
            kept = [v for v in proto.graph.value_info if v.name in contrib]
            del proto.graph.value_info[:]
            proto.graph.value_info.extend(kept)
        return proto
    except Exception as err:
        cause, seen = err.__cause__ or err.__context__, set()
        while cause is not None and not isinstance(cause, NccError) and id(cause) not in seen:
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, NccError):
            raise cause from None
        raise


def _save_proto(proto: onnx.ModelProto, tmp: Path, final: Path) -> None:
    try:
        onnx.save(proto, tmp)
    except ValueError as err:  # protobuf refuses messages over 2 GB
        raise NccError(
            f"cannot write {final}: {err}; write the weights as external data (--external-data)."
        ) from None
    except OSError as err:
        raise NccError(f"cannot write {final}: {err.strerror or err}.") from None


# -- checks -------------------------------------------------------------------------------------


def _refuse_overwriting_inputs(model: ir.Model, data_path: Path) -> None:
    """The new data file must not replace a file the model's weights are still read from."""
    if not data_path.exists():
        return
    for slot in _slots(model):
        tensor = slot.tensor
        if (
            isinstance(tensor, ir.ExternalTensor)
            and os.path.exists(tensor.path)
            and os.path.samefile(tensor.path, data_path)
        ):
            raise NccError(
                f"external data file {data_path} holds weights of the model being saved "
                f"(tensor {tensor.name!r}); choose another external data name."
            )


def _require_weights(model: ir.Model) -> None:
    """Refuse up front to emit a model whose constants were elided from a text dump."""
    from ncc.ir.tensors import ElidedTensor

    for slot in _slots(model):
        tensor = slot.tensor
        if isinstance(tensor, ElidedTensor):
            raise NccError(
                f"constant @{tensor.name} was elided from the dump this model was read from; "
                "re-dump with --full to rebuild the model."
            )


def _tensor_nbytes(tensor: ir.TensorProtocol) -> int:
    try:
        return tensor.nbytes
    except Exception:  # string tensors know no byte size without reading them
        return 0
