"""Pipeline spec strings: ``fold-constants,insert-qdq{scheme=sym granularity=per-channel}``.

Grammar (xDSL style)::

    pipeline := entry ("," entry)*
    entry    := NAME ("{" (KEY "=" value)* "}")?        options separated by spaces
    value    := item ("," item)*  |  "()"               a list; "()" is the empty list
    item     := BARE | "quoted \\"string\\"" | 'quoted'

Commas inside ``{}`` belong to the option's value. Option keys are the
dataclass field names, written kebab-case (``max-sweeps``; ``max_sweeps`` is
accepted too). Values are converted and checked against the field's type
annotation: ``int``, ``float``, ``bool`` (``true``/``false``), ``str``,
``Literal[...]``, ``tuple[T, ...]`` / ``tuple[T1, T2]`` and ``X | None``
(``none``). A pipeline name (:mod:`ncc.passes.pipelines`) expands in place.

``format_pipeline`` prints the canonical form (options equal to their
default left out, in field order), so ``parse_pipeline(format_pipeline(x)) == x``
and formatting a parsed spec is idempotent.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Union

from ncc.errors import PassSpecError
from ncc.passes.base import Pass

_NAME_CHARS = re.compile(r"[^\s,{}=\"']+")
_KEY_CHARS = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_BARE_ITEM = re.compile(r"[^\s,{}=\"'()]+")
_BARE_OK = re.compile(r"[^\s,{}=\"'()]+\Z")
_EMPTY_LIST = "()"


# -- parsing -------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    text: str
    quoted: bool


@dataclass(frozen=True)
class _Entry:
    name: str
    options: dict[str, tuple[_Item, ...]]  # key as written -> items (empty tuple = "()")
    column: int


def parse_pipeline(spec: str) -> list[Pass]:
    """Parse a pipeline spec into pass instances (pipeline names expanded)."""
    return _parse(spec, ())


def parse_pass(spec: str) -> Pass:
    """Parse a spec naming exactly one pass."""
    passes = parse_pipeline(spec)
    if len(passes) != 1:
        raise PassSpecError(f"expected one pass, got {len(passes)} in '{spec}'.")
    return passes[0]


def _parse(spec: str, expanding: tuple[str, ...]) -> list[Pass]:
    from ncc.passes.pipelines import PIPELINES
    from ncc.passes.registry import _registry, get_pass

    passes: list[Pass] = []
    for entry in _Scanner(spec).pipeline():
        if entry.name in PIPELINES and entry.name not in _registry:
            if entry.options:
                raise PassSpecError(
                    f"pipeline '{entry.name}' takes no options; give options to its passes instead."
                )
            if entry.name in expanding:
                cycle = " -> ".join((*expanding, entry.name))
                raise PassSpecError(f"pipeline '{entry.name}' includes itself ({cycle}).")
            passes.extend(_parse(PIPELINES[entry.name], (*expanding, entry.name)))
            continue
        passes.append(_instantiate(get_pass(entry.name), entry))
    return passes


class _Scanner:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, message: str, pos: int | None = None) -> PassSpecError:
        pos = self.pos if pos is None else pos
        return PassSpecError(
            f"malformed pass pipeline at column {pos + 1}: {message}.\n  {self.text}\n  {' ' * pos}^"
        )

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def pipeline(self) -> list[_Entry]:
        entries: list[_Entry] = []
        self.skip_ws()
        if not self.peek():
            return entries
        while True:
            entries.append(self.entry())
            self.skip_ws()
            ch = self.peek()
            if not ch:
                return entries
            if ch != ",":
                raise self.error(f"expected ',' or the end after pass '{entries[-1].name}', found {ch!r}")
            self.pos += 1
            self.skip_ws()

    def entry(self) -> _Entry:
        start = self.pos
        m = _NAME_CHARS.match(self.text, self.pos)
        if not m:
            found = repr(self.peek()) if self.peek() else "the end"
            raise self.error(f"expected a pass name, found {found}")
        self.pos = m.end()
        name = m.group()
        self.skip_ws()
        options: dict[str, tuple[_Item, ...]] = {}
        if self.peek() == "{":
            self.pos += 1
            while True:
                self.skip_ws()
                ch = self.peek()
                if ch == "}":
                    self.pos += 1
                    break
                if not ch:
                    raise self.error(f"missing '}}' closing the options of pass '{name}'")
                key_pos = self.pos
                km = _KEY_CHARS.match(self.text, self.pos)
                if not km:
                    raise self.error(f"expected an option name in the options of pass '{name}', found {ch!r}")
                key = km.group()
                self.pos = km.end()
                if self.peek() != "=":
                    raise self.error(f"expected '=' after option '{key}' of pass '{name}'")
                self.pos += 1
                if key in options or key.replace("-", "_") in {k.replace("-", "_") for k in options}:
                    raise self.error(f"option '{key}' given twice for pass '{name}'", key_pos)
                options[key] = self.value(name, key)
                if self.peek() not in ("}", "") and not self.peek().isspace():
                    raise self.error(
                        f"expected a space or '}}' after the value of option '{key}' of pass '{name}'"
                    )
        return _Entry(name, options, start)

    def value(self, name: str, key: str) -> tuple[_Item, ...]:
        if self.text.startswith(_EMPTY_LIST, self.pos):
            self.pos += len(_EMPTY_LIST)
            return ()
        items = [self.item(name, key)]
        while self.peek() == ",":
            self.pos += 1
            items.append(self.item(name, key))
        return tuple(items)

    def item(self, name: str, key: str) -> _Item:
        ch = self.peek()
        if ch in ("'", '"'):
            start = self.pos
            self.pos += 1
            out: list[str] = []
            while True:
                c = self.peek()
                if not c:
                    raise self.error(f"unterminated string in option '{key}' of pass '{name}'", start)
                self.pos += 1
                if c == "\\" and self.peek():
                    out.append(self.peek())
                    self.pos += 1
                elif c == ch:
                    return _Item("".join(out), True)
                else:
                    out.append(c)
        m = _BARE_ITEM.match(self.text, self.pos)
        if not m:
            found = repr(ch) if ch else "the end"
            raise self.error(f"expected a value for option '{key}' of pass '{name}', found {found}")
        self.pos = m.end()
        return _Item(m.group(), False)


def _instantiate(cls: type[Pass], entry: _Entry) -> Pass:
    fields = {f.name: f for f in cls.options()}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, items in entry.options.items():
        field_name = key.replace("-", "_")
        if field_name not in fields:
            raise PassSpecError(unknown_option_message(cls, key))
        kwargs[field_name] = convert(items, hints.get(field_name, Any), cls.name, option_key(field_name))
    for f in fields.values():
        if (
            f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise PassSpecError(f"pass '{cls.name}' needs option '{option_key(f.name)}'.")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise PassSpecError(f"invalid options for pass '{cls.name}': {err}") from None


def unknown_option_message(cls: type[Pass], key: str) -> str:
    valid = [option_key(f.name) for f in cls.options()]
    if not valid:
        return f"pass '{cls.name}' has no option '{key}'; it takes no options."
    import difflib  # only for a misspelt name

    close = difflib.get_close_matches(key.replace("_", "-"), valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    return f"pass '{cls.name}' has no option '{key}'{hint} Valid options: {', '.join(valid)}."


def option_key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # annotations naming something not importable: fall back to what is there
        return {f.name: f.type for f in dataclasses.fields(cls) if not isinstance(f.type, str)}


# -- value conversion --------------------------------------------------------------


class _Bad(Exception):
    """A value does not fit its type; ``args[0]`` describes what was expected."""


def convert(items: tuple[Any, ...], annotation: Any, pass_name: str, key: str) -> Any:
    """Convert the parsed ``items`` of one option to ``annotation``; a mismatch is a PassSpecError."""
    items = tuple(i if isinstance(i, _Item) else _Item(str(i), False) for i in items)
    try:
        return _convert(items, annotation)
    except _Bad as bad:
        got = _render_items(items)
        raise PassSpecError(
            f"option '{key}' of pass '{pass_name}' must be {bad.args[0]}; got {got}."
        ) from None


def _render_items(items: tuple[_Item, ...]) -> str:
    if not items:
        return "an empty list"
    return "'" + ",".join(i.text for i in items) + "'"


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType)


def _convert(items: tuple[_Item, ...], annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if _is_union(annotation):
        args = typing.get_args(annotation)
        if type(None) in args and len(items) == 1 and not items[0].quoted and items[0].text == "none":
            return None
        options = [a for a in args if a is not type(None)]
        for arg in options:
            try:
                return _convert(items, arg)
            except _Bad:
                pass
        expected = " or ".join(_describe_type(a) for a in options)
        raise _Bad(expected + (" or none" if type(None) in args else ""))
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            try:
                return tuple(_convert_one(i, args[0]) for i in items)
            except _Bad:
                raise _Bad(_describe_type(annotation)) from None
        if len(items) != len(args):
            raise _Bad(_describe_type(annotation))
        try:
            return tuple(_convert_one(i, a) for i, a in zip(items, args))
        except _Bad:
            raise _Bad(_describe_type(annotation)) from None
    if annotation is tuple:
        return tuple(_convert_one(i, Any) for i in items)
    if len(items) != 1:
        raise _Bad(_describe_type(annotation) + " (a single value, not a list)")
    return _convert_one(items[0], annotation)


def _convert_one(item: _Item, annotation: Any) -> Any:
    text = item.text
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        for choice in choices:
            if isinstance(choice, bool):
                if not item.quoted and text == _format_scalar(choice):
                    return choice
            elif isinstance(choice, str):
                if text == choice:
                    return choice
            else:
                try:
                    if _convert_one(_Item(text, item.quoted), type(choice)) == choice:
                        return choice
                except _Bad:
                    pass
        raise _Bad(_describe_type(annotation))
    if _is_union(annotation) or typing.get_origin(annotation) is tuple:
        return _convert((item,), annotation)
    if annotation is bool:
        if not item.quoted and text in ("true", "false"):
            return text == "true"
        raise _Bad("true or false")
    if annotation is int:
        if item.quoted or not re.fullmatch(r"[+-]?\d+", text):
            raise _Bad("an integer")
        return int(text)
    if annotation is float:
        if item.quoted:
            raise _Bad("a number")
        try:
            return float(text)
        except ValueError:
            raise _Bad("a number") from None
    if annotation is str:
        return text
    if annotation is Any or annotation is object:
        return text if item.quoted else _guess(text)
    raise _Bad(f"a {_describe_type(annotation)} (an option type spec strings cannot express)")


def _guess(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    if text == "none":
        return None
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _describe_type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(_format_scalar(c) for c in typing.get_args(annotation))
    if _is_union(annotation):
        args = typing.get_args(annotation)
        text = " or ".join(_describe_type(a) for a in args if a is not type(None))
        return text + (" or none" if type(None) in args else "")
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a comma-separated list of {_plural(args[0])}"
        return f"a comma-separated list of {len(args)} values ({', '.join(_describe_type(a) for a in args)})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def _plural(annotation: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans (true/false)"}.get(
        annotation, f"values ({_describe_type(annotation)})"
    )


def type_name(annotation: Any) -> str:
    """A short spelling of an option's type for ``ncc passes``: ``int``, ``sym|asym``, ``list[str]``."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "|".join(_format_scalar(c) for c in typing.get_args(annotation))
    if _is_union(annotation):
        args = typing.get_args(annotation)
        return " | ".join(type_name(a) if a is not type(None) else "none" for a in args)
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{type_name(args[0])}]"
        return f"({', '.join(type_name(a) for a in args)})"
    return getattr(annotation, "__name__", str(annotation))


# -- formatting -----------------------------------------------------------------


def format_pipeline(passes: Iterable[Pass]) -> str:
    """The canonical spec string of ``passes``."""
    return ",".join(format_pass(p) for p in passes)


def format_pass(p: Pass) -> str:
    """``name`` or ``name{key=value ...}`` with the options that differ from their default, in field order."""
    parts = []
    for f in type(p).options():
        value = getattr(p, f.name)
        if f.default is not dataclasses.MISSING and _same(value, f.default):
            continue
        if f.default_factory is not dataclasses.MISSING and _same(value, f.default_factory()):
            continue
        parts.append(f"{option_key(f.name)}={format_value(value)}")
    return f"{p.name}{{{' '.join(parts)}}}" if parts else p.name


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b or (isinstance(a, float) and isinstance(b, float) and a == b)


def format_value(value: Any) -> str:
    """A value as it appears after ``key=`` in a spec string."""
    if isinstance(value, (tuple, list, frozenset, set)):
        items = sorted(value) if isinstance(value, (frozenset, set)) else value
        return ",".join(_format_scalar(v) for v in items) if items else _EMPTY_LIST
    return _format_scalar(value)


def _format_scalar(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)
    text = str(value)
    if _BARE_OK.match(text) and text != "none":
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def describe_pass(cls: type[Pass]) -> str:
    """``name  doc`` and one indented line per option (``key: type [bounds] = default  doc``), for
    ``ncc passes``."""
    lines = [f"{cls.name}  {cls.doc()}".rstrip()]
    hints = _hints(cls)
    for f in cls.options():
        default = "" if f.default is dataclasses.MISSING else f" = {format_value(f.default)}"
        doc = f.metadata.get("doc", "")
        annotation = hints.get(f.name, f.type)
        bounds = f" {f.metadata['bounds'].notation()}" if "bounds" in f.metadata else ""
        lines.append(f"    {option_key(f.name)}: {type_name(annotation)}{bounds}{default}  {doc}".rstrip())
    return "\n".join(lines)


def with_options(passes: list[Pass], options: dict[str, str | tuple[str, ...]]) -> list[Pass]:
    """Set options on every pass of a pipeline that has them (how CLI flags reach passes).

    ``options`` maps an option (field) name to its value in spec syntax (a
    tuple for list options); each value is converted and checked exactly as in
    a spec string. A key no pass in the pipeline takes is an error naming the
    pipeline.
    """
    used: set[str] = set()
    out: list[Pass] = []
    for p in passes:
        fields = {f.name for f in p.options()}
        updates = {}
        for key, text in options.items():
            if key in fields:
                items = (text,) if isinstance(text, str) else text
                value = ",".join(_quote(t) for t in items) if items else "()"
                fresh = parse_pass(f"{p.name}{{{option_key(key)}={value}}}")
                updates[key] = getattr(fresh, key)
                used.add(key)
        out.append(dataclasses.replace(p, **updates) if updates else p)
    unused = [k for k in options if k not in used]
    if unused:
        raise PassSpecError(
            f"option '{option_key(unused[0])}' does not apply to any pass of the pipeline {format_pipeline(passes)}."
        )
    return out


def _quote(text: str) -> str:
    """``text`` as one spec value: bare when it is a plain word, else double-quoted."""
    if text and all(c.isalnum() or c in "-_." for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
