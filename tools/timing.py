"""Side-by-side latency of several onnxruntime sessions on a shared CPU: blocks, not interleaved runs.

Every throughput number in ncc (``ncc bench``, ``benchmarks/``) comes from :func:`time_blocks`.

Why blocks. After a run, onnxruntime's idle intra-op workers spin before they sleep (the default
``session.intra_op.allow_spinning = 1``): a 2-thread session keeps a core busy for tens of
milliseconds after its run returns. Timing sessions run by run (A, B, A, B, ...) therefore
times each run against the previous session's spinning worker, a bias that depends on a
model's position in the loop (``benchmarks/RESULTS.md`` has the measurements). So:

- each round runs the sessions one after another (the order reversed every other round), each
  as a *block*: untimed runs for at least ``settle_s`` (the previous session's workers go idle
  meanwhile; longer than the spin), then ``block_runs`` timed runs;
- a session's latency is the median of all its timed runs;
- a ratio between two sessions is the median over rounds of the ratio of their block medians in
  the same round, so drift of a shared machine between rounds cancels; its quartiles say how
  much to trust it.

Spinning stays on: it is what a user running one model gets (and turning it off made FP32
batch-1 latency worse).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SETTLE_S = 0.1  # untimed running at the start of each block: longer than the idle spin
MAX_BLOCK_RUNS = 2000
MIN_BLOCK_S = 0.25  # a fast model's block runs at least this long


@dataclass(frozen=True)
class Timing:
    """Timed runs of several sessions, in blocks (see the module docstring)."""

    seconds: list[list[float]]  # per session: every timed run, in order
    block_medians: list[list[float]]  # per session: one median per round

    def median(self, i: int) -> float:
        """Median seconds per run of session ``i``."""
        return _percentile(self.seconds[i], 50)

    def p90(self, i: int) -> float:
        return _percentile(self.seconds[i], 90)

    def ratio(self, i: int, ref: int = 0) -> dict[str, float]:
        """How many times faster session ``i`` runs than session ``ref``: the median over rounds of
        ``ref``'s block median over ``i``'s, with its quartiles."""
        ratios = [r / s for r, s in zip(self.block_medians[ref], self.block_medians[i]) if s > 0]
        if not ratios:
            return {"median": math.inf, "q25": math.inf, "q75": math.inf, "rounds": 0}
        return {
            "median": _percentile(ratios, 50),
            "q25": _percentile(ratios, 25),
            "q75": _percentile(ratios, 75),
            "rounds": len(ratios),
        }


def time_blocks(
    sessions: Sequence,
    feeds: Mapping | Sequence[Mapping],
    *,
    runs: int,
    rounds: int = 5,
    warmup: int = 1,
    min_block_s: float = MIN_BLOCK_S,
    settle_s: float = SETTLE_S,
    outputs: Sequence[str] | None = None,
) -> Timing:
    """Time ``sessions`` (onnxruntime ``InferenceSession``s) side by side: ``warmup`` untimed runs
    each (at least one), then ``rounds`` rounds of one block per session (see the module docstring).

    A session's block has ``ceil(runs / rounds)`` timed runs, more for a fast model so the block
    lasts about ``min_block_s`` (sized from its last warm-up run; at most 2,000). ``feeds`` is one
    input dict for all sessions or one per session; ``outputs`` the output names fetched (``None``:
    all). Errors from onnxruntime propagate.
    """
    if rounds < 1 or runs < 1:
        raise ValueError(f"runs and rounds must be at least 1, got {runs} and {rounds}")
    per_session = list(feeds) if not isinstance(feeds, Mapping) else [feeds] * len(sessions)
    if len(per_session) != len(sessions):
        raise ValueError(f"{len(per_session)} feeds for {len(sessions)} sessions")
    fetch = list(outputs) if outputs is not None else None
    block_runs = []
    for session, feed in zip(sessions, per_session):
        for _ in range(max(warmup, 1)):  # the last one sizes the block
            start = time.perf_counter()
            session.run(fetch, feed)
            last = time.perf_counter() - start
        by_time = min(int(min_block_s / max(last, 1e-9)), MAX_BLOCK_RUNS)
        block_runs.append(max(-(-runs // rounds), by_time, 1))
    seconds: list[list[float]] = [[] for _ in sessions]
    medians: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for round_ in range(rounds):
        for i in order if round_ % 2 == 0 else order[::-1]:
            session, feed = sessions[i], per_session[i]
            settle_until = time.perf_counter() + settle_s
            session.run(fetch, feed)
            while time.perf_counter() < settle_until:
                session.run(fetch, feed)
            block = []
            for _ in range(block_runs[i]):
                start = time.perf_counter()
                session.run(fetch, feed)
                block.append(time.perf_counter() - start)
            seconds[i].extend(block)
            medians[i].append(_percentile(block, 50))
    return Timing(seconds, medians)


def _percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))
