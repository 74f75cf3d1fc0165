"""dashboard.data: the counters a refresh carries, and the per-minute history from the series
store (rates per deployment, 5xx apart, a counter reset counted as Prometheus does)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from steadyserve.dashboard.data import history, snapshot
from steadyserve.observe.timeseries import SeriesStore


def test_snapshot_sums_handlers_and_keeps_gauges():
    r = CollectorRegistry()
    c = Counter("steadyserve_requests_total", "", ["deployment", "handler", "code"], registry=r)
    c.labels("m", "a", "2xx").inc(5)
    c.labels("m", "b", "2xx").inc(2)
    c.labels("m", "a", "5xx").inc(1)
    Histogram("steadyserve_request_duration_seconds", "", ["deployment", "handler"],
              buckets=(0.1,), registry=r).labels("m", "a").observe(0.05)
    Gauge("steadyserve_admission_limit", "", ["deployment"], registry=r).labels("m").set(8)
    Gauge("steadyserve_replicas", "", ["deployment", "state"], registry=r).labels(
        "m", "ready").set(2)
    snap = snapshot(r.collect())["m"]
    assert snap["requests"] == {"2xx": 7.0, "5xx": 1.0}
    assert snap["buckets"] == {"0.1": 1.0, "+Inf": 1.0}
    assert snap["limit"] == 8 and snap["replicas"] == {"ready": 2.0}


def test_history_rates_per_minute_across_a_reset():
    store = SeriesStore()
    t0 = 1_700_000_000.0
    ok = [("deployment", "m"), ("code", "2xx"), ("handler", "h")]
    bad = [("deployment", "m"), ("code", "5xx"), ("handler", "h")]
    total = 0.0
    for minute in range(6):
        t = t0 + 60 * minute
        total = 0.0 if minute == 3 else total + 600  # 10 req/s; the gateway restarted at 3
        store.record("steadyserve_requests_total", ok, total, t)
        store.record("steadyserve_requests_total", bad, 60.0 * minute, t)  # 1 req/s of 5xx
    rows = history(store, t0 + 300, 10)["m"]
    assert len(rows) == 5
    rates = [r[1] for r in rows]
    assert rates[0] == rates[1] == rates[3] == rates[4] == 11.0  # 10 ok + 1 error per second
    assert rates[2] == 1.0  # the reset minute: the new value (0) is its increase
    assert all(r[2] == 1.0 for r in rows)
