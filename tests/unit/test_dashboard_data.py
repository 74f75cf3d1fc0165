"""dashboard.data: the counters a refresh carries, the history from the series store per
step (rates per deployment, 5xx apart, a counter reset counted as Prometheus does; p50/p95/p99
from the latency histogram's bucket increases summed over handlers; a gap where the gateway
was down; long windows in wider steps), and the replicas' batch sizes read from their merged
/metrics (summed over replicas, held 5 s)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from steadyserve.dashboard.data import (
    Periodic,
    batch_sizes,
    cache_levels,
    history,
    replica_counts,
    snapshot,
)
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


T0 = 1_700_000_040.0  # on a minute
OK = [("deployment", "m"), ("code", "2xx"), ("handler", "h")]
BAD = [("deployment", "m"), ("code", "5xx"), ("handler", "h")]


def test_history_rates_per_minute_across_a_reset():
    store = SeriesStore()
    total = 0.0
    for minute in range(6):
        t = T0 + 60 * minute + 30
        total = 0.0 if minute == 3 else total + 600  # 10 req/s; the gateway restarted at 3
        store.record("steadyserve_requests_total", OK, total, t)
        store.record("steadyserve_requests_total", BAD, 60.0 * (minute + 1), t)  # 1/s of 5xx
    rows = history(store, T0 + 360, 20)["m"]  # over the raw tier's 10 min: per minute
    # each step's end; the first minute's points are a baseline (the store's first
    # recording: how much they grew in that minute is not known), so no row
    assert [r[0] for r in rows] == [T0 + 60 * (m + 1) for m in range(1, 6)]
    rates = [r[1] for r in rows]
    assert rates == [11.0, 11.0, 1.0, 11.0, 11.0]  # 10 ok + 1 error per second
    assert rates[2] == 1.0  # the reset minute: the new value (0) is its increase
    assert all(r[2] == 1.0 for r in rows)
    assert all(r[3:] == [None, None, None] for r in rows)  # no latency histogram here


def record_latency(store: SeriesStore, t: float, counts: dict[str, float], handler: str = "h"
                   ) -> None:
    """Cumulative bucket counts of the request-duration histogram (le → count)."""
    for le, n in counts.items():
        store.record("steadyserve_request_duration_seconds_bucket",
                     {"deployment": "m", "handler": handler, "le": le}, n, t)


def test_history_has_latency_percentiles_per_step_summed_over_handlers():
    store = SeriesStore()
    cum_a = {"0.01": 0.0, "0.1": 0.0, "1": 0.0, "+Inf": 0.0}
    cum_b = dict(cum_a)
    for minute in range(4):
        t = T0 + 60 * minute + 30
        # handler a: 100 fast answers a minute (under 10 ms); b: 100 at 0.1-1 s from minute 2
        cum_a = {le: n + 100 for le, n in cum_a.items()}
        if minute >= 2:
            cum_b = {"0.01": 0.0, "0.1": 0.0, "1": cum_b["1"] + 100, "+Inf": cum_b["+Inf"] + 100}
        store.record("steadyserve_requests_total", OK, 100.0 * (minute + 1), t)
        record_latency(store, t, cum_a, "a")
        record_latency(store, t, cum_b, "b")
    rows = history(store, T0 + 240, 30)["m"]
    assert len(rows) == 3  # (the first minute is the baseline)
    _, _, _, p50, p95, p99 = rows[0]
    assert p50 == 5.0 and p99 == 9.9  # linear in (0, 10 ms]
    _, _, _, p50, p95, p99 = rows[2]  # half fast, half slow
    assert p50 == 10.0 and p95 == 910.0 and p99 == 982.0


def test_history_shows_a_gap_where_the_gateway_was_down_and_widens_long_windows():
    store = SeriesStore()
    for minute in (0, 1, 2, 7, 8):  # down for minutes 3 to 6
        total = 60.0 * (minute + 1) if minute < 3 else 60.0 * (minute - 6)
        store.record("steadyserve_requests_total", OK, total, T0 + 60 * minute + 30)
    rows = history(store, T0 + 540, 30)["m"]
    assert [r[0] - T0 for r in rows] == [120, 180, 240, 480, 540]
    assert rows[2][1:] == [None] * 5  # one row of nulls: the chart breaks its line there
    assert rows[3][1] == 1.0  # the first minute after the restart counts from 0
    for minute in range(9, 3000):
        store.record("steadyserve_requests_total", OK, 60.0 * (minute - 6), T0 + 60 * minute + 30)
    days = history(store, T0 + 60 * 3000, 3 * 24 * 60, max_points=720)["m"]
    assert len(days) <= 720 and days[-1][0] - days[-2][0] == 360  # 6-minute steps
    assert days[-1][1] == 1.0


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


def test_replica_counts_actual_against_target():
    replicas = [{"state": "ready"}, {"state": "starting"}, {"state": "backoff"},
                {"state": "unhealthy"}, {"state": "ready", "retiring": True},
                {"state": "stopping"}]
    assert replica_counts(replicas, 3) == {"target": 3, "actual": 4, "ready": 1,
                                           "starting": 1, "unhealthy": 2, "draining": 2}
    assert replica_counts([], 0)["actual"] == 0


def test_cache_hit_ratio_per_level():
    r = CollectorRegistry()
    c = Counter("steadyserve_cache_lookups_total", "", ["level", "result"], registry=r)
    c.labels("l1", "hit").inc(6)
    c.labels("l1", "stale").inc(2)  # served: a hit
    c.labels("l1", "miss").inc(2)
    c.labels("l2", "miss").inc(2)
    c.labels("l2", "weird").inc(5)  # not a lookup result: left out
    assert cache_levels(r.collect()) == {
        "l1": {"hit": 6.0, "stale": 2.0, "miss": 2.0, "hit_ratio": 0.8},
        "l2": {"hit": 0.0, "stale": 0.0, "miss": 2.0, "hit_ratio": 0.0}}
    assert cache_levels(CollectorRegistry().collect()) == {}
