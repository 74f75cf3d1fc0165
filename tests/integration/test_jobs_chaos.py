"""1,000 asynchronous jobs through real processes, on SQLite and on PostgreSQL: submitted at
a steady pace with idempotency keys and a webhook each, the gateway SIGKILLed a quarter of
the way (its replicas die with it) and started again on the same data, a replica SIGKILLed
later. Pass criteria: every accepted job reaches a final state (all succeed), none is lost,
none has its outcome stored twice, each ran to completion at least once, and every job's
webhook reached the receiver with a valid signature (retried past a 503 for every tenth).

Counted, and printed: jobs submitted / succeeded / dead / lost / stored twice / ran twice at
the service (at least once means a run cut short by a kill may be run again) / webhooks
delivered / duplicate deliveries (receivers de-duplicate by the event id)."""

from __future__ import annotations

import collections
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from steadyserve.client import verify_webhook

from .conftest import HERE, Running, start

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICE = f"{HERE / 'services' / 'jobs_fast.py'}:JobsFast"
N = 1000
SUBMIT_PER_S = 90.0  # a little under what 2 replicas finish: the kills land mid-stream
HANDLER_MS = 25.0
FINAL = ("succeeded", "failed", "dead", "cancelled", "expired")


class Receiver:
    """A webhook receiver: checks each signature, answers 503 to the first delivery of every
    tenth job (so delivery retries are exercised), 200 otherwise, and counts per event id."""

    def __init__(self) -> None:
        self.secret = b""
        self.lock = threading.Lock()
        self.tries: collections.Counter[str] = collections.Counter()
        self.delivered: collections.Counter[str] = collections.Counter()
        self.invalid = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the stdlib's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                event = self.headers.get("x-steadyserve-event-id", "")
                valid = verify_webhook(receiver.secret, body, dict(self.headers.items()))
                with receiver.lock:
                    receiver.tries[event] += 1
                    refuse = receiver.tries[event] == 1 and int(event[-6:], 16) % 10 == 0
                    if not valid:
                        receiver.invalid += 1
                    elif not refuse:
                        receiver.delivered[event] += 1
                self.send_response(503 if refuse or not valid else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/jobs"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Submitter(threading.Thread):
    """Submits N jobs at SUBMIT_PER_S, each under its own idempotency key; a submission that
    gets no answer (the gateway is down) is sent again with the same key until one comes.
    Every 100th is sent twice on purpose: the same job must come back."""

    def __init__(self, url: str, hook: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.hook = hook
        self.accepted: dict[str, str] = {}  # idempotency key → job id
        self.replayed = 0  # answered 200: stored by an earlier, unanswered try
        self.resent = 0  # tries that got no answer
        self.errors: list[str] = []

    def run(self) -> None:
        started = time.monotonic()
        client = httpx.Client(timeout=10)
        try:
            for i in range(N):
                pause = started + i / SUBMIT_PER_S - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                key = f"chaos-{i:04d}"
                job_id = self.submit(client, i, key)
                self.accepted[key] = job_id
                if i % 100 == 0 and self.submit(client, i, key, again=True) != job_id:
                    self.errors.append(f"{key}: a second submission made another job")
        except Exception as exc:
            self.errors.append(repr(exc))
        finally:
            client.close()

    def submit(self, client: httpx.Client, i: int, key: str, again: bool = False) -> str:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                r = client.post(f"{self.url}/v1/jobs/fast/work",
                                json={"n": i, "ms": HANDLER_MS},
                                headers={"idempotency-key": key, "x-webhook-url": self.hook})
            except httpx.HTTPError:
                self.resent += 1
                time.sleep(0.1)
                continue
            if r.status_code in (200, 202):
                if r.status_code == 200 and not again:
                    self.replayed += 1
                if again and r.status_code != 200:
                    self.errors.append(f"{key}: resubmission answered {r.status_code}")
                return str(r.json()["id"])
            if r.status_code >= 500:
                time.sleep(0.1)
                continue
            raise AssertionError(f"{key}: {r.status_code} {r.text[:300]}")
        raise AssertionError(f"{key}: no gateway took it in 90 s")


def counts(gw: Running) -> dict[str, int]:
    r = httpx.get(f"{gw.url}/v1/jobs?limit=1", headers=gw.admin_headers(), timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json()["counts"])


def wait_for(check: Any, timeout_s: float, what: str, gw: Running) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not in {timeout_s} s:\n{gw.log.read_text()[-3000:]}")
        time.sleep(0.1)


def finished_lines(log: Path) -> collections.Counter[str]:
    """How often each job's outcome was stored as final, from a gateway's log."""
    stored: collections.Counter[str] = collections.Counter()
    for line in log.read_text(errors="replace").splitlines():
        if '"job finished"' in line:
            try:
                stored[json.loads(line)["job"]] += 1
            except (ValueError, KeyError):
                pass
    return stored


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_thousand_jobs_survive_a_killed_gateway_and_a_killed_replica(
        tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> None:
    database = "" if backend == "sqlite" else \
        f'database_url = "{request.getfixturevalue("pg_url")}"'
    executions = tmp_path / "executions.log"
    (tmp_path / "steadyserve.toml").write_text(f"""
data_dir = "{tmp_path / 'state'}"
{database}
[alerting]
enabled = false
[feedback]
record_requests = false
[jobs]
lease_s = 2.0
poll_s = 0.1
retry_base_s = 0.1
retry_cap_s = 0.5
webhook_timeout_s = 2.0
webhook_retry_base_s = 0.1
webhook_retry_cap_s = 0.5
max_list = 2000
[deployments.fast]
service = "{SERVICE}"
replicas = 2
env = {{ JOBS_LOG = "{executions}" }}
""")
    receiver = Receiver()
    started = time.monotonic()
    first = start([], tmp_path)
    second: Running | None = None
    submitter: Submitter | None = None
    try:
        first.wait_ready(60)
        receiver.secret = (tmp_path / "state" / "webhook.secret").read_text().strip().encode()
        submitter = Submitter(first.url, receiver.url)
        submitter.start()
        wait_for(lambda: counts(first).get("succeeded", 0) >= N // 4, 60, "a quarter done", first)
        first.proc.send_signal(signal.SIGKILL)  # mid-stream: jobs running, webhooks in flight
        first.proc.wait(10)
        killed_at = time.monotonic() - started
        second = start([], tmp_path)
        second.wait_ready(60)
        submitter.url = second.url
        wait_for(lambda: counts(second).get("succeeded", 0) >= (N * 3) // 5, 90,
                 "three fifths done", second)
        victim = second.status("fast")["replicas"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        submitter.join(120)
        assert not submitter.is_alive() and submitter.errors == [], submitter.errors[:5]
        wait_for(lambda: not {"queued", "running"} & set(counts(second)), 90,
                 "every job final", second)
        wait_for(lambda: len(receiver.delivered) >= N, 60, "every webhook delivered", second)
        time.sleep(1.0)  # a duplicate delivery would show now
        listing = httpx.get(f"{second.url}/v1/jobs?limit=2000", headers=second.admin_headers(),
                            timeout=30).json()["jobs"]
    finally:
        for gw in (first, second):
            if gw is not None:
                gw.stop(signal.SIGTERM)
        receiver.close()
    elapsed = time.monotonic() - started
    assert submitter is not None
    accepted = set(submitter.accepted.values())
    by_id = {j["id"]: j for j in listing}
    states = collections.Counter(j["state"] for j in listing)
    lost = sorted(j for j in accepted if j not in by_id or by_id[j]["state"] not in FINAL)
    stored = finished_lines(first.log) + (finished_lines(second.log) if second else
                                          collections.Counter())
    stored_twice = sorted(j for j, n in stored.items() if n > 1)
    ran: collections.Counter[str] = collections.Counter()
    for line in executions.read_text().splitlines():
        request_id = line.split()[0]  # job-<id>-<attempt>
        ran[request_id[4:].rpartition("-")[0]] += 1
    ran_twice = sorted(j for j, n in ran.items() if n > 1)
    duplicates = sum(n - 1 for n in receiver.delivered.values())
    retried_after_kill = sum(1 for j in listing if j["attempt"] > 1)
    print(f"\n  {backend}: jobs submitted {len(accepted)} (resent after no answer "
          f"{submitter.resent}, answered from an earlier try {submitter.replayed}) / succeeded "
          f"{states['succeeded']} / dead {states['dead']} / lost {len(lost)} / outcome stored "
          f"twice {len(stored_twice)} / ran to completion twice at the service {len(ran_twice)} "
          f"/ run again after a kill {retried_after_kill} / webhooks delivered "
          f"{len(receiver.delivered)} (tries {sum(receiver.tries.values())}, invalid "
          f"signatures {receiver.invalid}) / duplicate deliveries {duplicates}; gateway killed "
          f"at {killed_at:.1f} s, {elapsed:.1f} s in all")
    assert len(submitter.accepted) == N and len(accepted) == N  # one job per key
    assert lost == [] and len(by_id) == N
    assert states == {"succeeded": N}, states
    assert stored_twice == [] and sum(stored.values()) <= N
    assert set(ran) >= accepted  # each ran to completion at least once
    assert len(ran_twice) <= 16, ran_twice  # at most what was in flight at the two kills
    assert set(receiver.delivered) == accepted and receiver.invalid == 0
    assert duplicates <= 8, receiver.delivered.most_common(10)  # in flight at the kill
