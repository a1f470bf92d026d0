"""SmolLM2-135M weight-only INT4 through ncc's torch path: decode speed and perplexity.

    python benchmarks/bench_torch_llm.py                       # decode table and perplexity table
    python benchmarks/bench_torch_llm.py --skip-perplexity --quick

Decode: greedy generation of ``--new-tokens`` (64) tokens after a 16-token prompt from the pydoc text, batch
1, by :class:`llm_torch.DecodeStep` (one token per step, static KV cache of 128 slots): FP32 through
``torch.compile`` (Inductor), and ncc's ``w4`` (``ncc.torch.compile``: the IR's weight-only MatMuls as
``_weight_int4pack_mm_for_cpu`` on bf16 activations), each compiled once. tokens/s = new tokens / wall
time of generating them; the models take turns, ``--rounds`` times per thread count; speed-up = median of
the per-round ratios to FP32 (quartiles in brackets). The greedy tokens' agreement with FP32 is shown.

Perplexity: the full-sequence model (``realmodels._smollm2_module``, 48 windows x 256 tokens of the same
pydoc text as ``bench_woq.py``) through ``ncc.torch.compile`` with each algorithm (RTN; GPTQ and AWQ
calibrated on the same 32 x 256 tokens) at group 32 and 64, asymmetric, beside the ONNX path's
(``ncc compile --pass w4``, onnxruntime) for the same settings. At 256 tokens per window a weight-only
linear runs as float32 on the dequantized weights (above 8 rows the packed kernels are no faster), so
this column measures the quantization itself, through torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llm_models as LM  # noqa: E402
import llm_torch  # noqa: E402

PROMPT_TOKENS = 16
DECODE_CALIB = 64


def decode_calibration(step, tokens: np.ndarray) -> list[tuple]:
    """The decode step's inputs at each position of ``tokens``, teacher-forced: what GPTQ and AWQ calibrate
    a decode-step model on."""
    return [tuple(t.clone() for t in inputs) for inputs, _ in llm_torch.teacher_forced(step, step, tokens)]


def decode_rows(
    groups: list[int], threads: list[int], rounds: int, new_tokens: int, algos: list[str] = ("rtn",)
) -> list[str]:
    import ncc.torch
    from ncc.tools.torch_api import inductor

    step = llm_torch.decode_step()
    prompt = LM.eval_windows(1, PROMPT_TOKENS)[0]
    models = {"FP32 (torch.compile)": (inductor(step), None, "")}
    # GPTQ and AWQ calibrate on the decode step's own inputs over DECODE_CALIB tokens of the calibration text
    calib = (
        decode_calibration(step, LM.calibration_windows(1)[0][:DECODE_CALIB])
        if set(algos) - {"rtn"}
        else None
    )
    for algo in algos:
        for group in groups:
            start = time.perf_counter()
            compiled = ncc.torch.compile(
                step,
                step.example_inputs(),
                pipeline=f"fold-constants,woq-{algo}{{group-size={group}}},pack-int4",
                calib=None if algo == "rtn" else calib,
                check=False,
            )
            seconds = time.perf_counter() - start
            compiled(*step.example_inputs())  # Inductor compiles here; compiled.check reads the graph it ran
            models[f"ncc w4 {algo.upper()} G{group}"] = (compiled, seconds, compiled.check.summary())
            print(
                f"[decode] ncc w4 {algo.upper()} G{group}: quantize {seconds:.1f}s; {compiled.check.summary()}",
                file=sys.stderr,
            )
    reference = None
    agreement = {}
    for name, (fn, _, _) in models.items():
        llm_torch.generate(fn, prompt, 4, step)  # Inductor compiles here
        tokens, _ = llm_torch.generate(fn, prompt, new_tokens, step)
        new = tokens[PROMPT_TOKENS:]
        reference = new if reference is None else reference
        agreement[name] = next((i for i, (a, b) in enumerate(zip(new, reference)) if a != b), len(new))
    rates = {}
    for count in threads:
        torch.set_num_threads(count)
        per_round = {name: [] for name in models}
        for _ in range(rounds):
            for name, (fn, _, _) in models.items():
                _, seconds = llm_torch.generate(fn, prompt, new_tokens, step)
                per_round[name].append(new_tokens / seconds)
        base = np.asarray(per_round["FP32 (torch.compile)"])
        for name, values in per_round.items():
            ratio = np.asarray(values) / base
            rates[(name, count)] = (float(np.median(values)), np.percentile(ratio, [50, 25, 75]))
        print(f"[decode] {count} thread(s) timed", file=sys.stderr)
    head = "| model | identical greedy tokens | quantize s |"
    for t in threads:
        head += f" {t}T tokens/s | {t}T speed-up |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, (_, seconds, _) in models.items():
        line = f"| {name} | {agreement[name]}/{new_tokens} | {'' if seconds is None else f'{seconds:.1f}'} |"
        for t in threads:
            rate, (median, q25, q75) = rates[(name, t)]
            line += f" {rate:.1f} | {median:.2f}x ({q25:.2f}-{q75:.2f}) |"
        lines.append(line)
    return lines


def torch_perplexity(module, algo: str, group: int) -> tuple[float, float]:
    """(perplexity, quantize s) of ``module`` after ncc's weight-only pipeline with ``algo`` at ``group``."""
    import ncc.torch

    windows = LM.eval_windows()
    batch = LM.EVAL_BATCH
    example = (torch.from_numpy(windows[:batch]), torch.ones(batch, LM.SEQ, dtype=torch.int64))
    calib = None
    if algo in ("gptq", "awq"):
        ids = LM.calibration_windows()
        calib = [(ids[i : i + batch], np.ones_like(ids[i : i + batch])) for i in range(0, len(ids), batch)]
    start = time.perf_counter()
    compiled = ncc.torch.compile(
        module,
        example,
        pipeline=f"fold-constants,woq-{algo}{{group-size={group}}},pack-int4",
        calib=calib,
        check=False,
    )
    seconds = time.perf_counter() - start
    nll = []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            ids = torch.from_numpy(windows[i : i + batch])
            logits = compiled.graph_module(ids, torch.ones_like(ids))
            nll.extend(LM.logits_nll(logits.numpy(), windows[i : i + batch]))
    return float(np.exp(np.sum(nll) / (windows.shape[0] * (windows.shape[1] - 1)))), seconds


def perplexity_rows(algos: list[str], groups: list[int]) -> list[str]:
    import realmodels

    float_model = realmodels.smollm2_onnx()
    fp32 = LM.fp32_perplexity(float_model)
    module = realmodels._smollm2_module()
    lines = [
        "| algorithm | group | torch path perplexity | ONNX path perplexity | torch / ONNX | torch quantize s |",
        "|---|---|---|---|---|---|",
        f"| FP32 | | | {fp32:.4f} | | |",
    ]
    for algo in algos:
        for group in groups:
            onnx_ppl = LM.ncc_w4_cached(float_model, algo, group)["perplexity"]
            ppl, seconds = torch_perplexity(module, algo, group)
            print(f"[perplexity] {algo} G{group}: torch {ppl:.4f}, ONNX {onnx_ppl:.4f}", file=sys.stderr)
            lines.append(
                f"| {algo.upper()} | {group} | {ppl:.4f} | {onnx_ppl:.4f} | {ppl / onnx_ppl:.4f} | {seconds:.1f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 timing rounds instead of 7")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--groups", default="32,64")
    parser.add_argument("--algos", default="rtn,gptq,awq", help="for the perplexity table")
    parser.add_argument("--decode-algos", default="rtn", help="for the decode table (gptq, awq: slower)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-perplexity", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    from bench_int8 import machine_facts

    groups = [int(g) for g in args.groups.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    decode = (
        []
        if args.skip_decode
        else decode_rows(
            groups, threads, 3 if args.quick else 7, args.new_tokens, args.decode_algos.split(",")
        )
    )
    perplexity = [] if args.skip_perplexity else perplexity_rows(args.algos.split(","), groups)
    facts = machine_facts()
    print("# SmolLM2-135M weight-only INT4 through ncc's torch path\n")
    switches = (
        ("--quick", args.quick),
        ("--skip-perplexity", args.skip_perplexity),
        ("--skip-decode", args.skip_decode),
    )
    flags = [f for f, on in switches if on]
    flags += [f"--threads {args.threads}", f"--groups {args.groups}", f"--algos {args.algos}"]
    flags += [f"--decode-algos {args.decode_algos}"]
    print(f"command: python benchmarks/bench_torch_llm.py {' '.join(flags)}")
    print(
        f"machine: {facts['cpu']}, {facts['cores']} cores; avx2={facts['avx2']} avx512_vnni={facts['avx512_vnni']} "
        f"amx={facts['amx']}; torch {torch.__version__}\n"
    )
    if decode:
        print(f"decode: batch 1, {PROMPT_TOKENS}-token prompt, {args.new_tokens} new tokens, greedy\n")
        print("\n".join(decode) + "\n")
    if perplexity:
        print(f"perplexity: {LM.N_EVAL} windows x {LM.SEQ} tokens of pydoc_data.topics\n")
        print("\n".join(perplexity))


if __name__ == "__main__":
    main()
