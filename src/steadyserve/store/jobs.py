"""Asynchronous jobs (the `jobs` table of `store.database`): the durable queue.

Every change is one conditional statement, so the table itself decides races:

    submit     count the live jobs (bounds), INSERT (an idempotency key already used by the
               same API key returns that job instead; a different request under it is a 409)
    claim      SELECT … FOR UPDATE SKIP LOCKED LIMIT n, then UPDATE those ids WHERE still
               queued RETURNING them: queued → running, attempt + 1, a lease for this
               gateway. On PostgreSQL gateways sharing the database never claim the same
               job nor wait for each other's locks; on SQLite (one writer) the UPDATE's own
               check decides. (One UPDATE … WHERE id IN (SELECT … LIMIT n FOR UPDATE SKIP
               LOCKED) claimed 5 of 3 on PostgreSQL 15: the planner may rescan the subquery.)
    renew      leases of the jobs this gateway still runs (a job cancelled meanwhile is not
               renewed: the runner learns it so)
    settle     the run's outcome, only WHERE id, attempt and state = running still hold: a
               run whose lease ran out (or that was cancelled) stores nothing, so a result
               is stored once. A final state marks the webhook pending in the same statement
    reap       running jobs whose lease ran out (their gateway died): settled like a failed
               run, fenced on the attempt the reaper saw
    webhooks   claimed like jobs, with `webhook_next_at` as the lease of one delivery try

Thread-safe (the Database is); the gateway calls it from worker threads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from sqlalchemy import case, delete, func, select, update

from ..errors import Conflict, Overloaded
from ..policies.jobs import FINAL, LIVE, Decision
from .database import MAX_ROWS, Database, jobs

SUMMARY = ("id", "deployment", "handler", "state", "attempt", "failures", "created_at",
           "started_at", "finished_at", "deadline_at", "webhook_state")
PRUNE_ROWS = 5_000  # rows per DELETE


class QueueFull(Overloaded):
    """As many jobs are queued or running as `[jobs] max_queued` (or the key's share) allows."""

    code = "queue_full"


class IdempotencyKeyReused(Conflict):
    """The idempotency key named another request (deployment, handler or parameters)."""

    code = "idempotency_key_reused"


def _row(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    if out.get("error") is not None:
        out["error"] = orjson.loads(out["error"])
    return out


class JobStore:
    def __init__(self, db: Database, *, max_queued: int, max_queued_per_key: int) -> None:
        self.db = db
        self.max_queued = max_queued
        self.max_queued_per_key = max_queued_per_key

    # -- the API's side -----------------------------------------------------------------------
    def submit(self, job: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Store a new job (id, deployment, handler, args as JSON text, key_id,
        idempotency_key, request_hash, created_at, deadline_at, webhook_url): (the job, True),
        or (the job stored earlier under the same key and idempotency key, False). QueueFull
        (503) over the bounds; on PostgreSQL concurrent submissions may pass a count together,
        so a bound is exceeded by at most the number submitting at that instant."""
        c = jobs.c
        row = {**job, "state": "queued", "attempt": 0, "failures": 0,
               "available_at": job["created_at"], "webhook_attempts": 0}
        with self.db.connect("submit a job", write=True) as conn:
            if job.get("idempotency_key") is not None:
                earlier = self._by_idempotency(conn, job)
                if earlier is not None:
                    return earlier, False
            live = conn.execute(select(func.count()).select_from(jobs)
                                .where(c.state.in_(LIVE))).scalar_one()
            if live >= self.max_queued:
                raise QueueFull(f"{live} jobs are queued or running, the most allowed ([jobs] "
                                "max_queued): try again later", retry_after_s=5)
            mine = conn.execute(select(func.count()).select_from(jobs).where(
                c.key_id == job["key_id"], c.state.in_(LIVE))).scalar_one()
            if mine >= self.max_queued_per_key:
                raise QueueFull(f"this API key has {mine} jobs queued or running, the most "
                                "allowed ([jobs] max_queued_per_key): try again later",
                                retry_after_s=5)
            if conn.execute(self.db.insert_ignore(jobs, row)).rowcount == 0:
                earlier = self._by_idempotency(conn, job)  # a concurrent twin stored first
                if earlier is None:
                    raise Conflict(f"job id {job['id']!r} exists already")
                return earlier, False
        return _row(row), True

    @staticmethod
    def _by_idempotency(conn: Any, job: Mapping[str, Any]) -> dict[str, Any] | None:
        c = jobs.c
        found = conn.execute(select(jobs).where(
            c.key_id == job["key_id"], c.idempotency_key == job["idempotency_key"])
        ).mappings().first()
        if found is None:
            return None
        if found["request_hash"] != job["request_hash"]:
            raise IdempotencyKeyReused(
                f"idempotency key {job['idempotency_key']!r} was used for another request "
                f"(job {found['id']}); use a new key for a new request",
                param="idempotency-key")
        return _row(found)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self.db.connect("read a job") as conn:
            found = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        return None if found is None else _row(found)

    def recent(self, key_id: str | None, state: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first, without parameters or results; `key_id` None: every key's."""
        c = jobs.c
        query = select(*(c[name] for name in SUMMARY)).order_by(c.created_at.desc(), c.id) \
            .limit(max(1, min(limit, MAX_ROWS)))
        if key_id is not None:
            query = query.where(c.key_id == key_id)
        if state is not None:
            query = query.where(c.state == state)
        with self.db.connect("list jobs") as conn:
            return [dict(r) for r in conn.execute(query).mappings().all()]

    def cancel(self, job_id: str, now: float) -> tuple[dict[str, Any] | None, bool]:
        """(the job after, whether this call cancelled it); a final job is left as it was."""
        c = jobs.c
        with self.db.connect("cancel a job", write=True) as conn:
            done = conn.execute(update(jobs).where(c.id == job_id, c.state.in_(LIVE)).values(
                state="cancelled", finished_at=now, lease_until=None,
                error=orjson.dumps({"code": "cancelled", "message": "cancelled by the client",
                                    "status": 499}).decode(),
                **_webhook_due(now))).rowcount
            found = conn.execute(select(jobs).where(c.id == job_id)).mappings().first()
        return (None if found is None else _row(found)), bool(done)

    def counts(self) -> dict[str, int]:
        with self.db.connect("count jobs") as conn:
            rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
        return {str(s): int(n) for s, n in rows}

    def overview(self, failures: int) -> dict[str, Any]:
        """What the dashboard shows: jobs by deployment and state, when each deployment's
        oldest queued job was submitted, the newest `failures` jobs that ended failed, dead
        or expired, with their error, and up to `failures` queued jobs waiting to be tried
        again after a failure, the soonest first, with their last error. Four reads, each
        answer bounded; the counts and the retries search the claim index, the retries
        through every queued job ([jobs] max_queued at most: 3 ms of the overview's 10 ms
        at 10,000 queued on SQLite)."""
        c = jobs.c
        failed = ("failed", "dead", "expired")
        with self.db.connect("jobs overview") as conn:
            counts = conn.execute(select(c.deployment, c.state, func.count())
                                  .group_by(c.deployment, c.state)).all()
            oldest = conn.execute(select(c.deployment, func.min(c.created_at))
                                  .where(c.state == "queued").group_by(c.deployment)).all()
            recent = conn.execute(
                select(c.id, c.deployment, c.handler, c.state, c.attempt, c.failures,
                       c.finished_at, c.error)
                .where(c.state.in_(failed)).order_by(c.finished_at.desc(), c.id)
                .limit(max(1, min(failures, MAX_ROWS)))).mappings().all()
            retrying = conn.execute(
                select(c.id, c.deployment, c.handler, c.state, c.attempt, c.failures,
                       c.available_at, c.error)
                .where(c.state == "queued", c.failures > 0)
                .order_by(c.available_at, c.id)
                .limit(max(1, min(failures, MAX_ROWS)))).mappings().all()
        by: dict[str, dict[str, int]] = {}
        for deployment, state, n in counts:
            by.setdefault(str(deployment), {})[str(state)] = int(n)
        return {"counts": by,
                "oldest_queued_at": {str(d): float(t) for d, t in oldest if t is not None},
                "failures": [_row(r) for r in recent],
                "retrying": [_row(r) for r in retrying]}

    # -- the runner's side --------------------------------------------------------------------
    def claim(self, deployment: str, n: int, holder: str, now: float,
              lease_s: float) -> list[dict[str, Any]]:
        """Up to `n` queued jobs of `deployment` that are due, oldest first, now running
        under `holder`'s lease."""
        if n <= 0:
            return []
        c = jobs.c
        due = (select(c.id).where(c.state == "queued", c.deployment == deployment,
                                  c.available_at <= now)
               .order_by(c.available_at, c.created_at).limit(n)
               .with_for_update(skip_locked=True))
        with self.db.connect("claim jobs", write=True) as conn:
            ids = [r[0] for r in conn.execute(due).all()]
            if not ids:
                return []
            rows = conn.execute(
                update(jobs).where(c.id.in_(ids), c.state == "queued")
                .values(state="running", attempt=c.attempt + 1, claimed_by=holder,
                        lease_until=now + lease_s, started_at=func.coalesce(c.started_at, now))
                .returning(c.id, c.deployment, c.handler, c.args, c.attempt, c.failures,
                           c.deadline_at, c.created_at, c.key_id)).mappings().all()
        return sorted((dict(r) for r in rows), key=lambda r: r["created_at"])

    def renew(self, holder: str, ids: Iterable[str], now: float, lease_s: float) -> set[str]:
        """Extend the leases of `ids` still running under `holder`; returns those."""
        ids = list(ids)
        held: set[str] = set()
        c = jobs.c
        with self.db.connect("renew job leases", write=True) as conn:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                rows = conn.execute(update(jobs).where(
                    c.id.in_(chunk), c.claimed_by == holder, c.state == "running")
                    .values(lease_until=now + lease_s).returning(c.id)).all()
                held.update(str(r[0]) for r in rows)
        return held

    def settle(self, job_id: str, attempt: int, decision: Decision, now: float, *,
               result: bytes | None = None, error: Mapping[str, Any] | None = None) -> bool:
        """Store what run `attempt` came to, if the job is still running that attempt
        (else False: the run was cancelled, or its lease ran out and another took it)."""
        c = jobs.c
        values: dict[str, Any] = {
            "state": decision.state, "failures": decision.failures, "claimed_by": None,
            "lease_until": None,
            "error": None if error is None else orjson.dumps(dict(error)).decode()}
        if decision.state in FINAL:
            values.update(finished_at=now, **_webhook_due(now))
            if result is not None:
                values["result"] = result.decode()
        else:
            values["available_at"] = decision.available_at if decision.available_at is not None \
                else now
        stmt = update(jobs).where(c.id == job_id, c.attempt == attempt,
                                  c.state == "running").values(**values)
        with self.db.connect("settle a job", write=True) as conn:
            return bool(conn.execute(stmt).rowcount == 1)

    def expired_leases(self, now: float, limit: int = 100) -> list[dict[str, Any]]:
        """Running jobs whose lease ran out: their gateway died or lost the database."""
        c = jobs.c
        with self.db.connect("find expired job leases") as conn:
            rows = conn.execute(
                select(c.id, c.attempt, c.failures, c.deadline_at, c.claimed_by)
                .where(c.state == "running", c.lease_until < now)
                .order_by(c.lease_until).limit(limit)).mappings().all()
        return [dict(r) for r in rows]

    def expire_overdue(self, now: float, limit: int = 1000) -> int:
        """Queued jobs past their deadline become expired."""
        c = jobs.c
        overdue = select(c.id).where(c.state == "queued", c.deadline_at <= now).limit(limit) \
            .with_for_update(skip_locked=True)
        error = orjson.dumps({"code": "deadline_exceeded", "message": "the job's deadline "
                              "passed before it could run", "status": 504}).decode()
        with self.db.connect("expire overdue jobs", write=True) as conn:
            ids = [r[0] for r in conn.execute(overdue).all()]
            if not ids:
                return 0
            return int(conn.execute(
                update(jobs).where(c.id.in_(ids), c.state == "queued")
                .values(state="expired", finished_at=now, error=error, **_webhook_due(now))
            ).rowcount)

    def prune(self, before: float, max_finished: int) -> int:
        """Delete finished jobs older than `before`, then the oldest while over
        `max_finished`; a webhook still pending keeps its job."""
        c = jobs.c
        gone = 0
        done = c.state.in_(FINAL) & ((c.webhook_state.is_(None)) | (c.webhook_state != "pending"))
        with self.db.connect("prune jobs", write=True) as conn:
            while True:
                old = select(c.id).where(done, c.finished_at < before).limit(PRUNE_ROWS)
                n = conn.execute(delete(jobs).where(c.id.in_(old.scalar_subquery()))).rowcount
                gone += n
                if n < PRUNE_ROWS:
                    break
            over = conn.execute(select(func.count()).select_from(jobs).where(done)).scalar_one() \
                - max_finished
            while over > 0:
                oldest = select(c.id).where(done).order_by(c.finished_at) \
                    .limit(min(over, PRUNE_ROWS))
                n = conn.execute(delete(jobs).where(c.id.in_(oldest.scalar_subquery()))).rowcount
                if n <= 0:
                    break
                gone += n
                over -= n
        return int(gone)

    # -- webhooks -----------------------------------------------------------------------------
    def claim_webhooks(self, now: float, n: int, hold_s: float) -> list[dict[str, Any]]:
        """Up to `n` due webhooks, each held for one try (`hold_s`: another gateway, or this
        one after a restart, tries again after it) with its attempt counted."""
        c = jobs.c
        due = (select(c.id).where(c.webhook_state == "pending", c.webhook_next_at <= now)
               .order_by(c.webhook_next_at).limit(n).with_for_update(skip_locked=True))
        with self.db.connect("claim webhooks", write=True) as conn:
            ids = [r[0] for r in conn.execute(due).all()]
            if not ids:
                return []
            rows = conn.execute(
                update(jobs).where(c.id.in_(ids), c.webhook_state == "pending",
                                   c.webhook_next_at <= now)
                .values(webhook_next_at=now + hold_s, webhook_attempts=c.webhook_attempts + 1)
                .returning(c.id, c.deployment, c.handler, c.state, c.result, c.error,
                           c.attempt, c.failures, c.created_at, c.started_at, c.finished_at,
                           c.webhook_url, c.webhook_attempts)).mappings().all()
        return [_row(r) for r in rows]

    def webhook_done(self, job_id: str, attempts: int, state: str, next_at: float | None,
                     now: float, error: str | None) -> bool:
        """Record try number `attempts`: delivered, failed for good, or pending again."""
        c = jobs.c
        values: dict[str, Any] = {"webhook_state": state, "webhook_error": error}
        if state == "pending":
            values["webhook_next_at"] = next_at
        else:
            values.update(webhook_at=now, webhook_next_at=None)
        stmt = update(jobs).where(c.id == job_id, c.webhook_attempts == attempts,
                                  c.webhook_state == "pending").values(**values)
        with self.db.connect("record a webhook", write=True) as conn:
            return bool(conn.execute(stmt).rowcount == 1)


def _webhook_due(now: float) -> dict[str, Any]:
    """The columns that make a finished job's webhook due now (when it has a URL)."""
    has_url = jobs.c.webhook_url.is_not(None)
    return {"webhook_state": case((has_url, "pending"), else_=None),
            "webhook_next_at": case((has_url, now), else_=None)}
