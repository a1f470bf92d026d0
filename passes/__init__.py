"""Passes: the pass contract, the registry, spec strings and the pass manager.

``from ncc.passes import Pass, PassResult, PassContext, option`` is all a pass
needs (a pass made of rewrite patterns from :mod:`ncc.ir.rewrite` returns
``run_patterns``). The manager, spec parser and registry functions are
re-exported lazily, so importing a pass module stays cheap.
"""

from __future__ import annotations

from typing import Any

from ncc.passes.base import Pass, PassContext, PassResult, option, run_patterns

_LAZY = {
    "PassManager": "ncc.passes.manager",
    "Instruments": "ncc.passes.manager",
    "RunReport": "ncc.passes.manager",
    "parse_pipeline": "ncc.passes.spec",
    "format_pipeline": "ncc.passes.spec",
    "format_pass": "ncc.passes.spec",
    "get_pass": "ncc.passes.registry",
    "all_passes": "ncc.passes.registry",
    "load_plugin": "ncc.passes.registry",
    "PIPELINES": "ncc.passes.pipelines",
    "graphsurgeon_pass": "ncc.passes.graphsurgeon",
}

__all__ = ["Pass", "PassContext", "PassResult", "option", "run_patterns", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ncc.passes' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
