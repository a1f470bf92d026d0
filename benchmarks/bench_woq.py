"""Weight-only INT4 on SmolLM2-135M: ncc (RTN, GPTQ, AWQ) vs onnxruntime's MatMulNBitsQuantizer (RTN).

Prints one markdown table: FP32; for each group size and scheme (asym / sym), ncc's RTN row with
onnxruntime's RTN row of the same settings beside it, then ncc's GPTQ and AWQ. Columns: perplexity on
the evaluation windows and its change from FP32, bytes of the weights feeding MatMul / MatMulNBits (and
how many times smaller than FP32's), total file size, batch-1 prefill latency of 128 tokens, compile
wall time. Then the W4G128 acceptance verdicts (issue 4).

Models, data and metrics come from ``llm_models.py``. Quantized models and their scores are cached
under ``realmodels.CACHE / "woq"`` (ncc's keyed by a hash of ncc's source code, onnxruntime's by its
version), so a second run only times; ``--fresh`` rebuilds ncc's. Latency: every row side by side in rounds
of one prefill each (``ncc.tools.timing``: order reversed every other round, each run after the
previous row's idle onnxruntime workers stopped spinning), median after warm-up. The speed verdict
compares ncc's RTN with onnxruntime's at the same settings side by side: ``--paired-rounds``
rounds of one prefill each, the median of their per-round ratios and its quartiles, and whether
the two models' packed weights are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llm_models as L  # noqa: E402

ALGOS = ("rtn", "gptq", "awq")
GROUPS = (32, 64, 128)
QUICK = ((128, False), (128, True), (32, False))  # (group size, symmetric)
MB = 1e6


def configs(args) -> list[tuple[int, bool]]:
    if args.quick:
        return [c for c in QUICK if c[0] in args.groups]
    return [(g, sym) for g in args.groups for sym in (False, True)]


def build_rows(float_model: Path, args, log) -> tuple[list[dict], list[str]]:
    rows, failures = [], []
    for group, sym in configs(args):
        scheme = "sym" if sym else "asym"
        for algo in args.algos:
            t = time.perf_counter()
            try:
                if args.fresh:
                    _drop_cached(float_model, algo, group, sym)
                r = L.ncc_w4_cached(float_model, algo, group, sym)
            except Exception as err:  # report, keep going
                first = str(err).strip().splitlines()
                failures.append(f"ncc {algo} G{group} {scheme}: {first[0] if first else type(err).__name__}")
                log(f"ncc {algo} G{group} {scheme} FAILED:\n{err}")
                continue
            rows.append(
                {**r, "method": f"ncc {algo}", "group": group, "scheme": scheme, "kind": "ncc", "algo": algo}
            )
            log(
                f"ncc {algo} G{group} {scheme}: ppl {r['perplexity']:.3f}, compile {r['quantize_s']:.0f}s "
                f"({time.perf_counter() - t:.0f}s here)"
            )
            if algo == "rtn" and not args.skip_ort:
                t = time.perf_counter()
                o = L.ort_rtn_cached(float_model, group, sym)
                rows.append(
                    {
                        **o,
                        "method": "onnxruntime rtn",
                        "group": group,
                        "scheme": scheme,
                        "kind": "ort",
                        "algo": "rtn",
                    }
                )
                log(
                    f"onnxruntime rtn G{group} {scheme}: ppl {o['perplexity']:.3f} ({time.perf_counter() - t:.0f}s here)"
                )
    return rows, failures


def _drop_cached(float_model: Path, algo: str, group: int, sym: bool) -> None:
    """Remove ncc's cached model for these settings, so that it compiles again."""
    import shutil

    for folder in L.CACHE.glob(f"ncc-{algo}-{L._settings(group, sym)}-*"):
        shutil.rmtree(folder, ignore_errors=True)


def find(rows: list[dict], kind: str, algo: str, group: int, scheme: str) -> dict | None:
    return next(
        (
            r
            for r in rows
            if r["kind"] == kind and r["algo"] == algo and r["group"] == group and r["scheme"] == scheme
        ),
        None,
    )


def table(fp32: dict, rows: list[dict]) -> str:
    head = [
        "method",
        "group",
        "scheme",
        "perplexity",
        "Δppl",
        "weight-MatMul MB",
        "x smaller",
        "file MB",
        "prefill ms (128 tok, b1)",
        "compile s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines.append(
        f"| FP32 | | | {fp32['perplexity']:.3f} | | {fp32['weight_matmul_bytes'] / MB:.1f} | 1.00x | "
        f"{fp32['file_bytes'] / MB:.1f} | {fp32['latency_ms']:.0f} | |"
    )
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['group']} | {r['scheme']} | {r['perplexity']:.3f} | "
            f"{r['perplexity'] - fp32['perplexity']:+.3f} | {r['weight_matmul_bytes'] / MB:.1f} | "
            f"{fp32['weight_matmul_bytes'] / r['weight_matmul_bytes']:.2f}x | {r['file_bytes'] / MB:.1f} | "
            f"{r['latency_ms']:.0f} | {r['quantize_s']:.1f} |"
        )
    return "\n".join(lines)


def verdicts(fp32: dict, rows: list[dict]) -> list[str]:
    out = []
    ok = lambda cond: "PASS" if cond else "FAIL"  # noqa: E731
    delta = lambda r: r["perplexity"] - fp32["perplexity"]  # noqa: E731
    for scheme in ("asym", "sym"):
        rtn = find(rows, "ncc", "rtn", 128, scheme)
        if rtn is None:
            continue
        cuts = []
        for algo in ("gptq", "awq"):
            r = find(rows, "ncc", algo, 128, scheme)
            if r is not None:
                cuts.append((algo, r))
        if cuts:
            out.append(
                f"GPTQ/AWQ cut RTN's Δppl at W4G128 {scheme} by "
                + " / ".join(f"{1 - delta(r) / delta(rtn):.0%}" for _, r in cuts)
                + f" ({' / '.join(algo.upper() for algo, _ in cuts)}: Δppl "
                + " / ".join(f"{delta(r):.3f}" for _, r in cuts)
                + f" vs RTN's {delta(rtn):.3f})"
            )
            for algo, r in cuts:
                out.append(
                    f"  {ok(delta(r) <= 0.5 * delta(rtn))}: {algo.upper()} W4G128 {scheme} Δppl {delta(r):.3f} "
                    f"<= 0.5 x RTN's {delta(rtn):.3f} = {0.5 * delta(rtn):.3f} (ratio {delta(r) / delta(rtn):.3f})"
                )
    for r in rows:
        if r["kind"] == "ncc" and r["group"] == 128:
            ratio = fp32["weight_matmul_bytes"] / r["weight_matmul_bytes"]
            out.append(
                f"  {ok(ratio >= 5)}: ncc {r['algo']} W4G128 {r['scheme']} weight-MatMul bytes "
                f"{ratio:.2f}x smaller than FP32 (>= 5x)"
            )
    for r in rows:
        if r["kind"] != "ncc" or r["algo"] != "rtn":
            continue
        o = find(rows, "ort", "rtn", r["group"], r["scheme"])
        if o is None:
            continue
        setting = f"W4G{r['group']} {r['scheme']}"
        side = r.get("side_by_side")
        if side is None:
            out.append(
                f"  {ok(r['latency_ms'] <= o['latency_ms'])}: ncc RTN {setting} prefill {r['latency_ms']:.0f} ms "
                f"vs onnxruntime RTN {o['latency_ms']:.0f} ms (ratio {r['latency_ms'] / o['latency_ms']:.3f}, <= 1)"
            )
        else:
            # faster, or a tie: the paired ratios' middle half reaches 1 (slower would put it all above 1)
            verdict = "PASS" if side["ratio"] <= 1 else "PASS (tie)" if side["q25"] <= 1 else "FAIL"
            same = "byte-identical packed weights" if side["identical"] else "different packed weights"
            out.append(
                f"  {verdict}: ncc RTN {setting} prefill vs onnxruntime RTN, side by side: ratio "
                f"{side['ratio']:.3f} (median of {side['rounds']} paired rounds, quartiles {side['q25']:.3f}-"
                f"{side['q75']:.3f}; {side['a_ms']:.0f} vs {side['b_ms']:.0f} ms; {same})"
            )
        out.append(
            f"  {ok(r['perplexity'] <= o['perplexity'])}: ncc RTN {setting} perplexity {r['perplexity']:.4f} vs "
            f"onnxruntime RTN {o['perplexity']:.4f} (<=)"
        )
    return out


def _git_head() -> str:
    import subprocess

    proc = subprocess.run(
        ["git", "-C", str(L.REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return proc.stdout.strip() or "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="only W4G128 asym and sym and W4G32 asym (of the --groups given)"
    )
    parser.add_argument("--algos", default=",".join(ALGOS), help="ncc algorithms: rtn,gptq,awq")
    parser.add_argument("--groups", default=",".join(map(str, GROUPS)), help="group sizes, e.g. 32,64,128")
    parser.add_argument("--skip-ort", action="store_true", help="no onnxruntime MatMulNBitsQuantizer rows")
    parser.add_argument("--fresh", action="store_true", help="compile ncc's models again even if cached")
    parser.add_argument("--repeats", type=int, default=10, help="timed prefill rounds (after 2 warm-up)")
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=40,
        help="paired ncc/onnxruntime RTN prefill rounds for the side-by-side speed check",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.algos = tuple(a.strip() for a in args.algos.split(",") if a.strip())
    args.groups = tuple(int(g) for g in args.groups.split(",") if g.strip())
    if set(args.algos) - set(ALGOS):
        parser.error(f"unknown algorithm(s) {sorted(set(args.algos) - set(ALGOS))}; choose from {ALGOS}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    import onnxruntime as ort

    start = time.perf_counter()
    float_model = L.realmodels.smollm2_onnx()
    fp32 = {
        "perplexity": L.fp32_perplexity(float_model),
        "weight_matmul_bytes": L.weight_matmul_bytes(float_model),
        "file_bytes": L.file_bytes(float_model),
        "matmuls": L.quantized_matmuls(float_model),
    }
    log(f"FP32: ppl {fp32['perplexity']:.3f} ({time.perf_counter() - start:.0f}s)")
    rows, failures = build_rows(float_model, args, log)

    t = time.perf_counter()
    latencies = L.prefill_latencies_ms([float_model] + [r["path"] for r in rows], repeats=args.repeats)
    fp32["latency_ms"] = latencies[0]
    for r, ms in zip(rows, latencies[1:]):
        r["latency_ms"] = ms
    for r in rows:  # ncc RTN against onnxruntime RTN at the same settings, paired round by round
        o = (
            find(rows, "ort", "rtn", r["group"], r["scheme"])
            if r["kind"] == "ncc" and r["algo"] == "rtn"
            else None
        )
        if o is not None:
            r["side_by_side"] = {
                **L.paired_latency_ratio(r["path"], o["path"], rounds=args.paired_rounds),
                "identical": L.packed_weight_digests(r["path"]) == L.packed_weight_digests(o["path"]),
            }
    log(f"timing: {time.perf_counter() - t:.0f}s")
    total = time.perf_counter() - start

    print("# Weight-only INT4: ncc vs onnxruntime MatMulNBitsQuantizer on SmolLM2-135M-Instruct\n")
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    sources = sorted({r["ncc_source"] for r in rows if r["kind"] == "ncc"})
    changed = [
        f"{r['method']} G{r['group']} {r['scheme']}"
        for r in rows
        if r["kind"] == "ncc" and r.get("ncc_source_after", r["ncc_source"]) != r["ncc_source"]
    ]
    print(
        f"machine: {platform.processor() or platform.machine()}, onnxruntime {ort.__version__}, Python "
        f"{platform.python_version()}; ncc commit {_git_head()}, ncc source hash(es) {', '.join(sources) or '-'}"
        + (f" (ncc's code changed while compiling: {', '.join(changed)})" if changed else "")
    )
    print(
        f"model: {float_model} (float32 from the GGUF's Q4_1/Q8_0 weights, 211 weight MatMuls incl. untied lm_head)"
    )
    print(
        f"perplexity: {L.N_EVAL} windows x {L.SEQ} tokens of pydoc_data.topics (first {L.EVAL_FRACTION:.0%} of "
        f"{len(L.token_stream())} tokens), next-token NLL in float64 over {L.N_EVAL * (L.SEQ - 1)} positions; "
        f"GPTQ/AWQ calibration: {L.N_CALIB} x {L.SEQ} tokens from the rest ({L.calibration_npz()})"
    )
    print(
        f"latency: batch-1 prefill of {L.PREFILL_TOKENS} tokens, {L.THREADS} intra-op threads (1 inter-op), CPU EP, "
        f"ORT_ENABLE_ALL; median of {args.repeats} rounds after 2 warm-up, one prefill per row a round, each after "
        f"0.1 s of untimed runs so the previous row's idle onnxruntime workers stopped spinning (ncc.tools.timing)"
    )
    print(
        "weight-MatMul MB: stored bytes of the weights feeding MatMul/MatMulNBits (packed B incl. padding of the last "
        "block, scales, zero points); compile s: `ncc compile` subprocess wall time when the model was built "
        f"(cached by ncc source hash; --fresh rebuilds) / in-process MatMulNBitsQuantizer; total {total:.0f}s\n"
    )
    print(table(fp32, rows))
    print()
    for line in verdicts(fp32, rows):
        print(line)
    for failure in failures:
        print(f"FAILED: {failure}")
    print("\nncc commands (OUT = the cache folder of each row):")
    for r in rows:
        if r["kind"] == "ncc":
            print("    " + " ".join(c.replace(str(L.REPO) + "/", "") for c in r["command"]))
    if args.json:
        payload = {"fp32": fp32, "rows": rows, "failures": failures, "total_s": total, "args": vars(args)}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
