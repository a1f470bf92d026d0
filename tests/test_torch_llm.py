"""SmolLM2-135M weight-only INT4 through ncc's torch path (slow): the decode step runs every linear as ATen's
int4 kernel and agrees with the full-sequence model; perplexity through torch equals the ONNX path's.

The decode step is ``benchmarks/llm_torch.DecodeStep`` (one token, static KV cache); speed is measured by
``benchmarks/bench_torch_llm.py``, not here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import llm_models as LM  # noqa: E402
import llm_torch  # noqa: E402

pytestmark = pytest.mark.slow

TOKENS = 48


@pytest.fixture(scope="module")
def decode_w4():
    import ncc.torch

    step = llm_torch.decode_step()
    compiled = ncc.torch.compile(step, step.example_inputs(), pipeline="w4", options="group-size=32")
    return step, compiled


def _teacher_forced_nll(step_fn, template, ids: np.ndarray) -> float:
    """Mean next-token NLL of ``ids`` decoded one token per step through ``step_fn``."""
    logits = [out[0].double() for _, out in llm_torch.teacher_forced(step_fn, template, ids[:-1])]
    logp = torch.log_softmax(torch.stack(logits), dim=-1)
    return float(-logp[torch.arange(len(ids) - 1), torch.from_numpy(ids[1:])].mean())


def test_every_linear_runs_the_int4_kernel(decode_w4):
    _, compiled = decode_w4
    check = compiled.check
    assert check.weight_only == 211 and check.weight_only_kernels == 211, check.summary()
    assert check.ok and not check.weight_only_float


def test_int4_decoding_matches_the_dequantized_model(decode_w4):
    """Teacher-forced NLL over 47 tokens: the int4 kernels (bf16 activations) against the same IR run with
    every weight dequantized in float32, and that against FP32."""
    import ncc.backends.torch.fx as fx

    step, compiled = decode_w4
    ids = LM.eval_windows(1, TOKENS)[0]
    rows, fx.WOQ_MAX_ROWS = fx.WOQ_MAX_ROWS, 0  # lower the same IR with float32 linears
    try:
        dequantized = fx.to_graph_module(compiled.ir)
    finally:
        fx.WOQ_MAX_ROWS = rows
    int4 = _teacher_forced_nll(compiled, step, ids)
    reference = _teacher_forced_nll(dequantized, step, ids)
    float32 = _teacher_forced_nll(step, step, ids)
    assert abs(int4 - reference) <= 0.02 * reference, (int4, reference)
    # RTN G32 moves a 47-token window's NLL by tenths of a nat either way (measured 4.16 -> 3.94); a broken
    # graph (a cache read from the wrong input) moved it by 5.7
    assert abs(reference - float32) < 0.5, (float32, reference)


def test_perplexity_through_torch_equals_the_onnx_path():
    import realmodels
    from bench_torch_llm import torch_perplexity

    onnx_ppl = LM.ncc_w4_cached(realmodels.smollm2_onnx(), "rtn", 32)["perplexity"]
    torch_ppl, _ = torch_perplexity(realmodels._smollm2_module(), "rtn", 32)
    assert abs(torch_ppl / onnx_ppl - 1) <= 0.005, (torch_ppl, onnx_ppl)
