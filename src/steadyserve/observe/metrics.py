"""Gateway metrics: every name, label set and bucket declared here, once.

Label hygiene: a label takes a deployment, handler, replica id, outcome or state, never an
address, a port or a pid (those change with every restart and would grow /metrics without
bound). Children labelled with a replica go when the replica is retired
(`forget_replica`), and the connection-pool gauges hold exactly the replicas in rotation
(`set_pools`). A gauge whose value is not known yet (`OptionalGauge`, e.g. the database
before its first check) has no sample rather than a misleading 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

# model latencies run from ~1 ms (cache, echo) to a minute (long generations)
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
REPLICA_STATES = ("starting", "ready", "unhealthy", "backoff", "stopping")
UPSTREAM_LABELS = ("deployment", "replica", "outcome")
POOL_LABELS = ("deployment", "replica", "state")


class OptionalGauge(Collector):
    """A gauge without labels that has no sample until its value is known: an alert rule on
    it then has nothing to fire on, where a default 0 would read as "down"."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.value: float | None = None
        registry.register(self)

    def set(self, value: float) -> None:
        self.value = float(value)

    def clear(self) -> None:
        self.value = None

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        value = self.value
        if value is not None:
            yield GaugeMetricFamily(self.name, self.documentation, value=value)


def _remove_children(metric: MetricWrapperBase, labelnames: tuple[str, ...],
                     match: Mapping[str, str]) -> int:
    """Remove every child of a labelled metric whose labels include `match`; the count."""
    doomed: set[tuple[str, ...]] = set()
    for family in metric.collect():
        for sample in family.samples:
            if all(sample.labels.get(k) == v for k, v in match.items()):
                doomed.add(tuple(sample.labels[n] for n in labelnames))
    for values in doomed:
        try:
            metric.remove(*values)
        except KeyError:  # removed meanwhile by another caller
            pass
    return len(doomed)


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "steadyserve_requests_total",
            "Client requests by outcome class: 2xx, 4xx, 5xx, and deadline (504 when the "
            "client's own X-Request-Timeout-Ms was shorter than the handler needs)",
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
        self._upstream_children: dict[tuple[str, str, str], Any] = {}
        self.upstream = Counter(
            "steadyserve_upstream_attempts_total", "Calls to replicas by outcome",
            UPSTREAM_LABELS, registry=r,
        )
        self.exchanges = Counter(
            "steadyserve_upstream_exchanges_total",
            "HTTP exchanges with replicas for batched handlers (gateway.coalesce: calls started "
            "in one loop turn share one)", registry=r,
        )
        self.exchange_calls = Counter(
            "steadyserve_upstream_exchange_calls_total",
            "Calls those exchanges carried (÷ exchanges: the mean calls per exchange)",
            registry=r,
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
        self.shadow_requests = Counter(
            "steadyserve_shadow_requests_total",
            "Requests mirrored to a deployment's shadow, by outcome (match, mismatch, error, "
            "skipped)", ["deployment", "shadow", "outcome"], registry=r,
        )
        self.shadow_distance = Histogram(
            "steadyserve_shadow_distance",
            "Largest numeric difference between the client's answer and the shadow's",
            ["deployment", "shadow"], registry=r,
            buckets=(0.0, 1e-6, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.stream_first_item = Histogram(
            "steadyserve_stream_first_item_seconds",
            "Time from a streaming request's dispatch to its first item", ["deployment"],
            registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.stream_items = Counter(
            "steadyserve_stream_items_total", "Items streamed to clients", ["deployment"],
            registry=r,
        )
        self.streams_open = Gauge(
            "steadyserve_streams_open", "Streams being sent to clients now", ["deployment"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "steadyserve_generated_tokens_total", "Tokens (items) generated for OpenAI "
            "completions, counted also when the client left", ["deployment"], registry=r,
        )
        self.streams = Counter(
            "steadyserve_streams_total", "Streams by how they ended (complete, error: an "
            "error event after items, cancelled: the client left)", ["deployment", "outcome"],
            registry=r,
        )
        self.shed = Counter(
            "steadyserve_shed_requests_total",
            "Requests rejected by admission control, by rule (gateway.admission.SHED_REASONS)",
            ["deployment", "priority", "reason"], registry=r,
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
        self.autoscale_desired = Gauge(
            "steadyserve_autoscale_desired_replicas",
            "Replicas the autoscaler wants for an autoscaled deployment", ["deployment"],
            registry=r,
        )
        self.autoscale_demand = Gauge(
            "steadyserve_autoscale_demand",
            "Ongoing requests the autoscaler sees (in flight, queued, held for a first replica)",
            ["deployment"], registry=r,
        )
        self.workers_alive = Gauge(
            "steadyserve_gateway_workers",
            "Processes serving the gateway's port: the gateway process and its live workers",
            registry=r,
        )
        self.cluster_leader = Gauge(
            "steadyserve_cluster_leader",
            "1 while this gateway leads the gateways sharing its database ([cluster]), else 0",
            registry=r,
        )
        self.cluster_lease_changes = Counter(
            "steadyserve_cluster_lease_changes_total",
            "Times this gateway became (gained) or stopped being (lost) the leader",
            ["change"], registry=r,
        )
        self.autoscale_panic = Gauge(
            "steadyserve_autoscale_panic",
            "1 while the autoscaler is in panic mode (a burst: scales up at once, never down)",
            ["deployment"], registry=r,
        )
        self.autoscale_decisions = Counter(
            "steadyserve_autoscale_decisions",
            "Replica count changes made by the autoscaler", ["deployment", "direction"],
            registry=r,
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
        self.database_up = OptionalGauge(
            "steadyserve_database_up",
            "1 when the state database answers, 0 after consecutive failed checks; "
            "absent before the first check", r,
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
            POOL_LABELS, registry=r,
        )
        self._pools: set[tuple[str, str]] = set()  # (deployment, replica) with pool gauges
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

    def set_pools(self, pools: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        """(busy, idle) connections per (deployment, replica) in rotation now; the gauges of
        replicas no longer listed are removed."""
        for deployment, replica in self._pools - pools.keys():
            for state in ("busy", "idle"):
                try:
                    self.pool_connections.remove(deployment, replica, state)
                except KeyError:
                    pass
        for (deployment, replica), (busy, idle) in pools.items():
            self.pool_connections.labels(deployment, replica, "busy").set(busy)
            self.pool_connections.labels(deployment, replica, "idle").set(idle)
        self._pools = set(pools)

    def count_upstream(self, deployment: str, replica_id: str, outcome: str) -> None:
        """One attempt to a replica: the child counters are kept at hand (`labels()` costs
        more than the increment on the hot path)."""
        key = (deployment, replica_id, outcome)
        child = self._upstream_children.get(key)
        if child is None:
            child = self._upstream_children[key] = self.upstream.labels(*key)
        child.inc()

    def forget_replica(self, deployment: str, replica_id: str) -> None:
        """A replica was retired (its id will not come back): remove every child labelled with
        it (upstream attempts, pool gauges), so /metrics does not grow with every rollout."""
        match = {"deployment": deployment, "replica": replica_id}
        for key in [k for k in self._upstream_children if k[:2] == (deployment, replica_id)]:
            del self._upstream_children[key]
        _remove_children(self.upstream, UPSTREAM_LABELS, match)
        _remove_children(self.pool_connections, POOL_LABELS, match)
        self._pools.discard((deployment, replica_id))


class JobMetrics:
    """Asynchronous jobs (gateway.jobs), in the registry the runner is given (the gateway's):
    the runs and final states this gateway brought about, every gateway's jobs by state, and
    webhook delivery tries."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.runs = Counter(
            "steadyserve_job_runs_total",
            "Job runs this gateway ended, by outcome (ok, refused, busy, error, late, lost)",
            ["deployment", "outcome"], registry=r,
        )
        self.finished = Counter(
            "steadyserve_jobs_finished_total",
            "Jobs this gateway brought to a final state, by state", ["deployment", "state"],
            registry=r,
        )
        self.jobs = Gauge(
            "steadyserve_jobs", "Jobs in the database by state (every gateway's), refreshed "
            "every few seconds", ["state"], registry=r,
        )
        self.webhooks = Counter(
            "steadyserve_job_webhooks_total",
            "Webhook delivery tries, by outcome (delivered, retry, failed)", ["outcome"],
            registry=r,
        )


class BalancerFitCollector(Collector):
    """The least_squares balancer's per-replica fit, read at scrape time: only replicas in
    rotation have a fit (the balancer forgets the ones that leave), so no retired series."""

    def __init__(self, fits: Callable[[], Mapping[str, Mapping[str, Mapping[str, float]]]]) -> None:
        self.fits = fits  # {deployment: {replica: {term: value, "samples": n}}}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "steadyserve_balancer_fit_seconds",
            "least_squares balancer: latency ≈ base_s + per_kib_s × request KiB + "
            "per_outstanding_s × requests outstanding, fitted per replica",
            labels=["deployment", "replica", "term"])
        for deployment, replicas in self.fits().items():
            for replica, terms in replicas.items():
                for term, value in terms.items():
                    if term != "samples":
                        g.add_metric([deployment, replica, term], value)
        yield g

