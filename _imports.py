"""Keep sympy out of ncc's start-up.

onnx-ir imports sympy at start-up for symbolic dimension arithmetic
(``SymbolicDim`` expressions), which ncc never evaluates; sympy's import is
0.5-0.7 s of every ``ncc`` command (a compile of a small model takes 1.7 s,
onnxruntime's ``quantize_static`` 0.5 s). :func:`defer_sympy` registers sympy
and onnx-ir's ``_symbolic_shapes`` module as deferred modules: each is
executed in full on the first access to an attribute it defines, so any code
that does use sympy (torch, or onnx-ir itself) gets the real module, only
later. (:class:`importlib.util.LazyLoader` would not do: on Python 3.11 the
import system's own look-up of ``__spec__`` triggers the load.)

Only the ``ncc`` command calls it (``tools/cli.py:main``), before any command
imports onnx-ir: it rewrites ``sys.modules`` for the whole process, which a
program importing ncc as a library has not asked for.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


class _Deferred(types.ModuleType):
    """A module whose code runs on the first look-up of a name it does not have yet."""

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):  # protocol probes (copy, pickle, inspect)
            raise AttributeError(attr)
        loader = self.__spec__.loader
        self.__class__ = types.ModuleType  # from here on an ordinary module, filled in place
        loader.exec_module(self)
        return getattr(self, attr)


def _lazy(name: str, spec) -> None:
    if spec is None or spec.loader is None or name in sys.modules:
        return
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _Deferred
    sys.modules[name] = module


def defer_sympy() -> None:
    """Make ``sympy`` and ``onnx_ir._symbolic_shapes`` load on first use (no-op once imported)."""
    if "onnx_ir" in sys.modules:
        return
    try:
        ir_spec = importlib.util.find_spec("onnx_ir")
        sympy_spec = importlib.util.find_spec("sympy")
    except (ImportError, ValueError):
        return
    if ir_spec is None or sympy_spec is None or not ir_spec.submodule_search_locations:
        return
    shapes = Path(next(iter(ir_spec.submodule_search_locations))) / "_symbolic_shapes.py"
    if not shapes.is_file():
        return
    _lazy("sympy", sympy_spec)
    _lazy(
        "onnx_ir._symbolic_shapes", importlib.util.spec_from_file_location("onnx_ir._symbolic_shapes", shapes)
    )
