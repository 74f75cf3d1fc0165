"""policies/codel.py: CoDel for the gateway's wait queue."""

from __future__ import annotations

import pytest

from steadyserve.policies.codel import CoDel

MS = 0.001
T0 = 1000.0
TARGET = 5 * MS
INTERVAL = 100 * MS


def codel() -> CoDel:
    return CoDel(target_s=TARGET, interval_s=INTERVAL)


def feed(c: CoDel, dequeues: list[tuple[float, float]]) -> CoDel:
    """Dequeues as (ms after T0, waited ms)."""
    for at_ms, waited_ms in dequeues:
        c.on_dequeue(waited_ms * MS, T0 + at_ms * MS)
    return c


def test_fresh_codel_is_calm():
    c = codel()
    assert not c.overloaded
    assert c.max_wait_s() == INTERVAL


@pytest.mark.parametrize(
    ("dequeues", "overloaded"),
    [
        pytest.param([(0, 1), (50, 2), (150, 4.9), (500, 0)], False, id="all-below-target"),
        pytest.param([(0, 10)], False, id="one-above"),
        pytest.param([(0, 10), (50, 10), (99, 10)], False, id="above-for-less-than-interval"),
        pytest.param([(0, 10), (100.5, 10)], True, id="above-for-an-interval"),
        pytest.param([(0, 10), (50, 10), (250, 10)], True, id="above-for-longer"),
        pytest.param([(0, 5), (101, 5)], True, id="exactly-target-counts-as-above"),
        pytest.param([(0, 10), (60, 1), (120, 10)], False, id="dip-below-restarts-the-clock"),
        pytest.param([(0, 10), (60, 1), (120, 10), (221, 10)], True, id="overloaded-after-restart"),
        pytest.param([(0, 10), (150, 10), (200, 1)], False, id="one-below-ends-overload"),
        pytest.param([(0, 10), (150, 10), (200, 1), (250, 10)], False, id="after-reset-not-at-once"),
    ],
)
def test_overload_table(dequeues, overloaded):
    c = feed(codel(), dequeues)
    assert c.overloaded is overloaded
    assert c.max_wait_s() == (TARGET if overloaded else INTERVAL)


def test_overloaded_shrinks_max_wait_to_target():
    c = feed(codel(), [(0, 50), (200, 50)])
    assert c.overloaded
    assert c.max_wait_s() == TARGET


def test_stays_overloaded_while_waits_stay_above_target():
    c = feed(codel(), [(0, 50), (200, 50)])
    for i in range(1, 20):
        c.on_dequeue(50 * MS, T0 + (200 + i) * MS)
        assert c.overloaded


def test_one_wait_below_target_resets():
    c = feed(codel(), [(0, 50), (200, 50)])
    c.on_dequeue(1 * MS, T0 + 0.3)
    assert not c.overloaded
    assert c.first_above_at is None
    assert c.max_wait_s() == INTERVAL


def test_on_empty_resets():
    c = feed(codel(), [(0, 50), (200, 50)])
    assert c.overloaded
    c.on_empty()
    assert not c.overloaded
    assert c.first_above_at is None
    assert c.max_wait_s() == INTERVAL
    # a new standing queue needs a whole interval again
    feed(c, [(300, 50), (350, 50)])
    assert not c.overloaded


def test_on_empty_forgets_a_queue_that_had_not_yet_stood_an_interval():
    c = feed(codel(), [(0, 50)])
    c.on_empty()
    feed(c, [(101, 50)])
    assert not c.overloaded
