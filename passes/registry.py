"""Where pass names come from.

Three sources, looked up lazily on the first :func:`get_pass` / :func:`all_passes`:

- built-in passes: every module of the family packages (``ncc.passes.cleanup``,
  ``ncc.passes.fusion``, ``quant``, ``packing``, ``woq``: :data:`BUILTIN_FAMILIES`),
  found with :mod:`pkgutil`, so a new module registers without edits here. A name
  is first looked for in the module its spelling names (``round-weights`` in
  ``quant.round_weights``, ``woq-rtn`` in ``woq.rtn``): a pipeline imports only the
  passes it runs (``ncc compile`` starts 0.05-0.1 s sooner); any other name, and
  :func:`all_passes`, imports them all;
- installed plugins: the entry-point group ``ncc.passes``; an entry point
  loads a module (whose passes register on import) or one Pass class;
- plugin files: :func:`load_plugin` imports a ``.py`` file by path
  (``ncc --plugin path.py``).

A pass registers itself when its class is defined (``Pass.__init_subclass__``
calls :func:`register`). Two different classes claiming one name is an error
naming both origins.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ncc.errors import NccError, PassSpecError

if TYPE_CHECKING:
    from ncc.passes.base import Pass

#: Packages whose modules hold the built-in passes, one pass per module.
BUILTIN_FAMILIES = ("cleanup", "fusion", "quant", "sparsity", "packing", "woq", "lowering")
ENTRY_POINT_GROUP = "ncc.passes"
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9]*(?:[-_.:][a-z0-9]+)*\Z")

_registry: dict[str, type[Pass]] = {}
_builtins_loaded = False
_entry_points_loaded = False


def register(cls: type[Pass]) -> type[Pass]:
    """Register ``cls`` under ``cls.name``; re-defining the same class (same module and name) replaces it."""
    from ncc.passes.pipelines import PIPELINES

    name = cls.name
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise NccError(
            f"pass class {_describe(cls)} has an invalid name {name!r}: use lowercase words joined by '-' (kebab-case)."
        )
    if name in PIPELINES:
        raise NccError(f"pass name '{name}' ({_describe(cls)}) is already the name of a pipeline.")
    existing = _registry.get(name)
    if existing is not None and existing is not cls and not _same_definition(existing, cls):
        raise NccError(f"pass '{name}' is defined twice: by {_describe(existing)} and by {_describe(cls)}.")
    _registry[name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget a pass (tests and failed plugin loads)."""
    _registry.pop(name, None)


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; an unknown name is a :class:`PassSpecError` with suggestions."""
    cls = _registry.get(name)
    if cls is None and not _builtins_loaded:
        _load_named(name)
        cls = _registry.get(name)
    if cls is None:
        _load_all()
        cls = _registry.get(name)
    if cls is None:
        raise PassSpecError(unknown_pass_message(name))
    return cls


def all_passes() -> dict[str, type[Pass]]:
    """Every known pass, built-ins and plugins, sorted by name."""
    _load_all()
    return dict(sorted(_registry.items()))


def unknown_pass_message(name: str) -> str:
    from ncc.passes.pipelines import PIPELINES

    names = sorted(all_passes())
    known = names + sorted(PIPELINES)
    import difflib  # only for a misspelt name

    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    listing = ", ".join(names) if names else "(none)"
    return f"unknown pass '{name}'{hint} Valid passes: {listing}; pipelines: {', '.join(sorted(PIPELINES))}."


def _load_all() -> None:
    global _builtins_loaded, _entry_points_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        load_builtins()
    if not _entry_points_loaded:
        _entry_points_loaded = True
        load_entry_points()


def _load_named(name: str) -> None:
    """Import the built-in module whose name spells the pass ``name``, if one exists: ``<family>.<stem>``
    with ``stem`` the name in snake case, or without its family prefix (``woq-rtn``: ``woq.rtn``)."""
    import importlib.util

    stem = name.replace("-", "_")
    prefix, _, rest = stem.partition("_")
    for family in BUILTIN_FAMILIES:
        for module in (stem, rest) if prefix == family and rest else (stem,):
            full = f"ncc.passes.{family}.{module}"
            if importlib.util.find_spec(full) is not None:
                importlib.import_module(full)
                return


def load_builtins() -> None:
    """Import every module of the built-in pass families."""
    for family in BUILTIN_FAMILIES:
        package_name = f"ncc.passes.{family}"
        package = importlib.import_module(package_name)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")


def load_entry_points() -> list[type[Pass]]:
    """Load the installed plugins of the ``ncc.passes`` entry-point group; returns their passes."""
    import importlib.metadata  # 5 ms of imports, for a command that lists or misses a pass

    loaded: list[type[Pass]] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point '{ep.name} = {ep.value}' (group {ENTRY_POINT_GROUP})"
        before = dict(_registry)
        try:
            obj = ep.load()
        except NccError as err:
            raise NccError(f"cannot load pass plugin {where}: {err}") from err
        except Exception as err:  # a broken plugin is the user's error, not ncc's
            raise NccError(f"cannot load pass plugin {where}: {type(err).__name__}: {err}.") from err
        if isinstance(obj, ModuleType):
            passes = _new_passes(before) + [c for c in _passes_in_module(obj) if c not in before.values()]
        elif _is_pass_class(obj):
            register(obj)
            passes = [obj] if before.get(obj.name) is not obj else []
        else:
            raise NccError(f"pass plugin {where} loaded {obj!r}, which is neither a module nor a Pass class.")
        for cls in dict.fromkeys(passes):
            cls.origin = f"entry point {ep.name} ({ep.value})"
            loaded.append(cls)
    return loaded


def load_plugin(path: str | Path) -> list[type[Pass]]:
    """Import the plugin file ``path`` and return the passes it defines (their ``origin`` is the path)."""
    _load_all()  # so a plugin redefining a built-in name is reported here
    path = Path(path)
    if not path.is_file():
        raise NccError(f"{path}: no such plugin file." if not path.exists() else f"{path}: is not a file.")
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise NccError(f"{path}: cannot read plugin ({err}).") from None
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as err:
        raise NccError(f"{path}:{err.lineno}:{err.offset}: syntax error in plugin: {err.msg}.") from None
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"ncc_plugin_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{digest}"
    module = ModuleType(module_name)
    module.__file__ = str(path)
    before = dict(_registry)
    old_module = sys.modules.get(module_name)
    sys.modules[module_name] = module  # dataclasses look the module up while the class is built
    try:
        exec(code, module.__dict__)
    except Exception as err:
        _restore(before)
        if old_module is None:
            sys.modules.pop(module_name, None)
        else:
            sys.modules[module_name] = old_module
        if isinstance(err, NccError):
            raise NccError(f"{path}: {err}") from err
        line = _plugin_line(err, str(path))
        at = f"{path}:{line}" if line else str(path)
        raise NccError(f"{at}: plugin failed to import: {type(err).__name__}: {err}.") from err
    passes = [c for c in _registry.values() if c.__module__ == module_name]
    if not passes:
        raise NccError(f"{path}: plugin defines no pass (a subclass of ncc.passes.Pass with a 'name').")
    for cls in passes:
        cls.origin = str(path)
    return passes


# -- helpers ---------------------------------------------------------------


def _describe(cls: type) -> str:
    origin = cls.__dict__.get("origin") or getattr(cls, "origin", "builtin")
    module = sys.modules.get(cls.__module__)
    where = getattr(module, "__file__", None) if origin == "builtin" else None
    text = f"{cls.__module__}.{cls.__qualname__}"
    if origin != "builtin":
        text += f" from {origin}"
    elif where and not cls.__module__.startswith("ncc."):
        text += f" ({where})"
    return text


def _same_definition(a: type, b: type) -> bool:
    # Re-executing a module (reload, loading one plugin file twice) defines the class again.
    return a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__


def _is_pass_class(obj: object) -> bool:
    from ncc.passes.base import Pass

    return inspect.isclass(obj) and issubclass(obj, Pass) and bool(obj.__dict__.get("name"))


def _passes_in_module(module: ModuleType) -> list[type[Pass]]:
    return [obj for obj in vars(module).values() if _is_pass_class(obj) and obj.__module__ == module.__name__]


def _new_passes(before: dict[str, type[Pass]]) -> list[type[Pass]]:
    return [cls for name, cls in _registry.items() if before.get(name) is not cls]


def _restore(before: dict[str, type[Pass]]) -> None:
    _registry.clear()
    _registry.update(before)


def _plugin_line(err: BaseException, filename: str) -> int | None:
    line = None
    for frame in traceback.extract_tb(err.__traceback__):
        if frame.filename == filename:
            line = frame.lineno
    return line
