"""observe/alerting.py with a scripted database: steadyserve_database_up is absent until the
first check and goes down only after consecutive failures (DatabaseDown neither goes
pending at start nor flaps on one failed write), restored alerts are re-evaluated, restored
history (requests and latency, for the rules and the dashboard) is limited to configured
deployments and to its newest points within a bound, and silences are checked against the limits.
Time is a fake clock driving `step(now)`; the sampling loop is replaced by explicit samples."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import generate_latest

from steadyserve.config import AlertingConfig, Config, ConfigError, DeploymentConfig
from steadyserve.dashboard.data import history
from steadyserve.errors import ClientError, Conflict, PayloadTooLarge
from steadyserve.observe import alerting
from steadyserve.observe.alerting import AlertEngine, UpState
from steadyserve.observe.metrics import GatewayMetrics
from steadyserve.observe.restore import restore
from steadyserve.observe.sampler import sample_registry
from steadyserve.observe.timeseries import SeriesStore, labels_of
from steadyserve.policies.alert_lifecycle import AlertBook, RuleSpec
from steadyserve.policies.alert_rules import Evaluation
from steadyserve.store import Database, DatabaseUnavailable
from steadyserve.testing.clock import FakeClock

T0 = 1_700_000_000.0


class ScriptedDb:
    """The Database methods the engine calls; `fail` names the operations failing now."""

    def __init__(self, state: Any = None, points: list[Any] | None = None) -> None:
        self.state = state
        self.points = points or []
        self.fail: set[str] = set()
        self.calls: list[str] = []
        self.failed: list[str] = []
        self.ping_gate: threading.Event | None = None  # set: a ping that hangs until released

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            self.failed.append(name)
            raise DatabaseUnavailable(f"database {name} failed (scripted)")

    def get_state(self, key: str) -> Any:
        self._call("get_state")
        return self.state

    def series_points(self, name: str, since: float, until: float,
                      limit: int = 10_000) -> list[Any]:
        self._call("series_points")
        return sorted((p for p in self.points if p[0] == name and since <= p[2] < until),
                      key=lambda p: p[2])[:limit]

    def series_start(self, name: str, since: float, until: float, rows: int) -> float:
        self._call("series_start")
        times = sorted((p[2] for p in self.points if p[0] == name and since <= p[2] < until),
                       reverse=True)
        return times[rows - 1] if len(times) >= rows else since

    def ping(self) -> None:
        if self.ping_gate is not None:
            self.ping_gate.wait(10)
        self._call("ping")

    def put_state(self, key: str, obj: Any, fence: Any = None) -> None:
        self._call("put_state")
        self.state = obj

    def add_series_points(self, rows: list[Any]) -> int:
        self._call("add_series_points")
        return len(rows)

    def prune(self, older_than_t: float) -> dict[str, int]:
        self._call("prune")
        return {}

    def add_transitions(self, rows: list[Any]) -> int:
        self._call("add_transitions")
        return len(rows)


def make_engine(db: ScriptedDb | None, clock: FakeClock, **alerting_kw: Any) -> AlertEngine:
    config = Config(deployments=(DeploymentConfig(name="a", service="tests:Echo"),),
                    alerting=AlertingConfig(**alerting_kw))
    return AlertEngine(config, GatewayMetrics(), db, wall=clock)  # type: ignore[arg-type]


def database_down(engine: AlertEngine) -> str | None:
    alert = next((a for a in engine.book.alerts() if a.rule == "DatabaseDown"), None)
    return None if alert is None else alert.state


async def run(engine: AlertEngine, clock: FakeClock, seconds: int,
              each: Callable[[int], None] = lambda s: None) -> list[str | None]:
    """Sample every second and evaluate every 5 s, as the loops do; DatabaseDown's state
    after each evaluation."""
    states = []
    for s in range(1, seconds + 1):
        clock.advance(1.0)
        each(s)
        sample_registry(engine.metrics.registry, engine.store, clock())
        if s % 5 == 0:
            await engine.step(clock())
            states.append(database_down(engine))
    return states


@pytest.mark.parametrize(
    ("results", "want_up"),
    [
        ([], None),
        ([False], None),  # unknown stays unknown until down_after failures
        ([False, False], None),
        ([False, False, False], False),
        ([True], True),
        ([True, False], True),
        ([True, False, False], True),
        ([True, False, False, False], False),
        ([True, False, False, True, False, False], True),  # a success resets the count
        ([True, False, False, False, True], True),
    ],
)
def test_up_state_from_consecutive_checks(results, want_up):
    state = UpState()
    for ok in results:
        state = state.after(ok, down_after=3)
    assert state.up is want_up


async def test_the_database_gauge_is_absent_until_the_first_check():
    clock = FakeClock(T0)
    engine = make_engine(ScriptedDb(), clock)
    assert b"steadyserve_database_up" not in generate_latest(engine.metrics.registry)
    sample_registry(engine.metrics.registry, engine.store, clock())
    assert engine.store.keys("steadyserve_database_up") == []
    await engine._restore()  # the first check: the restore's reads answered
    assert b"steadyserve_database_up 1.0" in generate_latest(engine.metrics.registry)
    assert await run(engine, clock, 60) == [None] * 12


async def test_without_a_database_the_gauge_never_appears():
    clock = FakeClock(T0)
    engine = make_engine(None, clock)
    await engine._restore()
    assert await run(engine, clock, 30) == [None] * 6
    assert b"steadyserve_database_up" not in generate_latest(engine.metrics.registry)


async def test_one_failed_write_or_ping_does_not_make_the_database_down():
    clock = FakeClock(T0)
    db = ScriptedDb()
    engine = make_engine(db, clock)
    await engine._restore()

    def flaky(s: int) -> None:
        # every minute's persist (at 5 s past) meets a lock in its prune; pings fail now and
        # then, once right after a failed prune (two failed checks in a row)
        db.fail = {"prune"} if s % 60 == 5 else {"ping"} if s % 30 == 10 else set()

    states = await run(engine, clock, 600, flaky)
    assert states == [None] * 120
    assert engine.metrics.database_up.value == 1
    assert db.failed.count("prune") == 10 and db.failed.count("ping") == 20


async def test_consecutive_failures_page_and_recovery_resolves():
    clock = FakeClock(T0)
    db = ScriptedDb()
    engine = make_engine(db, clock)
    await engine._restore()
    await run(engine, clock, 10)
    db.fail = {"ping", "put_state", "prune", "add_series_points", "add_transitions"}
    states = await run(engine, clock, 60)
    # the third failed check (at 15 s, after that evaluation) sets 0; the next evaluation
    # sees it: pending for for_s = 30 s, then firing
    assert states == [None, None, None, "pending", "pending", "pending", "pending", "pending",
                      "pending", "firing", "firing", "firing"]
    assert engine.metrics.database_up.value == 0
    db.fail = set()
    assert (await run(engine, clock, 10))[-1] == "resolved"
    assert engine.metrics.database_up.value == 1


async def test_a_hanging_ping_fails_the_check_without_queueing_another(monkeypatch):
    monkeypatch.setattr(alerting, "PING_TIMEOUT_S", 0.05)
    clock = FakeClock(T0)
    db = ScriptedDb()
    engine = make_engine(db, clock)
    await engine._restore()
    engine._last_persist = clock()  # the next steps ping instead of persisting
    db.ping_gate = threading.Event()
    try:
        assert await engine._ping_db() is False
        assert await engine._ping_db() is False  # the first is still hanging: not sent again
    finally:
        db.ping_gate.set()
    await engine._ping  # type: ignore[misc]
    assert db.calls.count("ping") == 1
    db.ping_gate = None
    assert await engine._ping_db() is True


async def test_a_restored_firing_alert_not_confirmed_resolves_at_the_first_evaluation():
    clock = FakeClock(T0)
    # before the restart: an ErrorBudgetBurn page for a deployment that no longer exists,
    # and a DeploymentNotReady for one that is fine now
    old = AlertBook([RuleSpec(name="ErrorBudgetBurn"), RuleSpec(name="DeploymentNotReady")])
    old.step({"ErrorBudgetBurn": [Evaluation({"deployment": "-", "severity": "page"}, True, 1e3, "")],
              "DeploymentNotReady": [Evaluation({"deployment": "a", "state": "ready"}, True, 0, "")]},
             T0 - 100)
    points = [("steadyserve_requests_total", {"deployment": d, "handler": "h", "code": "5xx"},
               T0 - 600, 50.0) for d in ("-", "a", "retired")]
    engine = make_engine(ScriptedDb(old.to_dict(), points), clock)
    await engine._restore()
    assert [a.state for a in engine.book.alerts()] == ["firing", "firing"]
    # only the configured deployment's history comes back
    assert [dict(k)["deployment"] for k in engine.store.keys("steadyserve_requests_total")] == ["a"]
    engine.metrics.replicas.labels("a", "ready").set(1)
    clock.advance(5)
    sample_registry(engine.metrics.registry, engine.store, clock())
    await engine.step(clock())
    assert {a.rule: (a.state, a.description.split(":")[0]) for a in engine.book.alerts()} == {
        "ErrorBudgetBurn": ("resolved", "not confirmed by the first evaluation after a restart"),
        "DeploymentNotReady": ("resolved", "not confirmed by the first evaluation after a restart"),
    }


def test_silences_are_checked_against_the_configured_limits():
    clock = FakeClock(T0)
    engine = make_engine(None, clock, max_silences=2, max_silence_bytes=300, min_silence_s=60,
                         max_silence_s=3600)
    cases: list[tuple[dict[str, Any], type[Exception], str | None]] = [
        ({"matchers": {"": ""}, "duration_s": 600}, ClientError, "matchers"),
        ({"matchers": {"deployment": ""}, "duration_s": 600}, ClientError, "matchers"),
        ({"matchers": {"a": "b"}, "duration_s": 1e-9}, ClientError, "duration_s"),
        ({"matchers": {"a": "b"}, "duration_s": 7200}, ClientError, "duration_s"),
        ({"matchers": {"a": "b"}, "duration_s": 600, "comment": 5}, ClientError, "comment"),
        ({"matchers": {"a": "b"}, "duration_s": 600, "comment": "x" * 400}, PayloadTooLarge, None),
    ]
    for body, error, param in cases:
        with pytest.raises(error) as caught:
            engine.add_silence(body["matchers"], body["duration_s"], "ops", body.get("comment", ""))
        assert caught.type is error and caught.value.param == param, body
    assert ClientError(".").status == 400 and PayloadTooLarge(".").status == 413
    engine.add_silence({"a": "b"}, 600)
    everything = engine.add_silence({}, 600, "ops", "maintenance", True)
    assert everything.match_all and everything.ends_at == T0 + 600
    with pytest.raises(Conflict) as caught:
        engine.add_silence({"a": "c"}, 600)
    assert caught.value.status == 409
    assert len(engine.status()["silences"]) == 2


class Lead:
    """Who has the alerting duty, set by the test ([cluster])."""

    clustered = True

    def __init__(self, on_duty: bool) -> None:
        self.on_duty = on_duty

    def alerting(self) -> bool:
        return self.on_duty

    def fence(self) -> tuple[str, str, int]:
        return ("leader", "x", 1)


async def test_a_new_leader_reads_the_book_and_does_not_notify_a_notified_alert_again():
    """Two gateways, one database: the leader notifies DeploymentNotReady and stores its book
    at once; the follower evaluates nothing; when the duty moves, the follower reads the book
    first, confirms the alert, and tells nobody again."""
    clock = FakeClock(T0)
    db = ScriptedDb()
    a = make_engine(db, clock, not_ready_for_s=0)
    b = make_engine(db, clock, not_ready_for_s=0)
    a.lead, b.lead = Lead(True), Lead(False)
    for engine in (a, b):
        engine.metrics.replicas.labels("a", "ready").set(0)
    told = {id(a): 0, id(b): 0}
    for _ in range(3):
        clock.advance(5.0)
        for engine in (a, b):
            sample_registry(engine.metrics.registry, engine.store, clock())
            before = engine.metrics.notifications._value.get()
            await engine.tick(clock())
            told[id(engine)] += engine.metrics.notifications._value.get() - before
    assert told == {id(a): 1, id(b): 0}
    assert [x.rule for x in a.book.alerts("firing")] == ["DeploymentNotReady"]
    assert b.book.alerts("firing") == []  # never evaluated
    assert db.state is not None and "put_state" in db.calls  # stored right after notifying

    a.lead.on_duty, b.lead.on_duty = False, True  # the lease moved
    for _ in range(3):
        clock.advance(5.0)
        sample_registry(b.metrics.registry, b.store, clock())
        before = b.metrics.notifications._value.get()
        await b.tick(clock())
        told[id(b)] += b.metrics.notifications._value.get() - before
    assert [x.rule for x in b.book.alerts("firing")] == ["DeploymentNotReady"]
    assert told == {id(a): 1, id(b): 0}


def three_hours_of_history(now: float) -> list[Any]:
    """Per-minute points as the engine persists them: requests (1/s) and the latency
    histogram (every answer under 100 ms) of `a`, and the same of a retired deployment."""
    points: list[Any] = []
    for m in range(180):
        t, n = now - 3 * 3600 + 60 * m + 30, 60.0 * (m + 1)
        for d in ("a", "retired"):
            points.append((REQUESTS, {"deployment": d, "handler": "h", "code": "2xx"}, t, n))
            points += [(BUCKETS, {"deployment": d, "handler": "h", "le": le}, t, n)
                       for le in ("0.1", "+Inf")]
    return points


REQUESTS = "steadyserve_requests_total"
BUCKETS = "steadyserve_request_duration_seconds_bucket"


async def test_a_restart_restores_request_and_latency_history_for_the_dashboard():
    clock = FakeClock(T0)
    engine = make_engine(ScriptedDb(None, three_hours_of_history(T0)), clock)
    await engine._restore()
    assert {dict(k)["deployment"] for k in engine.store.keys(BUCKETS)} == {"a"}
    rows = history(engine.store, clock(), 180)["a"]
    assert len(rows) == 179  # every minute but the first (the restored points' baseline)
    assert all(r[1:3] == [1.0, 0.0] for r in rows)
    assert all(r[3:] == [50.0, 95.0, 99.0] for r in rows)  # ms, linear in (0, 100 ms]


@pytest.mark.parametrize(
    ("max_points", "restored_minutes"),
    [
        pytest.param(400_000, 179, id="default-all-three-hours"),
        # the bound counts points read (the retired deployment's too), names in order: the
        # requests' newest 120 points (one hour of two deployments), no latency buckets
        pytest.param(120, 59, id="bounded-newest-hour"),
        pytest.param(0, 0, id="off"),
    ],
)
async def test_the_engine_restores_at_most_history_restore_max_points(max_points,
                                                                      restored_minutes):
    clock = FakeClock(T0)
    engine = make_engine(ScriptedDb(None, three_hours_of_history(T0)), clock,
                         history_restore_max_points=max_points)
    await engine._restore()
    rows = history(engine.store, clock(), 180).get("a", [])
    assert sum(1 for r in rows if r[1] is not None) == restored_minutes
    # off or not, the alert book was read: the database is up
    assert b"steadyserve_database_up 1.0" in generate_latest(engine.metrics.registry)


def test_history_restore_max_points_is_bounded():
    with pytest.raises(ConfigError, match="history_restore_max_points"):
        AlertingConfig(history_restore_max_points=-1)
    with pytest.raises(ConfigError, match="history_restore_max_points"):
        AlertingConfig(history_restore_max_points=10_000_001)


def test_the_restore_reads_the_newest_points_within_its_bound():
    points = [p for p in three_hours_of_history(T0) if p[1]["deployment"] == "a"]
    db = ScriptedDb(None, points)
    store = SeriesStore()
    got = restore(db, store, {"a"}, T0, max_rows=400, page_rows=40)
    # requests first (180 points), then the newest 220 bucket points: 110 minutes of 2 series
    assert got == {REQUESTS: 180, BUCKETS: 220}
    newest = max(p[2] for p in points)
    assert store.latest_sample((BUCKETS, labels_of({"deployment": "a", "handler": "h",
                                                    "le": "+Inf"})))[0] == newest
    assert store.tier_lengths((BUCKETS, labels_of({"deployment": "a", "handler": "h",
                                                   "le": "0.1"})))[1] == 110
    assert restore(ScriptedDb(None, points), SeriesStore(), {"a"}, T0, max_rows=100,
                   page_rows=40) == {REQUESTS: 100, BUCKETS: 0}


async def test_latency_history_survives_a_restart_through_a_real_database(tmp_path):
    """The whole path on SQLite: sampled each second, persisted per minute, read back by the
    next process's engine, and drawn by the dashboard's history."""
    clock = FakeClock(T0)
    db = Database(f"sqlite:///{tmp_path}/state.db")
    try:
        first = make_engine(db, clock)  # type: ignore[arg-type]
        await first._restore()
        for _ in range(200):  # 10 answers a second: 9 in 10-25 ms, 1 in 0.5-1 s
            clock.advance(1.0)
            first.metrics.requests.labels("a", "h", "2xx").inc(10)
            for i in range(10):
                first.metrics.duration.labels("a", "h").observe(0.8 if i == 0 else 0.02)
            sample_registry(first.metrics.registry, first.store, clock())
        await first.stop()  # persists the last points

        second = make_engine(db, clock)  # type: ignore[arg-type]
        await second._restore()
        rows = history(second.store, clock(), 60)["a"]
        full = [r for r in rows if r[0] <= T0 + 180]  # minutes sampled from start to end
        assert len(full) == 2  # (the first restored minute is the baseline)
        # the stop wrote the minute in progress too (T0 + 200: in the step the history
        # leaves out until it is over)
        key = (BUCKETS, labels_of({"deployment": "a", "handler": "h", "le": "+Inf"}))
        assert second.store.latest_sample(key) == (T0 + 200, 2000.0)
        for _, rps, errors, p50, _p95, p99 in full:
            assert (rps, errors) == (10.0, 0.0)
            assert 10.0 < p50 < 25.0 and 500.0 < p99 <= 1000.0
    finally:
        db.close()
