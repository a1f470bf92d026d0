"""ncc.tools.timing: blocks of runs per session, settle time untimed, ratios paired by round.

A fake clock that only the fake sessions advance makes every number exact."""

import pytest
from ncc.tools import timing


class Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class FakeSession:
    def __init__(self, name, clock, log, durations):
        self.name, self.clock, self.log, self.durations = name, clock, log, durations

    def run(self, outputs, feed):
        assert feed == {"x": self.name}
        d = self.durations(len([e for e in self.log if e == self.name]))
        self.clock.now += d
        self.log.append(self.name)
        return [None]


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(timing, "time", c)
    return c


def test_blocks_settle_untimed_and_rounds_alternate(clock):
    log = []
    a = FakeSession("a", clock, log, lambda n: 0.03)
    b = FakeSession("b", clock, log, lambda n: 0.01)
    t = timing.time_blocks(
        [a, b], [{"x": "a"}, {"x": "b"}], runs=6, rounds=3, warmup=2, min_block_s=0, settle_s=0.1
    )
    # warm-up 2 each; then per block: runs until 0.1 s of settling passed (a: 4 runs of 30 ms,
    # b: 10 runs of 10 ms, float sums permitting one more), then 2 timed runs
    assert log[:4] == ["a", "a", "b", "b"]
    blocks = []
    for name in log[4:]:
        if blocks and blocks[-1][0] == name:
            blocks[-1][1] += 1
        else:
            blocks.append([name, 1])
    # the order reverses every round: a b | b a | a b, so adjacent blocks of one session merge here
    assert [n for n, _ in blocks] == ["a", "b", "a", "b"]
    assert [k for n, k in blocks if n == "a"] == [4 + 2, 2 * (4 + 2)]
    b_first, b_last = (k for n, k in blocks if n == "b")
    assert 2 * (10 + 2) <= b_first <= 2 * (11 + 2) and 10 + 2 <= b_last <= 11 + 2
    assert [len(s) for s in t.seconds] == [6, 6]
    assert t.median(0) == pytest.approx(0.03) and t.median(1) == pytest.approx(0.01)
    assert t.ratio(1, 0) == pytest.approx({"median": 3.0, "q25": 3.0, "q75": 3.0, "rounds": 3})


def test_ratio_pairs_blocks_of_the_same_round(clock):
    # the machine slows down 2x in the second round: separate medians would mix rounds, paired ones do not
    log = []

    def durations(base):
        # each session's runs: 0 warm-up, then per round one settling run and one timed run
        return lambda n: base * (2 if n >= 3 else 1)

    a = FakeSession("a", clock, log, durations(0.02))
    b = FakeSession("b", clock, log, durations(0.01))
    t = timing.time_blocks(
        [a, b], [{"x": "a"}, {"x": "b"}], runs=2, rounds=2, warmup=1, min_block_s=0, settle_s=0
    )
    assert t.block_medians[0] == pytest.approx([0.02, 0.04]) and t.block_medians[1] == pytest.approx(
        [0.01, 0.02]
    )
    assert t.ratio(1)["median"] == pytest.approx(2.0)


def test_fast_models_get_longer_blocks(clock):
    log = []
    a = FakeSession("a", clock, log, lambda n: 0.001)
    t = timing.time_blocks([a], {"x": "a"}, runs=3, rounds=2, warmup=1, min_block_s=0.05, settle_s=0)
    assert [len(s) for s in t.seconds] == [2 * 50]  # 50 runs of 1 ms make a 50 ms block


def test_bad_counts_are_rejected(clock):
    a = FakeSession("a", clock, [], lambda n: 0.001)
    with pytest.raises(ValueError):
        timing.time_blocks([a], {"x": "a"}, runs=0)
    with pytest.raises(ValueError):
        timing.time_blocks([a, a], [{"x": "a"}], runs=1)
