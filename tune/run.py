"""``ncc compile --eval``: set up a tuning run from the command line's options and say what it found."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ncc.errors import NccError


class Interrupted(NccError):
    """Ctrl-C during tuning with no configuration within the bound yet: nothing is written."""

    exit_code = 130


@dataclass(frozen=True)
class TuneOptions:
    evaluate: str
    max_loss: str = "1%"
    lower_is_better: bool = False
    strategy: str = "ranked"
    resume: bool = False
    max_trials: int | None = None
    timeout: str | None = None
    workers: int = 1
    ray: str | None = None

    def files(self) -> list:
        """The file ``--eval`` reads (a ``module.py``), as the output-name check sees it."""
        from ncc.tools.modelio import FileUse

        module = self.evaluate.rpartition(":")[0]
        return [FileUse("the --eval file", Path(module), model=False)] if module.endswith(".py") else []


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``1.5h`` -> seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise NccError(f"--timeout takes a positive duration such as 90s, 10m or 1h, got {text!r}.")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def check(options: TuneOptions) -> None:
    """Refuse bad tuning options before any work."""
    from ncc.tune.search import Bound

    Bound.parse(options.max_loss)
    if options.timeout is not None:
        parse_duration(options.timeout)
    if options.max_trials is not None and options.max_trials < 2:
        raise NccError(
            f"--max-trials must be at least 2 (FP32 and one configuration), got {options.max_trials}."
        )
    if options.workers < 1:
        raise NccError(f"--workers must be at least 1, got {options.workers}.")
    if options.strategy not in ("ranked", "basic"):
        raise NccError(f"--strategy is ranked or basic, not {options.strategy!r}.")
    from ncc.tune.trials import evaluator

    evaluator(options.evaluate)  # a missing file or function is said now, not after the FP32 run


def tune(
    passes: list,
    options: TuneOptions,
    *,
    model_path: Path,
    model_files: list[Path],
    calib: str,
    cache_dir: Path,
    value_info: bool,
    plugins: tuple[str, ...],
    progress,
):
    """Run the search for ``passes`` (the user's int8 pipeline); returns (the passes of the configuration
    chosen, the outcome). Raises when nothing within the bound was found."""
    from ncc.passes.quant.calib_data import load_calibration_data
    from ncc.passes.spec import format_pipeline
    from ncc.tune.log import TuningLog, log_key
    from ncc.tune.search import Bound, Tuner
    from ncc.tune.space import Config, config_of
    from ncc.tune.trials import Job, Processes, RayRunner, Serial

    if isinstance(config_of(passes), Config) and not calib:  # an int8 or w4 pipeline, or one sentence
        raise NccError("--eval tunes a calibrated pipeline: give --calib DATA too.")
    bound = Bound.parse(options.max_loss, options.lower_is_better)
    job = Job(str(model_path), calib, options.evaluate, str(cache_dir), value_info, plugins)
    base_spec = format_pipeline(passes)
    digest = load_calibration_data(calib).digest() if calib else "no calibration data"
    key = log_key(model_files, digest, base_spec, options.evaluate)
    log = TuningLog(Path(cache_dir) / "tuning" / f"{key}.jsonl", options.resume)
    if options.resume and not log.resumed:
        progress(f"nothing to resume in {log.path}: starting a new tuning log")
    if options.ray:
        runner = RayRunner(job, options.ray, options.workers)
    elif options.workers > 1:
        runner = Processes(job, options.workers)
    else:
        runner = Serial(job)
    timeout = parse_duration(options.timeout) if options.timeout else None
    outcome = Tuner(
        job,
        passes,
        bound,
        runner,
        log,
        strategy=options.strategy,
        max_trials=options.max_trials,
        timeout=timeout,
        progress=progress,
    ).run()
    if outcome.choice is None:
        raise _nothing_found(outcome)
    return outcome.choice.apply(passes), outcome


def _nothing_found(outcome) -> NccError:
    closest = outcome.closest()
    if outcome.baseline is None or closest is None:
        reached = "no configuration was evaluated"
    else:
        loss = outcome.bound.loss(outcome.baseline, closest.metric)
        amount = f"{100 * loss:.3g}%" if outcome.bound.relative else f"{loss:.4g}"
        reached = f"the best loss reached was {amount} (trial {closest.number}: {closest.config.describe()})"
    why = outcome.stopped or "the search ended"
    if outcome.stopped == "interrupted":
        return Interrupted(f"interrupted before any configuration met the bound; {reached}; nothing written.")
    return NccError(f"no configuration met --max-loss: {why}; {reached}; nothing written.")
