"""The alerting engine (a gateway background loop): sample → evaluate → lifecycle → store,
notify and respond. Survives a restart: the alert book, silences, and downsampled history
are in the database (SQLite by default, PostgreSQL by URL); restored alerts are confirmed
or resolved by the first evaluation (policies/alert_lifecycle.py). Every iteration catches
and logs its own errors; a database outage degrades to memory only (and fires DatabaseDown).

Whether the database is up (`steadyserve_database_up`) is read from consecutive checks
(`UpState`): unknown, so absent from /metrics, until the first result; down only after
`DOWN_AFTER_FAILURES` failed checks in a row. Why: one failed write (a prune or a
persist meeting SQLite's busy timeout while other writers hold the lock under load) used
to set the gauge to 0 until the next ping, and the gauge read 0 before the first ping, so
DatabaseDown went pending at every start and flapped under load. The engine's database
calls also run on threads of their own, not the default pool that every `to_thread` in the
gateway shares: writes one at a time on one thread (they no longer contend with each other
for SQLite's lock), pings on another (a long prune never makes a ping late), and a ping
still unanswered counts as a failed check instead of queueing another behind it.

Several gateways ([cluster]): only the one with the alerting duty evaluates, notifies and
responds (`lead.alerting()`: the leader, or the last leader while the database is out of
reach, so DatabaseDown is still told, once). The others keep sampling their own series.
The book is stored (fenced) right after every evaluation that changed or notified
anything, and a gateway that takes the duty over reads it back first: an alert already
notified is not notified again by the new leader.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..errors import ClientError, Conflict, PayloadTooLarge
from ..policies.alert_lifecycle import (
    Alert,
    AlertBook,
    NotifyPolicy,
    Silence,
    SilenceLimits,
    SilenceRefused,
    check_duration,
    check_matchers,
    check_text,
)
from ..policies.alert_rules import SEVERITIES, Rule, evaluate_all
from ..policies.lease import Alone, Lead
from ..store import Database, DatabaseUnavailable, Fenced
from ..tasks import consume_outcome
from .default_rules import INHIBITS, RULE_ACTIONS, default_rules
from .metrics import GatewayMetrics
from .notifiers import AlertmanagerNotifier, DeliveryQueue, LogNotifier, Notifier, WebhookNotifier
from .restore import restore
from .sampler import LoopLagMonitor, sample_registry
from .timeseries import SeriesStore

log = logging.getLogger("steadyserve.alerting")

STATE_KEY = "alertbook"
PERSIST_EVERY_S = 60.0
HISTORY_S = 3 * 86_400.0
DOWN_AFTER_FAILURES = 3  # with checks every evaluation_interval_s (5 s): down after ~15 s
PING_TIMEOUT_S = 10.0

_REFUSED: dict[str, type[ClientError]] = {
    "invalid": ClientError, "too_large": PayloadTooLarge, "too_many": Conflict,
}


@dataclass(frozen=True, slots=True)
class UpState:
    """Whether a dependency is up, from its checks in a row: `up` is None (unknown) until
    the first result, True after any success, False only after `down_after` failures in a
    row (a failure before then leaves it as it was)."""

    up: bool | None = None
    failures: int = 0  # consecutive failed checks

    def after(self, ok: bool, down_after: int = DOWN_AFTER_FAILURES) -> UpState:
        if ok:
            return UpState(True, 0)
        failures = self.failures + 1
        return UpState(False if failures >= down_after else self.up, failures)


class AlertEngine:
    def __init__(self, config: Config, metrics: GatewayMetrics, db: Database | None,
                 responder: Any = None, *, before_sample: Callable[[], None] | None = None,
                 wall: Callable[[], float] = time.time, rules: list[Rule] | None = None) -> None:
        self.cfg = config.alerting
        self.deployments = frozenset(d.name for d in config.deployments)
        self.metrics = metrics
        self.db = db
        self.responder = responder
        self.before_sample = before_sample
        self.wall = wall
        self.store = SeriesStore()
        self.rules = rules if rules is not None else list(default_rules(self.cfg))
        self.actions = {**RULE_ACTIONS, **dict(self.cfg.actions)}
        self.silence_limits = SilenceLimits(
            max_active=self.cfg.max_silences, max_bytes=self.cfg.max_silence_bytes,
            min_s=self.cfg.min_silence_s, max_s=self.cfg.max_silence_s)
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
        for severity in SEVERITIES:  # 0 from the start, not from the first evaluation
            metrics.alerts_firing.labels(severity).set(0)
        self.db_state = UpState()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="steadyserve-alert-db")
        self._pinger = ThreadPoolExecutor(1, thread_name_prefix="steadyserve-db-ping")
        self._ping: asyncio.Future[Any] | None = None
        self._last_persist = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self.lead: Lead = Alone()
        # what the sampler reads: this process's registry, or (data-plane workers) the sum
        # of its families and the workers' (observe.aggregate.summed_registry)
        self.samples: Callable[[], Any] = lambda: metrics.registry
        self._on_duty = True  # whether the last evaluation tick had the alerting duty

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
        if self.lead.alerting():  # a follower's book is not the one to keep
            await self._persist(self.wall(), force=True, final=True)
        self._writer.shutdown(wait=False)
        self._pinger.shutdown(wait=False)

    async def _restore(self) -> None:
        """The alert book (silences bounded as on creation) and the history of the
        configured deployments' requests and latency (SLO burn rates, the dashboard's
        charts; observe.restore, bounded) from the database. Before the loops start: the
        store is loaded on the database thread while nothing else reads it."""
        if self.db is None:
            return
        now = self.wall()
        state = await self._db(self.db.get_state, STATE_KEY)
        loaded = _FAILED if state is _FAILED else {} if not self.cfg.history_restore_max_points \
            else await self._db(restore, self.db, self.store, self.deployments, now,
                                self.cfg.history_restore_max_points)
        if loaded is _FAILED:
            self._checked(False)
            return
        self._checked(True)
        self._load_book(state, now)
        if loaded:
            log.info("history restored: %s",
                     ", ".join(f"{n} {c} points" for n, c in loaded.items()))
        else:
            log.info("history not restored: [alerting] history_restore_max_points = 0")

    async def _take_over(self) -> None:
        """This gateway has the alerting duty now: the book as the last one stored it."""
        if self.db is None:
            return
        state = await self._db(self.db.get_state, STATE_KEY)
        if state is _FAILED:
            self._checked(False)
            return
        self._load_book(state, self.wall())

    def _load_book(self, state: Any, now: float) -> None:
        if state:
            try:
                self.book = AlertBook.from_dict(state, self.rules, NotifyPolicy(inhibit=INHIBITS),
                                                silence_limits=self.silence_limits, now=now)
                log.info("alert state restored: %d alerts (each re-evaluated before it stays "
                         "firing), %d silences", len(self.book.alerts()),
                         len(self.book.silences()))
            except (KeyError, TypeError, ValueError) as exc:
                log.error("stored alert state unreadable, starting fresh: %s", exc)

    # loops ------------------------------------------------------------------------------------
    async def _sample_loop(self) -> None:
        while True:
            try:
                self.metrics.loop_lag.set(self.lag.take())
                if self.before_sample is not None:
                    self.before_sample()
                sample_registry(self.samples(), self.store, self.wall())
            except Exception:
                log.exception("sampling failed; continuing")
            await asyncio.sleep(1.0)

    async def _evaluate_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.evaluation_interval_s)
            try:
                await self.tick(self.wall())
            except Exception:
                log.exception("alert evaluation failed; continuing")

    async def tick(self, now: float) -> None:
        """One evaluation, if this gateway has the alerting duty ([cluster]); one that just
        took it over reads the stored book first."""
        on_duty = self.lead.alerting()
        if on_duty and not self._on_duty:
            log.info("taking over alert evaluation and notification")
            await self._take_over()
        self._on_duty = on_duty
        if on_duty:
            await self.step(now)

    async def step(self, now: float) -> None:
        result = self.book.step(evaluate_all(self.rules, self.store, now), now)
        firing = self.book.alerts("firing")
        for severity in SEVERITIES:
            self.metrics.alerts_firing.labels(severity).set(
                sum(1 for a in firing if a.severity == severity))
        for t in result.transitions:
            log.info("alert %s: %s → %s", t.alert_key, t.from_state, t.to_state,
                     extra={"rule": t.rule, "value": t.value, "description": t.description})
        for n in result.notifications:
            self.metrics.notifications.inc()
            self.queue.submit(n.to_message())
        if result.transitions and self.db is not None:
            rows = [{"rule": t.rule, "labels": t.labels, "fingerprint": t.alert_key,
                     "from_state": t.from_state, "to_state": t.to_state, "at": t.at,
                     "value": t.value, "description": t.description,
                     "severity": t.labels.get("severity", "")} for t in result.transitions]
            await self._db(self.db.add_transitions, rows)
        if (result.transitions or result.notifications) and self.lead.clustered:
            # the next leader must know what was told: store the book now, not in a minute
            await self.store_book()
        if self.responder is not None:
            active: list[Alert] | None = None  # read once, and only when something fires
            for t in result.transitions:
                actions = self.actions.get(t.rule)
                alert = self.book.get(t.alert_key)
                if t.to_state == "firing" and actions and alert is not None:
                    if active is None:
                        active = self.book.alerts("pending", "firing")
                    await self.responder.respond(alert, actions, active)
        await self._persist(now)

    async def _persist(self, now: float, force: bool = False, final: bool = False) -> None:
        """Every evaluation: a ping. Every minute: the alert book and the finished coarse
        points of history (at the `final` one, when the gateway stops, the minute in
        progress too), then pruning past the retention. Each is a check of the database
        (`_checked`)."""
        if self.db is None:
            return
        if not force and now - self._last_persist < PERSIST_EVERY_S:
            self._checked(await self._ping_db())
            return
        self._last_persist = now
        ok = await self.store_book()
        points = self.store.snapshot_for_persistence(now, final=final)
        if ok and points:
            rows = [(n, dict(labels), t, v) for n, labels, t, v in points]
            ok = await self._db(self.db.add_series_points, rows) is not _FAILED
        if ok:
            ok = await self._db(self.db.prune, now - HISTORY_S) is not _FAILED
        self._checked(ok)

    async def store_book(self) -> bool:
        """Store the book (fenced with [cluster]); False if the database failed."""
        assert self.db is not None
        try:
            return await self._db(self.db.put_state, STATE_KEY, self.book.to_dict(),
                                  self.lead.fence()) is not _FAILED
        except Fenced as exc:
            log.warning("alert book not stored: this gateway no longer leads (%s)", exc)
            return True  # the database answered

    def _checked(self, ok: bool) -> None:
        before = self.db_state.up
        self.db_state = self.db_state.after(ok)
        if self.db_state.up is None:
            return  # not known yet: no sample, so DatabaseDown has nothing to fire on
        self.metrics.database_up.set(1 if self.db_state.up else 0)
        if self.db_state.up != before:
            log.warning("state database is %s", "up" if self.db_state.up else
                        f"down ({self.db_state.failures} failed checks in a row)")

    async def _ping_db(self) -> bool:
        assert self.db is not None
        if self._ping is not None and not self._ping.done():
            return False  # the last ping is still hanging: a failed check, and no pile-up
        loop = asyncio.get_running_loop()
        ping = self._ping = loop.run_in_executor(self._pinger, self.db.ping)
        ping.add_done_callback(consume_outcome)
        try:
            await asyncio.wait_for(asyncio.shield(ping), PING_TIMEOUT_S)
        except TimeoutError:
            log.error("database ping did not answer within %.0f s", PING_TIMEOUT_S)
            return False
        except DatabaseUnavailable as exc:
            log.error("database unavailable: %s", exc)
            return False
        return True

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the engine's database thread; _FAILED if the database failed."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._writer, functools.partial(fn, *args))
        except DatabaseUnavailable as exc:
            log.error("database unavailable: %s", exc)
            return _FAILED

    # API --------------------------------------------------------------------------------------
    def add_silence(self, matchers: object, duration_s: object, created_by: object = "api",
                    comment: object = "", match_all: object = False) -> Silence:
        """A silence from what a client sent, checked against [alerting]'s limits: ClientError
        (400, naming the field), PayloadTooLarge (413) or Conflict (409, too many active)."""
        now = self.wall()
        try:
            checked = check_matchers(matchers, match_all)
            seconds = check_duration(duration_s, self.silence_limits)
            silence = Silence(uuid.uuid4().hex[:12], checked, now, now + seconds,
                              check_text(created_by, "created_by"), check_text(comment, "comment"),
                              match_all is True)
            self.book.add_silence(silence, self.silence_limits)
        except SilenceRefused as exc:
            raise _REFUSED[exc.kind](exc.message, param=exc.param) from exc
        return silence

    def status(self) -> dict[str, Any]:
        now = self.wall()
        return {
            # [cluster]: only the gateway with the alerting duty evaluates; another's book
            # is the one it last read
            "evaluated_here": self.lead.alerting(),
            "alerts": [a.to_dict() for a in self.book.alerts("pending", "firing")],
            # restored after a restart, not yet re-evaluated (see AlertBook.unconfirmed)
            "unconfirmed": self.book.unconfirmed(),
            "silences": [s.to_dict() for s in self.book.silences(now)],
            "notifications": self.queue.stats(),
            "actions": list(self.responder.recent) if self.responder is not None else [],
        }


_FAILED = object()
