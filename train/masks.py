"""Pruning masks: patterns, criteria and the sparsity schedule (the ``prune`` half of :func:`prepare`).

A layer's weight is viewed as a matrix ``[out, in * kh * kw]`` (rows: output channels; columns: what
one output reads, in torch's memory order). A pattern groups its entries into blocks that are kept or
pruned whole:

- ``"RxC"`` (``4x1``, ``2x1``): blocks of R consecutive rows by C consecutive columns;
- ``"N:M"`` (``2:4``, ``1:2``): in every group of M consecutive columns of a row, N are kept (the
  sparsity is ``1 - N/M`` whatever ``Prune.sparsity`` says);
- ``"channel"``: whole rows (output channels); ``"unstructured"``: single weights.

A block's score is the sum of its weights' scores: ``|w|`` (``magnitude``), or ``|w * grad|``
accumulated with momentum (``snip-momentum``, as Intel Neural Compressor defined it:
``score = m * score + (1 - m) * |w * g|`` at every :meth:`Pruner.step`). Each layer keeps its
highest-scoring blocks (a local ranking: each layer reaches the target within one block).

The target sparsity ramps from 0 at ``start_step`` to ``sparsity`` at ``end_step`` (``cubic``:
``S * (1 - (1 - t)^3)`` as Zhu & Gupta, 2017; ``linear``), the masks being recomputed every
``frequency`` steps; ``oneshot`` prunes to ``sparsity`` at once. A mask multiplies the weight in
forward (a ``torch.nn.utils.parametrize`` parametrization), and the stored weight, and optionally the
optimizer's state for it, are zeroed at every step, so momentum cannot revive a pruned weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from ncc.errors import NccError

Criterion = Literal["magnitude", "snip-momentum"]
Schedule = Literal["cubic", "linear", "oneshot"]
_PATTERN = re.compile(r"^(?:(\d+)x(\d+)|(\d+):(\d+)|unstructured|channel)$")


@dataclass(frozen=True)
class Prune:
    """What to prune and when: see the module docstring. ``include``/``exclude`` are regexes searched in
    module names (``model.named_modules()``); only ``nn.Linear`` and ``nn.Conv2d`` weights are pruned."""

    pattern: str = "4x1"
    sparsity: float = 0.8
    criterion: Criterion = "magnitude"
    schedule: Schedule = "cubic"
    start_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    momentum: float = 0.9
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        match = _PATTERN.match(str(self.pattern))
        if match is None:
            raise NccError(
                f"unknown pruning pattern {self.pattern!r}: give 'RxC' (4x1, 2x1), 'N:M' (2:4, 1:2), "
                "'unstructured' or 'channel'."
            )
        rows, cols, n, m = match.groups()
        if rows is not None and (int(rows) < 1 or int(cols) < 1):
            raise NccError(f"pruning pattern {self.pattern!r}: block sides must be at least 1.")
        if n is not None and not 0 < int(n) < int(m):
            raise NccError(f"pruning pattern {self.pattern!r}: N:M needs 0 < N < M.")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise NccError(f"sparsity must be in [0, 1), got {self.sparsity}.")
        _choice("criterion", self.criterion, ("magnitude", "snip-momentum"))
        _choice("schedule", self.schedule, ("cubic", "linear", "oneshot"))
        if self.start_step < 0:
            raise NccError(f"start_step must be at least 0, got {self.start_step}.")
        if self.schedule != "oneshot" and self.end_step <= self.start_step:
            raise NccError(
                f"end_step ({self.end_step}) must come after start_step ({self.start_step}) for a "
                f"{self.schedule} schedule."
            )
        if self.frequency < 1:
            raise NccError(f"frequency must be at least 1 step, got {self.frequency}.")
        if not 0.0 <= float(self.momentum) < 1.0:
            raise NccError(f"momentum must be in [0, 1), got {self.momentum}.")
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as err:
                raise NccError(f"include/exclude pattern {pattern!r} is not a regex: {err}.") from None

    @property
    def target(self) -> float:
        """The sparsity reached at ``end_step``: ``1 - N/M`` for N:M patterns, else ``sparsity``."""
        nm = self.n_m
        return 1.0 - nm[0] / nm[1] if nm else float(self.sparsity)

    @property
    def n_m(self) -> tuple[int, int] | None:
        match = _PATTERN.match(self.pattern)
        return (int(match.group(3)), int(match.group(4))) if match.group(3) else None

    @property
    def block(self) -> tuple[int, int] | None:
        """``(rows, columns)`` of a block, ``None`` for N:M; a channel's width is the whole row (0)."""
        if self.pattern == "unstructured":
            return (1, 1)
        if self.pattern == "channel":
            return (1, 0)
        match = _PATTERN.match(self.pattern)
        return (int(match.group(1)), int(match.group(2))) if match.group(1) else None

    def target_at(self, step: int) -> float:
        """The scheduled sparsity after ``step`` calls of :meth:`Pruner.step` (0 before ``start_step``)."""
        if self.schedule == "oneshot":
            return self.target
        if step <= self.start_step:
            return 0.0
        t = min(1.0, (step - self.start_step) / (self.end_step - self.start_step))
        ramp = 1.0 - (1.0 - t) ** 3 if self.schedule == "cubic" else t
        return self.target * ramp

    def updates_at(self, step: int) -> bool:
        """Whether the masks are recomputed at ``step``: every ``frequency`` steps within the ramp, and at
        its end."""
        if self.schedule == "oneshot" or not self.start_step < step <= self.end_step:
            return False
        return (step - self.start_step) % self.frequency == 0 or step == self.end_step

    def selects(self, name: str) -> bool:
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)


def _choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise NccError(f"unknown {what} {value!r}: choose one of {', '.join(allowed)}.")


def check_divisible(name: str, shape: tuple[int, int], prune: Prune) -> None:
    """One sentence naming the layer when its ``[out, in]`` matrix does not split into the pattern's blocks."""
    out, cols = shape
    nm, block = prune.n_m, prune.block
    if nm and cols % nm[1]:
        raise NccError(
            f"layer {name!r}: its {cols} input columns do not split into groups of {nm[1]} for "
            f"pattern {prune.pattern} (exclude it or choose another pattern)."
        )
    if block and (out % block[0] or (block[1] and cols % block[1])):
        raise NccError(
            f"layer {name!r}: its weight [{out}, {cols}] (out, in*kh*kw) does not split into "
            f"{block[0]}x{block[1]} blocks for pattern {prune.pattern} (exclude it or choose another pattern)."
        )


def compute_mask(scores: Any, prune: Prune, sparsity: float) -> Any:
    """The 0/1 mask (``scores``' shape, ``[out, cols]``) keeping the highest-scoring blocks at ``sparsity``.

    RxC and channel: ``round(sparsity * blocks)`` lowest blocks are pruned. N:M: the pattern is applied
    to ``sparsity / (1 - N/M)`` of the groups (those that lose the least score), so it is exact in every
    group once the schedule reaches its end."""
    import torch

    out, cols = scores.shape
    ones = torch.ones_like(scores)
    if sparsity <= 0.0:
        return ones
    nm = prune.n_m
    if nm:
        n, m = nm
        groups = scores.reshape(out, cols // m, m)
        order = groups.argsort(dim=-1, descending=True, stable=True)
        keep = torch.zeros_like(groups).scatter_(-1, order[..., :n], 1.0)
        lost = (groups * (1 - keep)).sum(-1).flatten()  # score each group loses under N:M
        count = min(lost.numel(), int(round(sparsity / (1 - n / m) * lost.numel())))
        chosen = torch.zeros_like(lost)
        chosen[lost.argsort(stable=True)[:count]] = 1.0
        chosen = chosen.reshape(out, cols // m, 1)
        return (chosen * keep + (1 - chosen)).reshape(out, cols)
    rows, width = prune.block
    width = width or cols
    blocks = scores.reshape(out // rows, rows, cols // width, width).sum(dim=(1, 3))
    count = int(round(sparsity * blocks.numel()))
    kept = torch.ones(blocks.numel(), dtype=scores.dtype, device=scores.device)
    kept[blocks.flatten().argsort(stable=True)[:count]] = 0.0
    kept = kept.reshape(out // rows, 1, cols // width, 1).expand(-1, rows, -1, width)
    return kept.reshape(out, cols)


def _mask_type():
    import torch

    class Mask(torch.nn.Module):
        """``weight * mask`` (a parametrization): the mask is a buffer, saved with the module."""

        def __init__(self, shape):
            super().__init__()
            self.register_buffer("mask", torch.ones(shape))

        def forward(self, weight):
            return weight * self.mask

    return Mask


class Pruner:
    """The masks of the selected layers and their schedule; :class:`~ncc.train.Trainable` drives it."""

    def __init__(self, model: Any, prune: Prune):
        import torch
        from torch.nn.utils import parametrize

        self.prune = prune
        self.layers: dict[str, Any] = {}  # name -> module
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and prune.selects(name):
                weight = module.weight
                check_divisible(name, (weight.shape[0], weight[0].numel()), prune)
                self.layers[name] = module
        if not self.layers:
            raise NccError("no nn.Linear or nn.Conv2d layer is selected for pruning: check include/exclude.")
        mask_type = _mask_type()
        for module in self.layers.values():
            parametrize.register_parametrization(module, "weight", mask_type(module.weight.shape))
        self.scores = {name: None for name in self.layers}
        self.steps = 0
        self.sparsity = 0.0  # the scheduled sparsity the masks were last computed for

    # -- the tensors --------------------------------------------------------------------------------
    @staticmethod
    def original(module: Any) -> Any:
        return module.parametrizations.weight.original

    @staticmethod
    def mask(module: Any) -> Any:
        return module.parametrizations.weight[0].mask

    # -- schedule -----------------------------------------------------------------------------------
    def start(self) -> None:
        """At :func:`prepare`: a ``oneshot`` schedule prunes now (snip-momentum then reads the ``.grad``
        present, from a backward run before prepare)."""
        if self.prune.schedule != "oneshot":
            return
        if self.prune.criterion == "snip-momentum":
            if any(self.original(m).grad is None for m in self.layers.values()):
                raise NccError(
                    "snip-momentum with a oneshot schedule scores weights by their gradients: run a "
                    "backward pass before prepare(), or use criterion 'magnitude' or a ramp schedule."
                )
            self._accumulate()
        self.update(self.prune.target)

    def step(self, optimizer: Any = None) -> None:
        """One training step done (after ``loss.backward()`` and ``optimizer.step()``): accumulate
        snip-momentum scores from ``.grad``, recompute the masks when the schedule says so, and zero the
        pruned weights (and, with ``optimizer``, their momentum/Adam state)."""
        self.steps += 1
        if self.prune.criterion == "snip-momentum" and self.prune.schedule != "oneshot":
            self._accumulate()
        if self.prune.updates_at(self.steps):
            self.update(self.prune.target_at(self.steps))
        self.apply(optimizer)

    def _accumulate(self) -> None:
        import torch

        m = self.prune.momentum
        with torch.no_grad():
            for name, module in self.layers.items():
                weight = self.original(module)
                if weight.grad is None:
                    continue
                score = (weight * weight.grad).abs().reshape(weight.shape[0], -1).float()
                prev = self.scores[name]
                self.scores[name] = score * (1 - m) if prev is None else prev * m + score * (1 - m)

    def update(self, sparsity: float) -> None:
        """Recompute every mask for ``sparsity`` from the criterion's scores."""
        import torch

        with torch.no_grad():
            for name, module in self.layers.items():
                weight = self.original(module)
                if self.prune.criterion == "magnitude":
                    scores = weight.detach().abs().reshape(weight.shape[0], -1).float()
                else:
                    scores = self.scores[name]
                    if scores is None:  # no gradient seen yet: nothing to rank by
                        continue
                mask = compute_mask(scores, self.prune, sparsity)
                self.mask(module).copy_(mask.reshape(weight.shape))
        self.sparsity = sparsity
        self.apply()

    def apply(self, optimizer: Any = None) -> None:
        """Zero the pruned entries of each stored weight (and of ``optimizer``'s state for it)."""
        import torch

        with torch.no_grad():
            for module in self.layers.values():
                weight, mask = self.original(module), self.mask(module)
                weight.mul_(mask)
                tensors = [(weight, mask)]
                if self.prune.pattern == "channel" and module.bias is not None:
                    # a removed channel is dead only with its bias: slim removes what is exactly zero
                    alive = (mask.reshape(mask.shape[0], -1).sum(dim=1) > 0).to(module.bias.dtype)
                    module.bias.mul_(alive)
                    tensors.append((module.bias, alive))
                if optimizer is not None:
                    for tensor, keep in tensors:
                        for value in optimizer.state.get(tensor, {}).values():
                            if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                                value.mul_(keep)

    def report(self) -> dict[str, dict[str, Any]]:
        rows = {}
        for name, module in self.layers.items():
            mask = self.mask(module)
            zeros = int((mask == 0).sum())
            rows[name] = {
                "pattern": self.prune.pattern,
                "target": round(self.sparsity, 6),
                "sparsity": zeros / mask.numel(),
                "zeros": zeros,
                "weights": mask.numel(),
            }
        return rows
