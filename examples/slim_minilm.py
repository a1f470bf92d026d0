"""One-shot head + FFN slimming of all-MiniLM-L6-v2 with ncc, then distillation recovery in PyTorch.

    python examples/slim_minilm.py --minutes 27 --out /tmp/slim-minilm

1. ``ncc compile MODEL --pass sparse --pattern neuron,head --sparsity 0.5,0.3333 --calib CALIB``: half of
   every FFN's neurons and 4 of 12 heads per layer removed, the reading layers refitted on 4,096 tweets
   (none a test tweet; the ONNX is smaller and faster; see benchmarks/bench_sparsity.py).
2. The slimmed, refitted weights go back into the PyTorch model (each ``nn.Linear`` replaced by one with the
   IR's MatMul weight and bias: the attention reshapes to ``-1`` heads, so nothing else changes).
3. Knowledge distillation from the dense model on 27,000 tweets (none a test tweet): 1 - cosine of the
   pooled sentence embeddings, plus the MSE of every layer's token states (``ncc.torch.train.distill_loss``
   and ``LayerMatch``), for ``--minutes``; more text than steps, so the student does not learn the
   training tweets instead of the teacher.
4. ``ncc.torch.train.finalize`` hands the student back to the IR and writes ONNX; it is scored like the
   others: embedding cosine to FP32 and the tweet-sentiment accuracy of the FP32 head on 1,000 test tweets.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import int8_models  # noqa: E402
import realmodels  # noqa: E402


def score(path: Path, s) -> tuple[float, float]:
    emb = int8_models.embed(path, s.test)
    ref = s.ref_test
    cos = float(np.mean(np.sum(emb * ref, 1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)))
    return cos, float(s.head.score(emb, s.y_test))


def load_slimmed(teacher, onnx_path: Path):
    """A copy of ``teacher`` whose Linear layers carry the slimmed ONNX model's MatMul weights and biases."""
    import torch
    from ncc.ir.rewrite import bias_add, constant_array
    from ncc.tools.modelio import load_model

    model = load_model(onnx_path)
    nodes = {n.name: n for n in model.graph if n.op_type == "MatMul"}
    student = copy.deepcopy(teacher)
    replaced = 0
    for name, module in list(student.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        node = nodes.get(_scope(name) + "/MatMul")
        if node is None:
            continue
        weight = constant_array(node.inputs[1])
        found = bias_add(node.outputs[0], weight.shape[1])
        linear = torch.nn.Linear(weight.shape[0], weight.shape[1], bias=found is not None)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight.T)))
            if found is not None:
                linear.bias.copy_(torch.from_numpy(constant_array(found[1])))
        parent = student.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[1], linear)
        replaced += 1
    return student, replaced


def _scope(name: str) -> str:
    """The torch exporter's node scope of a module: ``bert.encoder.layer.0.output.dense`` ->
    ``/bert/encoder/layer.0/output/dense`` (a list index stays attached to its list)."""
    parts: list[str] = []
    for part in name.split("."):
        if part.isdigit() and parts:
            parts[-1] += "." + part
        else:
            parts.append(part)
    return "/" + "/".join(parts)


def pooled(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def length_grouped(lengths: np.ndarray, batch: int, seed: int, window: int = 64) -> list[np.ndarray]:
    """One epoch of batches (whole ones) of similar lengths: the samples shuffled, sorted by length within
    windows of ``window`` batches, cut into batches, the batches shuffled. Each batch is cut to its longest
    sample, so this pads (and computes) far less than random batches; each window is still random."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    order = order[: len(order) - len(order) % batch]
    out = []
    for at in range(0, len(order), batch * window):
        part = order[at : at + batch * window]
        part = part[np.argsort(lengths[part], kind="stable")]
        out += [part[i : i + batch] for i in range(0, len(part), batch)]
    return [out[i] for i in rng.permutation(len(out))]


def distill(
    student,
    teacher,
    text: dict,
    minutes: float,
    batch: int = 32,
    lr: float = 3e-4,
    layer_weight: float = 1.0,
):
    """Distill ``teacher`` into ``student`` on ``text`` for ``minutes`` of wall time: 1 - cosine of the pooled
    embeddings, the MSE of the last token states and, times ``layer_weight``, of every earlier layer's
    (``ncc.torch.train.LayerMatch``), padding left out. AdamW, a 50-step warm-up and a linear decay to 0
    at the time limit; batches hold tweets of similar lengths (:func:`length_grouped`) and each is cut to
    its longest tweet (the attention mask hides the rest). The
    word embeddings (half the parameters, not pruned) stay frozen: steps are ~20% faster."""
    import torch
    from ncc.torch import train as nt

    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # tiny gradients as subnormal floats slow every op on x86
    layers = [
        f"bert.encoder.layer.{i}" for i in range(len(teacher.bert.encoder.layer) - 1)
    ]  # the last: above
    match = nt.LayerMatch(student, teacher, {n: n for n in layers}) if layer_weight > 0 else None
    student.train()
    student.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    trained = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    names = ("input_ids", "attention_mask", "token_type_ids")
    data = {k: torch.from_numpy(np.ascontiguousarray(text[k])) for k in names}
    lengths = data["attention_mask"].sum(1).numpy()
    start, step, losses, epoch, queue = time.monotonic(), 0, [], 0, []
    budget = minutes * 60
    while (elapsed := time.monotonic() - start) < budget:
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * max(0.0, 1 - elapsed / budget)
        if not queue:
            queue = length_grouped(lengths, batch, epoch)
            epoch += 1
        idx = queue.pop()
        longest = int(data["attention_mask"][idx].sum(1).max())
        args = [data[k][idx, :longest] for k in names]
        with torch.no_grad():
            want = teacher(*args)
        got = student(*args)
        mask = args[1]
        loss = nt.distill_loss(pooled(got, mask), pooled(want, mask), "cosine")
        loss = loss + nt.distill_loss(got, want, "mse", mask=mask)
        if match is not None:
            loss = loss + layer_weight * match.loss(mask=mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 100 == 0:
            print(f"step {step}: loss {np.mean(losses[-100:]):.4f}, {elapsed:.0f} s", flush=True)
    if match is not None:
        match.remove()
    student.eval()
    return step, float(np.mean(losses[-20:])) if losses else float("nan")


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=27.0, help="distillation wall time")
    parser.add_argument("--calib", type=int, default=4096, help="tweets the one-shot refit is solved on")
    parser.add_argument("--text", type=int, default=27000, help="tweets the distillation reads")
    parser.add_argument("--layer-weight", type=float, default=1.0, help="weight of the per-layer MSE")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--slim", type=Path, default=None, help="a one-shot slimmed model to start from (skips step 1)"
    )
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="slim-minilm-"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    s = int8_models.minilm_sentiment()
    dense_onnx = realmodels.minilm_onnx("legacy")
    slim = args.slim or out / "slim.onnx"
    if args.slim is None:
        calib = out / f"calib-{args.calib}x64.npz"
        np.savez(calib, **int8_models.minilm_text(args.calib))
        cmd = [sys.executable, "-m", "ncc.tools.cli", "compile", str(dense_onnx), "--pass", "sparse"]
        cmd += ["--pattern", "neuron,head", "--sparsity", "0.5,0.3333"]
        cmd += ["--calib", str(calib), "--calib-samples", str(args.calib)]
        subprocess.run([*cmd, "-o", str(slim)], check=True)

    teacher = realmodels._minilm_module()
    student, replaced = load_slimmed(teacher, slim)
    example = tuple(
        torch.from_numpy(s.test[k][:2]) for k in ("input_ids", "attention_mask", "token_type_ids")
    )
    with torch.no_grad():
        check = np.abs(
            student(*example).numpy()
            - int8_models.session(slim, 2).run(None, {k: v[:2] for k, v in s.test.items()})[0]
        ).max()
    print(f"{replaced} Linear layers loaded from {slim.name}; torch vs ONNX max abs difference {check:.2e}")

    text = int8_models.minilm_text(args.text)
    steps, loss = distill(student, teacher.eval(), text, args.minutes, layer_weight=args.layer_weight)
    from ncc.torch import train as nt

    recovered = out / "recovered.onnx"
    nt.finalize(student, example, recovered)

    rows = [
        ("dense FP32", dense_onnx),
        ("one-shot slim + refit", slim),
        (f"after KD ({steps} steps, {args.minutes:g} min)", recovered),
    ]
    print(f"\nall-MiniLM-L6-v2, FFN 50% + 4/12 heads; final KD loss {loss:.4f}; artefacts in {out}")
    print("| model | embedding cosine | sentiment accuracy |")
    print("|---|---|---|")
    for name, path in rows:
        cos, acc = score(path, s)
        print(f"| {name} | {cos:.4f} | {acc:.3f} |")


if __name__ == "__main__":
    main()
