"""The gateway's ASGI app: the order of every step a request takes is decided here, once.

    request id → CORS preflight → Host allow-list → route → access (Origin, API key and its
    scope and rate, Content-Type) → [read + validate body → dispatch to a replica] → error
    mapping → CORS headers, audit line for admin routes → compression → send (with
    X-Request-ID) → metrics
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from prometheus_client import generate_latest

from .. import codec
from ..asgi import cancel_on_disconnect
from ..auth.exposure import exposure_problem
from ..auth.keyring import KeyRing
from ..auth.keys import ROTATE_SCHEMA, spec_schema
from ..auth.usage import UsageFlusher, UsageMeter
from ..cache.invalidation import messages as invalidation_messages
from ..cache.tiered import CacheCollector, ResponseCache
from ..config import Config, GatewayConfig
from ..errors import ClientGone, DeadlineExceeded, SteadyError, to_http
from ..observe import tracing
from ..observe.aggregate import (
    MAX_REPLICA_METRICS_BYTES,
    REPLICA_METRICS_TIMEOUT_S,
    merge_replica_metrics,
    summed_registry,
)
from ..observe.metrics import BalancerFitCollector, GatewayMetrics
from ..store.backup import BackupScheduler
from ..store.feedback import FeedbackStore
from ..store.records import RecordStore
from ..store.spool import Spool
from .canary import Splits
from .compose import HopStats
from .records import RecordWriter, RequestRecorder
from .shadow import Shadows

if TYPE_CHECKING:
    from ..control.canary import CanaryController
    from ..control.leadership import Leadership
    from ..observe.alerting import AlertEngine
    from .jobs import JobRunner
from ..dashboard import routes as dashboard
from ..observe.otlp import OtlpExporter
from ..policies.lease import Alone
from . import (
    feedback_routes,
    jobs,
    key_routes,
    log_routes,
    oip,
    openai,
    openai_text,
    rollout_routes,
    routes,
)
from . import openapi as openapi_doc
from .access import Access
from .cached import CACHE_HEADER
from .controls import DataPlaneControls
from .dispatch import Dispatcher
from .encoding import choose_encoding, compress
from .http import Receive, Request, Response, Scope, Send, request_id_from
from .membership import Deployment, Endpoint, Membership
from .router import Route, Router
from .transport import Transport

log = logging.getLogger("steadyserve.gateway")
access = logging.getLogger("steadyserve.access")
audit = logging.getLogger("steadyserve.audit")

PROBES = frozenset({"/healthz", "/readyz"})  # never Host-checked: load balancers probe by IP
LOCAL_ACCESS = frozenset({"infer", "public"})  # what a data-plane worker serves itself
INVALIDATE_TIMEOUT_S = 1.0  # a replica that cannot take an invalidation this fast is logged
DEPLOYMENTS_PREFIX = "/v1/deployments/"
# Responses this large are compressed in a worker thread. Measured (JSON floats, 2 busy
# cores): gzip-5 16 KiB 0.4 ms, 64 KiB 3.4 ms; zstd-3 16 KiB 0.1 ms, 64 KiB 0.3 ms; a thread
# hop costs ~0.08 ms. From 32 KiB the stall a hop saves outweighs the hop for both codings.
OFF_LOOP_COMPRESS_BYTES = 32 * 1024

# Every route, in one table: its access class decides who may call it (gateway.router).
ROUTES = (
    Route("GET", "/", dashboard.page, "public", tag="dashboard",
          summary="the operator's dashboard (its data comes from /v1/dashboard)"),
    Route("GET", "/dashboard/{asset}", dashboard.asset, "public", tag="dashboard",
          summary="the dashboard's script, styles and charting library"),
    Route("GET", "/v1/dashboard", dashboard.data, "read", tag="dashboard",
          summary="what the dashboard shows: counters, replicas, jobs, alerts, actions; "
                  "?history=MINUTES adds the history (throughput, 5xx, p50/p95/p99)"),
    Route("GET", "/healthz", routes.healthz, "public", summary="the gateway process is alive",
          tag="ops"),
    Route("GET", "/readyz", routes.readyz, "public", tag="ops",
          summary="200 when every deployment has a ready replica, else 503 with the reason"),
    Route("GET", "/openapi.json", openapi_doc.openapi_json, "read", tag="ops",
          summary="this document: the routes and every handler's request schema"),
    Route("GET", "/metrics", routes.metrics, "read", tag="ops",
          summary="Prometheus text: gateway series and every replica's own"),
    Route("GET", "/v1/models", openai.models, "read", tag="openai",
          summary="deployments, OpenAI shape"),
    Route("POST", "/v1/embeddings", openai.embeddings, "infer", json_body=True, tag="openai",
          summary="OpenAI embeddings"),
    Route("POST", "/v1/completions", openai_text.completions, "infer", json_body=True,
          tag="openai", summary="OpenAI completions (stream: true for server-sent events)"),
    Route("POST", "/v1/chat/completions", openai_text.chat_completions, "infer",
          json_body=True, tag="openai",
          summary="OpenAI chat completions (stream: true for chat.completion.chunk events)"),
    # the Open Inference Protocol (KServe v2 / Triton HTTP): every deployment is a model
    Route("GET", "/v2", oip.server_metadata, "read", tag="oip",
          summary="Open Inference Protocol: server metadata"),
    Route("GET", "/v2/health/live", oip.live, "public", tag="oip", summary="the gateway is alive"),
    Route("GET", "/v2/health/ready", oip.ready, "public", tag="oip",
          summary="200 when every deployment has a ready replica, else 503"),
    Route("GET", "/v2/models/{model}", oip.model_metadata, "read", tag="oip",
          summary="a model's input and output tensors"),
    Route("GET", "/v2/models/{model}/ready", oip.model_ready, "read", tag="oip",
          summary="200 when the model has a ready replica, else 503"),
    Route("POST", "/v2/models/{model}/infer", oip.infer, "infer", tag="oip",
          request_schema=oip.INFER_SCHEMA,
          summary="inference with named tensors (JSON or the binary data extension)"),
    Route("GET", "/v2/models/{model}/versions/{version}", oip.model_metadata, "read",
          tag="oip", summary="a model's tensors, at its version"),
    Route("GET", "/v2/models/{model}/versions/{version}/ready", oip.model_ready, "read",
          tag="oip", summary="readiness at a version"),
    Route("POST", "/v2/models/{model}/versions/{version}/infer", oip.infer, "infer",
          tag="oip", request_schema=oip.INFER_SCHEMA, summary="inference at a version"),
    Route("GET", "/v1/deployments", routes.list_deployments, "read", tag="deployments",
          summary="every deployment: replicas, handlers and their schemas"),
    Route("GET", "/v1/deployments/{deployment}", routes.get_deployment, "read",
          tag="deployments", summary="one deployment"),
    Route("POST", "/v1/deployments/{deployment}/{handler}", routes.invoke, "infer",
          json_body=True, tag="inference", summary="call a handler"),
    Route("GET", "/v1/alerts", routes.alerts, "read", tag="alerting",
          summary="active alerts, silences, recent automatic actions and history"),
    Route("POST", "/v1/feedback", feedback_routes.submit, "feedback", json_body=True,
          tag="feedback", request_schema=feedback_routes.SCHEMA, responses=(200, 201, 202),
          summary="what a user thought of an answer (its X-Request-ID): score, value, "
                  "correction, comment"),
    Route("GET", "/v1/feedback/summary", feedback_routes.summary, "read", tag="feedback",
          summary="per deployment and model version: feedback rate, mean scores with "
                  "intervals, label accuracy, precision, recall, Brier score, reliability"),
    Route("GET", "/v1/feedback/{request_id}", feedback_routes.of_request, "admin",
          tag="feedback", summary="the feedback items of one answer"),
    # asynchronous jobs (gateway.jobs): a job is its API key's (or an admin's) to read or
    # cancel; submit and cancel are forwarded to the gateway process, which keeps the queue
    Route("POST", "/v1/jobs/{deployment}/{handler}", jobs.submit_job, "infer", json_body=True,
          tag="jobs", responses=(200, 202),
          summary="queue a handler call (its parameters as the body): 202 with the job id once "
                  "stored; headers Idempotency-Key, X-Webhook-Url, X-Job-Timeout-S"),
    Route("GET", "/v1/jobs", jobs.list_jobs, "read", tag="jobs",
          summary="the caller's jobs, newest first (an admin key: every job, and counts); "
                  "?state=&limit="),
    Route("GET", "/v1/jobs/{job}", jobs.get_job, "read", tag="jobs",
          summary="a job: state, result or error, timings, webhook delivery"),
    Route("DELETE", "/v1/jobs/{job}", jobs.cancel_job, "infer", tag="jobs",
          summary="cancel a queued or running job"),
    Route("GET", "/v1/logs", log_routes.logs, "admin", tag="ops",
          summary="recent log lines of the gateway and its replicas, filtered"),
    Route("GET", "/v1/cluster", routes.cluster, "read", tag="ops",
          summary="which gateway leads the ones sharing this database ([cluster])"),
    Route("POST", "/v1/silences", routes.create_silence, "admin", json_body=True,
          tag="alerting", summary="mute matching alerts for a while", responses=(201,)),
    Route("DELETE", "/v1/silences/{silence}", routes.expire_silence, "admin", tag="alerting",
          summary="end a silence now"),
    Route("GET", "/v1/cache", routes.cache_status, "read", tag="cache",
          summary="response cache state, hit-ratio curve, hottest keys"),
    Route("POST", "/v1/cache/invalidate", routes.cache_invalidate, "admin", json_body=True,
          tag="cache", summary="drop every cached answer and replica row with these tags"),
    Route("POST", "/v1/admin/deployments/{deployment}/rollout", rollout_routes.start, "admin",
          json_body=True, tag="admin", summary="roll out a new target (service, replicas, env)",
          responses=(202,)),
    Route("GET", "/v1/admin/deployments/{deployment}/rollout", rollout_routes.status, "admin",
          tag="admin", summary="the deployment's rollout: target, progress, outcome"),
    Route("DELETE", "/v1/admin/deployments/{deployment}/rollout", rollout_routes.cancel,
          "admin", tag="admin", summary="cancel a running rollout: back to the last good target"),
    Route("POST", "/v1/admin/deployments/{deployment}/canary", rollout_routes.canary_start,
          "admin", tag="admin",
          summary="start the deployment's canary: the candidate gets the plan's first step"),
    Route("GET", "/v1/admin/deployments/{deployment}/canary", rollout_routes.canary_status,
          "admin", tag="admin",
          summary="the canary: step, share, verdict with its evidence, history"),
    Route("DELETE", "/v1/admin/deployments/{deployment}/canary", rollout_routes.canary_abort,
          "admin", tag="admin", summary="abort the canary: the baseline serves everything"),
    Route("GET", "/v1/admin/keys", key_routes.list_keys, "admin", tag="keys",
          summary="API keys (never their secrets)"),
    Route("GET", "/v1/admin/keys/usage", key_routes.key_usage, "admin", tag="keys",
          summary="requests, 5xx and 4xx per API key and deployment over the last days"),
    Route("POST", "/v1/admin/keys", key_routes.create_key, "admin", json_body=True, tag="keys",
          summary="create an API key; its secret is in this answer only",
          request_schema=spec_schema(), responses=(201,)),
    Route("POST", "/v1/admin/keys/{key}/rotate", key_routes.rotate_key, "admin",
          json_body=True, body_optional=True, tag="keys", request_schema=ROTATE_SCHEMA,
          summary="a new secret for a key; the old one works for grace_s more"),
    Route("DELETE", "/v1/admin/keys/{key}", key_routes.revoke_key, "admin", tag="keys",
          summary="revoke a key: refused by every gateway within a second"),
)


class ControlPlane(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def status(self, deployment: str) -> list[dict[str, Any]]: ...
    def report_unavailable(self, deployment: str, endpoint: Endpoint) -> None: ...
    def replica_exited(self, replica_id: str) -> bool: ...
    # rollouts: validate and store a target (ClientError, Conflict), read it, cancel it
    async def rollout(self, deployment: str, changes: dict[str, Any]) -> dict[str, Any]: ...
    def rollout_status(self, deployment: str) -> dict[str, Any]: ...
    async def cancel_rollout(self, deployment: str) -> dict[str, Any]: ...


def child_host_header(cfg: GatewayConfig) -> str:
    """The Host header child calls send: one this gateway serves ([gateway] allowed_hosts)."""
    named = [h for h in cfg.allowed_hosts if h != "*"]
    return named[0] if named else "127.0.0.1"


class Gateway:
    def __init__(
        self, config: Config, *, transport: Transport, membership: Membership | None = None,
        metrics: GatewayMetrics | None = None, control: ControlPlane | None = None,
        keys: KeyRing | None = None,
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
            gateway_cfg=config.gateway,
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
        self.metrics.registry.register(BalancerFitCollector(self.balancer_fits))
        # all the control plane may do to this data plane, and read from it
        self.controls = DataPlaneControls(self.membership, self.dispatcher, self.cache)
        self._spawned: set[asyncio.Task[None]] = set()
        self.draining = False
        self.shadows = Shadows(self)  # requests mirrored to a deployment's candidate
        self.splits = Splits()  # canaries: requests split between baseline and candidate
        obs = config.observability
        self.access_log = obs.access_log
        self.exporter = OtlpExporter(obs.otlp_endpoint, obs.service_name) \
            if obs.otlp_endpoint else None
        self._background: list[asyncio.Task[None]] = []
        self.usage = UsageMeter(config.auth.usage_max_entries)  # per key and deployment
        self.usage_flusher: UsageFlusher | None = None  # the gateway process's, with a database
        self.feedback_store: FeedbackStore | None = None  # with a database
        self.feedback_spool: Spool | None = None  # feedback accepted while it is down
        fb = config.feedback
        self.recorder = RequestRecorder(fb, {d.name: d.feedback_prediction
                                             for d in config.deployments}) \
            if fb.record_requests else None
        self.record_writer: RecordWriter | None = None  # the gateway process's, with a database
        self.record_store: RecordStore | None = None
        self.jobs: JobRunner | None = None  # the gateway process's, with a database
        self.alerting: AlertEngine | None = None
        self.canaries: CanaryController | None = None  # the gateway process's (control.canary)
        self.hops: dict[tuple[str, str], HopStats] = {}  # child calls served, per handler
        self.lead: Alone | Leadership = Alone()  # [cluster]: the lease (control.leadership)
        # data-plane workers ([gateway] workers): in a worker, how other routes reach the
        # gateway process; in the gateway process, the workers' metrics and invalidations
        self.forward: Any = None
        self.worker_metrics: Callable[[], list[bytes]] = list
        # {(deployment, replica): requests} the data-plane workers await (their last reports)
        self.worker_outstanding: Callable[[], dict[tuple[str, str], int]] = dict
        self.on_invalidated: Callable[[list[str]], None] | None = None
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []
        self._observers: dict[tuple[str, str, int, bool], Callable[[float], None]] = {}
        self.router = Router(ROUTES)
        # no key ring given (tests, embedded use): keys in memory, an admin key made up now
        self.keys = keys or KeyRing(refresh_s=config.auth.key_refresh_s)
        self.access = Access(config, self.keys)
        self.dispatcher.grant = self.keys.grant

    def prepare(self) -> str | None:
        """Before serving (blocking I/O): read or write the local admin key, load the keys.
        Returns why this gateway must not serve as configured (an exposed listener with no
        keys), or None."""
        self.keys.bootstrap()
        return exposure_problem(self.full_config, self.keys.user_keys_exist())

    @property
    def admin_token(self) -> str | None:
        """The local admin key (in the data directory's admin.key file in a real process)."""
        return self.keys.admin_token

    # ASGI ----------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            # the edge refuses upgrades before they get here (gateway.edge, uvicorn ws="none");
            # under a server that still hands one over, decline the handshake: it answers 403
            # and logs nothing, where returning without a word is a 500 and an error line
            await receive()
            await send({"type": "websocket.close", "code": 1008})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        req = Request(scope, receive, _request_id(scope))
        trace = req.call.trace = tracing.parse(req.header(b"traceparent"), req.header(b"tracestate"))
        span = trace.start("gateway", trace.parent_id)
        req.call.parent_span = span.span_id
        try:
            preflight = self.access.preflight(req)
            if preflight is not None:
                resp = preflight
            else:
                if req.path not in PROBES:
                    self.access.check_host(req)
                route, params = self.router.match(req.method, req.path)
                req.route = route
                req.openai = route.tag == "openai"  # errors in OpenAI's shape, auth's too
                if self.forward is not None and route.access not in LOCAL_ACCESS:
                    # a data-plane worker: the gateway process checks access and answers
                    req.forwarded = True
                    resp = await self.forward(req)
                else:
                    self.access.check(req, route)
                    resp = await route.fn(self, req, params)
        except Exception as exc:
            resp = self._error(req, exc)
        self.access.add_cors(req, resp)
        if req.route is not None and req.route.access == "admin" and not req.forwarded:
            # an audit line per state change: who (key id, never the key), what, the outcome
            audit.info("admin request", extra={
                "request_id": req.request_id, "method": req.method, "path": req.path,
                "status": resp.status,
                "key_id": req.principal.id if req.principal is not None else None})
        if req.call.cache != "-":
            resp.headers.append((CACHE_HEADER, req.call.cache.encode()))
        resp.headers.append((b"traceparent", trace.header(span)))
        await self._send(req, resp, send)
        elapsed = time.perf_counter() - started
        self._observe(req, resp, elapsed)
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
        req.call.deadline_exceeded = isinstance(exc, DeadlineExceeded)
        if not isinstance(exc, SteadyError):
            log.error("unhandled error on %s %s", req.method, req.path, exc_info=exc,
                      extra={"request_id": req.request_id})
        if req.oip:
            return Response(err.status, orjson.dumps({"error": err.message}),
                            headers=list(err.headers))
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
        if resp.stream is not None:
            await self._send_stream(req, resp, headers, send)
            return
        encoding = choose_encoding(req.header(b"accept-encoding"), len(body),
                                   self.config.compress_min_bytes)
        if encoding is not None:
            # a large body off the loop: gzip takes ~3 ms for 64 KiB, stalling every request
            if len(body) >= OFF_LOOP_COMPRESS_BYTES:
                body = await asyncio.to_thread(compress, body, encoding)
            else:
                body = compress(body, encoding)
            headers.append((b"content-encoding", encoding.encode()))
            headers.append((b"vary", b"accept-encoding"))
        headers.append((b"content-length", str(len(body)).encode()))
        self.metrics.response_bytes.labels(encoding or "identity").inc(len(body))
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _send_stream(self, req: Request, resp: Response,
                           headers: list[tuple[bytes, bytes]], send: Send) -> None:
        """A streamed body (gateway.streaming), chunk by chunk, uncompressed (a compressor
        would hold items back); a client that hangs up cancels it between chunks."""
        assert resp.stream is not None
        stream = resp.stream
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})

        async def pump() -> None:
            async for chunk in stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await cancel_on_disconnect(req.receive, pump())
        except ClientGone:
            req.call.cancelled = True
        except Exception:  # the head is sent: nothing to answer; the connection closes
            log.exception("a streamed answer failed", extra={"request_id": req.request_id})
            req.call.cancelled = True
        finally:
            await stream.aclose()  # type: ignore[attr-defined]  # an async generator's

    def _observe(self, req: Request, resp: Response, seconds: float) -> None:
        """Count and time inference requests only: they are the SLO (ErrorBudgetBurn) and
        the latency users see. Probes (a starting gateway's /readyz answers 503), scrapes,
        admin calls and unknown routes or deployments would swamp both. A client deadline
        shorter than the handler needs (504 deadline_exceeded) is counted as code="deadline",
        not "5xx": one client's header must not spend everyone's error budget."""
        route = req.route
        if route is None or route.access != "infer" or req.deployment == "-":
            return
        status = resp.status
        if req.child:  # a hop of a pipeline: its timings in the deployment's status
            hop = self.hops.get((req.deployment, req.handler))
            if hop is None:
                hop = self.hops[(req.deployment, req.handler)] = HopStats()
            hop.add(seconds, status, req.hops)
        if req.principal is not None or self.recorder is not None:
            now = time.time()
            key_id = req.principal.id if req.principal is not None else None
            if key_id is not None:
                self.usage.record(key_id, req.deployment, status, now)
            if self.recorder is not None:
                call = req.call
                self.recorder.record(
                    request_id=req.request_id, deployment=req.deployment, handler=req.handler,
                    version=call.version, replica=call.replica, cache=call.cache, status=status,
                    seconds=seconds, key_id=key_id, body=resp.body, now=now,
                    cache_keys=call.cache_keys, arm=call.arm)
        key = (req.deployment, req.handler, status, req.call.deadline_exceeded)
        observe = self._observers.get(key)
        if observe is None:
            observe = self._observers[key] = self._make_observer(*key)
        observe(seconds)

    def _make_observer(self, deployment: str, handler: str, status: int,
                       deadline: bool) -> Callable[[float], None]:
        m = self.metrics
        klass = "deadline" if deadline else f"{status // 100}xx"
        count = m.requests.labels(deployment, handler, klass).inc
        # the 5xx series exists at 0 from the first request: Prometheus' rate() does not count
        # a series' first sample, so an error series born with the first error would hide it
        m.requests.labels(deployment, handler, "5xx")
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
                    await self.keys.start()
                    if self.exporter is not None:
                        self._background.append(asyncio.get_running_loop().create_task(
                            self.exporter.run(), name="otlp-export"))
                    if self.usage_flusher is not None:
                        self._background.append(asyncio.get_running_loop().create_task(
                            self.usage_flusher.run(), name="key-usage"))
                    if self.record_writer is not None:
                        self._background.append(asyncio.get_running_loop().create_task(
                            self.record_writer.run(), name="request-records"))
                    if self.full_config.backup.interval_s > 0 and self.forward is None:
                        self._background.append(asyncio.get_running_loop().create_task(
                            BackupScheduler(self.full_config).run(), name="backups"))
                    if self.feedback_spool is not None and self.feedback_store is not None:
                        self._background.append(asyncio.get_running_loop().create_task(
                            feedback_routes.replay(self.feedback_spool, self.feedback_store),
                            name="feedback-spool"))
                    if self.jobs is not None:
                        self._background.append(asyncio.get_running_loop().create_task(
                            self.jobs.run(), name="jobs"))
                    if self.cache is not None:
                        await self.cache.start()
                    await self.lead.start()  # who leads is known before the duties start
                    if self.forward is None:  # the gateway process: before replicas start
                        self._child_call_env()
                    if self.control is not None:
                        await self.control.start()
                    if self.alerting is not None:
                        await self.alerting.start()
                    if self.canaries is not None:
                        await self.canaries.start()
                except Exception as exc:
                    log.exception("gateway start failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.draining = True
                try:
                    for hook in self.on_shutdown:  # workers first: they route to our replicas
                        await hook()
                    if self.jobs is not None:  # running jobs finish, or go back to the queue
                        await self.jobs.stop()
                    for task in self._background:
                        task.cancel()
                    if self.usage_flusher is not None:  # what was counted since the last one
                        await self.usage_flusher.flush()
                    if self.record_writer is not None:
                        await self.record_writer.flush()
                    if self.alerting is not None:
                        await self.alerting.stop()
                    if self.canaries is not None:
                        await self.canaries.stop()
                    for spawned in list(self._spawned):
                        spawned.cancel()
                    if self.control is not None:
                        await self.control.stop()
                    if self.cache is not None:
                        await self.cache.stop()
                    await self.lead.stop()  # the lease goes to another gateway now
                    await self.keys.stop()
                    await self.transport.close()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    def _child_call_env(self) -> None:
        """Replicas' child calls (steadyserve.compose) come back here, each with its
        deployment's credential derived from the admin key: both travel in their
        environment (control.launcher)."""
        host = self.config.host
        host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        host = f"[{host}]" if ":" in host else host
        os.environ["STEADYSERVE_GATEWAY_URL"] = f"http://{host}:{self.config.port}"
        os.environ["STEADYSERVE_GATEWAY_HOST"] = child_host_header(self.config)
        from ..control import launcher  # the gateway process only (workers start no replicas)
        launcher.set_child_tokens(self.keys.child_token)

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
        L1 and the shared L2 (which tells the other gateways). Callers bound the tags (the
        route and `invalidates=` check the [cache] limits); ALL_TAGS drops every tagged entry.
        However many arrive, what each cache remembers stays within max_tracked_invalidations."""
        replicas = await self.broadcast_invalidate(list(tags))
        body: dict[str, Any] = await self.cache.invalidate(tags) if self.cache is not None \
            else {"tags": list(tags)}
        body["replicas"] = replicas
        if self.on_invalidated is not None:  # the other processes of this gateway drop theirs
            self.on_invalidated(list(tags))
        return body

    async def broadcast_invalidate(self, tags: list[str]) -> dict[str, int]:
        """POST /invalidate to every replica of the deployments that cache by tag, in messages
        within what a replica accepts (`cache.invalidation.messages`); a replica is told when
        it took every message."""
        targets = [e for d in self.membership.deployments.values() if any(
            h.spec.options.cache_tags or h.spec.options.invalidates for h in d.handlers.values())
            for e in d.endpoints]
        if not targets:
            return {"told": 0, "failed": 0}
        bodies = [codec.encode({"tags": chunk}) for chunk in invalidation_messages(tags)]
        headers = [(b"content-type", codec.CONTENT_TYPE)]

        async def tell(e: Endpoint) -> bool:
            for body in bodies:
                try:
                    reply = await self.transport.request(e.address, "POST", "/invalidate", body,
                                                         headers, INVALIDATE_TIMEOUT_S)
                except SteadyError as exc:
                    log.warning("replica did not take an invalidation: %s", exc,
                                extra={"replica": e.replica_id, "tags": tags[:10]})
                    return False
                if reply.status != 200:
                    log.warning("replica refused an invalidation with %d", reply.status,
                                extra={"replica": e.replica_id, "tags": tags[:10]})
                    return False
            return True

        told = await asyncio.gather(*(tell(e) for e in targets))
        return {"told": sum(told), "failed": len(told) - sum(told)}

    def metrics_text(self) -> bytes:
        """This process's metrics, summed with its workers' when it has any: /metrics looks
        the same whatever the number of workers."""
        texts = self.worker_metrics()
        if not texts:
            return generate_latest(self.metrics.registry)
        return generate_latest(summed_registry(self.metrics.registry, texts))

    # status ------------------------------------------------------------------------------------
    def balancer_fits(self) -> dict[str, dict[str, dict[str, float]]]:
        """{deployment: {replica: coefficients}} for deployments whose balancer learns."""
        out = {}
        for d in self.membership.deployments.values():
            coefficients = getattr(d.balancer, "coefficients", None)
            if coefficients is not None:
                out[d.name] = coefficients()
        return out

    def describe(self, d: Deployment) -> dict[str, Any]:
        coefficients = getattr(d.balancer, "coefficients", None)
        return {
            "name": d.name,
            "balancer": d.config.balancer,
            # least_squares: per replica, latency ≈ base_s + per_kib_s × KiB + per_outstanding_s
            # × outstanding, and how many answers the fit has seen
            **({"balancer_fit": coefficients()} if coefficients is not None else {}),
            "service": d.service or d.config.service,
            "version": d.version,
            "desired_replicas": d.desired_replicas,
            "ready_replicas": len(d.endpoints),
            **({"autoscale": self._autoscale_status(d.name)}
               if d.config.autoscale is not None else {}),
            **({"shadow": self.shadows.status(d)} if d.config.shadow is not None else {}),
            **({"calls": list(d.config.calls)} if d.config.calls else {}),  # what it may call
            **({"child_calls": {h: stats.to_json() for (name, h), stats in self.hops.items()
                                if name == d.name}}
               if any(name == d.name for name, _ in self.hops) else {}),
            **({"canary": self.canaries.overview()[d.name]}
               if self.canaries is not None and d.name in self.canaries.plans else {}),
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

    def _autoscale_status(self, name: str) -> dict[str, Any] | None:
        autoscaler = getattr(self.control, "autoscaler", None)
        return autoscaler.status(name) if autoscaler is not None else None

    def export_admission(self) -> None:
        """Refresh the gauges computed on demand: admission state and connection pools. Pool
        gauges are labelled by the replica in rotation that owns the address; a pool whose
        address no replica holds now (a replica that restarted on a new port, or left) gets
        none: an address is never a label, and `set_pools` removes what is not listed."""
        m = self.metrics
        owners: dict[Any, tuple[str, str]] = {}
        for d in self.membership.deployments.values():
            adm = self.dispatcher.state(d).admission
            m.admission_limit.labels(d.name).set(adm.limit.limit)
            m.admission_inflight.labels(d.name).set(adm.inflight)
            m.admission_queued.labels(d.name).set(adm.queued)
            m.restarts.labels(d.name)  # at 0 before the first restart, so rate() sees that one
            owners.update({e.address: (d.name, e.replica_id) for e in d.endpoints})
        stats = getattr(self.transport, "pool_stats", None)
        pools: dict[tuple[str, str], tuple[int, int]] = {}
        if stats is not None:
            for address, counts in stats().items():
                owner = owners.get(address)
                if owner is not None:
                    pools[owner] = counts
        m.set_pools(pools)

    async def replica_metrics(self) -> bytes:
        """Every replica's /metrics, merged with deployment/replica labels. Each fetch is
        bounded in time and size (a replica over either is left out of this scrape), and the
        parse and merge run in a worker thread: with many replicas they take long enough to
        stall the event loop, and with it every request."""
        targets = [
            (d.name, e) for d in self.membership.deployments.values() for e in d.endpoints
        ]

        async def fetch(endpoint: Endpoint) -> bytes | None:
            try:
                reply = await asyncio.wait_for(self.transport.request(
                    endpoint.address, "GET", "/metrics", b"", [], REPLICA_METRICS_TIMEOUT_S),
                    REPLICA_METRICS_TIMEOUT_S + 0.5)  # the transport's own timer, and a backstop
            except (SteadyError, TimeoutError):
                return None
            if reply.status != 200:
                return None
            if len(reply.body) > MAX_REPLICA_METRICS_BYTES:
                log.warning("replica metrics over %d bytes left out of the scrape",
                            MAX_REPLICA_METRICS_BYTES, extra={"replica": endpoint.replica_id})
                return None
            return reply.body

        bodies = await asyncio.gather(*(fetch(e) for _, e in targets))
        texts = {(name, e.replica_id): body for (name, e), body in zip(targets, bodies, strict=True)
                 if body is not None}
        if not texts:
            return b""
        return await asyncio.to_thread(merge_replica_metrics, texts)


def _request_id(scope: Scope) -> str:
    return request_id_from(scope["headers"])
