"""ONNX backend: emitters that write the IR as an ONNX file.

:func:`save_onnx` is the plain emitter; the quantized formats (qdq,
qoperator, integerops, woq) are legalization pipelines that end in it.
"""

from ncc.backends.onnx.emit import save_onnx, to_proto

__all__ = ["save_onnx", "to_proto"]
