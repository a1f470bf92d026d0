"""Where the time goes: onnxruntime's own per-op-type kernel time for several models, side by side.

    python benchmarks/op_profile.py FLOAT.onnx INT8.onnx [MORE.onnx ...] --data calib.npz [--batch 8] [--runs 20]

Each model runs in onnxruntime (CPU EP, ORT_ENABLE_ALL, 2 intra-op threads) with profiling on, on the
first ``--batch`` samples of ``--data`` (arrays keyed by input name); after 5 warm-up runs, ``--runs``
runs are profiled. The table gives milliseconds per run summed over the nodes of each op type as
onnxruntime ran them (after its fusions), so it shows which kernels an INT8 model spends its time in and
what a speed-up is bounded by: an INT8 model cannot beat FP32 by more than FP32's GEMM time divided by
its integer GEMM time, plus what the rest costs. ``--group LABEL=REGEX`` splits an op type by node name
(depthwise against pointwise convolutions, say).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np


def profile(
    path: Path,
    feeds: dict[str, np.ndarray],
    runs: int,
    threads: int = 2,
    groups: list[tuple[str, re.Pattern]] = (),
) -> dict[str, float]:
    """Milliseconds per run by op type (onnxruntime's kernel time); a node whose name matches one of
    ``groups`` (label, pattern; the first match wins) counts under ``label @ op type`` instead."""
    from ncc.runtime import open_session, session_options

    options = session_options(threads=threads, sequential=True)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="ncc-op-profile-") as tmp:
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = open_session(path, options=options).ort
        inputs = {i.name: feeds[i.name] for i in session.get_inputs()}
        warmup = 5
        for _ in range(warmup + runs):
            session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: collections.Counter = collections.Counter()
    seen: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"][: -len("_kernel_time")]
            seen[node] += 1
            if seen[node] > warmup:  # the profiled runs only
                op = event["args"]["op_name"]
                label = next((label for label, pattern in groups if pattern.search(node)), None)
                totals[f"{label} @ {op}" if label else op] += event["dur"]
    return {op: us / runs / 1000 for op, us in totals.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True, help=".npz with arrays keyed by input name")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--top", type=int, default=12, help="op types shown (the rest summed)")
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="LABEL=REGEX",
        help="count nodes whose name (as onnxruntime ran them) matches REGEX as 'LABEL @ op type'; "
        "repeatable, the first match wins",
    )
    args = parser.parse_args(argv)
    groups = []
    for spec in args.group:
        label, sep, pattern = spec.partition("=")
        if not sep or not label:
            parser.error(f"--group takes LABEL=REGEX, got {spec!r}")
        try:
            groups.append((label, re.compile(pattern)))
        except re.error as err:
            parser.error(f"--group {spec!r}: {err}")
    with np.load(args.data) as npz:
        feeds = {k: npz[k][: args.batch] for k in npz.files}
    tables = [profile(path, feeds, args.runs, groups=groups) for path in args.models]
    order = sorted({op for t in tables for op in t}, key=lambda op: -max(t.get(op, 0.0) for t in tables))
    shown, rest = order[: args.top], order[args.top :]
    names = [p.stem for p in args.models]
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"batch {args.batch}, {args.runs} profiled runs after 5 warm-up; ms per run by op type (onnxruntime kernel time)\n"
    )
    print("| op type | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for op in shown:
        print(f"| {op} | " + " | ".join(f"{t[op]:.2f}" if op in t else "" for t in tables) + " |")
    if rest:
        print("| (other) | " + " | ".join(f"{sum(t.get(op, 0.0) for op in rest):.2f}" for t in tables) + " |")
    print("| **total** | " + " | ".join(f"**{sum(t.values()):.2f}**" for t in tables) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
