"""A replica's own metrics (its /metrics; the gateway re-exposes them with replica labels)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ReplicaMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(namespace="steadyserve_replica", registry=self.registry)
        self.batch_size = Histogram(
            "steadyserve_replica_batch_size", "Items per executed batch", ["handler"],
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.batch_duration = Histogram(
            "steadyserve_replica_batch_duration_seconds", "Compute time of one batch",
            ["handler"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge(
            "steadyserve_replica_queue_depth", "Items waiting in the batch queue", ["handler"],
            registry=self.registry,
        )
        self.requests = Counter(
            "steadyserve_replica_requests_total", "Requests handled by the replica",
            ["handler", "code"], registry=self.registry,
        )
        self.stream_items = Counter(
            "steadyserve_replica_stream_items_total", "Items streaming handlers produced",
            ["handler"], registry=self.registry,
        )
        self.inflight = Gauge(
            "steadyserve_replica_inflight_requests", "Requests being handled", registry=self.registry,
        )
        self.invalidations = Counter(
            "steadyserve_replica_invalidated_tags_total",
            "Tags the gateway told this replica to drop from its caches", registry=self.registry,
        )
