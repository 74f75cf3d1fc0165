"""policies/jobs.py as tables (no clock, no sockets): the state machine, the outcome of a run
from its error, where a job goes after a run, spare capacity, webhook retries and the
webhook allow-list; the webhook signature against the SDK's check; the [jobs] config."""

from __future__ import annotations

import math

import pytest

from steadyserve.client import verify_webhook
from steadyserve.config import JobsConfig
from steadyserve.errors import ConfigError
from steadyserve.gateway.jobs import request_hash, view
from steadyserve.gateway.webhooks import signature, signed_headers
from steadyserve.policies.jobs import (
    FINAL,
    STATES,
    Decision,
    RetryPolicy,
    WebhookPolicy,
    classify,
    decide,
    host_allowed,
    may_move,
    spare_slots,
    webhook_after,
    webhook_problem,
)
from steadyserve.settings import load_config

POLICY = RetryPolicy(max_failures=3, base_s=1.0, cap_s=8.0)
NOW = 1000.0


def test_final_states_never_move_and_live_ones_reach_every_final_state():
    for state in FINAL:
        assert not any(may_move(state, other) for other in STATES)
    assert {s for s in STATES if may_move("running", s)} == FINAL | {"queued"}
    assert may_move("queued", "running") and may_move("running", "queued")
    assert not may_move("queued", "succeeded")  # a result needs a run
    assert not may_move("nonsense", "queued")


@pytest.mark.parametrize(("status", "code", "late", "outcome"), [
    (503, "overloaded", False, "busy"),  # shed by admission: never started
    (429, "rate_limited", False, "busy"),
    (503, "no_ready_replica", False, "busy"),
    (503, "activation_failed", False, "busy"),
    (503, "database_unavailable", False, "busy"),  # the service's dependency: come back later
    (400, "invalid_request", False, "refused"),
    (404, "not_found", False, "refused"),
    (422, "input_quarantined", False, "refused"),
    (502, "response_too_large", False, "refused"),
    (500, "handler_failed", False, "error"),
    (502, "replica_unavailable", False, "error"),
    (503, "retryable", False, "error"),
    (504, "timeout", False, "error"),
    (504, "timeout", True, "late"),  # its own deadline ran out: expired, not a failure
    (504, "deadline_exceeded", True, "late"),
    (500, "handler_failed", True, "error"),  # a failure is one, even at the deadline
])
def test_classify(status, code, late, outcome):
    assert classify(status, code, deadline_passed=late) == outcome


@pytest.mark.parametrize(("outcome", "attempt", "failures", "deadline", "rand", "want"), [
    ("ok", 1, 0, NOW + 60, 0.5, Decision("succeeded", 0)),
    ("ok", 4, 2, NOW + 60, 0.5, Decision("succeeded", 2)),
    ("refused", 1, 0, NOW + 60, 0.5, Decision("failed", 0)),
    ("late", 1, 0, NOW + 60, 0.5, Decision("expired", 0)),
    ("error", 1, 0, NOW, 0.5, Decision("expired", 0)),  # at the deadline: expired
    # a failure: counted, then tried again after 1 s × 2^(failures-1), half jittered
    ("error", 1, 0, NOW + 60, 0.0, Decision("queued", 1, NOW + 0.5)),
    ("error", 1, 0, NOW + 60, 0.9999, Decision("queued", 1, NOW + 0.99995)),
    ("error", 2, 1, NOW + 60, 0.0, Decision("queued", 2, NOW + 1.0)),
    ("lost", 2, 1, NOW + 60, 0.0, Decision("queued", 2, NOW + 1.0)),  # its gateway died
    ("error", 3, 2, NOW + 60, 0.0, Decision("dead", 3)),  # max_failures: the dead letter
    ("lost", 3, 2, NOW + 60, 0.0, Decision("dead", 3)),
    ("error", 1, 0, NOW + 0.4, 0.0, Decision("expired", 1)),  # the retry would be too late
    # not started (shed): not a failure; backs off on the number of tries
    ("busy", 1, 0, NOW + 60, 0.0, Decision("queued", 0, NOW + 0.5)),
    ("busy", 4, 1, NOW + 60, 0.0, Decision("queued", 1, NOW + 4.0)),
    ("busy", 30, 0, NOW + 60, 0.0, Decision("queued", 0, NOW + 4.0)),  # capped at 8 s
    ("busy", 1, 0, NOW + 0.3, 0.0, Decision("expired", 0)),
])
def test_decide(outcome, attempt, failures, deadline, rand, want):
    got = decide(outcome, attempt=attempt, failures=failures, deadline_at=deadline, now=NOW,
                 rand01=rand, policy=POLICY)
    assert got.state == want.state and got.failures == want.failures
    if want.available_at is None:
        assert got.available_at is None
    else:
        assert got.available_at == pytest.approx(want.available_at)


@pytest.mark.parametrize(("inflight", "limit", "waiting", "share", "running", "cap", "want"), [
    (0, 8, 0, 0.5, 0, 32, 4),  # idle: half the limit
    (3, 8, 0, 0.5, 3, 32, 1),
    (4, 8, 0, 0.5, 4, 32, 0),  # at the share
    (7, 8, 0, 0.5, 0, 32, 0),  # interactive traffic holds the room: none
    (0, 8, 1, 1.0, 0, 32, 0),  # a request waits for admission: none, whatever the room
    (0, 100, 0, 1.0, 30, 32, 2),  # this gateway's own cap
    (0, 9, 0, 0.5, 0, 32, 4),  # floor
    (0, 1, 0, 0.5, 0, 32, 0),
])
def test_spare_slots(inflight, limit, waiting, share, running, cap, want):
    assert spare_slots(inflight=inflight, limit=limit, waiting=waiting, share=share,
                       running=running, max_running=cap) == want


@pytest.mark.parametrize(("delivered", "attempts", "rand", "want"), [
    (True, 1, 0.0, ("delivered", None)),
    (True, 5, 0.0, ("delivered", None)),
    (False, 1, 0.0, ("pending", NOW + 0.5)),
    (False, 2, 0.0, ("pending", NOW + 1.0)),
    (False, 9, 0.0, ("pending", NOW + 5.0)),  # capped at 10 s, half jittered
    (False, 4, 1.0, ("pending", NOW + 8.0)),
    (False, 10, 0.0, ("failed", None)),  # max_attempts
])
def test_webhook_after(delivered, attempts, rand, want):
    policy = WebhookPolicy(max_attempts=10, base_s=1.0, cap_s=10.0)
    state, at = webhook_after(delivered, attempts=attempts, now=NOW, rand01=rand, policy=policy)
    assert state == want[0]
    assert at == (None if want[1] is None else pytest.approx(want[1]))


LOOPBACK = ("localhost", "127.0.0.1", "::1")


@pytest.mark.parametrize(("host", "port", "allowed", "ok"), [
    ("127.0.0.1", 80, LOOPBACK, True),
    ("LOCALHOST.", 9000, LOOPBACK, True),
    ("::1", 443, LOOPBACK, True),
    ("127.0.0.2", 80, LOOPBACK, False),  # listed literally, nothing else
    ("169.254.169.254", 80, LOOPBACK, False),  # the cloud metadata service
    ("hooks.example.com", 443, ("hooks.example.com",), True),
    ("evil.example.com", 443, ("hooks.example.com",), False),
    ("a.hooks.example.com", 443, ("*.hooks.example.com",), True),
    ("hooks.example.com", 443, ("*.hooks.example.com",), False),  # subdomains only
    ("xhooks.example.com", 443, ("*.hooks.example.com",), False),
    ("hooks.example.com", 8443, ("hooks.example.com:443",), False),
    ("hooks.example.com", 443, ("hooks.example.com:443",), True),
    ("::1", 8080, ("[::1]:8080",), True),
    ("::1", 8081, ("[::1]:8080",), False),
    ("anything.test", 1, ("*",), True),
    ("a", 1, ("a:notaport",), False),
])
def test_host_allowed(host, port, allowed, ok):
    assert host_allowed(host, port, allowed) is ok


@pytest.mark.parametrize(("url", "problem"), [
    ("http://127.0.0.1:9000/hook", None),
    ("https://localhost/hook?x=1", None),
    ("http://[::1]:8080/h", None),
    ("ftp://127.0.0.1/h", "must start with http:// or https://"),
    ("file:///etc/passwd", "must start with http:// or https://"),
    ("http:///nohost", "has no host"),
    ("http://127.0.0.1:99999/h", "not valid"),
    ("http://example.com/h", "add it to [jobs] webhook_hosts"),
    ("http://127.0.0.1@example.com/h", "add it to [jobs] webhook_hosts"),  # userinfo trick
    ("http://127.0.0.1/a b", "printable ASCII without spaces"),
    ("http://127.0.0.1/é", "printable ASCII"),
    ("http://127.0.0.1/" + "a" * 100, "over 64 characters"),
])
def test_webhook_problem(url, problem):
    got = webhook_problem(url, LOOPBACK, 64)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got, got


def test_a_signed_webhook_verifies_and_a_changed_one_does_not():
    secret, body = b"0123456789abcdef0123", b'{"event_id":"job_1"}'
    headers = signed_headers(secret, "job_1", "job.succeeded", 1_700_000_000, body)
    assert headers["x-steadyserve-event-id"] == "job_1"
    assert headers["x-steadyserve-signature"] == "v1=" + signature(secret, 1_700_000_000, body)
    at = 1_700_000_100.0
    assert verify_webhook(secret.decode(), body, headers, now=at)
    assert verify_webhook(secret, body, {k.upper(): v for k, v in headers.items()}, now=at)
    assert not verify_webhook(secret, body + b" ", headers, now=at)  # body changed
    assert not verify_webhook(b"another secret 0000", body, headers, now=at)
    assert not verify_webhook(secret, body, headers, now=at + 600)  # an old delivery replayed
    forged = {**headers, "x-steadyserve-timestamp": "1700000050"}  # timestamp is signed too
    assert not verify_webhook(secret, body, forged, now=at)
    assert not verify_webhook(secret, body, {}, now=at)


def test_request_hash_tells_requests_apart():
    a = request_hash("d", "h", b'{"n":1}')
    assert a == request_hash("d", "h", b'{"n":1}')
    assert len({a, request_hash("d", "h", b'{"n":2}'), request_hash("d", "h2", b'{"n":1}'),
                request_hash("d2", "h", b'{"n":1}')}) == 4


def test_view_shows_timings_and_never_the_parameters():
    job = {"id": "job_1", "deployment": "d", "handler": "h", "state": "succeeded",
           "attempt": 2, "failures": 1, "created_at": 10.0, "started_at": 10.5,
           "finished_at": 12.0, "deadline_at": 100.0, "args": '{"secret": 1}',
           "result": '{"ok":true}', "error": None, "webhook_url": "http://127.0.0.1/h",
           "webhook_state": "delivered", "webhook_attempts": 1, "webhook_at": 12.1,
           "webhook_error": None}
    shown = view(job)
    assert "args" not in shown and "webhook_url" not in shown.get("webhook", {})
    assert shown["timings"] == {"queued_s": 0.5, "running_s": 1.5, "total_s": 2.0}
    assert shown["webhook"]["state"] == "delivered"
    brief = view(job, full=False)
    assert "result" not in brief and brief["webhook"] == {"state": "delivered"}


@pytest.mark.parametrize(("changes", "message"), [
    ({"max_queued": 0}, "max_queued"),
    ({"max_input_bytes": 1}, "max_input_bytes"),
    ({"default_timeout_s": 10.0, "max_timeout_s": 5.0}, "default_timeout_s"),
    ({"max_failures": 0}, "max_failures"),
    ({"retry_base_s": 2.0, "retry_cap_s": 1.0}, "retry_base_s"),
    ({"lease_s": 0.5}, "lease_s"),
    ({"lease_s": 3.0, "poll_s": 1.5}, "poll_s"),
    ({"capacity_share": 0.0}, "capacity_share"),
    ({"capacity_share": 1.5}, "capacity_share"),
    ({"retention_s": 0.0}, "retention_s"),
    ({"webhook_hosts": ("",)}, "webhook_hosts"),
    ({"max_webhook_url_chars": 3}, "max_webhook_url_chars"),
    ({"webhook_secret": "short"}, "at least 16"),
    ({"webhook_secret_file": ""}, "webhook_secret_file"),
    ({"webhook_concurrency": 0}, "webhook_concurrency"),
])
def test_jobs_config_refuses_bad_values(changes, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        JobsConfig(**changes)


def test_jobs_config_defaults_and_the_secret_is_kept_out_of_repr(tmp_path):
    cfg = JobsConfig(webhook_secret="s" * 32)
    assert "s" * 32 not in repr(cfg)
    assert cfg.webhook_hosts == LOOPBACK and math.isclose(cfg.capacity_share, 0.5)
    (tmp_path / "steadyserve.toml").write_text(
        '[jobs]\nwebhook_hosts = ["hooks.example.com", "127.0.0.1"]\nmax_queued = 7\n'
        '[deployments.a]\nservice = "x:Y"\n')
    loaded = load_config(cwd=tmp_path).jobs
    assert loaded.webhook_hosts == ("hooks.example.com", "127.0.0.1") and loaded.max_queued == 7
    (tmp_path / "steadyserve.toml").write_text('[jobs]\nnope = 1\n[deployments.a]\nservice = "x:Y"\n')
    with pytest.raises(ConfigError, match=r"\[jobs\]: unknown setting 'nope'"):
        load_config(cwd=tmp_path)
