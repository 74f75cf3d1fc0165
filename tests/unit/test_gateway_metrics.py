"""observe/metrics.py: label hygiene. Pool gauges hold exactly the replicas listed; a retired
replica's children go, everyone else's stay."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from steadyserve.observe.metrics import GatewayMetrics


def children(m: GatewayMetrics, name: str) -> set[tuple[str, ...]]:
    text = generate_latest(m.registry).decode()
    return {tuple(v for _, v in sorted(s.labels.items()))
            for f in text_string_to_metric_families(text) for s in f.samples if s.name == name}


def test_set_pools_keeps_exactly_the_listed_replicas():
    m = GatewayMetrics()
    m.set_pools({("d", "d-0"): (1, 2), ("d", "d-1"): (0, 1)})
    m.set_pools({("d", "d-1"): (3, 0), ("e", "e-0"): (0, 0)})
    # labels sorted by name: (deployment, replica, state)
    assert children(m, "steadyserve_upstream_connections") == {
        ("d", "d-1", "busy"), ("d", "d-1", "idle"), ("e", "e-0", "busy"), ("e", "e-0", "idle")}
    m.set_pools({})
    assert children(m, "steadyserve_upstream_connections") == set()


def test_forget_replica_removes_only_that_replicas_children():
    m = GatewayMetrics()
    for replica in ("d-0", "d-1"):
        for outcome in ("ok", "5xx", "timeout"):
            m.upstream.labels("d", replica, outcome).inc()
    m.upstream.labels("e", "d-0", "ok").inc()  # another deployment's replica of the same name
    m.set_pools({("d", "d-0"): (1, 1), ("d", "d-1"): (1, 1)})
    m.forget_replica("d", "d-0")
    assert children(m, "steadyserve_upstream_attempts_total") == {
        ("d", "ok", "d-1"), ("d", "5xx", "d-1"), ("d", "timeout", "d-1"), ("e", "ok", "d-0")}
    assert {c[1] for c in children(m, "steadyserve_upstream_connections")} == {"d-1"}
    m.forget_replica("d", "never-existed")  # a no-op
    m.set_pools({("d", "d-1"): (1, 1)})  # the forgotten one is not removed twice
    assert {c[1] for c in children(m, "steadyserve_upstream_connections")} == {"d-1"}
