"""Parse the ncc IR text form (see :mod:`ncc.ir.printer` for the format) back into an onnx-ir model.

The grammar (``ncc.lark``) is LALR(1); the model is built while the parser
reduces (a lark Transformer passed to the parser), so no parse tree is ever
materialized. Values may be used before their definition (graphs need not be
sorted); a subgraph resolves a name through its enclosing scopes. Every error,
syntactic or semantic, is a :class:`ncc.errors.ParseError` pointing at the
offending token.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import threading
from pathlib import Path

import lark
import ml_dtypes
import numpy as np
import onnx_ir as ir
from ncc.errors import NccError, ParseError
from ncc.files import inside_folder
from ncc.ir import ids
from ncc.ir.printer import ATTR_KINDS_BY_NAME, DTYPE_NAMES, DTYPES_BY_NAME
from ncc.ir.tensors import CHUNK, HASH_KEY, ElidedTensor
from onnx_ir import _type_casting

_GRAMMAR = Path(__file__).with_name("ncc.lark")
#: Parse simple node lines with a regular expression instead of lark (tests turn it off to compare).
USE_FAST_PATH = True
#: The shortest sha256 prefix an ``external<...>`` may give (the printer writes all 64 hex digits).
MIN_DIGITS = 16
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class _Error(Exception):
    def __init__(self, message: str, token=None):
        super().__init__(message)
        self.message, self.token = message, token


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]+\}|.)", re.S)
_SIMPLE_ESCAPES = {"n": b"\n", "t": b"\t", "r": b"\r", '"': b'"', "\\": b"\\"}


def _unquote_bytes(token) -> bytes:
    body = token[1:-1]
    if "\\" not in body:
        return body.encode("utf-8", "surrogatepass")
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(body):
        out += body[pos : m.start()].encode("utf-8", "surrogatepass")
        esc = m.group(1)
        if esc[0] == "x":
            out.append(int(esc[1:], 16))
        elif esc[0] == "u" and len(esc) > 1:
            out += chr(int(esc[2:-1], 16)).encode("utf-8", "surrogatepass")
        elif esc in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[esc]
        else:
            raise _Error(f"unknown escape '\\{esc}' in string", token)
        pos = m.end()
    out += body[pos:].encode("utf-8", "surrogatepass")
    return bytes(out)


def _unquote(token) -> str:
    return _unquote_bytes(token).decode("utf-8", "surrogateescape")


def _name(token) -> str:
    """The name of an IDENT/STRING token, or of a %/@ sigil token."""
    if token.type in ("VALUE", "CONST"):
        body = token[1:]
        return _unquote(body) if body.startswith('"') else body
    if token.type == "STRING":
        return _unquote(token)
    return str(token)


class _Scope:
    __slots__ = (
        "parent",
        "values",
        "pending",
        "const_inputs",
        "inputs",
        "out_decls",
        "inits",
        "nodes",
        "ret",
    )

    def __init__(self, parent):
        self.parent = parent
        self.values: dict[str, ir.Value] = {}
        self.pending: dict[str, tuple[ir.Value, object]] = {}
        self.const_inputs: set[str] = set()
        self.inputs: list[ir.Value] = []
        self.out_decls: list = []
        self.inits: list[ir.Value] = []
        self.nodes: list[ir.Node] = []
        self.ret = None


def _float(tok) -> float:
    return float(tok)


def _int64(tok) -> int:
    """An INT token's value; ONNX stores integers (attributes, dims, offsets, versions) in 64 bits."""
    value = int(tok)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise _Error(f"integer {tok} does not fit in 64 bits", tok)
    return value


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Builder(lark.Transformer):
    """Builds the model bottom-up as the LALR parser reduces."""

    def __init__(self, base_dir: Path | None):
        super().__init__(visit_tokens=False)
        self.base_dir = base_dir
        self.scope: _Scope | None = None
        self.pending_scopes: list[_Scope] = []
        self.fast_runs: list[list] = []
        self.type_cache: dict[str, tuple] = {}

    # ---------------------------------------------------------------- scopes
    def _push(self, is_function: bool = False) -> _Scope:
        self.scope = _Scope(None if is_function else self.scope)
        return self.scope

    def lookup(self, token) -> ir.Value | None:
        if token.type == "NONE":
            return None
        name = _name(token)
        s = self.scope
        while s is not None:
            v = s.values.get(name)
            if v is not None:
                return v
            s = s.parent
        s = self.scope
        while s is not None:
            p = s.pending.get(name)
            if p is not None:
                return p[0]
            s = s.parent
        value = ir.Value(name=name)
        self.scope.pending[name] = (value, token)
        return value

    def define(self, token) -> ir.Value:
        if token.type == "NONE":
            return ir.Value(name="")
        name = _name(token)
        scope = self.scope
        if name in scope.values:
            raise _Error(f"value {token} is defined twice", token)
        p = scope.pending.pop(name, None)
        value = p[0] if p is not None else ir.Value(name=name)
        scope.values[name] = value
        return value

    # ---------------------------------------------------------------- fast path
    def fast_nodes(self, c):
        tok = c[0]
        run = self.fast_runs[int(tok[len("$fast") :])]
        for line, m in run[1:]:
            self._fast_node(line, m)

    def _fast_type(self, text: str, line: int, column: int):
        cached = self.type_cache.get(text)
        if cached is None:
            base, _, dims = text.partition("[")
            if base == "?":
                typ = None
            else:
                dt = DTYPES_BY_NAME.get(base)
                if dt is None:
                    raise _Error(f"unknown dtype '{base}'", _tok(base, "IDENT", line, column))
                typ = ir.TensorType(dt)
            if not _:
                shape_dims = None
            else:
                shape_dims = []
                for d in dims[:-1].split(",") if dims[:-1] else ():
                    if d.isdigit():
                        shape_dims.append(int(d))
                    else:
                        shape_dims.append(ir.SymbolicDim(None if d == "?" else d))
            cached = (typ, shape_dims)
            self.type_cache[text] = cached
        typ, dims = cached
        return typ, (ir.Shape(dims) if dims is not None else None)

    def _fast_node(self, line: int, m) -> None:
        start = m.start
        ins = m.group("ins")
        inputs = []
        if ins:
            col0 = start("ins") + 1
            for r in _SPLIT_REF.finditer(ins):
                text = r.group()
                if text == "none":
                    inputs.append(None)
                else:
                    inputs.append(
                        self.lookup(
                            _tok(text, "VALUE" if text[0] == "%" else "CONST", line, col0 + r.start())
                        )
                    )
        outs = m.group("outs")
        outputs = []
        if outs:
            col0 = start("outs") + 1
            for r in _SPLIT_REF.finditer(outs):
                text = r.group()
                outputs.append(
                    self.define(_tok(text, "NONE" if text == "none" else "VALUE", line, col0 + r.start()))
                )
        op_type = m.group("op")
        types = m.group("types")
        if types is not None:
            col0 = start("types") + 1
            parts = types.split(", ")
            if len(parts) != len(outputs):
                raise _Error(
                    f"{op_type} has {len(outputs)} outputs but {len(parts)} types",
                    _tok(op_type, "IDENT", line, start("op") + 1),
                )
            for value, part in zip(outputs, parts):
                value.type, value.shape = self._fast_type(part, line, col0)
        attrs = ()
        text = m.group("attrs")
        if text:
            attrs = []
            A = ir.AttributeType
            for a in _ATTR_ITEM.finditer(text):
                name, v = a.group(1), a.group(2)
                if v[0] == '"':
                    attrs.append(ir.Attr(name, A.STRING, v[1:-1]))
                elif v[0] == "[":
                    items = v[1:-1].split(", ")
                    if all(_INT_RE.fullmatch(x) for x in items):
                        attrs.append(ir.Attr(name, A.INTS, [int(x) for x in items]))
                    else:
                        attrs.append(ir.Attr(name, A.FLOATS, [float(x) for x in items]))
                elif _INT_RE.fullmatch(v):
                    attrs.append(ir.Attr(name, A.INT, int(v)))
                else:
                    attrs.append(ir.Attr(name, A.FLOAT, float(v)))
        name = m.group("name")
        node_id = m.group("id")
        node = ir.Node(
            m.group("dom") or "",
            op_type,
            inputs,
            attrs,
            outputs=outputs,
            name=name[1:-1] if name is not None else None,
            metadata_props={ids.ID_KEY: str(int(node_id))} if node_id is not None else None,
        )
        self.scope.nodes.append(node)

    # ---------------------------------------------------------------- dicts
    def dict(self, c):
        if c == [None]:
            return {}
        return dict(c)

    def entry(self, c):
        key, value = c
        return (_name(key), (key, value))

    def _dict_value(self, pair, kind):
        key, tok = pair
        if kind == "int":
            if not isinstance(tok, lark.Token) or tok.type != "INT":
                raise _Error(f"'{_name(key)}' must be an integer", key)
            return _int64(tok)
        if kind == "str":
            if not isinstance(tok, lark.Token) or tok.type != "STRING":
                raise _Error(f"'{_name(key)}' must be a string", key)
            return _unquote(tok)
        if kind == "str_dict":
            if not isinstance(tok, dict):
                raise _Error(f'\'{_name(key)}\' must be a {{"key" = "value"}} dict', key)
            return {k: self._dict_value(v, "str") for k, v in tok.items()}
        if kind == "int_dict":
            if not isinstance(tok, dict):
                raise _Error(f"'{_name(key)}' must be a {{\"domain\" = version}} dict", key)
            return {k: self._dict_value(v, "int") for k, v in tok.items()}
        raise AssertionError(kind)

    _MODEL_FIELDS = {
        "ir_version": "int",
        "opset_import": "int_dict",
        "producer_name": "str",
        "producer_version": "str",
        "domain": "str",
        "model_version": "int",
        "doc_string": "str",
        "metadata_props": "str_dict",
    }
    _GRAPH_FIELDS = {"doc_string": "str", "metadata_props": "str_dict", "opset_import": "int_dict"}

    def _fields(self, d: dict, allowed: dict) -> dict:
        out = {}
        for key, pair in d.items():
            if key not in allowed:
                raise _Error(f"unknown field '{key}' (expected one of {', '.join(allowed)})", pair[0])
            out[key] = self._dict_value(pair, allowed[key])
        return out

    def model_head(self, c):
        return self._fields(c[0], self._MODEL_FIELDS)

    def with_props(self, c):
        return self._fields(c[0], self._GRAPH_FIELDS)

    # ---------------------------------------------------------------- types
    def dtype(self, c):
        tok = c[0]
        dt = DTYPES_BY_NAME.get(str(tok))
        if dt is None:
            raise _Error(f"unknown dtype '{tok}'", tok)
        return ir.TensorType(dt)

    def no_type(self, c):
        return None

    def seq_type(self, c):
        if c[0] is None:
            raise _Error("a sequence needs an element type")
        return ir.SequenceType(c[0])

    def opt_type(self, c):
        if c[0] is None:
            raise _Error("an optional needs an element type")
        return ir.OptionalType(c[0])

    def sparse_type(self, c):
        tok = c[0]
        dt = DTYPES_BY_NAME.get(str(tok))
        if dt is None:
            raise _Error(f"unknown dtype '{tok}'", tok)
        return ir.SparseTensorType(dt)

    def shape(self, c):
        if c == [None]:
            return ir.Shape([])
        dims = []
        for tok in c:
            t = tok.type
            if t == "INT":
                dims.append(_int64(tok))
            elif t == "QMARK":
                dims.append(ir.SymbolicDim(None))
            else:
                dims.append(ir.SymbolicDim(_name(tok)))
        return ir.Shape(dims)

    def type(self, c):
        return c  # [type, shape-or-None]

    def types(self, c):
        return c

    # ---------------------------------------------------------------- tensors
    def dense(self, c):
        if len(c) == 1 and isinstance(c[0], list):
            return ("dense", c[0], False)
        return ("dense", c, True)

    def dense_list(self, c):
        return [] if c == [None] else c

    def complex(self, c):
        return complex(float(c[0]), float(c[1]))

    def elided(self, c):
        return ("elided", c[0])

    def external(self, c):
        return ("external", c)

    def b64(self, c):
        return ("b64", c[0])

    def _make_tensor(self, typ, data, name: str | None, anchor):
        base, shape = typ
        if not isinstance(base, ir.TensorType):
            raise _Error("a constant must have a tensor type like f32[3]", anchor)
        dtype = base.dtype
        if shape is None:
            raise _Error("a constant needs a static shape like f32[3] or f32[] for a scalar", anchor)
        dims = []
        for d in shape:
            if not isinstance(d, int):
                raise _Error("a constant needs a static shape (integers only)", anchor)
            dims.append(d)
        count = 1
        for d in dims:
            count *= d
        kind = data[0]
        if kind == "dense":
            items, scalar = data[1], data[2]
            if scalar and dims:
                raise _Error(f"expected [{count} values] for shape {dims} but found a single value", items[0])
            if len(items) != count:
                anchor_tok = items[0] if items and isinstance(items[0], lark.Token) else anchor
                raise _Error(f"expected {count} values for shape {dims} but found {len(items)}", anchor_tok)
            return self._dense_tensor(dtype, dims, items, name, anchor)
        if kind == "elided":
            return ElidedTensor(dtype, ir.Shape(dims), data[1][len("sha256:") :], name=name)
        if kind == "b64":
            try:
                raw = base64.b64decode(_unquote_bytes(data[1]), validate=True)
            except ValueError:
                raise _Error("invalid base64 data", data[1]) from None
            expected = _nbytes(dtype, count)
            if expected is not None and len(raw) != expected:
                raise _Error(f"expected {expected} bytes of {dtype.name} data but found {len(raw)}", data[1])
            return ir.Tensor(_from_raw(raw, dtype, dims), dtype=dtype, name=name)
        if kind == "external":
            file_tok, off_tok, len_tok, hash_tok = data[1]
            location = _unquote(file_tok)
            base = self.base_dir if self.base_dir is not None else Path(".")
            path = inside_folder(base, location)
            if path is None:
                raise _Error(
                    f"sidecar data file '{location}' lies outside {base}{os.sep}, the text file's folder; "
                    "refusing to read it",
                    file_tok,
                )
            if not path.is_file():
                raise _Error(f"sidecar data file '{location}' not found in {base}", file_tok)
            if not _is_utf8(location):
                raise _Error(f"sidecar data file name '{location}' is not UTF-8, which ONNX needs", file_tok)
            offset, length = _int64(off_tok), _int64(len_tok)
            expected = _nbytes(dtype, count)
            if expected is not None and length != expected:
                raise _Error(
                    f"expected {expected} bytes of {dtype.name} data but length is {length}", len_tok
                )
            want = hash_tok[len("sha256:") :]
            if len(want) < MIN_DIGITS:
                raise _Error(
                    f"sha256 prefix '{want}' is too short: give at least {MIN_DIGITS} hex digits (--full "
                    "dumps carry all 64)",
                    hash_tok,
                )
            try:
                digest = _hash_range(path, offset, length)
            except OSError as err:
                raise _Error(
                    f"cannot read sidecar data file '{location}': {err.strerror or err}", file_tok
                ) from None
            if digest is None:
                raise _Error(
                    f"sidecar data file '{location}' is shorter than offset {offset} + length {length}",
                    file_tok,
                )
            if not digest.startswith(want):
                raise _Error(
                    f"sha256 of {location}[{offset}:{offset + length}] does not match "
                    "(the data file does not belong to this dump)",
                    hash_tok,
                )
            tensor = ir.ExternalTensor(
                location, offset, length, dtype, shape=ir.Shape(dims), name=name or "", base_dir=base
            )
            if name is None:
                tensor.name = None
            tensor.meta[HASH_KEY] = digest
            return tensor
        raise AssertionError(kind)

    def _dense_tensor(self, dtype, dims, items, name, anchor):
        if dtype == ir.DataType.STRING:
            vals = []
            for it in items:
                if not isinstance(it, lark.Token) or it.type != "STRING":
                    raise _Error("expected a string element", it if isinstance(it, lark.Token) else anchor)
                vals.append(_unquote_bytes(it))
            return ir.StringTensor(np.array(vals, dtype=object).reshape(dims), name=name)
        try:
            np_dtype = dtype.numpy()
        except Exception:
            raise _Error(f"dtype {dtype.name} has no dense form; use b64<...>", anchor) from None
        if dtype == ir.DataType.BOOL:
            vals = []
            for it in items:
                if not isinstance(it, lark.Token) or it.type not in ("TRUE", "FALSE"):
                    raise _Error("expected true or false", it if isinstance(it, lark.Token) else anchor)
                vals.append(it.type == "TRUE")
        elif dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128):
            vals = [it if isinstance(it, complex) else complex(float(it)) for it in items]
        else:
            is_float = dtype.is_floating_point()
            vals = []
            for it in items:
                if not isinstance(it, lark.Token) or it.type not in ("INT", "FLOAT"):
                    raise _Error(
                        f"expected a number for {dtype.name} data",
                        it if isinstance(it, lark.Token) else anchor,
                    )
                if is_float:
                    vals.append(float(it))
                elif it.type != "INT":
                    raise _Error(f"expected an integer for {dtype.name} data but found {it}", it)
                else:
                    value = int(it)
                    info = ml_dtypes.iinfo(np_dtype)  # numpy's iinfo knows no int4/int2
                    if not info.min <= value <= info.max:
                        raise _Error(
                            f"{it} does not fit in {DTYPE_NAMES[dtype]} ({info.min}..{info.max})", it
                        )
                    vals.append(value)
        try:
            arr = np.array(vals, dtype=np_dtype).reshape(dims)
        except (OverflowError, ValueError) as err:
            raise _Error(f"bad {dtype.name} data: {err}", anchor) from None
        return ir.Tensor(arr, dtype=dtype, name=name)

    def tensor_lit(self, c):
        typ, data, name_tok = c
        name = _unquote(name_tok) if name_tok is not None else None
        return self._make_tensor(typ, data, name, None)

    def type_lit(self, c):
        base, shape = c[0]
        return ir.TypeAndShape(base, shape)

    # ---------------------------------------------------------------- attributes
    def ref_attr(self, c):
        kind = ATTR_KINDS_BY_NAME.get(str(c[1]))
        if kind is None:
            raise _Error(f"unknown attribute kind '{c[1]}'", c[1])
        return ("ref", _unquote(c[0]), kind)

    def unset_attr(self, c):
        kind = ATTR_KINDS_BY_NAME.get(str(c[0]))
        if kind is None:
            raise _Error(f"unknown attribute kind '{c[0]}'", c[0])
        return ("unset", kind)

    def attr_list(self, c):
        return ("list", c)

    def attr(self, c):
        name_tok, v = c
        name = _name(name_tok)
        A = ir.AttributeType
        if isinstance(v, lark.Token):
            t = v.type
            if t == "INT":
                return ir.Attr(name, A.INT, _int64(v))
            if t == "FLOAT":
                return ir.Attr(name, A.FLOAT, float(v))
            if t == "STRING":
                return ir.Attr(name, A.STRING, _unquote(v))
            if t == "EMPTY_LIST":
                return ir.Attr(name, ATTR_KINDS_BY_NAME[str(v)[:-2]], [])
        if isinstance(v, ir.Graph):
            return ir.Attr(name, A.GRAPH, v)
        if isinstance(v, ir.TypeAndShape):
            return ir.Attr(name, A.TYPE_PROTO, v)
        if isinstance(v, tuple):
            if v[0] == "ref":
                return ir.RefAttr(name, v[1], v[2])
            if v[0] == "unset":
                return ir.Attr(name, v[1], None)
            if v[0] == "list":
                return self._list_attr(name, name_tok, v[1])
        if isinstance(v, ir.TensorProtocol) or hasattr(v, "dtype"):
            return ir.Attr(name, A.TENSOR, v)
        raise _Error(f"attribute {name}: unsupported value", name_tok)

    def _list_attr(self, name, name_tok, items):
        A = ir.AttributeType
        kinds = set()
        for it in items:
            if isinstance(it, lark.Token):
                kinds.add(it.type)
            elif isinstance(it, ir.Graph):
                kinds.add("graph")
            elif isinstance(it, ir.TypeAndShape):
                kinds.add("type")
            else:
                kinds.add("tensor")
        if kinds <= {"INT"}:
            return ir.Attr(name, A.INTS, [_int64(x) for x in items])
        if kinds <= {"INT", "FLOAT"}:
            return ir.Attr(name, A.FLOATS, [float(x) for x in items])
        if kinds == {"STRING"}:
            return ir.Attr(name, A.STRINGS, [_unquote(x) for x in items])
        if kinds == {"graph"}:
            return ir.Attr(name, A.GRAPHS, list(items))
        if kinds == {"type"}:
            return ir.Attr(name, A.TYPE_PROTOS, list(items))
        if kinds == {"tensor"}:
            return ir.Attr(name, A.TENSORS, list(items))
        raise _Error(f"attribute {name}: a list must hold elements of one kind", name_tok)

    def attrs(self, c):
        if c == [None]:
            return []
        return c

    # ---------------------------------------------------------------- graphs
    def param(self, c):
        return c  # [token, [type, shape]]

    def params(self, c):
        return [] if c == [None] else c

    def _declare_params(self, scope: _Scope, params):
        for tok, (typ, shape) in params:
            value = self.define(tok)
            value.type, value.shape = typ, shape
            if tok.type == "CONST":
                scope.const_inputs.add(value.name)
            scope.inputs.append(value)

    def graph_head(self, c):
        name_tok, ins, outs, props = c
        scope = self._push()
        self._declare_params(scope, ins)
        scope.out_decls = outs
        return (name_tok, props or {})

    def func_head(self, c):
        op, ins, outs, attr_params, props = c
        scope = self._push(is_function=True)
        self.pending_scopes.append(self.scope)
        self._declare_params(scope, ins)
        scope.out_decls = outs
        return (op, attr_params or [], props or {})

    def attrs_kw(self, c):
        return c[0]

    def const_stmt(self, c):
        tok, typ, data = c
        scope = self.scope
        name = _name(tok)
        if name in scope.values:
            value = scope.values[name]
            if name not in scope.const_inputs or value.const_value is not None:
                what = "constant" if value.const_value is not None else "value"
                raise _Error(f"{what} @{tok[1:]} is declared twice", tok)
            tensor = self._make_tensor(typ, data, name, tok)
            value.const_value = tensor
        else:
            value = self.define(tok)
            tensor = self._make_tensor(typ, data, name, tok)
            value.const_value = tensor
            value.type = ir.TensorType(tensor.dtype)
            value.shape = ir.Shape(list(tensor.shape))
        scope.inits.append(value)

    def return_stmt(self, c):
        if self.scope.ret is not None:
            raise _Error("a graph has one return", c[0] if c else None)
        self.scope.ret = c[0]

    def refs(self, c):
        return [] if c == [None] else c

    def outs(self, c):
        return c

    def op(self, c):
        domain_tok, name_tok, *extra = c
        domain = _name(domain_tok) if domain_tok is not None else ""
        overload, version = "", None
        if extra and extra[0] is not None:
            for key, (ktok, vtok) in extra:
                if key == "overload":
                    overload = self._dict_value((ktok, vtok), "str")
                elif key == "version":
                    version = self._dict_value((ktok, vtok), "int")
                else:
                    raise _Error(f"unknown operator option '{key}' (expected overload or version)", ktok)
        return (domain, _name(name_tok), overload, version, name_tok)

    def loc(self, c):
        return c

    def fused(self, c):
        return ",".join(str(int(t[1:])) for t in c)

    def meta(self, c):
        return {k: self._dict_value(v, "str") for k, v in c[0].items()}

    def node_stmt(self, c):
        outs, op, refs, attrs, types, loc, meta = c
        domain, op_type, overload, version, op_tok = op
        inputs = [self.lookup(t) for t in refs]
        outputs = [self.define(t) for t in outs] if outs else []
        if types is not None:
            if len(types) != len(outputs):
                raise _Error(f"{op_type} has {len(outputs)} outputs but {len(types)} types", op_tok)
            for value, (typ, shape) in zip(outputs, types):
                value.type, value.shape = typ, shape
        props = {}
        name = None
        if loc is not None:
            name_tok, id_tok, fused = loc
            if name_tok is not None:
                name = _unquote(name_tok)
            if id_tok is not None:
                props[ids.ID_KEY] = str(int(id_tok[1:]))
            if fused is not None:
                props[ids.FUSED_KEY] = fused
        if meta:
            for k, v in meta.items():
                if k in props:
                    raise _Error(f"metadata '{k}' given twice", op_tok)
                props[k] = v
        node = ir.Node(
            domain,
            op_type,
            inputs,
            attrs or (),
            overload=overload,
            outputs=outputs,
            version=version,
            name=name,
            metadata_props=props or None,
        )
        self.scope.nodes.append(node)

    def _close(self, anchor):
        scope = self.scope
        if scope.ret is None:
            raise _Error("graph has no return statement", anchor)
        outputs = [self.lookup(t) if t.type != "NONE" else None for t in scope.ret]
        if scope.parent is None and scope.pending:
            name, (value, tok) = next(iter(scope.pending.items()))
            raise _Error(f"undefined value {tok}", tok)
        if any(o is None for o in outputs):
            raise _Error("a graph output cannot be none", anchor)
        if len(outputs) != len(scope.out_decls):
            raise _Error(
                f"graph declares {len(scope.out_decls)} outputs but returns {len(outputs)}",
                scope.ret[0] if scope.ret else anchor,
            )
        for value, (tok, (typ, shape)) in zip(outputs, scope.out_decls):
            if _name(tok) != value.name:
                raise _Error(f"output {tok} is declared but {value.name!r} is returned", tok)
            value.type, value.shape = typ, shape
        for name in scope.const_inputs:
            if scope.values[name].const_value is None:
                raise _Error(f"input @{name} has no const declaration", anchor)
        self.scope = scope.parent
        if scope.pending:
            if self.scope is None:
                name, (value, tok) = next(iter(scope.pending.items()))
                raise _Error(f"undefined value {tok}", tok)
            for name, item in scope.pending.items():
                self.scope.pending.setdefault(name, item)
        return scope, outputs

    def graph(self, c):
        name_tok, props = c[0]
        scope, outputs = self._close(name_tok)
        return ir.Graph(
            scope.inputs,
            outputs,
            nodes=scope.nodes,
            initializers=scope.inits,
            name=_name(name_tok) if name_tok is not None else None,
            doc_string=props.get("doc_string"),
            opset_imports=props.get("opset_import"),
            metadata_props=props.get("metadata_props"),
        )

    def function(self, c):
        op, attr_params, props = c[0]
        domain, name, overload, version, op_tok = op
        scope, outputs = self._close(op_tok)
        graph = ir.Graph(
            scope.inputs,
            outputs,
            nodes=scope.nodes,
            name=name,
            doc_string=props.get("doc_string"),
            opset_imports=props.get("opset_import"),
            metadata_props=props.get("metadata_props"),
        )
        fn = ir.Function(domain, name, overload, graph=graph, attributes=attr_params)
        return fn

    def start(self, c):
        fields, graph, *functions = c
        if "ir_version" not in fields:
            raise _Error("the model header needs ir_version")
        if fields.get("opset_import"):
            graph.opset_imports.update(fields["opset_import"])
        model = ir.Model(
            graph,
            ir_version=fields["ir_version"],
            producer_name=fields.get("producer_name"),
            producer_version=fields.get("producer_version"),
            domain=fields.get("domain"),
            model_version=fields.get("model_version"),
            doc_string=fields.get("doc_string"),
            functions=functions,
            metadata_props=fields.get("metadata_props"),
        )
        return model


def _nbytes(dtype: ir.DataType, count: int) -> int | None:
    if dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED):
        return None
    return (dtype.bitwidth * count + 7) // 8


def _from_raw(raw: bytes, dtype: ir.DataType, dims: list[int]) -> np.ndarray:
    np_dtype = dtype.numpy()
    bits = dtype.bitwidth
    data = np.frombuffer(raw, dtype=np.uint8)
    if bits == 4:
        return _type_casting.unpack_4bitx2(data, dims).view(np_dtype)
    if bits == 2:
        return _type_casting.unpack_2bitx4(data, dims).view(np_dtype)
    if bits == 6:
        return _type_casting.unpack_6bit(data, dims).view(np_dtype)
    arr = np.frombuffer(raw, dtype=np.dtype(np_dtype).newbyteorder("<"))
    return arr.astype(np_dtype, copy=False).reshape(dims)


def _hash_range(path: Path, offset: int, length: int) -> str | None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        remaining = length
        while remaining:
            block = f.read(min(CHUNK, remaining))
            if not block:
                return None
            h.update(block)
            remaining -= len(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------- fast path
#
# Most lines of a dump are plain node statements. Lark's LALR parser costs some
# 30 us per token in pure Python, so before it runs, runs of lines that match
# the regular expression below exactly (the printer's own spacing, no quoted
# names with escapes, no overload/version/meta/fused, only numbers, number
# lists and plain strings as attributes, integers of at most 18 digits so that
# they always fit in 64 bits) are replaced by one FAST_NODES token
# (line count kept, so positions stay right); its callback builds those nodes
# from the saved matches, in order, through the same scope logic.

_B = r'(?:[A-Za-z0-9_.]+|"[^"\\\n]*")'
_ID = r"[A-Za-z_][A-Za-z0-9_.]*"
_NUM = r"[+-]?(?:[0-9]+\.[0-9]*(?:e[+-]?[0-9]+)?|[0-9]+e[+-]?[0-9]+|inf|nan|[0-9]{1,18})"
_AVAL = rf'(?:{_NUM}|\[{_NUM}(?:, {_NUM})*\]|"[^"\\\n]*")'
_TYPE = rf"(?:\?|[a-z][a-z0-9]*)(?:\[(?:(?:[0-9]{{1,18}}|{_ID}|\?)(?:,(?:[0-9]{{1,18}}|{_ID}|\?))*)?\])?"
_FAST_NODE = re.compile(
    rf"[ \t]*(?:(?P<outs>(?:%{_B}|none)(?:, (?:%{_B}|none))*) = )?"
    rf"(?:(?P<dom>{_ID})::)?(?P<op>{_ID})"
    rf"\((?P<ins>(?:[%@]{_B}|none)(?:, (?:[%@]{_B}|none))*)?\)"
    rf"(?: \{{(?P<attrs>{_ID} = {_AVAL}(?:, {_ID} = {_AVAL})*)\}})?"
    rf"(?: : (?P<types>{_TYPE}(?:, {_TYPE})*))?"
    rf'(?:  loc\((?:(?P<name>"[^"\\\n]*")(?: (?=#)|(?=\))))?(?:#(?P<id>[0-9]+))?\))?[ \t]*'
)
_ATTR_ITEM = re.compile(rf"({_ID}) = ({_AVAL})")
_SPLIT_REF = re.compile(rf"[%@]{_B}|none")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_NOT_AFTER = frozenset(",=([:<->")


class _Tok(str):
    """A light token (like lark's) for names found by the fast path."""

    __slots__ = ("type", "line", "column")


def _tok(text: str, type_: str, line: int, column: int) -> _Tok:
    t = _Tok(text)
    t.type, t.line, t.column = type_, line, column
    return t


def _fast_split(text: str) -> tuple[str, list[list]]:
    """Replace runs of simple node lines with FAST_NODES tokens; return the new text and the runs."""
    from ncc.ir.printer import KEYWORDS

    lines = text.split("\n")
    runs: list[list] = []
    current: list | None = None
    prev_end = ""
    match = _FAST_NODE.fullmatch
    for i, line in enumerate(lines):
        stripped = line.rstrip()
        if not stripped:
            continue
        m = match(line) if prev_end not in _NOT_AFTER and prev_end else None
        if m is not None and (m.group("op") in KEYWORDS or (m.group("dom") or "") in KEYWORDS):
            m = None
        if m is not None:
            if current is None:
                current = [i]
                runs.append(current)
                lines[i] = f"$fast{len(runs) - 1}"
            else:
                lines[i] = ""
            current.append((i + 1, m))
        else:
            current = None
        prev_end = stripped[-1]
    return "\n".join(lines), runs


# ------------------------------------------------------------------------------- lark plumbing


@functools.lru_cache(maxsize=1)
def _terminal_names() -> dict[str, str]:
    parser, _ = _parser()
    names = {}
    for term in parser.terminals:
        pattern = term.pattern
        if isinstance(pattern, lark.lexer.PatternStr):
            names[term.name] = f"'{pattern.value}'"
    names.update(
        VALUE="a value (%name)",
        CONST="a constant (@name)",
        INT="an integer",
        FLOAT="a float",
        STRING="a string",
        IDENT="a name",
        NODE_ID="a node id (#N)",
        HASH="a hash (sha256:...)",
        EMPTY_LIST="an empty list",
        QMARK="'?'",
        FAST_NODES="a node",
        NONE="'none'",
        TRUE="'true'",
        FALSE="'false'",
        **{"$END": "end of input"},
    )
    return names


def _describe_expected(expected) -> str:
    names = _terminal_names()
    items = sorted({names.get(e, e) for e in expected})
    if len(items) > 6:
        items = items[:6] + ["..."]
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " or " + items[-1]


def _describe_token(tok) -> str:
    if tok.type == "$END":
        return "end of input"
    return repr(str(tok)) if len(str(tok)) < 40 else repr(str(tok)[:37] + "...")


class _Dispatch(lark.Transformer):
    """The transformer bound into the cached parser; forwards each rule to the current builder."""

    def __init__(self):
        super().__init__(visit_tokens=False)
        self.local = threading.local()


def _forwarder(rule: str):
    def forward(self, children):
        return getattr(self.local.builder, rule)(children)

    forward.__name__ = rule
    return forward


_RULES = [
    name
    for name, member in vars(_Builder).items()
    if callable(member) and not name.startswith("_") and name not in ("lookup", "define")
]
for _rule in _RULES:
    setattr(_Dispatch, _rule, _forwarder(_rule))


@functools.lru_cache(maxsize=1)
def _parser() -> tuple[lark.Lark, _Dispatch]:
    dispatch = _Dispatch()
    parser = lark.Lark(_GRAMMAR.read_text(), parser="lalr", transformer=dispatch, maybe_placeholders=True)
    return parser, dispatch


def _source_line(text: str, line: int) -> str:
    lines = text.splitlines()
    return lines[line - 1] if 0 < line <= len(lines) else ""


def parse(text: str, *, filename: str = "<string>", base_dir: Path | None = None) -> ir.Model:
    """Parse ncc text into a model; ``base_dir`` resolves sidecar data files."""
    parser, dispatch = _parser()
    previous = getattr(dispatch.local, "builder", None)
    dispatch.local.builder = _Builder(Path(base_dir) if base_dir is not None else None)

    def fail(message: str, line: int, column: int):
        raise ParseError(
            message, filename=filename, line=line, column=column, source_line=_source_line(text, line)
        ) from None

    fast_text, dispatch.local.builder.fast_runs = _fast_split(text) if USE_FAST_PATH else (text, [])
    try:
        return parser.parse(fast_text)
    except RecursionError:
        raise NccError(f"{filename}: nesting too deep to parse.") from None
    except _Error as err:
        tok = err.token
        if tok is not None and getattr(tok, "line", None) is not None:
            fail(err.message, tok.line, tok.column)
        last = text.rstrip("\n").count("\n") + 1
        fail(err.message, last, 1)
    except lark.exceptions.UnexpectedToken as err:
        tok = err.token
        if tok.type == "FAST_NODES":  # a node line where none can stand
            line = tok.line
            fail(
                f"expected {_describe_expected(err.accepts or err.expected)} but found a node statement",
                line,
                len(_source_line(text, line)) - len(_source_line(text, line).lstrip()) + 1,
            )
        if tok.type == "$END":
            last = text.rstrip("\n").count("\n") + 1
            fail(
                f"expected {_describe_expected(err.accepts or err.expected)} but found end of input",
                last,
                len(_source_line(text, last)) + 1,
            )
        fail(
            f"expected {_describe_expected(err.accepts or err.expected)} but found {_describe_token(tok)}",
            tok.line,
            tok.column,
        )
    except lark.exceptions.UnexpectedCharacters as err:
        ch = text[err.pos_in_stream] if err.pos_in_stream < len(text) else ""
        if ch == '"':
            msg = "unterminated string"
        else:
            allowed = getattr(err, "allowed", None)
            msg = f"unexpected character {ch!r}"
            if allowed:
                msg += f" (expected {_describe_expected(allowed)})"
        fail(msg, err.line, err.column)
    except lark.exceptions.UnexpectedEOF as err:
        last = text.rstrip("\n").count("\n") + 1
        fail(f"expected {_describe_expected(err.expected)} but found end of input", last, 1)
    except lark.exceptions.VisitError as err:
        inner = err.orig_exc
        if isinstance(inner, _Error):
            tok = inner.token
            if tok is not None:
                fail(inner.message, tok.line, tok.column)
            fail(inner.message, 1, 1)
        raise
    finally:
        dispatch.local.builder = previous


def parse_file(path: str | os.PathLike) -> ir.Model:
    """Parse a ``.ncc`` file; sidecar data files are looked up beside it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NccError(f"{path}: no such file.") from None
    except UnicodeDecodeError:
        raise NccError(f"{path}: not a text file (not UTF-8).") from None
    return parse(text, filename=str(path), base_dir=path.parent)


_EXTERNAL_FILE = re.compile(r'\bexternal\s*<\s*("(?:[^"\\\n]|\\.)*")')


def sidecar_files(path: str | os.PathLike) -> list[Path]:
    """The sidecar data files the ``.ncc`` file at ``path`` names in ``external<...>``, each once
    (beside it, as parsing reads them); found by a scan of the text, without parsing it."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    names = dict.fromkeys(_unquote(_tok(m.group(1), "STRING", 0, 0)) for m in _EXTERNAL_FILE.finditer(text))
    return [path.parent / name for name in names]
