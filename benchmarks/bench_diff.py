"""Does ``ncc diff`` name the nodes worth keeping in float? Its top 5 against 5 random nodes, on MiniLM.

    python benchmarks/bench_diff.py                  # all-MiniLM-L6-v2, 5 random draws
    python benchmarks/bench_diff.py --draws 10 --count 3

all-MiniLM-L6-v2 (the ONNX table's model, calibration tweets and 1,000 test tweets) through ``int8``
with the fallback off (``--min-cosine 0``: every MatMul quantized). ``ncc diff`` on 8 calibration
samples ranks the quantized nodes by how much the model's output gains with each alone in float; the
``--count`` compute nodes (MatMul / Gemm / Conv) it ranks first are then kept in float together
(``--exclude``), and so are, for comparison, ``--count`` compute nodes drawn at random (``--draws``
seeded draws), and the worst by the two local columns (error added alone at the node, error its
output carries). Each
model is scored on the test tweets: sentence-embedding cosine with FP32 and the logistic-regression
head's accuracy.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import int8_models as m  # noqa: E402

COMPUTE = ("MatMul", "Gemm", "Conv")


def compile_int8(task, out: Path, cache: Path, exclude: list[str]) -> None:
    """``int8`` without the fallback, keeping ``exclude`` (node names) in float."""
    options = ["--min-cosine", "0"] + [
        arg for name in exclude for arg in ("--exclude", f"^{re.escape(name)}$")
    ]
    m.ncc_compile(task.float_model, task.calib, out, extra=tuple(options), cache=cache)


def _worst(sqnr: float | None) -> tuple[bool, float]:
    return (sqnr is None, 0.0 if sqnr is None else sqnr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5, help="nodes kept in float per configuration")
    parser.add_argument("--draws", type=int, default=5, help="random draws to compare with")
    parser.add_argument("--samples", type=int, default=8, help="samples ncc diff compares on")
    args = parser.parse_args()
    from bench_int8 import machine_facts
    from ncc.passes.quant.calib_data import load_calibration_data
    from ncc.passes.quant.fallback import samples
    from ncc.tools.diff import diff
    from ncc.tools.modelio import load_model

    task = m.minilm_task()
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp, cache = Path(tmp), Path(tmp) / "cache"
        base = tmp / "base.onnx"
        compile_int8(task, base, cache, [])
        start = time.perf_counter()
        rows = diff(
            load_model(task.float_model),
            load_model(base),
            samples(load_calibration_data(str(task.calib)), args.samples),
        ).rows
        diff_seconds = time.perf_counter() - start
        compute = [r for r in rows if r.op_type in COMPUTE]
        by_gain = [r.node for r in compute][: args.count]  # diff's own order: fallback gain
        # rows diff could not compare (a value a pass rescaled, no isolated copy) rank last
        by_added = [r.node for r in sorted(compute, key=lambda r: _worst(r.added_sqnr_db))][: args.count]
        by_carried = [r.node for r in sorted(compute, key=lambda r: _worst(r.carried_sqnr_db))][: args.count]
        rng = np.random.default_rng(0)
        configs = [("all int8 (--min-cosine 0)", []), (f"top {args.count} by diff", by_gain)]
        configs.append((f"top {args.count} by local error added", by_added))
        configs.append((f"top {args.count} by error carried", by_carried))
        names = [r.node for r in compute]
        for draw in range(args.draws):
            pick = sorted(rng.choice(len(names), size=args.count, replace=False))
            configs.append((f"random {args.count} (draw {draw})", [names[i] for i in pick]))
        scores = {}
        for label, exclude in configs:
            out = tmp / "excluded.onnx"
            compile_int8(task, out, cache, exclude)
            scores[label] = task.evaluate(out)
            rows_out.append(
                f"| {label} | {scores[label]['cosine']:.5f} | {scores[label]['accuracy']:.3f} | "
                f"{', '.join(exclude) or '-'} |"
            )
            print(f"[{label}] cosine {scores[label]['cosine']:.5f}", file=sys.stderr)
    randoms = [s["cosine"] for k, s in scores.items() if k.startswith("random")]
    facts = machine_facts()
    print("# ncc diff: its worst nodes kept in float, against random ones (all-MiniLM-L6-v2 int8)\n")
    print(
        f"command: python benchmarks/bench_diff.py --count {args.count} --draws {args.draws} --samples {args.samples}"
    )
    print(
        f"machine: {facts['cpu']}, {facts['cores']} cores; avx2={facts['avx2']} avx512_vnni={facts['avx512_vnni']}"
    )
    print(f"ncc diff: {len(rows)} quantized nodes ({len(compute)} compute) in {diff_seconds:.1f} s\n")
    print(
        f"| configuration | embedding cosine (1,000 test tweets) | LR accuracy (FP32 {task.extra['fp32_accuracy']:.3f}) | kept in float |"
    )
    print("|---|---|---|---|")
    print("\n".join(rows_out))
    top = scores[f"top {args.count} by diff"]["cosine"]
    print(
        f"\ntop {args.count} by diff: cosine {top:.5f}; random draws: mean {np.mean(randoms):.5f}, "
        f"best {np.max(randoms):.5f}"
    )


if __name__ == "__main__":
    main()
