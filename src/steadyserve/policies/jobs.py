"""Asynchronous jobs, pure: the state machine, what happens after a run, when a job may
start, when a webhook is tried again, and which webhook URLs are allowed. Time and
randomness are arguments; nothing here does I/O.

    queued ──claim──► running ──ok──────────────────────► succeeded
      ▲                 │ ──refused (4xx, result too large)► failed
      │                 │ ──error, failures < max_failures─► queued (after a backoff)
      │                 │ ──error, failures = max_failures─► dead (the dead letter)
      └──not started────┤   (shed, no replica: not a failure; waits a backoff)
                        │ ──lease ran out (its gateway died)► as an error
    queued, running ────┴──DELETE───────────────────────────► cancelled
    queued, running ───────deadline passed──────────────────► expired

Final states never change. A retry that could only start after the deadline expires the
job at once rather than keep it queued for nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from .backoff import Backoff

STATES = ("queued", "running", "succeeded", "failed", "dead", "cancelled", "expired")
FINAL = frozenset({"succeeded", "failed", "dead", "cancelled", "expired"})
LIVE = ("queued", "running")
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "expired"}),
    "running": frozenset({"queued", "succeeded", "failed", "dead", "cancelled", "expired"}),
    **{s: frozenset() for s in FINAL},
}

# what a run came to, as the runner saw it
Outcome = Literal["ok", "refused", "busy", "error", "late", "lost"]

# error codes that mean the job never started anywhere: the gateway shed it, or no replica
# could take it now. Not the job's failure; it waits and tries again (within its deadline)
NOT_STARTED = frozenset({"overloaded", "rate_limited", "no_ready_replica", "activation_failed",
                         "dependency_unavailable", "database_unavailable"})
# answered by the handler, but any replica would answer the same: never retried
REFUSED_5XX = frozenset({"response_too_large", "result_too_large"})


def may_move(src: str, dst: str) -> bool:
    return dst in TRANSITIONS.get(src, frozenset())


def classify(status: int, code: str, *, deadline_passed: bool) -> Outcome:
    """A failed run's outcome from the error it raised (status and code, as `to_http` maps
    it). A timeout once the job's own deadline has passed is `late`, not the replica's."""
    if code in NOT_STARTED or status == 429:
        return "busy"
    if deadline_passed and status in (504, 499):
        return "late"
    if 400 <= status < 500 or code in REFUSED_5XX:
        return "refused"  # bad input, unknown handler, a quarantined input: runs never help
    return "error"  # the handler raised, a replica died or timed out: try again


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_failures: int = 5
    base_s: float = 1.0
    cap_s: float = 60.0

    def delay_s(self, n: int, rand01: float) -> float:
        """Before retry number `n` (0-based): exponential, half jittered."""
        return Backoff(base_s=self.base_s, cap_s=self.cap_s).delay(n, rand01)


@dataclass(frozen=True, slots=True)
class Decision:
    state: str  # where the job goes
    failures: int  # counted failures after this run
    available_at: float | None = None  # queued: not claimed before this (epoch seconds)


def decide(outcome: Outcome, *, attempt: int, failures: int, deadline_at: float, now: float,
           rand01: float, policy: RetryPolicy) -> Decision:
    """Where a job goes after run number `attempt` (1-based) ended with `outcome`."""
    if outcome == "ok":
        return Decision("succeeded", failures)
    if outcome == "refused":
        return Decision("failed", failures)
    if outcome == "late" or now >= deadline_at:
        return Decision("expired", failures)
    if outcome == "busy":  # not a failure: back off on the number of tries so far
        at = now + policy.delay_s(attempt - 1, rand01)
        return Decision("expired", failures) if at >= deadline_at else \
            Decision("queued", failures, at)
    failures += 1  # error, lost
    if failures >= policy.max_failures:
        return Decision("dead", failures)
    at = now + policy.delay_s(failures - 1, rand01)
    return Decision("expired", failures) if at >= deadline_at else \
        Decision("queued", failures, at)


def spare_slots(*, inflight: int, limit: float, waiting: int, share: float, running: int,
                max_running: int) -> int:
    """How many more jobs may start on a deployment now. Jobs use spare capacity only:
    none while any request waits for an admission slot, and all requests in flight (jobs
    included) stay under `share` of the deployment's concurrency limit, so interactive
    traffic always finds room; and this gateway runs at most `max_running` at once."""
    if waiting > 0:
        return 0
    room = math.floor(limit * share) - inflight
    return max(0, min(room, max_running - running))


@dataclass(frozen=True, slots=True)
class WebhookPolicy:
    max_attempts: int = 10
    base_s: float = 1.0
    cap_s: float = 300.0


def webhook_after(delivered: bool, *, attempts: int, now: float, rand01: float,
                  policy: WebhookPolicy) -> tuple[str, float | None]:
    """(webhook state, next try at) after delivery attempt number `attempts` (1-based)."""
    if delivered:
        return "delivered", None
    if attempts >= policy.max_attempts:
        return "failed", None
    return "pending", now + Backoff(base_s=policy.base_s, cap_s=policy.cap_s).delay(
        attempts - 1, rand01)


def host_allowed(host: str, port: int | None, allowed: tuple[str, ...]) -> bool:
    """An allow-list entry is a host name or IP literal (any port), `host:port`, `[v6]:port`,
    `*.example.com` (its subdomains), or `*` (any host: only behind an egress proxy that
    enforces its own rules)."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.strip().lower()
        if entry == "*":
            return True
        want_port: int | None = None
        if entry.startswith("["):
            end = entry.find("]")
            name, rest = entry[1:end], entry[end + 1:]
            if rest.startswith(":") and rest[1:].isdigit():
                want_port = int(rest[1:])
        elif entry.count(":") == 1:
            name, _, raw = entry.partition(":")
            if not raw.isdigit():
                continue
            want_port = int(raw)
        else:
            name = entry
        if want_port is not None and want_port != port:
            continue
        if name.startswith("*."):
            if host.endswith(name[1:]) and len(host) > len(name) - 1:
                return True
        elif host == name:
            return True
    return False


def webhook_problem(url: str, allowed: tuple[str, ...], max_chars: int) -> str | None:
    """Why `url` may not receive webhooks (None: it may): http or https only, within
    `max_chars`, and its host on the allow-list (`[jobs] webhook_hosts`)."""
    if len(url) > max_chars:
        return f"the webhook URL is over {max_chars} characters"
    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        return "the webhook URL must be printable ASCII without spaces"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"the webhook URL is not valid: {exc}"
    if parts.scheme not in ("http", "https"):
        return "the webhook URL must start with http:// or https://"
    host = parts.hostname
    if not host:
        return "the webhook URL has no host"
    if not host_allowed(host, port or (443 if parts.scheme == "https" else 80), allowed):
        return (f"webhooks may not go to host {host[:100]!r}: add it to [jobs] webhook_hosts "
                "if it should receive them")
    return None
