"""Streaming responses: a generator handler's items go to the client as they come.

By `Accept`: `text/event-stream` gets server-sent events (`data: <item>` per item, then
`event: end`), `application/json` alone gets the items collected into one JSON array, and
anything else newline-delimited JSON (one item per line). Nothing is buffered beyond an item.

What may fail where:
- before the first item: an ordinary error answer (4xx/5xx, JSON), after the usual retries
  on other replicas (`Dispatcher.open_stream`);
- after it: never retried or failed over (the client has items; a second replica would
  replay or reorder them) — the stream ends with an explicit error event (SSE `event:
  error`, or an NDJSON line `{"error": {code, message}}`) and the metrics count it;
- the client leaves: the gateway stops reading and closes the replica's connection, which
  stops the generator between items (replica.streaming) and frees both slots;
- the deadline (X-Request-Timeout-Ms, bounded by request_timeout_s and the handler's
  timeout_s) applies to the whole stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from ..asgi import cancel_on_disconnect
from ..errors import SteadyError, to_http
from .access import Access
from .admission import parse_priority
from .http import Request, Response

if TYPE_CHECKING:
    from .dispatch import Streamed
    from .membership import Deployment, Handler
    from .plane import DataPlane

NDJSON = b"application/x-ndjson"
SSE = b"text/event-stream"


def stream_format(req: Request) -> str:
    accept = (req.header(b"accept") or "").lower()
    if "text/event-stream" in accept:
        return "sse"
    if accept.strip() == "application/json":
        return "json"
    return "ndjson"


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(exc: BaseException) -> dict[str, Any]:
    err = to_http(exc)
    return {"error": {"code": err.code, "message": err.message}}


async def open_items(gw: DataPlane, req: Request, d: Deployment, h: Handler,
                     args: dict[str, Any], timeout_s: float) -> Streamed:
    """The stream, once its first item arrived (errors before it raise, as a call's do)."""
    from .routes import lineage

    priority = Access.priority_for(req, parse_priority(req.header(b"x-priority")))
    lineage(req)
    return await cancel_on_disconnect(req.receive, gw.dispatcher.open_stream(
        d, h, args, request_id=req.request_id, timeout_s=timeout_s, priority=priority,
        call=req.call))


async def respond(gw: DataPlane, req: Request, d: Deployment, h: Handler, args: dict[str, Any],
                  timeout_s: float) -> Response:
    streamed = await open_items(gw, req, d, h, args, timeout_s)
    fmt = stream_format(req)
    if fmt == "json":  # the client asked for one document: collect (bounded by the deadline)
        try:
            items = [item async for item in streamed.items()]
        finally:
            await streamed.close()
        gw.metrics.stream_items.labels(d.name).inc(len(items))
        return Response(200, _dumps(items))
    encode = _sse if fmt == "sse" else _ndjson
    return Response(200, b"", SSE if fmt == "sse" else NDJSON,
                    headers=[(b"cache-control", b"no-store")],
                    stream=relay(gw, d.name, streamed, encode))


def _ndjson(item: Any) -> bytes:
    return _dumps(item) + b"\n"


def _sse(item: Any) -> bytes:
    return b"data: " + _dumps(item) + b"\n\n"


@dataclass(slots=True)
class Outcome:
    value: str = "cancelled"  # what a stream that ends without saying otherwise was


@asynccontextmanager
async def counted(gw: DataPlane, deployment: str, streamed: Streamed) -> AsyncIterator[Outcome]:
    """One relayed stream's bookkeeping, for the native and the OpenAI relays: the open
    streams gauge, its outcome when it ends (set `.value`: cancelled unless said), and the
    replica's stream closed whatever happened."""
    m = gw.metrics
    m.streams_open.labels(deployment).inc()
    outcome = Outcome()
    try:
        yield outcome
    finally:
        m.streams_open.labels(deployment).dec()
        m.streams.labels(deployment, outcome.value).inc()
        await streamed.close()


async def relay(gw: DataPlane, deployment: str, streamed: Streamed,
                encode: Any) -> AsyncIterator[bytes]:
    """The items as bytes for the client; ends with an error event on a failure after the
    first item. Cancelled when the client leaves (the gateway's send loop watches)."""
    items = gw.metrics.stream_items.labels(deployment)
    started = time.monotonic()
    async with counted(gw, deployment, streamed) as outcome:
        try:
            async for item in streamed.items():
                items.inc()
                yield encode(item)
        except SteadyError as exc:
            outcome.value = "error"
            body = error_body(exc)
            yield (b"event: error\ndata: " + _dumps(body) + b"\n\n") if encode is _sse \
                else _dumps(body) + b"\n"
            return
        outcome.value = "complete"
        if encode is _sse:
            yield b"event: end\ndata: " + _dumps(
                {"items": streamed.items_sent, "seconds": round(time.monotonic() - started, 6)}
            ) + b"\n\n"
