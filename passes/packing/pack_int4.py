"""``pack-int4``: weight-only quantized MatMuls into onnxruntime's MatMulNBits (or left as standard blocked DQ).

Input: the form the ``woq-*`` passes produce (see :mod:`ncc.passes.woq`),
``MatMul(A, DequantizeLinear(@codes [K, N], @scale [G, N], @zero_point?) {axis=0, block_size=g})``.
With ``format=matmulnbits`` each such MatMul becomes::

    com.microsoft::MatMulNBits(A, B, scales, zero_points?) {K, N, bits, block_size, accuracy_level}

- ``B`` is uint8 ``[N, k_blocks, block_size * bits / 8]``: row ``n`` holds
  column ``n`` of the codes, block by block along ``K``, two 4-bit codes per
  byte with the lower ``k`` in the low nibble. Codes are unsigned: symmetric
  signed codes ``c`` are stored as ``c + 2^(bits-1)``, which is MatMulNBits'
  default zero point when none is given, so ``(u - 8) * s = c * s``.
- ``scales`` is ``[N, k_blocks]``; asymmetric zero points are uint8
  ``[N, ceil(k_blocks * bits / 8)]``, packed like ``B`` for 4 bits.
- MatMulNBits needs ``block_size`` a power of two of at least 16. A per-channel
  weight (one block of ``K``) gets the next power of two at least ``K``, the
  rest of the block padded with the zero point (dequantizes to 0). When ``K``
  is not a multiple of ``block_size`` the last block is padded the same way.

An embedding table quantized by ``woq-*{embeddings=true}`` (``Gather`` of a
``DequantizeLinear {axis = 1}``) becomes ``com.microsoft::GatherBlockQuantized``
reading the same 4/8-bit codes, scales and zero points (``gather_axis = 0``,
``quantize_axis = 1``), so only the gathered rows are dequantized.

A weight shared by several MatMuls is packed once.

With ``format=qdq`` nothing changes: blocked DequantizeLinear + MatMul is
already standard ONNX (opset 21). onnxruntime fuses it into MatMulNBits itself
when it can, with the compute type of its session option
``session.qdq_matmulnbits_accuracy_level`` (default 4: int8 activations), so
that form is not float-exact in onnxruntime by default; ``matmulnbits`` with
the default ``accuracy_level = 0`` is. Packed weights of a model whose weights were spilled are
spilled too, one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir.ops import ensure_opset, is_onnx_domain
from ncc.ir.rewrite import Rewriter
from ncc.ir.spill import SpillFile, pack_4bit
from ncc.passes.base import Pass, PassContext, PassResult, option
from ncc.passes.fusion.fuse_gelu import MS_DOMAIN
from ncc.passes.woq.weights import add_initializers
from ncc.targets import DEFAULT_TARGET, get_target

_CODES = {
    ir.DataType.INT4: (4, True),
    ir.DataType.UINT4: (4, False),
    ir.DataType.INT8: (8, True),
    ir.DataType.UINT8: (8, False),
}


@dataclass
class _Site:
    matmul: ir.Node
    dq: ir.Node
    codes: ir.Value
    scale: ir.Value
    zero_point: ir.Value | None
    block: int


def _sites(graph: ir.Graph) -> list[_Site]:
    sites = []
    for node in graph:
        if (
            node.op_type != "MatMul"
            or not is_onnx_domain(node)
            or len(node.inputs) != 2
            or node.inputs[1] is None
        ):
            continue
        dq = node.inputs[1].producer()
        if dq is None or dq.op_type != "DequantizeLinear" or not is_onnx_domain(dq):
            continue
        block = dq.attributes.get_int("block_size", 0)
        codes, scale = dq.inputs[0], dq.inputs[1]
        zero = dq.inputs[2] if len(dq.inputs) > 2 else None
        if (
            not block
            or dq.attributes.get_int("axis", 1) != 0
            or codes.const_value is None
            or scale.const_value is None
            or (zero is not None and zero.const_value is None)
            or codes.const_value.dtype not in _CODES
            or len(codes.const_value.shape) != 2
        ):
            continue
        sites.append(_Site(node, dq, codes, scale, zero, block))
    return sites


def _gather_sites(graph: ir.Graph) -> list[tuple[ir.Node, ir.Node]]:
    """``(Gather, DequantizeLinear)`` pairs of weight-only quantized embedding tables."""
    sites = []
    for node in graph:
        if node.op_type != "Gather" or not is_onnx_domain(node) or node.attributes.get_int("axis", 0) != 0:
            continue
        dq = node.inputs[0].producer() if node.inputs[0] is not None else None
        if (
            dq is None
            or dq.op_type != "DequantizeLinear"
            or not is_onnx_domain(dq)
            or dq.attributes.get_int("axis", 1) != 1
            or not dq.attributes.get_int("block_size", 0)
            or any(v is not None and v.const_value is None for v in dq.inputs)
            or dq.inputs[0].const_value.dtype not in _CODES
            or len(dq.inputs[0].const_value.shape) != 2
        ):
            continue
        sites.append((node, dq))
    return sites


def _block_for(block: int, k: int, layer: str) -> int:
    if block >= 16 and block & (block - 1) == 0:
        return block
    if block >= k:  # one block per column: any power of two covering K
        return max(16, 1 << (k - 1).bit_length())
    raise NccError(
        f"MatMulNBits needs a block size that is a power of two of at least 16, and {layer} has group size "
        f"{block}; use a power-of-two group size or --format qdq."
    )


@dataclass(frozen=True)
class PackInt4(Pass):
    """Lay weight-only quantized MatMuls out for the target: MatMulNBits (onnxruntime CPU) or blocked DequantizeLinear."""

    name: ClassVar[str] = "pack-int4"
    format: Literal["target", "matmulnbits", "qdq"] = option(
        "target",
        "matmulnbits: com.microsoft::MatMulNBits; qdq: keep standard blocked DequantizeLinear + MatMul; "
        "target: the target's (matmulnbits for onnxruntime, qdq for inductor, whose backend packs for torch)",
    )
    accuracy_level: int = option(
        0,
        "MatMulNBits compute type: 0 unset (float), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations per block",
        min=0,
        max=4,
    )

    target: str = option(DEFAULT_TARGET, "target profile (host: this CPU's)")

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            get_target(self.target)
        except NccError as err:
            raise ValueError(str(err).rstrip(".")) from None

    @property
    def resolved_format(self) -> str:
        return get_target(self.target).woq_format if self.format == "target" else self.format

    def requires(self, model: ir.Model) -> None:
        if self.accuracy_level and self.resolved_format == "qdq":
            raise NccError(
                "accuracy-level applies to --format matmulnbits; with qdq onnxruntime takes it from its "
                "session option session.qdq_matmulnbits_accuracy_level."
            )

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        sites = _sites(model.graph)
        gathers = _gather_sites(model.graph)
        if not sites and not gathers:
            raise NccError(
                "pack-int4 found no weight-only quantized MatMuls; run woq-rtn, woq-gptq or woq-awq first."
            )
        if self.resolved_format == "qdq":
            return PassResult(
                modified=False,
                stats={"MatMuls kept as DequantizeLinear + MatMul": len(sites)},
                notes=[
                    f"format qdq: {len(sites)} MatMuls and {len(gathers)} Gathers keep blocked "
                    "DequantizeLinear (opset 21)"
                ],
            )
        rewriter = Rewriter(model, model.graph)
        spill = (
            SpillFile("pack")
            if any(isinstance(s.codes.const_value, ir.ExternalTensor) for s in sites)
            else None
        )
        ensure_opset(model, MS_DOMAIN)
        packed_bytes = 0
        packed: dict[int, list[ir.Value]] = {}  # codes value -> its packed inputs, for shared weights
        for site in sites:
            packed_bytes += self._pack(rewriter, site, spill, packed)
        for gather, dq in gathers:
            _pack_gather(rewriter, gather, dq)
        notes = [
            f"packed {len(sites)} MatMuls as MatMulNBits"
            + (f" (accuracy_level {self.accuracy_level})" if self.accuracy_level else "")
        ]
        if gathers:
            notes.append(f"{len(gathers)} Gathers as GatherBlockQuantized")
        return PassResult(
            modified=True,
            stats={
                "MatMulNBits": len(sites),
                "GatherBlockQuantized": len(gathers),
                "packed bytes": packed_bytes,
            },
            notes=notes,
        )

    def _pack(
        self, rewriter: Rewriter, site: _Site, spill: SpillFile | None, packed: dict[int, list[ir.Value]]
    ) -> int:
        matmul = site.matmul
        bits, _ = _CODES[site.codes.const_value.dtype]
        k, n = (int(d) for d in site.codes.const_value.shape)
        block = _block_for(site.block, k, matmul.name or site.codes.name)
        written = 0
        if id(site.codes) not in packed:
            packed[id(site.codes)] = self._packed_inputs(rewriter, site, block, spill)
            written = sum(v.const_value.nbytes for v in packed[id(site.codes)])
        values = packed[id(site.codes)]
        attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
        if self.accuracy_level:
            attrs["accuracy_level"] = self.accuracy_level
        rewriter.set_insertion_point(matmul)
        new = rewriter.create(
            "MatMulNBits",
            [matmul.inputs[0], *values],
            attrs,
            domain=MS_DOMAIN,
            name=matmul.name,
            absorbed=[matmul, site.dq],
        )
        for key, value in matmul.metadata_props.items():
            if key.startswith("ncc.quant") or key.startswith("ncc.woq"):
                new.metadata_props[key] = value
        dq_out = site.dq.outputs[0]
        nodes = [matmul] + ([site.dq] if len(dq_out.uses()) == 1 else [])
        rewriter.replace_value(matmul.outputs[0], new.outputs[0])
        rewriter.erase_all(nodes)
        for value in (site.codes, site.scale, site.zero_point):
            if value is not None and not value.uses() and value.is_initializer():
                rewriter.graph.initializers.pop(value.name)
        return written

    @staticmethod
    def _packed_inputs(
        rewriter: Rewriter, site: _Site, block: int, spill: SpillFile | None
    ) -> list[ir.Value]:
        """MatMulNBits' ``B``, ``scales`` and (asymmetric) ``zero_points`` for ``site``'s weight."""
        bits, signed = _CODES[site.codes.const_value.dtype]
        codes_tensor = site.codes.const_value
        k, n = (int(d) for d in codes_tensor.shape)
        k_blocks = -(-k // block)
        offset = 1 << (bits - 1)
        codes = np.asarray(codes_tensor.numpy()).astype(np.int16).T  # [N, K]
        if isinstance(codes_tensor, ir.ExternalTensor):
            codes_tensor.release()
        if signed:
            codes = codes + offset
        zero = None
        if site.zero_point is not None:
            zero = np.asarray(site.zero_point.const_value.numpy()).astype(np.uint8).T  # [N, G]
        scale = np.asarray(site.scale.const_value.numpy()).T  # [N, G]
        if scale.shape[1] != k_blocks:  # per-channel weight in a wider block
            scale = scale[:, :k_blocks]
            zero = None if zero is None else zero[:, :k_blocks]
        pad = k_blocks * block - k
        if pad:
            fill = np.repeat(zero[:, -1:], pad, axis=1) if zero is not None else np.full((n, pad), offset)
            codes = np.concatenate([codes, fill.astype(np.int16)], axis=1)
        codes = codes.astype(np.uint8).reshape(n, k_blocks, block)
        b = pack_4bit(codes).reshape(n, k_blocks, block // 2) if bits == 4 else codes
        inputs_np = [
            ("B", b, ir.DataType.UINT8),
            ("scales", np.ascontiguousarray(scale), site.scale.const_value.dtype),
        ]
        if zero is not None:
            zp = pack_4bit(_pad_even(zero)).reshape(n, -1) if bits == 4 else np.ascontiguousarray(zero)
            inputs_np.append(("zero_points", zp, ir.DataType.UINT8))
        del codes
        base = site.codes.name.removesuffix("_q")
        return add_initializers(
            rewriter, [(f"{base}_{suffix}", dtype, array) for suffix, array, dtype in inputs_np], spill
        )


def _pack_gather(rewriter: Rewriter, gather: ir.Node, dq: ir.Node) -> None:
    """``Gather(DequantizeLinear(codes, scale, zp) {axis=1}, ids)`` -> ``GatherBlockQuantized(codes, ids, scale, zp)``."""
    codes, scale, *zero = dq.inputs
    bits = _CODES[codes.const_value.dtype][0]
    h = int(codes.const_value.shape[1])
    block = _block_for(dq.attributes.get_int("block_size"), h, gather.name or codes.name)
    inputs = [codes, gather.inputs[1], scale] + [z for z in zero if z is not None]
    rewriter.set_insertion_point(gather)
    new = rewriter.create(
        "GatherBlockQuantized",
        inputs,
        {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits},
        domain=MS_DOMAIN,
        name=gather.name,
        absorbed=[gather, dq],
    )
    for key, value in gather.metadata_props.items():
        if key.startswith("ncc.quant") or key.startswith("ncc.woq"):
            new.metadata_props[key] = value
    rewriter.replace_value(gather.outputs[0], new.outputs[0])
    rewriter.erase_all([gather] + ([dq] if len(dq.outputs[0].uses()) == 1 else []))


def _pad_even(zero: np.ndarray) -> np.ndarray:
    """Zero points ``[N, G]`` padded to an even ``G`` per row, so rows pack into whole bytes."""
    return np.pad(zero, [(0, 0), (0, zero.shape[1] % 2)])
