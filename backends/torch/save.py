"""Write the quantized IR as a ``.pt2``: the torch backend's graph (:mod:`ncc.backends.torch.fx`), exported
with ``torch.export`` on zero inputs of the IR's shapes (a symbolic batch stays symbolic: the program
takes any batch) and saved with ``torch.export.save``.

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

EXAMPLE_BATCH = 2
"""The batch of the zero inputs a symbolic-batch model is exported and checked on (torch.export
specializes sizes 0 and 1, so a symbolic batch needs at least 2 to stay symbolic)."""


def example_inputs(model: ir.Model) -> tuple[Any, ...]:
    """Zero tensors of the graph inputs' types and shapes; a symbolic first dimension (the batch) becomes
    :data:`EXAMPLE_BATCH`. Any other symbolic dimension is refused in one sentence."""
    import torch

    out = []
    for value in _fed(model):
        dims = [EXAMPLE_BATCH if i == 0 and not isinstance(d, int) else d for i, d in enumerate(value.shape)]
        out.append(torch.from_numpy(np.zeros([int(d) for d in dims], value.dtype.numpy())))
    return tuple(out)


def dynamic_shapes(model: ir.Model) -> tuple[dict, ...] | None:
    """``torch.export``'s ``dynamic_shapes`` for the graph inputs: one ``batch`` dimension shared by every
    input whose first dimension is symbolic; None when every shape is static."""
    import torch

    inputs = _fed(model)
    if all(isinstance(d, int) for v in inputs for d in v.shape):
        return None
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} if len(v.shape) and not isinstance(v.shape[0], int) else {} for v in inputs)


def _fed(model: ir.Model) -> list[ir.Value]:
    """The graph inputs the program takes, checked: typed, and static but for the first dimension."""
    values = [v for v in model.graph.inputs if not v.is_initializer()]
    for value in values:
        shape = value.shape
        if value.dtype is None or shape is None or not all(isinstance(d, int) for d in list(shape)[1:]):
            raise NccError(
                f"a .pt2 needs input shapes static but for the batch; input {value.name!r} is "
                f"{'of unknown type' if value.dtype is None else list(shape or [])}: export the model "
                "with fixed shapes (ncc.torch lowers with the example inputs' shapes)."
            )
    return values


def export_program(model: ir.Model) -> Any:
    """The quantized IR as a ``torch.export.ExportedProgram`` (its batch symbolic where the IR's is)."""
    import torch
    from ncc.backends.torch.fx import to_graph_module

    module = to_graph_module(model)
    dynamic = dynamic_shapes(model)
    try:
        with torch.no_grad():
            return torch.export.export(module, example_inputs(model), dynamic_shapes=dynamic, strict=False)
    except Exception as err:
        if dynamic is None or "Constraints violated" not in str(err):
            raise
        raise NccError(
            "the graph fixes its batch size (a reshape or expand names it), so it cannot be exported with a "
            "symbolic batch: export the ONNX model with a fixed batch, or let its reshapes infer the batch (-1)."
        ) from None


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
