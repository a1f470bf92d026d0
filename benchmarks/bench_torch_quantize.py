"""The quantize step's wall time: ncc's ``ncc.torch.compile`` against PT2E, alternating, median of runs.

    python benchmarks/bench_torch_quantize.py                   # EfficientNet-Lite0 and MiniLM, 3 runs each
    python benchmarks/bench_torch_quantize.py --models minilm --runs 5

The same tasks, data and batch (8) as ``bench_torch.py``: ncc's pipeline from the module to the
Inductor-ready graph (``check=False``: without Inductor's compile), and PT2E's export + prepare +
calibrate + convert (``bench_torch._pt2e``). Runs alternate ncc / PT2E so load drifts hit both; the
first run of each warms torch's caches and is part of the median like the rest. ncc's rows also split
its time: the frontend (``torch.export`` + translation to the IR), and each pass over 0.1 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_torch as bt  # noqa: E402


def measure(task, runs: int, pipeline: str) -> list[str]:
    import ncc.torch
    from ncc.frontends.torch import ROUTE
    from ncc.tools.torch_api import lower

    example = tuple(t[:8] for t in task.calib)
    calib = task.batches(task.calib, 8)
    dynamic = pipeline == "int8-dynamic"
    ours, theirs, frontend = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        compiled = ncc.torch.compile(task.model, example, pipeline=pipeline, calib=calib, check=False)
        ours.append(time.perf_counter() - start)
        _, seconds = bt._pt2e(task.model, example, calib, dynamic)
        theirs.append(seconds)
        start = time.perf_counter()
        route = lower(task.model, example, dynamic_batch=False).metadata_props[ROUTE]
        frontend.append(time.perf_counter() - start)
    passes = {}
    for record in compiled.report.records:
        name = record.spec.split("{")[0]
        passes[name] = passes.get(name, 0.0) + record.seconds
    heavy = ", ".join(f"{n} {s:.2f}" for n, s in sorted(passes.items(), key=lambda p: -p[1]) if s >= 0.1)
    ncc_s, pt2e_s = statistics.median(ours), statistics.median(theirs)
    return [
        f"| {task.name} | {pipeline} | {ncc_s:.2f} | {pt2e_s:.2f} | {ncc_s / pt2e_s:.2f} | "
        f"{statistics.median(frontend):.2f} ({route}) | {heavy} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each quantizer (median reported)")
    parser.add_argument(
        "--models", default="efficientnet,minilm", help="comma-separated: " + ",".join(bt.TASKS)
    )
    args = parser.parse_args()
    from bench_int8 import machine_facts

    lines = []
    for key in args.models.split(","):
        task = bt.TASKS[key]()
        for pipeline in task.pipelines:
            lines += measure(task, args.runs, pipeline)
    facts = machine_facts()
    import torch

    print("# The quantize step: ncc.torch.compile (without Inductor's compile) vs PT2E, batch 8\n")
    print(f"command: python benchmarks/bench_torch_quantize.py --runs {args.runs} --models {args.models}")
    print(
        f"machine: {facts['cpu']}, {facts['cores']} cores; avx2={facts['avx2']} avx512_vnni={facts['avx512_vnni']} "
        f"amx={facts['amx']}; torch {torch.__version__}"
    )
    print(
        "\n| model | pipeline | ncc s (median) | PT2E s (median) | ncc / PT2E | ncc frontend s (route) | "
        "ncc passes over 0.1 s |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
