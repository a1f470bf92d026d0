"""Write the quantized IR as a ``.pt2``: the torch backend's graph (:mod:`ncc.backends.torch.fx`), exported
with ``torch.export`` on inputs of the IR's static shapes and saved with ``torch.export.save``.

The file holds what the graph holds: int8 weights with their scales, float biases, and the float weights
of layers kept in float. A fresh process loads it after ``import torch.ao.quantization.fx._decomposed``
(which registers the quantized ops) and compiles ``program.module()`` with Inductor (``freezing``,
``no_grad``) to run the int8 kernels.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError


def example_inputs(model: ir.Model) -> tuple[Any, ...]:
    """Zero tensors of the graph inputs' types and shapes (which the torch backend needs static)."""
    import torch

    out = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        shape = value.shape
        if value.dtype is None or shape is None or not all(isinstance(d, int) for d in shape):
            raise NccError(
                f"a .pt2 needs static input shapes; input {value.name!r} is "
                f"{'of unknown type' if value.dtype is None else list(shape or [])}: export the model "
                "with fixed shapes (ncc.torch lowers with the example inputs' shapes)."
            )
        out.append(torch.from_numpy(np.zeros([int(d) for d in shape], value.dtype.numpy())))
    return tuple(out)


def export_program(model: ir.Model) -> Any:
    """The quantized IR as a ``torch.export.ExportedProgram``."""
    import torch
    from ncc.backends.torch.fx import to_graph_module

    module = to_graph_module(model)
    with torch.no_grad():
        return torch.export.export(module, example_inputs(model), strict=False)


def save_pt2(model: ir.Model, path: str | os.PathLike, *, aoti: bool = False) -> None:
    """Export ``model`` and ``torch.export.save`` it to ``path`` or, with ``aoti``, compile it ahead of time
    into an AOTInductor package there (the caller makes the write atomic)."""
    import torch

    program = export_program(model)
    try:
        if aoti:
            package_aoti(program, path)
        else:
            torch.export.save(program, str(path))
    except OSError as err:
        raise NccError(f"cannot write {Path(path)}: {err.strerror or err}.") from None


def package_aoti(program: Any, path: str | os.PathLike) -> None:
    """``program`` compiled by AOTInductor as its x86 int8 lowering needs (``freezing``, ``no_grad``) into a
    package at ``path`` (a ``.pt2`` name). Inductor's counters keep what this compile lowered (the check
    reads them). The package loads with ``torch._inductor.aoti_load_package`` and runs without Python
    graph code; it is compiled for this machine's CPU."""
    import torch
    import torch._inductor.config as config
    from torch._dynamo.utils import counters

    counters["inductor"].clear()
    with torch.no_grad(), config.patch({"freezing": True}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
