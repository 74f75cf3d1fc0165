"""steadyserve.client without a gateway: the retry table, the exchange driven step by step
with a fake clock (deadline, Retry-After, one request id), and both clients over
httpx.MockTransport behaving the same."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from steadyserve.client import (
    AsyncClient,
    Client,
    Outcome,
    Send,
    Sleep,
    SteadyserveError,
    _json_result,
    _Options,
    exchange,
    should_retry,
)
from steadyserve.testing import FakeClock


@pytest.mark.parametrize(("status", "code", "sent", "idempotent", "attempt", "retry_after",
                          "remaining", "want"), [
    (None, None, False, False, 1, None, 10, 0.1),   # refused before sending: always
    (None, None, True, False, 1, None, 10, None),   # sent, then lost: only idempotent
    (None, None, True, True, 2, None, 10, 0.2),     # backoff doubles
    (503, "overloaded", True, False, 1, 2.0, 10, 2.0),  # not started: Retry-After
    (429, "rate_limited", True, False, 1, 1.0, 10, 1.0),
    (503, "no_ready_replica", True, False, 1, None, 10, 0.1),
    (502, "replica_unavailable", True, False, 1, None, 10, None),  # may have run
    (502, "replica_unavailable", True, True, 1, None, 10, 0.1),
    (504, "timeout", True, True, 1, None, 10, 0.1),
    (500, "handler_failed", True, True, 1, None, 10, None),  # the input's fault
    (400, "invalid_request", True, True, 1, None, 10, None),
    (503, "overloaded", True, True, 3, 1.0, 10, None),  # attempts spent
    (503, "overloaded", True, True, 1, 5.0, 4.0, None),  # the wait ends past the deadline
    (None, None, True, True, 8, None, 10, 5.0),      # backoff capped
])
def test_should_retry(status, code, sent, idempotent, attempt, retry_after, remaining, want):
    got = should_retry(status=status, code=code, sent=sent, idempotent=idempotent,
                       attempt=attempt, max_attempts=3 if attempt < 8 else 10,
                       retry_after_s=retry_after, remaining_s=remaining)
    assert got == want


def response(status: int, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(status, content=orjson.dumps(body), headers=headers or {})


def overloaded(retry_after: str = "1") -> httpx.Response:
    return response(503, {"error": {"code": "overloaded", "message": "busy"}},
                    {"retry-after": retry_after})


def test_the_exchange_keeps_its_request_id_and_shrinks_the_deadline_it_sends():
    clock = FakeClock(100.0)
    opts = _Options("http://gw", "ss_key", 10.0, 3, clock)
    steps = exchange(opts, "POST", "/v1/deployments/d/h", {"x": 1}, idempotent=False,
                     timeout_s=None, parse=_json_result)
    first = next(steps)
    assert isinstance(first, Send) and first.headers["x-request-timeout-ms"] == "10000"
    assert first.headers["authorization"] == "Bearer ss_key"
    assert orjson.loads(first.body) == {"x": 1}
    clock.advance(0.5)
    wait = steps.send(Outcome(overloaded("2")))
    assert wait == Sleep(2.0)
    clock.advance(2.0)
    second = steps.send(None)
    assert second.headers["x-request-id"] == first.headers["x-request-id"]
    assert second.headers["x-request-timeout-ms"] == "7500"
    with pytest.raises(StopIteration) as done:
        steps.send(Outcome(response(200, {"ok": True}, {"x-steadyserve-cache": "miss"})))
    result = done.value.value
    assert (result.value, result.attempts, result.cache) == ({"ok": True}, 2, "miss")


def test_a_non_idempotent_call_is_not_sent_twice_after_it_may_have_run():
    opts = _Options("http://gw", None, 10.0, 3, FakeClock(0.0))
    steps = exchange(opts, "POST", "/p", {}, idempotent=False, timeout_s=None,
                     parse=_json_result)
    next(steps)
    with pytest.raises(SteadyserveError) as refused:
        steps.send(Outcome(error="ReadError: reset", sent=True))
    assert (refused.value.status, refused.value.code, refused.value.attempts) == (0, "no_answer", 1)


def test_the_deadline_ends_the_retries():
    clock = FakeClock(0.0)
    opts = _Options("http://gw", None, 1.0, 10, clock)
    steps = exchange(opts, "GET", "/p", None, idempotent=True, timeout_s=None, parse=_json_result)
    next(steps)
    clock.advance(0.95)
    with pytest.raises(SteadyserveError) as late:
        steps.send(Outcome(overloaded("1")))  # waiting 1 s would end past the deadline
    assert late.value.code == "overloaded" and late.value.retry_after_s == 1.0


def scripted(replies: list[httpx.Response | Exception], seen: list[httpx.Request]):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply
    return handler


def script() -> list[httpx.Response | Exception]:
    return [httpx.ConnectError("refused"), overloaded("0"),
            response(200, {"text": "hi"}, {"x-steadyserve-version": "7"})]


def test_the_sync_and_async_clients_behave_the_same():
    seen_sync: list[httpx.Request] = []
    slept: list[float] = []
    with Client("http://gw", api_key="k", transport=httpx.MockTransport(
            scripted(script(), seen_sync)), sleep=slept.append) as c:
        sync = c.invoke("echo", "echo", text="hi")
    seen_async: list[httpx.Request] = []

    async def run():
        async with AsyncClient("http://gw", api_key="k", transport=httpx.MockTransport(
                scripted(script(), seen_async))) as c:
            return await c.invoke("echo", "echo", text="hi")

    got = asyncio.run(run())
    for result, seen in ((sync, seen_sync), (got, seen_async)):
        assert (result.value, result.attempts, result.version) == ({"text": "hi"}, 3, "7")
        assert len({r.headers["x-request-id"] for r in seen}) == 1
        assert all(r.url.path == "/v1/deployments/echo/echo" for r in seen)
    assert slept == [0.1]  # after the refused connection; Retry-After 0 needs no sleep


def test_an_error_says_what_the_gateway_said():
    seen: list[httpx.Request] = []
    with Client("http://gw", transport=httpx.MockTransport(scripted(
            [response(400, {"error": {"code": "invalid_request", "message": "'text' is required",
                                      "param": "text"}})], seen))) as c:
        with pytest.raises(SteadyserveError) as bad:
            c.invoke("echo", "echo")
    assert (bad.value.status, bad.value.code, bad.value.message) == (
        400, "invalid_request", "'text' is required")
    assert len(seen) == 1


def test_bad_options_are_refused():
    with pytest.raises(ValueError):
        Client(max_attempts=0)
    with pytest.raises(ValueError):
        Client(timeout_s=0)


def test_a_feedback_submission_lost_on_the_way_back_is_retried_with_the_same_item_id():
    seen: list[httpx.Request] = []
    steps = [httpx.ReadError("reset after the gateway stored it"),
             response(200, {"id": "x", "request_id": "r1", "stored": False})]
    with Client("http://gw", transport=httpx.MockTransport(scripted(steps, seen)),
                sleep=lambda s: None) as c:
        receipt = c.feedback("r1", key="label", correction="fraud", score=None)
    bodies = [orjson.loads(r.content) for r in seen]
    assert len(bodies) == 2 and bodies[0] == bodies[1]  # one item id: stored once
    assert bodies[0]["request_id"] == "r1" and bodies[0]["correction"] == "fraud"
    assert "score" not in bodies[0] and len(bodies[0]["id"]) == 32
    assert (receipt.request_id, receipt.stored) == ("r1", False)
