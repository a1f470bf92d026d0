"""Running a model in onnxruntime: the one module that creates sessions.

Calibration, the min-cosine fallback, bias correction, the check of an emitted artefact and
``ncc bench`` all run models. What they share is decided here, once:

- **Options.** CPU provider, warnings off; threads, optimization level and an optimized-model
  file by purpose (:func:`session_options`).
- **Weights.** A model held in memory is serialized without its large weights: they reach
  onnxruntime as arrays (``add_external_initializers``), so nothing is copied into a proto or
  written to disk, and memory-mapped external weights are read once.
- **Batching.** A model whose inputs have a fixed batch dimension (an export traced at batch 1)
  is fed in slices of that size whatever the caller's batch, and the outputs are concatenated
  (:meth:`Session.run`).
- **Errors.** An onnxruntime failure becomes one sentence (:class:`~ncc.errors.NccError`) naming
  what was loaded or run, never a traceback.

onnx-ir stops at the graph (it has no runtime helper), so this layer is ncc's own. The IR package
does not import it: running a model is a tool's or a pass's business, not the IR's. What the IR needs
of onnxruntime, the ``com.microsoft`` op schemas its verifier checks contrib ops against, this module
registers with :func:`ncc.ir.verifier.register_schemas` when it is imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.errors import first_line as base_first_line
from ncc.ir import verifier
from ncc.ir.rewrite import Rewriter

__all__ = [
    "Session",
    "open_session",
    "run",
    "session_options",
    "HANDOFF_BYTES",
    "WEIGHT_ONLY_IN_FLOAT",
    "detach_weights",
]

WEIGHT_ONLY_IN_FLOAT = {"session.qdq_matmulnbits_accuracy_level": "0"}
"""Session config: a float activation times a DequantizeLinear'd 4/8-bit weight is computed in float.
onnxruntime otherwise fuses such a MatMul into MatMulNBits at accuracy level 4, quantizing the activation
to int8 itself (per block, at run time): what a QDQ weight-only file gets by default, but not what the
model's Q/DQ say, and not what a MatMulNBits file with ``accuracy_level = 0`` (pack-int4's default) does."""

HANDOFF_BYTES = 1024
"""Initializers of at least this many bytes reach onnxruntime as arrays, not inside the proto."""

#: External-data location written into the proto for a handed-over weight; nothing is ever read there.
HANDOFF_LOCATION = "ncc-handoff"

_HANDOFF_TYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.DOUBLE,
        ir.DataType.FLOAT16,
        ir.DataType.INT8,
        ir.DataType.UINT8,
        ir.DataType.INT16,
        ir.DataType.UINT16,
        ir.DataType.INT32,
        ir.DataType.UINT32,
        ir.DataType.INT64,
        ir.DataType.UINT64,
        ir.DataType.BOOL,
    }
)

Optimization = Literal["all", "extended", "basic", "none"]

#: Domains of onnxruntime's contrib ops, whose schemas the verifier checks them against.
CONTRIB_DOMAINS = frozenset({"com.microsoft"})


def contrib_schemas() -> list:
    """onnxruntime's op schemas (every domain; the verifier keeps those of ``CONTRIB_DOMAINS``)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    return get_all_operator_schema()


verifier.register_schemas(CONTRIB_DOMAINS, contrib_schemas)


def session_options(
    *,
    threads: int | None = None,
    optimization: Optimization = "all",
    optimized_model: str | Path | None = None,
    sequential: bool = False,
    spinning: bool = True,
    fuse_qdq: bool = True,
):
    """onnxruntime ``SessionOptions``: ``threads`` intra-op threads (default: onnxruntime's own),
    ``optimization`` level, ``optimized_model`` (where onnxruntime writes the graph it will run),
    ``sequential``: one inter-op thread and sequential execution, as every timing in ncc runs;
    ``spinning=False``: idle intra-op workers sleep at once instead of spinning for the next run;
    ``fuse_qdq=False``: QuantizeLinear/DequantizeLinear stay ops around float kernels (fake quantization,
    exact in float) instead of being fused into onnxruntime's integer kernels."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    if optimized_model is not None:
        options.optimized_model_filepath = str(optimized_model)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not fuse_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if sequential:
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


class Session:
    """An onnxruntime session with ncc's batching and error translation.

    ``ort`` is the underlying ``InferenceSession`` (timing loops call it directly); ``batch`` is the
    model's fixed batch size, or None when its inputs take any batch.
    """

    def __init__(self, session, what: str, keep_alive: Any = None):
        self.ort = session
        self.what = what
        self._keep_alive = keep_alive  # arrays the session reads in place
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.batch = _fixed_batch(session.get_inputs())

    def run(
        self, feeds: Mapping[str, Any], outputs: Sequence[str] | None = None, *, where: str = ""
    ) -> dict[str, np.ndarray]:
        """Outputs by name (all of them when ``outputs`` is None) for ``feeds`` (inputs the model does
        not take are ignored). A feed whose batch differs from the model's fixed batch runs in slices."""
        names = list(outputs) if outputs is not None else self.output_names
        feed = {k: np.asarray(v) for k, v in feeds.items() if k in self.input_names}
        count = _feed_batch(feed)
        if self.batch is None or count is None or count == self.batch:
            return dict(zip(names, self._run(names, feed, where)))
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start in range(0, count, self.batch):
            stop = min(start + self.batch, count)
            chunk = {k: _slice_padded(v, start, stop, self.batch) for k, v in feed.items()}
            for name, out in zip(names, self._run(names, chunk, where)):
                out = np.asarray(out)
                if out.ndim == 0 or out.shape[0] != self.batch:
                    raise NccError(
                        f"{self.what} has a fixed batch of {self.batch} and its output {name!r} has no batch "
                        f"axis, so a batch of {count} samples cannot run in slices; give batches of {self.batch}."
                    )
                parts[name].append(out[: stop - start])
        return {n: np.concatenate(p, axis=0) for n, p in parts.items()}

    def _run(self, names: list[str], feed: dict[str, np.ndarray], where: str) -> list:
        try:
            return self.ort.run(names, feed)
        except Exception as err:
            if not type(err).__module__.startswith("onnxruntime"):
                raise
            at = f" on {where}" if where else ""
            raise NccError(f"onnxruntime failed to run {self.what}{at}: {first_line(err)}.") from None


def open_session(
    model: ir.Model | str | Path,
    *,
    outputs: Sequence[str] = (),
    prune: bool = False,
    options=None,
    what: str | None = None,
    disabled_optimizers: Sequence[str] = (),
    fuse_qdq: bool = True,
    config: Mapping[str, str] | None = None,
) -> Session:
    """A :class:`Session` on ``model`` (in memory, or a file path).

    For a model in memory, ``outputs`` (values of its main graph) are exposed as extra graph outputs,
    or, with ``prune``, as its only outputs, with every node they do not depend on removed (onnxruntime
    runs every node whatever is fetched). The model itself is not changed.

    Without ``options``, the session's idle workers do not spin: the passes that open sessions work on
    the results in Python between runs (or while the next one runs), and spinning workers would take
    the CPU from that work. Timings pass their own options. ``disabled_optimizers`` names onnxruntime
    graph transformers the session must not run; ``fuse_qdq``: see :func:`session_options` (only without
    ``options``); ``config``: session config entries (:data:`WEIGHT_ONLY_IN_FLOAT`).
    """
    import onnxruntime as ort

    if options is not None and not fuse_qdq:
        raise ValueError("fuse_qdq=False applies to ncc's own options: pass it to session_options")
    options = options if options is not None else session_options(spinning=False, fuse_qdq=fuse_qdq)
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    keep_alive = None
    if isinstance(model, (str, Path)):
        what = what or str(model)
        source: Any = str(model)
    else:
        what = what or (f"model {model.graph.name!r}" if model.graph.name else "the model")
        clone = _exposed(model, outputs, prune)
        # initializers nothing reads (insert-qdq's float weights, kept for correct-bias until dce, are most
        # of a model's bytes): onnxruntime would parse them only to drop them
        rewriter = Rewriter(clone, clone.graph)
        for value in list(clone.graph.initializers.values()):
            rewriter.drop_if_unused(value)
        detached = detach_weights(clone, memory_mapped=True)
        for value in clone.graph.initializers.values():  # small external tensors travel in the proto
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and str(tensor.location) != HANDOFF_LOCATION:
                value.const_value = ir.Tensor(np.array(tensor.numpy(), copy=True), name=tensor.name)
        arrays = [array for _, array in detached]
        ort_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        if detached:
            options.add_external_initializers([name for name, _ in detached], ort_values)
        source = ir.serde.serialize_model(clone).SerializeToString()
        keep_alive = (arrays, ort_values)
    try:
        session = ort.InferenceSession(
            source,
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(disabled_optimizers) or None,
        )
    except Exception as err:
        if not type(err).__module__.startswith("onnxruntime"):
            raise
        raise NccError(f"onnxruntime cannot load {what}: {first_line(err)}.") from None
    return Session(session, what, keep_alive)


def run(
    model: ir.Model | str | Path,
    feeds: Mapping[str, Any] | Sequence[Any],
    outputs: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """Run ``model`` once on the CPU; ``feeds`` by input name or in input order; returns the
    ``outputs`` (default: the graph outputs) in order."""
    extra = [] if outputs is None or isinstance(model, (str, Path)) else list(outputs)
    session = open_session(model, outputs=extra)
    if not isinstance(feeds, Mapping):
        if len(feeds) != len(session.input_names):
            raise NccError(
                f"the model takes {len(session.input_names)} inputs ({', '.join(session.input_names)}); "
                f"got {len(feeds)}."
            )
        feeds = dict(zip(session.input_names, feeds))
    names = list(outputs) if outputs is not None else session.output_names
    result = session.run(feeds, names)
    return [result[n] for n in names]


def detach_weights(model: ir.Model, *, memory_mapped: bool) -> list[tuple[str, np.ndarray]]:
    """Replace the main graph's used initializers of at least ``HANDOFF_BYTES`` (numpy-native types) by
    references to nowhere, so that serializing ``model`` copies no weights; returns ``(name, array)``
    for each. ``memory_mapped``: detach external (memory-mapped) tensors too, as copies, else leave them.
    Only for a clone: the model no longer holds its weights."""
    detached = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.dtype not in _HANDOFF_TYPES or tensor.nbytes < HANDOFF_BYTES:
            continue
        if not value.uses() and not value.is_graph_output():
            continue  # onnxruntime drops an unused initializer before it would take the array
        external = isinstance(tensor, ir.ExternalTensor)
        if external and not memory_mapped:
            continue
        # a copy of a memory-mapped tensor: the session must not read from a map its owner may close
        array = np.array(tensor.numpy(), copy=True) if external else np.ascontiguousarray(tensor.numpy())
        value.const_value = ir.ExternalTensor(
            HANDOFF_LOCATION,
            offset=0,
            length=array.nbytes,
            dtype=tensor.dtype,
            shape=tensor.shape,
            name=value.name,
            base_dir="",
        )
        detached.append((value.name, array))
    return detached


def first_line(err: BaseException) -> str:
    """:func:`ncc.errors.first_line` without onnxruntime's bracketed prefix (``[ONNXRuntimeError]``)."""
    text = base_first_line(err)
    while text.startswith("[") and "]" in text:
        text = text[text.index("]") + 1 :].strip(" :")
    return text or type(err).__name__


def _exposed(model: ir.Model, outputs: Sequence[str], prune: bool) -> ir.Model:
    clone = model.clone()
    if not outputs and not prune:
        return clone
    values = {v.name: v for v in clone.graph.inputs}
    values.update(clone.graph.initializers)
    for node in clone.graph:
        values.update((o.name, o) for o in node.outputs if o.name)
    if prune:
        clone.graph.outputs.clear()
    present = {v.name for v in clone.graph.outputs}
    for name in outputs:
        value = values.get(name)
        if value is None:
            raise ValueError(f"no value named {name!r} in the model")
        if value.type is None:
            value.type = ir.TensorType(ir.DataType.FLOAT)
        if name not in present:
            clone.graph.outputs.append(value)
            present.add(name)
    if prune:
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(clone)
    return clone


def _fixed_batch(inputs) -> int | None:
    """The batch size every input of rank >= 1 fixes on its first axis, or None (dynamic or mixed)."""
    sizes = {i.shape[0] for i in inputs if i.shape}
    if len(sizes) == 1:
        (size,) = sizes
        if isinstance(size, int) and size > 0:
            return size
    return None


def _feed_batch(feed: Mapping[str, np.ndarray]) -> int | None:
    sizes = {v.shape[0] for v in feed.values() if v.ndim}
    return sizes.pop() if len(sizes) == 1 else None


def _slice_padded(array: np.ndarray, start: int, stop: int, size: int) -> np.ndarray:
    """``array[start:stop]`` along axis 0, padded to ``size`` rows by repeating its last row."""
    if not array.ndim:
        return array
    part = array[start:stop]
    if len(part) < size:
        part = np.concatenate([part, np.repeat(part[-1:], size - len(part), axis=0)])
    return part
