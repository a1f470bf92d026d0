"""An evaluation function for ``ncc compile --eval``: the digits CNN's accuracy on held-out digits.

    ncc compile examples/digits_cnn.onnx --pass int8 --calib examples/digits_calib.npz \\
        --eval examples/digits_eval.py:accuracy --max-loss 0.5% -o digits.tuned.onnx

``accuracy(path)`` runs the candidate model in onnxruntime on the 397 digits of scikit-learn's set that
``make_digits_cnn.py`` held out from training, and returns the fraction classified right (higher is
better). ``--eval`` calls it with the path of each candidate ``.onnx`` file.
"""

import numpy as np
import onnxruntime as ort
from sklearn.datasets import load_digits


def held_out() -> tuple[np.ndarray, np.ndarray]:
    """The digits after the 1,400 the CNN was trained on: [N, 1, 8, 8] images in [0, 1] and labels."""
    data = load_digits()
    images = (data.images[1400:] / 16.0).astype(np.float32)[:, None]
    return images, data.target[1400:]


def accuracy(path: str) -> float:
    images, labels = held_out()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    return float(np.mean(logits.argmax(1) == labels))
