"""Write the IR as OpenVINO IR (``model.xml`` + ``model.bin``): the ONNX form OpenVINO reads, converted by
OpenVINO itself (``openvino.save_model``) so the file holds what its CPU plugin will compile.

A model the ``bf16-precision`` pass marked carries OpenVINO's bf16 inference hint in the IR's
``runtime_options``, so compiling the ``.xml`` with no option runs it in bf16.

Weights are kept as the ONNX holds them (``compress_to_fp16=False``): quantized layers' weights are
already int8 constants, and compressing the float ones to fp16 would change the numbers the check
and the report measured.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx_ir as ir
from ncc.errors import NccError


def save_openvino_ir(model: ir.Model, xml: Path) -> None:
    """Write ``model`` to ``xml`` and its ``.bin`` beside it (the caller makes the writes atomic)."""
    try:
        import openvino as ov
    except ImportError:
        raise NccError('writing OpenVINO IR (.xml) needs OpenVINO (pip install -e ".[openvino]").') from None
    with tempfile.TemporaryDirectory(prefix="ncc-openvino-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        # a private intermediate: written directly (not through the staged, atomic ONNX writer)
        ir.save(model, onnx_path, external_data="model.onnx.data")
        try:
            converted = ov.Core().read_model(str(onnx_path))
        except Exception as err:  # OpenVINO's first line says which op it cannot read
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise NccError(f"OpenVINO cannot read the model: {first}") from None
        if model.metadata_props.get("ncc.precision") == "bf16":  # the bf16-precision pass's choice
            converted.set_rt_info("bf16", ["runtime_options", "INFERENCE_PRECISION_HINT"])
        ov.save_model(converted, str(xml), compress_to_fp16=False)
