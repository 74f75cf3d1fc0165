"""policies/retry.py: RetryBudget (ratio of recent requests plus a floor) and retry_backoff_s."""

from __future__ import annotations

import pytest

from steadyserve.policies.retry import RetryBudget, retry_backoff_s

ALMOST_ONE = 0.9999999999999999  # the largest float below 1.0
T0 = 1000.0


def spend_all(budget: RetryBudget, now: float, limit: int = 10_000) -> int:
    """How many retries the budget grants at `now` before refusing one."""
    granted = 0
    while budget.try_spend(now):
        granted += 1
        assert granted < limit, "budget never runs out"
    return granted


# RetryBudget -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requests", "min_per_s", "retries"),
    [
        pytest.param(0, 0.0, 0, id="no-requests-no-floor"),
        pytest.param(4, 0.0, 0, id="4-requests-fund-0.8-retry"),
        pytest.param(5, 0.0, 1, id="5-requests-fund-1"),
        pytest.param(100, 0.0, 20, id="100-requests-fund-20"),
        pytest.param(1000, 0.0, 200, id="1000-requests-fund-200"),
        pytest.param(0, 1.0, 10, id="floor-only-10-in-10s"),
        pytest.param(100, 1.0, 30, id="ratio-plus-floor"),
        pytest.param(0, 3.0, 30, id="default-floor"),
    ],
)
def test_budget_table(requests, min_per_s, retries):
    b = RetryBudget(ratio=0.2, window_s=10.0, min_per_s=min_per_s)
    for _ in range(requests):
        b.record_request(T0)
    assert spend_all(b, T0) == retries
    assert b.usage(T0) == (requests, retries)


def test_100_requests_allow_20_retries_the_21st_fails():
    b = RetryBudget(ratio=0.2, window_s=10.0, min_per_s=0.0)
    for _ in range(100):
        b.record_request(T0)
    assert all(b.try_spend(T0 + 0.5) for _ in range(20))
    assert not b.try_spend(T0 + 0.5)
    assert not b.try_spend(T0 + 0.9)  # a refusal does not spend
    assert b.usage(T0 + 0.9) == (100, 20)


def test_new_requests_fund_more_retries():
    b = RetryBudget(ratio=0.2, window_s=10.0, min_per_s=0.0)
    for _ in range(10):
        b.record_request(T0)
    assert spend_all(b, T0) == 2
    for _ in range(5):
        b.record_request(T0 + 1.0)
    assert spend_all(b, T0 + 1.0) == 1


@pytest.mark.parametrize(
    ("later", "funded"),
    [
        pytest.param(0.0, 20, id="same-time"),
        pytest.param(9.5, 20, id="within-window"),
        pytest.param(10.5, 0, id="just-past-window"),
        pytest.param(25.0, 0, id="long-past-window"),
        pytest.param(1e6, 0, id="much-later-same-bucket-index"),
    ],
)
def test_requests_older_than_window_no_longer_fund_retries(later, funded):
    b = RetryBudget(ratio=0.2, window_s=10.0, min_per_s=0.0)
    for _ in range(100):
        b.record_request(T0)
    assert spend_all(b, T0 + later) == funded


def test_floor_refills_once_spent_retries_leave_the_window():
    b = RetryBudget(ratio=0.2, window_s=10.0, min_per_s=1.0)
    assert spend_all(b, T0) == 10
    assert spend_all(b, T0 + 9.5) == 0
    assert spend_all(b, T0 + 10.5) == 10
    assert b.usage(T0 + 10.5) == (0, 10)


def test_buckets_roll_over_for_requests_spread_over_15s():
    b = RetryBudget(ratio=0.2, window_s=10.0, min_per_s=0.0)
    for i in range(150):  # 10 requests a second for 15 s
        b.record_request(T0 + i / 10)
    last = T0 + 14.95
    # only the last 10 one-second buckets (5 s .. 15 s) are live
    assert b.usage(last) == (100, 0)
    assert spend_all(b, last) == 20
    assert b.usage(last) == (100, 20)
    # 3 s later, 3 more buckets of requests have left the window, the retries have not
    assert b.usage(last + 3.0) == (70, 20)
    assert not b.try_spend(last + 3.0)


@pytest.mark.parametrize(
    ("buckets", "at", "expected"),
    [
        pytest.param(10, 0.0, (1, 0), id="10-buckets-same-time"),
        pytest.param(10, 9.99, (1, 0), id="10-buckets-before-window-end"),
        pytest.param(10, 10.0, (0, 0), id="10-buckets-at-window-end"),
        pytest.param(1, 9.99, (1, 0), id="1-bucket-before-window-end"),
        pytest.param(1, 10.0, (0, 0), id="1-bucket-at-window-end"),
        pytest.param(100, 9.95, (1, 0), id="100-buckets-before-window-end"),
        pytest.param(100, 10.0, (0, 0), id="100-buckets-at-window-end"),
    ],
)
def test_usage_window_edges(buckets, at, expected):
    b = RetryBudget(ratio=0.2, window_s=10.0, min_per_s=0.0, buckets=buckets)
    b.record_request(T0)
    assert b.usage(T0 + at) == expected


def test_usage_counts_requests_and_retries_separately():
    b = RetryBudget(ratio=0.5, window_s=10.0, min_per_s=0.0)
    for i in range(6):
        b.record_request(T0 + i)
    assert b.try_spend(T0 + 6.0)
    assert b.try_spend(T0 + 7.0)
    assert b.usage(T0 + 7.0) == (6, 2)
    assert b.usage(T0 + 10.5) == (5, 2)  # the request at T0 has left


# retry_backoff_s ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [
        pytest.param(0, 0.005, id="attempt0-base"),
        pytest.param(1, 0.005, id="attempt1-base"),
        pytest.param(2, 0.010, id="attempt2-doubles"),
        pytest.param(3, 0.020, id="attempt3"),
        pytest.param(4, 0.040, id="attempt4"),
        pytest.param(5, 0.050, id="attempt5-capped"),
        pytest.param(30, 0.050, id="attempt30-capped"),
    ],
)
@pytest.mark.parametrize("rand01", [0.0, 0.25, 0.5, ALMOST_ONE], ids=lambda r: f"r={r:.3g}")
def test_backoff_within_zero_and_ceiling(attempt, ceiling, rand01):
    pause = retry_backoff_s(attempt, rand01)
    assert 0.0 <= pause <= ceiling
    assert pause == pytest.approx(ceiling * rand01)


@pytest.mark.parametrize("attempt", [1, 2, 5, 100])
def test_backoff_zero_when_rand_is_zero(attempt):
    assert retry_backoff_s(attempt, 0.0) == 0.0


def test_backoff_grows_with_attempt_then_caps():
    pauses = [retry_backoff_s(n, 0.5, base_s=0.01, cap_s=0.1) for n in range(1, 9)]
    assert pauses == pytest.approx([0.005, 0.01, 0.02, 0.04, 0.05, 0.05, 0.05, 0.05])


@pytest.mark.parametrize("attempt", [1025, 5000])
def test_backoff_stays_capped_for_very_many_attempts(attempt):
    assert retry_backoff_s(attempt, 0.5) == pytest.approx(0.025)
