"""Accuracy-aware tuning (``ncc compile --eval``): evaluations spent, metric reached, speed kept.

    python benchmarks/bench_tuning.py                                  # MiniLM and EfficientNet-Lite0
    python benchmarks/bench_tuning.py --models minilm --basic-max-trials 60
    python benchmarks/bench_tuning.py --models "" --woq smollm2          # SmolLM2-135M w4, perplexity
    python benchmarks/bench_tuning.py --models "" --woq smollm2 --cache-dir D --resume   # go on after a stop

For each model, ``ncc compile --pass int8 --eval ... --max-loss BOUND`` runs as a user runs it (a fresh
process, a new tuning log) with the ``ranked`` strategy and with ``basic`` (one node at a time, then
accumulated: Intel Neural Compressor's basic strategy, bounded by ``--basic-max-trials``); the metric
functions are the ones in ``examples/``: tweet-sentiment accuracy of all-MiniLM-L6-v2's embeddings
(1,000 test tweets), EfficientNet-Lite0's top-1 agreement with FP32 on 2,400 photo crops. Each tuned
model is then timed side by side with FP32 and with the all-int8 model (``--min-cosine 0``: no node in
float, the fastest) in onnxruntime at batch 8, 2 threads (blocks, median over rounds).

``--woq smollm2`` tunes SmolLM2-135M's ``w4`` (with its calibration windows, so the algorithm is
screened) for ``--max-loss 3%`` relative perplexity (``examples/smollm2_perplexity.py``) and prints every
trial's file size against its perplexity.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import int8_models as m  # noqa: E402
from bench_int8 import machine_line, time_rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "minilm": (m.minilm_task, "examples/minilm_sentiment.py:accuracy", "0.5%"),
    "efficientnet": (m.efficientnet_task, "examples/efficientnet_agreement.py:agreement", "1%"),
}
#: weight-only: (model and calibration files, metric, bound): the search's trials, size against perplexity
#: (groups of 64, the coarsest that divides SmolLM2-135M's K = 576: the search refines layers to groups of 32
#: or raises them to 8 bits, by gain per byte)
WOQ_MODELS = {"smollm2": ("examples/smollm2_perplexity.py:perplexity", "3%", ("--group-size", "64"))}


def tune(
    task,
    metric: str,
    bound: str,
    out: Path,
    cache: Path,
    strategy: str,
    max_trials: int | None,
    extra: tuple[str, ...] = (),
    pipeline: str = "int8",
) -> dict:
    """``ncc compile --pass PIPELINE --eval`` in a fresh process; what its report says."""
    command = [
        sys.executable, "-m", "ncc.tools.cli", "compile", str(task.float_model), "--pass", pipeline,
        "--calib", str(task.calib), "--cache-dir", str(cache), "-o", str(out), "--eval", metric,
        "--max-loss", bound, "--strategy", strategy, *extra,
    ]  # fmt: skip
    if max_trials:
        command += ["--max-trials", str(max_trials)]
    start = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    report = run.stderr
    (out.parent / f"{out.stem}.log").write_text(report)
    tuned = re.search(
        r"^tuned: metric (\S+) \(loss (\S+)\) with ((\d+) nodes? (?:in float|at 8 bits|in groups of \d+)"
        r"(?: and \d+ nodes? at 8 bits)?); (\d+) evaluations",
        report,
        re.M,
    )
    if tuned is None:
        failure = next((line for line in report.splitlines() if line.startswith("ncc: error")), report[-300:])
        evaluations = len(re.findall(r"^ncc: tune: trial \d+ ", report, re.M)) + 1  # + FP32
        return {
            "ok": False,
            "evaluations": evaluations,
            "seconds": seconds,
            "why": failure.removeprefix("ncc: error: "),
        }
    table = re.findall(
        r"^\s+(\d+)\s+(fp32|default|screened|finer|bisect|give back)\s+(\S+)\s+(\S+)\s+(\S+)\s+(.+)$",
        report,
        re.M,
    )
    return {
        "ok": True,
        "trials": table,
        "metric": float(tuned.group(1)),
        "loss": tuned.group(2),
        "float": int(tuned.group(4)),
        "promoted": tuned.group(3),
        "evaluations": int(tuned.group(5)),
        "seconds": seconds,
        "fp32": float(re.search(r"FP32 metric (\S+);", report).group(1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,efficientnet", help="int8 models (empty: none)")
    parser.add_argument("--basic-max-trials", type=int, default=60, help="evaluations basic may spend")
    parser.add_argument("--no-basic", action="store_true", help="skip the basic strategy's rows")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds")
    parser.add_argument("--woq", default="", help="weight-only models to tune too: smollm2")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="keep the calibration caches and tuning logs here (default: a temporary folder)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the tuning runs whose logs are in --cache-dir (an interrupted run of this script)",
    )
    args = parser.parse_args()
    os.environ.setdefault("NCC_CACHE", str(m.realmodels.CACHE.parent))
    rows = []
    resume = ("--resume",) if args.resume else ()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        caches = args.cache_dir or tmp
        for name in filter(None, args.models.split(",")):
            build, metric, bound = MODELS[name]
            task = build()
            cache = caches / f"cache-{name}"
            all_int8 = tmp / f"{name}-all-int8.onnx"
            m.ncc_compile(task.float_model, task.calib, all_int8, extra=("--min-cosine", "0"), cache=cache)
            results = {
                "ranked": tune(
                    task, metric, bound, tmp / f"{name}-ranked.onnx", cache, "ranked", None, resume
                )
            }
            print(f"[{name}] ranked: {results['ranked']}", file=sys.stderr)
            if not args.no_basic:
                results["basic"] = tune(
                    task,
                    metric,
                    bound,
                    tmp / f"{name}-basic.onnx",
                    cache,
                    "basic",
                    args.basic_max_trials,
                    resume,
                )
                print(f"[{name}] basic: {results['basic']}", file=sys.stderr)
            timed = [task.float_model, all_int8] + [
                tmp / f"{name}-{s}.onnx" for s, r in results.items() if r["ok"]
            ]
            timing = time_rows(timed, task.timing_feed(8), warmup=3, runs=5, rounds=args.rounds)
            index = 2
            for strategy, r in results.items():
                speed = "-"
                if r["ok"]:
                    ratio = timing.ratio(index, ref=1)
                    speed = f"{ratio['median']:.2f} ({ratio['q25']:.2f}-{ratio['q75']:.2f})"
                    index += 1
                rows.append((task.name, bound, strategy, r, speed, timing.ratio(1)["median"]))
        woq_tables = []
        for name in filter(None, args.woq.split(",")):
            metric, bound, flags = WOQ_MODELS[name]
            task = _smollm2_task()
            r = tune(
                task,
                metric,
                bound,
                tmp / f"{name}-w4.onnx",
                caches / f"cache-{name}",
                "ranked",
                None,
                ("--lower-is-better", *flags, *resume),
                pipeline="w4",
            )
            print(f"[{name}] w4: {r}", file=sys.stderr)
            woq_tables.append((name, bound, r))
    print("# Accuracy-aware tuning: evaluations spent, metric reached, speed kept\n")
    print(
        f'command: python benchmarks/bench_tuning.py --models "{args.models}" --basic-max-trials {args.basic_max_trials}'
        + (f" --woq {args.woq}" if args.woq else "")
        + (" --resume (trials before the interruption read from the tuning log)" if args.resume else "")
    )
    print(machine_line())
    print()
    print(
        "| model | --max-loss | strategy | evaluations | metric (FP32) | loss | nodes in float | tuning time | "
        "speed vs all-int8, b8 (quartiles) | all-int8 vs FP32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, bound, strategy, r, speed, int8_speed in rows:
        _row(model, bound, strategy, r, speed, int8_speed)
    for name, bound, r in woq_tables:
        print(f"\n{name} w4, --max-loss {bound} relative perplexity (--lower-is-better): every trial\n")
        if not r["ok"]:
            print(f"not met: {r['why']} ({r['evaluations']} evaluations, {r['seconds']:.0f} s)")
            continue
        print("| trial | phase | perplexity | loss | MB | configuration |")
        print("|---|---|---|---|---|---|")
        for number, phase, metric, loss, mb, what in r["trials"]:
            print(f"| {number} | {phase} | {metric} | {loss} | {mb} | {what.strip()} |")
        print(
            f"\ntuned: perplexity {r['metric']:.4g} (FP32 {r['fp32']:.4g}, loss {r['loss']}), {r['promoted']}, "
            f"{r['evaluations']} evaluations, {r['seconds']:.0f} s"
        )


def _row(model, bound, strategy, r, speed, int8_speed) -> None:
    if r["ok"]:
        print(
            f"| {model} | {bound} | {strategy} | {r['evaluations']} | {r['metric']:.4g} ({r['fp32']:.4g}) | "
            f"{r['loss']} | {r['float']} | {r['seconds']:.0f} s | {speed} | {int8_speed:.2f}x |"
        )
    else:
        print(
            f"| {model} | {bound} | {strategy} | {r['evaluations']} | not met: {r['why']} | - | - | "
            f"{r['seconds']:.0f} s | - | {int8_speed:.2f}x |"
        )


def _smollm2_task():
    from types import SimpleNamespace

    import llm_models

    sys.path.insert(0, str(ROOT / "tests"))
    import realmodels

    return SimpleNamespace(
        name="SmolLM2-135M", float_model=realmodels.smollm2_onnx(), calib=llm_models.calibration_npz()
    )


if __name__ == "__main__":
    main()
