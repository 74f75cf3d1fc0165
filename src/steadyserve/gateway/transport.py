"""The one wrapper for HTTP to replicas: keep-alive pools, mapped errors, one-method protocol.

`HttpTransport` is a small HTTP/1.1 client over asyncio protocols with httptools' parser.
It is hand-written because the peer is always our own replica (fixed framing, no TLS, no
redirects, no chunked uploads), and the gateway's hop cost is the product: a general client
(aiohttp, httpx) does more per request for features unused here. Not measured side by side;
what this client is held to is the echo benchmark in benchmarks/README.md (gateway plus one
replica at 0.77x a FastAPI app answering directly, p50 0.45 ms). Tests swap it for
`InProcessTransport`, which calls replica ASGI apps directly (no sockets), the way httpx's
ASGITransport does; the client itself is tested against a scripted fake network through its
injectable `connect` step (tests/unit/test_transport.py), the way httpcore tests its pool.

A connection carries one request at a time:

    idle ──request()──► waiting ──reply complete, keep-alive──► idle
                          │ reply complete with `Connection: close`, reset, malformed or
                          │ too-large reply, timeout, caller cancelled, close()
                          ▼
                        closed: never reused (a late reply would be read as the next one's)

A pool holds at most `max_connections` per replica address (idle + busy + opening). A caller
over the limit waits in line; a freed connection, or the slot of a closed one, is handed to
the first waiter directly, so a request arriving later cannot take it. A waiter that is
handed something and cancelled at that moment passes it on to the next one. `forget()`
closes busy connections too (their requests fail at once as ConnectionLost), fails the
waiters at once, and the pool's late releases count nothing anywhere.

Errors map to ours: connect refused → ConnectionRefused, other connect failures and connect
timeouts → ReplicaUnavailable, reset mid-request → ConnectionLost, unparsable reply →
ReplicaUnavailable, reply over `max_response_bytes` → ResponseTooLarge, no answer within the
request's timeout → ReplicaTimeout.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httptools

from ..errors import (
    ConnectionLost,
    ConnectionRefused,
    ReplicaTimeout,
    ReplicaUnavailable,
    ResponseTooLarge,
)

MiB = 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 256 * MiB  # config.GatewayConfig.max_upstream_response_bytes
MAX_HEAD_BYTES = 64 * 1024  # status line and headers: our replica sends two headers


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


class Upstream(Protocol):
    """A replica's streamed reply (replica.streaming): one JSON frame per line."""

    status: int

    async def body(self) -> bytes:
        """The whole body of a reply that is not a stream (status != 200: an error)."""

    async def line(self, timeout_s: float) -> bytes:
        """The next frame, with its newline; b"" when the replica ended the reply."""

    async def close(self) -> None:
        """Done with it: a reply not read to its end closes the connection (the replica
        sees the hang-up and stops the generator)."""


class Transport(Protocol):
    async def request(
        self, address: Address, method: str, path: str, body: bytes,
        headers: list[tuple[bytes, bytes]], timeout_s: float,
    ) -> Reply: ...

    async def open_stream(
        self, address: Address, path: str, body: bytes, headers: list[tuple[bytes, bytes]],
        timeout_s: float,
    ) -> Upstream:
        """POST and return once the reply's head arrived (within `timeout_s`)."""

    def set_max_connections(self, address: Address, max_connections: int) -> None:
        """Cap the connections to one replica (its deployment's `max_connections_per_replica`);
        the control plane calls it when the replica starts."""

    def forget(self, address: Address) -> None:
        """Close every connection to a replica that left rotation (in-flight requests fail
        with ReplicaUnavailable and are retried elsewhere)."""

    async def close(self) -> None: ...


class Connection(asyncio.Protocol):
    """One keep-alive connection to a replica, one request at a time (the module docstring
    draws its states)."""

    __slots__ = ("_body", "_closed", "_limit", "_parser", "_received", "_size", "_waiter",
                 "transport")

    def __init__(self, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Reply] | None = None
        self._body: list[bytes] = []
        self._size = 0  # body bytes of the reply being read
        self._received = 0  # all bytes of the reply being read: bounds the head too
        self._limit = max_response_bytes
        self._closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return  # the rest of a reply we gave up on (too large, timed out)
        if self._waiter is None or self._waiter.done():
            self.close()  # bytes nobody asked for: the stream is out of step with our requests
            return
        self._received += len(data)
        if self._received > self._limit + MAX_HEAD_BYTES:
            self._too_large(f"more than {self._limit} bytes")
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ReplicaUnavailable(f"malformed response from replica: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._fail(ConnectionLost("connection to replica lost mid-request"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                return  # the parser refuses it itself
            if declared > self._limit:
                self._too_large(f"{declared} bytes")

    def on_body(self, body: bytes) -> None:
        if self._closed:
            return
        self._size += len(body)
        if self._size > self._limit:
            self._too_large(f"more than {self._limit} bytes")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._closed:
            return
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.close()  # a second reply to one request: out of step, as above
            return
        waiter.set_result(Reply(self._parser.get_status_code(), b"".join(self._body)))
        if not self._parser.should_keep_alive():
            self.close()

    # ours
    @property
    def usable(self) -> bool:
        """Idle and open: may carry the next request."""
        return not self._closed and self._waiter is None

    def _too_large(self, size: str) -> None:
        self._fail(ResponseTooLarge(f"the replica's answer is {size}, over the gateway's limit "
                                    f"of {self._limit} bytes (max_upstream_response_bytes)"))
        self.close()  # the rest of it would be read as the next reply

    def _fail(self, exc: Exception) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        """Close now; a request in flight fails at once (not when the loop reports the close)."""
        self._closed = True
        self._fail(ConnectionLost("connection to replica closed mid-request"))
        if self.transport is not None:
            self.transport.close()

    async def request(self, head: bytes, body: bytes, timeout_s: float, address: Address) -> Reply:
        if self.transport is None or not self.usable:
            raise ReplicaUnavailable(f"connection to {address} is closed")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Reply] = loop.create_future()
        self._waiter = waiter
        self._body = []
        self._size = self._received = 0
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


ConnectionFactory = Callable[[], Connection]
Connect = Callable[[Address, ConnectionFactory], Coroutine[Any, Any, Connection]]
"""Open a connection to a replica: build the protocol with the factory and attach it to a
transport. The pool bounds it with its connect timeout and cancels it when it gives up."""


async def tcp_connect(address: Address, factory: ConnectionFactory) -> Connection:
    """The real network: a TCP connection (asyncio sets TCP_NODELAY itself)."""
    loop = asyncio.get_running_loop()
    try:
        _, protocol = await loop.create_connection(factory, address.host, address.port)
    except ConnectionRefusedError as exc:
        raise ConnectionRefused(f"cannot connect to {address}: {exc}") from exc
    except OSError as exc:
        raise ReplicaUnavailable(f"cannot connect to {address}: {exc}") from exc
    return protocol


class _Pool:
    """The connections to one replica address (the module docstring says how it lends them).

    Invariant: a waiter exists only while every connection is busy or opening, so `idle` is
    empty whenever `waiters` is not; what frees up goes to the first live waiter."""

    def __init__(self, address: Address, max_connections: int, connect: Connect,
                 factory: ConnectionFactory, connect_timeout_s: float) -> None:
        self.address = address
        self.max_connections = max_connections
        self.connect = connect
        self.factory = factory
        self.connect_timeout_s = connect_timeout_s
        self.idle: deque[Connection] = deque()
        self.busy: set[Connection] = set()
        self.opening = 0  # slots held by connects in flight, or handed to a waiter to open
        # each is handed a busy connection, or None: a slot (counted in `opening`) to open one
        self.waiters: deque[asyncio.Future[Connection | None]] = deque()
        self.closed = False

    @property
    def size(self) -> int:
        # derived, never a counter of its own: a late release after close() cannot skew it
        return len(self.idle) + len(self.busy) + self.opening

    def try_acquire(self) -> Connection | None:
        """An idle connection at once, if any (the hot path: no await)."""
        while self.idle:
            conn = self.idle.pop()  # most recently used: warm, least likely closed
            if conn.usable:
                self.busy.add(conn)
                return conn
            # the replica closed it while idle: dropped, its slot is free (size shrank)
        return None

    async def acquire(self, timeout_s: float) -> Connection:
        if self.closed:
            raise ReplicaUnavailable(f"replica {self.address} left rotation")
        conn = self.try_acquire()
        if conn is not None:
            return conn
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self.size < self.max_connections and self._nobody_waiting():
            self.opening += 1
        else:
            handed = await self._wait(loop, timeout_s)
            if handed is not None:
                return handed
        return await self._open(loop, deadline - loop.time())

    def _nobody_waiting(self) -> bool:
        # waiters that timed out or were cancelled may still be queued until their tasks run
        while self.waiters and self.waiters[0].done():
            self.waiters.popleft()
        return not self.waiters

    async def _wait(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> Connection | None:
        waiter: asyncio.Future[Connection | None] = loop.create_future()
        self.waiters.append(waiter)
        # a timer, not asyncio.wait_for: the handover and the timeout cannot both happen
        timer = loop.call_later(max(0.0, timeout_s), self._expire, waiter, timeout_s)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # handed a connection or a slot as we were cancelled: pass it on, or the next
                # in line would wait for a wake-up that already happened
                self._pass_on(waiter.result())
            else:
                self._drop_waiter(waiter)
            raise
        finally:
            timer.cancel()

    def _expire(self, waiter: asyncio.Future[Connection | None], timeout_s: float) -> None:
        if not waiter.done():
            self._drop_waiter(waiter)
            waiter.set_exception(ReplicaTimeout(
                f"no connection to {self.address} free within {timeout_s:.3f}s "
                f"({self.max_connections} busy)"))

    def _drop_waiter(self, waiter: asyncio.Future[Connection | None]) -> None:
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass

    def _pass_on(self, handed: Connection | None) -> None:
        if handed is None:
            self.opening -= 1
            self._fill()
        else:
            self.busy.discard(handed)
            self._give(handed)

    async def _open(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> Connection:
        """Open a connection in the slot already counted in `opening`."""
        task = loop.create_task(self.connect(self.address, self.factory))
        try:
            # asyncio.wait, not wait_for: a connect that completes as we give up is not lost,
            # _abandon gives it to the pool
            done, _ = await asyncio.wait((task,), timeout=max(0.0, min(timeout_s,
                                                                         self.connect_timeout_s)))
        except BaseException:
            self._abandon(task)
            raise
        if not done:
            self._abandon(task)
            if self.connect_timeout_s <= timeout_s:
                raise ReplicaUnavailable(f"connect to {self.address} timed out "
                                         f"({self.connect_timeout_s:.3f}s)")
            raise ReplicaTimeout(f"no connection to {self.address} within {timeout_s:.3f}s")
        self.opening -= 1
        try:
            conn = task.result()
        except BaseException:
            self._fill()  # the slot is free again: the next in line tries its own connect
            raise
        if self.closed:
            conn.close()
            raise ReplicaUnavailable(f"replica {self.address} left rotation")
        self.busy.add(conn)
        return conn

    def _abandon(self, task: asyncio.Task[Connection]) -> None:
        task.cancel()
        task.add_done_callback(self._abandoned)

    def _abandoned(self, task: asyncio.Task[Connection]) -> None:
        self.opening -= 1
        if not task.cancelled() and task.exception() is None:
            self._give(task.result())  # it opened after all: for the next in line
        else:
            self._fill()

    def release(self, conn: Connection) -> None:
        if conn not in self.busy:
            conn.close()  # lent before close(): this pool counts it nowhere any more
            return
        self.busy.remove(conn)
        self._give(conn)

    def _give(self, conn: Connection) -> None:
        """A connection nobody holds (not counted in `size`): to the first waiter, or idle."""
        if self.closed or not conn.usable or self.size >= self.max_connections:
            conn.close()  # over a lowered limit, or not reusable
            self._fill()
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.busy.add(conn)
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    def _fill(self) -> None:
        """Hand free slots to waiters, each to open its own connection."""
        while self.waiters and not self.closed and self.size < self.max_connections:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.opening += 1
                waiter.set_result(None)

    def resize(self, max_connections: int) -> None:
        self.max_connections = max_connections
        while self.idle and self.size > max_connections:
            self.idle.popleft().close()  # the least recently used first; busy ones on release
        self._fill()

    def close(self) -> None:
        """Close every connection, busy ones too: their requests fail as 'connection lost'
        (retryable), which is what a replica taken out of rotation needs."""
        self.closed = True
        conns = [*self.idle, *self.busy]
        self.idle.clear()
        self.busy.clear()
        for conn in conns:
            conn.close()
        waiters = list(self.waiters)
        self.waiters.clear()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(ReplicaUnavailable(f"replica {self.address} left rotation"))


class HttpTransport:
    """Keep-alive HTTP/1.1 to replicas. `max_connections` applies to an address until
    `set_max_connections` names its own; that stays across `forget` (it describes the
    deployment, and the control plane sets it again when a replica starts)."""

    def __init__(
        self, *, max_connections: int = 256, connect_timeout_s: float = 1.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES, connect: Connect = tcp_connect,
    ) -> None:
        self._pools: dict[Address, _Pool] = {}
        self._limits: dict[Address, int] = {}
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.max_response_bytes = max_response_bytes
        self._connect = connect
        self._session: Any = None  # aiohttp.ClientSession for streams (open_stream)

    def _new_connection(self) -> Connection:
        return Connection(self.max_response_bytes)

    def _pool(self, address: Address) -> _Pool:
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = _Pool(
                address, self._limits.get(address, self.max_connections), self._connect,
                self._new_connection, self.connect_timeout_s)
        return pool

    async def request(
        self, address: Address, method: str, path: str, body: bytes,
        headers: list[tuple[bytes, bytes]], timeout_s: float,
    ) -> Reply:
        pool = self._pool(address)
        head = b"".join((
            method.encode(), b" ", path.encode(), b" HTTP/1.1\r\nhost: ", str(address).encode(),
            b"\r\ncontent-length: ", str(len(body)).encode(), b"\r\n",
            *(k + b": " + v + b"\r\n" for k, v in headers), b"\r\n",
        ))
        conn = pool.try_acquire()
        if conn is None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            conn = await pool.acquire(timeout_s)
            timeout_s -= loop.time() - started  # the wait for a connection is part of it
            if timeout_s <= 0:
                pool.release(conn)
                raise ReplicaTimeout(f"no connection to {address} in time")
        try:
            return await conn.request(head, body, timeout_s, address)
        except BaseException:
            conn.close()  # cancelled or failed mid-request: never reused
            raise
        finally:
            pool.release(conn)

    async def open_stream(
        self, address: Address, path: str, body: bytes, headers: list[tuple[bytes, bytes]],
        timeout_s: float,
    ) -> Upstream:
        """Streams go through aiohttp, not the hand-written client above: a stream lasts
        long enough that the per-request cost of a general client does not count, and its
        chunked decoding and line reading are well kept. One session, made on first use."""
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=self.max_connections),
                auto_decompress=False)
        url = f"http://{address}{path}"
        try:
            resp = await asyncio.wait_for(self._session.post(
                url, data=body, headers=[(k.decode(), v.decode()) for k, v in headers],
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s)),
                timeout_s)
        except TimeoutError:
            raise ReplicaTimeout(f"replica {address} did not answer within {timeout_s:.3f}s") \
                from None
        except aiohttp.ClientConnectorError as exc:
            raise ConnectionRefused(f"cannot connect to {address}: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectionLost(f"connection to {address} lost: {exc}") from None
        return _HttpUpstream(resp, address, self.max_response_bytes)

    def set_max_connections(self, address: Address, max_connections: int) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self._limits[address] = max_connections
        pool = self._pools.get(address)
        if pool is not None:
            pool.resize(max_connections)

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
        if self._session is not None:
            await self._session.close()
            self._session = None


class _HttpUpstream:
    def __init__(self, resp: Any, address: Address, max_line_bytes: int) -> None:
        self.resp = resp
        self.status = int(resp.status)
        self.address = address
        self.max_line_bytes = max_line_bytes

    async def body(self) -> bytes:
        data: bytes = await self.resp.content.read(self.max_line_bytes)
        return data

    async def line(self, timeout_s: float) -> bytes:
        import aiohttp
        from aiohttp.http_exceptions import LineTooLong

        try:
            data: bytes = await asyncio.wait_for(
                self.resp.content.readline(max_line_length=self.max_line_bytes), timeout_s)
        except TimeoutError:
            raise ReplicaTimeout(f"replica {self.address} sent nothing for {timeout_s:.3f}s") \
                from None
        except LineTooLong:
            raise ResponseTooLarge(f"a streamed item from {self.address} is over "
                                   f"{self.max_line_bytes:,} bytes") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectionLost(f"stream from {self.address} lost: {exc}") from None
        return data

    async def close(self) -> None:
        if self.resp.content.at_eof():
            self.resp.release()  # read to its end: the connection may serve another
        else:
            self.resp.close()


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

    async def open_stream(
        self, address: Address, path: str, body: bytes, headers: list[tuple[bytes, bytes]],
        timeout_s: float,
    ) -> Upstream:
        self.calls += 1
        app = self.apps.get(address)
        if app is None:
            raise ReplicaUnavailable(f"cannot connect to {address}: no such in-process replica")
        up = _InProcessUpstream(app, {"type": "http", "method": "POST", "path": path,
                                      "headers": headers, "query_string": b""}, body)
        await up.started(timeout_s, address)
        return up

    def set_max_connections(self, address: Address, max_connections: int) -> None:
        pass  # no connections to cap: each request is a direct call

    def forget(self, address: Address) -> None:
        pass

    async def close(self) -> None:
        pass


class _InProcessUpstream:
    """A replica app's streamed reply in this process: its sends queued as they come."""

    def __init__(self, app: AsgiApp, scope: dict[str, Any], body: bytes) -> None:
        self.status = 0
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.buffer = b""
        self.head = asyncio.Event()
        self.hangup = asyncio.Event()
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                await self.hangup.wait()
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                self.head.set()
            elif message["type"] == "http.response.body":
                self.chunks.put_nowait(message.get("body", b""))
                if not message.get("more_body"):
                    self.chunks.put_nowait(None)

        async def run() -> None:
            try:
                await app(scope, receive, send)
            finally:
                self.head.set()
                self.chunks.put_nowait(None)

        self.task = asyncio.get_running_loop().create_task(run())

    async def started(self, timeout_s: float, address: Address) -> None:
        try:
            await asyncio.wait_for(self.head.wait(), timeout_s)
        except TimeoutError:
            await self.close()
            raise ReplicaTimeout(f"replica {address} did not answer within {timeout_s:.3f}s") \
                from None

    async def body(self) -> bytes:
        parts = []
        while (chunk := await self.chunks.get()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def line(self, timeout_s: float) -> bytes:
        while b"\n" not in self.buffer:
            try:
                chunk = await asyncio.wait_for(self.chunks.get(), timeout_s)
            except TimeoutError:
                raise ReplicaTimeout(f"in-process replica sent nothing for {timeout_s:.3f}s") \
                    from None
            if chunk is None:
                self.chunks.put_nowait(None)
                out, self.buffer = self.buffer, b""
                return out
            self.buffer += chunk
        out, _, self.buffer = self.buffer.partition(b"\n")
        return out + b"\n"

    async def close(self) -> None:
        self.hangup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), 5)
        except (TimeoutError, Exception):
            self.task.cancel()
