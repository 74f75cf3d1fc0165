"""Gateway metrics: every name, label set and bucket declared here, once."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

# model latencies run from ~1 ms (cache, echo) to a minute (long generations)
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
REPLICA_STATES = ("starting", "ready", "unhealthy", "backoff", "stopping")


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "steadyserve_requests_total", "Client requests by outcome class",
            ["deployment", "handler", "code"], registry=r,
        )
        self.errors = Counter(
            "steadyserve_request_errors_total", "Client requests that failed, by error code",
            ["deployment", "handler", "error"], registry=r,
        )
        self.duration = Histogram(
            "steadyserve_request_duration_seconds", "Gateway request latency",
            ["deployment", "handler"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inflight = Gauge(
            "steadyserve_inflight_requests", "Requests in the gateway now", ["deployment"],
            registry=r,
        )
        self.upstream = Counter(
            "steadyserve_upstream_attempts_total", "Calls to replicas by outcome",
            ["deployment", "replica", "outcome"], registry=r,
        )
        self.retries = Counter(
            "steadyserve_upstream_retries_total", "Attempts retried on another replica",
            ["deployment"], registry=r,
        )
        self.hedges = Counter(
            "steadyserve_upstream_hedges_total", "Second attempts sent after the p95 delay",
            ["deployment"], registry=r,
        )
        self.budget_exhausted = Counter(
            "steadyserve_retry_budget_exhausted_total", "Retries not sent: the budget was spent",
            ["deployment"], registry=r,
        )
        self.outlier_events = Counter(
            "steadyserve_outlier_events_total", "Replicas ejected from / returned to rotation",
            ["deployment", "event"], registry=r,
        )
        self.shed = Counter(
            "steadyserve_shed_requests_total", "Requests rejected by admission control",
            ["deployment", "priority"], registry=r,
        )
        self.poison_stops = Counter(
            "steadyserve_poison_stops_total",
            "Requests not retried further because two replicas died holding them",
            ["deployment"], registry=r,
        )
        self.quarantined = Counter(
            "steadyserve_quarantined_inputs_total", "Inputs quarantined after crashing replicas",
            ["deployment"], registry=r,
        )
        self.admission_limit = Gauge(
            "steadyserve_admission_limit", "Adaptive concurrency limit", ["deployment"], registry=r,
        )
        self.admission_inflight = Gauge(
            "steadyserve_admission_inflight", "Requests holding an admission slot", ["deployment"],
            registry=r,
        )
        self.admission_queued = Gauge(
            "steadyserve_admission_queued", "Requests waiting for an admission slot",
            ["deployment"], registry=r,
        )
        self.replicas = Gauge(
            "steadyserve_replicas", "Replicas by lifecycle state", ["deployment", "state"],
            registry=r,
        )
        self.restarts = Counter(
            "steadyserve_replica_restarts_total", "Replica processes restarted after exiting",
            ["deployment"], registry=r,
        )
        self.loop_lag = Gauge(
            "steadyserve_event_loop_lag_seconds", "Worst event-loop lag of the last second",
            registry=r,
        )
        self.database_up = Gauge(
            "steadyserve_database_up", "1 when the state database answers, else 0", registry=r,
        )
        self.alerts_firing = Gauge(
            "steadyserve_alerts_firing", "Alerts firing now", ["severity"], registry=r,
        )
        self.actions = Counter(
            "steadyserve_automatic_actions_total", "Automatic responses by action and outcome",
            ["action", "outcome"], registry=r,
        )
        self.notifications = Counter(
            "steadyserve_alert_notifications_total", "Notifications handed to the notifiers",
            registry=r,
        )
        self.pool_connections = Gauge(
            "steadyserve_upstream_connections", "Keep-alive connections to replicas by state",
            ["replica", "state"], registry=r,
        )
        self.response_bytes = Counter(
            "steadyserve_response_bytes_total", "Response body bytes sent, by content encoding",
            ["encoding"], registry=r,
        )
        # response cache: per item of a request (a batched request has several);
        # result = hit | stale (served while revalidating) | stale_if_error | miss | coalesced
        self.cache_items = Counter(
            "steadyserve_cache_items_total", "Cacheable items by how the response cache answered",
            ["deployment", "handler", "result"], registry=r,
        )
        self.cache_lookups = Counter(
            "steadyserve_cache_lookups_total", "Cache lookups per level (l1, l2) and result",
            ["level", "result"], registry=r,
        )
        # the rest (bytes, entries, evictions, admission rejections, L2 state, hit-ratio
        # curve) is read from the cache at scrape time by cache.tiered.CacheCollector
