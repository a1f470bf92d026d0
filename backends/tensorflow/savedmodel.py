"""Write the IR as a TensorFlow SavedModel (``--target tf``), run one, and check which layers run in int8.

A quantized IR (QOperator form from the ``tf`` profile) is lowered with :mod:`ncc.backends.tensorflow.int8`'s
rules into oneDNN's int8 ops, a float IR as plain TensorFlow ops; either way the graph's weights are
constants inside one ``tf.function``, saved as the ``serving_default`` signature (inputs by the IR's input
names, channels last as the user's Keras model has them; outputs by the IR's output names). It loads with
``tf.saved_model.load`` in stock ``tensorflow-cpu``, no ncc needed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
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


class SavedModelRunner:
    """A SavedModel's ``serving_default`` signature, called on numpy feeds keyed by input name."""

    def __init__(self, folder: str | Path, signature: str = SIGNATURE):
        import tensorflow as tf

        self.tf = tf
        try:
            self.loaded = tf.saved_model.load(str(folder))
        except (OSError, ValueError, tf.errors.OpError) as err:
            raise NccError(f"TensorFlow cannot load the SavedModel {folder}: {first_line(err)}.") from None
        self.function = self.loaded.signatures[signature]
        self.inputs = list(self.function.structured_input_signature[1])

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {name: self.tf.constant(feed[name]) for name in self.inputs}
        return {name: t.numpy() for name, t in self.function(**tensors).items()}

    def ops(self) -> list[tuple[str, str]]:
        """``(node name, op type)`` of every node in the signature's graph and the functions it calls."""
        graph = self.function.graph.as_graph_def()
        nodes = [(n.name, n.op) for n in graph.node]
        for function in graph.library.function:
            nodes += [(n.name, n.op) for n in function.node_def]
        return nodes


def run_savedmodel(
    folder: str | Path, feeds: list[dict[str, np.ndarray]], names: list[str]
) -> dict[str, list]:
    """The SavedModel's outputs ``names`` on each feed (one array per feed, as :func:`ncc.passes.quant.fallback.run`
    returns onnxruntime's)."""
    runner = SavedModelRunner(folder)
    results: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        out = runner({_argument(runner.inputs, k): v for k, v in feed.items()})
        for name in names:
            if name not in out:
                raise NccError(f"the SavedModel {folder} has no output {name!r}.")
            results[name].append(out[name])
    return results


def _argument(arguments: list[str], name: str) -> str:
    """The signature argument carrying the IR input ``name`` (the lowering replaces non-identifier
    characters by ``_``)."""
    if name in arguments:
        return name
    import re

    cleaned = re.sub(r"\W", "_", name)
    for argument in arguments:
        if argument.rstrip("_") in (cleaned, f"input_{cleaned}"):
            return argument
    raise NccError(f"the SavedModel has no input for {name!r} (it takes {', '.join(arguments)}).")


def check_on_tensorflow(folder: str | Path, model: ir.Model) -> RuntimeCheck:
    """Load the written SavedModel and classify ``model``'s quantized layers by the ops its graph holds under
    each layer's name: an int8 kernel (``_FusedQuantizedConv2D``, ``_QuantizedMatMul``, ...) or float."""
    import tensorflow as tf
    from ncc.backends.tensorflow.graph import scope_name
    from ncc.backends.tensorflow.int8 import TF_INT8_KERNELS

    runner = SavedModelRunner(folder)
    ops = runner.ops()
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
