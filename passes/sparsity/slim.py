"""The ``slim`` pass: turn units that are exactly zero into smaller tensors.

A Conv output channel, an FFN neuron or an attention head whose weights (and biases) are all zero
computes nothing, but dense kernels still spend the same time on it. ``slim`` finds each unit group
(:mod:`ncc.passes.sparsity.groups`), asks which units are exactly zero at the input of every layer that
reads them, and removes those: the producers' output columns or channels, the per-unit constants of
the nodes in between (bias Adds, depthwise Conv weights and ``group``, BatchNormalization parameters),
the Reshape targets that name the units' size, the readers' weight rows or input channels, and the
static shapes of every value on the way. The outputs do not change: what is removed was zero.

Zeros come from ``prune`` with a structured pattern (which also refits the readers on calibration
data), from training with ``ncc.torch.train`` channel masks, or from any other source. A group that
holds zero units but cannot be slimmed (a LayerNormalization over the units, a graph output, a weight
shared with another layer) is named in the report with the reason. At least one unit of a group
stays, so no tensor becomes empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.rewrite import Rewriter, constant_array
from ncc.passes.base import Pass, PassContext, PassResult, option
from ncc.passes.sparsity import groups as g


@dataclass(frozen=True)
class Slim(Pass):
    """Remove units (channels, neurons, heads) that are exactly zero: a smaller model, same outputs."""

    name: ClassVar[str] = "slim"
    uses_calibration: ClassVar[bool] = True
    refit: bool = option(
        False,
        "refit the readers of pruned groups to the dense model's outputs, in graph order (needs --calib)",
    )
    samples: int = option(64, "calibration samples the refit is solved on", min=1)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        rewriter = Rewriter(model, model.graph)
        removed, slimmed, notes = 0, 0, []
        refit = None
        if self.refit:
            data = ctx.data.get("calibration_data")
            if data is None:
                raise NccError("pass 'slim' with refit=true needs calibration data (--calib).")
            refit = _Refit(model, data, self.samples)
        done = []
        for group in g.find_groups(model):
            zero = g.zero_units(group)
            if not zero.any():
                continue
            if group.problem is not None:
                notes.append(f"slim: kept {int(zero.sum())} zero units of {group.name()}: {group.problem}")
                continue
            if not group.consumers:
                continue
            keep = np.flatnonzero(~zero)
            if keep.size == 0:
                keep = np.array([0])
            remove_units(rewriter, group, keep)
            done.append(group)
            removed += group.units - keep.size
            slimmed += 1
            notes.append(f"slim: {group.kind} group {group.name()}: {group.units} -> {keep.size} units")
        refitted = refit.apply(rewriter, model, done) if refit is not None else 0
        links = _forget_dense(model)
        if refit is not None:
            notes.append(f"slim: {refitted} readers refitted to the dense model on calibration data")
        return PassResult(
            modified=slimmed > 0 or links > 0,
            stats={"groups slimmed": slimmed, "units removed": removed, "readers refitted": refitted},
            notes=notes,
        )


class _Refit:
    """The dense model's reader outputs (from the originals ``prune`` kept), taken before slimming, and
    the sequential refit after it."""

    def __init__(self, model: ir.Model, data, count: int):
        from ncc.metrics import token_masks
        from ncc.passes.quant.fallback import samples

        self.feeds = samples(data, count)
        self.masks = token_masks(self.feeds)
        self.dense = _dense_twin(model)

    def apply(self, rewriter: Rewriter, model: ir.Model, groups: list[g.Group]) -> int:
        from ncc.passes.sparsity import prune

        pruned = [grp for grp in groups if any(prune.DENSE_KEY in p.metadata_props for p in grp.producers)]
        if not pruned:
            return 0
        targets = prune._dense_targets(self.dense, pruned, self.feeds, self.masks)
        count = 0
        for grp in pruned:  # graph order: each refit sees the ones before it
            stats = prune._statistics(model, grp, self.feeds, self.masks, targets)
            for node in grp.consumers:  # slimmed: every input column left is kept
                gram = stats.get(id(node))
                if gram is not None and gram.c is not None:
                    prune._refit_reader(rewriter, node, gram, np.arange(gram.width))
                    count += 1
        return count


def _dense_twin(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with every constant ``prune`` changed swapped back to its dense original."""
    import json

    from ncc.passes.sparsity.prune import DENSE_KEY

    twin = model.clone()
    for node in twin.graph:
        links = node.metadata_props.get(DENSE_KEY)
        if links:
            for index, name in json.loads(links).items():
                node.replace_input_with(int(index), twin.graph.initializers[name])
    return twin


def _forget_dense(model: ir.Model) -> int:
    """Drop ``prune``'s links to dense originals and the originals themselves."""
    import json

    from ncc.passes.sparsity.prune import DENSE_KEY

    count = 0
    for node in model.graph:
        links = node.metadata_props.pop(DENSE_KEY, None)
        if links:
            for name in json.loads(links).values():
                value = model.graph.initializers.get(name)
                if value is not None and not value.uses():
                    del model.graph.initializers[name]
                    count += 1
    return count


def remove_units(rewriter: Rewriter, group: g.Group, keep: np.ndarray) -> None:
    """Keep only units ``keep`` (sorted indices) of ``group``: every tensor and shape that holds them."""
    for node in group.producers:
        axis = g.producer_weight_axis(node)
        _slice_input(rewriter, node, 1, axis, keep, group.head_size)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant_array(node.inputs[2])
            if bias is not None and bias.ndim >= 1 and bias.shape[-1] == group.units * group.head_size:
                _slice_input(rewriter, node, 2, -1, keep, group.head_size)
    for node in group.through:
        out = group.track(node.outputs[0])
        if out is None:
            continue
        _slim_through(rewriter, node, out, group, keep)
    for node in group.consumers:
        track = group.track(node.inputs[0])
        _slice_input(rewriter, node, 1, g.consumer_weight_axis(node), keep, track.width)
    for node, position, width in group.reshapes:
        _retarget(rewriter, node, position, keep.size * width)
    for track in group.tracks.values():
        _reshape_value(track.value, track.axis, keep.size * track.width)


def _slim_through(
    rewriter: Rewriter, node: ir.Node, track: g.Track, group: g.Group, keep: np.ndarray
) -> None:
    op = node.op_type
    span = group.units * track.width
    if op == "Conv":  # depthwise: weight [C, 1, ...], bias [C], one group per channel
        _slice_input(rewriter, node, 1, 0, keep, 1)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            _slice_input(rewriter, node, 2, 0, keep, 1)
        node.attributes["group"] = ir.AttrInt64("group", int(keep.size))
        return
    if op == "BatchNormalization":
        for index in range(1, 5):
            _slice_input(rewriter, node, index, 0, keep, 1)
        return
    if op in g.BINARY or op == "PRelu":
        for index, value in enumerate(node.inputs):
            if value is None or group.track(value) is not None:
                continue
            array = constant_array(value)
            if array is not None and array.ndim >= -track.axis and array.shape[track.axis] == span:
                _slice_input(rewriter, node, index, track.axis, keep, track.width)


def _slice_input(
    rewriter: Rewriter, node: ir.Node, index: int, axis: int, keep: np.ndarray, width: int
) -> None:
    value = node.inputs[index]
    array = constant_array(value)
    _set_input(rewriter, node, index, g.unit_slice(array, axis, keep, width))


def _set_input(rewriter: Rewriter, node: ir.Node, index: int, array: np.ndarray) -> None:
    """``node``'s input ``index`` becomes the constant ``array``: in place when nothing else reads it."""
    value = node.inputs[index]
    array = np.ascontiguousarray(array)
    if value.is_initializer() and len(value.uses()) == 1 and not value.is_graph_input():
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return
    new = rewriter.constant(array, f"{value.name}_slim" if value.name else "slim")
    node.replace_input_with(index, new)
    rewriter.drop_if_unused(value)


def _retarget(rewriter: Rewriter, node: ir.Node, position: int, size: int) -> None:
    """Entry ``position`` of a Reshape's target becomes ``size`` where the target names it."""
    if node.op_type != "Reshape":
        return
    found = g.target_piece(node, position)
    if found is None:  # -1 or 0: the entry follows the input
        return
    concat, index, piece = found
    array = constant_array(piece).copy()
    offset = 0
    if concat is not None:
        for earlier in concat.inputs[:index]:
            offset += int(earlier.shape[0])
    at = position - offset
    if array.reshape(-1)[at] in (-1, 0):
        return
    flat = array.reshape(-1)
    flat[at] = size
    _set_input(rewriter, concat if concat is not None else node, index, flat.reshape(array.shape))


def _reshape_value(value: ir.Value, axis: int, size: int) -> None:
    shape = value.shape
    if shape is None or len(shape) < -axis or not isinstance(shape[axis], int):
        return
    dims = list(shape)
    dims[axis] = size
    value.shape = ir.Shape(dims)
