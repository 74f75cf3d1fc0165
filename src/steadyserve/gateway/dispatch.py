"""Send one request to a deployment's replicas and get one answer back, whatever happens.

    admission slot ─► pick a replica (balancer over the ones in rotation, ejected ones out,
    a due ejected one gets one live probe, returned ones ramp up) ─► attempt with a per-try
    timeout ─► [hedge: after the observed p95, a second attempt elsewhere; first good answer
    wins; the loser is cancelled] ─► on a gateway failure of an idempotent handler: retry on
    another replica (never the one that just failed) after a short jittered pause, if the
    retry budget allows and the deadline has room.

Blame (Envoy's `consecutive_gateway_failure`, decided by `policies.outlier.blame_reply`): an
error is the replica's only when another replica could have done better. "Counted" means it
adds to the replica's consecutive failures (ejection); anything not counted resets that count
like a success, since the replica did answer. `outcome` is the label of
steadyserve_upstream_attempts_total: the ReplicaErrors alert, which restarts a replica, is the
share of outcome="5xx", so "5xx" is only ever a reply in which the replica says it failed.

    what came back                                  retried  counted  outcome        client gets
    200 with a result                               -        no       ok             200
    4xx (bad input, unknown handler, …)             no       no       4xx            the 4xx
    500 handler_failed: the handler raised          no       no       handler_error  500
      (or a service's own 5xx code)
    503 dependency_unavailable, database_unavail-   no       no       dependency     503 + Retry-After
      able, any 5xx with retry_after_s and a
      service's own code: down for every replica
    503 overloaded: the replica's batch queue full  yes      no       overloaded     503 + Retry-After
    503 retryable (service code: "not here")        yes      yes      5xx            503
    502/503 replica_unavailable (not ready, shut-   yes      yes      5xx            502
      ting down), replica_error
    504 timeout at the replica                      yes *    yes      5xx            504
    a timeout (either kind) on a deadline shorter   no       -        deadline       504
      than the handler normally needs (max(50 ms,     deadline_exceeded
      3 × p99), its own timeout before any p99):
      a client's short X-Request-Timeout-Ms
    no error code and no result, undecodable body   yes      yes      malformed      502
    connect refused/failed, reset, lost mid-reply   yes      yes      unavailable    502
    per-try timeout at the gateway                  yes *    yes      timeout        504
    reply over max_upstream_response_bytes          no       no       too_large      502
    (* only while the request's deadline has room; - : the replica's health is untouched)

A full batch queue is retried elsewhere (another replica may have room, and the retry budget
bounds the extra load) but not counted: the replica is working at capacity, not broken, and
ejecting or restarting it would take capacity away exactly when it is short and push its load
onto the others, a cascade. It lowers the deployment's concurrency limit instead, since the
gateway sent more than the replicas hold. A too-large reply is the handler's output: any
replica would send the same, so it is neither retried nor blamed.

Every attempt updates the replica's outlier state (passive health), its latency estimates
(balancer, hedging, per-try timeout) and the deployment's concurrency limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from .. import codec
from ..config import GatewayConfig, ResilienceConfig
from ..errors import (
    CallDepthExceeded,
    ConnectionLost,
    DeadlineExceeded,
    HandlerFailed,
    NoReadyReplica,
    Quarantined,
    ReplicaTimeout,
    ReplicaUnavailable,
    ResponseTooLarge,
    SteadyError,
    from_wire,
)
from ..observe.metrics import GatewayMetrics
from ..observe.tracing import Span, TraceContext
from ..policies.affinity import HashRing, pick_bounded, stable_hash
from ..policies.balancing import update_peak_ewma
from ..policies.latency import LatencyWindow
from ..policies.outlier import (
    BUSY,
    MALFORMED,
    HandlerErrors,
    OutlierPolicy,
    blame_reply,
    eject_host,
    note_answer,
    record,
    sick,
    slow_start_weight,
    start_probe,
    timeout_blames_replica,
)
from ..policies.quarantine import Quarantine
from ..policies.retry import RetryBudget, retry_backoff_s
from ..replica.server import (
    DEADLINE_HEADER,
    GRANT_HEADER,
    INPUT_KEY_HEADER,
    PRIORITY_HEADER,
)
from .activation import Activator
from .admission import Admission, Shed
from .coalesce import Coalescer
from .membership import Deployment, Endpoint, Handler
from .transport import Transport

log = logging.getLogger("steadyserve.dispatch")

REQUEST_ID_HEADER = b"x-request-id"
BACKLOG_GRACE_S = 2.0  # after a scale-up's replicas are ready, waiters stay patient this long


class _Retryable(Exception):
    """An attempt failed in a way another replica may not: carries the error to report if
    no other attempt succeeds."""

    def __init__(self, error: SteadyError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(slots=True)
class _DeploymentState:
    budget: RetryBudget
    admission: Admission
    latency: dict[str, LatencyWindow] = field(default_factory=dict)

    def window(self, handler: str) -> LatencyWindow:
        w = self.latency.get(handler)
        if w is None:
            w = self.latency[handler] = LatencyWindow()
        return w


@dataclass(slots=True)
class CallInfo:
    """What the access log and the trace want to know about one client request's dispatch."""

    trace: TraceContext | None = None
    parent_span: str | None = None
    replica: str = "-"
    attempts: int = 0
    version: str | None = None  # the model version of the replica that answered
    cache: str = "-"  # how the response cache answered: hit, miss, stale, partial, …
    cache_keys: tuple[str, ...] = ()  # the response cache's keys of the answer's items
    priority: str = "interactive"  # its admission class
    deadline_exceeded: bool = False  # answered 504 deadline_exceeded: the client's deadline
    held_s: float = 0.0  # spent waiting for a first replica (scale from zero): off its budget
    arm: str = ""  # a canary's: baseline, candidate or failover (gateway.canary); "" none
    cancelled: bool = False  # the client left during a streamed answer
    # a child call (gateway.compose): made by a replica for its own request, on that
    # request's admission slot; `caller` is the calling replica (not sent back to it)
    child: bool = False
    hops: int = 0
    principal: str | None = None  # the key id it acts for (in its replicas' grants)
    caller: str | None = None
    caller_sync: bool = False  # the caller holds its model thread while it waits


def input_key(handler: str, body: bytes) -> str:
    return hashlib.blake2b(handler.encode() + b"\0" + body, digest_size=12).hexdigest()


class Dispatcher:
    def __init__(
        self,
        transport: Transport,
        metrics: GatewayMetrics,
        cfg: ResilienceConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        on_unavailable: Callable[[str, Endpoint], None] | None = None,
        replica_exited: Callable[[str], bool] | None = None,
        gateway_cfg: GatewayConfig | None = None,
    ) -> None:
        self.transport = transport
        self.metrics = metrics
        # batched handlers' calls: those started in one loop turn share one exchange
        edge = gateway_cfg or GatewayConfig()
        self.coalescer = Coalescer(transport, max_items=edge.coalesce_max_items,
                                   max_bytes=edge.coalesce_max_bytes, on_exchange=self._exchanged)
        self.cfg = cfg or ResilienceConfig()
        self.clock = clock
        self.rand = rand
        self.on_unavailable = on_unavailable
        self.replica_exited = replica_exited
        self.outlier = OutlierPolicy(
            consecutive_failures=self.cfg.outlier_consecutive_failures,
            base_ejection_s=self.cfg.outlier_base_ejection_s,
            max_ejection_s=self.cfg.outlier_max_ejection_s,
            max_ejection_share=self.cfg.outlier_max_ejection_share,
            slow_start_s=self.cfg.slow_start_s,
        )
        self.quarantine = Quarantine(crashes=self.cfg.quarantine_crashes,
                                     quarantine_s=self.cfg.quarantine_s)
        self._states: dict[str, _DeploymentState] = {}
        self._rings: dict[tuple[str, ...], HashRing] = {}  # consistent-hash rings by replica set
        self.affinity_balance = 1.25
        # holds requests of autoscaled deployments while none of their replicas is ready
        self.activator: Activator | None = None
        # what a request sent to a deployment that declares calls hands its child calls
        # (KeyRing.grant: deployment, key id, depth, seconds left); None: nothing
        self.grant: Callable[[str, str | None, int, float], str | None] | None = None

    def _grant_for(self, d: Deployment, principal: str | None, hops: int,
                   remaining_s: float) -> str | None:
        """The grant for a request to `d`: only a deployment that declares calls gets one
        (an HMAC per attempt; the others pay nothing)."""
        if self.grant is None or not d.config.calls:
            return None
        return self.grant(d.name, principal, hops, remaining_s)

    # state ----------------------------------------------------------------------------------
    def state(self, d: Deployment) -> _DeploymentState:
        st = self._states.get(d.name)
        if st is None:
            st = self._states[d.name] = _DeploymentState(
                RetryBudget(ratio=self.cfg.retry_budget_ratio, window_s=self.cfg.retry_budget_window_s,
                            min_per_s=self.cfg.retry_budget_min_per_s),
                Admission(self.cfg, replicas=d.config.replicas, clock=self.clock),
            )
        return st

    def resize(self, d: Deployment) -> None:
        """Called when a deployment's replicas or handlers change."""
        batch = max((h.spec.options.max_batch_size for h in d.handlers.values()
                     if h.spec.options.batch), default=1)
        adm = self.state(d).admission
        adm.resize(d.desired_replicas, batch)
        if adm.scaling_up_until and len(d.endpoints) >= d.desired_replicas:
            # the replicas it waited for are in rotation: a little longer for the backlog
            # they inherit to drain, then the usual rules
            adm.scaling_up_until = min(adm.scaling_up_until, self.clock() + BACKLOG_GRACE_S)
        retain = getattr(d.balancer, "retain", None)  # a learning balancer forgets the gone
        if retain is not None:
            retain({e.replica_id for e in d.endpoints})
        if self.activator is not None:
            self.activator.changed(d)

    def demand(self, d: Deployment) -> float:
        """The deployment's ongoing requests here (what the autoscaler scales on): admitted
        and in flight, waiting for an admission slot, and held for a first ready replica."""
        adm = self.state(d).admission
        inflight = adm.inflight if self.cfg.admission else \
            sum(e.outstanding for e in d.endpoints)
        return float(inflight + adm.queued + self.held(d))

    def ongoing_area(self, d: Deployment) -> float | None:
        """∫ (admitted + queued) dt so far (None without admission control: no count kept)."""
        return self.state(d).admission.ongoing_area() if self.cfg.admission else None

    def held(self, d: Deployment) -> int:
        return self.activator.held(d.name) if self.activator is not None else 0

    async def await_replica(self, d: Deployment, timeout_s: float) -> float:
        """Hold until an autoscaled deployment has a ready replica (503 if it gets none in
        time); NoReadyReplica at once for a fixed one. Returns the seconds it held."""
        if self.activator is None or d.config.autoscale is None:
            raise NoReadyReplica(f"deployment {d.name!r} has no ready replica", retry_after_s=1)
        start = self.clock()
        await self.activator.hold(d, start + timeout_s)
        return self.clock() - start

    def on_replica_crash(self, deployment: str, keys: list[str]) -> None:
        """A replica died while its model was executing these inputs: blame them."""
        newly = self.quarantine.on_crash(keys, self.clock())
        for key in newly:
            self.metrics.quarantined.labels(deployment).inc()
            log.warning("input quarantined after crashing replicas",
                        extra={"deployment": deployment, "input_key": key})

    def eject(self, d: Deployment, replica_id: str, now: float,
              reason: str = "an automatic action") -> bool:
        """Eject a replica as if it had failed `consecutive_failures` times (an automatic
        response); the usual share limit and probe-then-slow-start return apply."""
        ejected = sum(1 for e in d.endpoints if e.health.ejected_until > 0)
        if not self.outlier.may_eject(len(d.endpoints), ejected):
            return False
        for e in d.endpoints:
            if e.replica_id == replica_id and e.health.ejected_until == 0:
                e.health = eject_host(e.health, now, self.outlier, reason)
                return True
        return False

    # the request ------------------------------------------------------------------------------
    async def invoke(
        self, deployment: Deployment, handler: Handler, args: dict[str, Any],
        *, request_id: str, timeout_s: float, priority: str = "interactive",
        call: CallInfo | None = None, affinity: str | None = None,
    ) -> Any:
        """The handler's result. `affinity` (a cacheable input's routing key) sends the first
        attempt to the replica that key hashes to, unless that replica is over its fair share."""
        call = call or CallInfo()
        st, body, key, deadline, release = await self._admit(deployment, handler, args,
                                                             timeout_s, priority, call)
        try:
            return await self._attempts(deployment, handler, st, body, key, request_id, deadline,
                                        call, affinity)
        finally:
            release()

    async def _admit(
        self, deployment: Deployment, handler: Handler, args: dict[str, Any], timeout_s: float,
        priority: str, call: CallInfo,
    ) -> tuple[_DeploymentState, bytes, str, float, Callable[[], None]]:
        """What every request does before its attempts: wait for a first replica (bounded),
        set its deadline, encode it, refuse a quarantined input, take an admission slot.
        Returns (state, body, input key, deadline, release of the slot)."""
        held = call.held_s > 0
        if not deployment.endpoints:  # scaled to zero or starting: wait for one (bounded)
            timeout_s -= await self.await_replica(deployment, timeout_s)
            held = True
        now = self.clock()
        deadline = now + min(timeout_s, handler.spec.options.timeout_s)
        body = codec.encode({"args": args})
        key = input_key(handler.name, body)
        if self.quarantine.blocked(key, now):
            raise Quarantined("this input crashed replicas repeatedly and is refused for "
                              f"{self.cfg.quarantine_s:.0f} s; the replicas are fine")
        st = self.state(deployment)
        # a child call rides on its parent's admission slot: a deployment that calls itself
        # at saturation must not wait for a slot its own waiting parents hold (deadlock)
        admit = self.cfg.admission and not call.child
        if admit:
            try:
                await st.admission.acquire(priority, deadline, held=held)
            except Shed as exc:
                self.metrics.shed.labels(deployment.name, priority, exc.reason).inc()
                raise
        call.priority = priority
        return st, body, key, deadline, st.admission.release if admit else _nothing

    async def open_stream(
        self, deployment: Deployment, handler: Handler, args: dict[str, Any],
        *, request_id: str, timeout_s: float, priority: str = "interactive",
        call: CallInfo | None = None,
    ) -> Streamed:
        """A streaming handler's items (gateway.streaming): returns once the first item (or
        the end of an empty stream) arrived. Until then a failure may go to another replica,
        as `invoke`'s attempts do; after it, nothing is retried (the client has items)."""
        call = call or CallInfo()
        st, body, key, deadline, release = await self._admit(deployment, handler, args,
                                                             timeout_s, priority, call)
        try:
            st.budget.record_request(self.clock())
            max_attempts = self.cfg.max_attempts if handler.spec.options.idempotent else 1
            tried: list[Endpoint] = []
            last: SteadyError | None = None
            while len(tried) < max_attempts:
                if tried and not st.budget.try_spend(self.clock()):
                    self.metrics.budget_exhausted.labels(deployment.name).inc()
                    break
                endpoint = self._pick(deployment, tried, avoid=self._avoid(deployment, call))
                if endpoint is None:
                    break
                if tried:
                    self.metrics.retries.labels(deployment.name).inc()
                tried.append(endpoint)
                call.attempts += 1
                try:
                    return await self._open_stream(deployment, handler, endpoint, body, key,
                                                   request_id, deadline, call, release)
                except _Retryable as exc:
                    last = exc.error
            if last is not None:
                raise last
            raise NoReadyReplica(f"deployment {deployment.name!r} has no replica left to try",
                                 retry_after_s=1)
        except BaseException:
            release()
            raise

    async def _open_stream(
        self, d: Deployment, h: Handler, endpoint: Endpoint, body: bytes, key: str,
        request_id: str, deadline: float, call: CallInfo, release: Callable[[], None],
    ) -> Streamed:
        started = self.clock()
        remaining = deadline - started
        if remaining <= 0:
            raise ReplicaTimeout("deadline exceeded before the stream could be opened")
        headers = [(REQUEST_ID_HEADER, request_id.encode()),
                   (DEADLINE_HEADER, str(int(remaining * 1000)).encode()),
                   (INPUT_KEY_HEADER, key.encode()), (b"content-type", codec.CONTENT_TYPE),
                   *parent_headers(call.priority,
                                   self._grant_for(d, call.principal, call.hops, remaining))]

        endpoint.outstanding += 1
        up = None
        try:
            try:
                up = await self.transport.open_stream(endpoint.address, "/stream/" + h.name,
                                                      body, headers, remaining)
                if up.status != 200:
                    raw = await up.body()
                    self._stream_refused(d, endpoint, up.status, raw)
                line = await up.line(max(0.001, deadline - self.clock()))
            except ReplicaUnavailable as exc:
                self._failed(d, endpoint, "unavailable")
                if self.on_unavailable is not None and not isinstance(exc, ConnectionLost):
                    self.on_unavailable(d.name, endpoint)
                raise _Retryable(exc) from None
            except ReplicaTimeout:
                raise DeadlineExceeded(f"no first item from {h.name} within the request's "
                                       f"deadline ({remaining:.3f}s)") from None
            frame = _frame(line, endpoint)
            if "i" not in frame and "end" not in frame:
                self._failed(d, endpoint, "malformed")
                raise _Retryable(ReplicaUnavailable(
                    f"replica {endpoint.replica_id} began a stream with no item"))
        except BaseException:
            endpoint.outstanding -= 1
            if up is not None:
                await up.close()
            raise
        now = self.clock()
        self._answered(d, endpoint, now, "ok")
        self.metrics.stream_first_item.labels(d.name).observe(now - started)
        call.replica = endpoint.replica_id
        return Streamed(self, d, endpoint, up, frame, deadline, release)

    def _stream_refused(self, d: Deployment, endpoint: Endpoint, status: int, raw: bytes) -> None:
        """A replica's error reply before a stream's first item: raise it (as `_Retryable`
        when another replica may do better)."""
        try:
            message = codec.decode(raw)
        except Exception:
            message = None
        wire: Any = message.get("error") if isinstance(message, dict) else None
        code = wire.get("code") if isinstance(wire, dict) else None
        code = code if isinstance(code, str) else None
        blame = blame_reply(status, code, isinstance(wire, dict) and "retry_after_s" in wire)
        error: SteadyError = from_wire(wire) if blame is not MALFORMED else ReplicaUnavailable(
            f"replica {endpoint.replica_id} sent a malformed reply (status {status})")
        if blame.replica_failed:
            self._failed(d, endpoint, blame.outcome)
        else:
            self._answered(d, endpoint, self.clock(), blame.outcome)
        if blame.retry:
            raise _Retryable(error)
        raise error

    async def _attempts(
        self, d: Deployment, h: Handler, st: _DeploymentState, body: bytes, key: str,
        request_id: str, deadline: float, call: CallInfo, affinity: str | None = None,
    ) -> Any:
        st.budget.record_request(self.clock())
        max_attempts = self.cfg.max_attempts if h.spec.options.idempotent else 1
        tried: list[Endpoint] = []
        last: SteadyError | None = None
        lost = 0  # attempts whose replica connection died while it had the request
        while len(tried) < max_attempts:
            if lost >= 2:
                # two replicas died (crashed, not a reset) holding this request: it may be a
                # poison input; never feed it a third (the flight recorders tell the quarantine)
                self.metrics.poison_stops.labels(d.name).inc()
                break
            if tried:
                now = self.clock()
                if not st.budget.try_spend(now):
                    self.metrics.budget_exhausted.labels(d.name).inc()
                    break
                pause = retry_backoff_s(len(tried), self.rand(), self.cfg.retry_backoff_base_s,
                                        self.cfg.retry_backoff_cap_s)
                if now + pause >= deadline:
                    break
                if pause > 0.0005:
                    await asyncio.sleep(pause)
                self.metrics.retries.labels(d.name).inc()
            endpoint = self._pick(d, tried, affinity if not tried else None, len(body) / 1024,
                                  avoid=self._avoid(d, call))
            if endpoint is None:
                break
            tried.append(endpoint)
            try:
                if h.spec.options.hedge and len(tried) < max_attempts:
                    return await self._hedged(d, h, st, endpoint, tried, body, key, request_id,
                                              deadline, call)
                return await self._try(d, h, st, endpoint, body, key, request_id, deadline, call)
            except _Retryable as exc:
                last = exc.error
                if isinstance(exc.error, ConnectionLost) and await self._died(endpoint):
                    lost += 1
        if last is not None:
            raise last
        raise NoReadyReplica(f"deployment {d.name!r} has no replica left to try", retry_after_s=1)

    async def _hedged(
        self, d: Deployment, h: Handler, st: _DeploymentState, first: Endpoint,
        tried: list[Endpoint], body: bytes, key: str, request_id: str, deadline: float,
        call: CallInfo,
    ) -> Any:
        loop = asyncio.get_running_loop()
        first_task = loop.create_task(
            self._try(d, h, st, first, body, key, request_id, deadline, call))
        tasks = {first_task}
        try:
            p95 = st.window(h.name).quantile(0.95)
            delay = max(self.cfg.hedge_min_delay_s, p95) if p95 is not None else None
            done: set[asyncio.Task[Any]] = set()
            if delay is not None:
                done, _ = await asyncio.wait(tasks, timeout=min(delay, deadline - self.clock()))
            if not done and delay is not None and st.budget.try_spend(self.clock()):
                second = self._pick(d, tried, size=len(body) / 1024)
                if second is not None:
                    tried.append(second)
                    self.metrics.hedges.labels(d.name).inc()
                    tasks.add(loop.create_task(
                        self._try(d, h, st, second, body, key, request_id, deadline, call,
                                  hedge=True)))
            last: BaseException | None = None
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is None:
                        if task is not first_task and not first_task.done():
                            # the hedge won while the first replica has not answered even
                            # past the p95 plus a whole service time: count it as a failure
                            # of that replica, so a frozen one is ejected after a few
                            self._failed(d, first, "slow")
                        return task.result()
                    if not isinstance(exc, _Retryable):
                        raise exc
                    last = exc
            assert last is not None
            raise last
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()  # the loser: closing its connection cancels it at the replica

    @staticmethod
    def _avoid(d: Deployment, call: CallInfo | None) -> str | None:
        """The replica a child call must not go back to: its caller, which waits for it. A
        caller holding its model thread (a sync handler) with no other replica to go to
        would wait for itself until the deadline: refused at once instead."""
        if call is None or call.caller is None:
            return None
        if call.caller_sync and not any(e.replica_id != call.caller for e in d.endpoints):
            raise CallDepthExceeded(
                f"replica {call.caller} called its own deployment {d.name!r} from a sync "
                "handler, and it is the only replica: it would wait for itself. Make the "
                "handler async, or give the deployment more replicas")
        return call.caller

    def _pick(self, d: Deployment, tried: list[Endpoint], affinity: str | None = None,
              size: float = 0.0, avoid: str | None = None) -> Endpoint | None:
        """A replica for the next attempt; `size` is the request body's KiB (least_squares);
        never `avoid` (a child call's caller) while another replica exists."""
        now = self.clock()
        candidates: list[Endpoint] = []
        ramping: list[Endpoint] = []
        ejected: list[Endpoint] = []
        last = tried[-1] if tried else None
        untried = len(tried) < len(d.endpoints)
        for e in d.endpoints:
            # every replica once; then any but the one that just failed
            if (untried and e in tried) or e is last:
                continue
            if avoid is not None and e.replica_id == avoid and len(d.endpoints) > 1:
                continue
            health = e.health
            if health.ejected_until > 0:
                if health.due_for_probe(now):
                    e.health = start_probe(health)  # one live request decides its return
                    return e
                ejected.append(e)
                continue
            weight = slow_start_weight(health, now, self.outlier)
            if weight < 1.0 and self.rand() > weight:
                ramping.append(e)
                continue
            candidates.append(e)
        pool = candidates or ramping or ejected  # panic mode: better an ejected one than none
        if not pool:
            return None
        if len(pool) == 1:
            return pool[0]
        if affinity is not None:
            ring = self._ring(pool)
            return pool[pick_bounded(ring, [e.outstanding for e in pool], stable_hash(affinity),
                                     balance=self.affinity_balance)]
        return pool[d.balancer.pick(pool, self.rand, size)]

    def _ring(self, pool: list[Endpoint]) -> HashRing:
        ids = tuple(e.replica_id for e in pool)
        ring = self._rings.get(ids)
        if ring is None:
            if len(self._rings) > 64:
                self._rings.clear()
            ring = self._rings[ids] = HashRing(ids)
        return ring

    async def _died(self, endpoint: Endpoint) -> bool:
        """Did the replica die with the request (a crash), rather than the connection reset?
        Its sockets close a moment before the process turns zombie: look twice."""
        if self.replica_exited is None:
            return False
        for _ in range(3):
            if self.replica_exited(endpoint.replica_id):
                return True
            await asyncio.sleep(0.002)
        return False

    def per_try_timeout(self, st: _DeploymentState, h: Handler, remaining: float) -> float:
        """The handler's own per_try_timeout_s; for hedged handlers max(floor, 3 × p99);
        otherwise the whole remaining deadline. (A latency-derived timeout on every handler
        would cut legitimately large requests — 2,000 texts to embed — and retry them.)"""
        options = h.spec.options
        if options.per_try_timeout_s is not None:
            return min(remaining, options.per_try_timeout_s)
        if not options.hedge:
            return remaining
        p99 = st.window(h.name).quantile(0.99)
        floor = self.cfg.per_try_timeout_min_s
        adaptive = floor if p99 is None else max(floor, self.cfg.per_try_timeout_p99_multiple * p99)
        return min(remaining, adaptive)

    async def _try(
        self, d: Deployment, h: Handler, st: _DeploymentState, endpoint: Endpoint, body: bytes,
        key: str, request_id: str, deadline: float, call: CallInfo, hedge: bool = False,
    ) -> Any:
        call.attempts += 1
        span = None
        if call.trace is not None:
            span = call.trace.start("hedge" if hedge else "attempt", call.parent_span)
            span.attributes.update({"replica": endpoint.replica_id, "handler": h.name,
                                    "attempt": call.attempts})
        ok = False
        try:
            message = await self._attempt(d, h, st, endpoint, body, key, request_id, deadline,
                                          span, call.trace, call.priority, call.hops,
                                          call.principal)
            ok = True
            call.replica = endpoint.replica_id
            version = message.get("v")
            call.version = str(version) if version is not None else None
            return message["result"]
        finally:
            if span is not None:
                span.end(error=not ok)

    async def _attempt(
        self, d: Deployment, h: Handler, st: _DeploymentState, endpoint: Endpoint, body: bytes,
        key: str, request_id: str, deadline: float, span: Span | None,
        trace: TraceContext | None, priority: str = "interactive", call_hops: int = 0,
        principal: str | None = None,
    ) -> dict[str, Any]:
        started = self.clock()
        remaining = deadline - started
        if remaining <= 0:
            raise ReplicaTimeout("deadline exceeded before the request could be sent")
        per_try = self.per_try_timeout(st, h, remaining)
        headers = [
            (REQUEST_ID_HEADER, request_id.encode()),
            (DEADLINE_HEADER, str(int(per_try * 1000)).encode()),
            (INPUT_KEY_HEADER, key.encode()),
            (b"content-type", codec.CONTENT_TYPE),
            *parent_headers(priority, self._grant_for(d, principal, call_hops, per_try)),
        ]
        if span is not None and trace is not None:
            headers.append((b"traceparent", trace.header(span)))
            if trace.tracestate:
                headers.append((b"tracestate", trace.tracestate.encode()))
        held = endpoint.outstanding
        endpoint.outstanding += 1
        try:
            if h.spec.options.batch:
                reply = await self.coalescer.request(endpoint.address, h.name, body, headers,
                                                     per_try)
            else:
                reply = await self.transport.request(
                    endpoint.address, "POST", "/invoke/" + h.name, body, headers, per_try)
        except ResponseTooLarge:
            self._answered(d, endpoint, self.clock(), "too_large")  # the output, not the replica
            raise
        except ReplicaUnavailable as exc:
            self._failed(d, endpoint, "unavailable")
            if self.on_unavailable is not None:
                self.on_unavailable(d.name, endpoint)
            raise _Retryable(exc) from None
        except ReplicaTimeout as exc:
            if self._clients_deadline(st, h, per_try, remaining):
                raise self._deadline_exceeded(d, h, endpoint, per_try) from None
            self._failed(d, endpoint, "timeout")
            st.admission.on_failure(self.clock() - started)
            if per_try < remaining - 0.001:  # a per-try timeout: another replica may answer
                raise _Retryable(exc) from None
            raise ReplicaTimeout(f"no answer within the request's deadline ({remaining:.3f}s)") \
                from None
        finally:
            endpoint.outstanding -= 1
        now = self.clock()
        try:
            message = codec.decode(reply.body)
        except Exception:  # msgpack raises several types for garbage; all mean "not our reply"
            message = None
        if reply.status == 200 and isinstance(message, dict) and "result" in message:
            self._answered(d, endpoint, now, "ok")
            latency = now - started
            st.window(h.name).add(latency)
            endpoint.ewma_latency_s = update_peak_ewma(endpoint.ewma_latency_s, endpoint.ewma_at,
                                                       latency, now)
            endpoint.ewma_at = now
            observe = getattr(d.balancer, "observe", None)  # least_squares learns per answer
            if observe is not None:
                observe(endpoint.replica_id, len(body) / 1024, held, latency)
            st.admission.on_sample(queue_s=float(message.get("q", 0.0)),
                                   service_s=float(message.get("s", 0.0)),
                                   batched=h.spec.options.batch, rtt_s=latency,
                                   missed_batches=int(message.get("m", 0)), handler=h.name,
                                   priority=priority, batch_items=int(message.get("n", 1)))
            return message
        wire: Any = message.get("error") if isinstance(message, dict) else None
        code = wire.get("code") if isinstance(wire, dict) else None
        code = code if isinstance(code, str) else None
        if code == "timeout" and self._clients_deadline(st, h, per_try, remaining):
            raise self._deadline_exceeded(d, h, endpoint, per_try)
        blame = blame_reply(reply.status, code, isinstance(wire, dict) and "retry_after_s" in wire)
        error: SteadyError = from_wire(wire) if blame is not MALFORMED else ReplicaUnavailable(
            f"replica {endpoint.replica_id} sent a malformed reply (status {reply.status})")
        if blame.replica_failed:
            self._failed(d, endpoint, blame.outcome)
        else:
            self._answered(d, endpoint, now, blame.outcome)
        if blame is BUSY or code == "timeout":  # congestion: the limit is above what replicas hold
            st.admission.on_failure(now - started)
        if blame.retry and (code != "timeout" or per_try < remaining - 0.001):
            raise _Retryable(error)
        raise error

    def _exchanged(self, calls: int) -> None:
        self.metrics.exchanges.inc()
        self.metrics.exchange_calls.inc(calls)

    def _clients_deadline(self, st: _DeploymentState, h: Handler, per_try: float,
                          remaining: float) -> bool:
        """Did an attempt time out on the request's own deadline (not a per-try timeout the
        handler or hedging set), one shorter than this handler normally needs?"""
        if per_try < remaining - 0.001:
            return False
        return not timeout_blames_replica(
            per_try, handler_timeout_s=h.spec.options.timeout_s,
            p99_s=st.window(h.name).quantile(0.99),
            p99_multiple=self.cfg.per_try_timeout_p99_multiple)

    def _deadline_exceeded(self, d: Deployment, h: Handler, endpoint: Endpoint,
                           budget_s: float) -> DeadlineExceeded:
        """The request's own deadline was shorter than this handler normally needs: no
        replica failed and nothing is congested, so outlier detection, the concurrency limit
        and the retry loop leave it alone (outcome="deadline")."""
        self.metrics.count_upstream(d.name, endpoint.replica_id, "deadline")
        return DeadlineExceeded(
            f"no answer within the request's deadline ({budget_s * 1000:.0f} ms left of "
            f"X-Request-Timeout-Ms): shorter than handler {h.name!r} normally needs",
            param="x-request-timeout-ms")

    def _answered(self, d: Deployment, endpoint: Endpoint, now: float, outcome: str) -> None:
        """The replica answered (a result, or an error that is not its fault): for outlier
        detection this is a success, which also ends a probe and resets the failure count.
        Handler errors are weighed against the peers' (`policies.outlier.sick`)."""
        self.metrics.count_upstream(d.name, endpoint.replica_id, outcome)
        if outcome in ("ok", "handler_error"):
            endpoint.handler_errors = note_answer(
                endpoint.handler_errors, error=outcome == "handler_error",
                window=self.cfg.outlier_error_min_requests)
        health, event = record(endpoint.health, True, now, self.outlier, may_eject=False)
        endpoint.health = health
        if event == "returned":
            self.metrics.outlier_events.labels(d.name, "returned").inc()
            log.info("replica back in rotation after its probe succeeded",
                     extra={"replica": endpoint.replica_id})
        elif outcome == "handler_error" and endpoint.health.ejected_until == 0:
            self._eject_if_sick(d, endpoint, now)

    def _eject_if_sick(self, d: Deployment, endpoint: Endpoint, now: float) -> None:
        peers = [e.handler_errors for e in d.endpoints if e is not endpoint]
        if not sick(endpoint.handler_errors, peers, error_ratio=self.cfg.outlier_error_ratio,
                    min_requests=self.cfg.outlier_error_min_requests):
            return
        errors = endpoint.handler_errors
        why = (f"its handler failed {errors.ratio:.0%} of its last {errors.answers:.0f} requests, "
               "its peers far fewer")
        ratio = errors.ratio
        if self.eject(d, endpoint.replica_id, now, why):
            endpoint.handler_errors = HandlerErrors()  # judged afresh after its return
            self.metrics.outlier_events.labels(d.name, "ejected").inc()
            log.warning("replica ejected: its handler fails %.0f%% of requests, its peers far "
                        "fewer", 100 * ratio, extra={"replica": endpoint.replica_id})

    def _failed(self, d: Deployment, endpoint: Endpoint, outcome: str) -> None:
        self.metrics.count_upstream(d.name, endpoint.replica_id, outcome)
        now = self.clock()
        ejected = sum(1 for e in d.endpoints if e.health.ejected_until > 0)
        may = self.outlier.may_eject(len(d.endpoints), ejected)
        health, event = record(endpoint.health, False, now, self.outlier, may_eject=may)
        endpoint.health = health
        if event == "ejected":
            self.metrics.outlier_events.labels(d.name, "ejected").inc()
            log.warning("replica ejected for %.0fs after repeated failures",
                        health.ejected_until - now,
                        extra={"replica": endpoint.replica_id, "ejections": health.ejections})


def _nothing() -> None:
    return None


def _frame(line: bytes, endpoint: Endpoint) -> dict[str, Any]:
    """One frame of a replica's stream (replica.streaming), checked."""
    try:
        frame = orjson.loads(line)
    except orjson.JSONDecodeError:
        frame = None
    if not isinstance(frame, dict):
        raise ConnectionLost(f"stream from replica {endpoint.replica_id} broke off"
                             if not line.endswith(b"\n") else
                             f"replica {endpoint.replica_id} sent a malformed stream frame")
    return frame


class Streamed:
    """A stream whose first frame arrived: its items, then `close` (always: it frees the
    replica's slot, the admission slot and, if unfinished, the connection — which stops the
    generator at the replica)."""

    def __init__(self, dispatcher: Dispatcher, d: Deployment, endpoint: Endpoint, up: Any,
                 first: dict[str, Any], deadline: float, release: Callable[[], None]) -> None:
        self.dispatcher = dispatcher
        self.d = d
        self.endpoint = endpoint
        self.up = up
        self.first = first
        self.deadline = deadline
        self._release: Callable[[], None] | None = release
        self.items_sent = 0

    async def items(self) -> AsyncIterator[Any]:
        """The items; a failure after the first raises (never retried: the client has some)."""
        frame = self.first
        clock = self.dispatcher.clock
        while True:
            if "i" in frame:
                self.items_sent += 1
                yield frame["i"]
            elif "end" in frame:
                return
            elif "e" in frame:
                wire = frame["e"]
                raise from_wire(wire) if isinstance(wire, dict) else HandlerFailed(
                    "the handler failed mid-stream")
            left = self.deadline - clock()
            if left <= 0:
                raise DeadlineExceeded("the stream passed the request's deadline")
            try:
                line = await self.up.line(left)
            except ReplicaTimeout:
                raise DeadlineExceeded("the stream passed the request's deadline") from None
            if not line:
                raise ConnectionLost(f"replica {self.endpoint.replica_id} ended the stream "
                                     "without finishing it")
            frame = _frame(line, self.endpoint)

    async def close(self) -> None:
        if self._release is None:
            return
        release, self._release = self._release, None
        self.endpoint.outstanding -= 1
        release()
        await self.up.close()


def parent_headers(priority: str, grant: str | None) -> list[tuple[bytes, bytes]]:
    """What a replica needs to make child calls on this request's behalf (gateway.compose):
    its admission class, and the grant its child calls hand back (auth.childcalls: the key
    it acts for, its depth and deadline)."""
    out = [(PRIORITY_HEADER, priority.encode())]
    if grant is not None:
        out.append((GRANT_HEADER, grant.encode()))
    return out
