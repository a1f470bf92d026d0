"""One trial: compile a pipeline spec on the input model and score the result with the user's function.

A trial is a pure function of (:class:`Job`, spec) -> metric: the job names the model, the calibration
data, the evaluation function and the cache, all by path, so a trial ships to a worker process or a Ray
task as a few strings, and the same spec always compiles to the same bytes. The user's function gets
the path of the candidate ``.onnx`` file (a temporary that is removed afterwards) and returns a number;
``spec=None`` scores the input model itself (FP32).

Runners evaluate a batch of specs: :class:`Serial` here, :class:`Processes` in ``--workers N`` spawned
processes, :class:`RayRunner` as Ray tasks (``--ray ADDRESS``; ``local`` starts a local Ray runtime).
Every path in the job must be readable at the same place by every worker.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ncc.errors import NccError, first_line


@dataclass(frozen=True)
class Job:
    """What every trial shares."""

    model: str  # the input model's path
    calib: str | None  # the --calib spec (weight-only RTN tunes without)
    evaluate: str  # module.py:function
    cache_dir: str
    value_info: bool = False  # the .onnx candidates keep intermediate shapes (as the final output will)
    plugins: tuple[str, ...] = ()


def compile_spec(job: Job, spec: str, report: list | None = None, contexts: list | None = None):
    """The input model compiled through ``spec`` (an ir.Model); the pass manager's records are appended to
    ``report``, the pass context to ``contexts``, when given."""
    from ncc.passes import registry
    from ncc.passes.base import PassContext
    from ncc.passes.manager import PassManager
    from ncc.passes.quant.calib_data import load_calibration_data
    from ncc.passes.spec import parse_pipeline

    for plugin in job.plugins:
        registry.load_plugin(plugin)
    model = _float_model(job).clone()
    ctx = PassContext(source=job.model, cache_dir=job.cache_dir)
    if job.calib:
        ctx.data["calibration_data"] = load_calibration_data(job.calib)
    run = PassManager(parse_pipeline(spec)).run(model, ctx)
    if report is not None:
        report.extend(run.records)
    if contexts is not None:
        contexts.append(ctx)
    return model


def measure(job: Job, spec: str | None) -> tuple[float, float, int]:
    """(the user's metric for ``spec``'s model, seconds the trial took, bytes of the candidate's files)."""
    from ncc.tools.modelio import input_files, save_model

    start = time.perf_counter()
    function = evaluator(job.evaluate)
    with tempfile.TemporaryDirectory(prefix="ncc-trial-") as tmp:
        path = Path(tmp) / "candidate.onnx"
        if spec is None and Path(job.model).suffix.lower() == ".onnx":
            path = Path(job.model)
            files = [use.path for use in input_files(path)]
        else:
            model = _float_model(job) if spec is None else compile_spec(job, spec)
            files = save_model(model, path, value_info=job.value_info or spec is None)
            del model
        size = sum(Path(f).stat().st_size for f in files)
        value = call_evaluator(function, job.evaluate, path)
    return value, time.perf_counter() - start, size


def evaluator(ref: str) -> Callable:
    from ncc.userfn import resolve_function

    return resolve_function(ref, "evaluation", "--eval")


def call_evaluator(function: Callable, ref: str, path: Path) -> float:
    """``function(str(path))`` as a finite float; what the user's code raises or returns wrong is one
    sentence."""
    try:
        value = function(str(path))
    except (KeyboardInterrupt, NccError):
        raise
    except Exception as err:  # noqa: BLE001 - the user's function failed
        raise NccError(f"--eval {ref} raised {type(err).__name__}: {first_line(err)}.") from None
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise NccError(f"--eval {ref} must return a number, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise NccError(f"--eval {ref} returned {value}, not a finite number.")
    return value


_MODELS: dict[str, object] = {}


def _float_model(job: Job):
    """The input model, loaded once per process."""
    from ncc.tools.modelio import load_model

    if job.model not in _MODELS:
        _MODELS.clear()
        _MODELS[job.model] = load_model(job.model)
    return _MODELS[job.model]


class Serial:
    """Trials one after another, in this process."""

    workers = 1

    def __init__(self, job: Job):
        self.job = job

    def map(self, specs: Sequence[str | None]) -> list[tuple[float, float]]:
        return [measure(self.job, spec) for spec in specs]

    def close(self) -> None:
        pass


class Processes(Serial):
    """Trials in ``workers`` spawned processes (each loads the model once)."""

    def __init__(self, job: Job, workers: int):
        super().__init__(job)
        self.workers = workers
        self.pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        )

    def map(self, specs: Sequence[str | None]) -> list[tuple[float, float]]:
        return list(self.pool.map(measure, [self.job] * len(specs), specs))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayRunner(Serial):
    """Trials as Ray tasks on the cluster at ``address`` (``local``: a Ray runtime started here)."""

    def __init__(self, job: Job, address: str, workers: int):
        super().__init__(job)
        try:
            import ray
        except ImportError:
            raise NccError("--ray needs the ray package: pip install 'ncc[ray]'.") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            try:
                if address == "local":
                    ray.init(num_cpus=max(workers, 1), include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=address, log_to_driver=False)
            except Exception as err:  # noqa: BLE001 - no cluster there
                raise NccError(
                    f"cannot connect to the Ray cluster at {address}: {first_line(err)}."
                ) from None
        self.workers = max(workers, 1)
        self.task = ray.remote(num_cpus=1)(measure)

    def map(self, specs: Sequence[str | None]) -> list[tuple[float, float]]:
        refs = [self.task.remote(self.job, spec) for spec in specs]
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as err:
            cause = err.as_instanceof_cause()
            if isinstance(cause, NccError):
                raise NccError(str(cause).splitlines()[0]) from None
            raise

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
