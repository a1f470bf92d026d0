"""Fake quantization for quantization-aware training, on the grid ncc's ``insert-qdq`` will use.

- **Weights** of ``nn.Linear`` / ``nn.Conv2d``: symmetric int8 per output channel (or per tensor),
  ``s = max|w| / 127``, ``q = clip(round(w / s), -127, 127)``, as insert-qdq stores them. The scale follows
  the weight (insert-qdq recomputes it from the finalized weights, so a learned weight scale could not
  be handed over); rounding passes gradients straight through.
- **Input activations** of those layers: uint8 asymmetric per tensor, with insert-qdq's parameters for a
  range ``[lo, hi]`` (:func:`ncc.passes.quant.observers.quant_params`: the range widened to hold 0,
  ``scale = (hi - lo) / 255``, ``zero_point = round(-lo / scale)``), ``y = (clip(round(x / scale) + zp, 0,
  255) - zp) * scale``. ``lo`` and ``hi`` start as the min/max observed on calibration batches (the model
  in eval mode at :func:`prepare`, ncc's ``minmax`` method) and are then fixed, or learned
  (``learnable``): autograd through the expression above with a straight-through round is LSQ's
  gradient on the scale (Esser et al., 2020; LSQ+'s on the offset), scaled by ``1 / sqrt(numel * 255)``.

The learned ``[lo, hi]`` of each layer's input is what :func:`ncc.train.finalize` writes onto the IR as
the calibrated range of that value. Each layer's output range is observed too (min/max at calibration,
then a moving average in training), for outputs that do not feed another quantized layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ncc.errors import NccError

QMAX_WEIGHT = 127
ACT_LEVELS = 255
OUTPUT_MOMENTUM = 0.01  # the output observer's moving average in training


@dataclass(frozen=True, eq=False)
class Quantize:
    """Fake-quantize every ``nn.Linear`` / ``nn.Conv2d`` (weights and inputs): see the module docstring.
    ``calib``: batches of inputs (tuples in ``forward``'s order, or single tensors) that set the initial
    activation ranges; ``None`` uses the example inputs. ``per_channel=False`` matches
    ``insert-qdq{weights=per-tensor}``."""

    calib: Iterable[Any] | None = None
    learnable: bool = False
    per_channel: bool = True

    def __post_init__(self) -> None:
        if self.calib is not None and not isinstance(self.calib, Iterable):
            raise NccError(
                f"Quantize.calib must be an iterable of input batches, got {type(self.calib).__name__}."
            )
        for name in ("learnable", "per_channel"):
            if not isinstance(getattr(self, name), bool):
                raise NccError(f"Quantize.{name} must be True or False, got {getattr(self, name)!r}.")


def quant_params(lo: Any, hi: Any) -> tuple[Any, Any]:
    """``(scale, zero_point)`` (float32 tensors) of uint8 asymmetric quantization of ``[lo, hi]``, computed
    as :func:`ncc.passes.quant.observers.quant_params` does (in float64, the scale rounded to float32),
    differentiable in ``lo`` and ``hi`` (the zero point's rounding passes gradients straight through)."""
    import torch

    rmin = torch.clamp(lo.double(), max=0.0)
    rmax = torch.clamp(hi.double(), min=0.0)
    tiny = float(torch.finfo(torch.float32).tiny)
    scale = torch.clamp((rmax - rmin) / ACT_LEVELS, min=tiny).float()
    # quant_params gives a zero range scale 1, zero point 0
    scale = torch.where(rmax > rmin, scale, torch.ones_like(scale))
    exact = -rmin / scale.double()
    zero_point = torch.clamp(exact + (torch.round(exact) - exact).detach(), 0, ACT_LEVELS).float()
    return scale, zero_point


def fake_quant_activation(x: Any, scale: Any, zero_point: Any) -> Any:
    """``DequantizeLinear(QuantizeLinear(x))`` with uint8 parameters, rounding half to even as ONNX does;
    the gradient passes straight through rounding and is zero where ``x`` is clipped."""
    import torch

    exact = x / scale
    rounded = exact + (torch.round(exact) - exact).detach()
    q = torch.clamp(rounded + zero_point, 0, ACT_LEVELS)
    return (q - zero_point) * scale


def fake_quant_weight(w: Any, per_channel: bool) -> Any:
    """Symmetric int8 ``w`` (per output channel along dim 0, or per tensor) as insert-qdq stores it."""
    import torch

    flat = w.detach().abs().reshape(w.shape[0], -1)
    absmax = flat.amax(dim=1) if per_channel else flat.amax().reshape(1)
    scale = torch.where(absmax > 0, absmax / QMAX_WEIGHT, torch.ones_like(absmax))
    scale = scale.reshape((-1,) + (1,) * (w.dim() - 1))
    exact = w / scale
    rounded = exact + (torch.round(exact) - exact).detach()
    return torch.clamp(rounded, -QMAX_WEIGHT, QMAX_WEIGHT) * scale


def _types():
    import torch

    class WeightFakeQuant(torch.nn.Module):
        """Parametrization of a weight: its symmetric int8 fake quantization (off while calibrating)."""

        def __init__(self, per_channel: bool):
            super().__init__()
            self.per_channel = per_channel
            self.enabled = True

        def forward(self, weight):
            return fake_quant_weight(weight, self.per_channel) if self.enabled else weight

    class ActivationFakeQuant(torch.nn.Module):
        """A layer input's uint8 fake quantization; while ``observing``, records min/max and passes through.
        Also keeps the layer output's observed range (``out_lo``, ``out_hi``)."""

        def __init__(self, learnable: bool):
            super().__init__()
            zero = torch.zeros(())
            if learnable:
                self.lo, self.hi = torch.nn.Parameter(zero.clone()), torch.nn.Parameter(zero.clone())
            else:
                self.register_buffer("lo", zero.clone())
                self.register_buffer("hi", zero.clone())
            self.register_buffer("out_lo", zero.clone())
            self.register_buffer("out_hi", zero.clone())
            self.register_buffer("seen", torch.zeros((), dtype=torch.bool))
            # an input never seen below 0 (after a Relu) keeps lo = 0: insert-qdq clamps a Relu output's lo
            # to 0, and the grid must stay the one the model trained with
            self.register_buffer("nonnegative", torch.zeros((), dtype=torch.bool))
            self.learnable = learnable
            self.observing = False

        def observe(self, x) -> None:
            with torch.no_grad():
                lo, hi = torch.aminmax(x.detach().float())
                if not self.seen:
                    self.lo.copy_(lo)
                    self.hi.copy_(hi)
                else:
                    self.lo.copy_(torch.minimum(self.lo, lo))
                    self.hi.copy_(torch.maximum(self.hi, hi))

        def observe_output(self, y) -> None:
            with torch.no_grad():
                lo, hi = torch.aminmax(y.detach().float())
                if self.observing and not self.seen:
                    self.out_lo.copy_(lo)
                    self.out_hi.copy_(hi)
                elif self.observing:
                    self.out_lo.copy_(torch.minimum(self.out_lo, lo))
                    self.out_hi.copy_(torch.maximum(self.out_hi, hi))
                elif self.training:
                    self.out_lo.lerp_(lo, OUTPUT_MOMENTUM)
                    self.out_hi.lerp_(hi, OUTPUT_MOMENTUM)

        def forward(self, x):
            if self.observing:
                self.observe(x)
                return x
            lo, hi = self.lo, self.hi
            if self.nonnegative:
                lo = torch.zeros_like(lo)
            if self.learnable:  # LSQ's gradient scale
                g = 1.0 / math.sqrt(x.numel() * ACT_LEVELS)
                lo = (lo - lo * g).detach() + lo * g
                hi = (hi - hi * g).detach() + hi * g
            scale, zero_point = quant_params(lo, hi)
            return fake_quant_activation(x, scale, zero_point)

        def range(self) -> tuple[float, float]:
            lo = 0.0 if self.nonnegative else float(self.lo.detach())
            return lo, float(self.hi.detach())

    return WeightFakeQuant, ActivationFakeQuant


class Quantizer:
    """Fake quantization on every ``nn.Linear`` / ``nn.Conv2d`` of ``model``: a weight parametrization and
    an input :class:`ActivationFakeQuant` (held by the :class:`~ncc.train.Trainable`, keyed by layer)."""

    def __init__(self, model: Any, quantize: Quantize, holder: Any):
        import torch
        from torch.nn.utils import parametrize

        weight_type, act_type = _types()
        self.quantize = quantize
        self.layers: dict[str, Any] = {}
        self.activations: dict[str, Any] = {}
        self.handles = []
        for name, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            parametrize.register_parametrization(module, "weight", weight_type(quantize.per_channel))
            act = act_type(quantize.learnable)
            holder[key(name)] = act
            self.layers[name] = module
            self.activations[name] = act
            self.handles.append(module.register_forward_pre_hook(_input_hook(act)))
            self.handles.append(module.register_forward_hook(_output_hook(act)))
        if not self.layers:
            raise NccError("the model has no nn.Linear or nn.Conv2d layer to quantize.")

    def weight_quants(self) -> list[Any]:
        return [m.parametrizations.weight[-1] for m in self.layers.values()]

    def calibrate(self, model: Any, batches: Iterable[Any]) -> None:
        """Initial ranges: min/max of each layer's input and output on ``batches``, float weights, eval mode."""
        import torch

        training = model.training
        model.eval()
        for fq in self.weight_quants():
            fq.enabled = False
        for act in self.activations.values():
            act.observing = True
        count = 0
        try:
            with torch.no_grad():
                for batch in batches:
                    args = batch if isinstance(batch, (tuple, list)) else (batch,)
                    model(*args)
                    count += 1
                    for act in self.activations.values():
                        act.seen.fill_(True)
        finally:
            for fq in self.weight_quants():
                fq.enabled = True
            for act in self.activations.values():
                act.observing = False
                with torch.no_grad():
                    act.nonnegative.fill_(bool(act.lo >= 0))
                    act.lo.clamp_(max=0.0)  # the range always holds 0 (quant_params widens it so)
            model.train(training)
        if count == 0:
            raise NccError("Quantize.calib is empty: give at least one batch of inputs.")
        unseen = [name for name, act in self.activations.items() if not act.seen]
        if unseen:
            raise NccError(
                f"layer {unseen[0]!r} never ran on the calibration batches: no range for its input."
            )

    def ranges(self) -> dict[str, dict[str, tuple[float, float]]]:
        """Per layer: the input range fake quantization uses and the observed output range."""
        return {
            name: {"input": act.range(), "output": (float(act.out_lo), float(act.out_hi))}
            for name, act in self.activations.items()
        }


def key(name: str) -> str:
    """A layer name as a ``ModuleDict`` key (no dots)."""
    return name.replace(".", "/") if name else "/"


def _input_hook(act):
    def hook(module, args):
        return (act(args[0]), *args[1:])

    return hook


def _output_hook(act):
    def hook(module, args, output):
        act.observe_output(output)

    return hook
