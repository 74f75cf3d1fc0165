"""The dashboard's routes in process: the page with its CSP, only the listed assets, and
/v1/dashboard's data — replicas (actual against target, requests outstanding) with why they
last exited or are ejected, batch sizes of the batched handlers (read from the replicas at
most every 5 s), the rollout without env values, asynchronous jobs by state with the oldest
queued and the newest failures (read at most every 5 s) — refusing a bad `history` with a 400
that names it."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from steadyserve.config import JobsConfig
from steadyserve.dashboard import routes as dashboard_routes
from steadyserve.gateway.jobs import JobRunner
from steadyserve.policies.jobs import Decision
from steadyserve.store import Database
from steadyserve.store.jobs import JobStore

from .services import Echo


async def test_the_page_and_only_its_assets(make_gateway):
    _, client, _ = await make_gateway({"echo": (Echo, 1)})
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    js = await client.get("/dashboard/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    # no inline script and no inline event handler: the CSP would block them
    assert re.search(r"<script(?![^>]*\bsrc=)", page.text) is None
    assert re.search(r"\son[a-z]+\s*=", page.text) is None
    for hostile in ("/dashboard/secret.txt", "/dashboard/..%2Fdata.py", "/dashboard/%00"):
        r = await client.get(hostile)
        assert r.status_code == 404, (hostile, r.text)
        assert r.json()["error"]["code"] == "not_found"


async def test_the_data_and_its_history_bound(make_gateway):
    _, client, _ = await make_gateway({"echo": (Echo, 1)})
    assert (await client.post("/v1/deployments/echo/echo", json={"text": "a"})).status_code == 200
    data = (await client.get("/v1/dashboard?history=60")).json()
    [echo] = data["deployments"]
    assert echo["name"] == "echo" and echo["ready"] == 1
    assert echo["metrics"]["requests"]["2xx"] == 1
    assert data["cluster"] == {"enabled": False, "leading": True}
    assert isinstance(data["cache"]["levels"], dict)  # hit ratio per level (l1, l2)


@pytest.mark.parametrize("query", ["history=", "history=abc", "history=0", "history=4321",
                                   "history=99999999999", "history=%C2%B2", "history=-5"])
async def test_a_bad_history_is_a_400_naming_it(make_gateway, query):
    _, client, _ = await make_gateway({"echo": (Echo, 1)})
    r = await client.get(f"/v1/dashboard?{query}")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "history"


async def test_batch_sizes_of_the_batched_handlers_read_at_most_every_5s(make_gateway,
                                                                        monkeypatch):
    gateway, client, _ = await make_gateway({"echo": (Echo, 2)})
    now = [1000.0]
    monkeypatch.setattr(dashboard_routes, "clock", lambda: now[0])
    fetches = []
    real = gateway.replica_metrics

    async def counted() -> bytes:
        fetches.append(now[0])
        return await real()

    monkeypatch.setattr(gateway, "replica_metrics", counted)
    for texts in (["a", "b"], ["c"], ["d", "e", "f"]):
        r = await client.post("/v1/deployments/echo/upper", json={"texts": texts})
        assert r.status_code == 200, r.text
    [echo] = (await client.get("/v1/dashboard")).json()["deployments"]
    assert sorted(echo["batches"]) == ["short", "upper"]  # batch=True handlers only
    upper = echo["batches"]["upper"]
    assert upper["max_batch_size"] == 8
    assert 1 <= upper["batches"] <= 3 and upper["items"] == 6
    assert upper["mean"] == round(6 / upper["batches"], 2)
    assert upper["buckets"]["8"] == upper["buckets"]["+Inf"] == upper["batches"]
    assert list(upper["buckets"])[:3] == ["1", "2", "4"]
    assert echo["batches"]["short"]["batches"] == 0 and echo["batches"]["short"]["mean"] is None

    await client.post("/v1/deployments/echo/upper", json={"texts": ["g"]})
    now[0] += 4.9  # within 5 s: the last read, no fetch
    [again] = (await client.get("/v1/dashboard")).json()["deployments"]
    assert again["batches"]["upper"]["items"] == 6 and len(fetches) == 1
    now[0] += 0.1
    [later] = (await client.get("/v1/dashboard")).json()["deployments"]
    assert later["batches"]["upper"]["items"] == 7 and len(fetches) == 2


class FakeControl:
    """A control plane as the supervisor answers (its status and rollout status)."""

    def status(self, deployment: str) -> list[dict[str, Any]]:
        return [
            {"id": f"{deployment}-0", "revision": 2, "state": "ready", "retiring": False,
             "pid": 11, "address": "127.0.0.1:1", "restarts": 1, "last_exit_code": -9,
             "last_exit_reason": "killed by SIGKILL", "last_exit_at": 1.7e9, "ready_for_s": 3.0,
             "ejected": True, "ejection_reason": "5 consecutive failures"},
            {"id": f"{deployment}-1", "revision": 2, "state": "starting", "retiring": False,
             "pid": 12, "address": "127.0.0.1:2", "restarts": 0, "last_exit_code": None,
             "last_exit_reason": None, "last_exit_at": None, "ready_for_s": 0.0,
             "ejected": False, "ejection_reason": None},
        ]

    def rollout_status(self, deployment: str) -> dict[str, Any]:
        return {
            "deployment": deployment, "revision": 2, "state": "rolling", "reason": None,
            "target": {"revision": 2, "service": "tests:Echo", "replicas": 2,
                       "env": {"TOKEN": "s3cret-value", "TAG": "v2"}, "balancer": "p2c"},
            "good_revision": 1, "previous_revision": 0, "max_replicas": 8, "autoscale": None,
            "progress": {"desired": 2, "updated": 1, "ready": 0, "old": 2, "draining": 0,
                         "converged": False},
            "started_at": 1.7e9, "finished_at": None, "replicas": self.status(deployment),
        }


async def test_replicas_say_why_they_exited_or_are_ejected_and_the_rollout_shows(make_gateway):
    gateway, client, _ = await make_gateway({"echo": (Echo, 1)})
    [plain] = (await client.get("/v1/dashboard")).json()["deployments"]
    assert plain["rollout"] is None  # no control plane: nothing rolls out

    gateway.control = FakeControl()  # type: ignore[assignment]
    # requests outstanding: this process's own, and what the data-plane workers reported
    gateway.membership.deployments["echo"].endpoints[0].outstanding = 2
    gateway.worker_outstanding = lambda: {("echo", "echo-0"): 3, ("other", "echo-0"): 9}
    r = await client.get("/v1/dashboard")
    [echo] = r.json()["deployments"]
    assert echo["replica_counts"] == {"target": 1, "actual": 2, "ready": 1, "starting": 1,
                                      "unhealthy": 0, "draining": 0}
    killed, starting = echo["replicas"]
    assert (killed["outstanding"], starting["outstanding"]) == (5, 0)
    assert (killed["last_exit_reason"], killed["last_exit_at"], killed["ejection_reason"]) == \
        ("killed by SIGKILL", 1.7e9, "5 consecutive failures")
    assert killed["restarts"] == 1 and killed["ejected"] is True
    assert (starting["last_exit_reason"], starting["ejection_reason"]) == (None, None)
    assert echo["rollout"] == {
        "state": "rolling", "reason": None, "revision": 2, "target": 2, "service": "tests:Echo",
        "replicas": 2, "env": ["TAG", "TOKEN"], "good_revision": 1,
        "progress": {"desired": 2, "updated": 1, "ready": 0, "old": 2, "draining": 0,
                     "converged": False},
        "started_at": 1.7e9, "finished_at": None}
    assert "s3cret-value" not in r.text  # read access never sees env values


async def test_jobs_by_deployment_and_state_with_the_oldest_queued_and_failures(
        make_gateway, monkeypatch, tmp_path):
    gateway, client, _ = await make_gateway({"echo": (Echo, 1)})
    assert "jobs" not in (await client.get("/v1/dashboard")).json()  # no queue here
    now = [1000.0]
    monkeypatch.setattr(dashboard_routes, "clock", lambda: now[0])
    cfg = JobsConfig()
    db = Database(f"sqlite:///{tmp_path}/jobs.db")
    store = JobStore(db, max_queued=cfg.max_queued, max_queued_per_key=cfg.max_queued_per_key)
    runner = JobRunner(cfg, store, gateway.membership, gateway.dispatcher, CollectorRegistry(),
                       "test#1", b"secret-for-the-test-0123456789ab")
    gateway.jobs = runner  # not running: what the test stores stays as it is
    try:
        ids = []
        for i in range(3):
            r = await client.post("/v1/jobs/echo/echo", json={"text": f"j{i}"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        claimed = store.claim("echo", 2, "test#1", time.time(), 30.0)
        assert [j["id"] for j in claimed] == ids[:2]
        assert store.settle(ids[0], 1, Decision("dead", 5), time.time(), error={
            "code": "handler_failed", "message": "ValueError: boom " + "x" * 500,
            "status": 500})
        due = time.time() + 90
        assert store.settle(ids[1], 1, Decision("queued", 1, due), time.time(), error={
            "code": "replica_timeout", "message": "no answer in 30 s", "status": 504})
        data = (await client.get("/v1/dashboard")).json()
        jobs = data["jobs"]
        assert jobs["states"] == ["queued", "running", "succeeded", "failed", "dead",
                                  "cancelled", "expired"]
        [echo] = jobs["deployments"]
        assert echo["deployment"] == "echo"
        assert echo["counts"] == {"queued": 2, "running": 0, "succeeded": 0, "failed": 0,
                                  "dead": 1, "cancelled": 0, "expired": 0}
        retried = (await client.get(f"/v1/jobs/{ids[1]}")).json()
        assert echo["oldest_queued_at"] == retried["created_at"] <= data["t"]
        [dead] = jobs["failures"]
        assert (dead["id"], dead["state"], dead["handler"], dead["attempt"]) == \
            (ids[0], "dead", "echo", 1)
        assert dead["error"]["code"] == "handler_failed"
        assert dead["error"]["message"].startswith("ValueError: boom")
        assert len(dead["error"]["message"]) == 300  # cut
        [waiting] = jobs["retrying"]  # queued again after a failure, with its last error
        assert (waiting["id"], waiting["failures"], waiting["available_at"]) == (ids[1], 1, due)
        assert waiting["error"] == {"code": "replica_timeout", "message": "no answer in 30 s"}

        # read at most every 5 s: a cancelled job shows at the next read
        assert (await client.delete(f"/v1/jobs/{ids[2]}")).status_code == 200
        now[0] += 4.9
        again = (await client.get("/v1/dashboard")).json()["jobs"]["deployments"][0]
        assert again["counts"]["queued"] == 2 and again["counts"]["cancelled"] == 0
        now[0] += 0.1
        later = (await client.get("/v1/dashboard")).json()["jobs"]["deployments"][0]
        assert later["counts"]["queued"] == 1 and later["counts"]["cancelled"] == 1
    finally:
        await runner.webhooks.http.aclose()
        db.close()
