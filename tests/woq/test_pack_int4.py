"""pack-int4: MatMulNBits initializers unpacked by a reference of the com.microsoft spec, and numerics in onnxruntime.

:func:`unpack_matmulnbits` reads ``B [N, k_blocks, block_size * bits / 8]``
(4 bits: two codes a byte, the lower ``k`` in the low nibble), ``scales
[N, k_blocks]`` and ``zero_points`` (4 bits: ``[N, ceil(k_blocks / 2)]``, packed
like ``B`` along the blocks; 8 bits: ``[N, k_blocks]``; absent: ``2^(bits-1)``),
as the contrib-op spec describes them. Each case compiles the same model twice
through the CLI, ``--format matmulnbits`` and ``--format qdq`` (blocked
DequantizeLinear): quantization is deterministic, so the packed weights must
dequantize to exactly what the DequantizeLinear form holds, and those codes
must be the reference RTN of the float weight (test_kernels.ref_rtn).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper as nh
from test_kernels import ref_rtn
from test_woq_cli import gaussian_weight, ncc_ok, save_matmul

# -- references -----------------------------------------------------------------------------------


def unpack_matmulnbits(model: onnx.ModelProto):
    """The one MatMulNBits of ``model``: (codes [N, k_blocks * block] int64, scales [N, k_blocks],
    zero points [N, k_blocks] int64, attributes) as the spec lays them out."""
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    assert node.domain == "com.microsoft"
    attrs = {a.name: a.i for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    inits = {t.name: nh.to_array(t) for t in model.graph.initializer}
    b = inits[node.input[1]]
    k_blocks = -(-k // block)
    assert b.dtype == np.uint8 and b.shape == (n, k_blocks, block * bits // 8)
    if bits == 4:
        codes = np.empty((n, k_blocks, block), np.int64)
        codes[..., 0::2] = b & 0x0F
        codes[..., 1::2] = b >> 4
    else:
        codes = b.astype(np.int64)
    scales = inits[node.input[2]].reshape(n, k_blocks)
    if len(node.input) > 3 and node.input[3]:
        zp = inits[node.input[3]]
        assert zp.dtype == np.uint8
        if bits == 4:
            assert zp.shape == (n, -(-k_blocks // 2))
            zeros = np.empty((n, 2 * zp.shape[1]), np.int64)
            zeros[:, 0::2] = zp & 0x0F
            zeros[:, 1::2] = zp >> 4
            zeros = zeros[:, :k_blocks]
        else:
            zeros = zp.reshape(n, k_blocks).astype(np.int64)
    else:
        zeros = np.full((n, k_blocks), 2 ** (bits - 1), np.int64)
    return codes.reshape(n, k_blocks * block), scales, zeros, attrs


def matmulnbits_weight(codes, scales, zeros, attrs) -> np.ndarray:
    """``W^ [K, N]`` float32: ``(q - z) * s`` per block, the padding past K dropped."""
    block, k = attrs["block_size"], attrs["K"]
    idx = np.arange(codes.shape[1]) // block
    return ((codes - zeros[:, idx]).astype(np.float32) * scales[:, idx])[:, :k].T


def read_qdq(model: onnx.ModelProto):
    """The DequantizeLinear form: (codes [K, N] int64, scales [G, N], zero points [G, N] int64 or None, block)."""
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs["axis"] == 0
    inits = {t.name: t for t in model.graph.initializer}
    codes = nh.to_array(inits[dq.input[0]]).astype(np.int64)
    scales = nh.to_array(inits[dq.input[1]])
    zeros = nh.to_array(inits[dq.input[2]]).astype(np.int64) if len(dq.input) > 2 and dq.input[2] else None
    return codes, scales, zeros, attrs["block_size"], inits[dq.input[0]].data_type


def qdq_weight(codes, scales, zeros, block) -> np.ndarray:
    """Blocked DequantizeLinear (axis 0): ``W^[k, n] = (q[k, n] - z[k // block, n]) * s[k // block, n]``."""
    idx = np.arange(codes.shape[0]) // block
    q = codes if zeros is None else codes - zeros[idx]
    return q.astype(np.float32) * scales[idx]


# -- packing --------------------------------------------------------------------------------------

CASES = [
    # id, pipeline, flags, K, N, bits, group, symmetric
    ("w4-g32-asym-5blocks", "w4", ["--group-size", "32"], 160, 24, 4, 32, False),
    ("w4-g64-sym", "w4", ["--group-size", "64", "--symmetric"], 256, 24, 4, 64, True),
    ("w4-g128-asym", "w4", [], 256, 23, 4, 128, False),
    ("w4-g128-sym", "w4", ["--symmetric"], 256, 24, 4, 128, True),
    ("w8-g32-asym", "w8", ["--group-size", "32"], 128, 24, 8, 32, False),
    ("w8-g128-sym", "w8", ["--symmetric"], 256, 24, 8, 128, True),
    ("w4-per-channel-asym-K96", "w4", ["--group-size", "0"], 96, 24, 4, 0, False),
    ("w4-per-channel-sym-K96", "w4", ["--group-size", "0", "--symmetric"], 96, 24, 4, 0, True),
    ("w8-per-channel-asym-K96", "w8", ["--group-size", "0"], 96, 24, 8, 0, False),
    ("w4-partial-asym-K576", "w4", ["--group-size", "128", "--partial-groups"], 576, 24, 4, 128, False),
    (
        "w4-partial-sym-K576",
        "w4",
        ["--group-size", "128", "--partial-groups", "--symmetric"],
        576,
        24,
        4,
        128,
        True,
    ),
    ("w8-partial-asym-K576", "w8", ["--group-size", "128", "--partial-groups"], 576, 24, 8, 128, False),
]


def compile_both(tmp_path: Path, w: np.ndarray, pipeline: str, flags: list, *, rank: int = 3):
    src = save_matmul(tmp_path / "m.onnx", w, rank=rank)
    packed, qdq = tmp_path / "packed.onnx", tmp_path / "qdq.onnx"
    ncc_ok("compile", src, "--pass", pipeline, *flags, "--format", "matmulnbits", "-o", packed)
    ncc_ok("compile", src, "--pass", pipeline, *flags, "--format", "qdq", "-o", qdq)
    return packed, qdq


@pytest.mark.parametrize("pipeline,flags,k,n,bits,group,sym", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_packed_weights_dequantize_to_the_quantized_values(tmp_path, pipeline, flags, k, n, bits, group, sym):
    w = gaussian_weight(k, n, seed=k + n)
    packed, qdq = compile_both(tmp_path, w, pipeline, flags)
    codes, scales, zeros, attrs = unpack_matmulnbits(onnx.load(packed))
    q_codes, q_scales, q_zeros, q_block, q_type = read_qdq(onnx.load(qdq))

    # the DequantizeLinear form: the documented types, and the reference RTN of the float weight
    want_type = {
        (4, False): onnx.TensorProto.UINT4,
        (4, True): onnx.TensorProto.INT4,
        (8, False): onnx.TensorProto.UINT8,
        (8, True): onnx.TensorProto.INT8,
    }[bits, sym]
    assert q_type == want_type and q_block == (group or k)
    r_codes, r_scales, r_zeros = ref_rtn(w.T, bits, group, sym)
    np.testing.assert_array_equal(q_codes, r_codes.T)
    np.testing.assert_array_equal(q_scales, r_scales.T)
    assert (q_zeros is None) == sym
    if not sym:
        np.testing.assert_array_equal(q_zeros, r_zeros.T)

    # MatMulNBits: a power-of-two block of at least 16 (per channel: the next one covering K)
    block = attrs["block_size"]
    assert (attrs["K"], attrs["N"], attrs["bits"]) == (k, n, bits)
    assert block == (group or 128)
    k_blocks = -(-k // block)
    # the same codes (signed ones shifted by 2^(bits-1), the default zero point), scales and zero points
    offset = 2 ** (bits - 1) if sym else 0
    np.testing.assert_array_equal(codes[:, :k] - offset, q_codes.T)
    np.testing.assert_array_equal(scales, q_scales.T[:, :k_blocks])
    if not sym:
        np.testing.assert_array_equal(zeros, q_zeros.T[:, :k_blocks])
    # the padding past K (partial last group, per-channel block) holds the zero point: it dequantizes to 0
    pad = codes[:, k:]
    np.testing.assert_array_equal(pad, np.broadcast_to(zeros[:, -1:], pad.shape))
    # so the dequantized weights are exactly equal
    np.testing.assert_array_equal(
        matmulnbits_weight(codes, scales, zeros, attrs), qdq_weight(q_codes, q_scales, q_zeros, q_block)
    )


# -- numerics in onnxruntime ----------------------------------------------------------------------

U = np.finfo(np.float32).eps / 2  # unit roundoff of float32


def float_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Rounding-error bound of a float32 ``x @ w`` against the exact product, for any order of summation:
    ``gamma_{K+2} |x| |w|`` (K products and sums, plus the block scale and the final rounding), doubled.
    (Measured: at most 0.007 of it; int8 activations land 50-180x above it.)"""
    k = w.shape[0]
    return 2 * (k + 2) * U * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64))


def int8_activation_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """accuracy_level 4 quantizes activations to int8 per block (symmetric, ``s = max|x_block| / 127``), so each
    activation moves by at most ``s / 2 <= max|x_row| / 254``: the output by at most that times ``sum_k |w^|``
    per column, whatever the block partition, plus float rounding. 1.01: the scale's own float rounding.
    (Measured: at most 0.08 of it.)"""
    row_max = np.abs(x).max(axis=-1, keepdims=True).astype(np.float64)
    return 1.01 * row_max / 254 * np.abs(w).sum(axis=0) + float_bound(x, w)


def activations(rank: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    shape = (2, 5, k) if rank == 3 else (9, k)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., 3] *= 20  # an outlier channel, as transformer activations have
    return x


def run_session(path: Path, x: np.ndarray, *, optimize: bool = True, qdq_accuracy_level: str | None = None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if qdq_accuracy_level is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", qdq_accuracy_level)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize(
    "pipeline,flags,k",
    [
        pytest.param("w4", ["--group-size", "32"], 256, id="w4-g32-asym"),
        pytest.param("w4", ["--group-size", "32", "--symmetric"], 256, id="w4-g32-sym"),
        pytest.param("w4", ["--group-size", "128", "--partial-groups"], 576, id="w4-g128-partial"),
        pytest.param("w4", ["--group-size", "0"], 96, id="w4-per-channel-K96"),
        pytest.param("w8", ["--group-size", "32"], 256, id="w8-g32-asym"),
        pytest.param(
            "w8", ["--group-size", "128", "--partial-groups", "--symmetric"], 576, id="w8-g128-partial-sym"
        ),
    ],
)
def test_outputs_equal_float_matmul_with_dequantized_weights(tmp_path, pipeline, flags, k, rank):
    """MatMulNBits (default accuracy level: float) and the blocked DequantizeLinear form compute ``x @ W^`` to
    float32 rounding. onnxruntime's own fusion of the DequantizeLinear form into MatMulNBits uses accuracy
    level 4 unless the session says otherwise (session.qdq_matmulnbits_accuracy_level, default 4), so with
    default session options that form is only within the int8-activation bound."""
    w = gaussian_weight(k, 40, seed=11)
    packed, qdq = compile_both(tmp_path, w, pipeline, flags, rank=rank)
    w_hat = qdq_weight(*read_qdq(onnx.load(qdq))[:4])
    x = activations(rank, k)
    want = x.astype(np.float64) @ w_hat.astype(np.float64)
    exact, int8 = float_bound(x, w_hat), int8_activation_bound(x, w_hat)
    outputs = {
        "matmulnbits": (run_session(packed, x), exact),
        "matmulnbits, no graph optimization": (run_session(packed, x, optimize=False), exact),
        "qdq, DequantizeLinear + MatMul": (run_session(qdq, x, optimize=False), exact),
        "qdq, fused at accuracy level 0": (run_session(qdq, x, qdq_accuracy_level="0"), exact),
        "qdq, fused with default options": (run_session(qdq, x), int8),
    }
    for name, (got, bound) in outputs.items():
        assert got.shape == want.shape and got.dtype == np.float32
        err = np.abs(got - want)
        assert np.all(err <= bound), f"{name}: worst {np.max(err / bound):.2f}x the bound"


@pytest.mark.parametrize(
    "pipeline,flags,k",
    [
        pytest.param("w4", ["--group-size", "32"], 256, id="w4-g32-asym"),
        pytest.param("w4", ["--group-size", "128", "--symmetric"], 256, id="w4-g128-sym"),
        pytest.param("w4", ["--group-size", "0"], 96, id="w4-per-channel-K96"),
        pytest.param("w8", ["--group-size", "128", "--partial-groups"], 576, id="w8-g128-partial"),
    ],
)
def test_accuracy_level_4_within_activation_rounding(tmp_path, pipeline, flags, k):
    w = gaussian_weight(k, 40, seed=12)
    src = save_matmul(tmp_path / "m.onnx", w)
    packed, qdq = tmp_path / "p.onnx", tmp_path / "q.onnx"
    ncc_ok("compile", src, "--pass", pipeline, *flags, "--accuracy-level", "4", "-o", packed)
    ncc_ok("compile", src, "--pass", pipeline, *flags, "--format", "qdq", "-o", qdq)
    node = next(n for n in onnx.load(packed).graph.node if n.op_type == "MatMulNBits")
    assert {a.name: a.i for a in node.attribute}["accuracy_level"] == 4
    w_hat = qdq_weight(*read_qdq(onnx.load(qdq))[:4])
    x = activations(3, k)
    want = x.astype(np.float64) @ w_hat.astype(np.float64)
    bound = int8_activation_bound(x, w_hat)
    err = np.abs(run_session(packed, x) - want)
    assert np.all(err <= bound), f"worst {np.max(err / bound):.2f}x the bound"
