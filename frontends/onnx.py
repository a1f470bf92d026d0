"""ONNX frontend: a ``.onnx`` file (or ModelProto) becomes an ncc IR model.

Weights stay where they are: external data is memory-mapped lazily by onnx-ir
and never read here, so loading costs the same for 4 GB of weights as for 4 KB.
External data whose location leaves the model's folder is refused, and so is a
tensor whose bytes reach past the end of its file (checked by size, up front,
rather than when a pass first reads the tensor). The model must pass the ONNX
checker; missing value types are filled by ONNX shape inference
(:mod:`ncc.ir.inference`, on the model without its large weights, so it is
cheap), and every node gets a stable id (:mod:`ncc.ir.ids`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from ncc.errors import NccError, first_line
from ncc.files import inside_folder
from ncc.ir import ids
from ncc.ir.inference import InferenceFailed, infer_types


def load_onnx(path: str | os.PathLike, *, check: bool = True) -> ir.Model:
    """Load ``path`` into the IR without reading external weights."""
    path = Path(path)
    if not path.exists():
        raise NccError(f"{path}: no such file.")
    if path.is_dir():
        raise NccError(f"{path}: is a folder, not an ONNX file.")
    if not os.access(path, os.R_OK):
        raise NccError(f"{path}: cannot be read (permission denied).")
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # onnx's checker (C++) takes only UTF-8 paths
        raise NccError(f"{path!s}: the path is not UTF-8, which onnx needs; rename it.") from None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as err:
        raise NccError(f"{path}: not a readable ONNX model ({first_line(err)}).") from None
    if not proto.HasField("graph"):
        raise NccError(
            f"{path}: not an ONNX model (no graph found; the file may be truncated or of another kind)."
        )
    _refuse_escaping_external_data(proto, path.parent)
    if check:
        _check(str(path), str(path), proto)  # by path, so external data is checked beside the model
    return from_proto(proto, base_dir=path.parent, check=False, source=str(path))


def from_proto(
    proto: onnx.ModelProto,
    *,
    base_dir: str | os.PathLike | None = None,
    check: bool = True,
    source: str = "model",
) -> ir.Model:
    """Convert a ModelProto (weights inline or external under ``base_dir``) to the IR."""
    if check:
        _check(proto, source)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as err:  # onnx-ir raises plain exceptions on malformed graphs
        raise NccError(f"{source}: cannot be read into the IR: {first_line(err)}") from None
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, base_dir)
    return normalize(model, source)


def normalize(model: ir.Model, source: str = "model") -> ir.Model:
    """What every frontend's model gets: missing value types inferred, every node a stable id."""
    if _has_untyped_values(model):
        try:
            infer_types(model)  # on the model without its large weights: cheap
        except InferenceFailed as err:
            raise NccError(f"{source}: ONNX shape inference failed: {err}") from None
    ids.assign_ids(model)
    return model


def _check(model: onnx.ModelProto | str, source: str, proto: onnx.ModelProto | None = None) -> None:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        if proto is None and isinstance(model, onnx.ModelProto):
            proto = model
        problem = _dataflow_problem(proto.graph) if proto is not None else None
        if problem:
            raise NccError(f"{source}: {problem}.") from None
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()).rstrip(".")
        raise NccError(f"{source}: fails the ONNX checker: {text}.") from None


def _dataflow_problem(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> str | None:
    """What the checker's "must be topologically sorted" means for ``graph`` (or a subgraph): a node
    reading a value nothing defines, or a cycle; ``None`` when it is neither (or something else)."""
    producer = {out: node for node in graph.node for out in node.output if out}
    known = outer | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    known |= {s.values.name for s in graph.sparse_initializer}
    for node in graph.node:
        for name in node.input:
            if name and name not in known and name not in producer:
                return f"node {_node_label(node)} reads value {name!r}, which nothing defines"
    cycle = _find_cycle(graph.node, producer, known)
    if cycle:
        path = " -> ".join(_node_label(n) for n in [*cycle, cycle[0]])
        return f"the graph has a cycle through node {_node_label(cycle[0])} ({path})"
    inner = known | set(producer)
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                if problem := _dataflow_problem(sub, frozenset(inner)):
                    return problem
    return None


def _find_cycle(nodes, producer: dict, known: set[str]) -> list | None:
    """The nodes of one cycle in data-flow order (each feeds the next, the last the first), or ``None``."""
    state: dict[int, int] = {}  # id(node) -> 1 on the current path, 2 done
    for start in nodes:
        if id(start) in state:
            continue
        path, stack = [], [(start, iter(start.input))]
        state[id(start)] = 1
        path.append(start)
        while stack:
            node, inputs = stack[-1]
            for name in inputs:
                src = producer.get(name) if name not in known else None
                if src is None:
                    continue
                if state.get(id(src)) == 1:  # the path runs from consumers to producers
                    return path[path.index(src) :][::-1]
                if id(src) not in state:
                    state[id(src)] = 1
                    path.append(src)
                    stack.append((src, iter(src.input)))
                    break
            else:
                state[id(node)] = 2
                path.pop()
                stack.pop()
    return None


def _node_label(node: onnx.NodeProto) -> str:
    return repr(node.name) if node.name else f"{node.op_type} (unnamed, writing {list(node.output)})"


def _has_untyped_values(model: ir.Model) -> bool:
    """True when a node output of the main graph or of any subgraph lacks a declared type."""
    return any(
        v.name and v.type is None
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        for v in node.outputs
    )


def _extent(tensor: onnx.TensorProto) -> tuple[int, int]:
    """(offset, length) of ``tensor``'s bytes in its external data file; length from type and shape when unset."""
    entries = {e.key: e.value for e in tensor.external_data}
    try:
        offset = int(entries.get("offset") or 0)
        if "length" in entries:
            length = int(entries["length"])
        else:
            length = -(-_count(tensor.dims) * _bitwidth(tensor.data_type) // 8)
    except ValueError:
        raise NccError(
            f"initializer {tensor.name!r}: external data offset/length {entries.get('offset')!r}/"
            f"{entries.get('length')!r} are not byte counts."
        ) from None
    if offset < 0 or length < 0:
        raise NccError(
            f"initializer {tensor.name!r}: external data offset/length {offset}/{length} are negative."
        )
    return offset, length


def _count(dims) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


def _bitwidth(data_type: int) -> int:
    """Bits per element; 0 for strings and unknown types (whose size the checker judges)."""
    try:
        dtype = ir.DataType(data_type)
        return 0 if dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED) else dtype.bitwidth
    except (ValueError, TypeError):
        return 0


def _refuse_escaping_external_data(proto: onnx.ModelProto, folder: Path) -> None:
    sizes: dict[Path, int] = {}
    for tensor in external_tensors(proto):
        where = location(tensor)
        resolved = inside_folder(folder, where)
        if resolved is None:
            raise NccError(
                f"initializer {tensor.name!r} points at external data {where!r} outside the model's "
                f"folder {folder}; refusing to read it."
            )
        if not resolved.is_file():
            raise NccError(
                f"initializer {tensor.name!r}: external data file {where!r} is missing from {folder}."
            )
        if resolved not in sizes:
            sizes[resolved] = resolved.stat().st_size
        offset, length = _extent(tensor)
        if offset + length > sizes[resolved]:
            raise NccError(
                f"initializer {tensor.name!r} needs bytes {offset}..{offset + length} of external data file "
                f"{where!r}, which has {sizes[resolved]} (truncated?)."
            )


def external_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``proto`` stored as external data: initializers (sparse ones too) and tensor
    attributes, in the main graph, its subgraphs and the model's functions."""

    def of_nodes(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from of_graph(attr.g)
                for sub in attr.graphs:
                    yield from of_graph(sub)

    def of_graph(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        yield from of_nodes(graph.node)

    tensors = chain(of_graph(proto.graph), *(of_nodes(f.node) for f in proto.functions))
    return (t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL)


def external_tensor(
    name: str, data_type: int, dims, where: str, offset: int, length: int
) -> onnx.TensorProto:
    """A TensorProto whose bytes are ``length`` bytes at ``offset`` of the file ``where`` (beside the model)."""
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", where), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def location(tensor: onnx.TensorProto) -> str:
    """The external data file of ``tensor``, relative to the model's folder ("" when unset)."""
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def external_data_files(path: Path, proto: onnx.ModelProto | None = None) -> list[Path]:
    """The external data files the model at ``path`` references, each once, in order of first use."""
    proto = proto if proto is not None else onnx.load(str(path), load_external_data=False)
    names = dict.fromkeys(loc for t in external_tensors(proto) if (loc := location(t)))
    return [path.parent / name for name in names]
