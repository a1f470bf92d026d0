"""ncc.torch: a PyTorch module through the IR and back, run by Inductor as int8 kernels.

The model is the README example's CNN, trained here on scikit-learn's real digits (seconds); the
artefact is checked for numerics (against the float module, and the Inductor-compiled graph against
the same graph run eagerly), for which kernels Inductor really used, and for a fresh-process reload.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BATCH = 8


def _example():
    spec = importlib.util.spec_from_file_location("make_digits_cnn", REPO / "examples" / "make_digits_cnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits_cnn():
    example = _example()
    model = example.train_digits_cnn()
    x, y = example.digits()
    return model, x, y, example.TRAIN, example.TEST


@pytest.fixture(scope="module")
def compiled(digits_cnn):
    import ncc.torch

    model, x, _, train, _ = digits_cnn
    calib = [(x[train][i : i + BATCH],) for i in range(0, 64, BATCH)]
    return ncc.torch.compile(model, (x[:BATCH],), pipeline="int8", calib=calib)


def _batches(x):
    n = len(x) // BATCH * BATCH
    return [x[i : i + BATCH] for i in range(0, n, BATCH)], n


def test_lower_keeps_each_nodes_fx_origin_and_the_numerics(digits_cnn):
    import ncc.torch
    from ncc.frontends.torch import FX_NODE
    from ncc.runtime import run

    model, x, _, _, test = digits_cnn
    ir_model = ncc.torch.lower(model, (x[:BATCH],))
    nodes = list(ir_model.graph)
    assert {n.op_type for n in nodes} >= {"Conv", "BatchNormalization", "Relu", "MaxPool", "Gemm"}
    assert all(n.metadata_props.get(FX_NODE) for n in nodes), [
        n.name for n in nodes if FX_NODE not in n.metadata_props
    ]
    images = x[test][:BATCH]
    (got,) = run(ir_model, [images.numpy()])
    with torch.no_grad():
        want = model(images).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_static_lowering_translates_aten_directly_and_says_when_it_cannot(digits_cnn):
    import ncc.torch
    from ncc.frontends.torch import FX_NODE, ROUTE
    from ncc.runtime import run

    model, x, _, _, test = digits_cnn
    images = x[test][:BATCH]
    with torch.no_grad():
        want = model(images).numpy()
    direct = ncc.torch.lower(model, (images,), dynamic_batch=False)
    assert direct.metadata_props[ROUTE] == "aten"
    nodes = list(direct.graph)
    assert {n.op_type for n in nodes} >= {"Conv", "BatchNormalization", "Relu", "MaxPool", "Gemm"}
    assert all("call_function[target=torch.ops.aten." in n.metadata_props.get(FX_NODE, "") for n in nodes)
    assert [v.name for v in direct.graph.inputs] == ["x"]
    np.testing.assert_allclose(run(direct, [images.numpy()])[0], want, rtol=1e-4, atol=1e-4)

    # an op without a direct rule (avg_pool2d) takes torch.onnx's exporter, and the IR says why
    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1))

    other = ncc.torch.lower(Pooled().eval(), (images,), dynamic_batch=False)
    assert (
        other.metadata_props[ROUTE] == "torch.onnx (aten.avg_pool2d.default (avg_pool2d) has no direct rule)"
    )
    with torch.no_grad():
        want = Pooled().eval()(images).numpy()
    np.testing.assert_allclose(run(other, [images.numpy()])[0], want, rtol=1e-4, atol=1e-4)


def test_lowering_never_runs_an_in_place_op_on_the_modules_state():
    """torch.export's graph keeps in-place ops (a counter buffer's ``add_``): the aten route must neither
    compute them as constants (that would write into the user's buffer) nor drop them."""
    import ncc.torch
    from ncc.frontends.torch import ROUTE
    from ncc.runtime import run

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(1))
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x):
            self.count.add_(1)
            return self.lin(x) + self.count

    module, x = Counting().eval(), torch.randn(2, 4)
    model = ncc.torch.lower(module, (x,), dynamic_batch=False)
    assert model.metadata_props[ROUTE] == "torch.onnx (aten.add_.Tensor (add_) writes in place)"
    assert module.count.item() == 0  # untouched by lowering
    with torch.no_grad():
        want = module(x).numpy()  # the counter is 1 in this call, as in the exported program
        module(x)  # and 2 after this one: the IR holds its own copy of the state, still 0
    np.testing.assert_allclose(run(model, [x.numpy()])[0], want, rtol=1e-5, atol=1e-5)


def test_int8_keeps_the_accuracy_and_quantizes_every_layer(digits_cnn, compiled):
    model, x, y, _, test = digits_cnn
    batches, n = _batches(x[test])
    with torch.no_grad():
        want = torch.cat([model(b) for b in batches]).argmax(1)
        got = torch.cat([compiled.graph_module(b) for b in batches]).argmax(1)
    labels = y[test][:n]
    float_acc = (want == labels).float().mean().item()
    int8_acc = (got == labels).float().mean().item()
    assert float_acc > 0.9
    assert int8_acc >= float_acc - 0.01, (int8_acc, float_acc)
    assert (got == want).float().mean().item() >= 0.98
    quantized = [n for n in compiled.ir.graph if n.metadata_props.get("ncc.quant") == "int8"]
    assert (
        sorted(n.op_type for n in quantized if n.op_type in ("Conv", "Gemm")) == ["Conv"] * 3 + ["Gemm"] * 2
    )
    # int8 weights only: no float copy of a quantized layer's weight in the module
    buffers = dict(compiled.graph_module.named_buffers())
    assert sum(b.dtype == torch.int8 for b in buffers.values()) == 5
    largest_float = max(b.numel() for b in buffers.values() if b.dtype == torch.float32)
    assert largest_float < 64 * 32 * 4 * 4  # the largest weight (head.1) is int8


def test_inductor_runs_every_quantized_conv_and_linear_as_an_int8_kernel(digits_cnn, compiled):
    _, x, _, _, test = digits_cnn
    check = compiled.check  # compile() ran Inductor on the example inputs and read its counters
    assert (check.convs, check.linears) == (3, 2)
    assert (check.int8_convs, check.int8_linears) == (3, 2), check.summary()
    assert check.ok and "5/5 quantized convolutions and linears run as oneDNN int8 kernels" in check.summary()
    images = x[test][:BATCH]
    got = compiled(images)
    with torch.no_grad():
        eager = compiled.graph_module(images)
    # oneDNN's int8 kernels against the reference (dequantize -> float op -> quantize) graph: the
    # logits differ by rounding of the requantized activations, a few output steps at most
    step = float(np.abs(eager.numpy()).max()) / 127
    assert float((got - eager).abs().max()) < 4 * step
    assert (got.argmax(1) == eager.argmax(1)).all()


def test_saved_program_reloads_in_a_fresh_process_with_int8_weights_only(digits_cnn, compiled, tmp_path):
    _, x, _, _, test = digits_cnn
    path = tmp_path / "digits.int8.pt2"
    compiled.save(path)
    images = x[test][:BATCH]
    script = (
        "import torch.ao.quantization.fx._decomposed\n"
        "program = torch.export.load(sys.argv[1])\n"
        "weights = [t for t in program.state_dict.values()] + list(program.constants.values())\n"
        "assert not any(t.dtype == torch.float32 and t.numel() >= 4096 for t in weights), 'a float weight'\n"
        "run = program.module()\n"
    )
    with torch.no_grad():
        want = compiled.graph_module(images)
    assert torch.equal(_run_in_fresh_process(script, path, images, tmp_path), want)


def _run_in_fresh_process(load: str, path, inputs: torch.Tensor, tmp_path) -> torch.Tensor:
    """``load`` (Python defining ``run`` from the file ``sys.argv[1]``) in a new interpreter, ``run`` on ``inputs``
    under ``no_grad``; its output."""
    inputs_file, outputs_file = tmp_path / "x.pt", tmp_path / "y.pt"
    torch.save(inputs, inputs_file)
    script = (
        "import sys, torch\n"
        + load
        + "with torch.no_grad():\n    torch.save(run(torch.load(sys.argv[2])), sys.argv[3])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path), str(inputs_file), str(outputs_file)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return torch.load(outputs_file)


def _ncc(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ncc.tools.cli", *map(str, args)], capture_output=True, text=True
    )


def test_cli_compiles_a_saved_program_to_an_int8_program(digits_cnn, tmp_path):
    model, x, y, train, test = digits_cnn
    source, calib, out = tmp_path / "digits.pt2", tmp_path / "calib.npz", tmp_path / "digits.int8.pt2"
    with torch.no_grad():
        torch.export.save(torch.export.export(model, (x[:BATCH],)), source)
    np.savez(calib, x=x[train][:64].numpy())  # keyed by forward()'s argument name, as `ncc dump` shows it
    dump = _ncc("dump", source)
    assert dump.returncode == 0, dump.stderr
    assert "%x: f32[8,1,8,8]" in dump.stdout and "pkg.torch.onnx.fx_node" in dump.stdout
    proc = _ncc("compile", source, "--pass", "int8", "--calib", calib, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "5/5 quantized convolutions and linears run as oneDNN int8 kernels" in proc.stderr, proc.stderr
    importlib.import_module("torch.ao.quantization.fx._decomposed")  # registers the ops it calls
    program = torch.export.load(str(out))
    batches, n = _batches(x[test])
    with torch.no_grad():
        got = torch.cat([program.module()(b) for b in batches]).argmax(1)
        want = torch.cat([model(b) for b in batches]).argmax(1)
    assert (got == want).float().mean().item() >= 0.98


def test_cli_refuses_what_a_pt2_cannot_be(tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    proc = _ncc("compile", junk, "--pass", "optimize", "-o", tmp_path / "o.pt2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "not a torch.export program" in proc.stderr
    assert not (tmp_path / "o.pt2").exists()
    onnx_in = REPO / "examples" / "digits_cnn.onnx"
    proc = _ncc(
        "compile",
        onnx_in,
        "--pass",
        "int8",
        "--calib",
        REPO / "examples" / "digits_calib.npz",
        "--format",
        "qoperator",
        "-o",
        tmp_path / "o.pt2",
    )
    assert proc.returncode == 2 and "is an ONNX form" in proc.stderr, proc.stderr


def test_cli_writes_an_onnx_model_with_a_symbolic_batch_as_a_program_taking_any_batch(digits_cnn, tmp_path):
    _, x, _, _, test = digits_cnn
    source, out = REPO / "examples" / "digits_cnn.onnx", tmp_path / "digits.int8.pt2"
    proc = _ncc(
        "compile", source, "--pass", "int8", "--calib", REPO / "examples" / "digits_calib.npz", "-o", out
    )
    assert proc.returncode == 0, proc.stderr
    assert "5/5 quantized convolutions and linears run as oneDNN int8 kernels" in proc.stderr, proc.stderr
    importlib.import_module("torch.ao.quantization.fx._decomposed")
    program = torch.export.load(str(out)).module()
    from ncc.runtime import run

    images = x[test][:64]
    (want,) = run(source, [images.numpy()])
    for batch in (1, 3, 64):  # the example batch was 2: the program's batch is symbolic
        with torch.no_grad():
            got = program(images[:batch]).numpy()
        assert got.shape == (batch, 10)
        assert (got.argmax(1) == want[:batch].argmax(1)).mean() >= 0.95


def test_cli_writes_an_aoti_package_that_reloads_bit_for_bit(digits_cnn, tmp_path):
    model, x, _, train, test = digits_cnn
    source, calib, out = tmp_path / "digits.pt2", tmp_path / "calib.npz", tmp_path / "digits.int8.aoti.pt2"
    with torch.no_grad():
        torch.export.save(torch.export.export(model, (x[:BATCH],)), source)
    np.savez(calib, x=x[train][:64].numpy())
    proc = _ncc("compile", source, "--pass", "int8", "--calib", calib, "--target", "aoti", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "on AOTInductor" in proc.stderr and "5/5 quantized convolutions and linears" in proc.stderr, (
        proc.stderr
    )
    images = x[test][:BATCH]
    runner = torch._inductor.aoti_load_package(str(out))
    with torch.no_grad():
        here = runner(images)
        want = model(images)
    assert (here.argmax(1) == want.argmax(1)).float().mean().item() >= 0.875
    fresh = _run_in_fresh_process(
        "run = torch._inductor.aoti_load_package(sys.argv[1])\n", out, images, tmp_path
    )
    assert torch.equal(fresh, here)
    refused = _ncc("compile", source, "--pass", "optimize", "--target", "aoti", "-o", tmp_path / "o.onnx")
    assert refused.returncode == 2 and "give a .pt2 output" in refused.stderr, refused.stderr
