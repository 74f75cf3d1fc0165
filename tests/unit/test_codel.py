"""policies/codel.py: CoDel for one class of the gateway's wait queue."""

from __future__ import annotations

import pytest

from steadyserve.policies.codel import CoDel

MS = 0.001
T0 = 1000.0
TARGET = 5 * MS
INTERVAL = 100 * MS


def codel() -> CoDel:
    return CoDel(target_s=TARGET, interval_s=INTERVAL)


def feed(c: CoDel, waits: list[tuple[float, float]]) -> CoDel:
    """Waits as (ms after T0, waited ms)."""
    for at_ms, waited_ms in waits:
        c.on_enqueue()
        c.on_wait(waited_ms * MS, T0 + at_ms * MS)
    return c


def test_fresh_codel_is_calm():
    c = codel()
    assert not c.overloaded
    assert c.max_wait_s(T0) == INTERVAL


@pytest.mark.parametrize(
    ("waits", "overloaded"),
    [
        pytest.param([(0, 1), (50, 2), (150, 4.9), (500, 0)], False, id="all-below-target"),
        pytest.param([(0, 10)], False, id="one-above"),
        pytest.param([(0, 10), (50, 10), (99, 10)], False, id="above-for-less-than-interval"),
        pytest.param([(0, 10), (100.5, 10)], True, id="above-for-an-interval"),
        pytest.param([(0, 10), (50, 10), (250, 10)], True, id="above-for-longer"),
        pytest.param([(0, 5), (101, 5)], True, id="exactly-target-counts-as-above"),
        pytest.param([(0, 10), (60, 1), (120, 10)], False, id="dip-below-restarts-the-clock"),
        pytest.param([(0, 10), (60, 1), (120, 10), (221, 10)], True, id="overloaded-after-restart"),
        pytest.param([(0, 10), (150, 10), (200, 1)], True, id="short-waits-do-not-end-overload"),
    ],
)
def test_overload_table(waits, overloaded):
    c = feed(codel(), waits)
    assert c.overloaded is overloaded
    assert c.max_wait_s(T0 + 0.3) == (TARGET if overloaded else INTERVAL)


def test_stays_overloaded_while_the_queue_keeps_filling():
    c = feed(codel(), [(0, 50), (200, 50)])
    for i in range(1, 50):
        now = T0 + (200 + 3 * i) * MS
        c.on_enqueue()
        c.on_wait(1 * MS, now)  # admitted fast: in overload every admitted wait is short
        c.on_empty(now)  # the queue empties for a moment between arrivals…
        assert c.overloaded  # …which is not a calm interval
        assert c.max_wait_s(now) == TARGET


def test_an_empty_interval_ends_overload():
    c = feed(codel(), [(0, 50), (200, 50)])
    c.on_empty(T0 + 0.3)
    assert c.overloaded
    c.on_empty(T0 + 0.3 + INTERVAL)
    assert not c.overloaded
    assert c.first_above_at is None
    assert c.max_wait_s(T0 + 0.5) == INTERVAL


def test_max_wait_notices_a_calm_interval_by_itself():
    c = feed(codel(), [(0, 50), (200, 50)])
    c.on_empty(T0 + 0.3)
    assert c.max_wait_s(T0 + 0.35) == TARGET
    assert c.max_wait_s(T0 + 0.3 + INTERVAL) == INTERVAL


def test_an_arrival_interrupts_the_calm_stretch():
    c = feed(codel(), [(0, 50), (200, 50)])
    c.on_empty(T0 + 0.3)
    c.on_enqueue()
    c.on_empty(T0 + 0.35)
    c.on_empty(T0 + 0.44)  # only 90 ms empty since the last arrival
    assert c.overloaded
