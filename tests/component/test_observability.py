"""Trace propagation to replicas, the access log, and invalid trace headers."""

from __future__ import annotations

import logging

import pytest

from steadyserve.gateway.transport import InProcessTransport

from .services import Echo

pytestmark = pytest.mark.asyncio
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class Recording(InProcessTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[dict[bytes, bytes]] = []

    async def request(self, address, method, path, body, headers, timeout_s):
        if path.startswith("/invoke/"):
            self.sent.append(dict(headers))
        return await super().request(address, method, path, body, headers, timeout_s)


async def test_traceparent_continues_the_callers_trace_with_a_span_per_attempt(make_gateway):
    gateway, client, deployments = await make_gateway({"echo": (Echo, 2)})
    recording = Recording()
    recording.apps = gateway.transport.apps
    gateway.transport = gateway.dispatcher.transport = recording
    deployments["echo"].kill("echo-0")  # the first attempt may fail: then two spans
    for _ in range(6):
        r = await client.post("/v1/deployments/echo/echo", json={"text": "x"},
                              headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"})
        assert r.status_code == 200
        assert r.headers["traceparent"].startswith(f"00-{TRACE}-")
    parents = [h[b"traceparent"].decode() for h in recording.sent]
    assert all(p.startswith(f"00-{TRACE}-") for p in parents)
    assert len({p.split("-")[2] for p in parents}) == len(parents)  # a new span per attempt
    assert "00f067aa0ba902b7" not in {p.split("-")[2] for p in parents}


@pytest.mark.parametrize("header", ["00-zz-yy-01", "ff-" + TRACE + "-00f067aa0ba902b7-01", "x" * 300])
async def test_an_invalid_traceparent_starts_a_new_trace_and_the_request_succeeds(make_gateway, header):
    _, client, _ = await make_gateway({"echo": (Echo, 1)})
    r = await client.post("/v1/deployments/echo/echo", json={"text": "x"},
                          headers={"traceparent": header})
    assert r.status_code == 200
    trace_id = r.headers["traceparent"].split("-")[1]
    assert len(trace_id) == 32 and trace_id != TRACE


async def test_one_access_log_line_per_request(make_gateway, caplog):
    _, client, _ = await make_gateway({"echo": (Echo, 1)})
    with caplog.at_level(logging.INFO, logger="steadyserve.access"):
        await client.post("/v1/deployments/echo/echo", json={"text": "x"},
                          headers={"x-request-id": "req-1"})
        await client.post("/v1/deployments/echo/echo", json={"text": 5})
        await client.get("/healthz")  # ops routes are not access-logged
    records = [r for r in caplog.records if r.name == "steadyserve.access"]
    assert len(records) == 2
    first = records[0]
    assert (first.request_id, first.deployment, first.handler, first.replica, first.status,
            first.attempts) == ("req-1", "echo", "echo", "echo-0", 200, 1)
    assert first.duration_ms > 0 and len(first.trace_id) == 32
    assert records[1].status == 400 and records[1].attempts == 0
