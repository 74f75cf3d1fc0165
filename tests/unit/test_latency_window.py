"""policies/latency.py: LatencyWindow, a sliding window of latencies with cheap quantiles."""

from __future__ import annotations

import pytest

from steadyserve.policies.latency import LatencyWindow


def filled(values, **kwargs) -> LatencyWindow:
    w = LatencyWindow(**kwargs)
    for v in values:
        w.add(float(v))
    return w


@pytest.mark.parametrize("n", [0, 1, 5, 9])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.99, 1.0])
def test_none_below_10_samples(n, q):
    assert filled(range(1, n + 1)).quantile(q) is None


@pytest.mark.parametrize("q", [0.0, 0.5, 0.99, 1.0])
def test_a_value_from_10_samples(q):
    w = filled(range(1, 11))
    assert w.quantile(q) in [float(v) for v in range(1, 11)]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        pytest.param(0.5, 50, id="p50"),
        pytest.param(0.95, 95, id="p95"),
        pytest.param(0.99, 99, id="p99"),
    ],
)
@pytest.mark.parametrize(
    "order",
    [
        pytest.param(lambda v: v, id="ascending"),
        pytest.param(lambda v: v[::-1], id="descending"),
        pytest.param(lambda v: v[::2] + v[1::2], id="interleaved"),
    ],
)
def test_quantiles_of_1_to_100_within_one_rank(q, expected, order):
    w = filled(order(list(range(1, 101))), refresh_every=1)
    assert abs(w.quantile(q) - expected) <= 1


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        pytest.param(0.0, 1.0, id="min"),
        pytest.param(1.0, 100.0, id="max"),
    ],
)
def test_extreme_quantiles_are_min_and_max(q, expected):
    assert filled(range(1, 101), refresh_every=1).quantile(q) == expected


def test_quantiles_are_monotonic_in_q():
    w = filled([(i * 37) % 101 for i in range(200)])
    qs = [w.quantile(i / 20) for i in range(21)]
    assert qs == sorted(qs)


def test_window_forgets_old_samples():
    w = filled([1.0] * 50 + [0.01] * 50, size=50, refresh_every=1)
    assert w.quantile(0.99) == 0.01
    assert w.quantile(0.0) == 0.01


def test_window_keeps_the_newest_size_samples():
    w = filled(range(1, 131), size=50, refresh_every=1)  # keeps 81..130
    assert w.quantile(0.0) == 81.0
    assert w.quantile(1.0) == 130.0


@pytest.mark.parametrize("refresh_every", [1, 8, 32])
def test_quantiles_lag_at_most_refresh_every_samples(refresh_every):
    """Quantiles are recomputed every `refresh_every` samples: a change in latency shows
    within that many samples after the window has turned over."""
    w = filled([1.0] * 50, size=50, refresh_every=refresh_every)
    for _ in range(50):
        w.add(0.01)
    for _ in range(refresh_every):
        w.add(0.01)
    assert w.quantile(0.99) == 0.01


def test_default_window_forgets_within_size_plus_refresh():
    w = LatencyWindow(size=50)  # default refresh_every (32)
    for _ in range(50):
        w.add(1.0)
    for _ in range(50 + w.refresh_every):
        w.add(0.01)
    assert w.quantile(0.99) == 0.01


def test_every_sample_counts_while_the_window_is_small():
    w = LatencyWindow()  # refresh_every 32: the first 32 samples are always fresh
    for i in range(1, 21):
        w.add(float(i))
    assert w.quantile(1.0) == 20.0
    assert w.quantile(0.0) == 1.0
