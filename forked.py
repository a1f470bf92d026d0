"""Run independent CPU-bound jobs in this process and one forked child at once.

Some passes end in many independent pieces of numpy work driven by Python loops (``round-weights``
rounds each layer on its own): one core holds the GIL and the other idles. :func:`fork_map` computes
``[fn(i) for i in range(count)]`` with the odd ``i`` in a child made by ``os.fork()``, which starts with
this process's memory (the jobs' inputs are not copied or pickled; only the results come back,
pickled through a pipe). Each job is a pure function of ``i`` and memory the parent had at the fork, so
the result is the same whichever process computes it, and the same as a plain loop.

Only where ``fork`` is safe and there is a second core: Linux with two or more usable CPUs; elsewhere,
and for fewer than ``min_count`` jobs (a fork of a large process costs milliseconds), it is the plain
loop. Both processes use one BLAS thread meanwhile. The child ignores Ctrl-C (the parent handles it, kills the child and re-raises), runs no
``atexit`` handlers and flushes no inherited buffers (``os._exit``), and never touches files. An error in
a job is raised in the parent with the child's message; a child that dies without an answer (killed, or
a crash in native code) has its jobs computed in the parent, and :attr:`ForkMap.note` says so.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ncc.errors import NccError


@dataclass
class ForkMap:
    """The results of :func:`fork_map`, in job order, and what happened to the child (``note``)."""

    results: list[Any]
    forked: bool = False
    note: str | None = None


def can_fork() -> bool:
    """Whether :func:`fork_map` may fork here: Linux, with at least two CPUs this process may use."""
    if sys.platform != "linux" or not hasattr(os, "fork"):
        return False
    return len(os.sched_getaffinity(0)) >= 2


def fork_map(fn: Callable[[int], Any], count: int, *, min_count: int = 4, fork: bool = True) -> ForkMap:
    """``[fn(i) for i in range(count)]``, the odd ``i`` computed in a forked child (see the module docstring);
    ``fork=False`` is the plain loop (the caller judged the jobs too small to pay for a fork)."""
    if not fork or count < max(min_count, 2) or not can_fork():
        return ForkMap([fn(i) for i in range(count)])
    from threadpoolctl import threadpool_limits

    # one BLAS thread in each process (the child inherits the limit): two processes with a pool of
    # two spinning BLAS threads each on two cores ran slower together than one process alone
    with threadpool_limits(limits=1, user_api="blas"):
        return _fork_map(fn, count)


def _fork_map(fn: Callable[[int], Any], count: int) -> ForkMap:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, answer, leave without running anything of the parent's
        os.close(read_end)
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                payload = pickle.dumps(("ok", [fn(i) for i in range(1, count, 2)]), protocol=5)
            except BaseException as err:  # noqa: BLE001 - handed to the parent, which raises it
                payload = pickle.dumps(("error", f"{type(err).__name__}: {err}"))
            with os.fdopen(write_end, "wb") as out:
                out.write(payload)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        mine = [fn(i) for i in range(0, count, 2)]
        with os.fdopen(read_end, "rb") as answer:
            payload = answer.read()
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    _, status = os.waitpid(pid, 0)
    results: list[Any] = [None] * count
    results[0::2] = mine
    try:
        state, theirs = pickle.loads(payload)
    except Exception:  # no answer: the child died (its exit status says how)
        results[1::2] = [fn(i) for i in range(1, count, 2)]
        return ForkMap(
            results,
            forked=True,
            note=f"the worker process died ({_exit_reason(status)}); its jobs ran in this process",
        )
    if state != "ok":
        raise NccError(f"a job failed in the worker process: {theirs}")
    results[1::2] = theirs
    return ForkMap(results, forked=True)


def _exit_reason(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"
