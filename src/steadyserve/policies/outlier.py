"""Outlier ejection (Envoy's consecutive-5xx detector), as a pure state machine per replica.

    in rotation ──5 consecutive failures──► ejected (30 s × consecutive ejections, ≤ 300 s)
        ▲                                        │ time passes
        │ probe succeeds: slow start             ▼
        └──────────────────────────────── probing (one live request)
                                                 │ probe fails: ejected again, longer
Each ejection carries its reason ("5 consecutive failures", "its probe failed …", or what an
automatic action or the handler-error comparison says) until the replica returns.
A failure is a *gateway failure* (Envoy's `consecutive_gateway_failure`): a connect error, a
reset, a per-try timeout, a malformed reply, or a reply whose code says the replica itself
failed (`blame_reply`). A handler's own exception, a 4xx, a busy replica and a dependency that
is down are answers, not failures: they count like a success. Never more than
`max_ejection_share` of a deployment's replicas are ejected, and never the last one.

A replica whose handler fails nearly everything while its peers do not — a broken device
context, a corrupt local file — is not the requests' fault, yet none of its answers is a
gateway failure. `HandlerErrors` keeps a decaying count of each replica's answers and
handler errors, and `sick` compares it with its peers' (Envoy's `failure_percentage`
detector, made relative): at least `min_requests` answers each, a failure share of at least
`error_ratio`, and peers failing less than a quarter as often. A poison input spread over
every replica fails them all alike and ejects none; a single replica cannot be compared and
is never ejected this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True, kw_only=True, slots=True)
class OutlierPolicy:
    consecutive_failures: int = 5
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejection_share: float = 0.5
    slow_start_s: float = 10.0

    def may_eject(self, total: int, ejected: int) -> bool:
        """Ejecting one more keeps the share within bounds and at least one replica serving."""
        allowed = max(1, math.floor(total * self.max_ejection_share))
        return ejected + 1 <= allowed and total - ejected - 1 >= 1


@dataclass(frozen=True, slots=True)
class HostHealth:
    consecutive_failures: int = 0
    ejections: int = 0  # consecutive ejections: multiplies the ejection time
    ejected_until: float = 0.0  # > 0 while ejected (or waiting for its probe)
    probing: bool = False  # one live request is testing it
    returned_at: float = 0.0  # start of slow start
    reason: str = ""  # why it is ejected, while it is (the dashboard shows it)

    def ejected(self, now: float) -> bool:
        """Out of rotation: ejected and not yet due for a probe, or its probe is running."""
        return self.ejected_until > 0 and (now < self.ejected_until or self.probing)

    def due_for_probe(self, now: float) -> bool:
        return self.ejected_until > 0 and now >= self.ejected_until and not self.probing


def start_probe(h: HostHealth) -> HostHealth:
    return replace(h, probing=True)


def record(
    h: HostHealth, ok: bool, now: float, policy: OutlierPolicy, may_eject: bool
) -> tuple[HostHealth, str | None]:
    """Next state after one attempt's outcome, and the event: 'ejected' | 'returned' | None."""
    if ok:
        if h.ejected_until > 0:  # the probe (or a straggler) succeeded: back, in slow start
            return HostHealth(ejections=h.ejections, returned_at=now), "returned"
        if h.consecutive_failures or (h.ejections and now - h.returned_at >= policy.base_ejection_s):
            # healthy long enough after a return: forget past ejections, as Envoy decays them
            ejections = h.ejections if now - h.returned_at < policy.base_ejection_s else 0
            return replace(h, consecutive_failures=0, ejections=ejections), None
        return h, None
    if h.ejected_until > 0:
        if h.probing:  # the probe failed: eject again, for longer
            why = f"its probe failed (ejected {h.ejections + 1} times in a row)"
            return eject_host(h, now, policy, why), "ejected"
        return h, None
    failures = h.consecutive_failures + 1
    if failures >= policy.consecutive_failures and may_eject:
        return eject_host(h, now, policy, f"{failures} consecutive failures"), "ejected"
    return replace(h, consecutive_failures=failures), None


@dataclass(frozen=True, slots=True)
class HandlerErrors:
    """Answers and handler errors of one replica, halved whenever answers reach twice the
    window, so the share follows the last ~window..2×window requests."""

    answers: float = 0.0
    errors: float = 0.0

    @property
    def ratio(self) -> float:
        return self.errors / self.answers if self.answers else 0.0


def note_answer(w: HandlerErrors, *, error: bool, window: int) -> HandlerErrors:
    answers, errors = w.answers + 1, w.errors + (1 if error else 0)
    if answers >= 2 * window:
        answers, errors = answers / 2, errors / 2
    return HandlerErrors(answers, errors)


def sick(candidate: HandlerErrors, peers: list[HandlerErrors], *, error_ratio: float,
         min_requests: int) -> bool:
    """Does this replica fail far more of its requests than its peers fail of theirs?"""
    if candidate.answers < min_requests or candidate.ratio < error_ratio:
        return False
    answers = sum(p.answers for p in peers)
    if answers < min_requests:
        return False  # nothing to compare with: a deployment-wide problem, or one replica
    return sum(p.errors for p in peers) / answers < candidate.ratio / 4


# error codes a replica sends when it, not the request, failed: not ready or shutting down
# (replica_unavailable), a generic replica failure (replica_error), service code saying "not
# here, not now" (retryable), the replica-side deadline (timeout)
REPLICA_FAILURE_CODES = frozenset({"replica_unavailable", "replica_error", "retryable", "timeout"})
BUSY_CODES = frozenset({"overloaded"})  # the replica's batch queue is full


@dataclass(frozen=True, slots=True)
class Blame:
    """Who is at fault for one upstream answer, and what the dispatcher does about it."""

    outcome: str  # the `outcome` label of steadyserve_upstream_attempts_total
    replica_failed: bool  # a gateway failure: counts towards ejection
    retry: bool  # another replica may answer differently (idempotent handlers only)


CLIENT_ERROR = Blame("4xx", replica_failed=False, retry=False)
HANDLER_ERROR = Blame("handler_error", replica_failed=False, retry=False)
DEPENDENCY = Blame("dependency", replica_failed=False, retry=False)
BUSY = Blame("overloaded", replica_failed=False, retry=True)
GATEWAY_FAILURE = Blame("5xx", replica_failed=True, retry=True)
MALFORMED = Blame("malformed", replica_failed=True, retry=True)


def blame_reply(status: int, code: str | None, retry_after: bool) -> Blame:
    """Blame for a reply that is not a result: `status` and `code` are the error's (code None
    when the body names none), `retry_after` whether it says when to come back. The code
    decides, not the status: service code may put any 4xx/5xx status on its errors."""
    if code is None or status < 400:
        return MALFORMED  # our replicas name every error and never send one as a success
    if status < 500:
        return CLIENT_ERROR
    if code in REPLICA_FAILURE_CODES:
        return GATEWAY_FAILURE
    if code in BUSY_CODES:
        return BUSY
    if retry_after:
        # dependency_unavailable, database_unavailable, a service's own code with a
        # Retry-After: the same on every replica, and no fault of this one
        return DEPENDENCY
    return HANDLER_ERROR  # handler_failed, or a service's own 5xx: the request's


TIMEOUT_BLAME_SLACK = 0.9  # an attempt that had 90 % of what was needed had enough
TIMEOUT_BLAME_FLOOR_S = 0.05  # under this, lateness is a busy machine's scheduling noise


def timeout_blames_replica(budget_s: float, *, handler_timeout_s: float, p99_s: float | None,
                           p99_multiple: float) -> bool:
    """Is a timeout the replica's fault? Only when the attempt had the time this handler
    normally needs: max(50 ms, multiple × its observed p99), or its own whole timeout while
    nothing is observed yet. A shorter deadline (a client's X-Request-Timeout-Ms of 4 ms on
    a 30 ms model) ran out on the request, not on the replica: holding it against the
    replica would let any client eject healthy replicas and shrink the concurrency limit
    with a header. A replica that hangs is still caught by any deadline over 3 × p99."""
    needed = handler_timeout_s if p99_s is None else \
        min(handler_timeout_s, max(TIMEOUT_BLAME_FLOOR_S, p99_multiple * p99_s))
    return budget_s >= TIMEOUT_BLAME_SLACK * needed


def eject_host(h: HostHealth, now: float, policy: OutlierPolicy, reason: str) -> HostHealth:
    """Ejected now, for `reason` (kept while it is out, for the dashboard): what
    `consecutive_failures` failures or a failed probe do, and what an automatic action or
    handler errors far above the peers' do directly (the caller checks `may_eject`)."""
    ejections = h.ejections + 1
    duration = min(policy.max_ejection_s, policy.base_ejection_s * ejections)
    return HostHealth(ejections=ejections, ejected_until=now + duration, reason=reason)


def slow_start_weight(h: HostHealth, now: float, policy: OutlierPolicy) -> float:
    """Share of its normal traffic a returned replica may take: ramps 0.1 → 1 over the window."""
    if h.returned_at <= 0 or policy.slow_start_s <= 0:
        return 1.0
    ramp = (now - h.returned_at) / policy.slow_start_s
    return 1.0 if ramp >= 1 else max(0.1, ramp)
