"""Automatic emergency responses: what a firing alert's rule names, guarded and recorded.

The engine calls `respond(alert, actions)` when an alert starts firing. Each action is
checked by `policies.actions.ActionGuard` (cool-down, hourly cap, minimum serving replicas),
then done — or, in dry-run mode, only recorded — and every decision, done or refused, goes to
the log, the database and the status API with the alert that caused it. It acts on the data
plane only through `gateway.controls.DataPlaneControls`, and on replicas through the supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..policies.actions import REMOVES_CAPACITY, ActionGuard, PastAction, deployment_wide
from ..policies.alert_lifecycle import Alert
from ..store import Database, DatabaseUnavailable

if TYPE_CHECKING:
    from ..gateway.controls import DataPlaneControls
    from ..observe.metrics import GatewayMetrics
    from .supervisor import Supervisor

log = logging.getLogger("steadyserve.responder")

SHED_BATCH_S = 300.0
SERVE_STALE_S = 300.0


class Responder:
    def __init__(self, data: DataPlaneControls, metrics: GatewayMetrics,
                 supervisor: Supervisor | None, guard: ActionGuard, db: Database | None, *,
                 dry_run: bool = False, wall: Callable[[], float] = time.time) -> None:
        self.data = data
        self.metrics = metrics
        self.supervisor = supervisor
        self.guard = guard
        self.db = db
        self.dry_run = dry_run
        self.wall = wall
        self.history: deque[PastAction] = deque(maxlen=1000)
        self.recent: deque[dict[str, Any]] = deque(maxlen=200)

    async def respond(self, alert: Alert, actions: tuple[str, ...],
                      active: Sequence[Alert] = ()) -> list[dict[str, Any]]:
        """`active`: every alert now pending or firing (a replica's failure is told from its
        deployment's by its peers' alerts)."""
        records = []
        for action in actions:
            try:
                records.append(await self._one(alert, action, active))
            except Exception:  # one failed action never stops the others, nor the engine
                log.exception("automatic action %s failed", action)
        return records

    async def _one(self, alert: Alert, action: str, active: Sequence[Alert] = ()) -> dict[str, Any]:
        deployment = alert.labels.get("deployment", "")
        target = alert.labels.get("replica", deployment) if action in (
            "restart_replica", "eject_replica") else deployment
        now = self.wall()
        serving = self._serving(deployment, target)
        allowed, reason = self.guard.check(action, target, list(self.history), now,
                                           serving=serving, dry_run=self.dry_run)
        if allowed and action in REMOVES_CAPACITY and "replica" in alert.labels:
            replicas = [r.replica_id for r in self.data.replicas(deployment) or []]
            peers = [(a.rule, a.labels.get("deployment", ""), a.labels.get("replica", ""))
                     for a in active if a.state in ("pending", "firing")]
            if deployment_wide(alert.rule, deployment, peers, replicas):
                allowed, reason = False, (
                    f"every replica of {deployment} has {alert.rule}: the deployment fails, "
                    f"not {target}; {action} would only remove capacity")
        if not allowed:
            outcome, detail = "refused", reason
        elif self.dry_run:
            outcome, detail = "dry_run", f"would {action} {target}"
        else:
            outcome, detail = await self._do(action, deployment, target, alert.rule)
        if allowed:
            self.history.append(PastAction(action, target, now, self.dry_run))
        record = {
            "action": action, "deployment": deployment, "target": target,
            "alert_fingerprint": alert.key, "rule": alert.rule, "at": now,
            "dry_run": self.dry_run, "outcome": outcome, "detail": detail,
        }
        self.recent.appendleft(record)
        self.metrics.actions.labels(action, outcome).inc()
        log.warning("automatic response %s on %s: %s (%s)", action, target, outcome, detail,
                    extra={"alert": alert.key, "rule": alert.rule})
        if self.db is not None:
            try:
                await asyncio.to_thread(self.db.add_action, record)
            except DatabaseUnavailable as exc:
                log.error("could not record action: %s", exc)
        return record

    def _serving(self, deployment: str, target: str) -> int:
        """What the guard counts as serving: the replicas in rotation and not ejected other
        than the target, plus the target (the guard takes it away). An ejected replica serves
        nothing — two of three restarted while the third was ejected left none — and
        restarting an ejected one takes nothing away."""
        replicas = self.data.replicas(deployment)
        if replicas is None:
            return 0
        return 1 + sum(1 for r in replicas if not r.ejected and r.replica_id != target)

    async def _do(self, action: str, deployment: str, target: str,
                  rule: str = "") -> tuple[str, str]:
        why = f"an automatic action on alert {rule}" if rule else "an automatic action"
        if action == "restart_replica":
            if self.supervisor is None or not self.supervisor.restart(target, why):
                return "failed", f"no running replica {target!r}"
            return "done", f"restarting {target}"
        if action == "eject_replica":
            if not self.data.eject(deployment, target, why):
                return "failed", f"cannot eject {target!r} (share limit or not in rotation)"
            return "done", f"ejected {target}"
        if action == "shed_batch":
            if not self.data.shed_batch(deployment, SHED_BATCH_S):
                return "failed", f"no deployment {deployment!r}"
            return "done", f"shedding batch traffic of {deployment} for {SHED_BATCH_S:.0f}s"
        if action == "rollback":
            # only the stored target changes here; the supervisor's loop does the rolling
            if self.supervisor is None or not self.supervisor.can_roll_back(deployment):
                return "skipped", (f"{deployment!r} has no rollout to roll back (none yet, or "
                                   "the last one already went back to the last good revision)")
            rolled = await self.supervisor.rollback(deployment)
            if rolled["state"] == "cancelled":
                return "started", (f"cancelled revision {rolled['revision']} of {deployment}; "
                                   f"going back to revision {rolled['good_revision']}")
            return "started", (f"rolling {deployment} back as revision {rolled['revision']} "
                               f"(the config of revision {rolled['previous_revision']})")
        if action == "serve_stale":
            why_not = self.data.serve_stale(deployment, SERVE_STALE_S)
            if why_not is not None:
                return "unavailable", why_not
            return "done", (f"answering {deployment}'s cacheable requests from stale entries "
                            f"(up to stale_if_error_s old) for {SERVE_STALE_S:.0f}s")
        if action == "scale_up":
            if self.supervisor is None:
                return "unavailable", "this gateway runs no control plane"
            return self.supervisor.autoscaler.boost(deployment, f"alert {rule}")
        return "failed", f"unknown action {action!r}"
