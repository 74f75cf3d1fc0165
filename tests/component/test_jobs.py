"""Asynchronous jobs in process: in-process replicas, a real SQLite queue, the runner's loops
on fast settings, and webhooks to an in-process receiver. Submission answers 202 once
stored; the job runs through the dispatcher at batch priority and only on spare capacity;
failures retry then dead-letter; cancellation stops a run; a job is its key's; webhooks are
signed, retried and delivered once; a dead gateway's job is retried; shutdown puts running
jobs back; bad input is a 4xx naming what was wrong."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

import steadyserve
from steadyserve.auth.keyring import KeyRing
from steadyserve.auth.keys import ApiKey
from steadyserve.auth.tokens import digest, key_id_of, new_token
from steadyserve.client import verify_webhook
from steadyserve.config import JobsConfig
from steadyserve.gateway.app import Gateway
from steadyserve.gateway.http import Response
from steadyserve.gateway.jobs import JobRunner
from steadyserve.observe.logs import REQUEST_ID
from steadyserve.store import Database
from steadyserve.store.jobs import JobStore

from .conftest import admin_headers

pytestmark = pytest.mark.asyncio

SECRET = b"component-test-secret-0123456789"
JSON = {"content-type": "application/json"}
FAST = dict(lease_s=1.5, poll_s=0.05, retry_base_s=0.05, retry_cap_s=0.2,
            webhook_retry_base_s=0.05, webhook_retry_cap_s=0.1, webhook_timeout_s=2.0)


class Worker(steadyserve.Service):
    """Counts what runs across its in-process replicas (class attributes: one process)."""

    active = 0
    peak = 0
    request_ids: list[str | None] = []  # noqa: RUF012 - shared on purpose

    @steadyserve.handler
    async def work(self, n: int, ms: float = 5.0) -> dict[str, Any]:
        Worker.active += 1
        Worker.peak = max(Worker.peak, Worker.active)
        try:
            await asyncio.sleep(ms / 1000)
        finally:
            Worker.active -= 1
        Worker.request_ids.append(REQUEST_ID.get())
        return {"n": n, "square": n * n}

    @steadyserve.handler
    def boom(self, n: int) -> None:
        raise ValueError(f"boom {n}")

    @steadyserve.handler
    def refuse(self, n: int) -> None:
        raise steadyserve.ClientError("n is not accepted", param="n")

    @steadyserve.handler
    def big(self, size: int) -> str:
        return "x" * size


class Relay(steadyserve.Service):
    """A pipeline: one child call to `svc`."""

    @steadyserve.handler
    async def relay(self, n: int) -> dict[str, Any]:
        return await self.deployment("svc").work.acall(n=n)  # type: ignore[no-any-return]


Factory = Callable[..., Awaitable[tuple[Gateway, httpx.AsyncClient, JobRunner]]]
Receiver = Callable[[httpx.Request], Awaitable[httpx.Response]]


@pytest.fixture
async def jobs_gateway(make_gateway: Any, tmp_path: Path) -> AsyncIterator[Factory]:
    made: list[tuple[JobRunner, asyncio.Task[None], Database]] = []
    Worker.active = Worker.peak = 0
    Worker.request_ids = []

    async def factory(*, keys: KeyRing | None = None, receiver: Receiver | None = None,
                      start: bool = True, relay: bool = False, **overrides: Any,
                      ) -> tuple[Gateway, httpx.AsyncClient, JobRunner]:
        services: dict[str, Any] = {"svc": (Worker, 2)}
        if relay:
            services["relay"] = (Relay, 1)
        gw, client, _ = await make_gateway(services, keys=keys, calls={"relay": ("svc",)})
        cfg = JobsConfig(**{**FAST, **overrides})
        db = Database(f"sqlite:///{tmp_path}/jobs-{len(made)}.db")
        http = httpx.AsyncClient(transport=httpx.MockTransport(receiver)) if receiver else None
        runner = JobRunner(cfg, JobStore(db, max_queued=cfg.max_queued,
                                         max_queued_per_key=cfg.max_queued_per_key),
                           gw.membership, gw.dispatcher, gw.metrics.registry, "test#1", SECRET,
                           drain_s=0.5, http=http)
        gw.jobs = runner
        task = asyncio.get_running_loop().create_task(runner.run()) if start else \
            asyncio.get_running_loop().create_task(asyncio.sleep(0))
        made.append((runner, task, db))
        return gw, client, runner

    yield factory
    for runner, task, db in made:
        if not runner.stopping:
            await runner.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        db.close()


async def until(check: Callable[[], Awaitable[Any]], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def final(client: httpx.AsyncClient, job_id: str, headers: dict[str, str] | None = None,
                timeout_s: float = 10.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        r = await client.get(f"/v1/jobs/{job_id}", headers=headers or {})
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body if body["state"] in ("succeeded", "failed", "dead", "cancelled",
                                         "expired") else None

    return await until(check, timeout_s)  # type: ignore[no-any-return]


async def submit(client: httpx.AsyncClient, handler: str, body: dict[str, Any],
                 **headers: str) -> httpx.Response:
    return await client.post(f"/v1/jobs/svc/{handler}", json=body,
                             headers={k.replace("_", "-"): v for k, v in headers.items()})


async def test_a_job_is_stored_then_run_at_batch_priority_and_read_back(jobs_gateway, monkeypatch):
    gw, client, _ = await jobs_gateway()
    calls: list[dict[str, Any]] = []
    invoke = gw.dispatcher.invoke

    async def spy(*args: Any, **kw: Any) -> Any:
        calls.append(kw)
        return await invoke(*args, **kw)

    monkeypatch.setattr(gw.dispatcher, "invoke", spy)
    r = await submit(client, "work", {"n": 7})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and job["created"] is True
    assert r.headers["location"] == job["url"] == f"/v1/jobs/{job['id']}"
    done = await final(client, job["id"])
    assert done["state"] == "succeeded" and done["result"] == {"n": 7, "square": 49}
    assert done["attempt"] == 1 and done["failures"] == 0 and done["error"] is None
    timings = done["timings"]
    assert timings["total_s"] >= timings["running_s"] >= 0 and timings["queued_s"] >= 0
    assert [c["priority"] for c in calls] == ["batch"]
    assert calls[0]["request_id"] == f"job-{job['id']}-1"
    assert Worker.request_ids == [f"job-{job['id']}-1"]
    # the inference metrics and request records are the synchronous route's, not the jobs'
    metrics = (await client.get("/metrics")).text
    assert 'steadyserve_jobs_finished_total{deployment="svc",state="succeeded"} 1.0' in metrics
    assert 'steadyserve_job_runs_total{deployment="svc",outcome="ok"} 1.0' in metrics


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "param"), [
    ("POST", "/v1/jobs/nope/work", {"n": 1}, {}, 404, "model"),
    ("POST", "/v1/jobs/svc/nope", {"n": 1}, {}, 404, None),
    ("POST", "/v1/jobs/svc/work", {"n": "x"}, {}, 400, "n"),
    ("POST", "/v1/jobs/svc/work", {"n": 1, "extra": 2}, {}, 400, "extra"),
    ("POST", "/v1/jobs/svc/work", [1], {}, 400, None),
    ("POST", "/v1/jobs/svc/work", {"n": 1, "ms": "x" * 300}, {}, 413, None),
    ("POST", "/v1/jobs/svc/work", {"n": 1}, {"idempotency-key": "a b"}, 400, "idempotency-key"),
    ("POST", "/v1/jobs/svc/work", {"n": 1}, {"idempotency-key": "k" * 129}, 400,
     "idempotency-key"),
    ("POST", "/v1/jobs/svc/work", {"n": 1}, {"x-webhook-url": "http://10.0.0.1/h"}, 400,
     "x-webhook-url"),
    ("POST", "/v1/jobs/svc/work", {"n": 1}, {"x-webhook-url": "gopher://127.0.0.1/"}, 400,
     "x-webhook-url"),
    ("POST", "/v1/jobs/svc/work", {"n": 1}, {"x-job-timeout-s": "0"}, 400, "x-job-timeout-s"),
    ("POST", "/v1/jobs/svc/work", {"n": 1}, {"x-job-timeout-s": "inf"}, 400, "x-job-timeout-s"),
    ("POST", "/v1/jobs/svc/work", {"n": 1}, {"x-job-timeout-s": "1e9"}, 400, "x-job-timeout-s"),
    ("GET", "/v1/jobs/not-a-job", None, {}, 400, "job"),
    ("GET", "/v1/jobs/job_0123456789abcdef01234567", None, {}, 404, "job"),
    ("DELETE", "/v1/jobs/job_0123456789abcdef01234567", None, {}, 404, "job"),
    ("GET", "/v1/jobs?state=lost", None, {}, 400, "state"),
    ("GET", "/v1/jobs?limit=0", None, {}, 400, "limit"),
    ("GET", "/v1/jobs?limit=1001", None, {}, 400, "limit"),
])
async def test_bad_requests_are_4xx_naming_what_was_wrong(jobs_gateway, method, path, body,
                                                          headers, status, param):
    _, client, _ = await jobs_gateway(max_input_bytes=256)
    r = await client.request(method, path, content=None if body is None else orjson.dumps(body),
                             headers={**(JSON if body is not None else {}), **headers})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err


async def test_a_body_that_is_not_json_or_not_declared_json_is_refused(jobs_gateway):
    _, client, _ = await jobs_gateway()
    r = await client.post("/v1/jobs/svc/work", content=b"{nope", headers=JSON)
    assert r.status_code == 400 and "invalid JSON" in r.json()["error"]["message"]
    r = await client.post("/v1/jobs/svc/work", content=b'{"n": 1}',
                          headers={"content-type": "text/plain"})
    assert r.status_code == 415


async def test_an_idempotency_key_returns_the_same_job_and_refuses_another_request(jobs_gateway):
    _, client, _ = await jobs_gateway()
    first = await submit(client, "work", {"n": 1}, idempotency_key="order-42")
    again = await submit(client, "work", {"n": 1}, idempotency_key="order-42")
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"] and again.json()["created"] is False
    other = await submit(client, "work", {"n": 2}, idempotency_key="order-42")
    assert other.status_code == 409 and other.json()["error"]["param"] == "idempotency-key"
    assert (await submit(client, "work", {"n": 1})).json()["id"] != first.json()["id"]


def make_key(ring: KeyRing, *scopes: str) -> str:
    _, token = new_token()
    key_id = key_id_of(token)
    assert key_id is not None
    ring.put(ApiKey(id=key_id, name=f"k-{key_id[:4]}", digest=digest(token),
                    scopes=frozenset(scopes)))
    return token


async def test_a_job_is_its_keys_and_an_admins_only(jobs_gateway):
    ring = KeyRing()
    alice, bob = make_key(ring, "infer"), make_key(ring, "infer")
    reader = make_key(ring, "read")
    gw, client, _ = await jobs_gateway(keys=ring)
    a, b, admin = ({"authorization": f"Bearer {t}"} for t in (alice, bob, gw.admin_token))
    assert (await submit(client, "work", {"n": 1})).status_code == 401  # keys exist: one needed
    r = await submit(client, "work", {"n": 1}, authorization=f"Bearer {reader}")
    assert r.status_code == 403  # no 'infer' scope
    job = (await submit(client, "work", {"n": 3}, authorization=f"Bearer {alice}")).json()
    assert (await final(client, job["id"], a))["result"]["n"] == 3
    assert (await final(client, job["id"], admin))["state"] == "succeeded"
    for method in ("GET", "DELETE"):
        r = await client.request(method, f"/v1/jobs/{job['id']}", headers=b)
        assert r.status_code == 404, r.text  # as if it did not exist
    assert [j["id"] for j in (await client.get("/v1/jobs", headers=a)).json()["jobs"]] == \
        [job["id"]]
    assert (await client.get("/v1/jobs", headers=b)).json() == {"jobs": []}
    everything = (await client.get("/v1/jobs", headers=admin)).json()
    assert len(everything["jobs"]) == 1 and everything["counts"] == {"succeeded": 1}
    # the same idempotency key under another key is another job
    one = await submit(client, "work", {"n": 1}, idempotency_key="k", authorization=f"Bearer {alice}")
    two = await submit(client, "work", {"n": 1}, idempotency_key="k", authorization=f"Bearer {bob}")
    assert one.status_code == two.status_code == 202 and one.json()["id"] != two.json()["id"]


async def test_a_pipeline_job_calls_on_for_the_key_that_submitted_it(jobs_gateway):
    """The job's run sends its grant for the key that made it: with keys required, the
    child call acts for that key (it was refused as keyless)."""
    ring = KeyRing()
    alice = make_key(ring, "infer")
    _, client, _ = await jobs_gateway(keys=ring, relay=True)
    a = {"authorization": f"Bearer {alice}"}
    r = await client.post("/v1/jobs/relay/relay", json={"n": 4}, headers=a)
    assert r.status_code == 202, r.text
    done = await final(client, r.json()["id"], a)
    assert done["state"] == "succeeded" and done["result"] == {"n": 4, "square": 16}, done


async def test_cancel_stops_a_running_job_and_a_queued_one_never_runs(jobs_gateway):
    _, client, runner = await jobs_gateway(max_running=1)
    slow = (await submit(client, "work", {"n": 1, "ms": 5000})).json()
    queued = (await submit(client, "work", {"n": 2})).json()
    await until(lambda: _state(client, slow["id"], "running"))
    assert (await client.get(f"/v1/jobs/{queued['id']}")).json()["state"] == "queued"
    r = await client.delete(f"/v1/jobs/{queued['id']}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    started = time.monotonic()
    r = await client.delete(f"/v1/jobs/{slow['id']}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    await until(lambda: _true(not runner.running))
    assert time.monotonic() - started < 1.0  # the run stopped, it did not finish its 5 s
    assert (await client.delete(f"/v1/jobs/{slow['id']}")).status_code == 200  # again: fine
    done = (await client.get(f"/v1/jobs/{slow['id']}")).json()
    assert done["result"] is None and done["error"]["code"] == "cancelled"
    assert Worker.request_ids == []  # neither ran to completion
    ok = (await submit(client, "work", {"n": 3})).json()
    await final(client, ok["id"])
    r = await client.delete(f"/v1/jobs/{ok['id']}")
    assert r.status_code == 409 and "succeeded already" in r.json()["error"]["message"]


async def _state(client: httpx.AsyncClient, job_id: str, state: str) -> bool:
    return bool((await client.get(f"/v1/jobs/{job_id}")).json()["state"] == state)


async def _true(value: bool) -> bool:
    return value


async def test_failures_retry_then_dead_letter_and_refusals_fail_at_once(jobs_gateway):
    _, client, _ = await jobs_gateway(max_failures=3, max_result_bytes=100)
    boom = (await submit(client, "boom", {"n": 1})).json()
    refused = (await submit(client, "refuse", {"n": 1})).json()
    big = (await submit(client, "big", {"size": 1000})).json()
    dead = await final(client, boom["id"])
    assert (dead["state"], dead["attempt"], dead["failures"]) == ("dead", 3, 3)
    assert dead["error"]["code"] == "handler_failed" and "boom 1" in dead["error"]["message"]
    failed = await final(client, refused["id"])
    assert (failed["state"], failed["attempt"], failed["error"]["status"]) == ("failed", 1, 400)
    too_big = await final(client, big["id"])
    assert too_big["state"] == "failed" and too_big["error"]["code"] == "result_too_large"


async def test_a_past_deadline_expires_the_job(jobs_gateway):
    _, client, _ = await jobs_gateway(max_running=1)
    (await submit(client, "work", {"n": 1, "ms": 1500})).json()
    short = (await submit(client, "work", {"n": 2}, x_job_timeout_s="0.2")).json()
    done = await final(client, short["id"])
    assert done["state"] == "expired" and done["error"]["code"] == "deadline_exceeded"
    assert done["attempt"] == 0  # never ran


async def test_jobs_use_spare_capacity_only(jobs_gateway):
    gw, client, runner = await jobs_gateway(capacity_share=0.5)
    d = gw.membership.deployments["svc"]
    limit = gw.dispatcher.state(d).admission.limit.limit
    ids = [(await submit(client, "work", {"n": i, "ms": 20})).json()["id"] for i in range(24)]
    for job_id in ids:
        assert (await final(client, job_id))["state"] == "succeeded"
    limit = max(limit, gw.dispatcher.state(d).admission.limit.limit)  # (it may have grown)
    assert 1 <= Worker.peak <= int(limit * 0.5), (Worker.peak, limit)
    # a request waiting for an admission slot: no job starts, whatever the room
    adm = gw.dispatcher.state(d).admission
    adm.queues["interactive"].append(object())  # type: ignore[arg-type]
    try:
        assert runner.slots(d) == 0
    finally:
        adm.queues["interactive"].clear()
    assert runner.slots(d) == int(adm.limit.limit * 0.5)


async def test_a_job_whose_gateway_died_is_retried_after_its_lease(jobs_gateway):
    _, client, runner = await jobs_gateway()
    runner.stopping = True  # this gateway claims nothing for a moment…
    job = (await submit(client, "work", {"n": 5})).json()
    # …while another claims the job and dies with it: its lease ran out a second ago
    [claimed] = await asyncio.to_thread(runner.store.claim, "svc", 1, "dead#1",
                                        runner.wall(), -1.0)
    assert claimed["id"] == job["id"]
    runner.stopping = False
    task = asyncio.get_running_loop().create_task(runner._claim_loop())
    try:
        done = await final(client, job["id"])
    finally:
        task.cancel()
    assert (done["state"], done["attempt"], done["failures"]) == ("succeeded", 2, 1)
    assert Worker.request_ids == [f"job-{job['id']}-2"]


async def test_shutdown_puts_running_jobs_back_in_the_queue(jobs_gateway):
    _, client, runner = await jobs_gateway()
    job = (await submit(client, "work", {"n": 1, "ms": 5000})).json()
    await until(lambda: _state(client, job["id"], "running"))
    await runner.stop()  # drain_s = 0.5: the run is cancelled and put back
    row = await asyncio.to_thread(runner.store.get, job["id"])
    assert row is not None
    assert (row["state"], row["attempt"], row["failures"], row["claimed_by"]) == \
        ("queued", 1, 0, None)


async def test_the_queue_bound_is_a_503_with_retry_after(jobs_gateway):
    _, client, _ = await jobs_gateway(max_queued=2, start=False)
    assert (await submit(client, "work", {"n": 1})).status_code == 202
    assert (await submit(client, "work", {"n": 2})).status_code == 202
    r = await submit(client, "work", {"n": 3})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["code"] == "queue_full"


def receiver_of(answers: list[int], seen: list[httpx.Request]) -> Receiver:
    async def receive(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status = answers.pop(0) if answers else 200
        return httpx.Response(status, content=b"ignored")
    return receive


async def test_a_webhook_is_signed_retried_and_delivered_once(jobs_gateway):
    seen: list[httpx.Request] = []
    _, client, _ = await jobs_gateway(receiver=receiver_of([503], seen))
    hook = "http://127.0.0.1:9/hooks/jobs"
    job = (await submit(client, "work", {"n": 4}, x_webhook_url=hook)).json()
    done = await final(client, job["id"])

    async def delivered() -> dict[str, Any] | None:
        body = (await client.get(f"/v1/jobs/{job['id']}")).json()
        return body if body["webhook"]["state"] == "delivered" else None

    shown = await until(delivered)
    assert shown["webhook"]["attempts"] == 2 and done["state"] == "succeeded"
    assert len(seen) == 2  # one 503, then the delivery; never again
    await asyncio.sleep(0.3)
    assert len(seen) == 2
    for request in seen:
        assert str(request.url) == hook
        assert request.headers["x-steadyserve-event-id"] == job["id"]
        assert request.headers["x-steadyserve-event"] == "job.succeeded"
        assert verify_webhook(SECRET, request.content, request.headers)
    event = orjson.loads(seen[-1].content)
    assert event["event_id"] == job["id"] and event["type"] == "job.succeeded"
    assert event["job"]["result"] == {"n": 4, "square": 16} and event["job"]["state"] == "succeeded"


async def test_a_webhook_is_given_up_after_its_tries_and_a_dead_job_tells_too(jobs_gateway):
    seen: list[httpx.Request] = []
    _, client, _ = await jobs_gateway(receiver=receiver_of([500] * 100, seen),
                                      webhook_max_attempts=3, max_failures=1)
    job = (await submit(client, "boom", {"n": 1}, x_webhook_url="http://localhost/h")).json()
    assert (await final(client, job["id"]))["state"] == "dead"

    async def given_up() -> dict[str, Any] | None:
        body = (await client.get(f"/v1/jobs/{job['id']}")).json()
        return body if body["webhook"]["state"] == "failed" else None

    shown = await until(given_up)
    assert shown["webhook"]["attempts"] == 3 and "answered 500" in shown["webhook"]["error"]
    assert len(seen) == 3 and orjson.loads(seen[0].content)["type"] == "job.dead"


async def test_jobs_disabled_or_without_a_database(make_gateway, jobs_gateway):
    gw, client, _ = await jobs_gateway(start=False)
    gw.jobs = None
    r = await submit(client, "work", {"n": 1})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    from dataclasses import replace
    gw.full_config = replace(gw.full_config, jobs=JobsConfig(enabled=False))
    r = await client.get("/v1/jobs/job_0123456789abcdef01234567")
    assert r.status_code == 404 and "[jobs] enabled = false" in r.json()["error"]["message"]


async def test_a_data_plane_worker_forwards_the_job_routes(jobs_gateway):
    gw, client, _ = await jobs_gateway(start=False)
    forwarded: list[tuple[str, str]] = []

    async def forward(req: Any) -> Response:
        forwarded.append((req.method, req.path))
        return Response(202, b'{"forwarded": true}')

    gw.forward = forward
    assert (await submit(client, "work", {"n": 1})).status_code == 202
    assert (await client.get("/v1/jobs/job_0123456789abcdef01234567")).status_code == 202
    assert (await client.delete("/v1/jobs/job_0123456789abcdef01234567")).status_code == 202
    assert forwarded == [("POST", "/v1/jobs/svc/work"),
                         ("GET", "/v1/jobs/job_0123456789abcdef01234567"),
                         ("DELETE", "/v1/jobs/job_0123456789abcdef01234567")]
    assert admin_headers(gw)  # (the gateway process checks access again)


async def test_interactive_requests_are_not_shed_while_jobs_run(jobs_gateway):
    gw, client, _ = await jobs_gateway(capacity_share=0.5)
    ids = [(await submit(client, "work", {"n": i, "ms": 20})).json()["id"] for i in range(60)]
    statuses: list[int] = []

    async def interactive() -> None:
        for _ in range(15):
            r = await client.post("/v1/deployments/svc/work", json={"n": 1, "ms": 20})
            statuses.append(r.status_code)

    # more interactive callers than the jobs leave room for: they wait for the jobs' slots,
    # and no job starts while one waits
    await asyncio.gather(*(interactive() for _ in range(6)))
    assert statuses == [200] * 90
    for job_id in ids:
        assert (await final(client, job_id, timeout_s=30))["state"] == "succeeded"
    shed = gw.metrics.shed.collect()[0].samples
    assert not [s for s in shed if s.labels.get("priority") == "interactive" and s.value > 0]
