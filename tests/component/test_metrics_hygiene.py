"""What /metrics and the SLO are made of: only inference requests count; no label takes an
address and retired replicas leave no series (the series count stays constant across
restarts and retirements); replica metrics are merged off the event loop and bounded; the
silence API keeps to its limits."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from steadyserve import codec
from steadyserve.config import AlertingConfig, Config, DeploymentConfig
from steadyserve.gateway import app as app_module
from steadyserve.gateway.app import Gateway
from steadyserve.gateway.membership import Endpoint
from steadyserve.gateway.transport import Address, InProcessTransport, Reply
from steadyserve.observe.alerting import AlertEngine
from steadyserve.replica.server import ReplicaApp
from steadyserve.service import handler_specs
from steadyserve.testing import start_inprocess

from .conftest import admin_headers
from .services import Echo


def samples(registry_text: str, name: str) -> dict[tuple[str, ...], float]:
    """{label values (sorted by label name): value} of one sample name."""
    out = {}
    for family in text_string_to_metric_families(registry_text):
        for s in family.samples:
            if s.name == name:
                out[tuple(v for _, v in sorted(s.labels.items()))] = s.value
    return out


def series_count(text: str) -> int:
    return sum(len(f.samples) for f in text_string_to_metric_families(text))


async def test_only_inference_requests_count_toward_the_slo():
    # "idle" never gets a replica: /readyz answers 503, as while a gateway starts
    config = Config(deployments=(DeploymentConfig(name="echo", service="tests:Echo"),
                                 DeploymentConfig(name="idle", service="tests:Echo")))
    gw = Gateway(config, transport=InProcessTransport())
    echo = await start_inprocess(gw, "echo", Echo)
    headers = admin_headers(gw)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw), base_url="http://localhost") as c:
        try:
            for _ in range(5):
                r = await c.get("/readyz")
                assert r.status_code == 503 and "idle" in r.json()["reason"]
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/metrics", headers=headers)).status_code == 200
            assert (await c.get("/no/such/route")).status_code == 404
            assert (await c.delete("/v1/deployments/echo/echo")).status_code == 405
            r = await c.post("/v1/deployments/ghost/echo", json={"text": "x"}, headers=headers)
            assert r.status_code == 404  # an inference route, but no such deployment
            r = await c.post("/v1/silences", json={"matchers": {"a": "b"}, "duration_s": 600},
                             headers=headers)
            assert r.status_code == 404  # admin route; alerting is off on this gateway
            # inference calls count, failures included
            r = await c.post("/v1/deployments/idle/echo", json={"text": "x"}, headers=headers)
            assert r.status_code == 503
            r = await c.post("/v1/deployments/echo/echo", json={"text": "x"}, headers=headers)
            assert r.status_code == 200
            text = (await c.get("/metrics", headers=headers)).text
        finally:
            await echo.stop()
    # labels sorted by name: (code, deployment, handler)
    assert samples(text, "steadyserve_requests_total") == {
        ("2xx", "echo", "echo"): 1.0,
        ("5xx", "echo", "echo"): 0.0,  # created with the first request, so rate() sees the first error
        ("5xx", "idle", "-"): 1.0,
    }
    assert samples(text, "steadyserve_request_duration_seconds_count") == {
        ("echo", "echo"): 1.0, ("idle", "-"): 1.0}
    assert samples(text, "steadyserve_request_errors_total") == {("idle", "503", "-"): 1.0}
    assert 'deployment="-"' not in text


class PooledTransport(InProcessTransport):
    """In-process replicas, plus the per-address pool statistics HttpTransport reports; pools
    are never forgotten here (as when a replica was SIGKILLed and restarted on a new port)."""

    def __init__(self) -> None:
        super().__init__()
        self.called: dict[Address, None] = {}

    async def request(self, address: Address, method: str, path: str, body: bytes,
                      headers: list[tuple[bytes, bytes]], timeout_s: float) -> Reply:
        self.called[address] = None
        return await super().request(address, method, path, body, headers, timeout_s)

    def pool_stats(self) -> dict[Address, tuple[int, int]]:
        return {a: (0, 1) for a in self.called}


async def test_series_count_stays_constant_across_restarts_and_retirements():
    config = Config(deployments=(DeploymentConfig(name="echo", service="tests:Echo", replicas=2),))
    transport = PooledTransport()
    gw = Gateway(config, transport=transport)
    apps: dict[str, ReplicaApp] = {}
    ports = iter(range(20_000, 21_000))

    async def launch(replica_id: str) -> None:
        """A replica process (re)started: a fresh app on a fresh port."""
        app = apps[replica_id] = ReplicaApp(Echo(), handler_specs(Echo), name=replica_id)
        await app.start()
        address = Address("127.0.0.1", next(ports))
        transport.apps[address] = app
        gw.membership.add("echo", Endpoint(replica_id, address), codec.decode(app._info))

    async def stop(replica_id: str) -> None:
        endpoint = gw.membership.remove("echo", replica_id)
        assert endpoint is not None
        transport.apps.pop(endpoint.address)
        await apps.pop(replica_id).stop()

    counts: list[int] = []
    ids = ["echo-0", "echo-1"]
    for replica_id in ids:
        await launch(replica_id)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw), base_url="http://localhost") as c:
        try:
            # a first scrape: its compressed answer adds the encoding's response-bytes series
            assert (await c.get("/metrics", headers=admin_headers(gw))).status_code == 200
            for cycle in range(5):
                for _ in range(30):  # P2C over two idle replicas: both get calls
                    r = await c.post("/v1/deployments/echo/echo", json={"text": "x"})
                    assert r.status_code == 200, r.text
                r = await c.get("/metrics", headers=admin_headers(gw))
                assert r.status_code == 200
                text = r.text
                counts.append(series_count(text))
                assert not re.search(r'="[^"]*\d+\.\d+\.\d+\.\d+:\d+"', text), "an address as a label"
                assert {k[1] for k in samples(text, "steadyserve_upstream_connections")} == set(ids)
                # restart the first replica (same id, new port); retire the second for a new id
                await stop(ids[0])
                await launch(ids[0])
                await stop(ids[1])
                gw.metrics.forget_replica("echo", ids[1])  # what the supervisor does on retirement
                ids[1] = f"echo-r{cycle + 1}-1"
                await launch(ids[1])
        finally:
            for replica_id in list(apps):
                await stop(replica_id)
    assert len(transport.called) == 2 + 2 * 4  # every restart and launch took a new address
    assert counts == [counts[0]] * 5, counts
    retired = {f"echo-r{i}-1" for i in range(1, 4)} | {"echo-1"}
    assert not retired & {k[2] for k in samples(text, "steadyserve_upstream_attempts_total")}


async def test_replica_metrics_merge_off_the_loop_and_each_body_is_bounded(make_gateway, monkeypatch):
    gateway, client, deployments = await make_gateway({"echo": (Echo, 3)})
    merged_on: list[threading.Thread] = []
    merge = app_module.merge_replica_metrics

    def spy(texts: Any) -> bytes:
        merged_on.append(threading.current_thread())
        return merge(texts)

    monkeypatch.setattr(app_module, "merge_replica_metrics", spy)
    monkeypatch.setattr(app_module, "REPLICA_METRICS_TIMEOUT_S", 0.05)
    addresses = deployments["echo"].addresses
    request = gateway.transport.request

    async def odd_replicas(address: Address, method: str, path: str, *args: Any) -> Reply:
        if path == "/metrics" and address == addresses["echo-1"]:  # a runaway label
            return Reply(200, b"replica_junk 1\n" * (app_module.MAX_REPLICA_METRICS_BYTES // 15 + 1))
        if path == "/metrics" and address == addresses["echo-2"]:  # never answers in time
            await asyncio.sleep(5)
        return await request(address, method, path, *args)

    monkeypatch.setattr(gateway.transport, "request", odd_replicas)
    r = await client.get("/metrics", headers=admin_headers(gateway))
    assert r.status_code == 200
    assert merged_on and merged_on[0] is not threading.main_thread()
    # no request was made: every sample labelled with a replica comes from a replica's /metrics
    replicas = {s.labels["replica"] for f in text_string_to_metric_families(r.text)
                for s in f.samples if "replica" in s.labels}
    assert replicas == {"echo-0"}
    assert "replica_junk" not in r.text
    assert "steadyserve_admission_limit" in r.text  # the gateway's own series are all there


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"matchers": {"": ""}, "duration_s": 600}, 400, "matchers"),
        ({"matchers": {}, "duration_s": 600}, 400, "matchers"),
        ({"matchers": {"alertname": ""}, "duration_s": 600}, 400, "matchers"),
        ({"matchers": {"alert-name": "X"}, "duration_s": 600}, 400, "matchers"),
        ({"matchers": {"a": "b"}, "duration_s": 1e-9}, 400, "duration_s"),
        ({"matchers": {"a": "b"}, "duration_s": 31 * 86_400}, 400, "duration_s"),
        ({"matchers": {"a": "b"}, "duration_s": True}, 400, "duration_s"),
        ({"matchers": {"a": "b"}}, 400, "duration_s"),
        ({"matchers": {"a": "b"}, "duration_s": 600, "match_all": "yes"}, 400, "match_all"),
        ({"matchers": {"a": "b"}, "duration_s": 600, "comment": "x" * 5000}, 413, None),
        ([{"a": "b"}], 400, None),
    ],
)
async def test_the_silence_api_refuses_what_it_must(make_gateway, body, status, param):
    gateway, client, _ = await make_gateway({"echo": (Echo, 1)})
    gateway.alerting = AlertEngine(gateway.full_config, gateway.metrics, None)
    r = await client.post("/v1/silences", json=body, headers=admin_headers(gateway))
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert gateway.alerting.book.silences() == []


async def test_at_most_max_silences_are_active(make_gateway):
    gateway, client, _ = await make_gateway({"echo": (Echo, 1)})
    config = dataclasses.replace(gateway.full_config, alerting=AlertingConfig(max_silences=2))
    gateway.alerting = AlertEngine(config, gateway.metrics, None)
    headers = admin_headers(gateway)
    first = await client.post("/v1/silences", json={"matchers": {"alertname": "X"}, "duration_s": 600},
                              headers=headers)
    assert first.status_code == 201
    everything = await client.post("/v1/silences", json={"matchers": {}, "duration_s": 600,
                                                         "match_all": True}, headers=headers)
    assert everything.status_code == 201 and everything.json()["match_all"] is True
    third = await client.post("/v1/silences", json={"matchers": {"alertname": "Y"}, "duration_s": 600},
                              headers=headers)
    assert third.status_code == 409 and "at most 2" in third.json()["error"]["message"]
    r = await client.delete(f"/v1/silences/{first.json()['id']}", headers=headers)
    assert r.status_code == 200
    third = await client.post("/v1/silences", json={"matchers": {"alertname": "Y"}, "duration_s": 600},
                              headers=headers)
    assert third.status_code == 201
    listing = await client.get("/v1/alerts", headers=headers)
    assert listing.status_code == 200
    assert sorted(s["id"] for s in listing.json()["silences"]) == sorted(
        [everything.json()["id"], third.json()["id"]])
