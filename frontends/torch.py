"""PyTorch frontend: an ``nn.Module`` (or a saved ``torch.export`` program) becomes an ncc IR model.

The module is captured once with ``torch.export`` (non-strict, in eval mode: batch norm uses its running
statistics) at the example inputs' shapes. Two routes lead from the program to the IR:

- **aten** (static shapes, the default for ``ncc.torch.compile`` and ``.pt2`` inputs): ncc translates the
  ATen graph itself (:mod:`ncc.frontends.aten`), node by node, with the types the program carries;
  a few times faster than torch.onnx's exporter, whose decompositions and translation were most of the
  quantize step's export time.
- **torch.onnx** (``dynamic_batch``, or a program holding an op the aten route has no rule for):
  ``torch.onnx.export(dynamo=True, optimize=False)``, whose ONNX nodes each come from one FX node.

Either way every IR node keeps the FX node it came from (``pkg.torch.onnx.fx_node``), so a dump shows
where each node came from, and the model's ``ncc.torch.route`` metadata says which route it took and,
for torch.onnx, why. The result gets what the ONNX frontend gives every model: value types and stable
node ids. torch is imported only here (and by the torch backend), never by ``import ncc``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError, first_line
from ncc.frontends.aten import FX_NODE as FX_NODE
from ncc.frontends.aten import Unsupported, translate
from ncc.ir.ops import is_onnx_domain

ROUTE = "ncc.torch.route"
"""Model metadata: how the program became IR (``aten``, ncc's own translation, or ``torch.onnx (why)``)."""


def lower(
    module: Any,
    example_inputs: Sequence[Any],
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
) -> ir.Model:
    """Export ``module`` (an ``nn.Module`` or a ``torch.export.ExportedProgram``) on ``example_inputs``
    (tensors, in ``forward``'s order) and return it as an IR model whose inputs and outputs are named
    ``input_names`` / ``output_names`` (default: torch's)."""
    import torch

    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise NccError("example inputs must be a non-empty sequence of tensors, in forward()'s order.")
    inputs = _unaliased(inputs)
    if isinstance(module, torch.nn.Module):
        module = module.eval()
    elif not isinstance(module, torch.export.ExportedProgram):
        raise NccError(
            f"cannot lower a {type(module).__name__}: give an nn.Module or a torch.export.ExportedProgram."
        )
    from ncc.frontends.onnx import normalize

    if not dynamic_batch:
        program = module if isinstance(module, torch.export.ExportedProgram) else _export(module, inputs)
        try:
            model = translate(program, input_names, output_names)
        except Unsupported as why:
            model = _through_onnx(program, inputs, None, input_names, output_names)
            model.metadata_props[ROUTE] = f"torch.onnx ({why})"
        else:
            model.metadata_props[ROUTE] = "aten"
        return normalize(model, "the exported model")
    dynamic = None
    if isinstance(module, torch.nn.Module):
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} if x.dim() > 0 else {} for x in inputs)
    model = _through_onnx(module, inputs, dynamic, input_names, output_names)
    model.metadata_props[ROUTE] = "torch.onnx (symbolic batch)" if dynamic else "torch.onnx"
    return normalize(model, "the exported model")


def _export(module: Any, inputs: tuple) -> Any:
    """``module`` captured by ``torch.export`` (non-strict) at the inputs' shapes."""
    import torch

    try:
        with torch.no_grad(), _quiet("torch.export"):
            return torch.export.export(module, inputs, strict=False)
    except Exception as err:  # torch.export raises many kinds; each is the user's model
        raise NccError(f"torch.export could not capture the model: {first_line(err)}") from None


def _through_onnx(module, inputs, dynamic, input_names, output_names) -> ir.Model:
    """``module`` (or an exported program) through torch.onnx's exporter, as an IR model."""
    import torch

    try:
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(
                module,
                inputs,
                dynamo=True,
                optimize=False,
                verify=False,
                verbose=False,
                dynamic_shapes=dynamic,
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
            )
    except Exception as err:  # torch.export and torch.onnx raise many kinds; each is the user's model
        raise NccError(f"torch.export could not capture the model: {first_line(err)}") from None
    model = program.model
    _linear_weights_as_kn(model)  # first: the [K, N] copies it makes are the IR's own already
    _own_weights(model)
    return model


def _own_weights(model: ir.Model) -> None:
    """torch.onnx's initializers wrap the module's own tensors: the IR would change when the module does
    (a buffer a later call updates, a parameter trained further). Each becomes a copy the IR owns."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and type(tensor) is not ir.Tensor:  # torch.onnx's TorchTensor subclasses it
            value.const_value = ir.tensor(np.array(tensor.numpy(), copy=True), name=value.name)


def _linear_weights_as_kn(model: ir.Model) -> None:
    """``aten.linear`` exports as ``MatMul(x, Transpose(W))`` with W ``[N, K]`` as torch stores it: the
    weight becomes a ``[K, N]`` initializer read by the MatMul directly, as torch.onnx's own optimizer
    leaves it and as every ONNX pass expects a weight (fold-constants would skip the large ones)."""
    graph = model.graph
    for node in list(graph):
        if node.op_type != "Transpose" or not is_onnx_domain(node):
            continue
        weight, out = node.inputs[0], node.outputs[0]
        tensor = weight.const_value if weight is not None and weight.is_initializer() else None
        perm = node.attributes.get_ints("perm", None)
        if tensor is None or len(tensor.shape) != 2 or (perm is not None and list(perm) != [1, 0]):
            continue
        uses = out.uses()
        if not uses or out.is_graph_output() or any(u.node.op_type != "MatMul" or u.idx != 1 for u in uses):
            continue
        transposed = ir.Value(
            name=f"{weight.name}.T",
            type=weight.type,
            shape=ir.Shape([tensor.shape[1], tensor.shape[0]]),
            const_value=ir.tensor(np.ascontiguousarray(tensor.numpy().T), name=f"{weight.name}.T"),
        )
        graph.register_initializer(transposed)
        for use in uses:
            use.node.replace_input_with(use.idx, transposed)
        graph.remove(node, safe=True)
        if not weight.uses() and not weight.is_graph_input():
            del graph.initializers[weight.name]


def _unaliased(inputs: tuple) -> tuple:
    """Example inputs sharing memory (the same zero tensor passed as two caches) made distinct: torch.export
    traces aliased inputs as one, and the program then reads the first where the second was meant."""
    seen: set[int] = set()
    out = []
    for x in inputs:
        ptr = x.untyped_storage().data_ptr() if x.numel() else None
        if ptr is not None and ptr in seen:
            x = x.clone()
        elif ptr is not None:
            seen.add(ptr)
        out.append(x)
    return tuple(out)


@contextlib.contextmanager
def _quiet(logger_name: str = "torch.onnx"):
    """torch's progress lines, logged tracebacks of errors ncc reports in one sentence, and its internal
    deprecation warnings are not the user's business: silenced while torch works (the logger's level
    is restored after)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def load_program(path: str | os.PathLike) -> Any:
    """A ``torch.export.save``d program (``.pt2``), loaded; one sentence if it is not one."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise NccError(f"{path}: no such file.")
    _register_quantized_ops()
    try:
        with _quiet("torch.export"):
            return torch.export.load(str(path))
    except Exception as err:
        raise NccError(f"{path}: not a torch.export program ({first_line(err)}).") from None


def lower_program(path: str | os.PathLike) -> ir.Model:
    """The IR of a saved ``torch.export`` program, with the example inputs it was exported on."""
    program = load_program(path)
    inputs = program.example_inputs[0] if program.example_inputs else None
    if inputs is None:
        raise NccError(f"{path}: the program carries no example inputs to export it with.")
    return lower(program, inputs, dynamic_batch=False)


def _register_quantized_ops() -> None:
    """``quantized_decomposed`` ops (what ncc's torch artefacts call) must exist before a program is loaded."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401
