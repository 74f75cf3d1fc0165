"""gateway.coalesce: calls to one batched handler on one replica, started in one loop turn,
share one exchange; each call keeps its own reply, timeout and failure."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from steadyserve import codec
from steadyserve.errors import ConnectionLost, ReplicaTimeout, ReplicaUnavailable, ResponseTooLarge
from steadyserve.gateway.coalesce import Coalescer
from steadyserve.gateway.transport import Address, Reply

A = Address("127.0.0.1", 1)
B = Address("127.0.0.1", 2)


class FakeTransport:
    """Answers /invoke/<h> with the body echoed and /invoke-many/<h> with each call's body
    echoed, after `delay_s`; `fail`: raise it instead; `many_reply`: answer groups with it."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.sent: list[tuple[Address, str, Any]] = []
        self.fail: Exception | None = None
        self.many_reply: Reply | None = None
        self.cancelled = 0

    async def request(self, address: Address, method: str, path: str, body: bytes,
                      headers: list[tuple[bytes, bytes]], timeout_s: float) -> Reply:
        many = path.startswith("/invoke-many/")
        self.sent.append((address, path, codec.decode(body) if many else body))
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        if not many:
            return Reply(200, b"one:" + body)
        if self.many_reply is not None:
            return self.many_reply
        calls = codec.decode(body)
        return Reply(200, codec.encode([[200, b"many:" + c[1]] for c in calls]))


def headers(i: int) -> list[tuple[bytes, bytes]]:
    return [(b"x-request-id", f"r{i}".encode())]


async def call(c: Coalescer, i: int, address: Address = A, timeout_s: float = 1.0) -> Reply:
    return await c.request(address, "h", f"b{i}".encode(), headers(i), timeout_s)


async def test_calls_of_one_loop_turn_share_one_exchange_and_keep_their_own_replies() -> None:
    t = FakeTransport()
    c = Coalescer(t, max_items=64, max_bytes=1 << 20)
    replies = await asyncio.gather(*(call(c, i) for i in range(5)))
    assert [r.body for r in replies] == [f"many:b{i}".encode() for i in range(5)]
    assert len(t.sent) == 1
    address, path, calls = t.sent[0]
    assert (address, path) == (A, "/invoke-many/h")
    assert calls == [[[[b"x-request-id", f"r{i}".encode()]], f"b{i}".encode()] for i in range(5)]


async def test_a_call_alone_in_its_turn_goes_as_a_plain_invoke() -> None:
    t = FakeTransport()
    c = Coalescer(t, max_items=64, max_bytes=1 << 20)
    assert (await call(c, 1)).body == b"one:b1"
    assert [(p) for _, p, _ in t.sent] == ["/invoke/h"]


async def test_replicas_and_limits_split_groups() -> None:
    t = FakeTransport()
    c = Coalescer(t, max_items=2, max_bytes=1 << 20)
    replies = await asyncio.gather(call(c, 0), call(c, 1), call(c, 2), call(c, 3, address=B))
    assert [r.body for r in replies] == [b"many:b0", b"many:b1", b"one:b2", b"one:b3"]
    assert sorted((str(a), p) for a, p, _ in t.sent) == [
        ("127.0.0.1:1", "/invoke-many/h"), ("127.0.0.1:1", "/invoke/h"),
        ("127.0.0.1:2", "/invoke/h")]
    t.sent.clear()
    small = Coalescer(t, max_items=64, max_bytes=4)  # b0 + b1 fit, b2 starts another group
    await asyncio.gather(call(small, 0), call(small, 1), call(small, 2))
    assert sorted(p for _, p, _ in t.sent) == ["/invoke-many/h", "/invoke/h"]


@pytest.mark.parametrize("max_items", [0, 1])
async def test_coalescing_off(max_items: int) -> None:
    t = FakeTransport()
    c = Coalescer(t, max_items=max_items, max_bytes=1 << 20)
    await asyncio.gather(call(c, 0), call(c, 1))
    assert [p for _, p, _ in t.sent] == ["/invoke/h", "/invoke/h"]


async def test_a_failed_exchange_fails_every_call_in_it() -> None:
    t = FakeTransport()
    t.fail = ConnectionLost("reset")
    c = Coalescer(t, max_items=64, max_bytes=1 << 20)
    results = await asyncio.gather(call(c, 0), call(c, 1), return_exceptions=True)
    assert all(isinstance(r, ConnectionLost) for r in results), results


@pytest.mark.parametrize("reply", [
    Reply(200, b"\xc1 not msgpack"),
    Reply(200, codec.encode([[200, b"only one"]])),  # two calls, one answer
    Reply(200, codec.encode({"result": 1})),
    Reply(200, codec.encode([[200, "not bytes"], [200, b"x"]])),
])
async def test_a_malformed_group_reply_is_the_replicas_fault(reply: Reply) -> None:
    t = FakeTransport()
    t.many_reply = reply
    c = Coalescer(t, max_items=64, max_bytes=1 << 20)
    results = await asyncio.gather(call(c, 0), call(c, 1), return_exceptions=True)
    assert all(isinstance(r, ReplicaUnavailable) for r in results), results


async def test_a_group_refused_whole_gives_every_call_the_replicas_answer() -> None:
    t = FakeTransport()
    t.many_reply = Reply(503, codec.encode({"error": {"code": "unavailable"}}))
    c = Coalescer(t, max_items=64, max_bytes=1 << 20)
    replies = await asyncio.gather(call(c, 0), call(c, 1))
    assert [r.status for r in replies] == [503, 503]


async def test_a_reply_too_large_is_retried_call_by_call() -> None:
    class Large(FakeTransport):
        async def request(self, address: Address, method: str, path: str, body: bytes,
                          headers: list[tuple[bytes, bytes]], timeout_s: float) -> Reply:
            reply = await super().request(address, method, path, body, headers, timeout_s)
            if path.startswith("/invoke-many/") or body == b"b1":
                raise ResponseTooLarge("over the limit")
            return reply

    t = Large()
    c = Coalescer(t, max_items=64, max_bytes=1 << 20)
    results = await asyncio.gather(call(c, 0), call(c, 1), return_exceptions=True)
    assert isinstance(results[0], Reply) and results[0].body == b"one:b0"
    assert isinstance(results[1], ResponseTooLarge)  # only the call whose answer is large


async def test_a_call_that_times_out_leaves_and_the_others_get_their_replies() -> None:
    t = FakeTransport(delay_s=0.2)
    c = Coalescer(t, max_items=64, max_bytes=1 << 20)
    results = await asyncio.gather(call(c, 0, timeout_s=0.02), call(c, 1),
                                   return_exceptions=True)
    assert isinstance(results[0], ReplicaTimeout)
    assert isinstance(results[1], Reply) and results[1].body == b"many:b1"
    assert t.cancelled == 0


async def test_when_every_call_has_left_the_exchange_is_cancelled() -> None:
    t = FakeTransport(delay_s=5.0)
    c = Coalescer(t, max_items=64, max_bytes=1 << 20)
    tasks = [asyncio.create_task(call(c, i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert len(t.sent) == 1
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0)
    assert t.cancelled == 1  # the replica sees the gateway hang up and drops the work
