"""Gateway routes: ops (/healthz, /readyz, /metrics), native handlers, deployment status.

Native route: `POST /v1/deployments/{deployment}/{handler}` with a JSON object of the
handler's parameters; the answer is the handler's result as JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from ..asgi import cancel_on_disconnect
from ..cache.invalidation import ALL_TAGS, check_tags
from ..cache.keys import affinity_value
from ..errors import ClientError, NoReadyReplica, NotFound, PayloadTooLarge
from ..store import DatabaseUnavailable
from . import canary, streaming
from .access import Access
from .admission import parse_priority
from .cached import cached_call, invalidation_tags
from .http import Request, Response, json_response
from .membership import Deployment, Handler

if TYPE_CHECKING:
    from ..observe.alerting import AlertEngine
    from .app import Gateway
    from .plane import DataPlane

Route = Callable[["Gateway", Request, dict[str, str]], Awaitable[Response]]


async def healthz(gw: DataPlane, req: Request, params: dict[str, str]) -> Response:
    return json_response({"status": "alive"})


async def readyz(gw: DataPlane, req: Request, params: dict[str, str]) -> Response:
    ok, reason = gw.membership.readiness()
    if gw.draining:
        ok, reason = False, "draining: the gateway is shutting down"
    resp = json_response({"status": "ready" if ok else "not ready", "reason": reason},
                         200 if ok else 503)
    if not ok:
        resp.headers.append((b"retry-after", b"1"))
    return resp


async def metrics(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    gw.export_admission()
    body = gw.metrics_text() + await gw.replica_metrics()
    return Response(200, body, b"text/plain; version=0.0.4; charset=utf-8")


async def list_deployments(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    return json_response({"deployments": [gw.describe(d) for d in gw.membership.deployments.values()]})


async def get_deployment(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    return json_response(gw.describe(find_deployment(gw, params["deployment"])))


def find_deployment(gw: DataPlane, name: str) -> Deployment:
    d = gw.membership.get(name)
    if d is None:
        known = ", ".join(sorted(gw.membership.deployments)) or "none"
        raise NotFound(f"no deployment named {name!r} (deployments: {known})", param="model")
    return d


def find_handler(d: Deployment, name: str) -> Handler:
    if not d.handlers:
        raise NoReadyReplica(f"deployment {d.name!r} has no ready replica yet", retry_after_s=1)
    h = d.handlers.get(name)
    if h is None:
        raise NotFound(f"deployment {d.name!r} has no handler {name!r} "
                       f"(handlers: {', '.join(sorted(d.handlers))})")
    return h


def check_items(h: Handler, args: dict[str, Any], max_inputs: int) -> None:
    """A batched handler's item list must be non-empty and within the per-request limit."""
    if not h.item_param:
        return
    items = args[h.item_param]
    if not items:
        raise ClientError(f"'{h.item_param}' must not be empty", param=h.item_param)
    if len(items) > max_inputs:
        raise PayloadTooLarge(f"'{h.item_param}' has {len(items)} items; at most {max_inputs} "
                              "per request", param=h.item_param)


def request_timeout_s(gw: DataPlane, req: Request) -> float:
    """The client's X-Request-Timeout-Ms, bounded by the gateway's request_timeout_s, less
    what it already waited for a first replica."""
    budget = _timeout_s(gw, req)
    held = req.call.held_s
    return max(0.001, budget - held) if held else budget


async def await_handlers(gw: DataPlane, req: Request, d: Deployment) -> None:
    """An autoscaled deployment that never had a replica ready (it starts at zero) does not
    know its handlers yet: hold the request for its first replica (bounded; 503 if none)."""
    if not d.handlers and not d.endpoints:
        # off its budget, and not shed by admission for the backlog it was part of
        req.call.held_s += await gw.dispatcher.await_replica(d, request_timeout_s(gw, req))


def _timeout_s(gw: DataPlane, req: Request) -> float:
    ceiling = gw.config.request_timeout_s
    raw = req.header(b"x-request-timeout-ms")
    if raw is None:
        return ceiling
    try:
        ms = int(raw.strip())
    except ValueError:
        raise ClientError(f"X-Request-Timeout-Ms must be a whole number of milliseconds, "
                          f"got {raw[:40]!r}", param="x-request-timeout-ms") from None
    if ms <= 0:
        raise ClientError("X-Request-Timeout-Ms must be > 0", param="x-request-timeout-ms")
    return min(ceiling, ms / 1000)


def lineage(req: Request) -> None:
    """What dispatch passes on for child calls (gateway.compose): the key the request acts
    for, how deep it is, and — for a child call — which replica made it."""
    c = req.call
    c.principal = req.principal.id if req.principal is not None else None
    c.hops = req.hops
    if req.child:
        c.child = True
        caller = req.header(b"x-steadyserve-caller")
        c.caller = caller[:128] if caller else None
        c.caller_sync = req.header(b"x-steadyserve-caller-sync") == "1"


async def call(gw: DataPlane, req: Request, d: Deployment, h: Handler, args: dict[str, Any]) -> Any:
    """Answer from the response cache or dispatch, with the request's deadline and priority;
    a client that hangs up cancels it. A handler declared with `invalidates=` then drops the
    cached data it changed, on every replica and gateway, before the client hears back."""
    timeout = request_timeout_s(gw, req)
    priority = Access.priority_for(req, parse_priority(req.header(b"x-priority")))
    lineage(req)
    split = gw.splits.get(d.name) if gw.splits.splits else None
    if split is not None:  # a canary: the candidate or the baseline (gateway.canary)
        async def invoke(target: Deployment, handler: Handler, timeout_s: float) -> Any:
            return await _call(gw, req, target, handler, args, timeout_s=timeout_s,
                               priority=priority)

        answer = await canary.call(gw, req, d, h, split, invoke, timeout)
    else:
        answer = await _call(gw, req, d, h, args, timeout_s=timeout, priority=priority)
    if d.config.shadow is not None:  # the client's answer first, then (maybe) the mirror
        gw.shadows.mirror(d, h, args, answer, req.request_id, req.call.principal,
                         req.call.hops)
    return answer


async def _call(gw: DataPlane, req: Request, d: Deployment, h: Handler, args: dict[str, Any],
                *, timeout_s: float, priority: str) -> Any:
    timeout = timeout_s
    opts = h.spec.options
    if not (opts.cache or opts.affinity or opts.invalidates):
        # the plain path, kept as lean as before the cache: no closures, no header parsing
        return await cancel_on_disconnect(req.receive, gw.dispatcher.invoke(
            d, h, args, request_id=req.request_id, timeout_s=timeout, priority=priority,
            call=req.call))

    async def dispatch(upstream: dict[str, Any], affinity: str | None) -> tuple[Any, str | None]:
        result = await gw.dispatcher.invoke(
            d, h, upstream, request_id=req.request_id, timeout_s=timeout, priority=priority,
            call=req.call, affinity=affinity if gw.affinity else None)
        return result, req.call.version

    tags = invalidation_tags(h, args, gw.full_config.cache)  # first: it may refuse the call
    directive = cache_directive(req.header(b"cache-control"))
    if opts.cache and gw.cache is not None and directive != "no-store":
        work: Awaitable[Any] = cached_call(gw, req, d, h, args, dispatch, timeout_s=timeout,
                                            reuse=directive is None)
    else:
        first = args[h.item_param][0] if h.item_param else args
        work = _result(dispatch(args, affinity_value(opts.affinity, first)))
    if not tags:
        return await cancel_on_disconnect(req.receive, work)
    refused = False
    try:
        return await cancel_on_disconnect(req.receive, work)
    except ClientError:
        refused = True  # refused before it changed anything
        raise
    finally:
        if not refused:  # also after a timeout or a lost replica: the change may have been made
            await asyncio.shield(gw.invalidate(tags))


def cache_directive(header: str | None) -> str | None:
    """`Cache-Control: no-cache` (compute afresh, then store) or `no-store` (bypass the cache)."""
    if not header:
        return None
    parts = {p.strip().lower() for p in header.split(",")}
    if "no-store" in parts:
        return "no-store"
    if "no-cache" in parts or "max-age=0" in parts:
        return "no-cache"
    return None


async def _result(work: Awaitable[tuple[Any, str | None]]) -> Any:
    return (await work)[0]


async def cache_status(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    if gw.cache is None:
        raise NotFound("the response cache is disabled on this gateway ([cache] enabled = false)")
    return json_response(gw.cache.status(req.query_int("top", 1, 1000, default=20)))


async def cache_invalidate(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    """`{"tags": [...]}` drops the entries with those tags everywhere (within the [cache]
    limits); `{"all": true}` drops every tagged entry (the reserved "*" is refused as a tag)."""
    body = await req.json(gw.config.max_body_bytes)
    if not isinstance(body, dict):
        raise ClientError("send {\"tags\": [\"account:42\", ...]} or {\"all\": true}", param="tags")
    everything = body.get("all", False)
    if not isinstance(everything, bool):
        raise ClientError("'all' must be true or false", param="all")
    if everything:
        if "tags" in body:
            raise ClientError("send {\"all\": true} without tags, or tags without 'all'", param="tags")
        return json_response(await gw.invalidate([ALL_TAGS]))
    limits = gw.full_config.cache
    tags = check_tags(body.get("tags"), max_tags=limits.max_invalidation_tags,
                      max_tag_bytes=limits.max_tag_bytes)
    return json_response(await gw.invalidate(tags))


async def invoke(gw: DataPlane, req: Request, params: dict[str, str]) -> Response:
    d = find_deployment(gw, params["deployment"])
    Access.allow_deployment(req, d.name)
    req.deployment = d.name
    if not d.handlers:  # the body first: the client is not kept sending while it waits
        body = await req.json(gw.config.max_body_bytes)
        await await_handlers(gw, req, d)
        h = find_handler(d, params["handler"])
    else:
        h = find_handler(d, params["handler"])
        body = await req.json(gw.config.max_body_bytes)
    req.handler = h.name
    args = h.validate(body)
    if h.spec.options.stream:  # a generator: its items as they come (gateway.streaming)
        return await streaming.respond(gw, req, d, h, args, request_timeout_s(gw, req))
    check_items(h, args, h.spec.options.max_inputs)
    result = await call(gw, req, d, h, args)
    resp = Response(200, orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY))
    resp.headers.append((b"x-steadyserve-version", d.version.encode()))
    return resp


def _alerting(gw: Gateway) -> AlertEngine:
    if gw.alerting is None:
        raise NotFound("alerting is disabled on this gateway ([alerting] enabled = false)")
    return gw.alerting


async def alerts(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    """Active alerts, silences, recent automatic actions, and (from the database) history."""
    engine = _alerting(gw)
    body = engine.status()
    history: list[dict[str, Any]] = []
    if engine.db is not None:
        try:
            history = await asyncio.to_thread(engine.db.recent_transitions, 100)
            if not body["actions"]:
                body["actions"] = await asyncio.to_thread(engine.db.recent_actions, 50)
        except DatabaseUnavailable as exc:
            body["history_error"] = exc.message
    body["history"] = history
    return json_response(body)


async def cluster(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    """Whether this gateway leads the gateways sharing its database, and who does."""
    return json_response(gw.lead.status())


async def create_silence(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    engine = _alerting(gw)
    engine.lead.require("silences")  # the book lives with the alerting duty
    body = await req.json(gw.config.max_body_bytes)
    if not isinstance(body, dict):
        raise ClientError("send a JSON object: matchers, duration_s, created_by, comment, "
                          "match_all")
    # the engine checks every field against [alerting]'s silence limits (400/413/409)
    silence = engine.add_silence(body.get("matchers"), body.get("duration_s"),
                                 body.get("created_by", "api"), body.get("comment", ""),
                                 body.get("match_all", False))
    if engine.lead.clustered and engine.db is not None:
        await engine.store_book()  # the next leader must know it
    if engine.db is not None:
        try:
            await asyncio.to_thread(engine.db.put_silence, silence.to_dict())
        except DatabaseUnavailable:
            pass  # kept in memory and in the alert book's saved state
    return json_response(silence.to_dict(), 201)


async def expire_silence(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    engine = _alerting(gw)
    engine.lead.require("silences")
    if not engine.book.expire_silence(params["silence"], engine.wall()):
        raise NotFound(f"no active silence {params['silence'][:64]!r}")
    if engine.lead.clustered and engine.db is not None:
        await engine.store_book()
    if engine.db is not None:
        try:
            await asyncio.to_thread(engine.db.expire_silence, params["silence"], engine.wall())
        except DatabaseUnavailable:
            pass
    return json_response({"expired": params["silence"]})
