"""Bounded memory: compile a model with 4 GiB of float weights in external data under 1.5 GB of RSS.

    python benchmarks/bench_woq_memory.py           # build (once, cached), measure, clean up
    python benchmarks/bench_woq_memory.py --keep    # keep the outputs (in <cache>/bench/synthetic-4g/out)

The model is built once under ``<cache>/bench/synthetic-4g/`` ($NCC_CACHE or
<repo>/.cache): x[batch, 4096] → 8 blocks of ``h + MatMul(Relu(MatMul(h, up_i) + b_i), down_i)``
with up_i [4096, 16384] and down_i [16384, 4096] float32 (256 MiB each, 4 GiB in all) in
one external data file. Weights are drawn per layer from ``numpy.random.default_rng(seed)``
(scale 1/sqrt(K)) and appended 16 MiB at a time; the ModelProto's external-data entries are
written by hand, so building never holds more than one chunk.

Each job is a separate ``ncc compile`` process; its peak RSS is the kernel's account
(``wait4``'s ru_maxrss, which counts touched pages of memory-mapped files too), taken while
this process is still small (a child's ru_maxrss starts at its parent's size when it was
forked). The w4 output is checked for one seeded input against numpy on the float weights
(read layer by layer from the data file) and against numpy on those weights RTN-quantized by
an independent re-implementation of the documented arithmetic.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NCC_CACHE", REPO / ".cache")) / "bench" / "synthetic-4g"
MODEL = CACHE / "synth.onnx"
DATA = "synth.onnx.data"

HIDDEN, FFN, BLOCKS = 4096, 16384, 8
SEED = 20240
BUDGET_MIB = 1536
CHUNK_BYTES = 16 * 2**20


def layers() -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, seed) of every initializer, in file order."""
    out = []
    for b in range(BLOCKS):
        out.append((f"up{b}.weight", (HIDDEN, FFN), SEED + 3 * b))
        out.append((f"up{b}.bias", (FFN,), SEED + 3 * b + 1))
        out.append((f"down{b}.weight", (FFN, HIDDEN), SEED + 3 * b + 2))
    return out


def layout() -> list[tuple[str, tuple[int, ...], int, int, int]]:
    """(name, shape, seed, offset, length) of every initializer in the data file."""
    out, offset = [], 0
    for name, shape, seed in layers():
        length = 4
        for d in shape:
            length *= d
        out.append((name, shape, seed, offset, length))
        offset += length
    return out


def weight_bytes() -> int:
    return sum(length for *_, length in layout())


def write_values(f, shape: tuple[int, ...], seed: int) -> None:
    """Append one tensor's float32 values, a chunk of rows at a time."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if len(shape) == 1:  # a bias: small values
        f.write((rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)).tobytes())
        return
    k, n = shape
    scale = np.float32(1.0 / np.sqrt(k))
    rows = max(1, CHUNK_BYTES // (4 * n))
    for start in range(0, k, rows):
        block = rng.standard_normal((min(rows, k - start), n), dtype=np.float32)
        block *= scale
        f.write(block.tobytes())


def build() -> Path:
    """Write the synthetic model (once); the data file is written streaming, then renamed into place."""
    if MODEL.exists() and (CACHE / DATA).exists() and (CACHE / DATA).stat().st_size == weight_bytes():
        return MODEL
    import onnx
    from ncc.frontends.onnx import external_tensor
    from onnx import TensorProto, helper

    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / (DATA + ".partial")
    inits = []
    with open(partial, "wb") as f:
        for name, shape, seed, offset, length in layout():
            assert f.tell() == offset
            write_values(f, shape, seed)
            inits.append(external_tensor(name, TensorProto.FLOAT, shape, DATA, offset, length))
    nodes, prev = [], "x"
    for b in range(BLOCKS):
        nodes += [
            helper.make_node("MatMul", [prev, f"up{b}.weight"], [f"up{b}"], name=f"up{b}/MatMul"),
            helper.make_node("Add", [f"up{b}", f"up{b}.bias"], [f"up{b}.biased"], name=f"up{b}/Add"),
            helper.make_node("Relu", [f"up{b}.biased"], [f"act{b}"], name=f"act{b}/Relu"),
            helper.make_node("MatMul", [f"act{b}", f"down{b}.weight"], [f"down{b}"], name=f"down{b}/MatMul"),
            helper.make_node("Add", [prev, f"down{b}"], [f"h{b}"], name=f"residual{b}/Add"),
        ]
        prev = f"h{b}"
    graph = helper.make_graph(
        nodes,
        "synthetic_4g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HIDDEN])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["batch", HIDDEN])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_woq_memory"
    )
    onnx.save(model, CACHE / "synth.onnx.partial")
    os.replace(partial, CACHE / DATA)
    os.replace(CACHE / "synth.onnx.partial", MODEL)
    return MODEL


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stderr) of a child process, from the kernel's accounting."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        err.seek(0)
        text = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{text}")
    return wall, usage.ru_maxrss / 1024, text


def own_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def has_pass(name: str) -> bool:
    out = subprocess.run([sys.executable, "-m", "ncc.tools.cli", "passes"], capture_output=True, text=True)
    return any(line.split()[:1] == [name] for line in out.stdout.splitlines())


def files_mib(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths if p.exists()) / 2**20


def rtn_dequantized(w, group: int = 128, bits: int = 4):
    """``w [K, N]`` after asymmetric round-to-nearest in groups of ``group`` along K, per column (the
    arithmetic documented in passes/woq/kernels.py, re-done here independently), as float32."""
    import numpy as np

    k, n = w.shape
    qmax = np.float32(2**bits - 1)
    out = np.empty((k, n), np.float32)
    cols = max(1, (1 << 22) // k)
    for c0 in range(0, n, cols):
        wt = np.ascontiguousarray(w[:, c0 : c0 + cols].T, dtype=np.float32).reshape(-1, k // group, group)
        lo = np.minimum(wt.min(axis=-1, keepdims=True), 0)
        hi = np.maximum(wt.max(axis=-1, keepdims=True), 0)
        scale = (hi - lo) / qmax
        scale[scale == 0] = 1
        zero = np.clip(np.round(-lo / scale), 0, qmax)
        q = np.clip(np.round(wt / scale) + zero, 0, qmax)
        out[:, c0 : c0 + cols] = ((q - zero) * scale).reshape(-1, k).T
    return out


def check_w4(model_path: Path, batch: int = 2) -> tuple[float, float, float]:
    """Relative L2 errors for one seeded input: (onnxruntime on the w4 model vs numpy on the float weights,
    numpy with RTN-dequantized weights vs numpy float, onnxruntime vs numpy RTN). Float weights are read
    one layer at a time from the data file."""
    import numpy as np

    x = np.random.default_rng(7).standard_normal((batch, HIDDEN), dtype=np.float32)
    where = {name: (shape, offset) for name, shape, _seed, offset, _length in layout()}

    def read(name):
        shape, offset = where[name]
        mm = np.memmap(CACHE / DATA, dtype="<f4", mode="r", offset=offset, shape=shape)
        try:
            return np.array(mm)
        finally:
            del mm

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    h_float = x.astype(np.float64)
    h_rtn = h_float.copy()
    for b in range(BLOCKS):
        bias = read(f"up{b}.bias").astype(np.float64)
        up = read(f"up{b}.weight")
        u_float = np.maximum(h_float @ up + bias, 0.0)
        u_rtn = np.maximum(h_rtn @ rtn_dequantized(up) + bias, 0.0)
        del up
        down = read(f"down{b}.weight")
        h_float = h_float + u_float @ down
        h_rtn = h_rtn + u_rtn @ rtn_dequantized(down)
        del down
    from ncc.runtime import run

    (got,) = run(model_path, {"x": x})
    got = got.astype(np.float64)
    return rel(got, h_float), rel(h_rtn, h_float), rel(got, h_rtn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--keep", action="store_true", help="keep the compiled outputs in <cache>/bench/synthetic-4g/out"
    )
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build()
        return
    # Build in a child so this process stays small: a child's ru_maxrss starts at its parent's size.
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--build-only"], check=True)
    build_s = time.perf_counter() - t0
    gib_in = weight_bytes() / 2**30

    ncc = [sys.executable, "-m", "ncc.tools.cli"]
    w4 = has_pass("woq-rtn")
    if args.keep:
        outdir = CACHE / "out"
        shutil.rmtree(outdir, ignore_errors=True)
        outdir.mkdir(parents=True)
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="out-", dir=CACHE)
        outdir = Path(cleanup.name)
    parent_rss = own_rss_mib()
    w4_flags = ["--pass", "w4", "--group-size", "128"]
    jobs = [("load + save (dce), external data", "out.onnx", ["--passes", "dce"], True)]
    if w4:
        jobs.append(("RTN int4 (w4, group 128), external data", "out.w4.onnx", w4_flags, True))
        jobs.append(("RTN int4 (w4, group 128), one .onnx file", "out.w4.single.onnx", w4_flags, False))
    rows = []
    try:
        for label, out, flags, external in jobs:
            target = outdir / out
            cmd = [*ncc, "compile", str(MODEL), *flags, "--no-check", "-o", str(target)]
            wall, rss, _ = measure(cmd + (["--external-data", out + ".data"] if external else []))
            size = files_mib([target, outdir / (out + ".data")])
            rows.append(
                (
                    label,
                    f"{gib_in:.2f}",
                    f"{size:,.0f}",
                    f"{rss:,.0f}",
                    f"{wall:.1f}",
                    "pass" if rss < BUDGET_MIB else "FAIL",
                )
            )
        errors = check_w4(outdir / "out.w4.onnx") if w4 else None
    finally:
        if cleanup is not None:
            cleanup.cleanup()

    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"model: {MODEL} ({gib_in:.2f} GiB float32 weights in one external data file, "
        f"{2 * BLOCKS} MatMul weights of {HIDDEN}x{FFN}; built in {build_s:.1f} s, cached)"
    )
    print(
        f"peak RSS: wait4 ru_maxrss of the `ncc compile` process (this process was {parent_rss:.0f} MiB when it forked); "
        f"budget {BUDGET_MIB} MiB"
    )
    print()
    print("| job | weights in (GiB) | output (MiB) | peak RSS (MiB) | wall (s) | under 1.5 GB |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if not w4:
        print(f"| RTN int4 (w4, group 128) | {gib_in:.2f} | – | – | – | not available (no woq-rtn pass) |")
    print()
    if errors is None:
        print("w4 correctness: not available (no woq-rtn pass)")
        return
    vs_float, ref_vs_float, vs_ref = errors
    print("w4 correctness (out.w4.onnx), one seeded input (batch 2), relative L2 error of the output:")
    print(f"- onnxruntime on out.w4.onnx vs numpy on the float weights: {vs_float:.4f}")
    print(
        f"- numpy with the float weights RTN-quantized here (int4, group 128, asym) vs numpy float: {ref_vs_float:.4f} "
        "(the int4 level of this 16-layer model)"
    )
    ok = vs_ref < 1e-3 and abs(vs_float - ref_vs_float) < 0.1 * ref_vs_float
    print(
        f"- onnxruntime vs that numpy RTN reference: {vs_ref:.2e} ({'matches' if ok else 'MISMATCH'}; bar < 1e-3)"
    )


if __name__ == "__main__":
    main()
