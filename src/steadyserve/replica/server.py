"""The replica's HTTP app (pure ASGI): /invoke/<handler>, /invoke-many/<handler> (calls the
gateway coalesced, gateway.coalesce), /stream/<handler> (a generator's items,
replica.streaming), /healthz, /readyz, /info, /metrics.

Bodies to and from the gateway are msgpack (`codec`). Errors travel as
`{"error": {code, message, param, status}}` with the matching status code.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from prometheus_client import generate_latest

from .. import codec
from ..asgi import cancel_on_disconnect
from ..auth.childcalls import MAX_GRANT_CHARS
from ..cache.invalidation import MESSAGE_MAX_BYTES, MESSAGE_MAX_TAGS, REPLICA_MAX_TAG_BYTES, check_tags
from ..cache.readthrough import ReadThroughCollector
from ..config import MAX_COALESCED_CALLS
from ..errors import (
    ClientError,
    ClientGone,
    HandlerFailed,
    NotFound,
    PayloadTooLarge,
    ReplicaTimeout,
    ReplicaUnavailable,
    SteadyError,
    to_wire,
)
from ..observe.logs import REQUEST_ID
from ..schema import compile_params
from ..service import HandlerSpec, Service
from .batcher import Batcher
from .blackbox import FlightRecorder
from .children import PARENT, ChildCaller, ParentCall
from .metrics import ReplicaMetrics
from .runner import Runner
from .streaming import serve_stream

log = logging.getLogger("steadyserve.replica")
# calls per /invoke-many: config.MAX_COALESCED_CALLS (the gateway sends [gateway] coalesce_max_items)
MAX_COALESCED_HEADERS = 32  # headers per coalesced call (the gateway sends about 8)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

REQUEST_ID_HEADER = b"x-request-id"  # the gateway's id of the request: in this replica's log lines
DEADLINE_HEADER = b"x-steadyserve-deadline-ms"  # remaining budget in ms when sent
INPUT_KEY_HEADER = b"x-steadyserve-input-key"  # the gateway's hash of the input (quarantine)
# the parent request, for the child calls its handler makes (replica.children)
PRIORITY_HEADER = b"x-priority"
GRANT_HEADER = b"x-steadyserve-grant"  # auth.childcalls


class _Handler:
    def __init__(self, spec: HandlerSpec, fn: Callable[..., Any], batcher: Batcher | None) -> None:
        self.spec = spec
        self.fn = fn
        self.batcher = batcher
        self.validate = compile_params(spec.params)
        self.item_param = spec.params[0]["name"] if spec.options.batch else ""
        # runs on the model thread (holding it while it waits for a child call)
        self.sync = not inspect.iscoroutinefunction(fn) and not inspect.isasyncgenfunction(fn)


class ReplicaApp:
    def __init__(
        self, service: Service, specs: dict[str, HandlerSpec], *, name: str = "",
        metrics: ReplicaMetrics | None = None, recorder: FlightRecorder | None = None,
    ) -> None:
        self.service = service
        self.specs = specs
        self.name = name
        self.metrics = metrics or ReplicaMetrics()
        self.metrics.registry.register(ReadThroughCollector(service))
        self.runner = Runner(recorder)
        self.ready = False
        self.draining = False
        self.deep_timeout_s = 10.0
        self.setup_error: str | None = None
        self.handlers: dict[str, _Handler] = {}
        self.version = str(type(service).version)
        # child calls to other deployments (replica.children, steadyserve.compose)
        self.children = ChildCaller.from_environment(name)
        service._steadyserve_children = self.children  # type: ignore[attr-defined]
        self._info = codec.encode({
            "service": type(service).__name__,
            "version": type(service).version,
            "handlers": [s.to_wire() for s in specs.values()],
        })

    # lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Run setup() off the loop, then build batchers; ready only when all of it worked."""
        self.children.bind(asyncio.get_running_loop())
        try:
            await self.runner.run(self.service.setup)
        except Exception as exc:
            self.setup_error = f"{type(exc).__name__}: {exc}"
            log.exception("setup() failed")
            raise
        for name, spec in self.specs.items():
            fn = getattr(self.service, name)
            batcher = None
            if spec.options.batch:
                batcher = Batcher(
                    fn, self.runner, max_batch_size=spec.options.max_batch_size,
                    max_wait_s=spec.options.max_wait_s, max_queue=spec.options.max_queue,
                    on_batch=self._observer(name),
                )
                batcher.start()
            self.handlers[name] = _Handler(spec, fn, batcher)
        self.ready = True

    def _observer(self, name: str) -> Callable[[int, float], None]:
        size = self.metrics.batch_size.labels(name)
        duration = self.metrics.batch_duration.labels(name)

        def observe(n: int, seconds: float) -> None:
            size.observe(n)
            duration.observe(seconds)

        return observe

    async def stop(self) -> None:
        self.ready = False
        for h in self.handlers.values():
            if h.batcher is not None:
                await h.batcher.stop()
        try:
            await self.runner.run(self.service.teardown)
        except Exception:
            log.exception("teardown() failed")
        self.runner.shutdown()
        await self.children.close()

    # ASGI ----------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if method == "POST" and path.startswith("/invoke/"):
            await self._invoke(path[8:], scope, receive, send)
        elif method == "POST" and path.startswith("/invoke-many/"):
            await self._invoke_many(path[13:], receive, send)
        elif method == "POST" and path.startswith("/stream/"):
            REQUEST_ID.set(_request_id(scope["headers"]))
            deadline = _call_headers(scope["headers"])[0]
            parent = self._parent(path[8:], scope["headers"], deadline)
            PARENT.set(parent)
            self.metrics.inflight.inc()
            try:
                body = await _read_body(receive)
                await serve_stream(self, path[8:], body, deadline, receive, send)
            finally:
                parent.cancel_children()  # a stream's child calls end with it
                self.metrics.inflight.dec()
        elif method == "POST" and path == "/invalidate":
            await self._invalidate(receive, send)
        elif path == "/healthz":
            await _send(send, 200, b'{"status":"alive"}', b"application/json")
        elif path == "/healthz/deep":
            ok, reason = await self._deep_health()
            await _send(send, 200 if ok else 503, orjson.dumps({"status": reason}),
                        b"application/json")
        elif path == "/readyz":
            ok = self.ready and not self.draining
            reason = "ready" if ok else (
                "draining" if self.draining else self.setup_error or "setup() running"
            )
            await _send(send, 200 if ok else 503, orjson.dumps({"status": reason}),
                        b"application/json")
        elif path == "/info":
            await _send(send, 200, self._info, codec.CONTENT_TYPE)
        elif path == "/metrics":
            for name, h in self.handlers.items():
                if h.batcher is not None:
                    self.metrics.queue_depth.labels(name).set(h.batcher.depth)
            await _send(send, 200, generate_latest(self.metrics.registry),
                        b"text/plain; version=0.0.4; charset=utf-8")
        else:
            await _send(send, 404, orjson.dumps({"error": {"message": f"no route {path}"}}),
                        b"application/json")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # setup runs in the background so /healthz answers while weights load
                asyncio.get_running_loop().create_task(self._start_logged())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _start_logged(self) -> None:
        try:
            await self.start()
            log.info("replica ready", extra={"replica": self.name})
        except Exception:
            # logged in start(); exit so the supervisor restarts us with backoff
            os.kill(os.getpid(), signal.SIGTERM)

    async def _deep_health(self) -> tuple[bool, str]:
        """Exercise the real path: the model thread, and each handler's canary through its
        batcher. A wedged model thread or event loop fails this while /readyz still passes."""
        if not self.ready:
            return False, self.setup_error or "setup() running"
        try:
            await asyncio.wait_for(self.runner.run(_noop), self.deep_timeout_s)
            for name, h in self.handlers.items():
                canary = h.spec.options.canary
                if canary is not None:
                    await asyncio.wait_for(self._call(name, {"args": canary}, None),
                                           self.deep_timeout_s)
        except TimeoutError:
            return False, f"canary took longer than {self.deep_timeout_s:.1f}s"
        except Exception as exc:
            return False, f"canary failed: {type(exc).__name__}: {exc}"
        return True, "ok"

    async def _invoke(self, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        answer = await self._answer(name, scope["headers"], body, receive)
        if answer is not None:
            await _send(send, answer[0], answer[1], codec.CONTENT_TYPE)

    async def _invoke_many(self, name: str, receive: Receive, send: Send) -> None:
        """Calls the gateway sent together (gateway.coalesce): each runs as if it had come
        alone, with its own headers, and the answers go back in one reply, in order. The
        gateway hanging up cancels them all."""
        try:
            calls = wire_calls(codec.decode(await _read_body(receive)),
                               MAX_COALESCED_CALLS, MAX_COALESCED_HEADERS)
        except (ValueError, TypeError) as exc:  # msgpack's errors are ValueErrors
            err = ClientError(f"a coalesced call is msgpack [[headers, body], ...]: {exc}")
            await _send(send, err.status, codec.encode({"error": to_wire(err)}),
                        codec.CONTENT_TYPE)
            return
        try:
            answers = await cancel_on_disconnect(receive, asyncio.gather(
                *(self._answer(name, headers, body, None) for headers, body in calls)))
        except ClientGone:
            return  # the gateway hung up: every call was cancelled with the gather
        await _send(send, 200, codec.encode([list(a) if a is not None else [499, b""]
                                             for a in answers]), codec.CONTENT_TYPE)

    async def _answer(self, name: str, headers: list[tuple[bytes, bytes]], body: bytes,
                      receive: Receive | None) -> tuple[int, bytes] | None:
        """One call: (status, msgpack payload), or None when the gateway hung up. `receive`:
        watch it for the gateway hanging up (a coalesced call is watched by its group)."""
        metrics = self.metrics
        metrics.inflight.inc()
        status = 200
        REQUEST_ID.set(_request_id(headers))  # this task's context: gone when it ends
        deadline, key = _call_headers(headers)
        parent = self._parent(name, headers, deadline)
        PARENT.set(parent)
        try:
            call = self._call(name, codec.decode(body), deadline, key)
            result, queue_s, service_s, missed, items = (
                await cancel_on_disconnect(receive, call) if receive is not None else await call)
            payload = codec.encode({"result": result, "q": queue_s, "s": service_s, "m": missed,
                                    "n": items, "v": self.version})
        except asyncio.CancelledError:
            parent.cancel_children()
            raise
        except ClientGone:
            parent.cancel_children()  # no child work outlives the request
            metrics.requests.labels(name, "cancelled").inc()
            return None  # the gateway hung up (hedge lost, client gone): nobody to answer
        except Exception as exc:
            err = exc if isinstance(exc, SteadyError) else HandlerFailed(
                f"handler raised {type(exc).__name__}: {exc}")
            if not isinstance(exc, SteadyError):
                log.error("handler %s failed", name, exc_info=exc)
            status = err.status
            payload = codec.encode({"error": to_wire(err)})
        finally:
            metrics.inflight.dec()
            self.children.learn(parent)
        metrics.requests.labels(name, f"{status // 100}xx").inc()
        return status, payload

    def _parent(self, name: str, header_list: list[tuple[bytes, bytes]],
                deadline: float | None) -> ParentCall:
        """The request as its handler's child calls need it (replica.children)."""
        headers = dict(header_list)
        h = self.handlers.get(name)
        grant = headers.get(GRANT_HEADER)
        trace = headers.get(b"traceparent")
        return ParentCall(
            request_id=REQUEST_ID.get() or "-", handler=name, deadline=deadline,
            priority=headers.get(PRIORITY_HEADER, b"interactive").decode("ascii", "replace")[:16],
            grant=grant.decode("ascii", "replace")[:MAX_GRANT_CHARS] if grant else None,
            traceparent=trace.decode("ascii", "replace")[:128] if trace else None,
            sync=h is not None and h.sync)

    async def _invalidate(self, receive: Receive, send: Send) -> None:
        """The gateway tells every replica which data changed (tags): the service drops what
        it cached from it (`Service.invalidate`). Runs on the loop: it must be quick. Bounded
        like the public route, with fixed limits (a replica does not read [cache]; the gateway
        splits its broadcasts to fit them): a body of at most MESSAGE_MAX_BYTES and
        MESSAGE_MAX_TAGS tags of at most REPLICA_MAX_TAG_BYTES. ALL_TAGS is allowed here: the
        gateway sends it after a missed invalidation or an explicit `{"all": true}`."""
        try:
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:  # read at most the limit: a larger body is refused, not buffered
                message = await receive()
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > MESSAGE_MAX_BYTES:
                    raise PayloadTooLarge(f"an invalidation is at most {MESSAGE_MAX_BYTES:,} bytes",
                                          param="tags")
                chunks.append(chunk)
                more = bool(message.get("more_body"))
            try:
                body = codec.decode(b"".join(chunks))
            except (ValueError, TypeError) as exc:  # msgpack's errors are ValueErrors
                raise ClientError(f"send msgpack {{'tags': [str, ...]}}: {exc}", param="tags") from None
            tags = check_tags(body.get("tags") if isinstance(body, dict) else None,
                              max_tags=MESSAGE_MAX_TAGS, max_tag_bytes=REPLICA_MAX_TAG_BYTES,
                              allow_all=True)
            self.service.invalidate(tags)
        except SteadyError as exc:
            await _send(send, exc.status, codec.encode({"error": to_wire(exc)}), codec.CONTENT_TYPE)
            return
        except Exception as exc:
            log.error("invalidate() failed", exc_info=exc)
            err = HandlerFailed(f"invalidate() raised {type(exc).__name__}: {exc}")
            await _send(send, 500, codec.encode({"error": to_wire(err)}), codec.CONTENT_TYPE)
            return
        self.metrics.invalidations.inc(len(tags))
        await _send(send, 200, codec.encode({"invalidated": len(tags)}), codec.CONTENT_TYPE)

    async def _call(
        self, name: str, body: Any, deadline: float | None, key: str | None = None
    ) -> tuple[Any, float, float, int, int]:
        """Run a handler; returns (result, queue_s, service_s, missed_batches, batch_items)."""
        arrived = time.monotonic()
        if not self.ready:
            raise ReplicaUnavailable("replica is not ready")
        handler = self.handlers.get(name)
        if handler is None:
            raise NotFound(f"no handler {name!r}")
        if not isinstance(body, dict):
            raise ClientError("request body must be an object")
        if handler.spec.options.stream:
            raise ClientError(f"handler {name!r} streams: POST /stream/{name}")
        kwargs = handler.validate(body.get("args", {}))
        if handler.batcher is not None:
            items = kwargs[handler.item_param]
            if not items:
                raise ClientError(f"'{handler.item_param}' must not be empty",
                                  param=handler.item_param)
            results, timing = await handler.batcher.submit_timed(items, deadline, key)
            return (results, timing.queue_s, timing.service_s, timing.missed_batches,
                    timing.batch_items)
        timeout = handler.spec.options.timeout_s
        if deadline is not None:
            timeout = min(timeout, deadline - arrived)
        try:
            result, started, finished = await asyncio.wait_for(
                self.runner.run_timed(handler.fn, kwargs, [key] if key else None), timeout)
        except TimeoutError:
            raise ReplicaTimeout(f"handler {name} took longer than {timeout:.3f}s") from None
        return result, max(0.0, started - arrived), finished - started, 0, 1


def wire_calls(body: Any, max_items: int, max_headers: int) -> list[tuple[list[tuple[bytes, bytes]], bytes]]:
    """A coalesced request's body checked (gateway.coalesce describes the wire): a list of
    at most `max_items` [headers, body] calls, each header a [name, value] pair of bytes."""
    if not isinstance(body, list) or not 1 <= len(body) <= max_items:
        raise ValueError(f"expected a list of 1..{max_items} [headers, body] calls")
    out = []
    for item in body:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], bytes) \
                or not isinstance(item[0], list) or len(item[0]) > max_headers:
            raise ValueError("each call is [headers, body]: a list of at most "
                             f"{max_headers} [name, value] pairs and a bytes body")
        headers = []
        for pair in item[0]:
            if not isinstance(pair, list) or len(pair) != 2 \
                    or not all(isinstance(x, bytes) for x in pair):
                raise ValueError("a header is [name, value], both bytes")
            headers.append((pair[0], pair[1]))
        out.append((headers, item[1]))
    return out


def _noop() -> None:
    return None


def _request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            return bytes(value[:128]).decode("ascii", errors="replace")
    return None


def _call_headers(headers: list[tuple[bytes, bytes]]) -> tuple[float | None, str | None]:
    """(absolute deadline, input key) from the gateway's headers."""
    deadline: float | None = None
    key: str | None = None
    for name, value in headers:
        if name == DEADLINE_HEADER:
            try:
                deadline = time.monotonic() + max(0.0, float(value)) / 1000
            except ValueError:
                pass
        elif name == INPUT_KEY_HEADER and len(value) <= 64:
            key = value.decode("ascii", errors="replace")
    return deadline, key


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    chunks = [body]
    while message.get("more_body"):
        message = await receive()
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


async def _send(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})
