"""store/database.py against real databases: a SQLite file, and PostgreSQL at 127.0.0.1:5432.

PostgreSQL runs in a fresh schema per test (search_path), dropped afterwards, so parallel runs
do not collide. Without PostgreSQL those cases skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from steadyserve.errors import ConfigError, SteadyError
from steadyserve.store import SCHEMA_VERSION, Database, DatabaseUnavailable
from steadyserve.store.database import MAX_ROWS

from .conftest import connect_pg_admin

Opener = Callable[[], Database]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'steadyserve.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def open_db(db_url: str) -> Iterator[Opener]:
    """Opens Databases on the test's URL (several: a restart is a close and a reopen)."""
    opened: list[Database] = []

    def opener() -> Database:
        db = Database(db_url, connect_timeout_s=3)
        opened.append(db)
        return db

    yield opener
    for db in opened:
        db.close()


T0 = 1_714_564_800.0


def transition(i: int, rule: str = "HighErrorRate", at: float | None = None) -> dict[str, object]:
    return {
        "rule": rule,
        "labels": {"alertname": rule, "deployment": "embed", "replica": f"r{i}"},
        "fingerprint": f"fp{i}",
        "from_state": "pending",
        "to_state": "firing",
        "at": T0 + i if at is None else at,
        "value": 0.07 + i,
        "description": "errors above 5%",
        "severity": "page",
    }


# ---- round trips ----

def test_schema_is_stamped(open_db: Opener) -> None:
    db = open_db()
    assert db.schema_version() == SCHEMA_VERSION
    db.ping()


def test_transitions_round_trip(open_db: Opener) -> None:
    db = open_db()
    assert db.add_transitions([transition(i) for i in range(5)]) == 5
    assert db.add_transitions([transition(9, rule="ReplicaDown")]) == 1
    assert db.add_transitions([]) == 0

    recent = db.recent_transitions()
    assert [r["fingerprint"] for r in recent] == ["fp9", "fp4", "fp3", "fp2", "fp1", "fp0"]
    first = recent[-1]
    expected = transition(0)
    assert {k: first[k] for k in expected} == expected
    assert isinstance(first["id"], int)

    assert [r["fingerprint"] for r in db.recent_transitions(limit=2)] == ["fp9", "fp4"]
    assert [r["fingerprint"] for r in db.recent_transitions(since=T0 + 3)] == ["fp9", "fp4", "fp3"]
    assert [r["fingerprint"] for r in db.recent_transitions(rule="ReplicaDown")] == ["fp9"]
    assert db.recent_transitions(rule="ReplicaDown", since=T0 + 10) == []


def test_optional_transition_fields(open_db: Opener) -> None:
    db = open_db()
    db.add_transitions([{"rule": "r", "labels": {}, "fingerprint": "f", "from_state": "firing",
                         "to_state": "resolved", "at": T0}])
    (row,) = db.recent_transitions()
    assert row["value"] is None and row["description"] is None and row["severity"] is None
    assert row["labels"] == {}


def test_many_transitions_in_one_call(open_db: Opener) -> None:
    db = open_db()
    assert db.add_transitions([transition(i) for i in range(2_500)]) == 2_500  # several chunks
    assert len(db.recent_transitions(limit=10 * MAX_ROWS)) == 2_500  # limit clamped, not refused
    assert len(db.recent_transitions(limit=0)) == 1  # at least one row


def test_actions_round_trip(open_db: Opener) -> None:
    db = open_db()
    a1 = db.add_action({"action": "restart_replica", "deployment": "embed", "target": "r1",
                        "alert_fingerprint": "fp1", "rule": "ReplicaDown", "at": T0,
                        "dry_run": True, "outcome": "skipped", "detail": {"reason": "dry run"}})
    a2 = db.add_action({"action": "scale_up", "at": T0 + 5, "outcome": "ok", "detail": "to 3"})
    assert a2 > a1
    newest, oldest = db.recent_actions()
    assert newest == {"id": a2, "action": "scale_up", "deployment": None, "target": None,
                      "alert_fingerprint": None, "rule": None, "at": T0 + 5, "dry_run": False,
                      "outcome": "ok", "detail": "to 3"}
    assert oldest["dry_run"] is True and oldest["detail"] == {"reason": "dry run"}
    assert oldest["target"] == "r1" and oldest["rule"] == "ReplicaDown"
    assert [a["id"] for a in db.recent_actions(limit=1)] == [a2]


def test_silences_round_trip(open_db: Opener) -> None:
    db = open_db()
    matchers = [{"name": "deployment", "value": "embed", "isRegex": False, "isEqual": True}]
    db.put_silence({"id": "s1", "matchers": matchers, "starts_at": T0, "ends_at": T0 + 100,
                    "created_by": "ops", "comment": "deploying"})
    db.put_silence({"id": "s2", "matchers": [], "starts_at": T0 + 50, "ends_at": T0 + 60,
                    "created_by": "ops", "comment": "later"})
    assert db.active_silences(T0 - 1) == []
    assert db.active_silences(T0) == [{"id": "s1", "matchers": matchers, "starts_at": T0,
                                       "ends_at": T0 + 100, "created_by": "ops",
                                       "comment": "deploying"}]
    assert [s["id"] for s in db.active_silences(T0 + 55)] == ["s2", "s1"]  # soonest end first
    assert db.active_silences(T0 + 100) == []  # ends_at is exclusive

    # put again = replace
    db.put_silence({"id": "s1", "matchers": matchers, "starts_at": T0, "ends_at": T0 + 200,
                    "created_by": "ops", "comment": "extended"})
    (s1,) = db.active_silences(T0 + 150)
    assert s1["comment"] == "extended"

    assert db.expire_silence("s1", T0 + 10) is True
    assert [s["id"] for s in db.active_silences(T0 + 10)] == []
    assert db.expire_silence("s1", T0 + 20) is False  # already over
    assert db.expire_silence("nope", T0) is False
    assert len(db.active_silences(T0 + 55, limit=1)) == 1


def test_series_points_round_trip(open_db: Opener) -> None:
    db = open_db()
    points = [("p99_latency_s", {"deployment": "embed"}, T0 + i, i / 10) for i in range(10)]
    points.append(("p99_latency_s", {"deployment": "bert"}, T0 + 3.5, 9.0))
    points.append(("error_rate", {}, T0 + 3, 0.5))
    assert db.add_series_points(points) == 12
    got = db.series_points("p99_latency_s", T0 + 3, T0 + 5)  # since inclusive, until exclusive
    assert got == [
        ("p99_latency_s", {"deployment": "embed"}, T0 + 3, 0.3),
        ("p99_latency_s", {"deployment": "bert"}, T0 + 3.5, 9.0),
        ("p99_latency_s", {"deployment": "embed"}, T0 + 4, 0.4),
    ]
    assert db.series_points("error_rate", 0, T0 + 100) == [("error_rate", {}, T0 + 3, 0.5)]
    assert db.series_points("missing", 0, T0 + 100) == []
    assert len(db.series_points("p99_latency_s", 0, T0 + 100, limit=4)) == 4  # oldest first
    assert db.series_points("p99_latency_s", 0, T0 + 100, limit=1)[0][2] == T0
    # where the newest N points begin (a restore's bound): the N-th newest, else `since`
    assert db.series_start("p99_latency_s", T0, T0 + 100, 4) == T0 + 6
    assert db.series_start("p99_latency_s", T0, T0 + 9, 1) == T0 + 8  # until exclusive
    assert db.series_start("p99_latency_s", T0 + 1, T0 + 100, 50) == T0 + 1
    assert db.series_start("missing", T0, T0 + 100, 1) == T0


def test_state_round_trip(open_db: Opener) -> None:
    db = open_db()
    assert db.get_state("alert_book") is None
    book = {"alerts": {"fp1": {"state": "firing", "since": T0, "value": 0.5}}, "n": [1, 2, 3]}
    db.put_state("alert_book", book)
    assert db.get_state("alert_book") == book
    db.put_state("alert_book", {"alerts": {}})  # replace
    assert db.get_state("alert_book") == {"alerts": {}}
    db.put_state("other", "a string")
    assert db.get_state("other") == "a string"
    with pytest.raises(ValueError):
        db.put_state("bad", {"x": object()})


def test_data_survives_a_restart(open_db: Opener) -> None:
    db = open_db()
    db.add_transitions([transition(1)])
    db.add_action({"action": "eject", "at": T0, "outcome": "ok"})
    db.put_silence({"id": "s1", "matchers": [], "starts_at": T0, "ends_at": T0 + 10,
                    "created_by": "", "comment": ""})
    db.add_series_points([("m", {"a": "1"}, T0, 1.0)])
    db.put_state("alert_book", {"fp1": "firing"})
    db.close()

    again = open_db()  # the restart: a new wrapper on the same database
    assert again.schema_version() == SCHEMA_VERSION
    assert [t["fingerprint"] for t in again.recent_transitions()] == ["fp1"]
    assert [a["action"] for a in again.recent_actions()] == ["eject"]
    assert [s["id"] for s in again.active_silences(T0 + 1)] == ["s1"]
    assert again.series_points("m", T0, T0 + 1) == [("m", {"a": "1"}, T0, 1.0)]
    assert again.get_state("alert_book") == {"fp1": "firing"}


def test_prune(open_db: Opener) -> None:
    db = open_db()
    db.add_series_points([("m", {}, T0 + i, float(i)) for i in range(100)])
    db.add_transitions([transition(i) for i in range(10)])
    db.add_action({"action": "restart", "at": T0, "outcome": "ok"})
    db.put_silence({"id": "old", "matchers": [], "starts_at": 0, "ends_at": 1,
                    "created_by": "", "comment": ""})

    assert db.prune(T0 + 60) == {"series_points": 60, "alert_transitions": 10}
    assert [p[2] for p in db.series_points("m", 0, T0 + 1000)] == [T0 + i for i in range(60, 100)]
    assert db.recent_transitions() == []
    assert len(db.recent_actions()) == 1  # actions are kept

    # bounded: at most max_rows per table per call; call again for the rest
    assert db.prune(T0 + 90, max_rows=20) == {"series_points": 20, "alert_transitions": 0}
    assert db.prune(T0 + 90, max_rows=20) == {"series_points": 10, "alert_transitions": 0}
    assert db.prune(T0 + 90) == {"series_points": 0, "alert_transitions": 0}


def test_concurrent_writers_from_threads(open_db: Opener) -> None:
    """The gateway calls through asyncio.to_thread: writes from many threads all land."""
    db = open_db()
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(25):
                db.add_series_points([("m", {"w": str(k)}, T0 + i, float(k))])
                db.put_state(f"w{k}", i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(db.series_points("m", 0, T0 + 100)) == 200
    assert [db.get_state(f"w{k}") for k in range(8)] == [24] * 8


def test_two_processes_worth_of_wrappers_share_the_schema(open_db: Opener) -> None:
    """Two gateways opening the same database at once both come up and see each other's rows."""
    dbs: list[Database] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            dbs.append(open_db())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    dbs[0].put_state("k", 1)
    assert dbs[-1].get_state("k") == 1


# ---- errors map to DatabaseUnavailable ----

def test_closed_database_raises_database_unavailable(open_db: Opener) -> None:
    db = open_db()
    db.close()
    db.close()  # idempotent
    with pytest.raises(DatabaseUnavailable, match="closed"):
        db.ping()
    with pytest.raises(DatabaseUnavailable):
        db.recent_transitions()


def test_postgres_on_a_closed_port_is_unavailable_quickly() -> None:
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as info:
        Database("postgresql://postgres@127.0.0.1:1/test", connect_timeout_s=1)
    assert time.monotonic() - started < 5
    err = info.value
    assert isinstance(err, SteadyError) and err.status == 503 and err.code == "database_unavailable"
    assert isinstance(err.__cause__, Exception)  # raised `from` the driver's error


def test_password_is_not_in_the_message() -> None:
    with pytest.raises(DatabaseUnavailable) as info:
        Database("postgresql://postgres:hunter2@127.0.0.1:1/test", connect_timeout_s=1)
    assert "hunter2" not in str(info.value)


def test_tables_dropped_underneath_map_to_database_unavailable(pg_url: str) -> None:
    db = Database(pg_url, connect_timeout_s=3)
    try:
        db.ping()
        schema = pg_url.rsplit("application_name=", 1)[-1]  # conftest names both alike
        with connect_pg_admin() as admin:  # its search_path is the default one: qualify the name
            admin.execute(f'DROP TABLE "{schema}".kv')
        with pytest.raises(DatabaseUnavailable) as info:
            db.get_state("x")
        assert isinstance(info.value.__cause__, Exception)
        db.ping()  # the connection itself is still fine
    finally:
        db.close()


def test_sqlite_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a sqlite file" * 100)
    with pytest.raises(DatabaseUnavailable) as info:
        Database(f"sqlite:///{path}")
    assert isinstance(info.value.__cause__, Exception)


def test_sqlite_directory_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DatabaseUnavailable):
        Database(f"sqlite:///{blocker / 'sub' / 'db.sqlite'}")


def test_sqlite_uses_wal_and_creates_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "steadyserve.db"
    db = Database(f"sqlite:///{path}")
    try:
        db.put_state("k", 1)
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_sqlite_in_memory_is_shared_across_threads() -> None:
    db = Database("sqlite:///:memory:")
    try:
        db.put_state("k", 1)
        seen: list[object] = []
        t = threading.Thread(target=lambda: seen.append(db.get_state("k")))
        t.start()
        t.join()
        assert seen == [1]
    finally:
        db.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    Database(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="newer"):
        Database(f"sqlite:///{path}")


@pytest.mark.parametrize("url", ["mysql://u@h/db", "postgresql+asyncpg://u@h/db", "not a url"])
def test_unsupported_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        Database(url)


def test_default_url_is_a_relative_sqlite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    db = Database()
    try:
        db.ping()
        assert (tmp_path / ".steadyserve" / "steadyserve.db").exists()
    finally:
        db.close()


def test_request_records_are_added_once_and_pruned_by_age_and_count(db) -> None:
    from steadyserve.store.records import RecordStore

    store = RecordStore(db)
    rows = [{"request_id": f"r{i:04d}", "deployment": "risk", "handler": "score",
             "version": "7", "replica": "risk-0", "cache": "miss", "status": 200,
             "latency_ms": 1.5, "key_id": None, "prediction": i / 2500, "cache_keys": None,
             "created_at": 1000.0 + i, "arm": "candidate" if i % 2 else ""}
            for i in range(2500)]  # over one executemany chunk
    store.add(rows)
    store.add(rows[:10])  # a worker's report sent twice: no duplicate, no error
    assert store.answers(0) == {("risk", "7"): 2500}
    assert store.get("r0007")["prediction"] == 7 / 2500
    assert store.prune(before=1100.0, max_rows=2000) == 500  # 100 too old, then 400 oldest
    assert store.answers(0) == {("risk", "7"): 2000}
    assert store.get("r0499") is None and store.get("r0500") is not None


def test_a_v4_database_gains_the_records_arm_column(open_db: Opener) -> None:
    """Schema v5 added request_records.arm: a v4 database (no such column, records in it)
    is migrated in place, its old records read back with an empty arm."""
    from steadyserve.store.records import RecordStore

    db = open_db()
    with db.connect("make it v4", write=True) as conn:
        conn.exec_driver_sql("ALTER TABLE request_records DROP COLUMN arm")
        conn.exec_driver_sql(
            "INSERT INTO request_records (request_id, deployment, handler, version, replica, "
            "cache, status, latency_ms, created_at) VALUES ('old', 'risk', 'score', '1', "
            "'risk-0', 'miss', 200, 1.0, 1000.0)")
        conn.exec_driver_sql("UPDATE schema_version SET version = 4")
    db.close()
    again = open_db()
    assert again.schema_version() == SCHEMA_VERSION >= 5
    store = RecordStore(again)
    assert store.get("old")["arm"] == ""
    store.add([{"request_id": "new", "deployment": "risk", "handler": "score", "version": "2",
                "replica": "risk-1", "cache": "miss", "status": 200, "latency_ms": 2.0,
                "key_id": None, "prediction": 0.9, "cache_keys": None, "created_at": 1001.0,
                "arm": "candidate"}])
    assert store.get("new")["arm"] == "candidate"
