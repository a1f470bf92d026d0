"""Named pipelines: a name that stands for a spec string.

A pipeline name is usable wherever a pass name is (``ncc opt --pass cleanup``,
``"cleanup,fuse-conv-bn"``) and expands to its passes; ``ncc passes`` lists
them and ``--dump-pipeline`` prints the expansion.
"""

from __future__ import annotations

PIPELINES: dict[str, str] = {
    "cleanup": "shape-inference,fold-constants,eliminate-identity,cse,dce,toposort",
    "optimize": (
        "shape-inference,fold-constants,eliminate-identity,fuse-conv-bn,fuse-pad-conv,fuse-matmul-add,cse,dce,"
        "toposort"
    ),
    "int8": (
        "shape-inference,fold-constants,eliminate-identity,fuse-conv-bn,fuse-pad-conv,fuse-gelu,fuse-layer-norm,"
        "fuse-matmul-scale,cse,dce,toposort,fuse-activation,calibrate,smooth-quant,insert-qdq{min-cosine=0.995},round-weights,"
        "correct-bias,quantize-embeddings,dce"
    ),
    # bf16 mixed precision: the same fusions as int8 (LayerNorm and GELU as single ops), then the marking
    "bf16": (
        "shape-inference,fold-constants,eliminate-identity,fuse-conv-bn,fuse-pad-conv,fuse-gelu,fuse-layer-norm,"
        "cse,dce,toposort,bf16-precision{target=openvino}"
    ),
    # pruning: element patterns zero weights; channel / neuron / head patterns zero units (readers refitted
    # on --calib) and slim removes them. --pattern and --sparsity set prune's options.
    "sparse": (
        "shape-inference,fold-constants,eliminate-identity,fuse-conv-bn,fuse-pad-conv,cse,dce,toposort,prune,"
        "slim,dce"
    ),
    "int8-dynamic": "shape-inference,fold-constants,eliminate-identity,fuse-matmul-add,cse,dce,quantize-dynamic,dce,toposort",
    # weight-only: constants folded (a Transpose of a weight, shapes computed from constants), the quantizer
    # (woq-rtn, or woq-gptq / woq-awq with --algo), embedding tables in int8 per row, then packing for the target
    "w4": "fold-constants,woq-rtn,quantize-embeddings,pack-int4",
    "w8": "fold-constants,woq-rtn{bits=8},quantize-embeddings,pack-int4",
}


def pipeline_names() -> list[str]:
    return sorted(PIPELINES)
