"""``ncc.torch.train``: exact pruning masks and their schedule, fake quantization on insert-qdq's grid,
distillation losses, and finalize handing both back to the IR (checked in onnxruntime and the CLI)."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from ncc.errors import NccError  # noqa: E402
from ncc.torch import train  # noqa: E402


class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3)
        self.conv2 = torch.nn.Conv2d(8, 16, 3)  # [16, 72]
        self.fc1 = torch.nn.Linear(16 * 2 * 2, 32)  # [32, 64]
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def cnn(seed: int = 0):
    torch.manual_seed(seed)
    return CNN().eval(), torch.rand(4, 1, 14, 14)


def ncc(*args):
    return subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", *map(str, args)], capture_output=True, text=True
    )


def blocks(mask, rows: int, cols: int):
    """``mask`` ([out, K]) as ``[out/rows, K/cols, rows*cols]`` blocks."""
    out, k = mask.shape
    return (
        mask.reshape(out // rows, rows, k // cols, cols)
        .permute(0, 2, 1, 3)
        .reshape(out // rows, k // cols, -1)
    )


def masks(model):
    return {
        name: layer.parametrizations.weight[0].mask.reshape(layer.weight.shape[0], -1)
        for name, layer in model.module.named_modules()
        if name in model.sparsity_report()
    }


# -- masks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pattern,rows,cols", [("4x1", 4, 1), ("2x1", 2, 1), ("2x4", 2, 4), ("unstructured", 1, 1)]
)
def test_block_masks_are_exact_and_reach_the_target(pattern, rows, cols):
    model, x = cnn()
    prepared = train.prepare(
        model, (x,), train.Plan(prune=train.Prune(pattern, 0.7, schedule="oneshot", exclude=("conv1", "fc2")))
    )
    for name, mask in masks(prepared).items():
        b = blocks(mask, rows, cols)
        assert bool(((b == 0).all(-1) | (b == 1).all(-1)).all()), name  # every block all-zero or all-kept
        achieved = prepared.sparsity_report()[name]["sparsity"]
        assert abs(achieved - 0.7) <= rows * cols / mask.numel() + 1e-9, (name, achieved)
        layer = dict(prepared.module.named_modules())[name]
        assert torch.equal(layer.weight.reshape(mask.shape) == 0, mask == 0)  # the weights the forward sees


def test_channel_masks_prune_whole_output_channels():
    model, x = cnn()
    prepared = train.prepare(model, (x,), train.Plan(prune=train.Prune("channel", 0.5, schedule="oneshot")))
    for name, mask in masks(prepared).items():
        rows = mask.sum(1)
        assert bool(((rows == 0) | (rows == mask.shape[1])).all()), name
        assert int((rows == 0).sum()) == round(0.5 * mask.shape[0]), name


def test_channel_masks_zero_biases_and_slim_removes_the_channels(tmp_path):
    model, x = cnn()
    plan = train.Plan(prune=train.Prune("channel", 0.5, schedule="oneshot", exclude=("fc2",)))
    prepared = train.prepare(model, (x,), plan)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):  # gradients would revive the biases of dead channels without step()
        optimizer.zero_grad()
        prepared(x).square().sum().backward()
        optimizer.step()
        prepared.step(optimizer)
    path = tmp_path / "channels.onnx"
    train.finalize(prepared, (x,), path)
    slim = tmp_path / "slim.onnx"
    proc = ncc("compile", path, "--passes", "slim,dce", "-o", slim)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("slim: channel group") + proc.stderr.count("slim: neuron group") == 3, (
        proc.stderr
    )
    sizes = sorted(numpy_size(slim).values())
    assert sum(sizes) < 0.5 * sum(numpy_size(path).values())
    with torch.no_grad():
        want = prepared(x).numpy()
    sess = ort.InferenceSession(str(slim), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def numpy_size(path) -> dict[str, int]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t).size for t in onnx.load(path).graph.initializer}


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("1:2", 1, 2)])
def test_n_m_masks_are_exact_at_the_end_of_the_schedule(pattern, n, m):
    model, x = cnn()
    prune = train.Prune(pattern, schedule="cubic", end_step=4, frequency=2, exclude=("conv1",))
    prepared = train.prepare(model, (x,), train.Plan(prune=prune))
    prepared.step()
    prepared.step()  # step 2: t = 0.5, the pattern on 7/8 of the groups
    for name, mask in masks(prepared).items():
        kept = mask.reshape(mask.shape[0], -1, m).sum(-1)
        assert set(kept.unique().tolist()) <= {n, m}
        assert abs(float((kept == n).float().mean()) - 0.875) < 0.01, name
    prepared.step()
    prepared.step()
    for name, mask in masks(prepared).items():
        assert bool((mask.reshape(mask.shape[0], -1, m).sum(-1) == n).all()), name
        layer = dict(prepared.module.named_modules())[name]
        nonzero = (layer.weight.reshape(mask.shape[0], -1, m) != 0).sum(-1)
        assert bool((nonzero == n).all()), name
        assert prepared.sparsity_report()[name]["sparsity"] == 1 - n / m


def test_zero_sparsity_and_steps_before_start_change_nothing():
    model, x = cnn()
    want = model(x)
    zero = train.prepare(
        copy.deepcopy(model),
        (x,),
        train.Plan(prune=train.Prune("4x1", 0.0, schedule="oneshot", exclude=("fc2",))),
    )
    assert torch.equal(zero(x), want)
    later = train.prepare(
        copy.deepcopy(model),
        (x,),
        train.Plan(prune=train.Prune("4x1", 0.8, start_step=10, end_step=20, frequency=1, exclude=("fc2",))),
    )
    for _ in range(10):
        later.step()
    assert torch.equal(later(x), want)
    later.step()
    assert not torch.equal(later(x), want)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_pruned_weights_stay_zero_under_momentum(optimizer):
    model, x = cnn()
    prepared = train.prepare(
        model,
        (x,),
        train.Plan(prune=train.Prune("4x1", 0.5, start_step=0, end_step=4, frequency=2, exclude=("fc2",))),
    )
    params = prepared.parameters()
    opt = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(params, lr=0.1)
    )
    target = torch.randint(0, 10, (4,))
    for _ in range(8):
        opt.zero_grad()
        F.cross_entropy(prepared(x), target).backward()
        opt.step()
        prepared.step(opt)
        for name, mask in masks(prepared).items():
            layer = dict(prepared.module.named_modules())[name]
            stored = layer.parametrizations.weight.original.reshape(mask.shape)
            assert bool((layer.weight.reshape(mask.shape)[mask == 0] == 0).all()), name
            assert bool((stored[mask == 0] == 0).all()), name
    assert all(abs(r["sparsity"] - 0.5) < 0.01 for r in prepared.sparsity_report().values())


@pytest.mark.parametrize("criterion,kept", [("snip-momentum", [1.0, 0.0]), ("magnitude", [0.0, 1.0])])
def test_snip_momentum_keeps_the_weight_with_the_large_gradient_product(criterion, kept):
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 1.0]]))
    x = torch.tensor([[10.0, 0.01]])  # d(sum out)/dw = x: |w * g| = [1.0, 0.01], |w| = [0.1, 1.0]
    prune = train.Prune(
        "unstructured", 0.5, criterion=criterion, schedule="linear", end_step=1, frequency=1, momentum=0.0
    )
    prepared = train.prepare(layer, (x,), train.Plan(prune=prune))
    prepared(x).sum().backward()
    prepared.step()
    assert layer.parametrizations.weight[0].mask.flatten().tolist() == kept


def test_cubic_and_linear_schedules():
    cubic = train.Prune("4x1", 0.8, schedule="cubic", start_step=100, end_step=300, frequency=50)
    assert [cubic.target_at(s) for s in (0, 100)] == [0.0, 0.0]
    assert cubic.target_at(200) == pytest.approx(0.8 * (1 - 0.5**3))
    assert cubic.target_at(300) == cubic.target_at(1000) == pytest.approx(0.8)
    assert [s for s in range(400) if cubic.updates_at(s)] == [150, 200, 250, 300]
    linear = train.Prune("4x1", 0.8, schedule="linear", end_step=100)
    assert linear.target_at(25) == pytest.approx(0.2)
    assert train.Prune("2:4", schedule="oneshot").target_at(0) == 0.5


# -- distillation ---------------------------------------------------------------------------------
def test_distill_losses_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    temp = 2.0

    def softmax(v):
        e = np.exp(v - v.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(s.numpy() / temp), softmax(t.numpy() / temp)
    kl = (q * np.log(q / p)).sum(-1).mean() * temp**2
    assert float(train.distill_loss(s, t, "kl", temperature=temp)) == pytest.approx(kl, rel=1e-6)
    assert float(train.distill_loss(s, t, "mse")) == pytest.approx(((s - t) ** 2).mean().item())
    sn, tn = s.numpy(), t.numpy()
    cos = (sn * tn).sum(-1) / np.linalg.norm(sn, axis=-1) / np.linalg.norm(tn, axis=-1)
    assert float(train.distill_loss(s, t, "cosine")) == pytest.approx((1 - cos).mean(), rel=1e-6)
    s.requires_grad_(True)
    t.requires_grad_(True)
    train.distill_loss(s, t, "kl", temperature=temp).backward()
    assert t.grad is None and s.grad is not None  # the teacher does not learn


def test_layer_match_records_outputs_with_hooks():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    with train.LayerMatch(student, teacher, {"0": "0", "2": "2"}, kind="mse") as match:
        student(x)
        teacher(x)
        want = (F.mse_loss(student[0](x), teacher[0](x)) + F.mse_loss(student(x), teacher(x))) / 2
        assert match.loss().item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(NccError, match="no layer named 'nope'"):
        train.LayerMatch(student, teacher, {"nope": "0"})


def test_a_mask_leaves_padded_positions_out_of_the_losses():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    real = mask.bool()
    assert float(train.distill_loss(s, t, "mse", mask=mask)) == pytest.approx(
        float(((s[real] - t[real]) ** 2).mean()), rel=1e-6
    )
    assert float(train.distill_loss(s, t, "kl", temperature=2.0, mask=mask)) == pytest.approx(
        float(train.distill_loss(s[real], t[real], "kl", temperature=2.0)), rel=1e-6
    )
    noisy_s, noisy_t = s.clone(), t.clone()
    noisy_s[0, 3:] += 100.0  # what padding holds changes nothing
    noisy_t[0, 3:] -= 50.0
    for kind in ("mse", "kl", "cosine"):
        assert float(train.distill_loss(noisy_s, noisy_t, kind, mask=mask)) == pytest.approx(
            float(train.distill_loss(s, t, kind, mask=mask)), rel=1e-6
        )
    layer = torch.nn.Linear(3, 3)
    with train.LayerMatch(layer, torch.nn.Linear(3, 3), {"": ""}) as match:
        layer(s)
        match.teacher[""] = t
        assert float(match.loss(mask=mask)) == pytest.approx(
            float(train.distill_loss(layer(s), t, "mse", mask=mask)), rel=1e-6
        )
    with pytest.raises(NccError, match=r"a mask of shape \(2, 4\) does not fit outputs of shape \(2, 5, 3\)"):
        train.distill_loss(s, t, "mse", mask=mask[:, :4])


# -- QAT ------------------------------------------------------------------------------------------
def test_fake_quant_is_quantize_dequantize_with_calibrated_scales():
    from ncc.passes.quant.observers import quant_params
    from ncc.passes.quant.pairs import symmetric_int8

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    calib = [torch.randn(32, 16) * 3 + 1 for _ in range(3)]
    prepared = train.prepare(
        layer, (calib[0],), train.Plan(quantize=train.Quantize(calib=[(c,) for c in calib]))
    )
    (lo, hi) = prepared.quant_ranges()[""]["input"]
    allx = torch.cat(calib)
    assert (lo, hi) == (float(allx.min()), float(allx.max()))
    scale, zp = quant_params(lo, hi)
    x = torch.randn(5, 16) * 4  # values beyond the range saturate
    xq = np.clip(np.rint(x.numpy() / scale) + zp, 0, 255)
    x_dq = ((xq - zp) * scale).astype(np.float32)
    codes, w_scales = symmetric_int8(layer.parametrizations.weight.original.detach().numpy(), 0)
    w_dq = codes.astype(np.float32) * w_scales[:, None]
    assert np.array_equal(layer.weight.detach().numpy(), w_dq)
    want = x_dq @ w_dq.T + layer.bias.detach().numpy()
    np.testing.assert_allclose(prepared(x).detach().numpy(), want, rtol=0, atol=1e-5)


def test_qat_finalize_carries_ranges_that_insert_qdq_uses(tmp_path):
    from ncc.passes.quant.observers import quant_params

    model, x = cnn()
    calib = [(torch.rand(8, 1, 14, 14),) for _ in range(2)]
    prepared = train.prepare(model, (x,), train.Plan(quantize=train.Quantize(calib=calib, learnable=True)))
    opt = torch.optim.Adam(prepared.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        prepared.train()
        F.cross_entropy(prepared(calib[0][0]), torch.arange(8)).backward()
        opt.step()
        prepared.step(opt)
    prepared.eval()
    path = tmp_path / "qat.onnx"
    model_ir = train.finalize(prepared, (x,), path)
    ranges = prepared.quant_ranges()
    meta = {p.key: p.value for p in onnx.load(path).graph.metadata_props}
    assert meta["ncc.calib"] == "method=qat levels=256 scheme=asym"
    inputs = {}  # layer -> the IR value it reads
    for node in model_ir.graph:
        if node.op_type in ("Conv", "Gemm"):
            layer = node.inputs[1].name.split(".")[0]
            inputs[layer] = node.inputs[0].name
    assert sorted(inputs) == sorted(ranges)
    for layer, value in inputs.items():
        lo, hi = (float(v) for v in meta[f"ncc.calib/{value}"].removeprefix("range=").split(","))
        assert (lo, hi) == pytest.approx(ranges[layer]["input"], rel=1e-6)
    out = tmp_path / "qat.int8.onnx"
    proc = ncc("compile", path, "--passes", "insert-qdq", "-o", out)
    assert proc.returncode == 0, proc.stderr
    int8 = onnx.load(out)
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in int8.graph.initializer}
    for layer, value in inputs.items():
        # within an ulp: the range's text (shortest float32 form) reads back as a float64 near the float32
        want = float(quant_params(*ranges[layer]["input"])[0])
        assert float(scales[f"{value}_scale"]) == pytest.approx(want, rel=1e-6), layer
    assert not any(p.key.startswith("ncc.calib") for p in int8.graph.metadata_props)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = prepared(x).numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_prune_and_quantize_together(tmp_path):
    model, x = cnn()
    teacher = copy.deepcopy(model)
    plan = train.Plan(
        prune=train.Prune("4x1", 0.5, criterion="snip-momentum", end_step=4, frequency=2, exclude=("fc2",)),
        quantize=train.Quantize(calib=[(x,)], learnable=True),
    )
    prepared = train.prepare(model, (x,), plan)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01, momentum=0.9)
    for _ in range(5):
        opt.zero_grad()
        out = prepared(x)
        (
            F.cross_entropy(out, torch.arange(4)) + train.distill_loss(out, teacher(x), "kl", temperature=2.0)
        ).backward()
        opt.step()
        prepared.step(opt)
    for name, mask in masks(prepared).items():
        layer = dict(prepared.module.named_modules())[name]
        assert bool((layer.weight.reshape(mask.shape)[mask == 0] == 0).all()), name  # fake quant keeps 0 at 0
        assert prepared.sparsity_report()[name]["sparsity"] == 0.5
    model_ir = train.finalize(prepared, (x,), tmp_path / "both.onnx")
    assert sum(k.startswith("ncc.calib/") for k in model_ir.graph.metadata_props) >= 4
    proc = ncc(
        "compile",
        tmp_path / "both.onnx",
        "--passes",
        "fuse-activation,insert-qdq,dce",
        "-o",
        tmp_path / "both.int8.onnx",
    )
    assert proc.returncode == 0, proc.stderr


# -- finalize -------------------------------------------------------------------------------------
def test_finalize_pruned_model_writes_the_zeros(tmp_path):
    model, x = cnn()
    prepared = train.prepare(
        model, (x,), train.Plan(prune=train.Prune("4x1", 0.75, schedule="oneshot", exclude=("fc2",)))
    )
    path = tmp_path / "pruned.onnx"
    train.finalize(prepared, (x,), path)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    for name, mask in masks(prepared).items():
        w = weights[f"{name}.weight"]
        assert np.array_equal(w.reshape(mask.shape) == 0, mask.numpy() == 0), name
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = torch.rand(3, 1, 14, 14)  # another batch size: the batch dimension stays symbolic
    got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, prepared(batch).numpy(), rtol=0, atol=1e-5)
    assert train.trainable_type() is type(prepared) and prepared.module is model  # the trained model is kept


def test_finalize_pt2_applies_the_masks(tmp_path):
    model, x = cnn()
    prepared = train.prepare(
        model, (x,), train.Plan(prune=train.Prune("2:4", schedule="oneshot", exclude=("conv1",)))
    )
    train.finalize(prepared, (x,), tmp_path / "pruned.pt2", dynamic_batch=False)
    program = torch.export.load(str(tmp_path / "pruned.pt2"))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), prepared(x), atol=1e-6)
    weight = program.state_dict["fc1.weight"]
    assert bool(((weight.reshape(32, -1, 4) != 0).sum(-1) == 2).all())


# -- errors and imports ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda: train.Prune("3x3x3"), "unknown pruning pattern '3x3x3'"),
        (lambda: train.Prune("4x1", 1.0), "sparsity must be in [0, 1)"),
        (lambda: train.Prune("4x1", -0.1), "sparsity must be in [0, 1)"),
        (lambda: train.Prune("4x1", criterion="random"), "unknown criterion 'random'"),
        (lambda: train.Prune("4x1", end_step=0), "end_step (0) must come after start_step (0)"),
        (lambda: train.prepare(cnn()[0], (cnn()[1],), train.Plan(prune=train.Prune("4x1"))), "layer 'fc2'"),
        (lambda: train.prepare(cnn()[0], (cnn()[1],), train.Plan(prune=train.Prune("2:4"))), "layer 'conv1'"),
        (lambda: train.prepare(cnn()[0], (cnn()[1],), train.Plan()), "the plan is empty"),
        (lambda: train.distill_loss(torch.zeros(2), torch.zeros(2), "l1"), "unknown distillation loss 'l1'"),
    ],
)
def test_bad_plans_say_why_in_one_sentence(make, fragment):
    with pytest.raises(NccError) as err:
        make()
    message = str(err.value)
    assert fragment in message and "\n" not in message and message.endswith("."), message


def test_import_paths_and_no_torch_on_import_ncc():
    code = (
        "import sys, ncc, ncc.train\n"
        "assert 'torch' not in sys.modules\n"
        "import ncc.torch.train as a\n"
        "from ncc.torch import train as b\n"
        "assert a is b is ncc.train, (a, b)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr
