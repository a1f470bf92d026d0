"""The ``prune`` pass: zeros in a pattern, or whole units removed and their readers refitted.

Element patterns (``unstructured``, ``RxC`` blocks, ``N:M``; see :mod:`ncc.passes.sparsity.patterns`)
zero weights of MatMul / Gemm / Conv layers in place. Scored by ``magnitude`` (|w|) or ``activation``
(|w| times the L2 norm of the input feature it multiplies, on calibration data: Wanda, Sun et al. 2023),
per layer or under one ``global`` threshold. Zeros alone run at dense speed on CPU runtimes; the report
says so. ``snip-momentum`` scores need gradients: it is ``ncc.torch.train``'s criterion.

Structured patterns remove units of a group (:mod:`ncc.passes.sparsity.groups`): ``channel`` (Conv output
channels with everything that carries them), ``neuron`` (FFN intermediate neurons), ``head`` (attention
heads: Q, K and V columns with the output projection's rows). ``sparsity`` is the fraction of each
group's units removed. ``magnitude`` ranks units by the norm of their producers' weights;
``activation`` by the cost Optimal Brain Surgeon gives their removal from the readers' input statistics
(:mod:`ncc.passes.sparsity.scores`). The chosen units are zeroed in the producers and in the per-unit
constants between (bias, depthwise Conv, BatchNormalization), and with ``refit`` (and calibration data)
each reading layer's weights and bias are solved by least squares so that, on the calibration inputs of
the pruned model, it reproduces the dense model's output. Groups go in graph order, so each refit sees
the errors of the groups before it. ``slim`` then removes the zero units physically.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.rewrite import Rewriter, bias_add, constant_array, is_constant
from ncc.metrics import token_masks
from ncc.passes.base import Pass, PassContext, PassResult, option, regex
from ncc.passes.sparsity import groups as g
from ncc.passes.sparsity import patterns as pt
from ncc.passes.sparsity import scores as sc

SPARSITY_KEY = "ncc.sparsity"
#: on a node whose constant inputs structured pruning changed: JSON ``{"input index": "initializer"}``
#: naming the dense originals, kept in the graph until ``slim`` (refit) has used them
DENSE_KEY = "ncc.sparsity.dense"
CRITERIA = ("auto", "magnitude", "activation", "snip-momentum")
SCOPES = ("layer", "global")


def _one_of(choices):
    return lambda v: None if v in choices else f"is {v!r}, not one of {', '.join(choices)}"


@dataclass(frozen=True)
class Prune(Pass):
    """Zero weights in a pattern (N:M, RxC blocks, unstructured), or remove channels / neurons / heads."""

    name: ClassVar[str] = "prune"
    uses_calibration: ClassVar[bool] = True
    pattern: str = option(
        "4x1", "unstructured, RxC blocks (4x1), N:M (2:4), channel, neuron or head", check=pt.pattern_problem
    )
    sparsity: float = option(0.5, "fraction of weights (or of each group's units) removed", min=0, lt=1)
    criterion: str = option(
        "auto",
        "magnitude, activation (needs --calib), or auto: activation with --calib",
        check=_one_of(CRITERIA),
    )
    scope: str = option(
        "layer", "element patterns: one threshold per layer, or global", check=_one_of(SCOPES)
    )
    include: tuple[str, ...] = option((), "only layers whose name matches (regex searched)", check=regex)
    exclude: tuple[str, ...] = option((), "skip layers whose name matches (regex searched)", check=regex)
    samples: int = option(64, "calibration samples the statistics are gathered on", min=1)
    refit: bool = option(
        True, "structured patterns: refit the reading layers by least squares (needs --calib)"
    )
    multiple: int = option(
        16,
        "structured patterns: units kept per group (of at least 4x this) rounded to a multiple of this "
        "(onnxruntime's blocked conv kernels take channel counts in multiples of 8/16; others run slower)",
        min=1,
    )

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if self.criterion == "snip-momentum":
            raise NccError(
                "prune: criterion snip-momentum scores |w * gradient| during fine-tuning; use "
                "ncc.torch.train.prepare(...) with Prune(criterion='snip-momentum') and compile its output."
            )
        data = ctx.data.get("calibration_data")
        if self.criterion == "auto":
            import dataclasses

            chosen = "activation" if data is not None else "magnitude"
            return dataclasses.replace(self, criterion=chosen).run(model, ctx)
        if self.criterion == "activation" and data is None:
            raise NccError("prune: criterion activation needs calibration data (--calib).")
        from ncc.passes.quant.fallback import samples

        feeds = samples(data, self.samples) if data is not None else None
        if self.pattern in pt.STRUCTURED:
            return self._units(model, feeds)
        return self._elements(model, feeds)

    def _wanted(self, name: str) -> bool:
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)

    # -- element patterns --------------------------------------------------------------------------
    def _elements(self, model: ir.Model, feeds) -> PassResult:
        layers = []
        for node in model.graph:
            axis = _weight_out_axis(node)
            if axis is None or not self._wanted(node.name or ""):
                continue
            layers.append((node, axis))
        if not layers:
            return PassResult(
                modified=False, notes=["prune: no MatMul/Gemm/Conv layer with a constant weight"]
            )
        norms = _input_norms(model, [n for n, _ in layers], feeds) if self.criterion == "activation" else {}
        views, problems = [], []
        for node, axis in layers:
            view = pt.to_view(constant_array(node.inputs[1]).astype(np.float32), axis)
            if (why := pt.fits(self.pattern, view.shape)) is not None:
                problems.append(f"{node.name or node.op_type}: {why}")
            views.append(view)
        if problems:
            raise NccError(
                f"prune: pattern {self.pattern} does not fit {problems[0]} (exclude it, or pick another pattern)."
            )
        scores = []
        for (node, _), view in zip(layers, views):
            s = np.abs(view).astype(np.float64)
            norm = norms.get(id(node))
            if norm is not None:
                s = s * np.repeat(np.sqrt(norm), view.shape[1] // norm.size)[None, :]
            scores.append(s)
        if self.scope == "global":
            masks = pt.global_masks(scores, self.pattern, self.sparsity)
        else:
            masks = [pt.layer_mask(s, self.pattern, self.sparsity) for s in scores]
        rewriter = Rewriter(model, model.graph)
        zeros = total = 0
        for (node, axis), view, mask in zip(layers, views, masks):
            weight = constant_array(node.inputs[1])
            pruned = pt.from_view(np.where(mask, view, 0).astype(weight.dtype), weight.shape, axis)
            _set_weight(rewriter, node, 1, pruned)
            achieved = float(1 - mask.mean())
            node.metadata_props[SPARSITY_KEY] = f"pattern={self.pattern} sparsity={achieved:.4f}"
            zeros += int((~mask).sum())
            total += mask.size
        notes = [
            f"prune: {self.pattern} {self.criterion} ({self.scope}): {len(layers)} layers, "
            f"{zeros / max(total, 1):.1%} of their weights zero",
            "prune: zeros in dense weights run at dense speed in onnxruntime and OpenVINO on CPU; "
            "channel, neuron and head patterns with slim make the model smaller and faster",
        ]
        return PassResult(
            modified=zeros > 0, stats={"layers pruned": len(layers), "weights zeroed": zeros}, notes=notes
        )

    # -- structured patterns -----------------------------------------------------------------------
    def _units(self, model: ir.Model, feeds) -> PassResult:
        found = [grp for grp in g.find_groups(model) if grp.kind == self.pattern]
        chosen = [
            grp
            for grp in found
            if grp.problem is None
            and grp.consumers
            and all(self._wanted(p.name or "") for p in grp.producers)
        ]
        notes = []
        refused = [grp for grp in found if grp.problem is not None]
        if refused:
            notes.append(
                f"prune: {len(refused)} {self.pattern} groups cannot be slimmed, left whole; first: {refused[0].name()}: {refused[0].problem}"
            )
        if not chosen:
            return PassResult(modified=False, notes=[*notes, f"prune: no {self.pattern} group to prune"])
        masks = token_masks(feeds) if feeds is not None else None
        # the dense model's reader outputs, the refit's targets, before anything is pruned
        targets = _dense_targets(model, chosen, feeds, masks) if feeds is not None and self.refit else {}
        rewriter = Rewriter(model, model.graph)
        removed_total = 0
        refits = 0
        for grp in chosen:  # graph order; zeroing and refits change constants, not the groups' structure
            count = _removed_count(grp.units, self.sparsity, self.multiple)
            if count <= 0:
                continue
            stats = _statistics(model, grp, feeds, masks, targets) if feeds is not None else None
            short = [
                (node, gram.rows, gram.width)
                for node in grp.consumers
                if (gram := (stats or {}).get(id(node))) is not None and gram.rows < gram.width
            ]
            if short and self.refit:
                node, rows, width = short[0]
                notes.append(
                    f"prune: warning: the refit of {node.name or node.op_type} has {rows} calibration rows for "
                    f"{width} inputs; give more samples (--calib-samples) for a refit that generalizes"
                )
            if self.criterion == "activation":
                remove = _obs_choice(grp, stats, count)
            else:
                remove = _magnitude_choice(grp, count)
            _zero_units(rewriter, grp, np.array(sorted(remove)))
            if self.refit and stats is not None:
                refits += _refit(rewriter, grp, stats, remove)
            left = g.zero_units(grp)
            if not left[remove].all():
                notes.append(
                    f"prune: {grp.name()}: {int((~left[remove]).sum())} chosen units stay nonzero at their readers"
                )
            for p in grp.producers:
                p.metadata_props[SPARSITY_KEY] = (
                    f"pattern={self.pattern} removed={count}/{grp.units} units={','.join(map(str, sorted(remove)))}"
                )
            removed_total += count
        notes.insert(
            0,
            f"prune: {self.pattern} {self.criterion}: {removed_total} units zeroed in {len(chosen)} groups, {refits} readers refitted",
        )
        return PassResult(
            modified=removed_total > 0,
            stats={"groups pruned": len(chosen), "units zeroed": removed_total, "readers refitted": refits},
            notes=notes,
        )


def _removed_count(units: int, sparsity: float, multiple: int) -> int:
    """How many of ``units`` to remove: ``sparsity`` of them, the rest rounded to the nearest multiple of
    ``multiple`` when the group holds at least four of them, and at least one unit kept."""
    keep = units - int(round(sparsity * units))
    if multiple > 1 and units >= 4 * multiple and units % multiple == 0:
        keep = max(multiple, int(round(keep / multiple)) * multiple)
    return min(max(units - keep, 0), units - 1)


def _weight_out_axis(node: ir.Node) -> int | None:
    if node.op_type not in g.LAYERS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    if not is_constant(node.inputs[1]) or node.inputs[1].shape is None:
        return None
    rank = len(node.inputs[1].shape)
    if node.op_type == "Conv":
        return 0 if rank >= 3 else None
    if rank != 2:
        return None
    return g.producer_weight_axis(node) % 2


def _set_weight(
    rewriter: Rewriter, node: ir.Node, index: int, array: np.ndarray, *, link: bool = False
) -> None:
    """Replace ``node``'s constant input ``index``; with ``link`` first keep the dense original beside it
    (once: a later pass's change keeps the first original)."""
    from ncc.passes.sparsity.slim import _set_input

    if link:
        links = json.loads(node.metadata_props.get(DENSE_KEY, "{}"))
        if str(index) not in links:
            old = node.inputs[index]
            kept = rewriter.constant(np.array(constant_array(old)), f"{old.name or 'weight'}_dense")
            links[str(index)] = kept.name
            node.metadata_props[DENSE_KEY] = json.dumps(links, sort_keys=True)
    _set_input(rewriter, node, index, array)


def _input_norms(model: ir.Model, nodes: list[ir.Node], feeds) -> dict[int, np.ndarray]:
    """Per layer, the sum of squares of each input feature (Conv: per input channel) on ``feeds``."""
    from ncc.runtime import open_session

    names = list(dict.fromkeys(n.inputs[0].name for n in nodes))
    session = open_session(model, outputs=names)
    masks = token_masks(feeds)
    sums: dict[str, np.ndarray] = {}
    for index, (feed, mask) in enumerate(zip(feeds, masks)):
        results = session.run(feed, where=f"calibration batch {index}")
        for name in names:
            x = results[name]
            axis = 1 - x.ndim if _conv_input(model, name) else -1
            r = sc.rows(x, axis, mask)
            part = np.sum(r * r, axis=0)
            sums[name] = part if name not in sums else sums[name] + part
    return {id(n): sums[n.inputs[0].name] for n in nodes if n.inputs[0].name in sums}


def _conv_input(model: ir.Model, name: str) -> bool:
    return any(n.op_type == "Conv" and n.inputs[0].name == name for n in model.graph)


@dataclass
class Gram:
    """A reader's calibration statistics, summed batch by batch so that their size does not grow with the
    data: ``h``, the Gram matrix of its input rows with a ones column appended (``[width + 1]`` square);
    ``c``, those rows times the rows its refit must produce (None where there are no targets)."""

    h: np.ndarray
    c: np.ndarray | None
    rows: int

    @property
    def width(self) -> int:
        return self.h.shape[0] - 1


def _statistics(model: ir.Model, grp: g.Group, feeds, masks, targets) -> dict[int, Gram]:
    """Per reader of the group (pointwise convs only among convs; others absent), its :class:`Gram` on
    ``feeds``: its input rows in the model as it is now, and, from ``targets`` (the rows of the model
    before pruning, see :func:`_dense_targets`), what it must produce: the target itself, or, where the
    reader feeds a residual Add (:func:`_skip`), the target sum minus the other operand as it is now."""
    from ncc.passes.quant.fallback import measuring_session

    skips = {id(c): skip for c in grp.consumers if (skip := _skip(c)) is not None}
    names = list(
        dict.fromkeys([c.inputs[0].name for c in grp.consumers] + [v.name for _, v in skips.values()])
    )
    session = measuring_session(model, names, prune=True)
    stats: dict[int, Gram] = {}
    seen: dict[int, int] = {}  # target rows consumed so far, per reader
    for index, (feed, mask) in enumerate(zip(feeds, masks)):
        results = session.run(feed, where=f"calibration batch {index}")
        for node in grp.consumers:
            x = _input_rows(node, results[node.inputs[0].name], mask)
            if x is None:
                continue
            x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
            y = targets.get(_reader_output(node)[0].name)
            if y is not None:
                start = seen.get(id(node), 0)
                y = y[start : start + x.shape[0]].astype(np.float64)
                seen[id(node)] = start + x.shape[0]
                if id(node) in skips:
                    skip = _output_rows(node, [results[skips[id(node)][1].name]], [mask])
                    y = y - skip if skip.shape == y.shape else None
                if y is not None and y.shape[0] != x.shape[0]:
                    y = None
            gram = stats.get(id(node))
            if gram is None:
                c = x.T @ y if y is not None else None
                stats[id(node)] = Gram(x.T @ x, c, x.shape[0])
                continue
            gram.h += x.T @ x
            gram.c = gram.c + x.T @ y if gram.c is not None and y is not None else None
            gram.rows += x.shape[0]
    return stats


def _input_rows(node: ir.Node, x: np.ndarray, mask) -> np.ndarray | None:
    """The rows a reader multiplies by its weight (pointwise convs only among convs)."""
    if node.op_type == "Conv":
        return sc.conv_rows(x, node)
    return sc.rows(x, -1, mask)


def _output_rows(node: ir.Node, arrays: list[np.ndarray], masks) -> np.ndarray:
    """A reader's output-side arrays as rows (its output channels last)."""
    if node.op_type == "Conv":
        return np.concatenate([sc.rows(a, 1, None) for a in arrays])
    return np.concatenate([sc.rows(a, -1, m) for a, m in zip(arrays, masks)])


def _skip(node: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    """``(add, other)`` when the reader's output (bias included) is only added to another computed tensor of
    its shape (a residual connection): the refit then matches the sum, absorbing the drift of the skip
    path from the layers pruned before."""
    out, _ = _reader_output(node)
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    if is_constant(other) or other.shape is None or out.shape is None or list(other.shape) != list(out.shape):
        return None
    return add, other


def _reader_weight(node: ir.Node) -> np.ndarray:
    """A reader's weight as ``[input rows, outputs]``."""
    w = constant_array(node.inputs[1]).astype(np.float64)
    axis = g.consumer_weight_axis(node)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def _obs_choice(grp: g.Group, stats: dict[int, Gram], count: int) -> list[int]:
    parts = []
    for node in grp.consumers:
        gram = stats.get(id(node))
        if gram is None:
            continue
        parts.append((gram.h[:-1, :-1], _reader_weight(node)))
    if not parts:
        return _magnitude_choice(grp, count)
    width = grp.track(grp.consumers[0].inputs[0]).width
    return sc.combined_order(parts, width, grp.units, count)


def _magnitude_choice(grp: g.Group, count: int) -> list[int]:
    """The units whose producer weights have the least energy (each producer normalized)."""
    score = np.zeros(grp.units)
    for node in grp.producers:
        w = constant_array(node.inputs[1]).astype(np.float64)
        view = np.moveaxis(w, g.producer_weight_axis(node), 0).reshape(grp.units, -1)
        energy = np.sum(view * view, axis=1)
        score += energy / max(float(energy.sum()), 1e-30)
    return [int(u) for u in np.argsort(score, kind="stable")[:count]]


def _zero_units(rewriter: Rewriter, grp: g.Group, units: np.ndarray) -> None:
    """Zero ``units`` in the producers and the per-unit constants after them, so they are zero where the
    readers see them."""

    def zero(node: ir.Node, index: int, axis: int, width: int) -> None:
        array = constant_array(node.inputs[index])
        if array is None:
            return
        array = np.array(array, copy=True)
        idx = (units[:, None] * width + np.arange(width)[None, :]).reshape(-1)
        moved = np.moveaxis(array, axis, 0)
        moved[idx] = 0
        _set_weight(rewriter, node, index, array, link=True)

    for node in grp.producers:
        zero(node, 1, g.producer_weight_axis(node), grp.head_size)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant_array(node.inputs[2])
            if bias is not None and bias.ndim >= 1 and bias.shape[-1] == grp.units * grp.head_size:
                zero(node, 2, -1, grp.head_size)
    for node in grp.through:
        track = grp.track(node.outputs[0])
        if track is None:
            continue
        span = grp.units * track.width
        if node.op_type == "Conv":
            zero(node, 1, 0, 1)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                zero(node, 2, 0, 1)
        elif node.op_type == "BatchNormalization":
            zero(node, 1, 0, 1)
            zero(node, 2, 0, 1)
        elif node.op_type in ("Add", "Sub"):
            for index, value in enumerate(node.inputs):
                array = constant_array(value) if grp.track(value) is None else None
                if array is not None and array.ndim >= -track.axis and array.shape[track.axis] == span:
                    zero(node, index, track.axis, track.width)


def _reader_output(node: ir.Node) -> tuple[ir.Value, tuple[ir.Node, int] | None]:
    """A reader's output with its bias added (the Add after a MatMul, if any) and where the bias is."""
    bias = _bias_of(node)
    out = bias[0].outputs[0] if bias is not None and bias[0] is not node else node.outputs[0]
    return out, bias


def _dense_targets(model: ir.Model, chosen: list[g.Group], feeds, masks) -> dict[str, np.ndarray]:
    """Per reader of ``chosen`` (by its output's name), the rows it should produce, from the model as it
    is now (dense): its output, or the residual sum it is added into (see :func:`_skip`)."""
    from ncc.passes.quant.fallback import measuring_session

    readers = [node for grp in chosen for node in grp.consumers]
    wanted = {}
    for node in readers:  # the reader's output, or the residual sum it feeds
        skip = _skip(node)
        wanted[_reader_output(node)[0].name] = (node, skip[0].outputs[0].name if skip else None)
    names = list(dict.fromkeys(sum_ or name for name, (_, sum_) in wanted.items()))
    session = measuring_session(model, names, prune=True)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    for index, (feed, mask) in enumerate(zip(feeds, masks)):  # rows per batch: the outputs are not kept
        results = session.run(feed, where=f"calibration batch {index}")
        for name, (node, sum_) in wanted.items():
            parts[name].append(_output_rows(node, [results[sum_ or name]], [mask]).astype(np.float32))
    return {name: np.concatenate(rows) for name, rows in parts.items()}


def _refit(rewriter, grp, stats: dict[int, Gram], removed) -> int:
    """Solve each reader's weight (and bias, where it has one) so that, on the pruned model's inputs
    (gathered before this group was zeroed: zeroing changes only the removed columns), it gives the dense
    model's output, from its input columns of the units not ``removed`` only (the others get zero weight).
    Returns how many readers were refitted."""
    keep_units = np.setdiff1d(np.arange(grp.units), np.array(removed))
    count = 0
    for node in grp.consumers:
        gram = stats.get(id(node))
        if gram is None or gram.c is None:
            continue
        width = grp.track(node.inputs[0]).width
        keep = (keep_units[:, None] * width + np.arange(width)[None, :]).reshape(-1)
        _refit_reader(rewriter, node, gram, keep)
        count += 1
    return count


def _refit_reader(rewriter: Rewriter, node: ir.Node, gram: Gram, keep: np.ndarray) -> None:
    _, bias = _reader_output(node)
    w_new, b_new = sc.refit(gram.h, gram.c, keep, intercept=bias is not None)
    weight = constant_array(node.inputs[1])
    axis = g.consumer_weight_axis(node)
    full = np.zeros((weight.shape[axis], gram.c.shape[1]))
    full[keep] = w_new
    moved_shape = (weight.shape[axis], *[d for i, d in enumerate(weight.shape) if i != axis])
    array = np.moveaxis(full.reshape(moved_shape), 0, axis).astype(weight.dtype)
    _set_weight(rewriter, node, 1, array, link=True)
    if bias is not None:
        bias_node, index = bias
        old = constant_array(bias_node.inputs[index])
        _set_weight(rewriter, bias_node, index, b_new.reshape(old.shape).astype(old.dtype), link=True)


def _bias_of(node: ir.Node) -> tuple[ir.Node, int] | None:
    """Where a reader's bias lives: (node, input index) — its own input 2 (Conv, Gemm) or a following
    Add of a constant (MatMul)."""
    if node.op_type in ("Conv", "Gemm"):
        if len(node.inputs) > 2 and node.inputs[2] is not None and constant_array(node.inputs[2]) is not None:
            return node, 2
        return None
    shape = node.inputs[1].shape
    found = bias_add(node.outputs[0], shape[1] if shape is not None else None)
    if found is None:
        return None
    add, value = found
    return add, list(add.inputs).index(value)
