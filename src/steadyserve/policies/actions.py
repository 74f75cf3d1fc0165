"""Guards for automatic emergency actions: may this action run on this target now?

An alert rule names actions (restart a replica, eject it, shed batch traffic, roll back the
last rollout, ...). Before the responder does anything, `ActionGuard.check` decides, from the
recent history of actions it is given, whether the action is allowed: a cool-down per
(action, target), at most N of an action per hour across all targets, and never taking a
deployment below its minimum of serving replicas. Pure: history and time are arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
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
