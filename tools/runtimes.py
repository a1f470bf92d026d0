"""The runtimes ``ncc bench`` times an artefact in: onnxruntime and OpenVINO for ONNX files (``--runtime``),
TensorFlow for a SavedModel folder, LiteRT for a ``.tflite`` file.

A runner opens one model in one runtime and runs a feed (``run(outputs, feed)``, the call
:func:`ncc.tools.timing.time_blocks` makes); ``outputs(feed)`` returns its outputs by name, so quality
is measured in the runtime that will serve the model. OpenVINO runs at the precision the file asks
for: a model the ``bf16-precision`` pass marked in bf16, any other float model in f32
(``INFERENCE_PRECISION_HINT=f32``: on an AMX CPU OpenVINO would otherwise run it in bf16 unasked),
an int8 QDQ model at OpenVINO's default for the layers it leaves in float.

The TensorFlow runners (:func:`open_tf_runner`) also say what the artefact takes and gives
(``input_types``: name -> (numpy dtype, dims), ``output_dims``), since a TF artefact has no ONNX graph
to read that from:

- a SavedModel runs its serving signature (``serving_default`` unless another is named) through
  ``tf.saved_model.load``, fed and read by the signature's argument and output names, with
  ``threads`` intra-op threads and one inter-op thread, set before TensorFlow runs anything (a process
  can set them once); it is int8 when its graph holds real integer kernels (``QuantizeV2``,
  ``Dequantize``, ``Quantized*``, ``_FusedQuantized*``, ...; fake-quant ops run in float);
- a ``.tflite`` file runs in ``ai_edge_litert``'s interpreter with ``threads`` threads, its inputs
  resized to the batch fed; inputs and outputs stored as int8/uint8/int16 with a scale are quantized
  and dequantized with that scale and zero point inside ``run`` (the numbers a float caller sees), and
  its tensors are named as its one signature names them (``image``, not ``serving_default_image:0``).
  It is int8 when a Conv/FullyConnected weight is stored in int8.

TensorFlow and LiteRT are imported only when such an artefact is opened, with their log lines silenced.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from ncc.errors import NccError, first_line

RUNTIMES = ("onnxruntime", "openvino")


def parse_runtimes(text: str) -> tuple[str, ...]:
    """``--runtime onnxruntime,openvino`` -> the runtimes, in order, checked."""
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [n for n in names if n not in RUNTIMES]
    if not names or unknown:
        what = f"unknown runtime {unknown[0]!r}" if unknown else "no runtime"
        raise NccError(
            f"--runtime: {what}; ncc bench times ONNX artefacts in {', '.join(RUNTIMES)} "
            "(a SavedModel folder in TensorFlow, a .tflite file in LiteRT; torch artefacts are not timed yet)."
        )
    return names


class OrtRunner:
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int):
        from ncc.runtime import open_session
        from ncc.tools.bench import session_options

        self.session = open_session(path, options=session_options(threads)).ort
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.names = [o.name for o in self.session.get_outputs()]
        self.precision = self.precision_of(path)

    @staticmethod
    def precision_of(path: Path) -> str:
        """f32 or int8 (onnxruntime has no bf16 kernels: a bf16-marked model runs in f32)."""
        precision = _precision(Path(path))
        return "f32" if precision == "bf16" else precision

    def run(self, _outputs, feed):
        return self.session.run(None, {k: feed[k] for k in self.inputs})

    def outputs(self, feed) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.run(None, feed)))

    def close(self) -> None:
        self.session = None


class OpenVinoRunner:
    runtime = "openvino"

    def __init__(self, path: Path, threads: int, config: dict | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise NccError('--runtime openvino needs OpenVINO (pip install -e ".[openvino]").') from None
        self.precision = _precision(path)
        settings = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if self.precision in ("f32", "bf16"):
            settings["INFERENCE_PRECISION_HINT"] = self.precision
        config = {**settings, **(config or {})}
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as err:  # noqa: BLE001 - OpenVINO's first line says what it cannot run
            raise NccError(f"OpenVINO cannot compile {path}: {first_line(err)}.") from None
        self.request = self.compiled.create_infer_request()
        self.inputs = [i.get_any_name() for i in self.compiled.inputs]
        self.names = [o.get_any_name() for o in self.compiled.outputs]

    def run(self, _outputs, feed):
        return self.request.infer({k: feed[k] for k in self.inputs})

    def outputs(self, feed) -> dict[str, np.ndarray]:
        result = self.run(None, feed)
        return {name: np.array(result[port]) for name, port in zip(self.names, self.compiled.outputs)}

    def layer_precisions(self, kinds: tuple[str, ...]) -> Counter:
        """How many of the executed layers whose type is one of ``kinds`` (``FullyConnected``,
        ``Convolution``, ...) run in each precision (``u8``, ``u4``, ``f32``, ...)."""
        from ncc.backends.openvino.check import executed_layers

        return Counter(precision for _, kind, precision in executed_layers(self.compiled) if kind in kinds)

    def close(self) -> None:
        """Release the request before the compiled model, now: left to the garbage collector, OpenVINO's
        objects can be freed in the wrong order, which crashed a later test's process."""
        self.request = None
        self.compiled = None


def open_runner(runtime: str, path: Path, threads: int, config: dict | None = None):
    """``path`` opened in ``runtime`` with ``threads`` threads; ``config``: OpenVINO properties that
    override the runner's (``{"INFERENCE_PRECISION_HINT": "f32"}``), none for onnxruntime."""
    if runtime == "onnxruntime":
        if config:
            raise ValueError("onnxruntime runners take no OpenVINO config")
        return OrtRunner(Path(path), threads)
    return OpenVinoRunner(Path(path), threads, config)


def _precision(path: Path) -> str:
    """How OpenVINO should run ``path``: bf16 (the bf16 pipeline's mark), int8 (Q/DQ inside) or f32."""
    import onnx

    if Path(path).suffix.lower() != ".onnx":
        return "as stored"  # an .xml carries its own hint
    model = onnx.load(str(path), load_external_data=False)
    if any(p.key == "ncc.precision" and p.value == "bf16" for p in model.metadata_props):
        return "bf16"
    if any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        return "int8"
    return "f32"


# -- TensorFlow artefacts ---------------------------------------------------------------------------

_INSTALL = 'pip install -e ".[tensorflow]"'
#: TensorFlow ops that compute in integers (oneDNN's and TF's own int8 kernels); ``QuantizeAndDequantize*``
#: and ``FakeQuant*`` only round in float, so they do not count.
_TF_INT8_OPS = ("QuantizeV2", "Dequantize", "Requantize")
_TF_INT8_PREFIXES = ("Quantized", "_FusedQuantized", "_Quantized", "_MklQuantized", "_QuantizedFused")
#: TFLite ops whose second input is a weight.
_TFLITE_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D")


def open_tf_runner(fmt: str, path: Path, threads: int | None, *, signature: str | None = None):
    """A runner for a SavedModel folder (``fmt`` ``saved_model``) or a ``.tflite`` file (``tflite``);
    ``threads`` None leaves the runtime's own thread count."""
    if fmt == "saved_model":
        return TensorFlowRunner(Path(path), threads, signature=signature)
    return LiteRtRunner(Path(path), threads)


class TensorFlowRunner:
    """A SavedModel's signature in TensorFlow (see the module docstring)."""

    runtime = "tensorflow"

    def __init__(self, path: Path, threads: int | None, *, signature: str | None = None):
        from ncc.frontends.tensorflow import SERVING, quiet

        signature = signature or SERVING
        with quiet():
            try:
                import tensorflow as tf
            except ImportError:
                raise NccError(f"{path}: running a SavedModel needs TensorFlow ({_INSTALL}).") from None
            if threads is not None:
                _tf_threads(tf, threads)
            try:
                self._loaded = tf.saved_model.load(str(path))
            except Exception as err:  # noqa: BLE001 - TF raises many kinds on a folder it cannot read
                raise NccError(f"{path}: not a readable SavedModel ({first_line(err)}).") from None
            found = sorted(s for s in self._loaded.signatures.keys() if not s.startswith("_"))
            if signature not in found:
                listed = ", ".join(found) if found else "none"
                raise NccError(f"{path}: the SavedModel has no signature {signature!r} (it has: {listed}).")
            self.function = self._loaded.signatures[signature]
            self.precision = _saved_model_precision(path)
        _, specs = self.function.structured_input_signature
        outputs = self.function.structured_outputs
        self.input_types = {
            name: (_numpy_dtype(spec, path, name), _tf_dims(spec)) for name, spec in specs.items()
        }
        self.output_dims = {name: _tf_dims(spec) for name, spec in outputs.items()}
        self.inputs, self.names = list(self.input_types), list(self.output_dims)

    def run(self, _outputs, feed):
        result = self.function(**{name: feed[name] for name in self.inputs})
        return [result[name].numpy() for name in self.names]

    def outputs(self, feed) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.run(None, feed)))

    def close(self) -> None:
        self.function = self._loaded = None


class LiteRtRunner:
    """A ``.tflite`` file in LiteRT's interpreter (see the module docstring)."""

    runtime = "litert"

    def __init__(self, path: Path, threads: int | None):
        from ncc.frontends.tensorflow import native_stderr_captured, precheck

        precheck(path, "tflite")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise NccError(
                f"{path}: running a .tflite file needs LiteRT (ai-edge-litert; {_INSTALL})."
            ) from None
        with native_stderr_captured():  # "Created TensorFlow Lite XNNPACK delegate for CPU."
            try:
                self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
                self.interpreter.allocate_tensors()
            except Exception as err:  # noqa: BLE001 - ValueError / RuntimeError on a file it cannot run
                raise NccError(f"{path}: not a readable TFLite model ({first_line(err)}).") from None
        names = _tflite_signature_names(self.interpreter)
        # per input/output: (name, tensor index, the interpreter's dtype, scale, zero point)
        self._in = [_tflite_tensor(d, names) for d in self.interpreter.get_input_details()]
        self._out = [_tflite_tensor(d, names) for d in self.interpreter.get_output_details()]
        details = {d["index"]: d for d in self.interpreter.get_input_details()}
        self.input_types = {
            name: (_float_if_quantized(dtype, scale), _tflite_dims(details[index]))
            for name, index, dtype, scale, _ in self._in
        }
        out_details = {d["index"]: d for d in self.interpreter.get_output_details()}
        self.output_dims = {name: _tflite_dims(out_details[index]) for name, index, *_ in self._out}
        self.inputs, self.names = list(self.input_types), list(self.output_dims)
        self.precision = _tflite_precision(self.interpreter)
        self._shapes = {index: tuple(details[index]["shape"]) for _, index, *_ in self._in}

    def run(self, _outputs, feed):
        arrays = [
            (index, _quantize(np.asarray(feed[name]), dtype, scale, zp))
            for name, index, dtype, scale, zp in self._in
        ]
        if any(self._shapes[index] != array.shape for index, array in arrays):
            for index, array in arrays:
                self.interpreter.resize_tensor_input(index, list(array.shape), strict=False)
            self.interpreter.allocate_tensors()
            self._shapes = {index: array.shape for index, array in arrays}
        for index, array in arrays:
            self.interpreter.set_tensor(index, array)
        self.interpreter.invoke()
        return [
            _dequantize(self.interpreter.get_tensor(index), scale, zp) for _, index, _, scale, zp in self._out
        ]

    def outputs(self, feed) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.run(None, feed)))

    def close(self) -> None:
        self.interpreter = None


def run_feeds(runner, feeds: list[dict], names: list[str], arguments: dict[str, str]) -> dict[str, list]:
    """``runner``'s outputs ``names`` on each feed (one array per feed, as
    :func:`ncc.passes.quant.fallback.run` returns onnxruntime's); ``arguments`` renames feed keys (IR input
    names) to the artefact's input names."""
    results: dict[str, list] = {name: [] for name in names}
    for feed in feeds:
        out = runner.outputs({arguments.get(k, k): v for k, v in feed.items()})
        for name in names:
            if name not in out:
                raise NccError(f"the written model has no output {name!r} (it has {', '.join(out)}).")
            results[name].append(out[name])
    return results


def _tf_threads(tf, threads: int) -> None:
    """``threads`` intra-op threads and one inter-op thread; TensorFlow takes them only before it first runs."""
    config = tf.config.threading
    try:
        config.set_intra_op_parallelism_threads(threads)
        config.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # initialized already: fine when it runs as asked
        now = config.get_intra_op_parallelism_threads(), config.get_inter_op_parallelism_threads()
        if now != (threads, 1):
            raise NccError(
                f"TensorFlow already runs in this process with {now[0] or 'its default'} intra-op threads, "
                f"so --threads {threads} needs a fresh process."
            ) from None


def _saved_model_precision(path: Path) -> str:
    """int8 when the SavedModel's graph or its functions hold an integer kernel, else f32."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
    except Exception:  # noqa: BLE001 - a saved_model.pbtxt or an odd file: tf.saved_model.load read it
        return "f32"
    for meta in proto.meta_graphs:
        nodes = [*meta.graph_def.node, *(n for f in meta.graph_def.library.function for n in f.node_def)]
        if any(n.op in _TF_INT8_OPS or n.op.startswith(_TF_INT8_PREFIXES) for n in nodes):
            return "int8"
    return "f32"


def _numpy_dtype(spec, path: Path, name: str):
    dtype = spec.dtype
    if not (dtype.is_floating or dtype.is_integer or dtype.is_bool):
        raise NccError(f"{path}: input {name!r} is a {dtype.name} tensor; ncc bench feeds numeric tensors.")
    return np.dtype(dtype.as_numpy_dtype)


def _tf_dims(spec) -> list:
    shape = getattr(spec, "shape", None)
    if shape is None or shape.rank is None:
        return []
    return list(shape.as_list())


def _tflite_signature_names(interpreter) -> dict[int, str]:
    """Tensor index -> the name the model's one signature gives it (none when it has no signature or several)."""
    try:
        signatures = interpreter._get_full_signature_list()  # the public list has names, not tensors
    except Exception:  # noqa: BLE001 - an interpreter without it: fall back to tensor names
        return {}
    if len(signatures) != 1:
        return {}
    (signature,) = signatures.values()
    names = {index: name for part in ("inputs", "outputs") for name, index in signature[part].items()}
    return names if len(set(names.values())) == len(names) else {}


def _tflite_tensor(detail: dict, names: dict[int, str]) -> tuple:
    index = detail["index"]
    name = names.get(index) or detail["name"].removesuffix(":0")
    scale, zero_point = detail["quantization"]
    dtype = np.dtype(detail["dtype"])
    quantized = dtype.kind in "iu" and dtype.itemsize <= 2 and scale > 0
    return name, index, dtype, float(scale) if quantized else 0.0, int(zero_point)


def _tflite_dims(detail: dict) -> list:
    dims = detail.get("shape_signature")
    if dims is None or len(dims) != len(detail["shape"]):
        dims = detail["shape"]
    dims = [int(d) if d >= 0 else None for d in dims]
    return [None, *dims[1:]] if dims else dims  # the batch is resized to what is fed


def _float_if_quantized(dtype, scale: float):
    return np.dtype(np.float32) if scale else dtype


def _quantize(array: np.ndarray, dtype, scale: float, zero_point: int) -> np.ndarray:
    if not scale:
        return np.ascontiguousarray(array, dtype=dtype)
    limits = np.iinfo(dtype)
    q = np.round(array / np.float32(scale)) + zero_point
    return np.clip(q, limits.min, limits.max).astype(dtype)


def _dequantize(array: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    if not scale:
        return array
    return (array.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)


def _tflite_precision(interpreter) -> str:
    """int8 when a Conv/FullyConnected weight is stored in int8, else f32."""
    dtypes = {d["index"]: np.dtype(d["dtype"]) for d in interpreter.get_tensor_details()}
    try:
        ops = interpreter._get_ops_details()  # op names and inputs: not in the public API
    except Exception:  # noqa: BLE001 - without it, any int8 tensor with a scale says int8
        quantized = [d for d in interpreter.get_tensor_details() if d["quantization"][0] > 0]
        return "int8" if any(np.dtype(d["dtype"]) == np.int8 for d in quantized) else "f32"
    for op in ops:
        inputs = list(op["inputs"])
        if op["op_name"] in _TFLITE_WEIGHT_OPS and len(inputs) > 1 and dtypes.get(inputs[1]) == np.int8:
            return "int8"
    return "f32"
