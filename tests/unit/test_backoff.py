"""policies/backoff.py: exponential restart backoff with half jitter."""

from __future__ import annotations

import pytest

from steadyserve.policies.backoff import Backoff

ALMOST_ONE = 0.9999999999999999  # the largest float below 1.0


@pytest.mark.parametrize(
    ("backoff", "attempt", "ceiling"),
    [
        pytest.param(Backoff(), 0, 0.5, id="attempt0-is-base"),
        pytest.param(Backoff(), 1, 1.0, id="attempt1-doubles"),
        pytest.param(Backoff(), 2, 2.0, id="attempt2"),
        pytest.param(Backoff(), 5, 16.0, id="attempt5"),
        pytest.param(Backoff(), 6, 30.0, id="attempt6-capped"),
        pytest.param(Backoff(), 50, 30.0, id="attempt50-capped"),
        pytest.param(Backoff(), -3, 0.5, id="negative-attempt-is-base"),
        pytest.param(Backoff(base_s=1.0, cap_s=10.0, multiplier=3.0), 2, 9.0, id="custom-multiplier"),
        pytest.param(Backoff(base_s=1.0, cap_s=10.0, multiplier=3.0), 3, 10.0, id="custom-capped"),
    ],
)
def test_ceiling(backoff, attempt, ceiling):
    assert backoff.ceiling(attempt) == pytest.approx(ceiling)


@pytest.mark.parametrize("attempt", [0, 1, 3, 6, 20])
@pytest.mark.parametrize("rand01", [0.0, 0.25, 0.5, 0.75, ALMOST_ONE], ids=lambda r: f"r={r:.3g}")
def test_delay_within_half_ceiling_and_ceiling(attempt, rand01):
    b = Backoff()
    c = b.ceiling(attempt)
    d = b.delay(attempt, rand01)
    assert c / 2 <= d <= c
    assert d == pytest.approx(c / 2 + c / 2 * rand01)


@pytest.mark.parametrize(
    ("attempt", "rand01", "expected"),
    [
        pytest.param(0, 0.0, 0.25, id="attempt0-r0-half-base"),
        pytest.param(0, ALMOST_ONE, 0.5, id="attempt0-r1-full-base"),
        pytest.param(3, 0.0, 2.0, id="attempt3-r0"),
        pytest.param(3, 0.5, 3.0, id="attempt3-r-half"),
        pytest.param(10, 0.0, 15.0, id="capped-r0-half-cap"),
        pytest.param(10, ALMOST_ONE, 30.0, id="capped-r1-cap"),
    ],
)
def test_delay_edges(attempt, rand01, expected):
    assert Backoff().delay(attempt, rand01) == pytest.approx(expected)


def test_delay_never_exceeds_cap_with_rand_just_below_one():
    assert Backoff().delay(100, ALMOST_ONE) <= 30.0


def test_delays_grow_then_plateau_for_a_fixed_random_sequence():
    rands = iter([0.0] * 10)
    b = Backoff()
    delays = [b.delay(i, next(rands)) for i in range(10)]
    assert delays == sorted(delays)
    assert delays[:4] == pytest.approx([0.25, 0.5, 1.0, 2.0])
    assert delays[-1] == pytest.approx(15.0)


@pytest.mark.parametrize("attempt", [1024, 5000])
def test_ceiling_stays_capped_for_very_many_attempts(attempt):
    assert Backoff().ceiling(attempt) == 30.0
    assert 15.0 <= Backoff().delay(attempt, 0.5) <= 30.0
