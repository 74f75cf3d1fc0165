"""Coalesced calls end to end in process: concurrent requests to a batched handler share
exchanges with the replica, each keeps its own answer, and the replica's /invoke-many route
refuses what is not a list of calls."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from steadyserve import codec
from steadyserve.config import MAX_COALESCED_CALLS

from .services import Echo


def exchanges(gateway: Any) -> tuple[float, float]:
    m = gateway.metrics
    return m.exchanges._value.get(), m.exchange_calls._value.get()


async def test_concurrent_requests_share_exchanges_and_keep_their_own_answers(make_gateway):
    gateway, client, deps = await make_gateway({"echo": (Echo, 1)})
    texts = [f"text {i}" for i in range(12)]
    bodies: list[dict[str, Any]] = [{"texts": [t]} for t in texts]
    bodies[5] = {"texts": []}  # a bad request among good ones: only it fails
    bodies[7] = {"texts": "not a list"}
    replies = await asyncio.gather(*(client.post("/v1/deployments/echo/upper", json=b)
                                     for b in bodies))
    for i, r in enumerate(replies):
        if i in (5, 7):
            assert 400 <= r.status_code < 500, (i, r.status_code, r.text)
            assert "texts" in r.text
        else:
            assert r.status_code == 200, (i, r.text)
            assert r.json() == [texts[i].upper()]
            assert r.headers["x-request-id"]
    n_exchanges, n_calls = exchanges(gateway)
    # the two bad requests are refused by the gateway before any call
    assert n_calls == 10 and n_exchanges < n_calls, (n_exchanges, n_calls)
    service = deps["echo"].apps["echo-0"].service
    assert sum(service.batches) == 10 and max(service.batches) > 1, service.batches


async def test_coalescing_off_sends_one_exchange_per_call(make_gateway):
    gateway, client, _ = await make_gateway({"echo": (Echo, 1)}, coalesce_max_items=0)
    replies = await asyncio.gather(*(client.post("/v1/deployments/echo/upper",
                                                 json={"texts": [str(i)]}) for i in range(6)))
    assert [r.status_code for r in replies] == [200] * 6
    assert exchanges(gateway) == (0, 0)


async def _invoke_many(app: Any, body: bytes) -> tuple[int, Any]:
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/invoke-many/upper", "headers": [],
             "query_string": b""}
    await app(scope, receive, send)
    return sent[0]["status"], codec.decode(sent[1]["body"])


async def test_the_replica_answers_each_coalesced_call_as_if_it_came_alone(make_gateway):
    _, _, deps = await make_gateway({"echo": (Echo, 1)})
    app = deps["echo"].apps["echo-0"]
    calls = [[[[b"x-request-id", b"r1"]], codec.encode({"args": {"texts": ["a", "b"]}})],
             [[], codec.encode({"args": {"texts": []}})],
             [[[b"x-steadyserve-deadline-ms", b"5000"]], codec.encode({"args": {"texts": ["c"]}})]]
    status, parts = await _invoke_many(app, codec.encode(calls))
    assert status == 200 and len(parts) == 3
    first, second, third = [(s, codec.decode(p)) for s, p in parts]
    assert first[0] == 200 and first[1]["result"] == ["A", "B"]
    assert second[0] == 400 and second[1]["error"]["param"] == "texts"
    assert third[0] == 200 and third[1]["result"] == ["C"]


@pytest.mark.parametrize("body", [
    b"\xc1 not msgpack",
    codec.encode({"calls": []}),
    codec.encode([]),
    codec.encode([[[], b"x"]] * (MAX_COALESCED_CALLS + 1)),
    codec.encode([["headers", b"x"]]),
    codec.encode([[[[b"only-a-name"]], b"x"]]),
    codec.encode([[[["str", "str"]], b"x"]]),
    codec.encode([[[], "a str body"]]),
    codec.encode([[[[b"h", b"v"]] * 33, b"x"]]),
])
async def test_the_replica_refuses_a_malformed_coalesced_request(make_gateway, body):
    _, _, deps = await make_gateway({"echo": (Echo, 1)})
    status, answer = await _invoke_many(deps["echo"].apps["echo-0"], body)
    assert status == 400, answer
    assert "coalesced call" in answer["error"]["message"]
