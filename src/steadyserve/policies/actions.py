"""Guards for automatic emergency actions: may this action run on this target now?

An alert rule names actions (restart a replica, eject it, shed batch traffic, roll back the
last rollout, ...). Before the responder does anything, `ActionGuard.check` decides, from the
recent history of actions it is given, whether the action is allowed: a cool-down per
(action, target), at most N of an action per hour across all targets, and never taking a
deployment below its minimum of serving replicas. Pure: history and time are arguments.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

ACTIONS = ("restart_replica", "eject_replica", "shed_batch", "rollback", "scale_up",
           "serve_stale")
# actions that take a replica out of service (checked against min_serving)
REMOVES_CAPACITY = frozenset({"restart_replica", "eject_replica"})


@dataclass(frozen=True, slots=True)
class PastAction:
    action: str
    target: str
    at: float
    dry_run: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class ActionGuard:
    cooldown_s: float = 300.0
    max_per_hour: int = 3
    min_serving: int = 1

    def check(
        self, action: str, target: str, history: Sequence[PastAction], now: float,
        *, serving: int, dry_run: bool = False,
    ) -> tuple[bool, str]:
        """(allowed, reason). Dry runs are judged as real ones (they show what would happen)
        and count against the limits of later dry runs only."""
        if action not in ACTIONS:
            return False, f"unknown action {action!r}"
        relevant = [h for h in history if h.dry_run == dry_run]
        for h in relevant:
            if h.action == action and h.target == target and now - h.at < self.cooldown_s:
                return False, (f"cool-down: {action} on {target} ran {now - h.at:.0f}s ago "
                               f"(< {self.cooldown_s:.0f}s)")
        recent = [h for h in relevant if h.action == action and now - h.at < 3600]
        if len(recent) >= self.max_per_hour:
            return False, f"{action} ran {len(recent)} times in the last hour (max {self.max_per_hour})"
        if action in REMOVES_CAPACITY and serving - 1 < self.min_serving:
            return False, (f"{action} would leave {serving - 1} serving replica(s), "
                           f"below the minimum of {self.min_serving}")
        return True, "allowed"


def deployment_wide(rule: str, deployment: str, active: Iterable[tuple[str, str, str]],
                    replicas: Collection[str]) -> bool:
    """Does every replica of the deployment (two or more) have this rule's alert pending or
    firing? `active` holds (rule, deployment, replica) of the alerts now pending or firing.
    Then the failure is the deployment's (every replica 503s, a dependency is down), not a
    replica's: restarting or ejecting replicas removes capacity and fixes nothing — the
    chaos test of every replica answering 503 saw two of three restarted the moment the
    outage ended, with the third still ejected."""
    if len(replicas) < 2:
        return False
    alerted = {replica for r, d, replica in active if r == rule and d == deployment}
    return set(replicas) <= alerted
