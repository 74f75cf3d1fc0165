"""A streaming handler's replica side: `POST /stream/<handler>` runs the generator and sends
each item as it comes, one JSON line per frame (chunked):

    {"i": <item>}                      an item
    {"e": {code, message, status…}}    the handler failed after its first item; the last frame
    {"end": {"n": items, "s": secs}}   done; the last frame

A failure before the first item is an ordinary error reply (status and msgpack body, as
/invoke answers), so the gateway may try another replica: nothing was sent yet.

A sync generator runs on the model thread one item at a time (`next()` per item, other
requests interleave); an async one on the loop. Between items the replica checks whether the
gateway hung up (its client left, or its deadline passed) and then closes the generator (its
`finally` blocks run) — so at most the item being produced completes after a disconnect.
The deadline the gateway sends bounds the whole stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import orjson

from .. import codec
from ..errors import (
    ClientError,
    DeadlineExceeded,
    HandlerFailed,
    NotFound,
    ReplicaUnavailable,
    SteadyError,
    to_wire,
)

if TYPE_CHECKING:
    from .server import ReplicaApp

log = logging.getLogger("steadyserve.replica")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
_DONE = object()


def _next(gen: Iterator[Any]) -> Any:
    return next(gen, _DONE)


class _Items:
    """One item at a time from a sync or async generator, off the loop for sync ones."""

    def __init__(self, app: ReplicaApp, produced: Any) -> None:
        self.app = app
        self.sync = not hasattr(produced, "__anext__")
        self.gen = produced

    async def next(self) -> Any:
        if self.sync:
            return await self.app.runner.run(_next, self.gen)
        try:
            return await self.gen.__anext__()
        except StopAsyncIteration:
            return _DONE

    async def close(self) -> None:
        try:
            if self.sync:
                await self.app.runner.run(self.gen.close)
            else:
                await self.gen.aclose()
        except Exception:
            log.exception("closing a streaming handler failed")


def frame(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


async def serve_stream(app: ReplicaApp, name: str, body: bytes, deadline: float | None,
                       receive: Receive, send: Send) -> None:
    metrics = app.metrics
    started = time.monotonic()
    try:
        items = _start(app, name, codec.decode(body))
        timeout = app.handlers[name].spec.options.timeout_s
        end = started + timeout if deadline is None else min(deadline, started + timeout)
        first = await _produce(items, end, name)
    except Exception as exc:  # before the first byte: an ordinary error reply
        err = exc if isinstance(exc, SteadyError) else HandlerFailed(
            f"handler raised {type(exc).__name__}: {exc}")
        if not isinstance(exc, SteadyError):
            log.error("streaming handler %s failed", name, exc_info=exc)
        metrics.requests.labels(name, f"{err.status // 100}xx").inc()
        payload = codec.encode({"error": to_wire(err)})
        await send({"type": "http.response.start", "status": err.status,
                    "headers": [(b"content-type", codec.CONTENT_TYPE),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
        return
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.get_running_loop().create_task(watch())
    count = 0
    outcome = "2xx"
    try:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson")]})
        item = first
        while item is not _DONE:
            count += 1
            metrics.stream_items.labels(name).inc()
            await send({"type": "http.response.body", "body": frame({"i": item}),
                        "more_body": True})
            if gone.is_set():
                break
            try:
                item = await _produce(items, end, name, gone)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                err = exc if isinstance(exc, SteadyError) else HandlerFailed(
                    f"handler raised {type(exc).__name__} after {count} items: {exc}")
                if not isinstance(exc, SteadyError):
                    log.error("streaming handler %s failed mid-stream", name, exc_info=exc)
                outcome = f"{err.status // 100}xx"
                await send({"type": "http.response.body", "body": frame({"e": to_wire(err)}),
                            "more_body": False})
                return
        if gone.is_set():
            outcome = "cancelled"
            return
        await send({"type": "http.response.body", "more_body": False, "body": frame(
            {"end": {"n": count, "s": round(time.monotonic() - started, 6)}})})
    finally:
        watcher.cancel()
        await items.close()
        metrics.requests.labels(name, outcome).inc()


def _start(app: ReplicaApp, name: str, body: Any) -> _Items:
    if not app.ready:
        raise ReplicaUnavailable("replica is not ready")
    handler = app.handlers.get(name)
    if handler is None or not handler.spec.options.stream:
        raise NotFound(f"no streaming handler {name!r}")
    if not isinstance(body, dict):
        raise ClientError("request body must be an object")
    kwargs = handler.validate(body.get("args", {}))
    return _Items(app, handler.fn(**kwargs))


async def _produce(items: _Items, end: float, name: str,
                   gone: asyncio.Event | None = None) -> Any:
    """The next item, within the stream's deadline. When the gateway hangs up meanwhile:
    _DONE at once (an async generator's step is cancelled; a sync one's item in progress
    finishes on the model thread, which cannot be interrupted, and nothing follows it)."""
    left = end - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded(f"the stream of {name} passed the request's deadline")
    loop = asyncio.get_running_loop()
    step = loop.create_task(items.next())
    waits: set[asyncio.Future[Any]] = {step}
    hangup = loop.create_task(gone.wait()) if gone is not None else None
    if hangup is not None:
        waits.add(hangup)
    try:
        done, _ = await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if hangup is not None:
            hangup.cancel()
    if step in done:
        return step.result()
    step.cancel()  # an async step stops now; a sync one's thread finishes its item
    await asyncio.wait({step})  # an async generator closes only once its step is over
    if hangup is not None and hangup in done:
        return _DONE
    raise DeadlineExceeded(f"the stream of {name} passed the request's deadline")
