"""The alerting engine (a gateway background loop): sample → evaluate → lifecycle → store,
notify and respond. Survives a restart: the alert book, silences, and downsampled history
are in the database (SQLite by default, PostgreSQL by URL). Every iteration catches and logs
its own errors; a database outage degrades to memory only (and fires DatabaseDown).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from ..config import Config
from ..policies.alert_lifecycle import AlertBook, NotifyPolicy, Silence
from ..policies.alert_rules import Rule, evaluate_all
from ..store import Database, DatabaseUnavailable
from .default_rules import INHIBITS, RULE_ACTIONS, default_rules
from .metrics import GatewayMetrics
from .notifiers import AlertmanagerNotifier, DeliveryQueue, LogNotifier, Notifier, WebhookNotifier
from .sampler import LoopLagMonitor, sample_registry
from .timeseries import SeriesStore, labels_of

log = logging.getLogger("steadyserve.alerting")

STATE_KEY = "alertbook"
REQUESTS_TOTAL = "steadyserve_requests_total"
PERSIST_EVERY_S = 60.0
HISTORY_S = 3 * 86_400.0


class AlertEngine:
    def __init__(self, config: Config, metrics: GatewayMetrics, db: Database | None,
                 responder: Any = None, *, before_sample: Callable[[], None] | None = None,
                 wall: Callable[[], float] = time.time, rules: list[Rule] | None = None) -> None:
        self.cfg = config.alerting
        self.metrics = metrics
        self.db = db
        self.responder = responder
        self.before_sample = before_sample
        self.wall = wall
        self.store = SeriesStore()
        self.rules = rules if rules is not None else default_rules(self.cfg)
        self.actions = {**RULE_ACTIONS, **dict(self.cfg.actions)}
        self.book = AlertBook(self.rules, NotifyPolicy(inhibit=INHIBITS))
        notifiers: list[Notifier] = [LogNotifier()]
        notifiers += [WebhookNotifier(url, external_url=self.cfg.external_url,
                                      name=f"webhook-{i}")
                      for i, url in enumerate(self.cfg.webhook_urls)]
        if self.cfg.alertmanager_url:
            notifiers.append(AlertmanagerNotifier(self.cfg.alertmanager_url,
                                                  generator_url=self.cfg.external_url))
        self.queue = DeliveryQueue(notifiers)
        self.lag = LoopLagMonitor()
        self._last_persist = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    # lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._restore()
        loop = asyncio.get_running_loop()
        for coro, name in ((self.queue.run(), "notify"), (self.lag.run(), "loop-lag"),
                           (self._sample_loop(), "sample"), (self._evaluate_loop(), "evaluate")):
            self._tasks.append(loop.create_task(coro, name=f"alerting-{name}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.queue.close(2.0)
        await self._persist(self.wall(), force=True)

    async def _restore(self) -> None:
        """The alert book and the long-window history (for SLO burn rates) from the database."""
        if self.db is None:
            return
        now = self.wall()
        state = await self._db(self.db.get_state, STATE_KEY)
        # the last day of the request counters: the burn-rate windows that matter most
        points = await self._db(self.db.series_points, REQUESTS_TOTAL, now - 86_400.0, now)
        if state is _FAILED or points is _FAILED:
            self._ping_ok(False)
            return
        if state:
            try:
                self.book = AlertBook.from_dict(state, self.rules, NotifyPolicy(inhibit=INHIBITS))
                log.info("alert state restored: %d alerts", len(self.book.alerts()))
            except (KeyError, TypeError, ValueError) as exc:
                log.error("stored alert state unreadable, starting fresh: %s", exc)
        if points:
            self.store.load((n, labels_of(labels), t, v) for n, labels, t, v in points)

    # loops ------------------------------------------------------------------------------------
    async def _sample_loop(self) -> None:
        while True:
            try:
                self.metrics.loop_lag.set(self.lag.take())
                if self.before_sample is not None:
                    self.before_sample()
                sample_registry(self.metrics.registry, self.store, self.wall())
            except Exception:
                log.exception("sampling failed; continuing")
            await asyncio.sleep(1.0)

    async def _evaluate_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.evaluation_interval_s)
            try:
                await self.step(self.wall())
            except Exception:
                log.exception("alert evaluation failed; continuing")

    async def step(self, now: float) -> None:
        result = self.book.step(evaluate_all(self.rules, self.store, now), now)
        firing = self.book.alerts("firing")
        for severity in ("page", "ticket", "info"):
            self.metrics.alerts_firing.labels(severity).set(
                sum(1 for a in firing if a.severity == severity))
        for t in result.transitions:
            log.info("alert %s: %s → %s", t.alert_key, t.from_state, t.to_state,
                     extra={"rule": t.rule, "value": t.value})
        for n in result.notifications:
            self.metrics.notifications.inc()
            self.queue.submit(n.to_message())
        if result.transitions and self.db is not None:
            rows = [{"rule": t.rule, "labels": t.labels, "fingerprint": t.alert_key,
                     "from_state": t.from_state, "to_state": t.to_state, "at": t.at,
                     "value": t.value, "description": t.description,
                     "severity": t.labels.get("severity", "")} for t in result.transitions]
            await self._db(self.db.add_transitions, rows)
        if self.responder is not None:
            for t in result.transitions:
                actions = self.actions.get(t.rule)
                alert = self.book.get(t.alert_key)
                if t.to_state == "firing" and actions and alert is not None:
                    await self.responder.respond(alert, actions)
        await self._persist(now)

    async def _persist(self, now: float, force: bool = False) -> None:
        """Every evaluation: a cheap ping (DatabaseDown). Every minute: the alert book and
        the finished coarse points of history, then pruning past the retention."""
        if self.db is None:
            return
        if not force and now - self._last_persist < PERSIST_EVERY_S:
            self._ping_ok(await self._db(self.db.ping) is not _FAILED)
            return
        self._last_persist = now
        ok = await self._db(self.db.put_state, STATE_KEY, self.book.to_dict()) is not _FAILED
        points = self.store.snapshot_for_persistence(now)
        if ok and points:
            rows = [(n, dict(labels), t, v) for n, labels, t, v in points]
            ok = await self._db(self.db.add_series_points, rows) is not _FAILED
        if ok:
            ok = await self._db(self.db.prune, now - HISTORY_S) is not _FAILED
        self._ping_ok(ok)

    def _ping_ok(self, ok: bool) -> None:
        self.metrics.database_up.set(1 if ok else 0)

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except DatabaseUnavailable as exc:
            log.error("database unavailable: %s", exc)
            return _FAILED

    # API --------------------------------------------------------------------------------------
    def add_silence(self, matchers: dict[str, str], duration_s: float, created_by: str,
                    comment: str) -> Silence:
        now = self.wall()
        silence = Silence(uuid.uuid4().hex[:12], dict(matchers), now, now + duration_s,
                          created_by, comment)
        self.book.add_silence(silence)
        return silence

    def status(self) -> dict[str, Any]:
        now = self.wall()
        return {
            "alerts": [a.to_dict() for a in self.book.alerts("pending", "firing")],
            "silences": [s.to_dict() for s in self.book.silences(now)],
            "notifications": self.queue.stats(),
            "actions": list(self.responder.recent) if self.responder is not None else [],
        }


_FAILED = object()
