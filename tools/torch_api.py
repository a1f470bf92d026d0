"""``ncc.torch``: compile a PyTorch module through ncc's IR and get a PyTorch module back.

    import ncc.torch
    qmodel = ncc.torch.compile(model, (example,), pipeline="int8", calib=[(x,) for x in batches])
    qmodel(example)                  # runs the int8 graph (torch.compile / Inductor on first call)
    qmodel.save("model.int8.pt2")    # a torch.export program holding int8 weights only
    ir_model = ncc.torch.lower(model, (example,))   # the IR, for dumps and custom pipelines
    from ncc.torch import train      # training-time pruning, QAT and distillation (:mod:`ncc.train`)

The module goes through the torch frontend (:mod:`ncc.frontends.torch`, static shapes: the example
inputs' batch size is the module's), the named pipeline with the ``inductor`` target profile, and the
torch backend (:mod:`ncc.backends.torch.fx`), which spells the quantized IR in PT2E's reference form.
Running it compiles with Inductor (``freezing``, under ``no_grad``), which lowers that form to oneDNN
int8 kernels; :func:`ncc.backends.torch.check.inductor_check` counts them. The file name is not
``torch.py``: a module of that name would shadow torch itself for code run from the repository root.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError

__all__ = ["compile", "lower"]


def lower(model: Any, example_inputs: Sequence[Any], **options) -> ir.Model:
    """``model`` as an ncc IR model (see :func:`ncc.frontends.torch.lower`)."""
    from ncc.frontends.torch import lower as lower_module

    return lower_module(model, example_inputs, **options)


def compile(  # noqa: A001 - the PyTorch user's word for it
    model: Any,
    example_inputs: Sequence[Any],
    *,
    pipeline: str = "int8",
    calib: Iterable[Any] | str | os.PathLike | None = None,
    target: str = "inductor",
    options: str = "",
    check: bool = True,
) -> Any:
    """Quantize ``model`` with ncc's ``pipeline`` (``int8``, ``int8-dynamic``, ... or a pass list) and return
    it as a torch module. ``calib`` is an iterable of input tuples (or single tensors, or dicts by input
    name), or an ``.npz`` path, as ``--calib`` takes; ``options`` adds pass options as on the command
    line (``"min-cosine=0.999"`` style, applied to every pass that has them). With ``check`` the module is
    compiled by Inductor right away and ``.check`` says how many quantized layers run as int8 kernels."""
    import torch

    if target != "inductor":
        raise NccError(f"ncc.torch.compile targets 'inductor' (given {target!r}).")
    from ncc.backends.torch.fx import to_graph_module
    from ncc.passes.base import PassContext
    from ncc.passes.manager import PassManager
    from ncc.passes.spec import parse_pipeline, with_options

    inputs = tuple(example_inputs)
    model_ir = lower(model, inputs, dynamic_batch=False)
    names = [v.name for v in model_ir.graph.inputs if not v.is_initializer()]
    passes = parse_pipeline(pipeline)  # a pipeline name or a pass list
    fields = {f.name for p in passes for f in p.options()}
    updates = {"target": target} if "target" in fields else {}
    for item in options.split():
        key, _, value = item.partition("=")
        updates[key.replace("-", "_")] = value
    passes = with_options(passes, updates) if updates else passes
    ctx = PassContext(source=type(model).__name__)
    ctx.data["progress"] = False
    if calib is not None:
        ctx.data["calibration_data"] = _calibration_data(calib, names, inputs)
    report = PassManager(passes).run(model_ir, ctx)
    graph_module = to_graph_module(model_ir)
    with torch.no_grad():
        graph_module(*inputs)  # fails here, not at the user's first call, if the lowering is wrong
    compiled = _compiled_type()(graph_module, inputs, model_ir, report)
    if check:
        compiled(*inputs)
    return compiled


def _calibration_data(calib, names: list[str], inputs: tuple):
    """``calib`` as :class:`~ncc.passes.quant.calib_data.CalibrationData` keyed by the IR's input names."""
    from ncc.passes.quant.calib_data import CalibrationData, load_calibration_data

    if isinstance(calib, (str, os.PathLike)):
        return load_calibration_data(str(calib))
    samples = list(calib)
    if not samples:
        raise NccError("calibration data is empty: give at least one batch of inputs.")

    def piece(sample) -> dict[str, np.ndarray]:
        if isinstance(sample, dict):
            return {k: _array(v) for k, v in sample.items()}
        values = sample if isinstance(sample, (tuple, list)) else (sample,)
        if len(values) != len(names):
            raise NccError(f"a calibration batch holds {len(values)} inputs; the model takes {len(names)}.")
        return {n: _array(v) for n, v in zip(names, values)}

    pieces = [piece(s) for s in samples]
    count = sum(next(iter(p.values())).shape[0] for p in pieces)
    return CalibrationData("calibration batches", lambda: iter(pieces), num_samples=count)


def _array(value) -> np.ndarray:
    import torch

    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


@functools.cache
def _compiled_type():
    import torch

    class Compiled(torch.nn.Module):
        """The compiled model: ``graph_module`` (ATen ops, PT2E's quantized form) run through Inductor on
        the first call; ``ir`` the model after the pipeline, ``report`` what the passes did."""

        def __init__(self, graph_module, example_inputs, model_ir, report):
            super().__init__()
            self.graph_module = graph_module
            self.example_inputs = example_inputs
            self.ir = model_ir
            self.report = report
            self.check = None  # an InductorCheck, after the first call
            self._compiled = None

        def forward(self, *args):
            if self._compiled is None:
                from ncc.backends.torch.check import inductor_check

                self._compiled = inductor(self.graph_module)
                self.check, outputs = inductor_check(self._compiled, args, self.ir, self.graph_module)
                return outputs
            return self._compiled(*args)

        def export(self):
            """The graph as a ``torch.export.ExportedProgram`` (int8 weights as constants)."""
            with torch.no_grad():
                return torch.export.export(self.graph_module, self.example_inputs, strict=False)

        def save(self, path: str | os.PathLike, *, aoti: bool = False) -> None:
            """``torch.export.save`` of :meth:`export`; load it in a fresh process after
            ``import torch.ao.quantization.fx._decomposed`` (which registers the quantized ops). With
            ``aoti``, an AOTInductor package of it instead (``path`` ending in ``.pt2``), compiled for this
            CPU; load it with ``torch._inductor.aoti_load_package``."""
            if aoti:
                from ncc.backends.torch.save import package_aoti

                package_aoti(self.export(), path)
            else:
                torch.export.save(self.export(), str(path))

    return Compiled


def inductor(module):
    """``module`` compiled by Inductor as its x86 int8 lowering needs: ``freezing`` (weights become
    constants the int8 patterns match), run under ``no_grad``."""
    import torch
    import torch._inductor.config as config

    compiled = torch.compile(module, backend="inductor")

    def run(*args):
        with torch.no_grad(), config.patch({"freezing": True}), warnings.catch_warnings():
            # Inductor's oneDNN lowering copies the weight zero points with torch.tensor(tensor)
            warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
            return compiled(*args)

    return run


def __getattr__(name: str):
    if name == "Compiled":  # a torch.nn.Module subclass: defined once torch is imported
        return _compiled_type()
    if name == "train":  # ncc.torch.train: training-time pruning, QAT and distillation (ncc.train)
        import importlib

        return importlib.import_module("ncc.train")
    raise AttributeError(name)
