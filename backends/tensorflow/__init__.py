"""The TensorFlow backend: the IR as a TensorFlow graph (``graph``: NHWC, FakeQuant or float, rules to extend
it), written as an int8 ``.tflite`` with the check of what LiteRT runs in int8 (``tflite``), or as a SavedModel
of oneDNN's quantized ops (``savedmodel``, ``int8``, ``onednn``). TensorFlow is imported only when these run.
"""
