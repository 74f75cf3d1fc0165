"""Asynchronous inference jobs: the routes and the runner.

    POST   /v1/jobs/{deployment}/{handler}   the handler's parameters, as the native route
                                             takes them → 202 {"id", …} once stored
           Idempotency-Key: k                the same key (per API key) returns the same job
           X-Webhook-Url: https://…          told once the job is final (signed, retried)
           X-Job-Timeout-S: 600              the job's deadline ([jobs] default_timeout_s)
    GET    /v1/jobs/{id}                     state, result or error, timings, webhook
    DELETE /v1/jobs/{id}                     cancel a queued or running job
    GET    /v1/jobs?state=…&limit=…          the caller's jobs, newest first (admin: all)

A job is the caller's: only the API key that made it, or an admin key, reads or cancels it
(anyone else gets the 404 an unknown id gets). The queue is the state database
(store.jobs). The runner lives in the gateway process (a data-plane worker forwards these
routes there); with [cluster] every gateway sharing the database runs one, and SKIP LOCKED
keeps them from claiming the same job.

The runner claims a deployment's due jobs only while the deployment has spare capacity
(policies.jobs.spare_slots: nothing waiting for admission, in-flight requests under
`capacity_share` of its concurrency limit) and runs each through the gateway's dispatcher at
batch priority, with request id `job-<id>-<attempt>`: balancing, retries on another
replica, ejection and admission apply, and admission sheds a job before any interactive
request. Each claim carries a lease the runner renews; a job whose gateway died is reaped
when its lease runs out and tried again (at least once). Its outcome is stored only if the
job still runs that attempt (exactly once). Webhooks go out after the outcome is stored
(the same statement marks them due), at least once, signed; the event id is the job id.
The runner owns their sender (gateway.webhooks.WebhookSender) and runs its loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from prometheus_client import CollectorRegistry

from ..config import Config, JobsConfig
from ..errors import (
    ClientError,
    Conflict,
    DependencyUnavailable,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    SteadyError,
)
from ..observe.metrics import JobMetrics
from ..policies.jobs import (
    FINAL,
    STATES,
    Decision,
    Outcome,
    RetryPolicy,
    classify,
    decide,
    spare_slots,
    webhook_problem,
)
from ..store.jobs import JobStore
from .access import Access
from .dispatch import CallInfo, Dispatcher
from .http import Request, Response, json_response
from .membership import Deployment, Membership
from .routes import await_handlers, check_items, find_deployment, find_handler
from .webhooks import WebhookSender, webhook_secret

if TYPE_CHECKING:
    from ..store.database import Database
    from .app import Gateway

log = logging.getLogger("steadyserve.jobs")

JOB_ID = re.compile(r"job_[0-9a-f]{24}")
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REAP_BATCH = 100  # expired leases settled per pass
PRUNE_EVERY_S = 60.0
COUNT_EVERY_S = 5.0
SETTLE_RETRY_S = 0.5  # the database refused an outcome: try again this often (within the lease)


# --- routes -------------------------------------------------------------------------------
def _runner(gw: Gateway) -> JobRunner:
    if not gw.full_config.jobs.enabled:
        raise NotFound("asynchronous jobs are disabled on this gateway ([jobs] enabled = false)")
    if gw.jobs is None:
        raise DependencyUnavailable("jobs live in the state database, which this gateway could "
                                    "not open; see its log", retry_after_s=5)
    return gw.jobs


def _job_id(params: dict[str, str]) -> str:
    job_id = params["job"]
    if not JOB_ID.fullmatch(job_id):
        raise ClientError("a job id is 'job_' and 24 hex digits, as POST /v1/jobs/… answered",
                          param="job")
    return job_id


def _not_a_child(req: Request) -> None:
    """A replica's child call acts for its parent's key only until the parent's deadline
    (auth.childcalls): a job would outlive it, so the queue is not a child call's to use."""
    if req.child:
        raise Forbidden("a child call may not use the job queue: it acts for its parent "
                        "request's key only until that request's deadline")


def _owner(req: Request) -> str:
    return req.principal.id if req.principal is not None else ""


def _is_admin(req: Request) -> bool:
    return req.principal is not None and req.principal.allows("admin")


def _readable(req: Request, job_id: str, job: dict[str, Any] | None) -> dict[str, Any]:
    """The job if this caller may see it: the key that made it, or an admin key. Anyone
    else is told what an unknown id is told."""
    if job is None or not (_is_admin(req) or job["key_id"] == _owner(req)):
        raise NotFound(f"no job {job_id!r}", param="job")
    return job


def _options(req: Request, cfg: JobsConfig) -> tuple[str | None, str | None, float]:
    """(idempotency key, webhook URL, timeout) from the request's headers, checked."""
    idem = req.header(b"idempotency-key")
    if idem is not None and not IDEMPOTENCY_KEY.fullmatch(idem.strip()):
        raise ClientError("Idempotency-Key must be 1 to 128 of A-Z a-z 0-9 . _ : -",
                          param="idempotency-key")
    url = req.header(b"x-webhook-url")
    if url is not None:
        url = url.strip()
        problem = webhook_problem(url, cfg.webhook_hosts, cfg.max_webhook_url_chars)
        if problem is not None:
            raise ClientError(problem, param="x-webhook-url")
    raw = req.header(b"x-job-timeout-s")
    timeout_s = cfg.default_timeout_s
    if raw is not None:
        try:
            timeout_s = float(raw.strip())
        except ValueError:
            timeout_s = -1.0
        if not 0 < timeout_s <= cfg.max_timeout_s:  # also refuses nan and inf
            raise ClientError(f"X-Job-Timeout-S must be seconds in (0, {cfg.max_timeout_s:g}] "
                              f"([jobs] max_timeout_s), got {raw[:40]!r}",
                              param="x-job-timeout-s")
    return (idem.strip() if idem is not None else None), url, timeout_s


def view(job: dict[str, Any], *, full: bool = True) -> dict[str, Any]:
    """A job as the API shows it: never its parameters; its result only in full."""
    created, started, finished = job["created_at"], job.get("started_at"), job.get("finished_at")
    out: dict[str, Any] = {
        "id": job["id"], "deployment": job["deployment"], "handler": job["handler"],
        "state": job["state"], "attempt": job["attempt"], "failures": job["failures"],
        "created_at": created, "started_at": started, "finished_at": finished,
        "deadline_at": job["deadline_at"],
        "timings": {
            "queued_s": None if started is None else round(started - created, 6),
            "running_s": None if started is None or finished is None
            else round(finished - started, 6),
            "total_s": None if finished is None else round(finished - created, 6),
        },
    }
    if full:
        raw = job.get("result")
        out["result"] = None if raw is None else orjson.Fragment(raw)
        out["error"] = job.get("error")
        if job.get("webhook_url") is not None:
            out["webhook"] = {"state": job.get("webhook_state"),
                              "attempts": job.get("webhook_attempts", 0),
                              "at": job.get("webhook_at"), "error": job.get("webhook_error")}
    elif job.get("webhook_state") is not None:
        out["webhook"] = {"state": job["webhook_state"]}
    return out


def request_hash(deployment: str, handler: str, args_json: bytes) -> str:
    return hashlib.blake2b(f"{deployment}\0{handler}\0".encode() + args_json,
                           digest_size=16).hexdigest()


async def submit_job(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    _not_a_child(req)
    if gw.forward is not None:  # a data-plane worker: the gateway process keeps the queue
        req.forwarded = True
        return await gw.forward(req)  # type: ignore[no-any-return]
    runner = _runner(gw)
    cfg = runner.cfg
    d = find_deployment(gw, params["deployment"])
    Access.allow_deployment(req, d.name)
    idem, url, timeout_s = _options(req, cfg)
    body = await req.json(min(gw.config.max_body_bytes, cfg.max_input_bytes))
    if not d.handlers:  # an autoscaled deployment at zero: its handlers come with a replica
        await await_handlers(gw, req, d)
    h = find_handler(d, params["handler"])
    args = h.validate(body)
    check_items(h, args, h.spec.options.max_inputs)
    encoded = orjson.dumps(args, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    if len(encoded) > cfg.max_input_bytes:
        raise PayloadTooLarge(f"the job's parameters are over [jobs] max_input_bytes "
                              f"({cfg.max_input_bytes} bytes as JSON)")
    now = runner.wall()
    job, created = await asyncio.to_thread(runner.store.submit, {
        "id": f"job_{uuid.uuid4().hex[:24]}", "deployment": d.name, "handler": h.name,
        "args": encoded.decode(), "key_id": _owner(req), "idempotency_key": idem,
        "request_hash": request_hash(d.name, h.name, encoded), "created_at": now,
        "deadline_at": now + timeout_s, "webhook_url": url})
    if created:
        runner.wake()
    resp = json_response({**view(job, full=not created), "created": created,
                          "url": f"/v1/jobs/{job['id']}"}, 202 if created else 200)
    resp.headers.append((b"location", f"/v1/jobs/{job['id']}".encode()))
    return resp


async def get_job(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    runner = _runner(gw)
    job_id = _job_id(params)
    job = _readable(req, job_id, await asyncio.to_thread(runner.store.get, job_id))
    return json_response(view(job))


async def cancel_job(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    _not_a_child(req)
    if gw.forward is not None:
        req.forwarded = True
        return await gw.forward(req)  # type: ignore[no-any-return]
    runner = _runner(gw)
    job_id = _job_id(params)
    _readable(req, job_id, await asyncio.to_thread(runner.store.get, job_id))
    job, cancelled = await asyncio.to_thread(runner.store.cancel, job_id, runner.wall())
    if job is None:
        raise NotFound(f"no job {job_id!r}", param="job")
    if not cancelled and job["state"] != "cancelled":
        raise Conflict(f"job {job_id} is {job['state']} already: only a queued or running job "
                       "can be cancelled", param="job")
    if cancelled:
        runner.stop_run(job_id)  # here at once; another gateway at its next lease renewal
        runner.wake_webhooks()
    return json_response(view(job))


async def list_jobs(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    runner = _runner(gw)
    state = req.query("state", 16)
    if state is not None and state not in STATES:
        raise ClientError(f"'state' must be one of {list(STATES)}", param="state")
    limit = req.query_int("limit", 1, runner.cfg.max_list, default=min(100, runner.cfg.max_list))
    admin = _is_admin(req)
    rows = await asyncio.to_thread(runner.store.recent, None if admin else _owner(req), state,
                                   limit)
    body: dict[str, Any] = {"jobs": [view(r, full=False) for r in rows]}
    if admin:
        body["counts"] = await asyncio.to_thread(runner.store.counts)
    return json_response(body)


# --- the runner ---------------------------------------------------------------------------
@dataclass(slots=True)
class _Run:
    task: asyncio.Task[None]
    job: dict[str, Any]


def _error(code: str, message: str, status: int) -> dict[str, Any]:
    return {"code": code, "message": message, "status": status}


class JobRunner:
    """The gateway process's job runner; `run()` is its one background task (three loops
    that each log and go on after any error: claiming jobs, their leases, and its
    `webhooks` sender's), `stop()` the staged end."""

    def __init__(self, cfg: JobsConfig, store: JobStore, membership: Membership,
                 dispatcher: Dispatcher, registry: CollectorRegistry, holder: str,
                 secret: bytes, *, drain_s: float = 10.0,
                 wall: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 http: httpx.AsyncClient | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.membership = membership
        self.dispatcher = dispatcher
        self.metrics = JobMetrics(registry)
        self.holder = holder
        self.drain_s = drain_s
        self.wall = wall
        self.rand = rand
        self.retry = RetryPolicy(cfg.max_failures, cfg.retry_base_s, cfg.retry_cap_s)
        self.webhooks = WebhookSender(cfg, store, self.metrics, secret, wall=wall, rand=rand,
                                      http=http)
        self.running: dict[str, _Run] = {}
        self.stopped_runs: set[str] = set()  # cancelled, or no longer ours: nothing to store
        self.stopping = False
        self._wake = asyncio.Event()
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._down = False  # the database refused the last claim (logged once)

    # what the routes call
    def wake(self) -> None:
        self._wake.set()

    def wake_webhooks(self) -> None:
        self.webhooks.wake()

    def stop_run(self, job_id: str) -> None:
        run = self.running.get(job_id)
        if run is not None:
            self.stopped_runs.add(job_id)
            run.task.cancel()

    # lifecycle
    async def run(self) -> None:
        log.info("job runner started", extra={"holder": self.holder})
        loop = asyncio.get_running_loop()
        self._loops = {"claim": loop.create_task(self._claim_loop(), name="jobs-claim"),
                       "leases": loop.create_task(self._lease_loop(), name="jobs-leases"),
                       "webhooks": loop.create_task(self.webhooks.run(), name="jobs-webhooks")}
        try:
            await asyncio.wait(self._loops.values())  # (stop() ends them one by one)
        finally:
            for task in self._loops.values():
                task.cancel()

    async def stop(self) -> None:
        """Stop claiming jobs and webhooks; give running jobs `drain_s` to finish (their
        leases still renewed); cancel the rest and put them back in the queue, not counted
        as failures; end webhook tries (a try cut short is tried again after its hold)."""
        self.stopping = self.webhooks.stopping = True
        first = [self._loops[n] for n in ("claim", "webhooks") if n in self._loops]
        for task in first:
            task.cancel()
        await asyncio.gather(*first, return_exceptions=True)
        tasks = [r.task for r in self.running.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=self.drain_s)
        left = list(self.running.values())
        for r in left:
            r.task.cancel()
        await asyncio.gather(*(r.task for r in left), return_exceptions=True)
        now = self.wall()
        for r in left:
            job = r.job
            with suppress(DependencyUnavailable):
                if await asyncio.to_thread(self.store.settle, job["id"], job["attempt"],
                                           Decision("queued", job["failures"], now), now):
                    log.info("job put back in the queue at shutdown", extra={"job": job["id"]})
        await self.webhooks.close()
        leases = self._loops.get("leases")
        if leases is not None:
            leases.cancel()
            await asyncio.gather(leases, return_exceptions=True)

    # claiming -----------------------------------------------------------------------------
    async def _claim_loop(self) -> None:
        while not self.stopping:
            self._wake.clear()
            started = 0
            try:
                started = await self.claim_once()
                self._down = False
            except DependencyUnavailable as exc:
                if not self._down:
                    log.warning("jobs wait for the database: %s", exc.message)
                self._down = True
            except Exception:
                log.exception("claiming jobs failed; trying again")
            if not started:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.cfg.poll_s)

    def slots(self, d: Deployment) -> int:
        """How many more of `d`'s jobs may start now (policies.jobs.spare_slots)."""
        adm = self.dispatcher.state(d).admission
        mine = sum(1 for r in self.running.values() if r.job["deployment"] == d.name)
        inflight = adm.inflight if self.dispatcher.cfg.admission else \
            sum(e.outstanding for e in d.endpoints)
        # jobs just started may not hold their admission slot yet: count them either way
        free = spare_slots(inflight=max(inflight, mine), limit=adm.limit.limit,
                           waiting=adm.queued, share=self.cfg.capacity_share,
                           running=len(self.running), max_running=self.cfg.max_running)
        if not d.endpoints:  # an autoscaled deployment at zero: one job asks for a replica
            return min(free, 1) if d.config.autoscale is not None and not mine else 0
        return free

    async def claim_once(self) -> int:
        started = 0
        for d in list(self.membership.deployments.values()):
            if self.stopping:
                break
            n = self.slots(d)
            if n <= 0:
                continue
            claimed = await asyncio.to_thread(self.store.claim, d.name, n, self.holder,
                                              self.wall(), self.cfg.lease_s)
            for job in claimed:
                self._start(job)
            started += len(claimed)
        return started

    def _start(self, job: dict[str, Any]) -> None:
        job_id = str(job["id"])
        task = asyncio.get_running_loop().create_task(self._run_job(job), name=f"job-{job_id}")
        self.running[job_id] = _Run(task, job)

        def done(t: asyncio.Task[None]) -> None:
            if self.running.get(job_id) is not None and self.running[job_id].task is t:
                del self.running[job_id]
            self.stopped_runs.discard(job_id)
            if not t.cancelled() and t.exception() is not None:
                log.error("job run failed", exc_info=t.exception(), extra={"job": job_id})
            self._wake.set()  # a slot is free

        task.add_done_callback(done)

    async def _run_job(self, job: dict[str, Any]) -> None:
        job_id, attempt = str(job["id"]), int(job["attempt"])
        outcome, result, error = await self.execute(job)
        if job_id in self.stopped_runs:
            return
        now = self.wall()
        decision = decide(outcome, attempt=attempt, failures=int(job["failures"]),
                          deadline_at=float(job["deadline_at"]), now=now, rand01=self.rand(),
                          policy=self.retry)
        self.metrics.runs.labels(job["deployment"], outcome).inc()
        stored = await self._settle(job_id, attempt, decision, now, result, error)
        extra = {"job": job_id, "attempt": attempt, "state": decision.state,
                 "deployment": job["deployment"], "outcome": outcome}
        if stored is None:
            log.error("job outcome not stored (the database is down): it runs again after "
                      "its lease", extra=extra)
        elif not stored:
            log.info("job outcome not stored: the job was cancelled or its lease was taken",
                     extra=extra)
        elif decision.state in FINAL:
            self.metrics.finished.labels(job["deployment"], decision.state).inc()
            log.info("job finished", extra=extra)
            self.wake_webhooks()
        else:
            log.info("job will be tried again", extra={
                **extra, "error": (error or {}).get("code"),
                "in_s": round((decision.available_at or now) - now, 3)})

    async def execute(self, job: dict[str, Any]) -> tuple[Outcome, bytes | None,
                                                          dict[str, Any] | None]:
        """One run: (outcome, the result as JSON, the error)."""
        name, handler = str(job["deployment"]), str(job["handler"])
        d = self.membership.get(name)
        if d is None:
            return "refused", None, _error("not_found", f"no deployment {name!r}", 404)
        deadline_at = float(job["deadline_at"])
        try:
            if not d.handlers:  # an autoscaled deployment at zero: wait for its replica
                await self.dispatcher.await_replica(d, max(0.001, deadline_at - self.wall()))
            h = d.handlers.get(handler)
            if h is None:
                return "refused", None, _error(
                    "not_found", f"deployment {name!r} has no handler {handler!r}", 404)
            remaining = deadline_at - self.wall()
            if remaining <= 0:
                return "late", None, _error("deadline_exceeded", "the job's deadline passed",
                                            504)
            value = await self.dispatcher.invoke(
                d, h, orjson.loads(job["args"]), request_id=f"job-{job['id']}-{job['attempt']}",
                timeout_s=remaining, priority="batch",
                call=CallInfo(principal=job["key_id"] or None))  # its children act for it
        except SteadyError as exc:
            kind = classify(exc.status, exc.code, deadline_passed=self.wall() >= deadline_at)
            return kind, None, _error(exc.code, exc.message, exc.status)
        except Exception as exc:  # a bug of ours: the run failed, the job is tried again
            log.exception("job run failed", extra={"job": job["id"]})
            return "error", None, _error("internal_error", f"internal error: "
                                         f"{type(exc).__name__}", 500)
        try:
            body = orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError as exc:
            return "refused", None, _error("result_not_json", f"the result is not JSON: {exc}",
                                           502)
        if len(body) > self.cfg.max_result_bytes:
            return "refused", None, _error(
                "result_too_large", f"the result is {len(body)} bytes as JSON, over [jobs] "
                f"max_result_bytes ({self.cfg.max_result_bytes})", 502)
        return "ok", body, None

    async def _settle(self, job_id: str, attempt: int, decision: Decision, now: float,
                      result: bytes | None, error: dict[str, Any] | None) -> bool | None:
        """Store the outcome (True), or learn it is not ours to store (False); None if the
        database refused it until the lease ran out."""
        give_up = time.monotonic() + self.cfg.lease_s
        while True:
            try:
                return await asyncio.to_thread(self.store.settle, job_id, attempt, decision,
                                               now, result=result, error=error)
            except DependencyUnavailable:
                if time.monotonic() >= give_up:
                    return None
                await asyncio.sleep(SETTLE_RETRY_S)

    # leases, deadlines, retention ----------------------------------------------------------
    async def _lease_loop(self) -> None:
        next_prune = next_count = 0.0
        while True:
            await asyncio.sleep(self.cfg.lease_s / 3)
            for step in (self.renew, self.reap):
                try:
                    await step()
                except DependencyUnavailable as exc:
                    log.warning("job leases: the database is down: %s", exc.message)
                    break
                except Exception:
                    log.exception("job lease upkeep failed; going on")
            try:
                now = time.monotonic()
                if now >= next_prune:
                    next_prune = now + PRUNE_EVERY_S
                    gone = await asyncio.to_thread(
                        self.store.prune, self.wall() - self.cfg.retention_s,
                        self.cfg.max_finished)
                    if gone:
                        log.info("pruned %d finished jobs", gone)
                if now >= next_count:
                    next_count = now + COUNT_EVERY_S
                    counts = await asyncio.to_thread(self.store.counts)
                    for state in STATES:
                        self.metrics.jobs.labels(state).set(counts.get(state, 0))
            except DependencyUnavailable:
                pass  # said above, or will be
            except Exception:
                log.exception("job housekeeping failed; going on")

    async def renew(self) -> None:
        """Renew the leases of this gateway's runs; stop the runs it no longer holds."""
        ids = list(self.running)
        if not ids:
            return
        held = await asyncio.to_thread(self.store.renew, self.holder, ids, self.wall(),
                                       self.cfg.lease_s)
        for job_id in ids:
            if job_id not in held and job_id in self.running:
                log.info("job no longer held here (cancelled, or its lease was taken): "
                         "stopping its run", extra={"job": job_id})
                self.stop_run(job_id)

    async def reap(self) -> None:
        """Running jobs whose lease ran out (their gateway died): a failed run each, then
        tried again or dead; and queued jobs past their deadline: expired."""
        now = self.wall()
        for row in await asyncio.to_thread(self.store.expired_leases, now, REAP_BATCH):
            if row["id"] in self.running:
                continue  # ours: its renewal failed; the next one fixes it
            decision = decide("lost", attempt=int(row["attempt"]), failures=int(row["failures"]),
                              deadline_at=float(row["deadline_at"]), now=now,
                              rand01=self.rand(), policy=self.retry)
            error = _error("lease_expired", f"the gateway running it ({row['claimed_by']}) "
                           "stopped renewing its lease", 502)
            if await asyncio.to_thread(self.store.settle, row["id"], row["attempt"], decision,
                                       now, error=error):
                log.warning("job lease expired: %s", decision.state, extra={
                    "job": row["id"], "attempt": row["attempt"], "holder": row["claimed_by"]})
                if decision.state in FINAL:
                    self.wake_webhooks()
                else:
                    self.wake()
        if await asyncio.to_thread(self.store.expire_overdue, now):
            self.wake_webhooks()


def build_runner(config: Config, gateway: Gateway, db: Database, gateway_id: str) -> JobRunner:
    cfg = config.jobs
    store = JobStore(db, max_queued=cfg.max_queued, max_queued_per_key=cfg.max_queued_per_key)
    return JobRunner(cfg, store, gateway.membership, gateway.dispatcher,
                     gateway.metrics.registry, f"{gateway_id}#{uuid.uuid4().hex[:8]}",
                     webhook_secret(config), drain_s=config.gateway.graceful_shutdown_s)
