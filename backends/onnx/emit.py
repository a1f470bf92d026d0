"""Write an IR model as ``.onnx`` (optionally with external data), all or nothing.

External data is written when asked for, or automatically when the weights
exceed protobuf's 2 GB limit. Tensors that are still memory-mapped from the
input's external data are streamed into the new file, never held all at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir

from ncc.errors import NccError
from ncc.files import atomic_outputs

PROTOBUF_LIMIT = 2**31 - 1
#: Tensors at most this many bytes stay inside the proto when writing external data.
EXTERNAL_THRESHOLD = 1024


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize to a ModelProto with every weight inline (small models only)."""
    _require_weights(model)
    return ir.serde.serialize_model(_with_weights_in_memory(model))


def weight_bytes(model: ir.Model) -> int:
    return sum(_tensor_nbytes(t) for t in _all_tensors(model))


def save_onnx(model: ir.Model, path: str | os.PathLike, *, external_data: str | None = None) -> Path | None:
    """Save ``model`` to ``path``; returns the external data file when one was written.

    ``external_data`` names the data file (relative to ``path``'s folder); when
    None it is ``<path name>.data`` and is used only for models over 2 GB.
    """
    path = Path(path)
    _require_weights(model)
    if external_data is None and weight_bytes(model) > PROTOBUF_LIMIT - 64 * 2**20:
        external_data = path.name + ".data"
    if external_data is not None:
        if os.path.isabs(external_data) or os.sep in external_data or external_data in {"", ".", ".."}:
            raise NccError(f"external data name {external_data!r} must be a plain file name beside {path.name}.")
        data_path = path.parent / external_data
        with atomic_outputs(path, data_path) as (tmp_model, _tmp_data):
            ir.save(model, tmp_model, external_data=external_data, size_threshold_bytes=EXTERNAL_THRESHOLD)
        return data_path
    with atomic_outputs(path) as (tmp_model,):
        ir.save(_with_weights_in_memory(model), tmp_model)
    return None


def _all_tensors(model: ir.Model):
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR:
                yield attr.value


def _require_weights(model: ir.Model) -> None:
    """Refuse up front to emit a model whose constants were elided from a text dump."""
    from ncc.ir.tensors import ElidedTensor

    for tensor in _all_tensors(model):
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


def _with_weights_in_memory(model: ir.Model) -> ir.Model:
    """Return ``model`` with external tensors read into memory (so the proto is self-contained)."""
    if not any(isinstance(t, ir.ExternalTensor) for t in _all_tensors(model)):
        return model
    return ir.external_data.load_to_model(model)
