"""Lowering passes: a quantized model in ncc's QDQ conventions brought into one output format.

Each output form that is more than the QDQ graph itself is a pass here (``legalize-qoperator``:
onnxruntime's QLinear*/QGemm kernels), so ``--format`` only appends a pass to the pipeline and the
pass manager's verifier, dumps and timing cover the lowering like any other pass. Writing the
artefact and checking it in its runtime stay in ``backends/``. ``raise-qoperator`` goes the other way:
integer kernels back into QDQ groups, so QDQ tools read a QOperator model too.
"""
