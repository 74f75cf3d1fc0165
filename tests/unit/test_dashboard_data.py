"""dashboard.data: the counters a refresh carries, the per-minute history from the series
store (rates per deployment, 5xx apart, a counter reset counted as Prometheus does), and the
replicas' batch sizes read from their merged /metrics (summed over replicas, held 5 s)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from steadyserve.dashboard.data import Periodic, batch_sizes, history, snapshot
from steadyserve.observe.aggregate import merge_replica_metrics
from steadyserve.observe.timeseries import SeriesStore
from steadyserve.replica.metrics import ReplicaMetrics


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


def replica_text(batches: dict[str, list[int]]) -> bytes:
    """One replica's /metrics after these batches (sizes) per handler."""
    m = ReplicaMetrics()
    for handler, sizes in batches.items():
        child = m.batch_size.labels(handler)  # a batched handler has its series from the start
        for n in sizes:
            child.observe(n)
    return generate_latest(m.registry)


def test_batch_sizes_sum_the_replicas_of_each_deployment():
    merged = merge_replica_metrics({
        ("emb", "emb-0"): replica_text({"embed": [1, 3, 8], "idle": []}),
        ("emb", "emb-1"): replica_text({"embed": [3, 200]}),
        ("other", "other-0"): replica_text({"embed": [2]}),
    })
    got = batch_sizes(merged)
    embed = got["emb"]["embed"]
    assert (embed["batches"], embed["items"], embed["mean"]) == (5.0, 215.0, 43.0)
    assert list(embed["buckets"]) == ["1", "2", "4", "8", "16", "32", "64", "128", "256", "512",
                                      "+Inf"]  # sorted by bound, written as people write them
    assert embed["buckets"]["1"] == 1 and embed["buckets"]["2"] == 1
    assert embed["buckets"]["4"] == 3 and embed["buckets"]["8"] == 4  # cumulative
    assert embed["buckets"]["128"] == 4 and embed["buckets"]["256"] == 5
    assert embed["buckets"]["+Inf"] == 5
    assert got["emb"]["idle"] == {"batches": 0.0, "items": 0.0, "mean": None,
                                  "buckets": dict.fromkeys(embed["buckets"], 0.0)}
    assert got["other"]["embed"]["mean"] == 2.0


@pytest.mark.parametrize("text", [
    b"", "", b"\xff\xfe not text", "steadyserve_replica_batch_size_count{handler=",
    "# TYPE steadyserve_replica_batch_size histogram\nsteadyserve_replica_batch_size_count 3\n",
    'steadyserve_replica_batch_size_bucket{deployment="d",handler="h",le="x"} 1\n',
    'steadyserve_replica_batch_duration_seconds_count{deployment="d",handler="h"} 4\n',
], ids=["empty-bytes", "empty", "not-utf8", "truncated", "no-labels", "bad-le", "other-family"])
def test_batch_sizes_of_text_without_usable_samples(text):
    got = batch_sizes(text)
    assert all(h["batches"] == 0 for d in got.values() for h in d.values())


def test_batch_sizes_are_held_for_their_refresh_time():
    held: Periodic[dict[str, dict[str, object]]] = Periodic({}, refresh_s=5.0)
    assert held.stale(0.0) and held.value == {}
    held.keep({"d": {}}, 100.0)
    assert not held.stale(100.0) and not held.stale(104.9)
    assert held.stale(105.0) and held.value == {"d": {}}
    assert Periodic(0, 1.0).at == -math.inf
