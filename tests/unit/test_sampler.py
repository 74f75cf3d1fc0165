"""observe/sampler.py: the registry becomes series; creation timestamps are skipped."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from steadyserve.observe.metrics import OptionalGauge
from steadyserve.observe.sampler import sample_registry
from steadyserve.observe.timeseries import SeriesStore, series_key


def test_every_steadyserve_sample_becomes_a_point():
    registry = CollectorRegistry()
    requests = Counter("steadyserve_requests_total", "r", ["deployment", "code"], registry=registry)
    latency = Histogram("steadyserve_latency_seconds", "l", ["deployment"], buckets=(0.1, 1),
                        registry=registry)
    Counter("other_total", "not ours", registry=registry).inc()
    store = SeriesStore()
    requests.labels("a", "2xx").inc(3)
    latency.labels("a").observe(0.5)
    sample_registry(registry, store, 1000.0)
    requests.labels("a", "2xx").inc(2)
    sample_registry(registry, store, 1001.0)
    key = series_key("steadyserve_requests_total", {"deployment": "a", "code": "2xx"})
    assert store.latest(key) == 5
    assert store.increase(key, 1.0, 1001.0) == 2
    bucket = series_key("steadyserve_latency_seconds_bucket", {"deployment": "a", "le": "1.0"})
    assert store.latest(bucket) == 1
    assert "other_total" not in store.names()
    assert not [n for n in store.names() if n.endswith("_created")]


def test_a_gauge_not_known_yet_has_no_point():
    registry = CollectorRegistry()
    up = OptionalGauge("steadyserve_thing_up", "1 when the thing answers", registry)
    store = SeriesStore()
    sample_registry(registry, store, 1000.0)
    assert store.keys("steadyserve_thing_up") == []
    up.set(0)
    sample_registry(registry, store, 1001.0)
    assert store.latest(series_key("steadyserve_thing_up")) == 0
