"""Structured pruning + slim, one-shot: fidelity and onnxruntime speed against the dense model.

    python benchmarks/bench_sparsity.py                       # MiniLM and EfficientNet-Lite0 (~40 min on 2 AVX2 cores)
    python benchmarks/bench_sparsity.py --models efficientnet

Rows, each compiled with ``ncc compile`` in a subprocess (the command a user runs), timed side by side
in one block-timing run per model (``ncc.tools.timing``, 2 threads, median of rounds):

- all-MiniLM-L6-v2 at sequence length 128: FFN 50% (``neuron``), 4 of 12 heads (``head``), both, and
  both then ``int8``; calibration: 4,096 tweets (64 tokens; the 3,000 training tweets and 1,096 more, none
  a test tweet); metric: sentence-embedding cosine
  to FP32 and the tweet-sentiment accuracy of the FP32 logistic-regression head on 1,000 test tweets.
- EfficientNet-Lite0: 30% of each MBConv block's expanded channels (``channel``, stem / project /
  head convs excluded; kept counts rounded to multiples of 16) on 256 calibration crops; metric: top-1
  agreement with FP32 on the 2,400 eval crops.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import int8_models  # noqa: E402
from ncc.tools.timing import time_blocks  # noqa: E402

OUT = int8_models.CACHE / "sparsity"
#: MiniLM's pruning calibration: the refit of a 1,536-wide FFN reader generalizes with more text (one-shot
#: FFN 50% + 4/12 heads: cosine 0.920 with 512 tweets, 0.932 with 2,048, 0.935 with 4,096)
N_CALIB_MINILM = 4096


def compile_(src: Path, out: Path, *args) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", "compile", str(src), *map(str, args), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return time.perf_counter() - start


def speed(paths: list[Path], feeds: list[dict]) -> list[list[float]]:
    """Per feed: each model's speed-up over the first, median over rounds."""
    sessions = [int8_models.session(p, 2) for p in paths]
    out = []
    for feed in feeds:
        timing = time_blocks(sessions, feed, runs=20, rounds=7)
        out.append([timing.ratio(i, 0)["median"] for i in range(len(paths))])
    return out


def minilm(rows: list) -> None:
    s = int8_models.minilm_sentiment()
    src = int8_models.realmodels.minilm_onnx("legacy")
    calib = OUT / f"minilm-calib-{N_CALIB_MINILM}x64.npz"
    if not calib.exists():
        calib.parent.mkdir(parents=True, exist_ok=True)
        np.savez(calib, **int8_models.minilm_text(N_CALIB_MINILM))
    common = ("--pass", "sparse", "--calib", calib, "--calib-samples", str(N_CALIB_MINILM))
    variants = {
        "FFN 50%": ("--pattern", "neuron", "--sparsity", "0.5"),
        "4/12 heads": ("--pattern", "head", "--sparsity", "0.3333"),
        "FFN 50% + 4/12 heads": ("--pattern", "neuron,head", "--sparsity", "0.5,0.3333"),
    }
    paths, names, times = [src], ["dense FP32"], [0.0]
    for name, args in variants.items():
        out = OUT / f"minilm-{len(paths)}.onnx"
        times.append(compile_(src, out, *common, *args))
        paths.append(out)
        names.append(name)
    both = paths[-1]
    for base, label in ((src, "dense int8"), (both, "FFN 50% + 4/12 heads, int8")):
        out = OUT / f"minilm-{len(paths)}.onnx"
        times.append(compile_(base, out, "--pass", "int8", "--calib", s.calib))
        paths.append(out)
        names.append(label)
    seq = 128
    feeds = [{k: v[:b, :seq] for k, v in s.test.items()} for b in (1, 8)]
    ratios = speed(paths, feeds)
    for i, (name, path) in enumerate(zip(names, paths)):
        emb = int8_models.embed(path, s.test)
        cos = float(
            np.mean(
                np.sum(emb * s.ref_test, 1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(s.ref_test, axis=1)
            )
        )
        acc = float(s.head.score(emb, s.y_test))
        rows.append(
            (
                "all-MiniLM-L6-v2",
                name,
                ratios[0][i],
                ratios[1][i],
                f"cosine {cos:.4f}, acc {acc:.3f}",
                times[i],
            )
        )


def efficientnet(rows: list) -> None:
    task = int8_models.efficientnet_task()
    src = task.float_model
    out = OUT / "efficientnet-slim30.onnx"
    calib = int8_models._crops_file("calib", 256, int8_models.CROP_SEED_CALIB)
    spec = (
        "shape-inference,fold-constants,eliminate-identity,fuse-conv-bn,fuse-pad-conv,cse,dce,toposort,"
        "prune{pattern=channel sparsity=0.3 exclude=project_conv,conv_head,conv_stem samples=256},slim,dce"
    )
    t = compile_(src, out, "--passes", spec, "--calib", calib)
    images = np.load(task.calib)["image"]
    feeds = [{"image": images[:b]} for b in (1, 8)]
    ratios = speed([src, out], feeds)
    for i, (name, path, secs) in enumerate(((("dense FP32", src, 0.0)), ("30% expanded channels", out, t))):
        metric = task.evaluate(path)["metric"]
        rows.append(
            ("EfficientNet-Lite0", name, ratios[0][i], ratios[1][i], f"top-1 agreement {metric:.4f}", secs)
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="minilm,efficientnet")
    args = parser.parse_args()
    flags = [
        f for f in ("avx2", "avx512_vnni", "amx_int8", "amx_bf16") if f in Path("/proc/cpuinfo").read_text()
    ]
    rows: list = []
    if "minilm" in args.models:
        minilm(rows)
    if "efficientnet" in args.models:
        efficientnet(rows)
    print(f"CPU flags: {' '.join(flags)}; onnxruntime, 2 threads, speed vs dense FP32 (median of 7 rounds)\n")
    print("| model | variant | speed b1 | speed b8 | fidelity | compile s |")
    print("|---|---|---|---|---|---|")
    for model, name, b1, b8, fid, secs in rows:
        print(f"| {model} | {name} | {b1:.2f}x | {b8:.2f}x | {fid} | {secs:.0f} |")


if __name__ == "__main__":
    main()
