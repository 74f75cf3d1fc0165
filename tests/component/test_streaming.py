"""Streaming handlers in process: items reach the client as NDJSON, server-sent events or
one JSON array by Accept; an error before the first item is an ordinary error answer (and
retried elsewhere); after it, an explicit error event ends the stream; a client that leaves
stops the generator; the deadline bounds the whole stream; bad input is a 400."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import pytest

import steadyserve
from steadyserve.errors import ConfigError
from steadyserve.service import handler_specs

from .conftest import HangingUp


class Talker(steadyserve.Service):
    def setup(self) -> None:
        self.produced = 0
        self.closed = 0
        self.lock = threading.Lock()

    @steadyserve.handler
    def count(self, n: int, delay_s: float = 0.0, fail_at: int = -1) -> Any:
        try:
            for i in range(n):
                if i == fail_at:
                    raise RuntimeError(f"broke at {i}")
                if delay_s:
                    time.sleep(delay_s)
                with self.lock:
                    self.produced += 1
                yield {"i": i}
        finally:
            with self.lock:
                self.closed += 1

    @steadyserve.handler
    async def words(self, text: str, delay_s: float = 0.0) -> Any:
        try:
            for word in text.split():
                if delay_s:
                    await asyncio.sleep(delay_s)
                self.produced += 1
                yield word
        finally:
            self.closed += 1

    @steadyserve.handler
    def plain(self, x: int) -> int:
        return x + 1


def services(deployments: dict) -> list[Talker]:
    return [app.service for app in deployments["talk"].apps.values()]


async def test_ndjson_sse_and_json_by_accept(make_gateway: Any) -> None:
    _, client, _ = await make_gateway({"talk": (Talker, 1)})
    url = "/v1/deployments/talk/count"
    r = await client.post(url, json={"n": 3})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line) for line in r.text.splitlines()] == [{"i": 0}, {"i": 1}, {"i": 2}]
    r = await client.post(url, json={"n": 2}, headers={"accept": "text/event-stream"})
    assert r.headers["content-type"] == "text/event-stream"
    events = r.text.split("\n\n")
    assert events[:2] == ['data: {"i":0}', 'data: {"i":1}']
    assert events[2].startswith("event: end\ndata: ") and '"items":2' in events[2]
    r = await client.post(url, json={"n": 2}, headers={"accept": "application/json"})
    assert r.json() == [{"i": 0}, {"i": 1}]
    r = await client.post("/v1/deployments/talk/words", json={"text": "a b c"})
    assert r.text.splitlines() == ['"a"', '"b"', '"c"']
    r = await client.post(url, json={"n": 0})  # an empty stream is an empty answer
    assert r.status_code == 200 and r.text == ""
    assert (await client.post("/v1/deployments/talk/plain", json={"x": 1})).json() == 2


async def test_bad_input_is_a_400_and_an_early_failure_an_error_answer(make_gateway: Any
                                                                        ) -> None:
    _, client, _ = await make_gateway({"talk": (Talker, 1)})
    url = "/v1/deployments/talk/count"
    r = await client.post(url, json={"n": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    r = await client.post(url, json={"n": 3, "fail_at": 0})  # before the first item
    assert r.status_code == 500 and "broke at 0" in r.json()["error"]["message"], r.text


async def test_a_failure_after_the_first_item_ends_with_an_error_event(make_gateway: Any
                                                                        ) -> None:
    _, client, _ = await make_gateway({"talk": (Talker, 2)})
    url = "/v1/deployments/talk/count"
    r = await client.post(url, json={"n": 5, "fail_at": 2})
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert r.status_code == 200 and lines[:2] == [{"i": 0}, {"i": 1}]
    assert lines[2]["error"]["code"] == "handler_failed" and len(lines) == 3  # no replay
    r = await client.post(url, json={"n": 5, "fail_at": 2}, headers={"accept": "text/event-stream"})
    assert "event: error\ndata: " in r.text and r.text.count("data: {\"i\"") == 2
    metrics = (await client.get("/metrics")).text
    assert 'steadyserve_streams_total{deployment="talk",outcome="error"} 2.0' in metrics


async def test_a_client_that_leaves_stops_the_generator(make_gateway: Any) -> None:
    """Driven through the gateway's ASGI interface (httpx's in-process transport reads a
    response whole): the client's receive says it left after the third item."""
    gateway, _, deployments = await make_gateway({"talk": (Talker, 1)})
    talker = services(deployments)[0]
    client = HangingUp("/v1/deployments/talk/count", {"n": 1000, "delay_s": 0.02})
    client.on_chunk = lambda n: client.leave() if n == 3 else None  # the client leaves
    started = time.monotonic()
    await asyncio.wait_for(gateway(client.scope, client.receive, client.send), 10)
    stopped_in = time.monotonic() - started
    await asyncio.sleep(0.1)
    assert talker.closed == 1, "the generator was not closed"
    # the item in progress on the model thread may finish; nothing after it
    assert talker.produced - len(client.chunks) <= 1, (talker.produced, len(client.chunks))
    assert stopped_in < 2, stopped_in
    metrics = (await httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway),
                                       base_url="http://gw").get("/metrics")).text
    assert 'steadyserve_streams_total{deployment="talk",outcome="cancelled"} 1.0' in metrics
    assert 'steadyserve_streams_open{deployment="talk"} 0.0' in metrics


async def test_the_deadline_bounds_the_whole_stream(make_gateway: Any) -> None:
    _, client, deployments = await make_gateway({"talk": (Talker, 1)})
    r = await client.post("/v1/deployments/talk/words", json={"text": "a " * 100, "delay_s": 0.05},
                          headers={"x-request-timeout-ms": "400"})
    lines = r.text.splitlines()
    assert r.status_code == 200 and 2 <= len(lines) <= 12, lines
    assert json.loads(lines[-1])["error"]["code"] == "deadline_exceeded"
    await asyncio.sleep(0.1)
    assert services(deployments)[0].closed == 1


def test_a_generator_cannot_be_batched_or_cached() -> None:
    class Bad(steadyserve.Service):
        @steadyserve.handler(cache=True)
        def gen(self, x: int) -> Any:
            yield x

    with pytest.raises(ConfigError, match="streaming handler"):
        handler_specs(Bad)
    assert handler_specs(Talker)["count"].options.stream is True
    assert handler_specs(Talker)["plain"].options.stream is False
