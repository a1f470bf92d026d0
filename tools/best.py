"""``--target best``: compile for every runtime this machine has, time each artefact, keep the fastest.

The candidates are the host's onnxruntime target (``x86-vnni`` or ``x86-avx2``, as ``--target host``
picks) and, where OpenVINO is installed, ``openvino``. Each runs the same pipeline; each artefact is
saved, opened in its runtime (:mod:`ncc.tools.runtimes`) and timed side by side with the others on a
batch of the calibration data (blocks, median of rounds, :mod:`ncc.tools.timing`), and its outputs are
compared with the float model's on the same samples. The fastest wins unless its output error
(``1 - cosine``) exceeds the best candidate's by more than ``ERROR_SLACK`` of it plus ``COSINE_SLACK``
(:func:`close_enough`), then the next: a fixed cosine margin alone let 0.0006 of cosine (1.2% more error
at cosine 0.947) choose a runtime 1.8x slower. The model is marked with the runtime
it was chosen for (``ncc.runtime``), and the report prints every candidate.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ncc.errors import NccError

COSINE_SLACK = 0.0005
ERROR_SLACK = 0.1
TIMING_BATCH = 8


@dataclass
class Candidate:
    target: str
    runtime: str
    model: object  # the compiled ir.Model
    run: object  # the pass manager's report
    ctx: object
    seconds: float = 0.0
    cosine: float = 0.0


def candidate_targets() -> list[tuple[str, str]]:
    """(target, runtime) pairs this machine can run."""
    from ncc.targets import host_target

    out = [(host_target(), "onnxruntime")]
    try:
        import openvino  # noqa: F401
    except ImportError:
        return out
    return out + [("openvino", "openvino")]


def choose(candidates: list[Candidate], float_model, calibration, value_info: bool) -> tuple[Candidate, str]:
    """The candidate to write and the report's table."""
    from ncc.metrics import sample_cosines
    from ncc.tools.modelio import save_model
    from ncc.tools.runtimes import open_runner
    from ncc.tools.timing import time_blocks

    feed = _batch(calibration, TIMING_BATCH)
    with tempfile.TemporaryDirectory(prefix="ncc-best-") as tmp:
        reference_path = Path(tmp) / "float.onnx"
        save_model(float_model, reference_path)
        reference = open_runner("onnxruntime", reference_path, _threads())
        ref = reference.outputs(feed)
        runners = []
        for i, c in enumerate(candidates):
            path = Path(tmp) / f"candidate{i}.onnx"
            save_model(c.model, path, value_info=value_info)
            runners.append(open_runner(c.runtime, path, _threads()))
        timing = time_blocks(runners, feed, runs=20, rounds=5, warmup=3)
        first = next(iter(ref))
        for i, (c, runner) in enumerate(zip(candidates, runners)):
            c.seconds = timing.median(i)
            got = runner.outputs(feed)[first]
            c.cosine = float(np.mean(sample_cosines(ref[first], got)))
        for runner in [reference, *runners]:
            runner.close()
        del runners, reference
    best_cosine = max(c.cosine for c in candidates)
    eligible = [c for c in candidates if close_enough(c.cosine, best_cosine)]
    chosen = min(eligible, key=lambda c: c.seconds)
    lines = [
        f"target best: timed on a batch of {len(next(iter(feed.values())))} calibration samples, {_threads()} threads"
    ]
    for c in candidates:
        mark = "  <- chosen" if c is chosen else ""
        lines.append(
            f"  {c.target} on {c.runtime}: {1e3 * c.seconds:.2f} ms per batch, output cosine {c.cosine:.5f}{mark}"
        )
    chosen.model.metadata_props["ncc.runtime"] = chosen.runtime
    return chosen, "\n".join(lines)


def close_enough(cosine: float, best_cosine: float) -> bool:
    """Whether a candidate with output ``cosine`` is as faithful as the best one's (``best_cosine``) for
    speed to decide: its error ``1 - cosine`` at most 10% above the best's, plus 0.0005."""
    return 1.0 - cosine <= (1.0 - best_cosine) * (1.0 + ERROR_SLACK) + COSINE_SLACK


def _batch(calibration, size: int) -> dict[str, np.ndarray]:
    if calibration is None:
        raise NccError("--target best times candidates on calibration data: give --calib DATA.")
    for batch in calibration.batches(size):
        return batch
    raise NccError("--target best: the calibration data is empty.")


def _threads() -> int:
    import os

    return min(os.cpu_count() or 1, 4)
