"""``ncc.torch.train``: training-time compression for your own PyTorch loop, handed back to ncc's IR.

Not a trainer: the user keeps the loop and adds three calls::

    from ncc.torch import train
    teacher = copy.deepcopy(model).eval()            # prepare() changes the model in place
    plan = train.Plan(prune=train.Prune("4x1", 0.8, criterion="snip-momentum", end_step=1000, exclude=("fc2",)),
                      quantize=train.Quantize(calib=[(x,) for x in batches]))
    student = train.prepare(model, (example,), plan)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)   # after prepare()
    for x, y in data:
        optimizer.zero_grad()
        out = student(x)
        loss = F.cross_entropy(out, y) + train.distill_loss(out, teacher(x), "kl", temperature=2)
        loss.backward()
        optimizer.step()
        student.step(optimizer)      # after optimizer.step(): scores, masks, pruned weights zeroed
    ir_model = train.finalize(student, (example,), "model.onnx")
    # ncc compile model.onnx --passes "fuse-activation,insert-qdq" -o model.int8.onnx  (QAT ranges)

- :mod:`~ncc.train.masks`: pruning patterns (``4x1``, ``2:4``, ``channel``, ...), criteria
  (``magnitude``, ``snip-momentum``) and schedules (``cubic``, ``linear``, ``oneshot``);
- :mod:`~ncc.train.qat`: fake quantization on insert-qdq's grid, ranges from calibration, fixed or
  learned (LSQ);
- :mod:`~ncc.train.distill`: :func:`distill_loss` and :class:`LayerMatch`;
- :mod:`~ncc.train.finalize`: masks made permanent, fake quantization removed, the float model lowered to
  the IR with the QAT ranges as ``calibrate`` would have left them, and written.

torch is imported by these modules' functions (and by ``prepare``), never by ``import ncc``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ncc.errors import NccError
from ncc.train.distill import LayerMatch, distill_loss
from ncc.train.finalize import finalize
from ncc.train.masks import Prune
from ncc.train.qat import Quantize

__all__ = ["LayerMatch", "Plan", "Prune", "Quantize", "distill_loss", "finalize", "prepare", "trainable_type"]


@dataclass(frozen=True, eq=False)
class Plan:
    """What :func:`prepare` adds: pruning masks with a schedule, fake quantization, or both."""

    prune: Prune | None = None
    quantize: Quantize | None = None

    def __post_init__(self) -> None:
        if self.prune is not None and not isinstance(self.prune, Prune):
            raise NccError(f"Plan.prune must be a Prune, got {type(self.prune).__name__}.")
        if self.quantize is not None and not isinstance(self.quantize, Quantize):
            raise NccError(f"Plan.quantize must be a Quantize, got {type(self.quantize).__name__}.")


def prepare(model: Any, example_inputs: Sequence[Any], plan: Plan) -> Any:
    """``model`` (changed in place) wrapped in a :func:`Trainable <trainable_type>` that prunes and
    fake-quantizes as ``plan`` says. Create the optimizer afterwards, over the wrapper's parameters (learned
    activation ranges are among them). ``example_inputs`` (tensors in ``forward``'s order) check the model
    runs and calibrate when ``Quantize.calib`` is None."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise NccError(f"prepare() takes an nn.Module, got {type(model).__name__}.")
    if not isinstance(plan, Plan):
        raise NccError(f"prepare() takes a train.Plan, got {type(plan).__name__}.")
    if plan.prune is None and plan.quantize is None:
        raise NccError("the plan is empty: give Plan(prune=..., quantize=...) at least one of them.")
    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise NccError("example inputs must be a non-empty sequence of tensors, in forward()'s order.")
    return trainable_type()(model, inputs, plan)


@functools.cache
def trainable_type():
    """The class :func:`prepare` returns (an ``nn.Module``; defined once torch is imported)."""
    import torch
    from ncc.train.masks import Pruner
    from ncc.train.qat import Quantizer

    class Trainable(torch.nn.Module):
        """The user's model (``.module``, changed in place) with pruning masks and fake quantization.

        Call order in a training step: ``loss.backward()``, ``optimizer.step()``, then
        ``trainable.step(optimizer)``: snip-momentum reads ``|w * grad|`` there (the weight after the
        optimizer's update, the gradient of this step), the masks are recomputed when the schedule says
        so, and pruned weights (and the optimizer's momentum for them) are zeroed."""

        def __init__(self, module, example_inputs, plan):
            super().__init__()
            self.module = module
            self.plan = plan
            self.activation_quant = torch.nn.ModuleDict()
            self.pruner = Pruner(module, plan.prune) if plan.prune is not None else None
            self.quantizer = None
            if self.pruner is not None:
                self.pruner.start()
            if plan.quantize is not None:
                self.quantizer = Quantizer(module, plan.quantize, self.activation_quant)
                calib = plan.quantize.calib
                self.quantizer.calibrate(module, [example_inputs] if calib is None else calib)

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

        def step(self, optimizer=None) -> None:
            """One training step is done (see the class docstring)."""
            if self.pruner is not None:
                self.pruner.step(optimizer)

        @property
        def steps(self) -> int:
            return self.pruner.steps if self.pruner is not None else 0

        def sparsity_report(self) -> dict[str, dict[str, Any]]:
            """Per pruned layer: ``pattern``, scheduled ``target``, achieved ``sparsity`` (fraction of zero
            mask entries), ``zeros`` and ``weights``."""
            return self.pruner.report() if self.pruner is not None else {}

        def quant_ranges(self) -> dict[str, dict[str, tuple[float, float]]]:
            """Per quantized layer: its input range (fake quantization's) and its observed output range."""
            return self.quantizer.ranges() if self.quantizer is not None else {}

    return Trainable


def __getattr__(name: str):
    if name == "Trainable":
        return trainable_type()
    raise AttributeError(f"module 'ncc.train' has no attribute {name!r}")
