"""The runtimes ``ncc bench --runtime`` times an artefact in: onnxruntime and OpenVINO.

A runner opens one model file in one runtime and runs a feed (``run(outputs, feed)``, the call
:func:`ncc.tools.timing.time_blocks` makes); ``outputs(feed)`` returns its outputs by name, so quality
is measured in the runtime that will serve the model. OpenVINO runs at the precision the file asks
for: a model the ``bf16-precision`` pass marked in bf16, any other float model in f32
(``INFERENCE_PRECISION_HINT=f32``: on an AMX CPU OpenVINO would otherwise run it in bf16 unasked),
an int8 QDQ model at OpenVINO's default for the layers it leaves in float.
"""

from __future__ import annotations

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
            "(torch and tf artefacts are not timed by ncc bench yet)."
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

    def __init__(self, path: Path, threads: int):
        try:
            import openvino as ov
        except ImportError:
            raise NccError('--runtime openvino needs OpenVINO (pip install -e ".[openvino]").') from None
        self.precision = _precision(path)
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if self.precision in ("f32", "bf16"):
            config["INFERENCE_PRECISION_HINT"] = self.precision
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

    def close(self) -> None:
        """Release the request before the compiled model, now: left to the garbage collector, OpenVINO's
        objects can be freed in the wrong order, which crashed a later test's process."""
        self.request = None
        self.compiled = None


def open_runner(runtime: str, path: Path, threads: int):
    return (OrtRunner if runtime == "onnxruntime" else OpenVinoRunner)(Path(path), threads)


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
