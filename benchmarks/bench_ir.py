"""IR core speed and memory: load → verify → print → parse → save, and streaming dumps.

    python benchmarks/bench_ir.py            # full table (MiniLM, 10k and 100k node chains, 1 GB dump)
    python benchmarks/bench_ir.py --quick    # skip the 100k chain and the 1 GB model

Each stage is timed separately; the number shown is the median of --repeat runs.
Peak RSS of the dumps is measured by the OS (wait4's ru_maxrss) on a separate
`ncc dump` process. Models are generated under .cache/bench (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NCC_CACHE", REPO / ".cache")) / "bench"
sys.path.insert(0, str(REPO / "tests"))


def chain_model(n_nodes: int) -> Path:
    """x → (Add c_i → Relu) × n/2: a deep graph with small constants, the worst case for per-node overhead."""
    path = CACHE / f"chain-{n_nodes}.onnx"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    nodes, inits, prev = [], [], "x"
    for i in range(n_nodes // 2):
        inits.append(numpy_helper.from_array(np.full((8,), i % 7 - 3, np.float32), f"c{i}"))
        nodes.append(helper.make_node("Add", [prev, f"c{i}"], [f"a{i}"], name=f"add{i}"))
        nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    vi = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, ["N", 8]) for n in nodes[:-1]]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 8])],
        inits,
        value_info=vi,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def big_external_model(gib: float = 1.0) -> Path:
    """MatMul chain whose float weights (``gib`` GiB) live in external data, written without holding them."""
    from ncc.frontends.onnx import external_tensor

    path = CACHE / "big-external" / "model.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    dim = 4096
    per = dim * dim * 4
    count = max(1, int(gib * 2**30) // per)
    inits, nodes, prev = [], [], "x"
    with open(path.parent / "model.onnx.data", "wb") as data:
        for i in range(count):
            rng = np.random.default_rng(i)
            for _row in range(0, dim, 512):  # 8 MB at a time
                data.write((rng.standard_normal((512, dim), dtype=np.float32) * 0.01).tobytes())
            inits.append(
                external_tensor(f"w{i}", TensorProto.FLOAT, [dim, dim], "model.onnx.data", i * per, per)
            )
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
            prev = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", dim])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _lap(start: float) -> float:
    return time.perf_counter() - start


def stage_times(path: Path, repeat: int) -> dict[str, float]:
    import ncc.runtime  # noqa: F401  (contrib ops checked against onnxruntime's schemas, as the CLI does)
    from ncc.backends.onnx import save_onnx
    from ncc.frontends.onnx import load_onnx
    from ncc.ir.parser import parse
    from ncc.ir.printer import print_model
    from ncc.ir.verifier import verify

    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeat):
            t: dict[str, float] = {}
            start = time.perf_counter()
            model = load_onnx(path)
            t["load"] = _lap(start)
            start = time.perf_counter()
            verify(model)
            t["verify"] = _lap(start)
            start = time.perf_counter()
            print_model(model)
            t["print"] = _lap(start)
            data = Path(tmp) / "m.ncc.data"
            start = time.perf_counter()
            text = print_model(model, full=True, data_file=data)
            t["print --full"] = _lap(start)
            start = time.perf_counter()
            again = parse(text, base_dir=Path(tmp))
            t["parse"] = _lap(start)
            start = time.perf_counter()
            save_onnx(again, Path(tmp) / "o.onnx")
            t["save"] = _lap(start)
            t["total"] = sum(t.values())
            for k, v in t.items():
                runs.setdefault(k, []).append(v)
            del model, again, text
    return {k: statistics.median(v) for k, v in runs.items()}


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a child process, from the kernel's accounting."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def help_time(repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ncc.tools.cli", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    # Memory first, while this process is small: a forked child's peak RSS starts at its parent's.
    dumps = []
    if not args.quick:
        big = big_external_model(1.0)
        ncc = [sys.executable, "-m", "ncc.tools.cli"]
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            for label, extra in (
                ("ncc dump (hash summaries)", []),
                ("ncc dump --full (sidecar)", ["--full"]),
            ):
                wall, rss = peak_rss_mb([*ncc, "dump", str(big), "-o", str(Path(tmp) / "big.ncc"), *extra])
                dumps.append(f"| {label} | {wall:.1f} s | {rss:.0f} MB |")
    import realmodels

    models = [
        ("all-MiniLM-L6-v2 (legacy export)", realmodels.minilm_onnx("legacy")),
        ("all-MiniLM-L6-v2 (dynamo, ext. data)", realmodels.minilm_onnx("dynamo")),
        ("chain 10k nodes", chain_model(10_000)),
    ]
    if not args.quick:
        models.append(("chain 100k nodes", chain_model(100_000)))
    stages = ["load", "verify", "print", "print --full", "parse", "save", "total"]
    print(f"| model | nodes | {' | '.join(stages)} |")
    print("|---|---:|" + "---:|" * len(stages))
    totals = {}
    for label, path in models:
        nodes = len(onnx.load(path, load_external_data=False).graph.node)
        t = stage_times(path, 1 if "100k" in label else args.repeat)
        totals[label] = t["total"]
        print(f"| {label} | {nodes:,} | " + " | ".join(f"{t[s]:.2f} s" for s in stages) + " |")
    if "chain 100k nodes" in totals:
        ratio = totals["chain 100k nodes"] / totals["chain 10k nodes"]
        print(f"\n100k / 10k total time: {ratio:.1f}x (linear is 10x; the bar is at most 12x)")
    print()
    print("| streaming dump of 1 GiB external weights | wall | peak RSS |")
    print("|---|---:|---:|")
    print("\n".join(dumps))
    print(f"\n`ncc --help` wall time: {help_time(5) * 1000:.0f} ms (median of 5)")


if __name__ == "__main__":
    main()
