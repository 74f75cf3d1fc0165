"""The gateway's HTTP edge: every byte and every connection a client holds is bounded here,
before it costs memory or a slot (DESIGN.md §7). The ASGI app never sees what the edge refuses.

A connection's parser is always in one phase, and each phase has at most one timer:

    WAIT ──first byte──▶ HEAD ──headers──▶ BODY ──body──▶ DONE ──response──▶ WAIT …
    keepalive_timeout_s  header_timeout_s  body_timeout_s  (the app's time)
    (idle: the first to be closed at max_connections)

and CLOSING (an answer the edge wrote, or an early answer of the app) ends every connection
the same way: a lingering close. Writing has its own timer, in every phase: while the
transport's write buffer is over its high-water mark (the client's socket is full: it is not
reading), `send_timeout_s` runs, and when it ends the connection is aborted. Without it a
client that never reads a large response held it in memory and its socket open for ever —
even after a close, which asyncio delays until the buffer is flushed.

Limits: the request line (414) and header fields (431) are counted as httptools delivers
them, and, because httptools buffers a header it has not finished in memory, the raw bytes
fed to it while a head is incomplete are capped at `max_request_line_bytes +
max_header_bytes` (at most one socket read more when a head starts mid-read behind a
pipelined request). Every error the edge writes is the gateway's JSON error body with
`connection: close`.

Why lingering: uvicorn closes a non-keep-alive connection as soon as its response is written.
When the app answered before reading the body (413 on Content-Length, 415, 401), the rest of
the body is still unread in the socket, and Linux answers close() with unread data with an RST
(RFC 2525 §2.17): a client that writes its whole body before reading (urllib sends
`Connection: close`) got EPIPE/ECONNRESET instead of the answer. So the edge half-closes
(write_eof: the answer, then FIN) and reads and drops the rest for `lingering_close_s` or
`lingering_close_bytes`, whichever comes first, then closes.

uvicorn internals this relies on (tested with uvicorn 0.54, pinned in pyproject.toml):
`HttpToolsProtocol`'s parser callbacks (`on_message_begin`, `on_url`, `on_header`,
`on_headers_complete`, `on_message_complete`), `on_response_complete`, `data_received` (replaced
whole: it only fed the parser), `timeout_keep_alive_task`/`timeout_keep_alive_handler`/
`_unset_keepalive_if_required`, its attributes `parser`, `url`, `headers`, `cycle`, `flow`,
`transport`, `server_state`, `loop`; `RequestResponseCycle.send` (overridden by a subclass the
cycle is switched to in `on_headers_complete`, before `run_asgi` runs and looks `send` up),
`more_body`, `keep_alive` (read when the head is written
and again when the response completes), `response_started`/`response_complete`, `disconnected`,
`message_event`, `scope`; and `STATUS_LINE`.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Hashable
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast

import httptools
import orjson
from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from ..config import GatewayConfig
from ..errors import (
    ClientError,
    HeadersTooLarge,
    Overloaded,
    RequestTimeout,
    SteadyError,
    UriTooLong,
    to_http,
)
from ..netutil import NoDelayHttpToolsProtocol
from .http import EDGE_ERROR

C = TypeVar("C", bound=Hashable)

# the request line around its method and target: two spaces, "HTTP/1.1" and CRLF
_REQUEST_LINE_OVERHEAD = len(" HTTP/1.1\r\n") + 1
# a header field on the wire: name ": " value CRLF
_HEADER_OVERHEAD = 4


class Phase(enum.Enum):
    WAIT = "wait"  # between requests, no byte of the next one yet: idle
    HEAD = "head"  # a request's first byte came; its headers are not complete
    BODY = "body"  # headers complete, body not complete
    DONE = "done"  # the request is read; the app works on it
    CLOSING = "closing"  # the edge answered, or lingers after an early answer: nothing is parsed


class ConnectionTable(Generic[C]):
    """The open connections and, among them, those that may be closed to make room, oldest
    first: the ones lingering (already answered), then the idle ones in the order they became
    idle. O(1) per event: a scan of every connection on each accept at the cap would make a
    connection flood cost CPU as well as slots."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: set[C] = set()
        self._idle: dict[C, float] = {}  # insertion order is idle order: `since` only grows
        self._closing: dict[C, None] = {}

    def __len__(self) -> int:
        return len(self._open)

    def open(self, conn: C) -> None:
        self._open.add(conn)

    def discard(self, conn: C) -> None:
        self._open.discard(conn)
        self._idle.pop(conn, None)
        self._closing.pop(conn, None)

    def idle(self, conn: C, since: float) -> None:
        self._idle.pop(conn, None)
        self._idle[conn] = since

    def busy(self, conn: C) -> None:
        self._idle.pop(conn, None)

    def closing(self, conn: C) -> None:
        self._idle.pop(conn, None)
        self._closing[conn] = None

    def idle_since(self, conn: C) -> float | None:
        return self._idle.get(conn)

    def over_limit(self) -> bool:
        return len(self._open) > self.limit

    def evictable(self) -> C | None:
        """The connection to close to make room, or None when every one is working."""
        for pool in (self._closing, self._idle):
            for conn in pool:
                return conn
        return None


class _HeldHead:
    """The cycle's transport while a response starts: the head is held until the first body
    write and both leave in one write. uvicorn writes them apart, so a gateway killed between
    the two writes sent a head with no body — which no proxy in front can retry (nginx retries
    only what it has sent nothing of); one write is all or nothing for a response that fits
    the socket buffer."""

    __slots__ = ("head", "holding", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.head = b""
        self.holding = True  # while the head is written

    def write(self, data: bytes) -> None:
        if self.holding:
            self.head += data
            return
        if self.head:
            data, self.head = self.head + data, b""
        if data:
            self.transport.write(data)

    def flush(self) -> None:
        self.write(b"")

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _EdgeCycle(RequestResponseCycle):
    """uvicorn's request/response cycle, with the edge watching how the response ends."""

    edge: EdgeProtocol

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start" and not self.response_started \
                and not isinstance(self.transport, _HeldHead):
            held = _HeldHead(self.transport)
            self.transport = held  # type: ignore[assignment]
            try:
                await self._send(message)
            finally:
                held.holding = False  # body writes: head and body together
            return
        await self._send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False) \
                and isinstance(self.transport, _HeldHead):
            self.transport.flush()  # a HEAD answer writes no body: the head alone

    async def _send(self, message: ASGISendEvent) -> None:
        if not self.disconnected and not self.response_complete:
            if message["type"] == "http.response.start" and not self.response_started:
                # answered early: uvicorn writes "connection: close". The body timer keeps
                # running until the answer is written, so a client that neither sends nor
                # reads cannot hold the connection
                if self.more_body:
                    self.keep_alive = False
            elif message["type"] == "http.response.body" and self.response_started \
                    and not message.get("more_body", False):
                edge = self.edge
                if self.more_body:
                    edge._after = "linger"
                elif not self.keep_alive:
                    edge._after = "close"
                if edge._after is not None:
                    self.keep_alive = True  # so uvicorn leaves the closing to us
        try:
            await super().send(message)
        except BaseException:
            self.edge._after = None
            raise


class _Refused(Exception):
    """Stops httptools mid-feed once the edge has answered from inside a parser callback."""


def server_config(app: Any, limits: GatewayConfig) -> Any:
    """uvicorn's settings for a gateway process (the gateway's or a worker's): the edge bounds
    every connection from [gateway]'s limits, keep-alive included (it uses the exact float,
    uvicorn's own knob wants an int); ws="none": upgrades are refused by the edge, never
    handed to the app."""
    import math

    import uvicorn

    return uvicorn.Config(
        app, host=limits.host, port=limits.port, http=EdgeProtocol.configured(limits),
        ws="none", lifespan="on", access_log=False, log_config=None, backlog=4096,
        timeout_graceful_shutdown=int(limits.graceful_shutdown_s) or None,
        timeout_keep_alive=max(1, math.ceil(limits.keepalive_timeout_s)),
    )


class EdgeProtocol(NoDelayHttpToolsProtocol):
    """uvicorn's httptools protocol with the gateway's limits. Build the class a server uses
    with `EdgeProtocol.configured(gateway_config)`: uvicorn constructs protocols itself, so the
    limits and the connection table ride on a subclass."""

    limits: ClassVar[GatewayConfig]
    table: ClassVar[ConnectionTable[EdgeProtocol]]

    @classmethod
    def configured(cls, limits: GatewayConfig) -> type[EdgeProtocol]:
        attrs = {"limits": limits, "table": ConnectionTable[EdgeProtocol](limits.max_connections)}
        return cast("type[EdgeProtocol]", type(cls.__name__, (cls,), attrs))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's own timer and handler serve the WAIT phase, with the exact float
        self.timeout_keep_alive = self.limits.keepalive_timeout_s  # type: ignore[assignment]
        self.phase = Phase.WAIT
        self._timer: asyncio.TimerHandle | None = None  # the HEAD, BODY or CLOSING timer
        self._deferred: tuple[float, Callable[[], None]] | None = None  # (deadline, callback)
        self._head_left = 0  # raw bytes the current head may still feed to the parser
        self._head_budget = self.limits.max_request_line_bytes + self.limits.max_header_bytes
        self._header_bytes = 0
        self._linger_left = 0
        self._parsed = 0  # requests handed to the app…
        self._answered = 0  # …and answered (by it or by the edge): ahead of an edge answer
        self._after: Literal["linger", "close"] | None = None  # how the completing response ends
        self._pending: bytes | None = None  # an edge answer waiting for the one ahead of it
        self._write_timer: asyncio.TimerHandle | None = None  # while the client is not reading

    # connection ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        table = self.table
        table.open(self)
        if table.over_limit():
            victim = table.evictable()
            if victim is None:
                self._refuse(Overloaded(
                    f"the gateway has {table.limit} open connections (max_connections) and "
                    "none is idle; retry shortly", retry_after_s=1))
                return
            victim.close_now()
        # a connection that never sends a byte is idle: the keep-alive timer closes it
        self._go_idle()
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._unset_keepalive_if_required()  # uvicorn only does it when exc is None
        self.table.discard(self)
        self.phase = Phase.CLOSING
        self._pending = None
        super().connection_lost(exc)

    # writing ------------------------------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.send_timeout_s,
                                                     self._send_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _send_timeout(self) -> None:
        """The client read nothing for send_timeout_s while a response waited: cut it off
        (abort: close would wait for the buffer to drain, which is what never happens)."""
        self._write_timer = None
        self.close_now(abort=True)

    def timeout_keep_alive_handler(self) -> None:
        self.timeout_keep_alive_task = None
        self.close_now()

    def close_now(self, *, abort: bool = False) -> None:
        """Close (flushing what is written), or abort (dropping it: also a transport that
        is already closing but cannot flush)."""
        self._cancel_timer()
        self._unset_keepalive_if_required()
        self.phase = Phase.CLOSING
        self.table.discard(self)  # the slot is free now, not when the loop reports the loss
        if abort:
            self.transport.abort()
        elif not self.transport.is_closing():
            self.transport.close()

    # reading --------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._read(data)
        deferred = self._deferred
        if deferred is not None:
            # a phase began in this read and is still open: only now does it need a timer
            # (a whole request in one read arms none: no timer objects on the common path)
            self._deferred = None
            if self._timer is None and self.phase is not Phase.CLOSING:
                deadline, callback = deferred
                self._timer = self.loop.call_later(max(0.0, deadline - self.loop.time()),
                                                   callback)

    def _read(self, data: bytes) -> None:
        phase = self.phase
        if phase is Phase.CLOSING:
            self._drop(len(data))
            return
        if phase is Phase.WAIT and len(data) <= self._head_budget and data[:1] not in b"\r\n":
            # the common read: a whole small request, or its start, within the head budget:
            # fed as it is (no slicing), the budget charged with all of it
            self._begin_head()
            self._head_left -= len(data)
            if self._feed(data) and self.phase is Phase.HEAD and self._head_left <= 0:
                self._refuse(self._head_too_large())
            return
        view = memoryview(data)
        while view:
            if self.phase in (Phase.WAIT, Phase.DONE):
                if view[0] in b"\r\n" and not view.tobytes().strip(b"\r\n"):
                    # blank lines between requests are allowed (RFC 9112 §2.2) but are no
                    # activity: the idle timer keeps running, and a slow trickle of them
                    # cannot hold a connection open
                    return
                self._begin_head()
            if self.phase is Phase.HEAD:
                piece = view[: self._head_left]
                self._head_left -= len(piece)
            else:
                piece = view
            view = view[len(piece):]
            if not self._feed(piece):
                return
            if self.phase is Phase.HEAD and self._head_left <= 0:
                self._refuse(self._head_too_large())
                return

    def _head_too_large(self) -> HeadersTooLarge:
        return HeadersTooLarge(
            f"request head over {self.limits.max_request_line_bytes} + "
            f"{self.limits.max_header_bytes} bytes (max_request_line_bytes + max_header_bytes)")

    def _feed(self, piece: bytes | memoryview) -> bool:
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            return False  # on_headers_complete has answered it
        except httptools.HttpParserError as exc:
            if self.phase is not Phase.CLOSING:  # else: one of our callbacks refused it
                self._refuse(ClientError(f"invalid HTTP request: {exc}"))
            return False
        return True

    def _drop(self, size: int) -> None:
        self._linger_left -= size
        if self._linger_left < 0:
            self.close_now()

    def _begin_head(self) -> None:
        self._unset_keepalive_if_required()
        self.table.busy(self)
        self.phase = Phase.HEAD
        self._head_left = self._head_budget
        self._header_bytes = 0
        self._defer(self.limits.header_timeout_s, self._head_timeout)

    def _go_idle(self) -> None:
        self.phase = Phase.WAIT
        self.table.idle(self, self.loop.time())

    # parser callbacks ---------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.phase is not Phase.HEAD:  # began inside a read that ended the previous request
            self._begin_head()
        self._header_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        method = self.parser.get_method()
        if len(method) + len(self.url) + _REQUEST_LINE_OVERHEAD > self.limits.max_request_line_bytes:
            raise self._stop(UriTooLong(
                f"request line over {self.limits.max_request_line_bytes} bytes "
                "(max_request_line_bytes)"))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_bytes += len(name) + len(value) + _HEADER_OVERHEAD
        if len(self.headers) > self.limits.max_headers:
            raise self._stop(HeadersTooLarge(
                f"more than {self.limits.max_headers} header fields (max_headers)"))
        if self._header_bytes > self.limits.max_header_bytes:
            raise self._stop(HeadersTooLarge(
                f"header section over {self.limits.max_header_bytes} bytes (max_header_bytes)"))

    def on_headers_complete(self) -> None:
        self._cancel_timer()
        if self.parser.should_upgrade():
            # WebSocket, h2c, CONNECT: this gateway speaks HTTP/1.1 requests only; answering
            # here keeps uvicorn's upgrade path (and its warnings) out of it
            upgrade = next((v for k, v in self.headers if k == b"upgrade"), b"")
            what = f"Upgrade: {upgrade[:40].decode('latin-1')}" if upgrade else "CONNECT"
            self._refuse(ClientError(
                f"protocol upgrades are not supported ({what}); send plain HTTP/1.1 requests"))
            return
        self.phase = Phase.BODY
        self._defer(self.limits.body_timeout_s, self._body_timeout)
        super().on_headers_complete()
        self._parsed += 1
        self._watch(self.cycle)

    def on_message_complete(self) -> None:
        if self.phase is Phase.BODY:
            self._cancel_timer()
            self.phase = Phase.DONE
        super().on_message_complete()

    # answers ------------------------------------------------------------------------------------
    def _watch(self, cycle: RequestResponseCycle) -> None:
        """Make the cycle an `_EdgeCycle` (a class swap: no allocation per request), whose
        `send` notices an answer given before the body was read: that connection then ends
        with the edge's lingering close instead of uvicorn's plain one."""
        cycle.__class__ = _EdgeCycle
        cast("_EdgeCycle", cycle).edge = self

    def on_response_complete(self) -> None:
        self._answered += 1
        after, self._after = self._after, None
        if after is None and self._pending is None:
            queued = bool(self.pipeline)  # uvicorn starts the next queued request, if any
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self.phase is Phase.DONE and not queued:
                self._go_idle()  # uvicorn armed the keep-alive timer
            elif self.phase is Phase.HEAD:
                self._unset_keepalive_if_required()  # the next request has begun: its timer runs
            return
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        if self._pending is not None:
            if self._parsed > self._answered:
                # requests queued behind this one cannot get the edge's answer (the client would
                # take it for theirs): close, unanswered, as HTTP lets a server do
                self.close_now()
            else:
                self.transport.write(self._pending)
                self._pending = None
                self._linger()
        elif after == "linger":
            self._linger()
        else:
            self.close_now()

    def _refuse(self, exc: SteadyError) -> None:
        """Answer `exc` from the edge and close the connection, lingering."""
        self._cancel_timer()
        self._unset_keepalive_if_required()
        self.phase = Phase.CLOSING
        self._linger_left = self.limits.lingering_close_bytes
        payload = self._error_bytes(exc)
        if self._parsed > self._answered:
            # a response ahead of this one is still being made: ours comes after it
            self._pending = payload
            self.flow.pause_reading()
            return
        self.transport.write(payload)
        self._linger()

    def _stop(self, exc: SteadyError) -> _Refused:
        self._refuse(exc)
        return _Refused(exc.message)

    def send_400_response(self, msg: str) -> None:
        self._refuse(ClientError(msg))

    def _error_bytes(self, exc: SteadyError) -> bytes:
        err = to_http(exc)
        body = orjson.dumps({"error": {"code": err.code, "message": err.message, "param": None}})
        headers = [*self.server_state.default_headers, (b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
                   *err.headers]
        out = [STATUS_LINE[err.status]]
        for name, value in headers:
            out += [name, b": ", value, b"\r\n"]
        out += [b"\r\n", body]
        return b"".join(out)

    def _linger(self) -> None:
        self._cancel_timer()
        self._unset_keepalive_if_required()
        self.phase = Phase.CLOSING
        self.table.closing(self)
        limits = self.limits
        if limits.lingering_close_s <= 0 or limits.lingering_close_bytes <= 0 \
                or self.transport.is_closing():
            self.close_now()
            return
        self._linger_left = limits.lingering_close_bytes
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # after the answer is flushed: the client reads it, then EOF
        self._arm(limits.lingering_close_s, self.close_now)

    # timers -------------------------------------------------------------------------------------
    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(delay, callback)

    def _defer(self, delay: float, callback: Callable[[], None]) -> None:
        """A phase's timer, armed when the read that began the phase ends with it still open."""
        self._cancel_timer()
        self._deferred = (self.loop.time() + delay, callback)

    def _cancel_timer(self) -> None:
        self._deferred = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timeout(self) -> None:
        self._timer = None
        if self.phase is not Phase.HEAD:
            return
        if self.flow.read_paused:  # the gateway is not reading (a request ahead is answered)
            self._arm(self.limits.header_timeout_s, self._head_timeout)
            return
        self._refuse(RequestTimeout(
            f"request headers not received within {self.limits.header_timeout_s:g} s "
            "(header_timeout_s)"))

    def _body_timeout(self) -> None:
        self._timer = None
        if self.phase is not Phase.BODY:
            return
        if self.flow.read_paused:
            # the gateway stopped reading (the app has not taken the buffered body yet, or a
            # request ahead is still answered): that wait is not the client's
            self._arm(self.limits.body_timeout_s, self._body_timeout)
            return
        cycle = self.cycle
        if cycle.response_started:
            self.close_now()  # an answer is being written: a second one cannot follow it
            return
        exc = RequestTimeout(
            f"request body not received within {self.limits.body_timeout_s:g} s of its "
            "headers (body_timeout_s)")
        # the app waiting on receive() gets http.disconnect, and the reason for its own
        # accounting; whatever it answers is dropped, the edge answers instead
        cast("dict[str, Any]", cycle.scope)[EDGE_ERROR] = exc
        cycle.disconnected = True
        cycle.message_event.set()
        self._answered += 1
        self._refuse(exc)
