"""The same ncc artefacts in two runtimes: onnxruntime and OpenVINO, FP32, BF16 and ncc's INT8 (issue 16).

    python benchmarks/bench_runtimes.py                      # MiniLM and EfficientNet-Lite0, batch 1 and 8
    python benchmarks/bench_runtimes.py --models minilm --quick
    python benchmarks/bench_runtimes.py --models smollm2      # weight-only INT4: decode tokens/s, perplexity

Per model (the ONNX table's files and data), one table: onnxruntime FP32 and ncc ``int8`` (QDQ, as
``ncc compile`` writes it), OpenVINO FP32 (``INFERENCE_PRECISION_HINT=f32``: on an AMX CPU OpenVINO
otherwise runs FP32 models in bf16), OpenVINO with the FP32 model and ``INFERENCE_PRECISION_HINT=bf16``,
OpenVINO with ncc's INT8 file, as written for onnxruntime (the host target) and as written for
``--target openvino`` (its non-quantized layers at OpenVINO's default precision), and ncc's ``bf16``
pipeline written as OpenVINO IR (``-o model.xml``: the bf16 hint is in the file, no option given),
and NNCF's ``nncf.quantize`` (OpenVINO's own post-training quantizer, the anchor for this runtime) on
the same FP32 model and calibration samples.
2 threads, latency hint, one stream; the sessions are timed side by side in blocks
(``ncc.tools.timing``) and speed-ups are paired against onnxruntime FP32. Quality is measured in each
runtime on held-out data against onnxruntime FP32's outputs: MiniLM's sentence-embedding cosine and
logistic-regression accuracy on the 1,000 test tweets, EfficientNet-Lite0's top-1 agreement on 480 photo
crops. "int8 layers" counts the convolutions and fully connected layers OpenVINO's compiled graph runs
in u8/i8 (its runtime model's ``runtimePrecision``), against all of them. Needs ``pip install openvino``.

``smollm2``: SmolLM2-135M's decode step and perplexity with ncc's ``w4`` and NNCF's weight compression in
both runtimes (``benchmarks/runtimes_llm.py`` says how).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import int8_models as m  # noqa: E402

THREADS = 2
EVAL_CROPS = 480
COMPUTE_LAYERS = ("Convolution", "FullyConnected", "MatMul", "Deconvolution")


def open_in(runtime: str, path: Path, precision: str | None = None):
    """``path`` in ``runtime`` (:mod:`ncc.tools.runtimes`); ``precision`` forces OpenVINO's precision hint."""
    from ncc.tools.runtimes import open_runner

    return open_runner(runtime, path, THREADS, {"INFERENCE_PRECISION_HINT": precision} if precision else None)


def first(runner, feed) -> np.ndarray:
    return next(iter(runner.outputs(feed).values()))


def int8_layers(runner) -> tuple[int, int]:
    """(compute layers running in u8/i8, compute layers) in OpenVINO's compiled graph."""
    counts = runner.layer_precisions(COMPUTE_LAYERS)
    return counts["u8"] + counts["i8"], sum(counts.values())


def _minilm():
    sentiment = m.minilm_sentiment()
    test = sentiment.test

    def quality(runner) -> dict:
        out = []
        for i in range(0, len(test["input_ids"]), 32):
            chunk = {k: v[i : i + 32] for k, v in test.items()}
            out.append(m.pooled(first(runner, chunk), chunk["attention_mask"]))
        emb = np.concatenate(out)
        cosine = float(np.mean(m.sample_cosines(sentiment.ref_test, emb)))
        return {"quality": cosine, "accuracy": float(sentiment.head.score(emb, sentiment.y_test))}

    task = m.minilm_task()
    return task, quality, "embedding cosine (1,000 test tweets)"


def _efficientnet():
    task = m.efficientnet_task()
    crops = np.load(m._crops_file("eval", m.N_CROPS_EVAL, m.CROP_SEED_EVAL))["image"][:EVAL_CROPS]
    reference = {}

    def quality(runner) -> dict:
        logits = np.concatenate(
            [first(runner, {"image": crops[i : i + 16]}) for i in range(0, len(crops), 16)]
        )
        if "ref" not in reference:
            reference["ref"] = logits  # the first runner is onnxruntime FP32
        return {"quality": float(np.mean(logits.argmax(1) == reference["ref"].argmax(1)))}

    return task, quality, f"top-1 agreement ({EVAL_CROPS} crops)"


TASKS = {"minilm": _minilm, "efficientnet": _efficientnet}


def nncf_quantize(task, out: Path, transformer: bool) -> float:
    """NNCF's post-training quantization of the FP32 model for OpenVINO (``nncf.quantize`` on the OpenVINO
    model read from the same ONNX file, the same calibration samples, ``ModelType.TRANSFORMER`` for the
    transformer as NNCF's guide says), saved as OpenVINO IR; returns its wall time."""
    import time

    import nncf
    import openvino as ov

    start = time.perf_counter()
    model = ov.Core().read_model(str(task.float_model))
    calib = np.load(task.calib)
    names = [i.get_any_name() for i in model.inputs]
    count = len(calib[names[0]])
    items = [{k: calib[k][i : i + 1] for k in names} for i in range(count)]
    extra = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars, out of the table
        quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=count, **extra)
    ov.save_model(quantized, str(out))
    return time.perf_counter() - start


def run_task(key: str, quick: bool, workdir: Path) -> list[str]:
    from bench_int8 import speed_cells
    from ncc.tools.timing import time_blocks

    task, quality, quality_name = TASKS[key]()
    int8, ov_int8 = workdir / f"{key}.int8.onnx", workdir / f"{key}.openvino.int8.onnx"
    m.ncc_compile(task.float_model, task.calib, int8)
    m.ncc_compile(task.float_model, task.calib, ov_int8, extra=("--target", "openvino"))
    bf16 = workdir / f"{key}.bf16.xml"
    m.ncc_compile(task.float_model, task.calib, bf16, pipeline="bf16")
    ncc_seconds, _ = m.ncc_compile(
        task.float_model, task.calib, workdir / f"{key}.ov.xml", extra=("--target", "openvino")
    )
    nncf_int8 = workdir / f"{key}.nncf.int8.xml"
    nncf_seconds = nncf_quantize(task, nncf_int8, transformer=key == "minilm")
    from ncc.passes.quant.bf16_precision import host_has_bf16

    # without bf16 hardware OpenVINO emulates a forced bf16 hint at 0.03-0.04x onnxruntime FP32 (MiniLM,
    # RESULTS.md), and scoring it on 1,000 tweets takes ten minutes: that row runs only where bf16 is native
    forced_bf16 = [
        ("OpenVINO, FP32 model, precision hint bf16", lambda: open_in("openvino", task.float_model, "bf16"))
    ]
    rows = [
        ("onnxruntime FP32", lambda: open_in("onnxruntime", task.float_model)),
        ("onnxruntime, ncc int8 (QDQ)", lambda: open_in("onnxruntime", int8)),
        ("OpenVINO FP32 (precision hint f32)", lambda: open_in("openvino", task.float_model, "f32")),
        *(forced_bf16 if host_has_bf16() else []),
        ("OpenVINO, ncc int8 (QDQ) as is", lambda: open_in("openvino", int8)),
        ("OpenVINO, ncc int8 --target openvino", lambda: open_in("openvino", ov_int8)),
        ("OpenVINO, ncc bf16 (.xml, its own hint)", lambda: open_in("openvino", bf16)),
        (
            "OpenVINO, NNCF int8 (nncf.quantize, same calibration data)",
            lambda: open_in("openvino", nncf_int8),
        ),
    ]
    runners = [(name, make()) for name, make in rows]
    scores = {name: quality(runner) for name, runner in runners}
    speed = {}
    for batch in (1, 8):
        feed = task.timing_feed(batch)
        timing = time_blocks(
            [r for _, r in runners], feed, runs=20 if quick else 40, rounds=5 if quick else 9
        )
        for i, (name, _) in enumerate(runners):
            speed[(name, batch)] = (batch / timing.median(i), timing.ratio(i, 0))
        print(f"[{task.name} b{batch}] timed", file=sys.stderr)
    accuracy = "accuracy" in next(iter(scores.values()))
    head = f"| {task.name} | {quality_name} |{' LR accuracy |' if accuracy else ''} int8 layers (OpenVINO) |"
    head += " b1 samples/s | b1 speed-up | b8 samples/s | b8 speed-up |"
    lines = ["", head, "|" + "---|" * (head.count("|") - 1)]
    for name, runner in runners:
        s = scores[name]
        layers = "/".join(map(str, int8_layers(runner))) if runner.runtime == "openvino" else ""
        shown = f" {s['accuracy']:.3f} |" if accuracy else ""
        line = f"| {name} | {s['quality']:.4f} |{shown} {layers} |"
        for batch in (1, 8):
            line += speed_cells(*speed[(name, batch)])
        lines.append(line)
    if not host_has_bf16():
        lines.append(
            "\nno 'precision hint bf16' row: this CPU has no AVX512-BF16 or AMX-BF16, so OpenVINO would emulate it "
            "(ncc's bf16 .xml runs in f32 here: OpenVINO drops a file's bf16 hint the CPU cannot honour)"
        )
    lines.append(
        f"\nquantize wall time (fresh process, empty cache): ncc --target openvino -o .xml {ncc_seconds:.1f} s; "
        f"NNCF (in process, read + quantize + save) {nncf_seconds:.1f} s"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 timing rounds instead of 9")
    parser.add_argument(
        "--models", default="minilm,efficientnet", help="comma-separated: " + ",".join([*TASKS, "smollm2"])
    )
    args = parser.parse_args()
    import openvino as ov
    from bench_int8 import machine_line

    lines = []
    with tempfile.TemporaryDirectory(prefix="ncc-runtimes-") as tmp:
        for key in args.models.split(","):
            if key == "smollm2":
                import runtimes_llm

                lines += runtimes_llm.run(args.quick, Path(tmp))
            else:
                lines += run_task(key, args.quick, Path(tmp))
    import onnxruntime

    print("# One artefact, two runtimes: onnxruntime and OpenVINO (FP32, BF16, ncc INT8, ncc W4)\n")
    print(
        f"command: python benchmarks/bench_runtimes.py{' --quick' if args.quick else ''} --models {args.models}"
    )
    versions = (
        f"onnxruntime {onnxruntime.__version__}, OpenVINO {ov.__version__.split('-')[0]}, {THREADS} threads"
    )
    print(machine_line(versions))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
