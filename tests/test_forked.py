"""ncc.forked.fork_map: the same results as a plain loop, half of them computed in a forked child."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from ncc.errors import NccError
from ncc.forked import can_fork, fork_map

pytestmark = pytest.mark.skipif(not can_fork(), reason="fork_map forks only on Linux with two or more CPUs")


def test_results_are_the_loops_and_the_odd_jobs_ran_in_the_child():
    parent = os.getpid()
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((64, 64)) for _ in range(7)]

    def job(i):
        return os.getpid(), mats[i] @ mats[i].T  # memory from before the fork, a BLAS product

    done = fork_map(job, len(mats))
    assert done.forked and done.note is None
    pids = [pid for pid, _ in done.results]
    assert all(pid == parent for pid in pids[0::2]) and all(pid != parent for pid in pids[1::2])
    for i, (_, got) in enumerate(done.results):
        np.testing.assert_array_equal(got, mats[i] @ mats[i].T)


def test_few_jobs_run_in_this_process():
    parent = os.getpid()
    done = fork_map(lambda i: os.getpid(), 3, min_count=4)
    assert not done.forked and done.results == [parent] * 3
    done = fork_map(lambda i: os.getpid(), 6, fork=False)  # the caller's judgement: too small to fork
    assert not done.forked and done.results == [parent] * 6


def test_an_error_in_the_child_is_raised_with_its_message():
    parent = os.getpid()

    def job(i):
        if os.getpid() != parent:
            raise ValueError(f"job {i} cannot")
        return i

    with pytest.raises(NccError, match="a job failed in the worker process: ValueError: job 1 cannot"):
        fork_map(job, 4)


def test_a_child_that_dies_leaves_its_jobs_to_this_process():
    parent = os.getpid()

    def job(i):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return i * i

    done = fork_map(job, 5)
    assert done.results == [0, 1, 4, 9, 16]
    assert (
        done.note == f"the worker process died (signal {int(signal.SIGKILL)}); its jobs ran in this process"
    )
