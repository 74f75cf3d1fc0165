"""The HTTP edge (gateway.edge) driven with a fake transport and a hand-moved clock: limits,
timers, lingering close, the connection cap; and the request-body decoders (gateway.decoding).
The ASGI app behind the protocol is real and runs on the test's loop; no sockets."""

from __future__ import annotations

import asyncio
import gzip
import logging
import threading
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import uvicorn
import zstandard
from uvicorn.server import ServerState

from steadyserve.config import Config, DeploymentConfig, GatewayConfig
from steadyserve.errors import (
    ClientError,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from steadyserve.gateway import app as app_module
from steadyserve.gateway.app import OFF_LOOP_COMPRESS_BYTES, Gateway
from steadyserve.gateway.decoding import ZstdFrames, decoder_for
from steadyserve.gateway.edge import ConnectionTable, EdgeProtocol, Phase
from steadyserve.gateway.http import EDGE_ERROR, Request, Response
from steadyserve.gateway.transport import InProcessTransport

# ---------------------------------------------------------------------------------------------
# fakes


class FakeTimer:
    def __init__(self, when: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.when, self.callback, self.args = when, callback, args
        self.cancelled = self.fired = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """Timers on a clock the test moves; tasks on the real running loop (the app is real)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> FakeTimer:
        timer = FakeTimer(self.now + delay, callback, args)
        self.timers.append(timer)
        return timer

    def create_task(self, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        return asyncio.get_running_loop().create_task(coro)

    def live(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled and not t.fired]

    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        while True:
            due = [t for t in self.live() if t.when <= target]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.now = timer.when
            timer.fired = True
            timer.callback(*timer.args)
        self.now = target


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.eof = False
        self.closing = False
        self.aborted = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.eof, "write after write_eof"
        assert not self.closing, "write after close"
        self.written += data

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default)


# ---------------------------------------------------------------------------------------------
# the app behind the edge


class App:
    """Reads the whole body and answers 200 with its size; `x-early: 1` answers 413 without
    reading; `x-hold: 1` waits for `release` before reading. Records what it saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.disconnects: list[Any] = []
        self.release = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        self.calls += 1
        headers = dict(scope["headers"])
        if headers.get(b"x-early") == b"1":
            await _answer(send, 413, {"error": "too large"})
            return
        if headers.get(b"x-hold") == b"1":
            await self.release.wait()
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects.append(scope.get(EDGE_ERROR))
                await _answer(send, 499, {"gone": True})  # dropped: the cycle is disconnected
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await _answer(send, 200, {"bytes": size})


async def _answer(send: Any, status: int, obj: Any) -> None:
    body = orjson.dumps(obj)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


LIMITS = dict(max_request_line_bytes=1024, max_header_bytes=4096, max_headers=20,
              header_timeout_s=10.0, body_timeout_s=30.0, keepalive_timeout_s=15.0,
              max_connections=100, lingering_close_s=2.0, lingering_close_bytes=256 * 1024,
              send_timeout_s=60.0)


class Edge:
    """One configured protocol class, its server state and fake loop; `connect()` opens a
    connection."""

    def __init__(self, app: App | None = None, **overrides: Any) -> None:
        self.app = app or App()
        self.limits = GatewayConfig(**{**LIMITS, **overrides})
        self.cls = EdgeProtocol.configured(self.limits)
        self.config = uvicorn.Config(self.app, ws="none", lifespan="off", log_config=None,
                                     proxy_headers=False)
        self.config.load()
        self.state = ServerState()
        self.loop = FakeLoop()
        self.conns: list[Conn] = []

    def connect(self) -> Conn:
        protocol = self.cls(config=self.config, server_state=self.state, app_state={},
                            _loop=self.loop)
        transport = FakeTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        conn = Conn(protocol, transport)
        self.conns.append(conn)
        return conn


class Conn:
    def __init__(self, protocol: EdgeProtocol, transport: FakeTransport) -> None:
        self.protocol, self.transport = protocol, transport
        self.lost = False

    def send(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)

    def responses(self) -> list[tuple[int, dict[bytes, bytes], bytes]]:
        return parse_responses(bytes(self.transport.written))


@pytest.fixture
async def make_edge() -> Any:
    """Edges whose connections are all lost at the end, so no app task is left waiting."""
    made: list[Edge] = []

    def factory(**overrides: Any) -> Edge:
        made.append(Edge(**overrides))
        return made[-1]

    yield factory
    for edge in made:
        edge.app.release.set()
        for conn in edge.conns:
            conn.lose()
    await settle()


async def settle() -> None:
    """Let the app's task run up to its next real wait."""
    for _ in range(10):
        await asyncio.sleep(0)


def parse_responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:200]!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b": ")
            headers[name.lower()] = value
        length = int(headers[b"content-length"])
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


def assert_edge_error(response: tuple[int, dict[bytes, bytes], bytes], status: int,
                      code: str) -> dict[str, Any]:
    got_status, headers, body = response
    assert got_status == status
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"connection"] == b"close"
    error = orjson.loads(body)["error"]
    assert error["code"] == code and error["param"] is None and error["message"]
    return dict(error)


def assert_lingering_then_closed(edge: Edge, conn: Conn) -> None:
    """Answered: write side shut (FIN after the answer), still reading; closed at the end of
    lingering_close_s, and no timer left once the loop reports the loss."""
    assert conn.transport.eof and not conn.transport.closing
    edge.loop.advance(edge.limits.lingering_close_s - 0.05)  # the answer may be ≤ 0.05 s old
    assert not conn.transport.closing
    edge.loop.advance(0.1)
    assert conn.transport.closing
    conn.lose()
    assert edge.loop.live() == []


GET = b"GET /x HTTP/1.1\r\nhost: gw\r\n\r\n"


# ---------------------------------------------------------------------------------------------
# request line and headers


@pytest.mark.parametrize(("url_len", "status"), [(1024 - 3 - 12, 200), (1024 - 3 - 12 + 1, 414)])
async def test_the_request_line_limit_counts_method_target_and_version(url_len, status, make_edge):
    edge = make_edge()
    conn = edge.connect()
    conn.send(b"GET /" + b"a" * (url_len - 1) + b" HTTP/1.1\r\nhost: gw\r\n\r\n")
    await settle()
    [response] = conn.responses()
    assert response[0] == status
    if status == 414:
        assert_edge_error(response, 414, "uri_too_long")
        assert edge.app.calls == 0


async def test_a_long_request_line_is_refused_while_it_still_arrives(make_edge):
    edge = make_edge()
    conn = edge.connect()
    conn.send(b"GET /")
    fed = 5
    while not conn.transport.written:
        conn.send(b"a" * 256)
        fed += 256
    assert fed <= edge.limits.max_request_line_bytes + 256
    assert_edge_error(conn.responses()[0], 414, "uri_too_long")
    assert_lingering_then_closed(edge, conn)


async def test_a_20_mb_header_line_is_cut_at_the_head_budget_before_its_memory_is_spent(make_edge):
    edge = make_edge(lingering_close_bytes=1 << 20)
    conn = edge.connect()
    piece = b"a" * 65536  # one object sent 320 times: the sender's own memory stays flat
    tracemalloc.start()
    try:
        conn.send(b"GET / HTTP/1.1\r\nhost: gw\r\nx-big: ")
        for _ in range(20 * 1024 * 1024 // len(piece)):
            if conn.transport.closing:
                break
            conn.send(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the budget is 1 KiB + 4 KiB; httptools held at most that much of the header
    assert peak < 512 * 1024, peak
    assert_edge_error(conn.responses()[0], 431, "headers_too_large")
    # the rest was read and dropped up to lingering_close_bytes, then the connection closed
    assert conn.transport.closing
    assert edge.app.calls == 0


async def test_more_header_fields_than_max_headers_is_431(make_edge):
    edge = make_edge()
    conn = edge.connect()
    conn.send(b"GET / HTTP/1.1\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(21)) + b"\r\n")
    error = assert_edge_error(conn.responses()[0], 431, "headers_too_large")
    assert "max_headers" in error["message"]
    assert edge.app.calls == 0


async def test_a_header_section_over_max_header_bytes_is_431_even_in_small_fields(make_edge):
    edge = make_edge()
    conn = edge.connect()
    fields = b"".join(b"x-%d: %s\r\n" % (i, b"v" * 300) for i in range(15))  # 15 × ~306 B
    conn.send(b"GET / HTTP/1.1\r\n" + fields + b"\r\n")
    error = assert_edge_error(conn.responses()[0], 431, "headers_too_large")
    assert "max_header_bytes" in error["message"]


async def test_invalid_http_is_a_json_400(make_edge):
    edge = make_edge()
    conn = edge.connect()
    conn.send(b"\x00\x01 / HTTP/1.1\r\n\r\n")
    assert_edge_error(conn.responses()[0], 400, "invalid_request")
    assert_lingering_then_closed(edge, conn)


@pytest.mark.parametrize("head", [
    b"GET /ws HTTP/1.1\r\nhost: gw\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: gw\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
    b"http2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
    b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
], ids=["websocket", "h2c", "connect"])
async def test_upgrades_are_refused_without_reaching_the_app_or_the_error_log(head, caplog, make_edge):
    edge = make_edge()
    conn = edge.connect()
    with caplog.at_level(logging.DEBUG):
        conn.send(head)
        await settle()
    error = assert_edge_error(conn.responses()[0], 400, "invalid_request")
    assert "upgrade" in error["message"]
    assert edge.app.calls == 0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert_lingering_then_closed(edge, conn)


# ---------------------------------------------------------------------------------------------
# timers


async def test_headers_slower_than_header_timeout_get_408_even_when_trickled(make_edge):
    edge = make_edge()
    conn = edge.connect()
    head = b"GET / HTTP/1.1\r\nhost: gw\r\nx-a: 1\r\n"
    for byte in head:  # slowloris: one byte a second restarts nothing
        conn.send(bytes([byte]))
        edge.loop.advance(0.25)
    edge.loop.advance(edge.limits.header_timeout_s - 0.25 * len(head) - 0.01)
    assert conn.transport.written == b""
    edge.loop.advance(0.02)
    assert_edge_error(conn.responses()[0], 408, "request_timeout")
    assert_lingering_then_closed(edge, conn)


@pytest.mark.parametrize("request_bytes", [
    b"POST / HTTP/1.1\r\nhost: gw\r\ncontent-length: 10\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n",
], ids=["short-content-length", "unterminated-chunked"])
async def test_a_body_that_stops_short_gets_408_and_the_app_learns_why(request_bytes, make_edge):
    edge = make_edge()
    conn = edge.connect()
    conn.send(request_bytes)
    await settle()
    edge.loop.advance(edge.limits.body_timeout_s - 0.01)
    assert conn.transport.written == b""
    edge.loop.advance(0.02)
    await settle()
    # only the edge's answer: the app's own (499 here) went nowhere
    [response] = conn.responses()
    assert_edge_error(response, 408, "request_timeout")
    [reason] = edge.app.disconnects
    assert isinstance(reason, RequestTimeout)
    assert_lingering_then_closed(edge, conn)


async def test_the_body_timer_waits_while_the_gateway_is_not_reading(make_edge):
    edge = make_edge()
    conn = edge.connect()
    conn.send(b"POST / HTTP/1.1\r\nhost: gw\r\nx-hold: 1\r\ncontent-length: 100000\r\n\r\n")
    conn.send(b"x" * 70000)  # over uvicorn's 64 KiB buffer: it stops reading
    await settle()
    assert conn.transport.paused
    edge.loop.advance(edge.limits.body_timeout_s * 3)  # the app, not the client, is slow
    assert conn.transport.written == b""
    edge.app.release.set()
    await settle()
    assert not conn.transport.paused
    conn.send(b"x" * 30000)
    await settle()
    [(status, headers, body)] = conn.responses()
    assert (status, orjson.loads(body)) == (200, {"bytes": 100000})
    assert b"connection" not in headers  # kept alive


async def test_a_connection_that_never_sends_a_byte_is_closed_after_keepalive_timeout(make_edge):
    edge = make_edge()
    conn = edge.connect()
    edge.loop.advance(edge.limits.keepalive_timeout_s - 0.01)
    conn.send(b"\r\n")  # blank lines are no activity
    assert not conn.transport.closing
    edge.loop.advance(0.02)
    assert conn.transport.closing and conn.transport.written == b""
    conn.lose()
    assert edge.loop.live() == []


async def test_an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not(make_edge):
    edge = make_edge()
    conn = edge.connect()
    conn.send(GET)
    await settle()
    [(status, headers, _)] = conn.responses()
    assert status == 200 and b"connection" not in headers
    assert conn.protocol.phase is Phase.WAIT
    edge.loop.advance(edge.limits.keepalive_timeout_s - 0.01)
    conn.send(GET)  # a second request on the same connection
    await settle()
    assert len(conn.responses()) == 2 and not conn.transport.closing
    edge.loop.advance(edge.limits.keepalive_timeout_s + 0.01)
    assert conn.transport.closing
    conn.lose()
    assert edge.loop.live() == []


@pytest.mark.parametrize("phase", ["wait", "head", "body", "done", "lingering"])
async def test_every_timer_is_cancelled_when_the_connection_is_lost(phase, make_edge):
    edge = make_edge()
    conn = edge.connect()
    if phase == "head":
        conn.send(b"GET / HTTP/1.1\r\n")
    elif phase == "body":
        conn.send(b"POST / HTTP/1.1\r\nhost: gw\r\ncontent-length: 5\r\n\r\nab")
    elif phase == "done":
        conn.send(b"GET / HTTP/1.1\r\nhost: gw\r\nx-hold: 1\r\n\r\n")
    elif phase == "lingering":
        conn.send(b"GET /" + b"a" * 2000)
    await settle()
    assert conn.protocol.phase.value == ("closing" if phase == "lingering" else phase)
    conn.lose()
    assert edge.loop.live() == []
    assert len(edge.cls.table) == 0
    edge.app.release.set()
    await settle()


# ---------------------------------------------------------------------------------------------
# early answers and lingering close


@pytest.mark.parametrize("client_connection", [b"close", b"keep-alive"])
async def test_an_early_answer_closes_with_a_lingering_close(client_connection, make_edge):
    edge = make_edge()
    conn = edge.connect()
    conn.send(b"POST / HTTP/1.1\r\nhost: gw\r\nx-early: 1\r\nconnection: " + client_connection
              + b"\r\ncontent-length: 2097152\r\n\r\n" + b"x" * 1000)
    await settle()
    [response] = conn.responses()
    assert response[0] == 413 and response[1][b"connection"] == b"close"
    # the answer is flushed and followed by FIN, and the rest of the body is still read
    assert conn.transport.eof and not conn.transport.closing
    conn.send(b"x" * (edge.limits.lingering_close_bytes - 1000))
    assert not conn.transport.closing
    conn.send(b"x" * 1001)  # past lingering_close_bytes: enough
    assert conn.transport.closing
    assert len(conn.responses()) == 1  # nothing of the body was parsed as a request
    conn.lose()
    assert edge.loop.live() == []


async def test_lingering_ends_after_lingering_close_s(make_edge):
    edge = make_edge()
    conn = edge.connect()
    conn.send(b"POST / HTTP/1.1\r\nhost: gw\r\nx-early: 1\r\ncontent-length: 50000\r\n\r\n")
    await settle()
    assert conn.responses()[0][0] == 413
    conn.send(b"x" * 100)
    assert_lingering_then_closed(edge, conn)


async def test_a_client_that_neither_sends_nor_reads_cannot_hold_an_early_answer(make_edge):
    edge = make_edge()
    conn = edge.connect()
    conn.protocol.pause_writing()  # the client does not read: its window is full
    conn.send(b"POST / HTTP/1.1\r\nhost: gw\r\nx-early: 1\r\ncontent-length: 50000\r\n\r\nab")
    await settle()
    assert conn.transport.written == b""  # the app's 413 waits for the client to read
    edge.loop.advance(edge.limits.body_timeout_s + 0.01)
    await settle()
    assert_edge_error(conn.responses()[0], 408, "request_timeout")
    assert_lingering_then_closed(edge, conn)


async def test_an_answer_after_the_whole_body_keeps_the_connection_alive(make_edge):
    edge = make_edge()
    conn = edge.connect()
    conn.send(b"POST / HTTP/1.1\r\nhost: gw\r\ncontent-length: 3\r\n\r\nabc")
    await settle()
    [(status, headers, body)] = conn.responses()
    assert (status, orjson.loads(body)) == (200, {"bytes": 3})
    assert b"connection" not in headers and not conn.transport.eof
    assert conn.protocol.phase is Phase.WAIT


async def test_connection_close_after_a_whole_body_closes_at_once(make_edge):
    edge = make_edge()
    conn = edge.connect()
    conn.send(b"POST / HTTP/1.1\r\nhost: gw\r\nconnection: close\r\ncontent-length: 3\r\n\r\nabc")
    await settle()
    [(status, headers, _)] = conn.responses()
    assert status == 200 and headers[b"connection"] == b"close"
    assert conn.transport.closing  # nothing unread: a plain close


async def test_an_edge_answer_waits_for_the_response_ahead_of_it(make_edge):
    edge = make_edge()
    conn = edge.connect()
    # a pipelined client: a request the app holds, then one with a request line too long
    conn.send(b"GET /1 HTTP/1.1\r\nhost: gw\r\nx-hold: 1\r\n\r\nGET /" + b"a" * 2000)
    await settle()
    assert conn.transport.written == b""  # the 414 must not cut in before the first answer
    edge.app.release.set()
    await settle()
    first, second = conn.responses()
    assert first[0] == 200
    assert_edge_error(second, 414, "uri_too_long")
    assert_lingering_then_closed(edge, conn)


# ---------------------------------------------------------------------------------------------
# the connection cap


async def test_at_the_cap_the_longest_idle_connection_makes_room(make_edge):
    edge = make_edge(max_connections=2)
    a = edge.connect()
    edge.loop.advance(1)
    b = edge.connect()
    edge.loop.advance(1)
    a.send(GET)  # a works, then is idle again: now the most recently idle
    await settle()
    edge.loop.advance(1)
    c = edge.connect()
    assert b.transport.closing and b.transport.written == b""
    assert not a.transport.closing and not c.transport.closing
    assert len(edge.cls.table) == 2


async def test_at_the_cap_with_none_idle_a_new_connection_gets_503_with_retry_after(make_edge):
    edge = make_edge(max_connections=2)
    a, b = edge.connect(), edge.connect()
    a.send(b"GET / HTTP/1.1\r\n")  # both in the middle of a request
    b.send(b"POST / HTTP/1.1\r\nhost: gw\r\ncontent-length: 9\r\n\r\n")
    c = edge.connect()
    error = assert_edge_error(c.responses()[0], 503, "overloaded")
    assert "max_connections" in error["message"]
    assert c.responses()[0][1][b"retry-after"] == b"1"
    assert not a.transport.closing and not b.transport.closing
    # the refused connection lingers and is the first to go if room is needed again
    d = edge.connect()
    assert c.transport.closing
    assert d.transport.written == b"" and not d.transport.closing


async def test_a_closed_connection_frees_its_slot_at_once(make_edge):
    edge = make_edge(max_connections=1)
    a = edge.connect()
    a.send(b"GET / HTTP/1.1\r\n")
    edge.loop.advance(edge.limits.header_timeout_s)  # 408, lingering: evictable
    b = edge.connect()
    assert a.transport.closing and b.transport.written == b""


def test_connection_table_orders_lingering_then_longest_idle():
    table: ConnectionTable[str] = ConnectionTable(limit=3)
    for name in "abcd":
        table.open(name)
    assert table.over_limit() and len(table) == 4
    assert table.evictable() is None  # all busy
    table.idle("c", 1.0)
    table.idle("a", 2.0)
    assert table.evictable() == "c"
    table.busy("c")
    assert table.evictable() == "a"
    table.closing("d")
    assert table.evictable() == "d"
    table.discard("d")
    table.discard("d")  # idempotent
    assert table.evictable() == "a" and table.idle_since("a") == 2.0
    assert not table.over_limit()


# ---------------------------------------------------------------------------------------------
# request bodies with a Content-Encoding


def request_with(body_chunks: list[bytes], headers: list[tuple[bytes, bytes]],
                 scope_extra: dict[str, Any] | None = None) -> Request:
    messages = [{"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1}
                for i, c in enumerate(body_chunks)]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers,
             **(scope_extra or {})}
    return Request(scope, receive, "rid")


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]


def zstd_stream(data: bytes) -> bytes:
    """zstd as a streaming client writes it: no content size, several blocks."""
    out = zstandard.ZstdCompressor(level=3, write_content_size=False,
                                   write_checksum=True).compressobj()
    return out.compress(data) + out.flush()


DOC = orjson.dumps({"text": "hello wörld " * 2000, "n": list(range(500))})
ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,  # zlib-wrapped, as RFC 9110 says
    "raw-deflate": lambda d: (lambda c: c.compress(d) + c.flush())(zlib.compressobj(wbits=-15)),
    "zstd": zstd_stream,
    "gzip-two-members": lambda d: gzip.compress(d[:100]) + gzip.compress(d[100:]),
}


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
async def test_encoded_bodies_decode_whatever_the_chunking(name, chunk):
    coding = {"raw-deflate": "deflate", "gzip-two-members": "gzip"}.get(name, name)
    encoded = ENCODERS[name](DOC)
    req = request_with(split(encoded, chunk), [(b"content-encoding", coding.encode())])
    assert await req.json(1 << 20) == orjson.loads(DOC)


def zip_bomb(coding: str) -> bytes:
    zeros = b"\0" * (16 << 20)
    if coding == "deflate":
        return zlib.compress(zeros, 9)
    # gzip members and zstd frames concatenate: 16 × 16 MiB decoded, cheap to build
    return (gzip.compress(zeros, 9) if coding == "gzip" else zstd_stream(zeros)) * 16


@pytest.mark.parametrize("coding", ["gzip", "zstd", "deflate"])
async def test_a_zip_bomb_is_413_before_its_memory_is_spent(coding):
    bomb = zip_bomb(coding)
    limit = 1 << 20
    assert len(bomb) < limit  # it passes the raw limit: only its decoded size is too big
    req = request_with(split(bomb, 65536), [(b"content-encoding", coding.encode())])
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge, match="decodes to more than"):
            await req.body(limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * limit, peak


@pytest.mark.parametrize("coding", ["gzip", "zstd", "deflate"])
async def test_a_truncated_encoded_body_is_400(coding):
    encoded = {"gzip": gzip.compress, "zstd": zstd_stream, "deflate": zlib.compress}[coding](DOC)
    req = request_with([encoded[:-5]], [(b"content-encoding", coding.encode())])
    with pytest.raises(ClientError, match=f"ends inside its {coding} stream"):
        await req.body(1 << 20)


async def test_garbage_under_a_content_encoding_is_400_not_a_json_error():
    req = request_with([b'{"text": "not compressed"}'], [(b"content-encoding", b"gzip")])
    with pytest.raises(ClientError, match="invalid gzip request body"):
        await req.body(1 << 20)


@pytest.mark.parametrize(("value", "shown"), [("br", "'br'"), ("gzip, zstd", "'gzip, zstd'"),
                                              ("compress", "'compress'")])
def test_other_content_encodings_are_415_naming_them(value, shown):
    with pytest.raises(UnsupportedMediaType) as info:
        decoder_for(value)
    assert shown in info.value.message and info.value.status == 415


@pytest.mark.parametrize("value", [None, "", "identity", " Identity "])
def test_identity_needs_no_decoder(value):
    assert decoder_for(value) is None


def test_zstd_frames_are_complete_only_at_the_end_of_a_frame():
    data = zstd_stream(DOC) + zstandard.ZstdCompressor(level=1).compress(b"second frame")
    first_end = len(zstd_stream(DOC))
    for cut in range(len(data) + 1):
        frames = ZstdFrames()
        frames.feed(data[:cut])
        assert frames.complete == (cut in (first_end, len(data))), cut
    # byte by byte, the same answer
    frames = ZstdFrames()
    for i in range(len(data)):
        frames.feed(data[i:i + 1])
    assert frames.complete


async def test_the_edge_reason_replaces_client_disconnected():
    reason = RequestTimeout("request body not received within 30 s")
    req = request_with([], [], {EDGE_ERROR: reason})
    with pytest.raises(RequestTimeout):
        await req.body(1024)
    with pytest.raises(ClientError, match="client disconnected"):
        await request_with([], []).body(1024)


# ---------------------------------------------------------------------------------------------
# the app's side: large responses compressed off the loop, websocket scopes declined


def bare_gateway() -> Gateway:
    config = Config(deployments=(DeploymentConfig(name="e", service="tests:Echo"),),
                    gateway=GatewayConfig(compress_min_bytes=1024))
    return Gateway(config, transport=InProcessTransport())


@pytest.mark.parametrize(("size", "off_loop"), [(OFF_LOOP_COMPRESS_BYTES - 1, False),
                                                (OFF_LOOP_COMPRESS_BYTES, True)])
@pytest.mark.parametrize("coding", ["gzip", "zstd"])
async def test_large_responses_are_compressed_off_the_loop(monkeypatch, size, off_loop, coding):
    threads: list[bool] = []
    real = app_module.compress

    def spy(body: bytes, encoding: str) -> bytes:
        threads.append(threading.current_thread() is not threading.main_thread())
        return real(body, encoding)

    monkeypatch.setattr(app_module, "compress", spy)
    gateway = bare_gateway()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    payload = (b'{"v": [' + b"0.123456789, " * size)[:size]
    req = request_with([b""], [(b"accept-encoding", coding.encode())])
    await gateway._send(req, Response(200, payload), send)
    assert threads == [off_loop]
    headers = dict(sent[0]["headers"])
    assert headers[b"content-encoding"] == coding.encode()
    body = sent[1]["body"]
    assert headers[b"content-length"] == str(len(body)).encode()
    decoded = gzip.decompress(body) if coding == "gzip" else \
        zstandard.ZstdDecompressor().decompress(body)
    assert decoded == payload


async def test_a_websocket_scope_is_declined_without_an_error():
    gateway = bare_gateway()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await gateway({"type": "websocket", "path": "/ws", "headers": []}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]


async def not_reading(edge: Edge) -> Conn:
    """A connection that was answered once, and whose client then stopped reading (the
    transport says its buffer is over the high-water mark)."""
    conn = edge.connect()
    conn.send(GET)
    await settle()
    conn.protocol.pause_writing()
    return conn


@pytest.mark.parametrize("then_idle", [False, True], ids=["mid-response", "after-close"])
async def test_a_client_that_reads_nothing_is_cut_off_after_send_timeout(then_idle, make_edge):
    # the transport says its buffer is over the high-water mark: the client is not reading
    edge = make_edge(send_timeout_s=5.0, keepalive_timeout_s=2.0 if then_idle else 15.0)
    conn = await not_reading(edge)
    edge.loop.advance(2.01)
    # idle: the keep-alive timer closed it, and asyncio would wait to flush for ever
    assert conn.transport.closing is then_idle and not conn.transport.aborted
    edge.loop.advance(5.0 - 2.01 - 0.01)
    assert not conn.transport.aborted
    edge.loop.advance(0.02)
    assert conn.transport.aborted and conn.protocol.phase is Phase.CLOSING
    assert len(edge.cls.table) == 0
    conn.lose()
    assert edge.loop.live() == []


async def test_a_client_that_reads_again_in_time_keeps_its_connection(make_edge):
    edge = make_edge(send_timeout_s=5.0)
    conn = await not_reading(edge)
    edge.loop.advance(4.9)
    conn.protocol.resume_writing()  # it read: the buffer went under the low-water mark
    edge.loop.advance(10.0)
    assert not conn.transport.closing and not conn.transport.aborted
    conn.send(GET)
    await settle()
    assert [status for status, _, _ in conn.responses()] == [200, 200]
