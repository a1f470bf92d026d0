"""TensorFlow frontend: a SavedModel folder, a Keras file (``.keras``, ``.h5``), a frozen GraphDef (``.pb``)
or a ``.tflite`` becomes an ncc IR model.

Every format goes through tf2onnx at opset 17 and then the ONNX frontend's in-memory path
(:func:`ncc.frontends.onnx.from_proto`: checker, IR, inferred types, node ids); no file is written.

- **Keras** (``.keras``, ``.h5``): loaded with ``keras.models.load_model(compile=False)``, traced as a
  ``tf.function`` over one ``TensorSpec`` per model input (``tf2onnx.convert.from_function``).
- **SavedModel** (a folder holding ``saved_model.pb``): one signature (``serving_default`` unless
  ``signature`` names another) through tf2onnx's SavedModel loader.
- **Frozen GraphDef** (``.pb``): ``tf2onnx.convert.from_graph_def`` with the tensors ``inputs`` and
  ``outputs`` name; without them, its ``Placeholder`` ops are the inputs and the ops nothing reads the
  outputs.
- **TFLite** (``.tflite``): ``tf2onnx.convert.from_tflite``.

Names and shapes follow the user's model: the inputs are named as the Keras inputs or the signature's
arguments are, the outputs as the Keras output layers or the signature's outputs are. Graph and TFLite
tensor names lose a ``:0`` suffix (``image:0`` becomes ``image``; ``x:1`` stays), for every input and
output alike; a TFLite model with one signature takes that signature's names. An unknown leading
dimension of an input or output becomes the symbolic ``batch``; other unknown dimensions are named
``<value>_<axis>``. Inputs stay NHWC as the model has them (tf2onnx transposes inside the graph). A
BatchNorm tf2onnx cannot fold into a conv stays as ``Mul``/``Add`` pieces, left to the passes. The model
records its format in ``ncc.tf.source`` and the converter's version in ``ncc.tf.tf2onnx``.

A node tf2onnx cannot convert is one sentence naming the TensorFlow op, its node and, for Keras files,
the layer holding it. TensorFlow, Keras and tf2onnx are imported only inside these functions, with
their log lines (Python and C++) silenced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir
from ncc.errors import NccError, first_line

SOURCE = "ncc.tf.source"
"""Model metadata: the format the model was read from (``saved_model``, ``keras``, ``h5``, ``graph_def``,
``tflite``)."""
CONVERTER = "ncc.tf.tf2onnx"
"""Model metadata: the tf2onnx version that converted it."""
OPSET = 17
SERVING = "serving_default"

#: File suffixes read as TensorFlow models (a SavedModel is a folder holding ``saved_model.pb``).
SUFFIXES = {".keras": "keras", ".h5": "h5", ".hdf5": "h5", ".pb": "graph_def", ".tflite": "tflite"}

_TF_LOGGERS = ("tf2onnx", "tensorflow", "absl")


def tf_format(path: str | os.PathLike) -> str | None:
    """The TensorFlow format of ``path`` (``saved_model``, ``keras``, ``h5``, ``graph_def``, ``tflite``),
    judged by name alone, or ``None`` when it is not one. A ``saved_model.pb`` file means its folder."""
    path = Path(path)
    if path.is_dir():
        return "saved_model" if (path / "saved_model.pb").is_file() else None
    if path.name == "saved_model.pb":
        return "saved_model"
    return SUFFIXES.get(path.suffix.lower())


def lower_tf(
    path: str | os.PathLike,
    *,
    signature: str | None = None,
    inputs: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
) -> ir.Model:
    """Lower the TensorFlow model at ``path`` to the IR. ``signature`` picks a SavedModel's signature
    (default ``serving_default``); ``inputs``/``outputs`` name a frozen GraphDef's input and output
    tensors (``name`` or ``name:0``)."""
    path = Path(path)
    if path.name == "saved_model.pb":
        path = path.parent
    if not path.exists():
        raise NccError(f"{path}: no such file or folder.")
    fmt = tf_format(path)
    if fmt is None:
        what = "a folder without saved_model.pb" if path.is_dir() else f"suffix {path.suffix!r}"
        raise NccError(f"{path}: not a TensorFlow model ({what}).")
    if signature is not None and fmt != "saved_model":
        raise NccError(f"{path}: --signature applies to a SavedModel folder, not a {_KIND[fmt]}.")
    if (inputs or outputs) and fmt != "graph_def":
        raise NccError(
            f"{path}: --inputs/--outputs apply to a frozen GraphDef (.pb); a {_KIND[fmt]} names its own."
        )
    if path.is_file():
        precheck(path, fmt)
    layers: list[str] = []  # a Keras model's layer names, to name the layer holding an op
    names: dict[str, str] = {}  # tensor name -> the name the user's model gives it (TFLite signatures)
    with quiet() as errors:
        try:
            import tensorflow  # noqa: F401
            import tf2onnx
        except ImportError as err:
            raise NccError(
                f"{path}: reading a TensorFlow model needs tensorflow-cpu and tf2onnx "
                f'(pip install "ncc[tensorflow]"): {first_line(err)}.'
            ) from None
        if fmt in ("keras", "h5"):
            proto = _from_keras(path, fmt, errors, layers)
        elif fmt == "saved_model":
            proto = _from_saved_model(path, signature or SERVING, errors)
        elif fmt == "graph_def":
            proto = _from_graph_def(path, inputs, outputs, errors)
        else:
            proto = _from_tflite(path, errors, names)
    _refuse_unconverted(path, proto, errors, layers)

    from ncc.frontends.onnx import from_proto, normalize

    model = from_proto(proto, source=str(path))
    model.graph.name = re.sub(r"\W", "_", path.stem) or "model"  # not tf2onnx's own name
    model.graph.doc_string = None  # "converted from <traced function's name>": a counter, not the user's
    _tidy_names_and_dims(model, names)
    model.metadata_props[SOURCE] = fmt
    model.metadata_props[CONVERTER] = tf2onnx.__version__
    return normalize(model, str(path))


_KIND = {
    "saved_model": "SavedModel",
    "keras": "Keras model",
    "h5": "Keras HDF5 model",
    "graph_def": "frozen GraphDef",
    "tflite": "TFLite model",
}


def precheck(path: Path, fmt: str) -> None:
    """What can be told without TensorFlow (which takes seconds to import): unreadable, empty, or not the
    container its suffix says."""
    if not os.access(path, os.R_OK):
        raise NccError(f"{path}: cannot be read (permission denied).")
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as err:
        raise NccError(f"{path}: cannot be read ({first_line(err)}).") from None
    if not head:
        raise NccError(f"{path}: is empty, not a {_KIND[fmt]}.")
    if fmt == "keras" and not zipfile.is_zipfile(path):
        raise NccError(f"{path}: not a Keras model (a .keras file is a zip archive; this one is not).")
    if fmt == "tflite" and head[4:8] != b"TFL3":  # the flatbuffer's file identifier
        raise NccError(f"{path}: not a TFLite model (no TFL3 flatbuffer identifier).")


# -- the formats -------------------------------------------------------------------------------------


def _from_keras(path: Path, fmt: str, errors: list, layers: list[str]) -> Any:
    import keras
    import tensorflow as tf
    import tf2onnx

    try:
        model = keras.models.load_model(str(path), compile=False)
    except Exception as err:  # Keras raises many kinds on files it cannot read
        raise NccError(f"{path}: not a readable {_KIND[fmt]} ({first_line(err)}).") from None
    if not getattr(model, "inputs", None):
        raise NccError(f"{path}: the Keras model has no defined inputs (build it on an Input first).")
    layers += [layer.name for layer in getattr(model, "layers", [])]
    names = _keras_input_names(model)
    specs = [tf.TensorSpec(x.shape, x.dtype, name=name) for x, name in zip(model.inputs, names)]
    out_names = _keras_output_names(model)

    def call(*xs):
        result = model(xs[0] if len(xs) == 1 else list(xs), training=False)
        flat = tf.nest.flatten(result)
        return dict(zip(out_names, flat))

    try:
        function = tf.function(call, input_signature=specs, autograph=False)
        proto, _ = tf2onnx.convert.from_function(function, input_signature=specs, opset=OPSET)
    except NccError:
        raise
    except Exception as err:
        raise NccError(_conversion_failed(path, err, errors, layers)) from None
    return proto


def _keras_input_names(model: Any) -> list[str]:
    """The Keras inputs' names (``keras.Input(name=...)``), made unique and valid as TF op names."""
    names = []
    for i, x in enumerate(model.inputs):
        name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", getattr(x, "name", "") or "") or f"input_{i}"
        while name in names:
            name += "_"
        names.append(name)
    return names


def _keras_output_names(model: Any) -> list[str]:
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(model.outputs) or len(set(names)) != len(names):
        names = [f"output_{i}" for i in range(len(model.outputs))]
    return names


def _from_saved_model(path: Path, signature: str, errors: list) -> Any:
    import tf2onnx
    from tf2onnx import tf_loader

    try:
        import tensorflow as tf

        imported = tf.saved_model.load(str(path))
    except Exception as err:
        raise NccError(f"{path}: not a readable SavedModel ({first_line(err)}).") from None
    found = sorted(s for s in imported.signatures.keys() if not s.startswith("_"))
    if signature not in found:
        listed = ", ".join(found) if found else "none"
        raise NccError(f"{path}: the SavedModel has no signature {signature!r} (it has: {listed}).")
    del imported
    try:
        graph_def, inputs, outputs, renames = tf_loader.from_saved_model(
            str(path), None, None, tag=["serve"], signatures=[signature], return_tensors_to_rename=True
        )
        proto, _ = tf2onnx.convert._convert_common(  # the path of tf2onnx's own --saved-model
            graph_def,
            name=signature,
            continue_on_error=True,
            opset=OPSET,
            input_names=inputs,
            output_names=outputs,
            tensors_to_rename=renames,
        )
    except NccError:
        raise
    except Exception as err:
        raise NccError(_conversion_failed(path, err, errors)) from None
    return proto


def _from_graph_def(path: Path, inputs, outputs, errors: list) -> Any:
    import tensorflow as tf
    import tf2onnx

    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf's DecodeError, or an unreadable file
        raise NccError(f"{path}: not a frozen TensorFlow GraphDef ({first_line(err)}).") from None
    if not graph_def.node:
        raise NccError(f"{path}: not a frozen TensorFlow GraphDef (it has no nodes).")
    ops = {node.name: node for node in graph_def.node}
    inputs = [_tensor_name(n) for n in inputs] if inputs else _placeholders(graph_def)
    outputs = [_tensor_name(n) for n in outputs] if outputs else _sinks(graph_def)
    if not inputs or not outputs:
        missing = "inputs" if not inputs else "outputs"
        raise NccError(f"{path}: cannot tell the graph's {missing}; name them with --inputs/--outputs.")
    for name in [*inputs, *outputs]:
        if name.rpartition(":")[0] not in ops:
            raise NccError(f"{path}: the graph has no tensor {name!r} (no node {name.rpartition(':')[0]!r}).")
    if any(node.op in ("VarHandleOp", "VariableV2", "ReadVariableOp") for node in graph_def.node):
        raise NccError(
            f"{path}: the graph holds variables; freeze it first (convert_variables_to_constants_v2)."
        )
    try:
        proto, _ = tf2onnx.convert.from_graph_def(
            graph_def, name=path.stem, input_names=inputs, output_names=outputs, opset=OPSET
        )
    except Exception as err:
        raise NccError(_conversion_failed(path, err, errors)) from None
    return proto


def _tensor_name(name: str) -> str:
    return name if re.search(r":\d+$", name) else f"{name}:0"


def _placeholders(graph_def) -> list[str]:
    return [f"{node.name}:0" for node in graph_def.node if node.op == "Placeholder"]


def _sinks(graph_def) -> list[str]:
    """The first output of every op nothing reads (constants, no-ops and placeholders aside)."""
    read = {name.lstrip("^").split(":")[0] for node in graph_def.node for name in node.input}
    skip = {"Const", "NoOp", "Placeholder", "Assert", "SaveV2", "RestoreV2"}
    return [f"{node.name}:0" for node in graph_def.node if node.name not in read and node.op not in skip]


def _from_tflite(path: Path, errors: list, names: dict[str, str]) -> Any:
    import tf2onnx

    try:
        from tf2onnx.tflite_utils import read_tflite_model

        read_tflite_model(str(path))  # its tensors and their data, before tf2onnx walks the graph
        names.update(_tflite_signature_names(path.read_bytes()))
    except Exception as err:  # flatbuffers raise plain errors on a truncated or corrupt file
        raise NccError(f"{path}: not a readable TFLite model ({first_line(err)}).") from None
    try:
        proto, _ = tf2onnx.convert.from_tflite(str(path), opset=OPSET)
    except Exception as err:
        raise NccError(_conversion_failed(path, err, errors)) from None
    return proto


def _tflite_signature_names(data: bytes) -> dict[str, str]:
    """Tensor name -> argument name of the model's one signature (``serving_default_image`` -> ``image``),
    as a SavedModel's signature names them; nothing when the model has no signature or several."""
    from tf2onnx.tflite.Model import Model

    model = Model.GetRootAsModel(data, 0)
    if model.SignatureDefsLength() != 1 or model.SubgraphsLength() < 1:
        return {}
    signature = model.SignatureDefs(0)
    graph = model.Subgraphs(signature.SubgraphIndex())
    maps = [signature.Inputs(i) for i in range(signature.InputsLength())]
    maps += [signature.Outputs(i) for i in range(signature.OutputsLength())]
    names = {graph.Tensors(m.TensorIndex()).Name().decode(): m.Name().decode() for m in maps}
    return names if len(set(names.values())) == len(names) else {}


# -- errors and tidying ------------------------------------------------------------------------------

_UNSUPPORTED = re.compile(r"Tensorflow op \[(?P<node>.*): (?P<op>[^\]]+)\] is not supported")
_FAILED = re.compile(r"Failed to convert node '?(?P<node>[^']*?)'? \(fct=")


class _Collect(logging.Handler):
    def __init__(self, into: list):
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.into.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a malformed log record must not hide the conversion's result
            pass


@contextlib.contextmanager
def quiet():
    """TensorFlow's, Keras's and tf2onnx's log lines are not the user's business: silenced while they work
    (yields the list tf2onnx's errors are collected in, to name an op it could not convert)."""
    errors: list[str] = []
    loggers = [logging.getLogger(name) for name in _TF_LOGGERS]
    saved = [(lg, lg.level, lg.propagate, list(lg.handlers)) for lg in loggers]
    for lg in loggers:
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.setLevel(logging.ERROR)
        lg.propagate = False
    loggers[0].addHandler(_Collect(errors))
    try:
        with warnings.catch_warnings(), native_stderr_captured():
            warnings.simplefilter("ignore")
            yield errors
    finally:
        for lg, level, propagate, handlers in saved:
            for h in list(lg.handlers):
                lg.removeHandler(h)
            for h in handlers:
                lg.addHandler(h)
            lg.setLevel(level)
            lg.propagate = propagate


@contextlib.contextmanager
def native_stderr_captured():
    """File descriptor 2 into a temporary file: TensorFlow's C++ start-up notices (oneDNN, absl, the TFLite
    delegate) print there whatever ``TF_CPP_MIN_LOG_LEVEL`` says. Replayed when something other than an
    NccError escapes, so a bug keeps its context."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable descriptor 2: nothing to capture
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            yield
        except NccError:
            raise
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))


def _unsupported(errors: list[str]) -> tuple[str, str] | None:
    """(op, node) of the first op tf2onnx reported it cannot convert."""
    for message in errors:
        if m := _UNSUPPORTED.search(message):
            return m["op"], m["node"]
    return None


def _cannot_convert(path: Path, op: str, node: str, layers: Sequence[str] = ()) -> str:
    """The sentence for an op tf2onnx cannot convert, naming the Keras layer whose scope holds the node
    (Keras scopes a layer's ops as ``model/layer_N/...``)."""
    names = set(layers)
    scopes = node.split("/")[1:-1]  # past the model's own scope, up to the op
    layer = next((c for s in scopes for c in (s, re.sub(r"_\d+$", "", s)) if c in names), None)
    where = f"node {node!r}" + (f" in layer {layer!r}" if layer else "")
    return f"{path}: tf2onnx cannot convert TensorFlow op {op} ({where}) to ONNX opset {OPSET}."


def _conversion_failed(path: Path, err: BaseException, errors: list[str], layers: Sequence[str] = ()) -> str:
    if found := _unsupported(errors):
        return _cannot_convert(path, *found, layers)
    return f"{path}: tf2onnx could not convert the model ({first_line(err)})."


def _refuse_unconverted(path: Path, proto: Any, errors: list[str], layers: Sequence[str] = ()) -> None:
    """tf2onnx keeps going past a node it cannot convert and leaves it in the graph: refuse such a model
    naming the op (its logged error, else the first node outside ONNX's domains)."""
    if found := _unsupported(errors):
        raise NccError(_cannot_convert(path, *found, layers))
    for message in errors:
        if m := _FAILED.search(message):
            node = m["node"]
            op = next((n.op_type for n in proto.graph.node if n.name == node), "?")
            raise NccError(_cannot_convert(path, op, node, layers))
    import onnx.defs

    for node in proto.graph.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            raise NccError(_cannot_convert(path, node.op_type, node.name, layers))


def _tidy_names_and_dims(model: ir.Model, names: dict[str, str]) -> None:
    """Inputs and outputs named as ``names`` says (by tensor name, with or without ``:0``), else without
    a ``:0`` suffix; tf2onnx's ``unk__N`` dims named ``batch`` (leading axis) or ``<value>_<axis>``, the
    same name wherever the same ``unk__N`` appears."""
    graph = model.graph
    values = [*graph.inputs, *graph.outputs]
    taken = {v.name for v in values}
    for value in values:
        name = value.name or ""
        bare = name[:-2] if name.endswith(":0") else name
        new = names.get(name, names.get(bare, bare))
        if new != name and new not in taken:
            taken.add(new)
            value.name = new
    renames: dict[str, str] = {}
    for value in [*graph.inputs, *graph.outputs]:
        if value.shape is None:
            continue
        dims = list(value.shape.dims)
        for axis, dim in enumerate(dims):
            if isinstance(dim, int):
                continue
            old = dim.value if isinstance(dim, ir.SymbolicDim) else None
            if old is not None and old in renames:
                new = renames[old]
            else:
                new = "batch" if axis == 0 else f"{value.name}_{axis}"
                if old is not None and old.startswith("unk__"):
                    renames[old] = new
                elif old is not None:
                    continue  # a name the model chose: kept
            dims[axis] = ir.SymbolicDim(new)
        value.shape = ir.Shape(dims)
    if renames:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for value in node.outputs:
                if value.shape is not None and any(
                    isinstance(d, ir.SymbolicDim) and d.value in renames for d in value.shape.dims
                ):
                    value.shape = ir.Shape(
                        [
                            ir.SymbolicDim(renames[d.value])
                            if isinstance(d, ir.SymbolicDim) and d.value in renames
                            else d
                            for d in value.shape.dims
                        ]
                    )
