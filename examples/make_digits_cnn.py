"""Build examples/digits_cnn.onnx: a small CNN trained on scikit-learn's 1,797 real 8x8 digits.

This is the built-in example the README's quick start compiles. It is
committed; this script documents how it was made (needs torch==2.13.0 and
scikit-learn) and rebuilds it byte for byte on the same versions:

    python examples/make_digits_cnn.py
"""

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent


class DigitsCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1),
            torch.nn.BatchNorm2d(16),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.BatchNorm2d(32),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 32, 3, padding=1),
            torch.nn.BatchNorm2d(32),
            torch.nn.ReLU(),
        )
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        )

    def forward(self, x):
        return self.head(self.features(x))


TRAIN, TEST = slice(0, 1400), slice(1400, None)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as ``[N, 1, 8, 8]`` float images in [0, 1] and their labels."""
    data = load_digits()
    x = torch.from_numpy((data.images / 16.0).astype(np.float32)).unsqueeze(1)
    return x, torch.from_numpy(data.target.astype(np.int64))


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Module:
    """``model`` trained on the first 1,400 of ``x``/``y`` (Adam, batches of 64), returned in eval mode;
    deterministic when the caller seeded torch before building the model."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _epoch in range(epochs):
        perm = torch.randperm(1400)
        model.train()
        for i in range(0, 1400, 64):
            idx = perm[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[TRAIN][idx]), y[TRAIN][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def train_digits_cnn() -> DigitsCNN:
    """The example's CNN, trained on the first 1,400 digits (deterministic: seed 0), in eval mode."""
    torch.manual_seed(0)
    x, y = digits()
    return fit(DigitsCNN(), x, y, epochs=15)


def main() -> None:
    model = train_digits_cnn()
    x, y = digits()
    train, test = TRAIN, TEST
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    print(f"test accuracy on {len(y[test])} held-out digits: {acc:.3f}")
    torch.onnx.export(
        model,
        (x[:1],),
        str(HERE / "digits_cnn.onnx"),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
        do_constant_folding=False,
    )  # keep BatchNormalization: the example shows fuse-conv-bn
    np.savez(HERE / "digits_calib.npz", image=x[train][:64].numpy())


if __name__ == "__main__":
    main()
