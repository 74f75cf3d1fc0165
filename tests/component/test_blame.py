"""Blame the right party: a gateway with in-process replicas, and service code that fails.

A handler's exception is the request's (answered once, never retried, never held against the
replica); `RetryableError` and a full replica are retried elsewhere; a dependency that is
down is passed on as 503 + Retry-After without a retry. What the ReplicaErrors alert reads
(steadyserve_upstream_attempts_total{outcome="5xx"}) is checked on the /metrics page.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import steadyserve
from steadyserve.errors import DependencyUnavailable, Overloaded, ResponseTooLarge
from steadyserve.gateway.app import Gateway
from steadyserve.gateway.transport import Address, AsgiApp, InProcessTransport, Reply

pytestmark = pytest.mark.asyncio


class Picky(steadyserve.Service):
    """Fails for negative inputs (a bug in the handler); a replica may be told to refuse."""

    def setup(self) -> None:
        self.calls = 0
        self.refuse = False  # raise RetryableError: "not here, not now"
        self.full = False  # raise Overloaded, as a replica whose batch queue is full does
        self.slow = False  # `wait` never answers in time
        self.broken = False  # every call raises: a broken device context on this replica

    def _run(self, x: int) -> dict[str, int]:
        self.calls += 1
        if x < 0:
            raise ValueError(f"cannot take the root of {x}")
        if self.broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if self.refuse:
            raise steadyserve.RetryableError("device out of memory on this replica")
        if self.full:
            raise Overloaded("replica batch queue is full", retry_after_s=1)
        return {"x": x}

    @steadyserve.handler
    def check(self, x: int) -> dict[str, int]:
        return self._run(x)

    @steadyserve.handler(idempotent=False)
    def charge(self, x: int) -> dict[str, int]:
        return self._run(x)

    @steadyserve.handler
    def lookup(self, x: int) -> dict[str, int]:
        self.calls += 1
        raise DependencyUnavailable("the feature store is down", retry_after_s=7)

    @steadyserve.handler(per_try_timeout_s=0.5)
    async def wait(self, x: int) -> dict[str, int]:
        """Answers at once, except on a replica told to be slow (its model hangs)."""
        self.calls += 1
        if self.slow:
            await asyncio.sleep(30)  # cancelled by the replica's own timeout
        return {"x": x}

    @steadyserve.handler
    async def pause(self, x: int) -> dict[str, int]:
        """A healthy handler that takes 40 ms."""
        await asyncio.sleep(0.04)
        return {"x": x}

    @steadyserve.handler
    def text(self, x: int) -> str:
        self.calls += 1
        return "x" * x


class Capped(InProcessTransport):
    """In-process replicas behind HttpTransport's size limit (tests/unit/test_transport.py
    tests the limit itself): what the dispatcher does with a too-large answer."""

    def __init__(self, apps: dict[Address, AsgiApp], max_response_bytes: int) -> None:
        super().__init__(apps)
        self.max_response_bytes = max_response_bytes

    async def request(self, address: Address, method: str, path: str, body: bytes,
                      headers: list[tuple[bytes, bytes]], timeout_s: float) -> Reply:
        reply = await super().request(address, method, path, body, headers, timeout_s)
        if len(reply.body) > self.max_response_bytes:
            raise ResponseTooLarge(f"the replica's answer is {len(reply.body)} bytes")
        return reply


def calls(deployments: dict[str, Any]) -> dict[str, int]:
    return {rid: app.service.calls for rid, app in deployments["p"].apps.items()}


def retries(gateway: Gateway) -> float:
    return float(gateway.metrics.retries.labels("p")._value.get())


async def upstream(client: httpx.AsyncClient) -> dict[tuple[str, str], float]:
    """{(replica, outcome): attempts} from the gateway's /metrics page."""
    r = await client.get("/metrics")
    assert r.status_code == 200
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name == "steadyserve_upstream_attempts_total" and s.labels["deployment"] == "p":
                out[(s.labels["replica"], s.labels["outcome"])] = s.value
    return out


def health(gateway: Gateway) -> dict[str, tuple[int, float]]:
    """{replica: (consecutive failures, ejected until)}."""
    d = gateway.membership.get("p")
    assert d is not None
    return {e.replica_id: (e.health.consecutive_failures, e.health.ejected_until)
            for e in d.endpoints}


async def post(client: httpx.AsyncClient, handler: str, x: int) -> httpx.Response:
    return await client.post(f"/v1/deployments/p/{handler}", json={"x": x})


async def test_a_handlers_exception_is_the_requests_alone(make_gateway) -> None:
    gateway, client, deployments = await make_gateway({"p": (Picky, 2)})
    for i in range(20):  # 4x the ejection threshold, in a row
        r = await post(client, "check", -1)
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["code"] == "handler_failed"
        assert "ValueError: cannot take the root of -1" in error["message"]
        assert sum(calls(deployments).values()) == i + 1  # ran once: never retried
    assert retries(gateway) == 0
    assert health(gateway) == {"p-0": (0, 0.0), "p-1": (0, 0.0)}  # nobody ejected or blamed
    for x in range(10):
        r = await post(client, "check", x)
        assert r.status_code == 200 and r.json() == {"x": x}
    seen = await upstream(client)
    assert not [k for k in seen if k[1] == "5xx"], seen  # ReplicaErrors has nothing to restart
    assert sum(v for (_, outcome), v in seen.items() if outcome == "handler_error") == 20
    assert sum(v for (_, outcome), v in seen.items() if outcome == "ok") == 10


async def test_a_handler_error_answers_an_ejected_replicas_probe(make_gateway) -> None:
    """A probe that reaches service code shows the replica serves: it returns to rotation."""
    gateway, client, deployments = await make_gateway({"p": (Picky, 2)})
    d = gateway.membership.get("p")
    assert d is not None
    now = gateway.dispatcher.clock()
    assert gateway.dispatcher.eject(d, "p-0", now)
    endpoint = next(e for e in d.endpoints if e.replica_id == "p-0")
    endpoint.health = replace(endpoint.health, ejected_until=now)  # due for its probe
    r = await post(client, "check", -1)  # the probe: the next request goes to p-0
    assert r.status_code == 500 and r.json()["error"]["code"] == "handler_failed"
    assert calls(deployments) == {"p-0": 1, "p-1": 0}
    assert health(gateway)["p-0"] == (0, 0.0)
    assert gateway.metrics.outlier_events.labels("p", "returned")._value.get() == 1


async def test_retryable_error_is_retried_on_the_other_replica(make_gateway) -> None:
    gateway, client, deployments = await make_gateway({"p": (Picky, 2)})
    deployments["p"].apps["p-0"].service.refuse = True
    sent = 0
    while calls(deployments)["p-0"] == 0 and sent < 50:  # until one lands on p-0
        r = await post(client, "check", sent)
        assert r.status_code == 200 and r.json() == {"x": sent}
        sent += 1
    refused = calls(deployments)["p-0"]
    assert refused >= 1
    assert calls(deployments)["p-1"] == sent  # every request answered there, once
    assert retries(gateway) == refused
    seen = await upstream(client)
    assert seen[("p-0", "5xx")] == refused  # counted against the replica that refused
    assert ("p-0", "ok") not in seen
    assert health(gateway)["p-0"][0] == refused  # consecutive failures (ejected at 5)


async def test_retryable_error_of_a_non_idempotent_handler_is_not_retried(make_gateway) -> None:
    gateway, client, deployments = await make_gateway({"p": (Picky, 1)})
    deployments["p"].apps["p-0"].service.refuse = True
    r = await post(client, "charge", 3)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "retryable"
    assert calls(deployments) == {"p-0": 1}
    assert retries(gateway) == 0


async def test_a_replica_that_times_out_is_retried_while_the_deadline_has_room(make_gateway) -> None:
    gateway, client, deployments = await make_gateway({"p": (Picky, 2)})
    deployments["p"].apps["p-0"].service.slow = True
    sent = 0
    while calls(deployments)["p-0"] == 0 and sent < 50:
        r = await post(client, "wait", sent)  # per try 0.5 s of a 60 s deadline
        assert r.status_code == 200 and r.json() == {"x": sent}
        sent += 1
    assert calls(deployments) == {"p-0": 1, "p-1": sent}
    assert retries(gateway) == 1
    seen = await upstream(client)
    # the replica's own 504 timeout (5xx) or the gateway's per-try timer, whichever fired first
    assert seen.get(("p-0", "5xx"), 0) + seen.get(("p-0", "timeout"), 0) == 1, seen
    assert health(gateway)["p-0"][0] == 1


async def test_a_timeout_that_spends_the_deadline_is_not_retried(make_gateway) -> None:
    gateway, client, deployments = await make_gateway({"p": (Picky, 1)})
    for x in range(30):  # the gateway learns that `wait` answers in about a millisecond
        assert (await post(client, "wait", x)).status_code == 200
    deployments["p"].apps["p-0"].service.slow = True
    r = await client.post("/v1/deployments/p/wait", json={"x": 1},
                          headers={"x-request-timeout-ms": "300"})  # under the 0.5 s per try
    # 300 ms is far over 3 x this handler's p99: the replica hangs, and is blamed
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "timeout"
    assert calls(deployments) == {"p-0": 31}
    assert retries(gateway) == 0
    assert health(gateway)["p-0"][0] == 1


async def test_a_clients_deadline_shorter_than_the_handler_needs_is_the_clients(
        make_gateway) -> None:
    # the hostile case: a header must not eject healthy replicas, shrink the concurrency
    # limit, nor spend the error budget. `pause` takes 40 ms; the client allows 2 ms
    gateway, client, _ = await make_gateway({"p": (Picky, 2)})
    for x in range(20):
        assert (await post(client, "pause", x)).status_code == 200
    limit = gateway.dispatcher.state(gateway.membership.get("p")).admission.limit.limit
    for x in range(15):  # three times outlier_consecutive_failures
        r = await client.post("/v1/deployments/p/pause", json={"x": x},
                              headers={"x-request-timeout-ms": "2"})
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "deadline_exceeded"
        assert r.json()["error"]["param"] == "x-request-timeout-ms"
    assert retries(gateway) == 0
    assert {rid: h[0] for rid, h in health(gateway).items()} == {"p-0": 0, "p-1": 0}
    assert all(until == 0 for _, until in health(gateway).values())
    assert gateway.dispatcher.state(gateway.membership.get("p")).admission.limit.limit >= limit
    seen = await upstream(client)
    assert sum(v for (_, outcome), v in seen.items() if outcome == "deadline") == 15, seen
    assert not any(outcome in ("timeout", "5xx") for (_, outcome) in seen), seen
    text = (await client.get("/metrics")).text
    codes = {s.labels["code"]: s.value for f in text_string_to_metric_families(text)
             for s in f.samples if s.name == "steadyserve_requests_total"
             and s.labels["handler"] == "pause"}
    assert codes == {"2xx": 20, "deadline": 15, "5xx": 0}, codes
    # and the replicas still serve
    assert (await post(client, "pause", 99)).json() == {"x": 99}


async def test_a_dependency_that_is_down_is_passed_on_not_retried_nor_blamed(make_gateway) -> None:
    gateway, client, deployments = await make_gateway({"p": (Picky, 2)})
    for i in range(10):
        r = await post(client, "lookup", i)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "7"
        error = r.json()["error"]
        assert error["code"] == "dependency_unavailable"
        assert error["message"] == "the feature store is down"
        assert sum(calls(deployments).values()) == i + 1
    assert retries(gateway) == 0
    assert health(gateway) == {"p-0": (0, 0.0), "p-1": (0, 0.0)}
    seen = await upstream(client)
    assert sum(seen.values()) == 10
    assert sum(v for (_, outcome), v in seen.items() if outcome == "dependency") == 10


async def test_a_full_replica_is_retried_elsewhere_but_not_blamed(make_gateway) -> None:
    gateway, client, deployments = await make_gateway({"p": (Picky, 2)})
    deployments["p"].apps["p-0"].service.full = True
    sent = 0
    while calls(deployments)["p-0"] < 6 and sent < 200:  # past the ejection threshold
        r = await post(client, "check", sent)
        assert r.status_code == 200 and r.json() == {"x": sent}
        sent += 1
    full = calls(deployments)["p-0"]
    assert full >= 6
    assert health(gateway)["p-0"] == (0, 0.0)  # busy is not broken: still in rotation
    assert retries(gateway) == full
    seen = await upstream(client)
    assert seen[("p-0", "overloaded")] == full
    assert ("p-0", "5xx") not in seen
    # every replica full: the client is told to come back, not sent a 5xx of blame
    deployments["p"].apps["p-1"].service.full = True
    r = await post(client, "check", 1)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "overloaded"
    assert r.headers["retry-after"] == "1"


async def test_a_too_large_answer_is_refused_once_and_not_blamed(make_gateway) -> None:
    gateway, client, deployments = await make_gateway({"p": (Picky, 2)})
    assert isinstance(gateway.transport, InProcessTransport)
    gateway.dispatcher.transport = Capped(gateway.transport.apps, max_response_bytes=4096)
    for i in range(8):  # past the ejection threshold
        r = await post(client, "text", 10_000)
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "response_too_large"
        assert sum(calls(deployments).values()) == i + 1  # any replica would say the same
    assert retries(gateway) == 0
    assert health(gateway) == {"p-0": (0, 0.0), "p-1": (0, 0.0)}
    seen = await upstream(client)
    assert sum(v for (_, outcome), v in seen.items() if outcome == "too_large") == 8
    assert not [k for k in seen if k[1] == "5xx"], seen
    r = await post(client, "text", 100)
    assert r.status_code == 200 and r.json() == "x" * 100


async def test_a_replica_whose_handler_fails_everything_is_ejected_but_a_poison_input_is_not(
        make_gateway) -> None:
    """Handler errors are the requests' own, unless one replica fails where its peers do not:
    then it is broken (outlier_error_ratio against its peers), and it leaves rotation."""
    gateway, client, deployments = await make_gateway({"p": (Picky, 2)})
    for _ in range(60):  # a poison input on every replica: nobody is at fault
        assert (await post(client, "check", -1)).status_code == 500
    for x in range(20):
        assert (await post(client, "check", x)).status_code == 200
    assert {rid: h[1] for rid, h in health(gateway).items()} == {"p-0": 0.0, "p-1": 0.0}
    gateway, client, deployments = await make_gateway({"p": (Picky, 2)})  # a clean history
    deployments["p"].apps["p-0"].service.broken = True
    codes = [(await post(client, "check", x)).status_code for x in range(200)]
    assert health(gateway)["p-0"][1] > 0, "the broken replica was not ejected"
    assert health(gateway)["p-1"][1] == 0.0
    first_ok_streak = codes[-50:]
    assert first_ok_streak == [200] * 50  # after the ejection everything lands on p-1
    assert codes.count(500) <= 40  # judged over its last 20..40 answers
    assert gateway.metrics.outlier_events.labels("p", "ejected")._value.get() == 1
