"""The gateway's ASGI app: the order of every step a request takes is decided here, once.

    request id → route → [read + validate body → dispatch to a replica] → error mapping
    → compression → send (with X-Request-ID) → metrics
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from .. import codec
from ..cache.tiered import CacheCollector, ResponseCache
from ..config import Config
from ..errors import SteadyError, to_http
from ..observe import tracing
from ..observe.aggregate import merge_replica_metrics
from ..observe.metrics import GatewayMetrics

if TYPE_CHECKING:
    from ..observe.alerting import AlertEngine
from ..observe.otlp import OtlpExporter
from . import openai, rollout_routes, routes
from .cached import CACHE_HEADER
from .dispatch import Dispatcher
from .encoding import choose_encoding, compress
from .http import Receive, Request, Response, Scope, Send, request_id_from
from .membership import Deployment, Endpoint, Membership
from .router import Route, Router
from .transport import Transport

log = logging.getLogger("steadyserve.gateway")
access = logging.getLogger("steadyserve.access")

INVALIDATE_TIMEOUT_S = 1.0  # a replica that cannot take an invalidation this fast is logged
DEPLOYMENTS_PREFIX = "/v1/deployments/"

# Every route, in one table: its access class decides who may call it (gateway.router).
ROUTES = (
    Route("GET", "/healthz", routes.healthz, "public", summary="the gateway process is alive",
          tag="ops"),
    Route("GET", "/readyz", routes.readyz, "public", tag="ops",
          summary="200 when every deployment has a ready replica, else 503 with the reason"),
    Route("GET", "/metrics", routes.metrics, "read", tag="ops",
          summary="Prometheus text: gateway series and every replica's own"),
    Route("GET", "/v1/models", openai.models, "read", tag="openai",
          summary="deployments, OpenAI shape"),
    Route("POST", "/v1/embeddings", openai.embeddings, "infer", json_body=True, tag="openai",
          summary="OpenAI embeddings"),
    Route("GET", "/v1/deployments", routes.list_deployments, "read", tag="deployments",
          summary="every deployment: replicas, handlers and their schemas"),
    Route("GET", "/v1/deployments/{deployment}", routes.get_deployment, "read",
          tag="deployments", summary="one deployment"),
    Route("POST", "/v1/deployments/{deployment}/{handler}", routes.invoke, "infer",
          json_body=True, tag="inference", summary="call a handler"),
    Route("GET", "/v1/alerts", routes.alerts, "read", tag="alerting",
          summary="active alerts, silences, recent automatic actions and history"),
    Route("POST", "/v1/silences", routes.create_silence, "admin", json_body=True,
          tag="alerting", summary="mute matching alerts for a while"),
    Route("DELETE", "/v1/silences/{silence}", routes.expire_silence, "admin", tag="alerting",
          summary="end a silence now"),
    Route("GET", "/v1/cache", routes.cache_status, "read", tag="cache",
          summary="response cache state, hit-ratio curve, hottest keys"),
    Route("POST", "/v1/cache/invalidate", routes.cache_invalidate, "admin", json_body=True,
          tag="cache", summary="drop every cached answer and replica row with these tags"),
    Route("POST", "/v1/admin/deployments/{deployment}/rollout", rollout_routes.start, "admin",
          json_body=True, tag="admin", summary="roll out a new target (service, replicas, env)"),
    Route("GET", "/v1/admin/deployments/{deployment}/rollout", rollout_routes.status, "admin",
          tag="admin", summary="the deployment's rollout: target, progress, outcome"),
    Route("DELETE", "/v1/admin/deployments/{deployment}/rollout", rollout_routes.cancel,
          "admin", tag="admin", summary="cancel a running rollout: back to the last good target"),
)


class ControlPlane(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def status(self, deployment: str) -> list[dict[str, Any]]: ...
    def report_unavailable(self, deployment: str, endpoint: Endpoint) -> None: ...
    def replica_exited(self, replica_id: str) -> bool: ...
    async def rollout(self, deployment: str, changes: dict[str, Any]) -> dict[str, Any]: ...


class Gateway:
    def __init__(
        self, config: Config, *, transport: Transport, membership: Membership | None = None,
        metrics: GatewayMetrics | None = None, control: ControlPlane | None = None,
    ) -> None:
        self.full_config = config
        self.config = config.gateway
        self.metrics = metrics or GatewayMetrics()
        self.membership = membership or Membership(config.deployments)
        self.transport = transport
        self.control = control
        self.dispatcher = Dispatcher(
            transport, self.metrics, config.resilience,
            on_unavailable=control.report_unavailable if control is not None else None,
            replica_exited=control.replica_exited if control is not None else None,
        )
        self.membership.on_change = self.dispatcher.resize
        self.dispatcher.affinity_balance = config.cache.affinity_balance
        self.affinity = config.cache.affinity
        self.cache: ResponseCache | None = None
        if config.cache.enabled:
            lookups = self.metrics.cache_lookups
            self.cache = ResponseCache(
                config.cache, origin=uuid.uuid4().hex, on_remote_invalidate=self.broadcast_invalidate,
                lookup_counter=lambda level, result: lookups.labels(level, result).inc())
            self.metrics.registry.register(CacheCollector(self.cache))
        self._spawned: set[asyncio.Task[None]] = set()
        self.draining = False
        obs = config.observability
        self.access_log = obs.access_log
        self.exporter = OtlpExporter(obs.otlp_endpoint, obs.service_name) \
            if obs.otlp_endpoint else None
        self._background: list[asyncio.Task[None]] = []
        self.alerting: AlertEngine | None = None
        self._observers: dict[tuple[str, str, int], Callable[[float], None]] = {}
        self.router = Router(ROUTES)

    # ASGI ----------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        req = Request(scope, receive, _request_id(scope))
        trace = req.call.trace = tracing.parse(req.header(b"traceparent"), req.header(b"tracestate"))
        span = trace.start("gateway", trace.parent_id)
        req.call.parent_span = span.span_id
        try:
            route, params = self.router.match(req.method, req.path)
            req.route = route
            resp = await route.fn(self, req, params)
        except Exception as exc:
            resp = self._error(req, exc)
        if req.call.cache != "-":
            resp.headers.append((CACHE_HEADER, req.call.cache.encode()))
        resp.headers.append((b"traceparent", trace.header(span)))
        await self._send(req, resp, send)
        elapsed = time.perf_counter() - started
        self._observe(req, resp.status, elapsed)
        span.attributes.update({"http.status_code": resp.status, "deployment": req.deployment,
                                "handler": req.handler, "request_id": req.request_id})
        span.end(error=resp.status >= 500)
        if self.exporter is not None and req.deployment != "-":
            self.exporter.submit(trace)
        if self.access_log and req.deployment != "-":
            access.info("request", extra={
                "request_id": req.request_id, "trace_id": trace.trace_id,
                "deployment": req.deployment, "handler": req.handler,
                "replica": req.call.replica, "attempts": req.call.attempts,
                "status": resp.status, "duration_ms": round(elapsed * 1000, 3),
                "cache": req.call.cache, "method": req.method, "path": req.path,
            })

    def _error(self, req: Request, exc: BaseException) -> Response:
        err = to_http(exc)
        if not isinstance(exc, SteadyError):
            log.error("unhandled error on %s %s", req.method, req.path, exc_info=exc,
                      extra={"request_id": req.request_id})
        if req.openai:
            kind = "invalid_request_error" if err.status < 500 else "server_error"
            code = "model_not_found" if (err.code, err.param) == ("not_found", "model") else err.code
            body: dict[str, Any] = {"error": {"message": err.message, "type": kind,
                                             "param": err.param, "code": code}}
        else:
            body = {"error": {"code": err.code, "message": err.message, "param": err.param,
                              "request_id": req.request_id}}
        return Response(err.status, orjson.dumps(body), headers=list(err.headers))

    async def _send(self, req: Request, resp: Response, send: Send) -> None:
        body = resp.body
        headers = [(b"content-type", resp.content_type), (b"x-request-id", req.request_id.encode())]
        headers.extend(resp.headers)
        encoding = choose_encoding(req.header(b"accept-encoding"), len(body),
                                   self.config.compress_min_bytes)
        if encoding is not None:
            body = compress(body, encoding)
            headers.append((b"content-encoding", encoding.encode()))
            headers.append((b"vary", b"accept-encoding"))
        headers.append((b"content-length", str(len(body)).encode()))
        self.metrics.response_bytes.labels(encoding or "identity").inc(len(body))
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _observe(self, req: Request, status: int, seconds: float) -> None:
        key = (req.deployment, req.handler, status)
        observe = self._observers.get(key)
        if observe is None:
            observe = self._observers[key] = self._make_observer(*key)
        observe(seconds)

    def _make_observer(self, deployment: str, handler: str, status: int) -> Callable[[float], None]:
        m = self.metrics
        count = m.requests.labels(deployment, handler, f"{status // 100}xx").inc
        duration = m.duration.labels(deployment, handler).observe
        error = m.errors.labels(deployment, handler, str(status)).inc if status >= 400 else None

        def observe(seconds: float) -> None:
            count()
            duration(seconds)
            if error is not None:
                error()

        return observe

    # lifecycle -------------------------------------------------------------------------------
    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self.exporter is not None:
                        self._background.append(asyncio.get_running_loop().create_task(
                            self.exporter.run(), name="otlp-export"))
                    if self.cache is not None:
                        await self.cache.start()
                    if self.control is not None:
                        await self.control.start()
                    if self.alerting is not None:
                        await self.alerting.start()
                except Exception as exc:
                    log.exception("gateway start failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.draining = True
                try:
                    for task in self._background:
                        task.cancel()
                    if self.alerting is not None:
                        await self.alerting.stop()
                    for spawned in list(self._spawned):
                        spawned.cancel()
                    if self.control is not None:
                        await self.control.stop()
                    if self.cache is not None:
                        await self.cache.stop()
                    await self.transport.close()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    # cache consistency --------------------------------------------------------------------------
    def spawn(self, coro: Awaitable[None], name: str) -> None:
        """A short background task owned by the gateway: kept referenced, errors logged."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._spawned.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._spawned.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task %s failed", name, exc_info=t.exception())

        task.add_done_callback(done)

    async def invalidate(self, tags: Sequence[str]) -> dict[str, Any]:
        """Data behind these tags changed: replicas drop their copies first, then this gateway's
        L1 and the shared L2 (which tells the other gateways)."""
        replicas = await self.broadcast_invalidate(list(tags))
        body: dict[str, Any] = await self.cache.invalidate(tags) if self.cache is not None \
            else {"tags": list(tags)}
        body["replicas"] = replicas
        return body

    async def broadcast_invalidate(self, tags: list[str]) -> dict[str, int]:
        """POST /invalidate to every replica of the deployments that cache by tag."""
        targets = [e for d in self.membership.deployments.values() if any(
            h.spec.options.cache_tags or h.spec.options.invalidates for h in d.handlers.values())
            for e in d.endpoints]
        if not targets:
            return {"told": 0, "failed": 0}
        body = codec.encode({"tags": tags})
        headers = [(b"content-type", codec.CONTENT_TYPE)]

        async def tell(e: Endpoint) -> bool:
            try:
                reply = await self.transport.request(e.address, "POST", "/invalidate", body, headers,
                                                     INVALIDATE_TIMEOUT_S)
            except SteadyError as exc:
                log.warning("replica did not take an invalidation: %s", exc,
                            extra={"replica": e.replica_id, "tags": tags[:10]})
                return False
            return reply.status == 200

        told = await asyncio.gather(*(tell(e) for e in targets))
        return {"told": sum(told), "failed": len(told) - sum(told)}

    # status ------------------------------------------------------------------------------------
    def describe(self, d: Deployment) -> dict[str, Any]:
        return {
            "name": d.name,
            "service": d.service or d.config.service,
            "version": d.version,
            "desired_replicas": d.config.replicas,
            "ready_replicas": len(d.endpoints),
            "replicas": self.control.status(d.name) if self.control is not None else [
                {"id": e.replica_id, "address": str(e.address), "state": "ready"}
                for e in d.endpoints
            ],
            "handlers": {
                name: {
                    "route": f"{DEPLOYMENTS_PREFIX}{d.name}/{name}",
                    "params": h.spec.params,
                    "batch": h.spec.options.batch,
                    "max_batch_size": h.spec.options.max_batch_size,
                    "timeout_s": h.spec.options.timeout_s,
                    "openai": h.spec.options.openai,
                }
                for name, h in d.handlers.items()
            },
        }

    def export_admission(self) -> None:
        """Refresh the gauges computed on demand: admission state and connection pools."""
        m = self.metrics
        names: dict[Any, str] = {}
        for d in self.membership.deployments.values():
            adm = self.dispatcher.state(d).admission
            m.admission_limit.labels(d.name).set(adm.limit.limit)
            m.admission_inflight.labels(d.name).set(adm.inflight)
            m.admission_queued.labels(d.name).set(adm.queued)
            names.update({e.address: e.replica_id for e in d.endpoints})
        stats = getattr(self.transport, "pool_stats", None)
        if stats is not None:
            for address, (busy, idle) in stats().items():
                replica = names.get(address, str(address))
                m.pool_connections.labels(replica, "busy").set(busy)
                m.pool_connections.labels(replica, "idle").set(idle)

    async def replica_metrics(self) -> bytes:
        targets = [
            (d.name, e) for d in self.membership.deployments.values() for e in d.endpoints
        ]

        async def fetch(endpoint: Endpoint) -> str | None:
            try:
                reply = await self.transport.request(endpoint.address, "GET", "/metrics", b"", [], 1.0)
            except SteadyError:
                return None
            return reply.body.decode() if reply.status == 200 else None

        bodies = await asyncio.gather(*(fetch(e) for _, e in targets))
        texts = {(name, e.replica_id): text for (name, e), text in zip(targets, bodies, strict=True)
                 if text is not None}
        return merge_replica_metrics(texts)


def _request_id(scope: Scope) -> str:
    return request_id_from(scope["headers"])
