"""Distillation losses: the student learns from a teacher's outputs and, optionally, its intermediate layers.

``distill_loss(student_out, teacher_out, kind)``:

- ``kl``: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over the last axis, averaged over the
  batch (Hinton et al., 2015: the ``T^2`` keeps the gradient's size independent of the temperature);
- ``mse``: the mean squared difference;
- ``cosine``: ``1 - cos(student, teacher)`` per sample (each flattened), averaged over the batch.

The teacher's side is detached: only the student learns. ``mask`` (``[batch, positions]``, ones for real
tokens, an attention mask) leaves padded positions out of ``kl`` and ``mse`` (means over the real ones)
and zeroes them in both before ``cosine``. :class:`LayerMatch` records named layers' outputs of both
models with forward hooks and gives the mean of ``mse`` or ``cosine`` over the pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ncc.errors import NccError

KINDS = ("kl", "mse", "cosine")


def distill_loss(
    student_out: Any, teacher_out: Any, kind: str = "kl", temperature: float = 1.0, mask: Any = None
) -> Any:
    """The distillation loss of ``student_out`` against ``teacher_out`` (see the module docstring);
    ``temperature`` applies to ``kl``; ``mask`` leaves padded positions out."""
    import torch
    import torch.nn.functional as F

    if kind not in KINDS:
        raise NccError(f"unknown distillation loss {kind!r}: choose one of {', '.join(KINDS)}.")
    if not temperature > 0:
        raise NccError(f"temperature must be positive, got {temperature}.")
    if student_out.shape != teacher_out.shape:
        raise NccError(
            f"student output {tuple(student_out.shape)} and teacher output {tuple(teacher_out.shape)} "
            "differ in shape."
        )
    teacher_out = teacher_out.detach()
    keep = _positions(mask, student_out)
    if kind == "kl":
        t = float(temperature)
        log_p = F.log_softmax(student_out / t, dim=-1)
        log_q = F.log_softmax(teacher_out / t, dim=-1)
        per_sample = (log_q.exp() * (log_q - log_p)).sum(-1)
        if keep is not None:
            return (per_sample * keep[..., 0]).sum() / keep.sum() * t * t
        return per_sample.mean() * t * t
    if kind == "mse":
        if keep is not None:
            return ((student_out - teacher_out) ** 2 * keep).sum() / (keep.sum() * student_out.shape[-1])
        return F.mse_loss(student_out, teacher_out)
    if keep is not None:
        student_out, teacher_out = student_out * keep, teacher_out * keep
    s = student_out.reshape(student_out.shape[0], -1) if student_out.dim() > 1 else student_out[None]
    t = teacher_out.reshape(s.shape)
    return (1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean()


def _positions(mask: Any, out: Any) -> Any:
    """``mask`` as a float tensor ``[batch, positions, 1]`` against ``out`` ``[batch, positions, features]``,
    or None without a mask."""
    if mask is None:
        return None
    if out.dim() < 3 or tuple(mask.shape) != tuple(out.shape[:-1]):
        raise NccError(
            f"a mask of shape {tuple(mask.shape)} does not fit outputs of shape {tuple(out.shape)}: it takes "
            "[batch, positions] for outputs [batch, positions, features]."
        )
    return mask.to(out.dtype).unsqueeze(-1)


class LayerMatch:
    """Intermediate-layer distillation: ``pairs`` maps student module names to teacher module names
    (``model.named_modules()`` names; a :class:`~ncc.train.Trainable` is looked into). Each forward of
    the two models records those layers' outputs; :meth:`loss` is the mean ``kind`` loss over the pairs.
    Call :meth:`remove` (or use it as a context manager) to take the hooks off."""

    def __init__(self, student: Any, teacher: Any, pairs: Mapping[str, str], kind: str = "mse"):
        if kind not in ("mse", "cosine"):
            raise NccError(f"unknown layer-matching loss {kind!r}: choose mse or cosine.")
        if not pairs:
            raise NccError("LayerMatch needs at least one 'student layer': 'teacher layer' pair.")
        self.pairs, self.kind = dict(pairs), kind
        self.student: dict[str, Any] = {}
        self.teacher: dict[str, Any] = {}
        self._handles = []
        student_modules = dict(_inner(student).named_modules())
        teacher_modules = dict(_inner(teacher).named_modules())
        for s_name, t_name in self.pairs.items():
            for name, modules, side in (
                (s_name, student_modules, "student"),
                (t_name, teacher_modules, "teacher"),
            ):
                if name not in modules:
                    raise NccError(f"the {side} has no layer named {name!r}.")
            self._handles.append(
                student_modules[s_name].register_forward_hook(self._record(self.student, s_name))
            )
            self._handles.append(
                teacher_modules[t_name].register_forward_hook(self._record(self.teacher, t_name))
            )

    @staticmethod
    def _record(store: dict, name: str):
        def hook(module, args, output):
            store[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def loss(self, mask: Any = None) -> Any:
        """Mean loss over the pairs, from the outputs of the last forward of each model; ``mask``
        (``[batch, positions]``) leaves padded positions out."""
        total = None
        for s_name, t_name in self.pairs.items():
            if s_name not in self.student or t_name not in self.teacher:
                raise NccError(
                    f"no output recorded for pair {s_name!r} -> {t_name!r}: run both models first."
                )
            s, t = self.student[s_name], self.teacher[t_name]
            if s.shape != t.shape:
                raise NccError(
                    f"layer {s_name!r} {tuple(s.shape)} and teacher layer {t_name!r} {tuple(t.shape)} "
                    "differ in shape."
                )
            term = distill_loss(s, t, self.kind, mask=mask)
            total = term if total is None else total + term
        return total / len(self.pairs)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> LayerMatch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _inner(model: Any) -> Any:
    from ncc.train import trainable_type

    return model.module if isinstance(model, trainable_type()) else model
