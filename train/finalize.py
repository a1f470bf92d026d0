"""Hand a trained model back to ncc: masks made permanent, fake quantization removed, the IR written.

:func:`finalize` works on a copy of the user's module (the trained one keeps running): each pruned
weight becomes ``weight * mask`` and its parametrizations and hooks go; the float module is captured with
``torch.export`` once and lowered by ncc's torch frontend (:func:`ncc.torch.lower`), and written by ncc's
writer (:func:`ncc.tools.modelio.save_model`).

**QAT ranges.** For every fake-quantized layer, the learned ``[lo, hi]`` of its input becomes the
calibrated range of the IR value that is its Conv/Gemm/MatMul node's input, in the graph metadata
``calibrate`` writes (:mod:`ncc.passes.quant.ranges`: a ``ncc.calib`` header ``method=qat levels=256
scheme=asym``, one ``ncc.calib/<value>`` entry per tensor), so ``insert-qdq`` runs without ``calibrate``
and quantizes with the QAT scales. A layer is found in the IR through the FX node that called it: the
program's ``nn_module_stack`` names the module of each ``aten.conv2d``/``aten.linear`` call, and the IR
node keeps that FX node's name (``pkg.torch.onnx.fx_node``); every quantized layer must match exactly
one Conv/Gemm/MatMul, else finalize says which did not.

insert-qdq also quantizes other tensors: a quantized node's output (or, after ``fuse-activation``, its
Relu's) and what pass-through ops (MaxPool, Reshape, ...) make of it. Such a tensor that reaches one
quantized layer's input through Relu and pass-through ops only gets that input's range: quantizing it
with the same scale is what the QAT forward did (Relu and max pooling commute with a monotone grid, and
requantizing on one grid changes nothing). Any other needed tensor gets its layer's observed output range
(min/max during training, :mod:`ncc.train.qat`); a tensor with neither stays float (insert-qdq says why).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir
from ncc.errors import NccError

FX_NODE = "pkg.torch.onnx.fx_node"
METHOD = "qat"
_LAYER_CALLS = ("aten.conv2d", "aten.linear")
_LAYER_OPS = ("Conv", "Gemm", "MatMul")


def finalize(
    module: Any, example_inputs: Sequence[Any], path: str | os.PathLike, *, dynamic_batch: bool = True
) -> ir.Model:
    """Write ``module`` (a :func:`~ncc.train.prepare`'d model, or any ``nn.Module``) to ``path`` and return
    its IR (see the module docstring). ``.onnx`` and ``.ncc`` are written from the IR, with the QAT ranges;
    ``.pt2`` is ``torch.export.save`` of the float program (masks applied; it cannot carry the ranges,
    which the returned IR does). ``dynamic_batch``: the batch dimension stays symbolic (the example
    batch must then be at least 2)."""
    import torch
    from ncc.frontends.torch import _quiet
    from ncc.tools.modelio import model_format
    from ncc.train import trainable_type

    path = Path(path)
    if model_format(path) not in (".onnx", ".ncc", ".pt2"):
        raise NccError(f"{path}: finalize writes .onnx, .ncc or .pt2.")
    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise NccError("example inputs must be a non-empty sequence of tensors, in forward()'s order.")
    trainable = module if isinstance(module, trainable_type()) else None
    float_module = stripped(module)
    ranges = trainable.quant_ranges() if trainable is not None else {}
    dynamic = tuple({0: torch.export.Dim("batch")} if x.dim() > 0 else {} for x in inputs)
    try:
        with torch.no_grad(), _quiet("torch.export"):
            program = torch.export.export(
                float_module, inputs, dynamic_shapes=dynamic if dynamic_batch else None, strict=False
            )
    except Exception as err:  # torch.export raises many kinds; each is the user's model
        from ncc.errors import first_line

        raise NccError(f"torch.export could not capture the model: {first_line(err)}") from None
    from ncc.tools.torch_api import lower

    model = lower(program, inputs, dynamic_batch=dynamic_batch)
    if ranges:
        write_ranges(model, layer_nodes(program, model, list(ranges)), ranges)
    if model_format(path) == ".pt2":
        torch.export.save(program, str(path))
    else:
        from ncc.tools.modelio import save_model

        save_model(model, path)
    return model


def stripped(module: Any) -> Any:
    """A copy of ``module`` as a plain float module: masked weights zeroed, ncc's parametrizations and
    hooks removed."""
    import torch
    from ncc.train import trainable_type
    from torch.nn.utils import parametrize

    trainable = module if isinstance(module, trainable_type()) else None
    inner = trainable.module if trainable is not None else module
    hooks = [h.id for h in trainable.quantizer.handles] if trainable and trainable.quantizer else []
    clone = copy.deepcopy(inner)
    for layer in clone.modules():
        for hook_id in hooks:
            layer._forward_pre_hooks.pop(hook_id, None)
            layer._forward_hooks.pop(hook_id, None)
        if not parametrize.is_parametrized(layer, "weight"):
            continue
        # not remove_parametrizations: the copy shares its parametrized class with the trained module, and
        # removing deletes the class's ``weight`` property (the trained module would lose its weight)
        chain = layer.parametrizations.weight
        weight = chain.original.detach().clone()
        for p in chain:
            if hasattr(p, "mask"):
                weight.mul_(p.mask)
        if len(layer.parametrizations) > 1:
            raise NccError(
                f"layer {type(layer).__name__}: parametrizations other than the weight's are not supported."
            )
        del layer._modules["parametrizations"]
        layer.__class__ = layer.__class__.__bases__[0]  # the class before torch's parametrization
        layer.register_parameter(
            "weight", torch.nn.Parameter(weight, requires_grad=chain.original.requires_grad)
        )
    return clone.eval()


def layer_nodes(program: Any, model: ir.Model, layers: list[str]) -> dict[str, ir.Node]:
    """The IR node (Conv, Gemm or MatMul) of each layer name, found through the FX node that called it."""
    fx_names: dict[str, list[str]] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or not str(node.target).startswith(_LAYER_CALLS):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            owner = list(stack.values())[-1][0]
            fx_names.setdefault(owner, []).append(node.name)
    by_fx: dict[str, list[ir.Node]] = {}
    for node in model.graph:
        text = node.metadata_props.get(FX_NODE, "")
        if text.startswith("%") and node.op_type in _LAYER_OPS:
            by_fx.setdefault(text[1:].split(" ", 1)[0], []).append(node)
    found = {}
    for layer in layers:
        calls = fx_names.get(layer, [])
        if len(calls) != 1:
            raise NccError(
                f"layer {layer!r} is called {len(calls)} times in the exported program: finalize maps each "
                "quantized layer to one IR node."
            )
        nodes = by_fx.get(calls[0], [])
        if len(nodes) != 1:
            raise NccError(
                f"layer {layer!r} (FX node {calls[0]!r}) matches {len(nodes)} Conv/Gemm/MatMul nodes in the IR, "
                "not one: its QAT range has no value to go to."
            )
        found[layer] = nodes[0]
    return found


def write_ranges(model: ir.Model, nodes: dict[str, ir.Node], ranges: dict[str, dict]) -> None:
    """The ``ncc.calib`` metadata insert-qdq reads: each layer's QAT input range on its node's input, the
    tensors between layers from the input they feed, the rest from observed output ranges."""
    from ncc.passes.quant.ranges import CalibratedRanges, TensorRange
    from ncc.targets import DEFAULT_TARGET, get_target

    graph = model.graph
    values = {v.name: v for node in graph for v in node.outputs}
    values.update({v.name: v for v in graph.inputs})
    tensors: dict[str, TensorRange] = {}
    for layer, node in nodes.items():
        lo, hi = ranges[layer]["input"]
        tensors[node.inputs[0].name] = TensorRange(lo, hi)
    target = get_target(DEFAULT_TARGET)
    moves = set(target.passthrough_ops) | {"Relu"}
    outputs = {node.outputs[0].name: ranges[layer]["output"] for layer, node in nodes.items()}
    for name in _needed(model, target):
        if name in tensors or name not in values:
            continue
        fed = _feeds(values[name], tensors, moves)
        if fed is not None:
            tensors[name] = fed
        elif name in outputs:
            tensors[name] = TensorRange(*outputs[name])
        else:
            producer = values[name].producer()
            source = producer.inputs[0].name if producer is not None and producer.op_type == "Relu" else None
            if source in outputs:
                lo, hi = outputs[source]
                tensors[name] = TensorRange(max(lo, 0.0), max(hi, 0.0))
    CalibratedRanges(METHOD, 256, "asym", tensors=tensors).write(graph)


def _needed(model: ir.Model, target: Any) -> list[str]:
    """The values insert-qdq may quantize, with or without ``fuse-activation`` before it (which moves a
    layer's output pair after its Relu): the union of both, in graph order."""
    from ncc.passes.base import PassContext
    from ncc.passes.fusion.fuse_activation import FuseActivation
    from ncc.passes.quant.plan import observed_values

    fused = model.clone()
    FuseActivation().run(fused, PassContext())
    names = dict.fromkeys(observed_values(model.graph, target))
    names.update(dict.fromkeys(observed_values(fused.graph, target)))
    return list(names)


def _feeds(value: ir.Value, tensors: dict, moves: set[str]):
    """The range of the quantized layer input ``value`` reaches through a chain of single-use Relu and
    pass-through ops (``value`` itself excluded), if it does."""
    seen = 0
    while seen < 64:
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output():
            return None
        node = uses[0].node
        if uses[0].idx != 0 or node.op_type not in moves or not node.outputs:
            return None
        value = node.outputs[0]
        if value.name in tensors:
            return tensors[value.name]
        seen += 1
    return None
