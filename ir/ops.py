"""What ncc knows about ONNX ops, as data: the standard domain, the model's opset, op families.

Passes, backends and the target profiles (``ncc.targets``) all import this module; it imports nothing
of ncc's.

The standard domain has two spellings, ``""`` and ``"ai.onnx"``. onnx-ir normalizes a node's domain
to ``""``, but not the keys of a model's ``opset_imports`` nor a domain string a pass holds, so every
check goes through :func:`is_onnx_domain` and every opset look-up through :func:`onnx_opset`.

The op families are nested, each a subset of the next::

    VALUE_MOVES  ⊂  DATA_MOVEMENT  ⊂  PASSTHROUGH

They differ in what their users need to be true of an op. Calibration gives a value the statistics of
its source, and fuse-matmul-scale moves a scalar factor through an op, only when the op keeps every
value and drops none (``VALUE_MOVES``). Quantization only needs the op to leave the scale and zero
point alone (``PASSTHROUGH``). The runtime check needs to know which quantized nodes have no integer
kernel to look for (``DATA_MOVEMENT``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx_ir as ir

#: The two spellings of the standard ONNX domain.
ONNX_DOMAINS = frozenset({"", "ai.onnx"})


def is_onnx_domain(node_or_domain: ir.Node | ir.Function | str) -> bool:
    """Whether a node (or function, or a domain string) is in the standard ONNX domain."""
    domain = node_or_domain if isinstance(node_or_domain, str) else node_or_domain.domain
    return domain in ONNX_DOMAINS


def onnx_opset(model: ir.Model | ir.Graph | ir.Function, default: int = 1) -> int:
    """The standard-domain opset ``model`` imports (as ``""`` or ``"ai.onnx"``); ``default`` when it imports
    neither."""
    imports = model.opset_imports
    return imports.get("", imports.get("ai.onnx", default))


def set_onnx_opset(model: ir.Model, version: int) -> None:
    """Import the standard domain at ``version``, under the spelling the model already uses."""
    key = "" if "" in model.opset_imports else "ai.onnx"
    model.opset_imports[key] = version


def ensure_opset(model: ir.Model, domain: str, version: int = 1) -> None:
    """Import ``domain`` at ``version`` unless the model already imports it."""
    if domain not in model.opset_imports:
        model.opset_imports[domain] = version


# -- op families (all in the standard domain) ------------------------------------------------------

#: Ops whose output holds exactly the values of their input 0, rearranged: same range, same histogram,
#: and a scalar factor commutes with them. Only input 0 carries data. Calibration gives such an op's
#: output the statistics of its input; fuse-matmul-scale moves a scale up through them.
VALUE_MOVES = frozenset(
    {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "DepthToSpace", "SpaceToDepth"}
)

#: Ops that move or select values and compute none, so an 8-bit tensor passes through them with its
#: scale and zero point: ``VALUE_MOVES`` and ops that keep only some of their input's values (Slice,
#: Split, Gather; MaxPool, whose maximum is the same whether taken before or after quantizing; Pad,
#: whose constant pad value is quantized with the tensor). These drop values, so a range or histogram measured
#: after them is not their input's: they are no ``VALUE_MOVES``. The runtime check leaves a quantized
#: node of these out of its count: onnxruntime runs it on the 8-bit tensor, with no integer kernel to
#: find.
DATA_MOVEMENT = VALUE_MOVES | frozenset({"MaxPool", "Slice", "Split", "Gather", "Pad"})

#: Ops quantization runs on the 8-bit tensor with their input's scale and zero point: a target
#: profile's default ``passthrough_ops`` (which insert-qdq and calibration follow) and what the
#: QOperator legalization can rewrite that way. ``DATA_MOVEMENT`` plus Resize, which interpolates
#: (in linear mode) and is also a compute op of the targets (``static_ops``); the runtime check counts
#: a quantized Resize among the nodes that should run as integer kernels, so it is no
#: ``DATA_MOVEMENT``.
PASSTHROUGH = DATA_MOVEMENT | frozenset({"Resize"})

#: Ops that give different outputs for the same inputs (Dropout may be in training mode): never
#: folded, never merged.
NONDETERMINISTIC = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)
