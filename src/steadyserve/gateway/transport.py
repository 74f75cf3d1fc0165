"""The one wrapper for HTTP to replicas: keep-alive pools, mapped errors, one-method protocol.

`HttpTransport` is a small HTTP/1.1 client over asyncio protocols with httptools' parser.
It is hand-written because the peer is always our own replica (fixed framing, no TLS, no
redirects, no chunked uploads), and the gateway's hop cost is the product: a general client
(aiohttp, httpx) does more per request for features unused here. Not measured side by side;
what this client is held to is the echo benchmark in benchmarks/README.md (gateway plus one
replica at 0.77x a FastAPI app answering directly, p50 0.45 ms). Tests swap it for
`InProcessTransport`, which calls replica ASGI apps directly (no sockets), the way httpx's
ASGITransport does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httptools

from ..errors import ConnectionLost, ConnectionRefused, ReplicaTimeout, ReplicaUnavailable


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes


class Transport(Protocol):
    async def request(
        self, address: Address, method: str, path: str, body: bytes,
        headers: list[tuple[bytes, bytes]], timeout_s: float,
    ) -> Reply: ...

    def forget(self, address: Address) -> None:
        """Close every connection to a replica that left rotation (in-flight requests fail
        with ReplicaUnavailable and are retried elsewhere)."""

    async def close(self) -> None: ...


class _Connection(asyncio.Protocol):
    __slots__ = ("_body", "_closed", "_parser", "_waiter", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Reply] | None = None
        self._body: list[bytes] = []
        self._closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ReplicaUnavailable(f"malformed response from replica: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._fail(ConnectionLost("connection to replica lost mid-request"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(Reply(self._parser.get_status_code(), b"".join(self._body)))
        if not self._parser.should_keep_alive():
            self.close()

    # ours
    @property
    def usable(self) -> bool:
        return not self._closed and self._waiter is None

    def _fail(self, exc: Exception) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    async def request(self, head: bytes, body: bytes, timeout_s: float, address: Address) -> Reply:
        if self.transport is None or self._closed:
            raise ReplicaUnavailable(f"connection to {address} is closed")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Reply] = loop.create_future()
        self._waiter = waiter
        self._body = []
        if len(body) < 65536:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)
        # a timer instead of asyncio.wait_for: no extra task per request on the hot path
        timer = loop.call_later(timeout_s, self._timeout, timeout_s, address)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _timeout(self, timeout_s: float, address: Address) -> None:
        self._fail(ReplicaTimeout(f"replica {address} did not answer within {timeout_s:.3f}s"))
        self.close()  # a late reply would be read as the next request's


class _Pool:
    def __init__(self, address: Address, max_connections: int, connect_timeout_s: float) -> None:
        self.address = address
        self.idle: deque[_Connection] = deque()
        self.busy: set[_Connection] = set()
        self.size = 0
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> _Connection | None:
        while self.idle:
            conn = self.idle.pop()  # most recently used: warm, least likely closed
            if conn.usable:
                self.busy.add(conn)
                return conn
            self.size -= 1
        return None

    async def acquire(self) -> _Connection:
        while True:
            conn = self.try_acquire()
            if conn is not None:
                return conn
            if self.size < self.max_connections:
                self.size += 1
                try:
                    conn = await self._connect()
                    self.busy.add(conn)
                    return conn
                except BaseException:
                    self.size -= 1
                    self._wake_one()
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, self.address.host, self.address.port),
                self.connect_timeout_s,
            )
        except TimeoutError:
            raise ReplicaUnavailable(f"connect to {self.address} timed out") from None
        except ConnectionRefusedError as exc:
            raise ConnectionRefused(f"cannot connect to {self.address}: {exc}") from exc
        except OSError as exc:
            raise ReplicaUnavailable(f"cannot connect to {self.address}: {exc}") from exc
        return conn

    def release(self, conn: _Connection) -> None:
        self.busy.discard(conn)
        if conn.usable:
            self.idle.append(conn)
        else:
            self.size -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close every connection, busy ones too: their requests fail as 'connection lost'
        (retryable), which is what a replica taken out of rotation needs."""
        for conn in (*self.idle, *self.busy):
            conn.close()
        self.idle.clear()


class HttpTransport:
    def __init__(self, *, max_connections: int = 256, connect_timeout_s: float = 1.0) -> None:
        self._pools: dict[Address, _Pool] = {}
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s

    async def request(
        self, address: Address, method: str, path: str, body: bytes,
        headers: list[tuple[bytes, bytes]], timeout_s: float,
    ) -> Reply:
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = _Pool(address, self.max_connections, self.connect_timeout_s)
        head = b"".join((
            method.encode(), b" ", path.encode(), b" HTTP/1.1\r\nhost: ", str(address).encode(),
            b"\r\ncontent-length: ", str(len(body)).encode(), b"\r\n",
            *(k + b": " + v + b"\r\n" for k, v in headers), b"\r\n",
        ))
        conn = pool.try_acquire()
        if conn is None:
            try:
                conn = await asyncio.wait_for(pool.acquire(), timeout_s)
            except TimeoutError:
                raise ReplicaTimeout(f"no connection to {address} within {timeout_s:.3f}s") from None
        try:
            return await conn.request(head, body, timeout_s, address)
        except BaseException:
            conn.close()
            raise
        finally:
            pool.release(conn)

    def pool_stats(self) -> dict[Address, tuple[int, int]]:
        """(busy, idle) connections per replica address."""
        return {a: (len(p.busy), len(p.idle)) for a, p in self._pools.items()}

    def forget(self, address: Address) -> None:
        pool = self._pools.pop(address, None)
        if pool is not None:
            pool.close()

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


AsgiApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class InProcessTransport:
    """Calls replica ASGI apps in this process: component tests with no sockets."""

    def __init__(self, apps: dict[Address, AsgiApp] | None = None) -> None:
        self.apps: dict[Address, AsgiApp] = dict(apps or {})
        self.calls = 0

    async def request(
        self, address: Address, method: str, path: str, body: bytes,
        headers: list[tuple[bytes, bytes]], timeout_s: float,
    ) -> Reply:
        self.calls += 1
        app = self.apps.get(address)
        if app is None:
            raise ReplicaUnavailable(f"cannot connect to {address}: no such in-process replica")
        scope = {"type": "http", "method": method, "path": path, "headers": headers,
                 "query_string": b""}
        sent = False
        status = 0
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                await asyncio.Event().wait()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        try:
            await asyncio.wait_for(app(scope, receive, send), timeout_s)
        except TimeoutError:
            raise ReplicaTimeout(f"replica {address} did not answer within {timeout_s:.3f}s") from None
        except ConnectionError as exc:
            raise ReplicaUnavailable(f"connection to {address} lost mid-request") from exc
        return Reply(status, b"".join(chunks))

    def forget(self, address: Address) -> None:
        pass

    async def close(self) -> None:
        pass
