"""INT8 post-training quantization, side by side with onnxruntime.quantization (issue 3).

    python benchmarks/bench_int8.py                      # all three models, full timing
    python benchmarks/bench_int8.py --quick              # fewer timing repeats
    python benchmarks/bench_int8.py --models efficientnet,mnist --json results.json
    python benchmarks/bench_int8.py --models efficientnet --targets host,x86-avx2   # both targets' weights

For each model, in one run, on the same calibration ``.npz``:

- ncc ``int8`` (static) ``--format qdq`` and ``--format qoperator``; ncc ``int8-dynamic``
  ``--format integerops`` (MiniLM only) — each ``ncc compile`` in a subprocess with an empty
  calibration cache (``--cache-dir`` a fresh temp folder), its wall time reported;
- onnxruntime ``quantize_static`` (QDQ, per-channel, u8 activations / s8 weights) with MinMax,
  Entropy and Percentile calibration, with and without ``reduce_range``; the best of each
  ``reduce_range`` setting is timed and shown as "onnxruntime best", the others are listed;
- onnxruntime ``quantize_dynamic`` (per-channel; MiniLM only).

With ``--compile-repeats N`` every quantizer runs N times, interleaved (round r runs each once, in
turn, so a machine whose speed drifts slows them alike); the table shows each one's median.

Throughput: every row of one model is timed side by side in blocks (``ncc.tools.timing``: rounds
of one block per model, the order reversed every round, each block starting once the previous
model's idle onnxruntime workers stopped spinning), 2 intra-op threads, batch 1 and batch 8
(MiniLM at sequence length 128); the speed-up is the median over rounds of the FP32/INT8 ratio of
the block medians of one round. Quality: see ``int8_models.py`` (MiniLM: logistic-regression
accuracy on 1,000 test tweets and embedding cosine with FP32; EfficientNet: top-1 agreement with
FP32 on 2,400 photo crops, and the logits' SQNR and cosine; MNIST CNN: test accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import int8_models as m  # noqa: E402
from ncc.tools.timing import SETTLE_S, time_blocks  # noqa: E402

THREADS = 2
BATCHES = (1, 8)
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
MIN_BLOCK_S = 0.4  # a fast model's timing block lasts at least this long
#: Issue 3's quality targets, shown under each table (tests/test_int8_models.py asserts floors with margins)
QUALITY_TARGETS = {"efficientnet": 0.96}


# -- machine ------------------------------------------------------------------------------------------


def machine_facts() -> dict:
    import onnxruntime as ort

    cpu, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("?", "", "x86_64"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    try:
        from ncc.targets import host_target

        target = host_target()
    except Exception as err:  # pragma: no cover - reported, not fatal
        target = f"? ({type(err).__name__})"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "amx": "amx_int8" in flags,
        "onnxruntime": ort.__version__,
        "ncc_target": target,
        "threads": THREADS,
        "python": platform.python_version(),
    }


def machine_line(extra: str = "") -> str:
    """The ``machine:`` line every benchmark table prints: CPU, cores and the flags that decide int8 speed."""
    f = machine_facts()
    line = f"machine: {f['cpu']}, {f['cores']} cores; avx2={f['avx2']} avx512_vnni={f['avx512_vnni']} amx={f['amx']}"
    return f"{line}; {extra}" if extra else line


def speed_cells(rate: float, ratio: dict) -> str:
    """A table's ``samples/s | speed-up (quartiles)`` cells for one configuration."""
    return f" {rate:.1f} | {ratio['median']:.2f}x ({ratio['q25']:.2f}-{ratio['q75']:.2f}) |"


# -- timing -------------------------------------------------------------------------------------------


def time_rows(paths: list[Path], feed: dict, warmup: int, runs: int, rounds: int):
    """Every model of ``paths`` side by side in blocks (:func:`ncc.tools.timing.time_blocks`: each
    block after the previous model's idle onnxruntime workers stopped spinning, fast models' blocks
    lasting at least MIN_BLOCK_S). Returns the Timing; ``paths[0]`` is the FP32 reference."""
    sessions = [m.session(p, THREADS) for p in paths]
    feeds = [{i.name: feed[i.name] for i in s.get_inputs()} for s in sessions]
    return time_blocks(sessions, feeds, runs=runs, rounds=rounds, warmup=warmup, min_block_s=MIN_BLOCK_S)


def size_mb(path: Path) -> float:
    from ncc.tools.bench import _ModelInfo

    return _ModelInfo(Path(path), "model").size_bytes / 1e6


# -- one model ----------------------------------------------------------------------------------------


@dataclass
class _Compile:
    """One quantizer run the table reports: ``once()`` compiles (fresh process) and returns its wall s."""

    method: str
    path: Path
    command: str
    kind: str
    once: object
    extra: dict = field(default_factory=dict)
    walls: list = field(default_factory=list)
    error: str | None = None


def _time_compiles(jobs: list[_Compile], repeats: int, log, key: str) -> None:
    """Every job ``repeats`` times, interleaved (one round runs each job once, in turn), so that a machine
    whose speed drifts during the run slows every quantizer alike; a job that fails is not run again."""
    for _ in range(max(1, repeats)):
        for job in jobs:
            if job.error is not None:
                continue
            try:
                job.walls.append(job.once())
            except Exception as err:  # report, keep going
                job.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                log(f"[{key}] {job.method} FAILED: {job.error}")


def bench_model(
    key: str,
    workdir: Path,
    warmup: int,
    runs: int,
    rounds: int,
    methods: tuple[str, ...],
    log,
    repeats: int = 1,
    targets: tuple[str, ...] = ("host",),
) -> dict:
    t0 = time.perf_counter()
    task = m.TASKS[key]()
    log(f"[{key}] task ready in {time.perf_counter() - t0:.1f}s ({task.float_model})")
    fp32 = task.evaluate(task.float_model)
    rows: list[dict] = []  # each: method, path, quantize_s, command, quality, kind

    def add(job: _Compile) -> dict:
        t = time.perf_counter()
        quality = task.evaluate(job.path)
        wall = float(np.median(job.walls))
        log(
            f"[{key}] {job.method}: quantize {fmt_seconds(wall)}s "
            f"({', '.join(fmt_seconds(w) for w in job.walls)}), eval {time.perf_counter() - t:.1f}s, "
            f"{fmt_quality(quality)}"
        )
        row = {
            "method": job.method,
            "path": job.path,
            "quantize_s": wall,
            "command": job.command,
            "quality": quality,
            "kind": job.kind,
            **job.extra,
        }
        rows.append(row)
        return row

    def ncc_job(pipeline: str, fmt: str, extra: tuple[str, ...], target: str) -> _Compile:
        out = workdir / f"{key}-ncc-{pipeline}-{fmt}{'-' + target if extra else ''}.onnx"
        calib = task.calib if pipeline == "int8" else None
        job = _Compile(
            f"ncc {pipeline} --format {fmt}{' ' + ' '.join(extra) if extra else ''}", out, "", "ncc", None
        )

        def once() -> float:
            wall, job.command = m.ncc_compile(
                task.float_model, calib, out, pipeline=pipeline, fmt=fmt, extra=extra
            )
            return wall

        job.once = once
        return job

    jobs: list[_Compile] = []
    forms = [("int8", "qdq"), ("int8", "qoperator")] + (
        [("int8-dynamic", "integerops")] if key == "minilm" else []
    )
    for target in targets:
        extra = () if target == "host" else ("--target", target)
        for pipeline, fmt in forms:
            if extra and pipeline != "int8":
                continue  # the target profile only changes static INT8 weights (int16 pairs)
            jobs.append(ncc_job(pipeline, fmt, extra, target))
    batch = 8 if key == "minilm" else 16
    for method, reduce_range in m.ORT_STATIC_VARIANTS:
        if method in methods:
            out = workdir / f"{key}-ort-{method}{'-rr' if reduce_range else ''}.onnx"
            jobs.append(
                _Compile(
                    f"onnxruntime static {method}{' reduce_range' if reduce_range else ''}",
                    out,
                    f"quantize_static(QDQ, per_channel=True, QUInt8/QInt8, calibrate_method={method}, "
                    f"reduce_range={reduce_range})",
                    "ort-static",
                    lambda out=out, method=method, reduce_range=reduce_range: m.ort_static(
                        task.float_model,
                        task.calib,
                        out,
                        method=method,
                        reduce_range=reduce_range,
                        batch=batch,
                    ),
                    {"reduce_range": reduce_range, "variant": m.ort_variant_name(method, reduce_range)},
                )
            )
    if key == "minilm":  # the hand-restricted form the issue quotes (MinMax, MatMul only: cosine ~0.93)
        out = workdir / f"{key}-ort-MinMax-matmul.onnx"
        jobs.append(
            _Compile(
                "onnxruntime static MinMax, MatMul only (hand-restricted)",
                out,
                "quantize_static(QDQ, per_channel=True, QUInt8/QInt8, MinMax, op_types_to_quantize=['MatMul'])",
                "ort-static-matmul",
                lambda out=out: m.ort_static(
                    task.float_model, task.calib, out, method="MinMax", op_types=["MatMul"], batch=8
                ),
            )
        )
        for reduce_range in (False, True):
            out = workdir / f"{key}-ort-dynamic{'-rr' if reduce_range else ''}.onnx"
            jobs.append(
                _Compile(
                    f"onnxruntime dynamic{' reduce_range' if reduce_range else ''}",
                    out,
                    f"quantize_dynamic(per_channel=True, QInt8, reduce_range={reduce_range})",
                    "ort-dynamic",
                    lambda out=out, reduce_range=reduce_range: m.ort_dynamic(
                        task.float_model, out, reduce_range=reduce_range
                    ),
                )
            )
    _time_compiles(jobs, repeats, log, key)

    ort_static_rows, failures = [], []
    for job in jobs:
        if job.error is None:
            row = add(job)
            if job.kind == "ort-static":
                ort_static_rows.append(row)
        elif job.kind == "ort-static":
            failures.append((f"onnxruntime static {job.extra['variant']}", job.error))
    if len(ort_static_rows) == len(m.ORT_STATIC_VARIANTS):  # all ran: cache for tests/test_int8_models.py
        m.save_ort_scores(task, {r["variant"]: r["quality"]["metric"] for r in ort_static_rows})

    # the best onnxruntime static row for each reduce_range setting gets timed (ties: faster quantize)
    best = []
    for reduce_range in (False, True):
        group = [r for r in ort_static_rows if r["reduce_range"] == reduce_range]
        if group:
            b = max(
                group, key=lambda r: (r["quality"]["metric"], r["quality"].get("cosine", 0), -r["quantize_s"])
            )
            b["best"] = True
            best.append(b)
    timed = [r for r in rows if r["kind"] != "ort-static"] + best

    perf = {}
    for batch in BATCHES:
        t = time.perf_counter()
        perf[batch] = time_rows(
            [task.float_model] + [r["path"] for r in timed], task.timing_feed(batch), warmup, runs, rounds
        )
        log(f"[{key}] timing batch {batch}: {time.perf_counter() - t:.1f}s")
    for i, r in enumerate(timed):
        r["latency_s"] = {b: perf[b].median(i + 1) for b in BATCHES}
        r["speedup"] = {b: perf[b].ratio(i + 1) for b in BATCHES}
    fp32_size = size_mb(task.float_model)
    for r in rows:
        r["size_mb"] = size_mb(r["path"])
    return {
        "key": key,
        "task": task,
        "fp32": fp32,
        "fp32_latency_s": {b: perf[b].median(0) for b in BATCHES},
        "fp32_size_mb": fp32_size,
        "rows": rows,
        "timed": timed,
        "failures": failures,
    }


def fmt_quality(q: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in q.items() if k != "fp32_accuracy")


# -- output -------------------------------------------------------------------------------------------


def fmt_seconds(s: float) -> str:
    """A compile's wall time: hundredths below 10 s (the MNIST CNN's bound is a ratio of two ~0.4 s runs)."""
    return f"{s:.2f}" if s < 10 else f"{s:.1f}"


def table(result: dict) -> str:
    task, fp32 = result["task"], result["fp32"]
    minilm = result["key"] == "minilm"
    logits = "sqnr_db" in fp32  # EfficientNet: the logits' SQNR and cosine beside top-1 agreement
    lat0 = result["fp32_latency_s"]
    head = ["model", "method", f"FP32 {task.metric_name}", "INT8", "ratio"]
    for b in BATCHES:
        head += [f"FP32 samples/s b{b}", f"INT8 samples/s b{b}", f"speed-up b{b}"]
    head += ["FP32 MB", "INT8 MB", "quantize s"]
    if minilm:
        head += ["emb. cosine", "LR acc. rel."]
    if logits:
        head += ["logit SQNR dB", "logit cosine"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["timed"]:
        q = r["quality"]
        label = r["method"] + (" (onnxruntime best)" if r.get("best") else "")
        cells = [
            task.name,
            label,
            f"{fp32['metric']:.4f}",
            f"{q['metric']:.4f}",
            f"{q['metric'] / fp32['metric']:.2%}",
        ]
        for b in BATCHES:
            s0, s1, up = b / lat0[b], b / r["latency_s"][b], r["speedup"][b]
            cells += [f"{s0:.1f}", f"{s1:.1f}", f"{up['median']:.2f}x ({up['q25']:.2f}-{up['q75']:.2f})"]
        cells += [f"{result['fp32_size_mb']:.1f}", f"{r['size_mb']:.1f}", fmt_seconds(r["quantize_s"])]
        if minilm:
            cells += [f"{q['cosine']:.4f}", f"{q['accuracy'] / q['fp32_accuracy']:.2%}"]
        if logits:
            cells += [f"{q['sqnr_db']:.2f}", f"{q['cosine']:.5f}"]
        lines.append("| " + " | ".join(cells) + " |")
    others = [r for r in result["rows"] if r["kind"] == "ort-static" and not r.get("best")]
    if others:
        lines += [
            "",
            f"other onnxruntime quantize_static calibrations ({task.name}, not timed):",
            "",
            "| method | INT8 | ratio | quantize s |"
            + (" emb. cosine |" if minilm else "")
            + (" logit SQNR dB |" if logits else ""),
            "|---|---|---|---|" + ("---|" if minilm or logits else ""),
        ]
        for r in others:
            q = r["quality"]
            lines.append(
                f"| {r['method']} | {q['metric']:.4f} | {q['metric'] / fp32['metric']:.2%} | {fmt_seconds(r['quantize_s'])} |"
                + (f" {q['cosine']:.4f} |" if minilm else "")
                + (f" {q['sqnr_db']:.2f} |" if logits else "")
            )
    for method, error in result.get("failures", []):
        lines.append(f"\n{method}: FAILED ({error})")
    return "\n".join(lines)


def byte_compile_ncc() -> None:
    """Write ncc's bytecode, as a regular ``pip install`` does (onnxruntime's quantizer is timed from its
    installed bytecode too): an editable install under PYTHONDONTWRITEBYTECODE=1 would otherwise compile
    ncc's sources in every timed ``ncc compile``."""
    import compileall

    import ncc

    compileall.compile_dir(
        str(Path(ncc.__file__).parent), quiet=1, rx=re.compile(r"[/\\](\.cache|\.ci|venv)[/\\]")
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="5 timing rounds (2 warm-up, at least 10 timed runs) instead of 9 (5, 45)",
    )
    parser.add_argument(
        "--models", default="minilm,efficientnet,mnist", help="comma-separated: minilm,efficientnet,mnist"
    )
    parser.add_argument(
        "--ort-methods", default=",".join(ORT_METHODS), help="onnxruntime calibration methods to run"
    )
    parser.add_argument(
        "--compile-repeats",
        type=int,
        default=1,
        help="time every compile this many times (fresh processes) and report the median",
    )
    parser.add_argument(
        "--targets",
        default="host",
        help="comma-separated ncc target profiles to compile int8 for (host, x86-avx2, x86-vnni); each "
        "adds rows. x86-avx2's pair-safe weights run exactly on any x86 CPU, so a VNNI machine can score "
        "both; x86-vnni's need VNNI",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--keep", type=Path, help="keep the quantized models in this folder (default: a temp folder)"
    )
    args = parser.parse_args(argv)
    warmup, runs, rounds = (2, 10, 5) if args.quick else (5, 45, 9)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in m.TASKS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(m.TASKS)}")
    methods = tuple(x.strip() for x in args.ort_methods.split(",") if x.strip())
    targets = tuple(dict.fromkeys(t.strip() for t in args.targets.split(",") if t.strip()))
    from ncc.targets import TARGETS, get_target, host_target

    unknown = [t for t in targets if t != "host" and t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from host, {', '.join(sorted(TARGETS))}")
    if any(not get_target(t).pairwise_int16 for t in targets) and get_target(host_target()).pairwise_int16:
        parser.error(
            "x86-vnni models saturate int16 pairs on this CPU (no VNNI): their scores would be wrong"
        )

    facts = machine_facts()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    byte_compile_ncc()
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="ncc-bench-int8-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for key in keys:
            results.append(
                bench_model(key, workdir, warmup, runs, rounds, methods, log, args.compile_repeats, targets)
            )
    total = time.perf_counter() - start

    print("# INT8 post-training quantization: ncc vs onnxruntime.quantization\n")
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(
        f"machine: {facts['cpu']}, {facts['cores']} cores; avx2={facts['avx2']} avx512f={facts['avx512f']} "
        f"avx512_vnni={facts['avx512_vnni']} avx_vnni={facts['avx_vnni']}; onnxruntime {facts['onnxruntime']}; "
        f"ncc target {facts['ncc_target']}; Python {facts['python']}"
    )
    print(
        f"timing: {THREADS} intra-op threads (1 inter-op), CPU EP, ORT_ENABLE_ALL; all rows of a model side by side in "
        f"{rounds} rounds of one block each (ncc.tools.timing: a block starts after {SETTLE_S:.1f} s of untimed runs, "
        f"when the previous model's idle onnxruntime workers stopped spinning; at least {-(-runs // rounds)} timed runs "
        f"and {MIN_BLOCK_S} s a block) after {warmup} warm-up; samples/s from the median run; speed-up = median over "
        f"rounds of the FP32/INT8 ratio of block medians (quartiles in brackets); batch {' and '.join(map(str, BATCHES))}"
        f" (MiniLM at seq len {m.SEQ}); quantize s = wall time of a fresh process, as a user runs it from a shell: `ncc compile` "
        f"(empty calibration cache, onnxruntime check of the result included; ncc's bytecode written first, as a "
        f"pip install does; median of {args.compile_repeats} runs each) vs benchmarks/ort_quantize.py calling "
        f"quantize_static / quantize_dynamic; total benchmark time {total:.0f}s\n"
    )
    for res in results:
        task = res["task"]
        print(f"## {task.name}\n")
        print(
            f"calibration: {task.calib} ({len(next(iter(np.load(task.calib).values())))} samples); "
            f"evaluation: {task.eval_samples} samples\n"
        )
        print(table(res))
        if (goal := QUALITY_TARGETS.get(res["key"])) is not None:
            met = [f"{r['method']}: {r['quality']['metric']:.4f}" for r in res["rows"] if r["kind"] == "ncc"]
            print(f"\ntarget: {task.metric_name} >= {goal} ({'; '.join(met)})")
        print("\ncommands:")
        for r in res["rows"]:
            if r["kind"] == "ncc":
                cmd = re.sub(r"--cache-dir \S+", "--cache-dir $EMPTY_TMP_DIR", r["command"])
                print(f"    {cmd.replace(str(Path(r['path']).parent), '$OUT')}")
        print()
    if args.json:
        payload = {"machine": facts, "warmup": warmup, "runs": runs, "total_s": total, "models": []}
        for res in results:
            payload["models"].append(
                {
                    "model": res["task"].name,
                    "fp32": res["fp32"],
                    "fp32_latency_s": res["fp32_latency_s"],
                    "fp32_size_mb": res["fp32_size_mb"],
                    "failures": res["failures"],
                    "rows": [
                        {k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in res["rows"]
                    ],
                }
            )
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
