"""Weight-only quantization: ``woq-rtn``, ``woq-gptq``, ``woq-awq`` and ``pack-int4``.

IR convention after a ``woq-*`` pass (standard ONNX, opset 21, readable in a
dump before anything is packed)::

    %w_dq = DequantizeLinear(@w_q, @w_scale, @w_zero_point) {axis = 0, block_size = g}
    %y    = MatMul(%x, %w_dq)

- ``@w_q`` has the MatMul weight's shape ``[K, N]`` and type ``u4`` (asymmetric,
  with ``@w_zero_point : u4[ceil(K/g), N]``) or ``i4`` (symmetric, no zero
  point); ``u8``/``i8`` for 8 bits. ``@w_scale`` has the weight's float type and
  shape ``[ceil(K/g), N]``. Per-channel (``group-size=0``) is one block of ``K``.
- The MatMul carries ``ncc.quant = "w4g128"`` (bits, group, ``-sym``), the
  algorithm in ``ncc.woq.algo`` and the layer's reconstruction error in
  ``ncc.woq.error``; the pass's layer table goes to ``ctx.data["woq_layers"]``.
- Weights are read one at a time; those that came from external data are
  written to a spill file as they are produced (:mod:`ncc.ir.spill`), so
  quantizing never holds the model's float weights in memory.

``pack-int4`` then rewrites each such pair into onnxruntime's
``com.microsoft::MatMulNBits`` (weights packed ``[N, k_blocks, block_size/2]``),
or leaves the standard blocked form (``format=qdq``).
"""
