"""`steadyserve top`'s figures from two scrapes (pure): rates, latency quantiles from bucket
deltas, cache hit ratio. (Every command's help and errors: test_cli_main.py.)"""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from steadyserve.cli.top import quantile, rows, snapshot


def scrape(requests: int, errors: int, latencies: list[float], hits: int, items: int) -> str:
    r = CollectorRegistry()
    c = Counter("steadyserve_requests_total", "", ["deployment", "handler", "code"], registry=r)
    c.labels("m", "h", "2xx").inc(requests - errors)
    c.labels("m", "h", "5xx").inc(errors)
    h = Histogram("steadyserve_request_duration_seconds", "", ["deployment", "handler"],
                  buckets=(0.01, 0.1, 1.0), registry=r)
    for v in latencies:
        h.labels("m", "h").observe(v)
    Gauge("steadyserve_admission_limit", "", ["deployment"], registry=r).labels("m").set(32)
    cache = Counter("steadyserve_cache_items_total", "", ["deployment", "handler", "result"],
                    registry=r)
    cache.labels("m", "h", "hit").inc(hits)
    cache.labels("m", "h", "miss").inc(items - hits)
    return generate_latest(r).decode()


def test_rates_and_quantiles_over_the_interval():
    before = snapshot(scrape(100, 1, [0.005] * 100, 10, 20))
    after = snapshot(scrape(300, 5, [0.005] * 100 + [0.05] * 100 + [0.5] * 100, 70, 120))
    [row] = rows(before, after, 2.0, {"m": (2, 3)})
    assert row["rps"] == 100 and row["errors_per_s"] == 2
    assert (row["ready"], row["desired"], row["limit"]) == (2, 3, 32)
    # 200 new observations: half in (0.01, 0.1], half in (0.1, 1]
    assert row["p50_ms"] == pytest.approx(100.0)
    assert 900 < row["p99_ms"] <= 1000
    assert row["cache_hit_ratio"] == pytest.approx(0.6)


def test_no_traffic_no_figures():
    snap = snapshot(scrape(10, 0, [0.1], 0, 0))
    [row] = rows(snap, snap, 1.0, {"m": (1, 1), "idle": (0, 0)})[:1]
    assert row["rps"] == 0 and row["p50_ms"] is None and row["cache_hit_ratio"] is None


@pytest.mark.parametrize(("deltas", "q", "want"), [
    ({0.1: 0, 1.0: 0, math.inf: 0}, 0.5, None),
    ({0.1: 10, 1.0: 10, math.inf: 10}, 0.5, 0.05),
    ({0.1: 0, 1.0: 10, math.inf: 10}, 0.5, 0.55),
    ({0.1: 0, 1.0: 0, math.inf: 10}, 0.99, 1.0),  # beyond the last bound: its lower edge
])
def test_quantile(deltas, q, want):
    got = quantile(deltas, q)
    assert got == want if want is None else got == pytest.approx(want)
