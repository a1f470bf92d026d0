"""Write the IR as a TensorFlow SavedModel (``--target tf``) and check which layers it holds as int8 kernels.

A quantized IR (QOperator form from the ``tf`` profile) is lowered with :mod:`ncc.backends.tensorflow.int8`'s
rules into oneDNN's int8 ops, a float IR as plain TensorFlow ops; either way the graph's weights are
constants inside one ``tf.function``, saved as the ``serving_default`` signature (inputs by the IR's input
names, channels last as the user's Keras model has them; outputs by the IR's output names). It loads with
``tf.saved_model.load`` in stock ``tensorflow-cpu``, no ncc needed (ncc runs it through
:class:`ncc.tools.runtimes.TensorFlowRunner`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx_ir as ir
from ncc.backends.onnx.check import RuntimeCheck
from ncc.errors import NccError, first_line

SIGNATURE = "serving_default"


def _quantized(model: ir.Model) -> bool:
    return any(n.metadata_props.get("ncc.quant", "").startswith("int8") for n in model.graph)


def save_savedmodel(model: ir.Model, folder: str | Path) -> None:
    """Write ``model`` as a SavedModel in ``folder`` (created; it must not exist)."""
    import tensorflow as tf
    from ncc.backends.tensorflow.graph import lower
    from ncc.backends.tensorflow.int8 import rules

    function = lower(model, quant="float", rules=rules() if _quantized(model) else ())
    module = tf.Module()
    module.serve = function
    try:
        tf.saved_model.save(module, str(folder), signatures={SIGNATURE: function})
    except (ValueError, TypeError, tf.errors.OpError) as err:
        raise NccError(f"TensorFlow cannot save the lowered model: {first_line(err)}.") from None
    _settle_fingerprint(Path(folder))


def _settle_fingerprint(folder: Path) -> None:
    """TensorFlow stamps ``fingerprint.pb`` with a random ``uuid``; the same model gets the same one here
    (drawn from the graph's own checksum) so the same input and options give byte-identical folders."""
    import hashlib

    from tensorflow.core.protobuf import fingerprint_pb2

    path = folder / "fingerprint.pb"
    if not path.is_file():
        return
    fingerprint = fingerprint_pb2.FingerprintDef()
    fingerprint.ParseFromString(path.read_bytes())
    digest = hashlib.sha256((folder / "saved_model.pb").read_bytes()).digest()
    fingerprint.uuid = str(int.from_bytes(digest[:16], "big"))
    path.write_bytes(fingerprint.SerializeToString(deterministic=True))


def saved_ops(folder: str | Path) -> list[tuple[str, str]]:
    """``(node name, op type)`` of every node of a SavedModel's graphs and the functions they call, read from
    ``saved_model.pb`` (no TensorFlow session)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(folder) / "saved_model.pb").read_bytes())
    nodes = []
    for meta in proto.meta_graphs:
        graph = meta.graph_def
        nodes += [(n.name, n.op) for n in graph.node]
        nodes += [(n.name, n.op) for f in graph.library.function for n in f.node_def]
    return nodes


def check_on_tensorflow(folder: str | Path, model: ir.Model) -> RuntimeCheck:
    """Classify ``model``'s quantized layers by the ops the written SavedModel holds under each layer's name:
    an int8 kernel (``_FusedQuantizedConv2D``, ``_QuantizedMatMul``, ...) or float. (The fidelity run
    executes them: these ops have no float fallback.)"""
    import tensorflow as tf
    from ncc.backends.tensorflow.graph import scope_name
    from ncc.backends.tensorflow.int8 import TF_INT8_KERNELS

    ops = saved_ops(folder)
    check = RuntimeCheck(runtime=f"TensorFlow {tf.__version__} (oneDNN)")
    names = Counter(n.name for n in model.graph)
    for node in model.graph:
        if not node.metadata_props.get("ncc.quant", "").startswith("int8"):
            continue
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.op_type in _MOVES:
            continue
        if not node.name or names[node.name] > 1:
            check.unnamed += 1
            continue
        scope = scope_name(node.name) + "/"
        kinds = sorted({op for name, op in ops if name.startswith(scope) or f"/{scope}" in name})
        int8 = [k for k in kinds if k in TF_INT8_KERNELS]
        if int8:
            check.integer[node.name] = int8[0]
            check.kernels[int8[0]] += 1
        else:
            check.float_[node.name] = f"{node.op_type} runs as {', '.join(kinds) or 'nothing found'}"
    return check


#: Ops an 8-bit tensor passes through unchanged (not layers: not counted).
_MOVES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity"})
