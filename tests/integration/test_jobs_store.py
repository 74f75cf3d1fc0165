"""The job queue (store/jobs.py) on SQLite and PostgreSQL: bounds and idempotency keys at
submission; gateways claiming at once never claim one job twice (SKIP LOCKED); an outcome
stored once, fenced by the attempt; leases renewed, expired ones reaped; cancellation;
webhooks claimed once per hold; deadlines; retention; the dashboard's overview (counts by
deployment and state, the oldest queued, the newest failures); and the v5 → v6 migration."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from steadyserve.policies.jobs import Decision
from steadyserve.store import SCHEMA_VERSION, Database
from steadyserve.store.jobs import IdempotencyKeyReused, JobStore, QueueFull

pytestmark = pytest.mark.integration

T0 = 1_000_000.0


def store(db: Database, **bounds: int) -> JobStore:
    return JobStore(db, max_queued=bounds.get("max_queued", 10_000),
                    max_queued_per_key=bounds.get("max_queued_per_key", 10_000))


def job(i: int, **over: Any) -> dict[str, Any]:
    return {"id": f"job_{i:024x}", "deployment": "d", "handler": "h", "args": f'{{"n":{i}}}',
            "key_id": "k1", "idempotency_key": None, "request_hash": f"h{i}",
            "created_at": T0 + i * 0.001, "deadline_at": T0 + 3600, "webhook_url": None,
            **over}


def test_submit_bounds_and_idempotency_keys(db: Database) -> None:
    s = store(db, max_queued=4, max_queued_per_key=2)
    first, created = s.submit(job(1, idempotency_key="a"))
    assert created and first["state"] == "queued" and first["attempt"] == 0
    again, created = s.submit(job(2, idempotency_key="a", request_hash="h1"))  # a retry
    assert not created and again["id"] == first["id"]
    with pytest.raises(IdempotencyKeyReused, match="used for another request"):
        s.submit(job(3, idempotency_key="a"))  # another request under the same key
    assert s.submit(job(4, idempotency_key="a", key_id="k2", request_hash="h1"))[1]  # k2's own
    assert s.submit(job(5))[1]
    with pytest.raises(QueueFull, match="max_queued_per_key"):
        s.submit(job(6))  # k1 has 2 live jobs
    assert s.submit(job(7, key_id="k3"))[1]
    with pytest.raises(QueueFull, match=r"\(\[jobs\] max_queued\)"):
        s.submit(job(10, key_id="k4"))  # 4 live jobs in all
    assert not s.submit(job(8, idempotency_key="a", request_hash="h1"))[1]  # a replay: fine
    [claimed] = s.claim("d", 1, "gw#1", T0 + 1, 30)
    assert s.settle(claimed["id"], 1, Decision("succeeded", 0), T0 + 2, result=b"1")
    assert s.submit(job(9, key_id="k3"))[1]  # a finished job frees its place


def test_gateways_claiming_at_once_never_claim_a_job_twice(db: Database, tmp_path: Path,
                                                            request: pytest.FixtureRequest) -> None:
    s = store(db)
    for i in range(300):
        s.submit(job(i))
    # a second gateway: its own Database (its own connection pool) on the same database
    url = f"sqlite:///{tmp_path}/state.db" if db.dialect == "sqlite" \
        else request.getfixturevalue("pg_url")
    other = Database(url)
    try:
        stores = [s, store(other)]
        got: list[list[str]] = [[] for _ in range(6)]
        together = threading.Barrier(6)

        def claimer(n: int) -> None:
            mine = stores[n % 2]
            together.wait(30)
            while True:
                rows = mine.claim("d", 3, f"gw{n}#1", T0 + 1, 30)
                if not rows:
                    return
                got[n].extend(r["id"] for r in rows)

        threads = [threading.Thread(target=claimer, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        other.close()
    every = [j for g in got for j in g]
    assert len(every) == 300 and len(set(every)) == 300, (len(every), len(set(every)))
    if db.dialect == "postgresql":  # (SQLite's one writer may serve one claimer throughout)
        assert sum(1 for g in got if g) >= 2  # really claimed side by side
    assert s.counts() == {"running": 300}


def test_an_outcome_is_stored_once_fenced_by_the_attempt(db: Database) -> None:
    s = store(db)
    s.submit(job(1))
    assert s.claim("d", 5, "gw#1", T0 - 10, 30) == []  # not yet available
    [run1] = s.claim("d", 5, "gw#1", T0 + 1, 30)
    assert (run1["attempt"], run1["args"]) == (1, '{"n":1}')
    assert s.claim("d", 5, "gw#2", T0 + 1, 30) == []  # running: nobody else's
    # a failure: back to the queue after a backoff
    assert s.settle(run1["id"], 1, Decision("queued", 1, T0 + 5), T0 + 2,
                    error={"code": "handler_failed", "message": "x", "status": 500})
    assert not s.settle(run1["id"], 1, Decision("succeeded", 1), T0 + 2, result=b"1")
    assert s.claim("d", 5, "gw#2", T0 + 4, 30) == []
    [run2] = s.claim("d", 5, "gw#2", T0 + 5, 30)
    assert run2["attempt"] == 2 and run2["failures"] == 1
    # the first run's late answer is refused; the second's is stored, once
    assert not s.settle(run1["id"], 1, Decision("succeeded", 1), T0 + 6, result=b'"late"')
    assert s.settle(run2["id"], 2, Decision("succeeded", 1), T0 + 6, result=b'{"ok":1}')
    assert not s.settle(run2["id"], 2, Decision("succeeded", 1), T0 + 7, result=b'"twice"')
    final = s.get(run1["id"])
    assert final is not None
    assert (final["state"], final["result"], final["attempt"], final["error"]) == \
        ("succeeded", '{"ok":1}', 2, None)
    assert final["started_at"] == T0 + 1 and final["finished_at"] == T0 + 6
    assert final["claimed_by"] is None and final["webhook_state"] is None  # no URL: no webhook


def test_leases_are_renewed_by_their_holder_and_expired_ones_found(db: Database) -> None:
    s = store(db)
    for i in range(3):
        s.submit(job(i))
    a = s.claim("d", 2, "gw#1", T0 + 1, 10)
    [b] = s.claim("d", 2, "gw#2", T0 + 1, 10)
    assert s.renew("gw#1", [r["id"] for r in a] + [b["id"]], T0 + 8, 10) == {r["id"] for r in a}
    assert [r["id"] for r in s.expired_leases(T0 + 12)] == [b["id"]]  # gw#2 stopped renewing
    row = s.expired_leases(T0 + 12)[0]
    assert row["claimed_by"] == "gw#2" and row["attempt"] == 1
    assert s.settle(b["id"], 1, Decision("queued", 1, T0 + 12), T0 + 12,
                    error={"code": "lease_expired", "message": "m", "status": 502})
    assert s.expired_leases(T0 + 12) == []
    [again] = s.claim("d", 5, "gw#1", T0 + 12, 10)
    assert again["id"] == b["id"] and again["attempt"] == 2


def test_cancel_a_queued_and_a_running_job_but_not_a_finished_one(db: Database) -> None:
    s = store(db)
    s.submit(job(1, webhook_url="http://127.0.0.1/h"))
    s.submit(job(2))
    s.submit(job(3))
    after, done = s.cancel(job(1)["id"], T0 + 1)
    assert done and after is not None and after["state"] == "cancelled"
    assert after["webhook_state"] == "pending" and after["error"]["code"] == "cancelled"
    [running] = s.claim("d", 1, "gw#1", T0 + 1, 30)
    assert s.cancel(running["id"], T0 + 2)[1]
    assert s.renew("gw#1", [running["id"]], T0 + 3, 30) == set()  # its runner learns it
    assert not s.settle(running["id"], 1, Decision("succeeded", 0), T0 + 3, result=b"1")
    [third] = s.claim("d", 1, "gw#1", T0 + 3, 30)
    assert s.settle(third["id"], 1, Decision("succeeded", 0), T0 + 4, result=b"1")
    after, done = s.cancel(third["id"], T0 + 5)
    assert not done and after is not None and after["state"] == "succeeded"
    assert s.cancel("job_missing", T0) == (None, False)


def test_webhooks_are_held_per_try_and_recorded_once(db: Database) -> None:
    s = store(db)
    s.submit(job(1, webhook_url="http://127.0.0.1/h"))
    [run] = s.claim("d", 1, "gw#1", T0 + 1, 30)
    assert s.claim_webhooks(T0 + 1, 10, 5) == []  # not final yet
    assert s.settle(run["id"], 1, Decision("succeeded", 0), T0 + 2, result=b'{"v":1}')
    [hook] = s.claim_webhooks(T0 + 2, 10, 5)
    assert (hook["webhook_attempts"], hook["result"], hook["state"]) == (1, '{"v":1}', "succeeded")
    assert s.claim_webhooks(T0 + 3, 10, 5) == []  # held for this try
    assert s.webhook_done(run["id"], 1, "pending", T0 + 10, T0 + 3, "the receiver answered 503")
    assert s.claim_webhooks(T0 + 9, 10, 5) == []
    [hook2] = s.claim_webhooks(T0 + 10, 10, 5)
    assert hook2["webhook_attempts"] == 2
    assert not s.webhook_done(run["id"], 1, "delivered", None, T0 + 11, None)  # an old try
    assert s.webhook_done(run["id"], 2, "delivered", None, T0 + 11, None)
    final = s.get(run["id"])
    assert final is not None
    assert (final["webhook_state"], final["webhook_at"], final["webhook_next_at"]) == \
        ("delivered", T0 + 11, None)
    assert s.claim_webhooks(T0 + 100, 10, 5) == []


def test_overdue_jobs_expire_and_finished_ones_are_pruned(db: Database) -> None:
    s = store(db)
    s.submit(job(1, deadline_at=T0 + 10))
    s.submit(job(2, deadline_at=T0 + 10, webhook_url="http://127.0.0.1/h"))
    s.submit(job(3))
    assert s.expire_overdue(T0 + 5) == 0
    assert s.expire_overdue(T0 + 10) == 2
    assert s.get(job(2)["id"])["webhook_state"] == "pending"  # type: ignore[index]
    assert s.get(job(1)["id"])["error"]["code"] == "deadline_exceeded"  # type: ignore[index]
    for i in range(4, 10):
        s.submit(job(i))
    for r in s.claim("d", 20, "gw#1", T0 + 11, 30):
        s.settle(r["id"], 1, Decision("succeeded", 0), T0 + 11 + r["created_at"] - T0, result=b"1")
    assert s.counts() == {"expired": 2, "succeeded": 7}
    # retention: finished before T0 + 11 go, except one whose webhook is pending
    assert s.prune(before=T0 + 11, max_finished=100) == 1
    # the count bound: the oldest finished go first (a pending webhook's job stays, uncounted)
    assert s.prune(before=0, max_finished=3) == 4
    left = {r["id"] for r in s.recent(None, None, 100)}
    assert left == {job(i)["id"] for i in (2, 7, 8, 9)}
    assert [r["id"] for r in s.recent("k1", "succeeded", 1)] == [job(9)["id"]]
    assert s.recent("nobody", None, 10) == []


def test_the_dashboards_overview_counts_ages_and_failures(db: Database) -> None:
    s = store(db)
    assert s.overview(10) == {"counts": {}, "oldest_queued_at": {}, "failures": [],
                              "retrying": []}
    for i in range(1, 6):
        s.submit(job(i))
    s.submit(job(6, deployment="e"))
    first, second = s.claim("d", 2, "gw#1", T0 + 1, 30)
    assert s.settle(first["id"], 1, Decision("dead", 5), T0 + 2,
                    error={"code": "handler_failed", "message": "boom", "status": 500})
    assert s.settle(second["id"], 1, Decision("failed", 0), T0 + 3,
                    error={"code": "bad_input", "message": "no", "status": 400})
    s.cancel(job(3)["id"], T0 + 4)
    got = s.overview(1)
    assert got["counts"] == {"d": {"dead": 1, "failed": 1, "cancelled": 1, "queued": 2},
                             "e": {"queued": 1}}
    assert got["oldest_queued_at"] == {"d": job(4)["created_at"], "e": job(6)["created_at"]}
    [newest] = got["failures"]  # at most 1: the newest
    assert (newest["id"], newest["state"], newest["error"]["code"]) == \
        (second["id"], "failed", "bad_input")
    assert [f["state"] for f in s.overview(10)["failures"]] == ["failed", "dead"]
    assert got["retrying"] == []


def test_the_dashboards_overview_lists_jobs_waiting_to_be_tried_again(db: Database) -> None:
    s = store(db)
    for i in range(1, 5):
        s.submit(job(i))
    runs = s.claim("d", 3, "gw#1", T0 + 1, 30)
    # two fail and wait for their next try (the later one due sooner); one succeeds
    assert s.settle(runs[0]["id"], 1, Decision("queued", 1, T0 + 60), T0 + 2,
                    error={"code": "replica_timeout", "message": "slow", "status": 504})
    assert s.settle(runs[1]["id"], 1, Decision("queued", 2, T0 + 30), T0 + 3,
                    error={"code": "handler_failed", "message": "boom", "status": 500})
    assert s.settle(runs[2]["id"], 1, Decision("succeeded", 0), T0 + 4, result=b"1")
    got = s.overview(10)
    assert [(r["id"], r["failures"], r["available_at"], r["error"]["code"])
            for r in got["retrying"]] == [
        (runs[1]["id"], 2, T0 + 30, "handler_failed"),  # the soonest first
        (runs[0]["id"], 1, T0 + 60, "replica_timeout")]
    assert got["failures"] == []  # not final: no failure yet
    assert [r["id"] for r in s.overview(1)["retrying"]] == [runs[1]["id"]]  # bounded


def test_a_v5_database_gains_the_jobs_table(db: Database, tmp_path: Path,
                                             request: pytest.FixtureRequest) -> None:
    with db.connect("make it v5", write=True) as conn:
        conn.exec_driver_sql("DROP TABLE jobs")
        conn.exec_driver_sql("UPDATE schema_version SET version = 5")
    url = f"sqlite:///{tmp_path}/state.db" if db.dialect == "sqlite" \
        else request.getfixturevalue("pg_url")
    db.close()
    again = Database(url)
    try:
        assert again.schema_version() == SCHEMA_VERSION == 6
        s = store(again)
        assert s.submit(job(1))[1] and s.counts() == {"queued": 1}
    finally:
        again.close()
