"""Calls to one batched handler on one replica, started in the same turn of the event loop,
sent as one upstream exchange.

Why: a batched handler's replica spends its own time on each HTTP exchange (parsing, the
ASGI cycle, a watcher for the gateway hanging up, a write) and the gateway on each request
(a pooled connection, a write, reading and parsing the reply). Under load, the clients a
batch answers send their next requests together, and the gateway reads them in one turn of
its loop; their calls to the same replica then travel as one `POST /invoke-many/<handler>`
and the replica's batcher sees them as before, one item list per call.

Nothing waits to be coalesced: a call is held only until the end of the loop turn it was
made in (`loop.call_soon`), and a call alone in its turn goes as a plain `/invoke/<handler>`.

The wire: the request body is msgpack `[[headers, body], ...]`, each call's own header list
(request id, deadline, input key, trace, caller) and its own msgpack body, exactly what it
would have sent alone; the reply is msgpack `[[status, payload], ...]` in the same order,
each payload the bytes a single `/invoke` would have answered. So the dispatcher sees one
`Reply` per call, and retries, ejection, admission and the response cache work per call as
before.

Per call, still:
- its own timeout: a call that gives up (its per-try timeout, or its client gone) leaves the
  group; the exchange goes on for the others, and is cancelled (the replica then drops the
  work) when every call has left;
- a failed exchange (connection lost, refused, timed out) fails every call in it, each of
  which the dispatcher retries or not by its own rules;
- a group's reply over the response limit is retried call by call, so a large answer is
  blamed on its own call only.

Bounded: at most `max_items` calls and `max_bytes` of bodies per exchange (a turn with more
starts another group).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import codec
from ..errors import ReplicaTimeout, ReplicaUnavailable, ResponseTooLarge
from .transport import Address, Reply, Transport

Headers = list[tuple[bytes, bytes]]
MANY_PREFIX = "/invoke-many/"


@dataclass(slots=True)
class _Call:
    headers: Headers
    body: bytes
    timeout_s: float
    future: asyncio.Future[Reply]


@dataclass(slots=True)
class _Group:
    address: Address
    handler: str
    calls: list[_Call] = field(default_factory=list)
    size: int = 0
    task: asyncio.Task[None] | None = None
    waiting: int = 0  # calls still waiting for their reply


class Coalescer:
    """`request` has the transport's signature for `/invoke/<handler>` calls."""

    def __init__(self, transport: Transport, *, max_items: int, max_bytes: int,
                 on_exchange: Callable[[int], None] | None = None) -> None:
        self.transport = transport
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.on_exchange = on_exchange  # called with the number of calls of each exchange
        self._open: dict[tuple[Address, str], _Group] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def request(self, address: Address, handler: str, body: bytes, headers: Headers,
                      timeout_s: float) -> Reply:
        if self.max_items < 2:
            return await self.transport.request(address, "POST", "/invoke/" + handler, body,
                                                headers, timeout_s)
        loop = asyncio.get_running_loop()
        key = (address, handler)
        group = self._open.get(key)
        if group is None or len(group.calls) >= self.max_items \
                or group.size + len(body) > self.max_bytes:
            group = self._open[key] = _Group(address, handler)
            loop.call_soon(self._send, key, group)
        call = _Call(headers, body, timeout_s, loop.create_future())
        group.calls.append(call)
        group.size += len(body)
        group.waiting += 1
        try:
            return await asyncio.wait_for(asyncio.shield(call.future), timeout_s)
        except TimeoutError:
            raise ReplicaTimeout(f"replica {address} did not answer within {timeout_s:.3f}s") \
                from None
        finally:
            group.waiting -= 1
            if group.waiting == 0 and group.task is not None and not group.task.done():
                group.task.cancel()  # nobody waits: the replica drops the work
            if not call.future.done():
                call.future.cancel()

    def _send(self, key: tuple[Address, str], group: _Group) -> None:
        if self._open.get(key) is group:
            del self._open[key]
        live = [c for c in group.calls if not c.future.done()]
        if not live:
            return
        group.calls = live
        group.task = task = asyncio.get_running_loop().create_task(self._exchange(group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _exchange(self, group: _Group) -> None:
        calls = group.calls
        if self.on_exchange is not None:
            self.on_exchange(len(calls))
        if len(calls) == 1:
            await self._alone(group, calls[0])
            return
        try:
            body = codec.encode([[c.headers, c.body] for c in calls])
            timeout_s = max(c.timeout_s for c in calls)
            try:
                reply = await self.transport.request(
                    group.address, "POST", MANY_PREFIX + group.handler, body,
                    [(b"content-type", codec.CONTENT_TYPE)], timeout_s)
            except ResponseTooLarge:  # blame the call whose answer is large, alone
                await asyncio.gather(*(self._alone(group, c) for c in calls))
                return
            parts = _split(reply, len(calls))
            for c, part in zip(calls, parts, strict=True):
                _settle(c, part)
        except asyncio.CancelledError:
            for c in calls:
                if not c.future.done():
                    c.future.cancel()
            raise
        except Exception as exc:
            for c in calls:
                if not c.future.done():
                    c.future.set_exception(exc)

    async def _alone(self, group: _Group, c: _Call) -> None:
        """One call as a plain /invoke; what fails is its own."""
        try:
            _settle(c, await self.transport.request(
                group.address, "POST", "/invoke/" + group.handler, c.body, c.headers,
                c.timeout_s))
        except Exception as exc:
            if not c.future.done():
                c.future.set_exception(exc)


def _settle(call: _Call, reply: Reply) -> None:
    if not call.future.done():
        call.future.set_result(reply)


def _split(reply: Reply, n: int) -> list[Reply]:
    """The group's reply → one Reply per call; anything else fails them all as the replica's
    fault (a replica that answers a group with one error answers every call with it)."""
    if reply.status != 200:
        return [reply] * n  # e.g. 503 while draining: every call gets the replica's answer
    try:
        parts = codec.decode(reply.body)
    except Exception:  # msgpack raises several types for garbage
        parts = None
    if not isinstance(parts, list) or len(parts) != n or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], int)
            and isinstance(p[1], bytes) for p in parts):
        raise ReplicaUnavailable("replica sent a malformed reply to a coalesced call")
    return [Reply(status, payload) for status, payload in parts]
