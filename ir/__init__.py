"""The ncc IR: onnx-ir graphs plus ncc's text form, verifier, builder and analyses.

Everything here is imported on first use (module ``__getattr__``), so
``import ncc.ir`` stays cheap: no networkx, lark or onnxruntime until needed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # verifier
    "verify": "ncc.ir.verifier",
    "diagnose": "ncc.ir.verifier",
    "Diagnostic": "ncc.ir.verifier",
    "format_diagnostics": "ncc.ir.verifier",
    # builder
    "GraphBuilder": "ncc.ir.builder",
    "dtype": "ncc.ir.builder",
    # shape inference
    "infer_types": "ncc.ir.inference",
    # analyses
    "to_networkx": "ncc.ir.analysis",
    "topological_order": "ncc.ir.analysis",
    "find_cycles": "ncc.ir.analysis",
    "dominators": "ncc.ir.analysis",
    "partition": "ncc.ir.analysis",
    "subgraph_matches": "ncc.ir.analysis",
    "dependencies": "ncc.ir.analysis",
    # text form
    "print_model": "ncc.ir.printer",
    "print_node": "ncc.ir.printer",
    "fingerprint": "ncc.ir.printer",
    "parse": "ncc.ir.parser",
    "parse_file": "ncc.ir.parser",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ncc.ir' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
