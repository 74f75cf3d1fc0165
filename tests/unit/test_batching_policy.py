"""policies/batching.py: the pure `decide` function."""

from __future__ import annotations

import pytest

from steadyserve.policies.batching import Idle, RunNow, WaitUntil, decide
from steadyserve.testing import FakeClock

T0 = 1000.0


def _decide(*, queued: int, oldest: float | None = T0, busy: bool = False, now: float = T0,
            max_batch_size: int = 8, max_wait_s: float = 0.0):
    return decide(queued=queued, oldest_enqueued_at=oldest, busy=busy, now=now,
                  max_batch_size=max_batch_size, max_wait_s=max_wait_s)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param(dict(queued=0, oldest=None), Idle(), id="empty-queue-idle"),
        pytest.param(dict(queued=-1, oldest=None), Idle(), id="negative-queue-idle"),
        pytest.param(dict(queued=3, busy=True), Idle(), id="busy-gathers"),
        pytest.param(dict(queued=20, busy=True), Idle(), id="busy-even-when-over-full"),
        pytest.param(dict(queued=8, max_wait_s=5.0), RunNow(8), id="full-batch-runs-at-once"),
        pytest.param(dict(queued=20, max_wait_s=5.0), RunNow(8), id="over-full-runs-max"),
        pytest.param(dict(queued=20), RunNow(8), id="over-full-no-wait-runs-max"),
        pytest.param(dict(queued=3), RunNow(3), id="no-wait-runs-queued"),
        pytest.param(dict(queued=1), RunNow(1), id="no-wait-runs-single"),
        pytest.param(dict(queued=3, now=T0 + 0.002, max_wait_s=0.005), WaitUntil(T0 + 0.005),
                     id="under-max-wait-waits-for-oldest-deadline"),
        pytest.param(dict(queued=3, now=T0, max_wait_s=0.005), WaitUntil(T0 + 0.005),
                     id="just-enqueued-waits"),
        pytest.param(dict(queued=3, now=T0 + 0.005, max_wait_s=0.005), RunNow(3), id="at-deadline-runs"),
        pytest.param(dict(queued=3, now=T0 + 1.0, max_wait_s=0.005), RunNow(3), id="after-deadline-runs"),
        pytest.param(dict(queued=1, max_batch_size=1, max_wait_s=5.0), RunNow(1),
                     id="max-batch-1-never-waits"),
    ],
)
def test_decide(kwargs, expected):
    assert _decide(**kwargs) == expected


def test_decide_deadline_is_from_oldest_not_now():
    clock = FakeClock(start=T0)
    oldest = clock()
    clock.advance(0.003)
    assert _decide(queued=2, oldest=oldest, now=clock(), max_wait_s=0.010) == WaitUntil(T0 + 0.010)
    clock.advance(0.007)
    assert _decide(queued=2, oldest=oldest, now=clock(), max_wait_s=0.010) == RunNow(2)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param(RunNow(3), RunNow(4), id="runnow-size"),
        pytest.param(WaitUntil(1.0), WaitUntil(2.0), id="waituntil-deadline"),
        pytest.param(RunNow(1), Idle(), id="runnow-vs-idle"),
    ],
)
def test_decisions_compare_by_value(a, b):
    # guards the table above: distinct decisions must not compare equal
    assert a != b
