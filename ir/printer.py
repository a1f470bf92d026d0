r"""The textual form of the ncc IR: a printer (this module) and a parser (:mod:`ncc.ir.parser`).

``print_model(parse(print_model(m))) == print_model(m)`` holds for every model
in both modes, and the output is deterministic byte for byte.

Format
======

::

    // ncc.ir 1
    model {ir_version = 8, opset_import = {"" = 17, "com.microsoft" = 1}, producer_name = "pytorch"}
    graph @main_graph(%x: f32[N,3,32,32], @w: f32[8,3,3,3]) -> (%out: f32[N,8,32,32]) {
      const @x_scale : f32[] = dense<0.02>
      const @w : f32[8,3,3,3] = elided<sha256:9f2c41e0aa12bb34>
      %y = Conv(%x, @w, none) {pads = [1, 1, 1, 1], strides = [1, 1]} : f32[N,8,32,32]  loc("conv0" #3)
      %a, none = com.microsoft::Foo(%y) {alpha = 0.5} : f32[N,8,32,32], ?  loc("foo" #4 fused[#1, #2])
      %out = Relu(%a) : f32[N,8,32,32]  loc("relu0" #5)
      return %out
    }
    func custom::MyFn[overload = "v2"](%a: ?, %b: ?) -> (%c: ?) attrs {alpha = 1.0, beta = unset<int>} with {opset_import = {"" = 17}} {
      ...
    }

* ``// ...`` is a comment. The first line names the format version.
* ``model {...}``: ``ir_version``, ``opset_import`` (the main graph's opsets),
  ``producer_name``, ``producer_version``, ``domain``, ``model_version``,
  ``doc_string``, ``metadata_props`` (a ``{"key" = "value"}`` dict); absent
  fields are omitted.
* ``graph @name(inputs) -> (outputs) [with {doc_string = ..., metadata_props = ..., opset_import = ...}] { body }``.
  Inputs and outputs are ``name: type``. The body holds ``const`` declarations
  (initializers), nodes in graph order, and ``return`` with the output values.
* Names: ``%v`` is a value, ``@w`` a constant (an initializer; an initializer
  that is also a graph input is listed among the inputs as ``@w``). Names made
  of ``[A-Za-z0-9_.]`` print bare, any other as a quoted string
  (``%"onnx::Conv_3"``). A value without a name gets a generated one
  (``%_unnamed0``...) that clashes with no other name in the model. ``none``
  is an absent optional input or an empty optional output.
* Types: ``f32[N,3,?]`` (dims: integers, symbols, quoted symbols, ``?`` for
  unknown), ``f32[]`` a scalar, ``f32`` a tensor of unknown rank,
  ``seq<f32>``, ``opt<seq<i64>>``, ``sparse<f32>``, ``?`` no type (``?[3]`` no
  type but a known shape). Dtypes are onnx-ir short names (``f32 f16 bf16 f64
  i8 i16 i32 i64 u8 ... u64 c64 c128 f8e4m3fn f8e4m3fnuz f8e5m2 f8e5m2fnuz
  f8e8m0 i4 u4 i2 u2 f4e2m1``) except ``bool``, ``str`` and ``undefined``.
* Nodes: ``outs = [domain::]Op[overload = "o", version = 3](inputs) {attrs} : types  loc("name" #id fused[#i, ...]) meta {"k" = "v"}``.
  Nodes without outputs omit ``outs =``; ``loc`` holds the node name (absent
  when the node has no name) and the ids of :mod:`ncc.ir.ids`; other node
  ``metadata_props`` follow as ``meta {...}``.
* Attributes: ``1`` int, ``1.0`` float (always with a ``.``, an exponent, or
  ``nan``/``inf``/``-inf``), ``"s"`` string, ``[1, 2]`` ints, ``[1.0]`` floats,
  ``["a"]`` strings; empty lists carry their kind: ``ints[]``, ``floats[]``,
  ``strings[]``, ``tensors[]``, ``graphs[]``, ``type_protos[]``. A tensor is
  ``TYPE DATA [named "tensor name"]`` (``value = f32[2] dense<[1.0, 2.0]>``), a
  graph a nested ``graph ... { ... }`` block (outer-scope values referenced by
  name), a type ``type<f32[3]>``, a reference to a function attribute
  ``ref<"alpha", float>``, a function attribute parameter without default
  ``unset<int>``.
* Constant data: ``dense<0.5>`` (scalar) or ``dense<[...]>`` (flat, row-major)
  for tensors of at most 16 elements (and always for strings), ``elided<sha256:H>``
  for larger ones in the default mode (H: the first 16 hex digits of the
  sha256 of the raw little-endian bytes), and in ``full`` mode either
  ``b64<"...">`` (raw bytes inline) or, with a sidecar data file,
  ``external<"model.ncc.data", offset=0, length=4096, sha256:H>`` (offsets
  64-byte aligned, in order of first appearance; H the whole sha256, which the
  parser checks; hand-written text may give a prefix of at least 16 digits).
  The sidecar must lie inside the text file's folder.
* Numbers: floats in the shortest form that round-trips in their own dtype
  (``0.02`` for f32, never ``0.019999999552965164``), ``nan``, ``inf``,
  ``-inf``, ``-0.0``; complex numbers as ``(re, im)``; booleans ``true``/``false``.
* Strings are byte strings in double quotes: ``\\``, ``\"``, ``\n``, ``\t``,
  ``\r``, ``\xHH`` (one raw byte), ``\u{H...}`` (a code point); other
  printable characters stand for their UTF-8 encoding.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir import ids
from ncc.ir.tensors import ElidedTensor, num_elements, raw_chunks, sha256_hex, string_elements

FORMAT_HEADER = "// ncc.ir 1"
#: Constants with more elements than this print as a hash (default) or as raw bytes (full).
INLINE_LIMIT = 16
ALIGN = 64

KEYWORDS = frozenset(
    "model graph func const return none true false dense elided external b64 loc fused meta with attrs "
    "ref unset type seq opt sparse named nan inf offset length".split()
)
_BARE_NAME = re.compile(r"[A-Za-z0-9_.]+\Z")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")

_SPECIAL_DTYPE_NAMES = {
    ir.DataType.BOOL: "bool",
    ir.DataType.STRING: "str",
    ir.DataType.UNDEFINED: "undefined",
}
DTYPE_NAMES: dict[ir.DataType, str] = {d: _SPECIAL_DTYPE_NAMES.get(d) or d.short_name() for d in ir.DataType}
DTYPES_BY_NAME: dict[str, ir.DataType] = {v: k for k, v in DTYPE_NAMES.items()}

ATTR_KIND_NAMES = {
    ir.AttributeType.INT: "int",
    ir.AttributeType.FLOAT: "float",
    ir.AttributeType.STRING: "string",
    ir.AttributeType.TENSOR: "tensor",
    ir.AttributeType.GRAPH: "graph",
    ir.AttributeType.SPARSE_TENSOR: "sparse_tensor",
    ir.AttributeType.TYPE_PROTO: "type_proto",
    ir.AttributeType.INTS: "ints",
    ir.AttributeType.FLOATS: "floats",
    ir.AttributeType.STRINGS: "strings",
    ir.AttributeType.TENSORS: "tensors",
    ir.AttributeType.GRAPHS: "graphs",
    ir.AttributeType.SPARSE_TENSORS: "sparse_tensors",
    ir.AttributeType.TYPE_PROTOS: "type_protos",
    ir.AttributeType.UNDEFINED: "undefined",
}
ATTR_KINDS_BY_NAME = {v: k for k, v in ATTR_KIND_NAMES.items()}


# ----------------------------------------------------------------------------- lexical helpers


def quote(data: bytes | str) -> str:
    """A double-quoted string literal for ``data`` (bytes, or str encoded as UTF-8)."""
    if isinstance(data, str):
        if data.isascii() and data.isprintable() and '"' not in data and "\\" not in data:
            return f'"{data}"'
        try:
            data = data.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = data.encode("utf-8", "surrogatepass")
    text = data.decode("utf-8", "surrogateescape")
    out = ['"']
    for ch in text:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= o <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif o < 0x80 and not ch.isprintable():
            out.append(f"\\x{o:02x}")
        elif not ch.isprintable():
            out.append(f"\\u{{{o:x}}}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def name_token(name: str) -> str:
    """A bare or quoted name after a ``%``/``@`` sigil."""
    return name if _BARE_NAME.match(name) else quote(name)


def ident(name: str) -> str:
    """An identifier (attribute name, op type, domain, symbolic dim), quoted when needed."""
    return name if _IDENT.match(name) and name not in KEYWORDS else quote(name)


def format_float(x, dtype: ir.DataType = ir.DataType.FLOAT) -> str:
    """Shortest text that reads back to the same value in ``dtype``; always float-looking."""
    if dtype == ir.DataType.DOUBLE:
        f = float(x)
        text = repr(f)
    else:
        f = float(x)
        if math.isnan(f) or math.isinf(f):
            text = repr(f)
        else:
            if dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                np_dtype = np.float32 if dtype == ir.DataType.FLOAT else np.float16
                text = str(np_dtype(x))
            else:
                text = _shortest(f, dtype.numpy().type)
    if text in ("nan", "-nan"):
        return "nan"
    if text in ("inf", "-inf"):
        return text
    if "." not in text and "e" not in text and "n" not in text:
        text += ".0"
    return text


def _shortest(f: float, np_dtype) -> str:
    """Shortest decimal that reads back to the same value in a small float type (bf16, f8, f4)."""
    target = np_dtype(f)
    for digits in range(1, 10):
        text = f"{f:.{digits}g}"
        if np_dtype(float(text)) == target:
            return text
    return repr(f)


# ----------------------------------------------------------------------------- types


def format_dim(d) -> str:
    if isinstance(d, int):
        return str(d)
    value = d.value if isinstance(d, ir.SymbolicDim) else d
    if value is None:
        return "?"
    return ident(str(value))


def format_shape(shape: ir.Shape | None) -> str:
    if shape is None:
        return ""
    return "[" + ",".join(format_dim(d) for d in shape) + "]"


def format_base_type(t) -> str:
    if t is None:
        return "?"
    if isinstance(t, ir.TensorType):
        return DTYPE_NAMES[t.dtype]
    if isinstance(t, ir.SequenceType):
        return f"seq<{format_base_type(t.elem_type)}>"
    if isinstance(t, ir.OptionalType):
        return f"opt<{format_base_type(t.elem_type)}>"
    if isinstance(t, ir.SparseTensorType):
        return f"sparse<{DTYPE_NAMES[t.dtype]}>"
    raise NccError(f"cannot print type {t!r}.")


def format_type(t, shape) -> str:
    return format_base_type(t) + format_shape(shape)


# ----------------------------------------------------------------------------- tensors


def short_hash(tensor) -> str:
    if isinstance(tensor, ElidedTensor):
        return tensor.digest
    return sha256_hex(tensor)[:16]


def _format_element(x, dtype: ir.DataType) -> str:
    if dtype == ir.DataType.STRING:
        return quote(x if isinstance(x, bytes) else str(x))
    if dtype == ir.DataType.BOOL:
        return "true" if x else "false"
    if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128):
        part = ir.DataType.FLOAT if dtype == ir.DataType.COMPLEX64 else ir.DataType.DOUBLE
        return f"({format_float(x.real, part)}, {format_float(x.imag, part)})"
    if dtype.is_floating_point():
        return format_float(x, dtype)
    return str(int(x))


def format_dense(tensor, dtype: ir.DataType) -> str:
    if dtype == ir.DataType.STRING:
        flat = string_elements(tensor)
    else:
        flat = tensor.numpy().reshape(-1)
    items = [_format_element(x, dtype) for x in flat]
    if len(tensor.shape) == 0:
        return f"dense<{items[0]}>"
    return "dense<[" + ", ".join(items) + "]>"


def _dense_ok(dtype: ir.DataType) -> bool:
    if dtype == ir.DataType.UNDEFINED:
        return False
    try:
        dtype.numpy()
    except Exception:
        return False
    return True


class _Sidecar:
    """The binary file holding large constants in ``full`` mode."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.offset = 0
        self.placed: dict[int, tuple[int, int, str]] = {}

    def add(self, tensor) -> tuple[int, int, str]:
        key = id(tensor)
        if key in self.placed:
            return self.placed[key]
        pad = (-self.offset) % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        h = hashlib.sha256()
        cached = getattr(tensor, "meta", {}).get("ncc.sha256") if hasattr(tensor, "meta") else None
        for chunk in raw_chunks(tensor):
            if cached is None:
                h.update(chunk)
            self.file.write(chunk)
            self.offset += len(chunk)
        if cached is None:
            cached = h.hexdigest()
            try:
                tensor.meta["ncc.sha256"] = cached
            except AttributeError:
                pass
        result = (start, self.offset - start, cached)  # all 64 digits: the reader checks them
        self.placed[key] = result
        return result

    def close(self, ok: bool) -> None:
        self.file.close()
        if ok:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- printer


class _Printer:
    def __init__(self, model: ir.Model | None, full: bool, sidecar: _Sidecar | None):
        self.model = model
        self.full = full
        self.sidecar = sidecar
        self.generated: dict[int, str] = {}
        self._taken: set[str] | None = None
        self._counter = 0
        self.out: list[str] = []

    # names ------------------------------------------------------------------
    def _all_names(self) -> set[str]:
        names: set[str] = set()
        if self.model is None:
            return names
        graphs = [self.model.graph, *self.model.graph.subgraphs()]
        for fn in self.model.functions.values():
            graphs.append(fn.graph)
            graphs.extend(fn.graph.subgraphs())
        for g in graphs:
            for v in g.inputs:
                names.add(v.name or "")
            names.update(g.initializers.keys())
            for node in g:
                for v in node.outputs:
                    names.add(v.name or "")
        return names

    def value_name(self, value: ir.Value) -> str:
        name = value.name
        if name:
            return name
        key = id(value)
        if key not in self.generated:
            if self._taken is None:
                self._taken = self._all_names()
            while True:
                candidate = f"_unnamed{self._counter}"
                self._counter += 1
                if candidate not in self._taken:
                    break
            self._taken.add(candidate)
            self.generated[key] = candidate
        return self.generated[key]

    def ref(self, value: ir.Value | None) -> str:
        if value is None:
            return "none"
        sigil = "@" if value.is_initializer() else "%"
        return sigil + name_token(self.value_name(value))

    def out_ref(self, value: ir.Value) -> str:
        if value.name == "" and not value.uses() and not value.is_graph_output():
            return "none"
        return self.ref(value)

    # tensors ----------------------------------------------------------------
    def tensor_data(self, tensor) -> str:
        dtype = tensor.dtype
        if isinstance(tensor, ElidedTensor):
            if self.full:
                tensor.numpy()  # raises the user-facing error
            return f"elided<sha256:{tensor.digest}>"
        n = num_elements(tensor)
        if dtype == ir.DataType.STRING or (n <= INLINE_LIMIT and _dense_ok(dtype)):
            return format_dense(tensor, dtype)
        if not self.full:
            return f"elided<sha256:{short_hash(tensor)}>"
        if self.sidecar is not None:
            offset, length, digest = self.sidecar.add(tensor)
            return f"external<{quote(self.sidecar.path.name)}, offset={offset}, length={length}, sha256:{digest}>"
        return 'b64<"' + base64.b64encode(tensor.tobytes()).decode("ascii") + '">'

    def tensor_literal(self, tensor) -> str:
        text = DTYPE_NAMES[tensor.dtype] + format_shape(tensor.shape) + " " + self.tensor_data(tensor)
        if tensor.name is not None:
            text += f" named {quote(tensor.name)}"
        return text

    # attributes -------------------------------------------------------------
    def attr_value(self, attr, indent: str) -> str:
        if attr.is_ref():
            return f"ref<{quote(attr.ref_attr_name)}, {ATTR_KIND_NAMES[attr.type]}>"
        t, v = attr.type, attr.value
        A = ir.AttributeType
        if v is None:
            return f"unset<{ATTR_KIND_NAMES[t]}>"
        if t == A.INT:
            return str(v)
        if t == A.FLOAT:
            return format_float(v)
        if t == A.STRING:
            return quote(v)
        if t == A.TENSOR:
            return self.tensor_literal(v)
        if t == A.GRAPH:
            return self.graph_text(v, indent, keyword="graph")
        if t == A.TYPE_PROTO:
            return f"type<{format_type(v.type, v.shape)}>"
        items = list(v)
        if not items:
            return f"{ATTR_KIND_NAMES[t]}[]"
        if t == A.INTS:
            parts = [str(x) for x in items]
        elif t == A.FLOATS:
            parts = [format_float(x) for x in items]
        elif t == A.STRINGS:
            parts = [quote(x) for x in items]
        elif t == A.TENSORS:
            parts = [self.tensor_literal(x) for x in items]
        elif t == A.GRAPHS:
            parts = [self.graph_text(g, indent, keyword="graph") for g in items]
        elif t == A.TYPE_PROTOS:
            parts = [f"type<{format_type(x.type, x.shape)}>" for x in items]
        else:
            raise NccError(
                f"attribute {attr.name!r}: {t.name} attributes are not supported by the text form."
            )
        return "[" + ", ".join(parts) + "]"

    def attrs(self, attributes, indent: str) -> str:
        return (
            "{"
            + ", ".join(f"{ident(name)} = {self.attr_value(a, indent)}" for name, a in attributes.items())
            + "}"
        )

    # nodes ------------------------------------------------------------------
    def node_line(self, node: ir.Node, indent: str) -> str:
        parts = []
        outs = node.outputs
        if outs:
            parts.append(", ".join(self.out_ref(v) for v in outs) + " = ")
        op = ident(node.op_type)
        if node.domain:
            op = ident(node.domain) + "::" + op
        extras = []
        if node.overload:
            extras.append(f"overload = {quote(node.overload)}")
        if node.version is not None:
            extras.append(f"version = {node.version}")
        if extras:
            op += "[" + ", ".join(extras) + "]"
        parts.append(op + "(" + ", ".join(self.ref(v) for v in node.inputs) + ")")
        if node.attributes:
            parts.append(" " + self.attrs(node.attributes, indent))
        if outs:
            parts.append(" : " + ", ".join(format_type(v.type, v.shape) for v in outs))
        props = node.metadata_props
        loc = []
        if node.name is not None:
            loc.append(quote(node.name))
        other = {}
        for key, value in props.items():
            if key == ids.ID_KEY and value.isdigit():
                loc.append(f"#{int(value)}" if str(int(value)) == value else None)
                if loc[-1] is None:
                    loc.pop()
                    other[key] = value
            elif (
                key == ids.FUSED_KEY
                and re.fullmatch(r"\d+(,\d+)*", value)
                and all(str(int(x)) == x for x in value.split(","))
            ):
                other.setdefault("__fused__", value)
            else:
                other[key] = value
        fused = other.pop("__fused__", None)
        if fused is not None:
            loc.append("fused[" + ", ".join(f"#{x}" for x in fused.split(",")) + "]")
        if loc:
            parts.append("  loc(" + " ".join(loc) + ")")
        if other:
            parts.append(" meta " + _str_dict(other))
        return indent + "".join(parts)

    # graphs -----------------------------------------------------------------
    def graph_text(self, graph: ir.Graph, indent: str, *, keyword: str, with_opsets: bool = True) -> str:
        lines: list[str] = []
        self.graph_lines(graph, indent, lines, keyword=keyword, with_opsets=with_opsets)
        return "\n".join(lines)

    def graph_lines(
        self,
        graph,
        indent: str,
        lines: list[str],
        *,
        keyword: str,
        head: str | None = None,
        with_opsets: bool = True,
        extra_props: dict | None = None,
    ) -> None:
        inputs = ", ".join(f"{self.ref(v)}: {format_type(v.type, v.shape)}" for v in graph.inputs)
        outputs = ", ".join(f"{self.ref(v)}: {format_type(v.type, v.shape)}" for v in graph.outputs)
        if head is None:
            head = keyword + (f" @{name_token(graph.name)}" if graph.name is not None else "")
        props = dict(extra_props or {})
        if graph.doc_string is not None:
            props["doc_string"] = quote(graph.doc_string)
        if graph.metadata_props:
            props["metadata_props"] = _str_dict(graph.metadata_props)
        if with_opsets and graph.opset_imports:
            props["opset_import"] = _opsets(graph.opset_imports)
        text = f"{head}({inputs}) -> ({outputs})"
        if props:
            text += " with {" + ", ".join(f"{k} = {v}" for k, v in props.items()) + "}"
        lines.append(text + " {")
        inner = indent + "  "
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                raise NccError(f"initializer {value.name!r} has no value; the text form cannot print it.")
            t = DTYPE_NAMES[tensor.dtype] + format_shape(tensor.shape)
            lines.append(
                f"{inner}const @{name_token(self.value_name(value))} : {t} = {self.tensor_data(tensor)}"
            )
        for node in graph:
            lines.append(self.node_line(node, inner))
        rets = ", ".join(self.ref(v) for v in graph.outputs)
        lines.append(f"{inner}return {rets}" if rets else f"{inner}return")
        lines.append(indent + "}")

    def function_lines(self, fn: ir.Function, lines: list[str]) -> None:
        head = "func " + (ident(fn.domain) + "::" if fn.domain else "") + ident(fn.name)
        if fn.overload:
            head += f"[overload = {quote(fn.overload)}]"
        inputs = ", ".join(f"{self.ref(v)}: {format_type(v.type, v.shape)}" for v in fn.inputs)
        outputs = ", ".join(f"{self.ref(v)}: {format_type(v.type, v.shape)}" for v in fn.outputs)
        text = f"{head}({inputs}) -> ({outputs})"
        if fn.attributes:
            text += " attrs " + self.attrs(fn.attributes, "")
        props = {}
        if fn.doc_string is not None:
            props["doc_string"] = quote(fn.doc_string)
        if fn.metadata_props:
            props["metadata_props"] = _str_dict(fn.metadata_props)
        if fn.opset_imports:
            props["opset_import"] = _opsets(fn.opset_imports)
        if props:
            text += " with {" + ", ".join(f"{k} = {v}" for k, v in props.items()) + "}"
        lines.append(text + " {")
        for node in fn:
            lines.append(self.node_line(node, "  "))
        rets = ", ".join(self.ref(v) for v in fn.outputs)
        lines.append(f"  return {rets}" if rets else "  return")
        lines.append("}")

    def model_text(self, model: ir.Model) -> str:
        lines = [FORMAT_HEADER]
        fields = [f"ir_version = {model.ir_version}"]
        if model.graph.opset_imports:
            fields.append(f"opset_import = {_opsets(model.graph.opset_imports)}")
        for key in ("producer_name", "producer_version", "domain"):
            value = getattr(model, key)
            if value is not None:
                fields.append(f"{key} = {quote(value)}")
        if model.model_version is not None:
            fields.append(f"model_version = {model.model_version}")
        if model.doc_string is not None:
            fields.append(f"doc_string = {quote(model.doc_string)}")
        if model.metadata_props:
            fields.append(f"metadata_props = {_str_dict(model.metadata_props)}")
        lines.append("model {" + ", ".join(fields) + "}")
        self.graph_lines(model.graph, "", lines, keyword="graph", with_opsets=False)
        for fn in model.functions.values():
            self.function_lines(fn, lines)
        return "\n".join(lines) + "\n"


def _str_dict(d) -> str:
    return "{" + ", ".join(f"{quote(k)} = {quote(v)}" for k, v in d.items()) + "}"


def _opsets(opsets) -> str:
    return "{" + ", ".join(f"{quote(k)} = {v}" for k, v in opsets.items()) + "}"


# ----------------------------------------------------------------------------- public API


def print_model(model: ir.Model, *, full: bool = False, data_file: Path | None = None) -> str:
    """The text form of ``model``; ``full`` carries every value (large ones in ``data_file`` if given)."""
    sidecar = _Sidecar(Path(data_file)) if (full and data_file is not None) else None
    ok = False
    try:
        text = _Printer(model, full, sidecar).model_text(model)
        ok = True
    finally:
        if sidecar is not None:
            sidecar.close(ok)
    return text


def print_node(node: ir.Node) -> str:
    """One node as a line of text (constants elided), for diagnostics."""
    return _Printer(None, False, None).node_line(node, "")


def print_graph(graph: ir.Graph) -> str:
    """A graph (or subgraph) as text, constants elided."""
    return _Printer(None, False, None).graph_text(graph, "", keyword="graph")


def fingerprint(model: ir.Model) -> str:
    """A hex digest of the default-mode text: equal fingerprints, equal printed IR."""
    return hashlib.sha256(print_model(model).encode("utf-8")).hexdigest()
