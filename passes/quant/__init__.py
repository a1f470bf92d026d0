"""Quantization passes and the calibration library they share.

QDQ conventions in the IR (every quantization pass produces them, every ONNX
backend format consumes them):

- A quantized activation ``x`` (float) becomes
  ``%x_q = QuantizeLinear(%x, @x_scale, @x_zero_point)`` and
  ``%x_dq = DequantizeLinear(%x_q, @x_scale, @x_zero_point)``; the consumers
  that run quantized read ``%x_dq``, the others keep reading ``%x``. One pair per
  tensor, shared by all its quantized consumers. Scale: f32 scalar; zero point:
  u8 or i8 scalar.
- A quantized weight ``w`` (constant) is stored already quantized:
  ``@w_quantized : i8[...]`` and ``%w_dq = DequantizeLinear(@w_quantized,
  @w_scale, @w_zero_point) {axis = k}``; per-channel scales are 1-D along the
  output-channel axis (0 for Conv, 1 for MatMul's [K, N] weight, 0 for Gemm
  with transB=1), zero points are zeros.
- A Conv/Gemm bias is int32 with scale ``x_scale * w_scale`` and zero point 0
  behind a DequantizeLinear, as onnxruntime's integer kernels expect.
- Quantization passes record what they did in node metadata:
  ``ncc.quant = "int8"`` on the compute node they quantized and
  ``ncc.quant.skip = "<reason>"`` on a candidate they kept in float.
"""
