"""The one wrapper around the database (SQLAlchemy Core, sync engine).

The gateway calls it from worker threads (`asyncio.to_thread`); an instance is thread-safe.
Every SQLAlchemy / driver / file-system error leaves this module as `DatabaseUnavailable`
(503) raised `from` the original, so callers handle one exception type.

URLs:
  sqlite:///path/to/file.db     default `sqlite:///.steadyserve/steadyserve.db`; the parent
                                directory is created; WAL journal and a busy timeout are set
  sqlite:///:memory:            one shared in-memory database (tests, throw-away runs)
  postgresql://user@host/db     rewritten to the psycopg (3) driver; query parameters are passed
                                to the driver (e.g. `?options=-csearch_path%3Dmyschema`)

Tables are created if missing at construction and stamped in `schema_version`. A later schema
change adds a function to `_MIGRATIONS` under the new version number and bumps
`SCHEMA_VERSION`: tables that do not exist yet are created in their newest shape before the
migrations run, so a migration only alters tables that existed before it.

Every read has a limit (clamped to `MAX_ROWS`) and `prune` deletes in bounded batches, so no
call does unbounded work.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Double,
    Engine,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import StaticPool
from sqlalchemy.schema import CreateIndex, CreateTable

from ..errors import ConfigError, DependencyUnavailable
from ..policies.lease import Fence  # (lease name, holder, token): a write from its holder

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///.steadyserve/steadyserve.db"
SCHEMA_VERSION = 6
MAX_ROWS = 10_000  # the most rows any read returns
INSERT_CHUNK_ROWS = 1_000  # rows per executemany round trip
PRUNE_BATCH_ROWS = 5_000  # rows per DELETE statement in prune
_PG_SCHEMA_LOCK = 0x5734_D5E4  # advisory lock key: serialises schema creation across gateways

SeriesPoint = tuple[str, Mapping[str, Any], float, float]
"""(name, labels, t epoch seconds, value) as written by `add_series_points`."""


class Fenced(Exception):
    """A fenced write was refused: the lease moved on (another gateway leads now)."""


class DatabaseUnavailable(DependencyUnavailable):
    """The database could not be reached or refused the operation; the message says which.
    A 503 with Retry-After: the pool reconnects by itself when the database is back."""

    code = "database_unavailable"


# ---- schema ------------------------------------------------------------------------------

# A 64-bit key on PostgreSQL; SQLite only makes INTEGER PRIMARY KEY an auto-increment rowid.
_Id = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

schema_version = Table(
    "schema_version", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1: a single row
    Column("version", Integer, nullable=False),
)

alert_transitions = Table(
    "alert_transitions", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("rule", Text, nullable=False),
    Column("labels", Text, nullable=False),  # JSON object, keys sorted
    Column("fingerprint", Text, nullable=False),
    Column("from_state", Text, nullable=False),
    Column("to_state", Text, nullable=False),
    Column("at", Double, nullable=False),  # epoch seconds
    Column("value", Double, nullable=True),
    Column("description", Text, nullable=True),
    Column("severity", Text, nullable=True),
    Index("ix_alert_transitions_at", "at"),
    Index("ix_alert_transitions_rule_at", "rule", "at"),
)

alert_actions = Table(
    "alert_actions", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("action", Text, nullable=False),
    Column("deployment", Text, nullable=True),
    Column("target", Text, nullable=True),
    Column("alert_fingerprint", Text, nullable=True),
    Column("rule", Text, nullable=True),
    Column("at", Double, nullable=False),
    Column("dry_run", Boolean, nullable=False),
    Column("outcome", Text, nullable=False),
    Column("detail", Text, nullable=True),  # JSON
    Index("ix_alert_actions_at", "at"),
)

silences = Table(
    "silences", metadata,
    Column("id", Text, primary_key=True),
    Column("matchers", Text, nullable=False),  # JSON
    Column("starts_at", Double, nullable=False),
    Column("ends_at", Double, nullable=False),
    Column("created_by", Text, nullable=False),
    Column("comment", Text, nullable=False),
    Index("ix_silences_ends_at", "ends_at"),
)

series_points_table = Table(
    "series_points", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("name", Text, nullable=False),
    Column("labels", Text, nullable=False),  # JSON object, keys sorted
    Column("t", Double, nullable=False),
    Column("value", Double, nullable=False),
    Index("ix_series_points_name_t", "name", "t"),
    Index("ix_series_points_t", "t"),  # prune scans by time across names
)

kv = Table(
    "kv", metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),  # JSON
)

# API keys (store.keys): only a digest of each token is kept (auth.tokens)
api_keys = Table(
    "api_keys", metadata,
    Column("id", Text, primary_key=True),  # the token's public 12-hex-digit id
    Column("name", Text, nullable=False),
    Column("kind", Text, nullable=False),  # "user" | "local-admin" (a data directory's own)
    Column("digest", Text, nullable=False),  # SHA-256 of the token
    Column("previous_digest", Text, nullable=True),  # the token before a rotation…
    Column("previous_valid_until", Double, nullable=True),  # …valid until then
    Column("scopes", Text, nullable=False),  # JSON list
    Column("rate_limit_per_s", Double, nullable=False),  # 0: none
    Column("burst", Integer, nullable=False),
    Column("priority", Text, nullable=False),  # interactive | batch: the most it may ask for
    Column("deployments", Text, nullable=False),  # JSON list; [] = every deployment
    Column("created_at", Double, nullable=False),
    Column("created_by", Text, nullable=False),
    Column("expires_at", Double, nullable=True),
    Column("revoked_at", Double, nullable=True),
    Index("ix_api_keys_name", "name"),
)

# Leases (store.lease): who leads the gateways sharing this database, and the fencing token
# every singleton write checks (a deposed leader's late write is refused)
leases = Table(
    "leases", metadata,
    Column("name", Text, primary_key=True),
    Column("holder", Text, nullable=False),  # "<gateway_id>#<incarnation>"; "" when never held
    Column("token", BigInteger, nullable=False),  # +1 on every change of holder
    Column("expires_at", Double, nullable=False),  # the database's clock, epoch seconds
    Column("url", Text, nullable=False),  # the holder's advertise_url ("" when not set)
    Column("acquired_at", Double, nullable=False),
)


def _v3_leases(conn: Connection) -> None:
    """Version 3 added `leases`, a new table (created before the migrations run)."""


# Per-key usage (store.usage): requests, 5xx and 4xx per key, deployment and UTC day
key_usage = Table(
    "key_usage", metadata,
    Column("key_id", Text, primary_key=True),
    Column("day", Integer, primary_key=True, autoincrement=False),  # days since the epoch
    Column("deployment", Text, primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("rejected", BigInteger, nullable=False),
    Column("last_seen", Double, nullable=False),
    Index("ix_key_usage_day", "day"),
)


# User feedback on answers (store.feedback): several items per request, each with its own
# id (the client's, so a retried submission is stored once)
feedback = Table(
    "feedback", metadata,
    Column("id", Text, primary_key=True),
    Column("request_id", Text, nullable=False),
    Column("key", Text, nullable=False),  # what is rated: "rating", "correct", …
    Column("score", Double, nullable=True),
    Column("value", Text, nullable=True),  # JSON
    Column("correction", Text, nullable=True),  # JSON: the right answer, e.g. a label
    Column("comment", Text, nullable=False),
    Column("key_id", Text, nullable=True),  # the API key that sent it
    Column("created_at", Double, nullable=False),
    Index("ix_feedback_request_id", "request_id"),
    Index("ix_feedback_created_at", "created_at"),
)


# What served each answer (store.records), for feedback to join to: sampled, kept
# [feedback] record_retention_s and at most max_records; inputs are never stored
request_records = Table(
    "request_records", metadata,
    Column("request_id", Text, primary_key=True),
    Column("deployment", Text, nullable=False),
    Column("handler", Text, nullable=False),
    Column("version", Text, nullable=False),  # the model version that answered ("" unknown)
    Column("replica", Text, nullable=False),
    Column("cache", Text, nullable=False),
    Column("status", Integer, nullable=False),
    Column("latency_ms", Double, nullable=False),
    Column("key_id", Text, nullable=True),
    Column("prediction", Double, nullable=True),  # [deployments] feedback_prediction
    Column("cache_keys", Text, nullable=True),  # JSON list: the answer's response-cache keys
    Column("created_at", Double, nullable=False),
    # a canary's arm that answered: baseline, candidate, failover; "" none (v5)
    Column("arm", Text, nullable=False, server_default=""),
    # one index besides the key: each costs a B-tree insert per answer (the summary's
    # grouping by deployment and version scans the time range instead)
    Index("ix_request_records_created_at", "created_at"),
)


# Asynchronous inference jobs (store.jobs, gateway.jobs): the durable queue, each job's
# result, and the delivery of its webhook (v6). A run is fenced by `attempt`: its result is
# stored only while the job is still running that attempt, so it is stored once.
jobs = Table(
    "jobs", metadata,
    Column("id", Text, primary_key=True),
    Column("deployment", Text, nullable=False),
    Column("handler", Text, nullable=False),
    Column("args", Text, nullable=False),  # JSON: the handler's parameters, validated
    Column("key_id", Text, nullable=False),  # the API key that made it; "" none (open)
    Column("idempotency_key", Text, nullable=True),  # unique per key_id
    Column("request_hash", Text, nullable=False),  # a reused idempotency key must match it
    Column("state", Text, nullable=False),  # policies.jobs.STATES
    Column("attempt", Integer, nullable=False),  # runs started (claims) so far
    Column("failures", Integer, nullable=False),  # runs that failed (dead at max_failures)
    Column("created_at", Double, nullable=False),  # epoch seconds
    Column("available_at", Double, nullable=False),  # queued: not claimed before this
    Column("deadline_at", Double, nullable=False),
    Column("started_at", Double, nullable=True),  # the first run's start
    Column("finished_at", Double, nullable=True),
    Column("claimed_by", Text, nullable=True),  # running: "<gateway id>#<incarnation>"…
    Column("lease_until", Double, nullable=True),  # …until this, unless renewed
    Column("result", Text, nullable=True),  # JSON
    Column("error", Text, nullable=True),  # JSON {code, message, status}
    Column("webhook_url", Text, nullable=True),
    Column("webhook_state", Text, nullable=True),  # pending | delivered | failed
    Column("webhook_attempts", Integer, nullable=False, server_default="0"),
    Column("webhook_next_at", Double, nullable=True),  # pending: the next try (also a lease)
    Column("webhook_at", Double, nullable=True),  # when it was delivered or given up
    Column("webhook_error", Text, nullable=True),  # the last failed try's reason
    Index("ix_jobs_claim", "state", "deployment", "available_at"),
    Index("ix_jobs_webhook", "webhook_state", "webhook_next_at"),
    Index("ix_jobs_idempotency", "key_id", "idempotency_key", unique=True),
    Index("ix_jobs_key_state", "key_id", "state", "created_at"),
    Index("ix_jobs_finished_at", "finished_at"),
)


def _v6_jobs(conn: Connection) -> None:
    """Version 6 added `jobs`, a new table (created before the migrations run)."""


def _v4_key_usage(conn: Connection) -> None:
    """Version 4 added `key_usage` and `feedback`, new tables (created before the
    migrations run)."""


def _v2_api_keys(conn: Connection) -> None:
    """Version 2 added `api_keys`, a new table: created in its newest shape before the
    migrations run, so there is nothing left to alter."""


def _v5_record_arm(conn: Connection) -> None:
    """Version 5 added `request_records.arm` (the canary arm that answered)."""
    if "arm" not in {c["name"] for c in inspect(conn).get_columns("request_records")}:
        conn.exec_driver_sql(
            "ALTER TABLE request_records ADD COLUMN arm TEXT NOT NULL DEFAULT ''")


# version -> function that brings a database from version-1 to version.
_MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _v2_api_keys, 3: _v3_leases,
                                                        4: _v4_key_usage, 5: _v5_record_arm,
                                                        6: _v6_jobs}


# ---- helpers -----------------------------------------------------------------------------

def _dumps(obj: Any) -> str:
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()
    except TypeError as exc:
        raise ValueError(f"not JSON-serialisable: {exc}") from exc


def _loads(raw: str | None) -> Any:
    return None if raw is None else orjson.loads(raw)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _clamp_limit(limit: int) -> int:
    return max(1, min(int(limit), MAX_ROWS))


def _enable_wal(cur: Any, busy_timeout_s: float) -> None:
    """Switch a SQLite file to WAL (persistent in the file, so usually a no-op). The switch
    needs an exclusive lock and SQLite answers "locked" at once, without its busy handler,
    when another connection is opening the same new file: retry until the busy timeout."""
    if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _normalise_url(url: str) -> URL:
    """Parse the URL and pick the driver; unsupported or malformed URLs are a ConfigError."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"database URL is not valid: {exc}") from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise ConfigError(
                f"database driver {parsed.drivername!r} is not supported; use postgresql://"
            )
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise ConfigError(f"database driver {parsed.drivername!r} is not supported; use sqlite://")
        return parsed.set(drivername="sqlite+pysqlite")
    raise ConfigError(
        f"database URL scheme {backend!r} is not supported; use sqlite:///path.db or postgresql://…"
    )


# ---- the wrapper -------------------------------------------------------------------------

def make_engine(
    url: URL, *, connect_timeout_s: float, busy_timeout_s: float, statement_timeout_s: float,
    pool_size: int = 5, on_sqlite_connect: Callable[[Any], None] | None = None,
) -> Engine:
    """An engine with every wait bounded: pool checkout, connect (PostgreSQL), statements
    (PostgreSQL), locks (SQLite busy timeout). Pooled connections are pinged before use, so a
    database that went away and came back is reconnected to by itself. SQLite files get WAL;
    `on_sqlite_connect(dbapi_connection)` may add what a caller needs (functions, pragmas).
    Shared by `Database` and services' own stores (the risk example's features)."""
    if url.drivername.startswith("postgresql"):
        engine = create_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=connect_timeout_s,  # waiting for a free connection is bounded too
            pool_pre_ping=True,
            pool_recycle=1800,
            # libpq takes whole seconds (and treats 1 as 2)
            connect_args={"connect_timeout": max(1, math.ceil(connect_timeout_s))},
        )
        statement_ms = max(1, int(statement_timeout_s * 1000))

        @event.listens_for(engine, "connect")
        def _pg_on_connect(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute(f"SET statement_timeout = {statement_ms}")
            cur.close()
            dbapi_conn.commit()

        return engine

    database = url.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if not in_memory:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    connect_args = {"check_same_thread": False, "timeout": busy_timeout_s}
    if in_memory:  # one connection shared by all threads, or each would see its own database
        engine = create_engine(url, poolclass=StaticPool, connect_args=connect_args)
    else:
        engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size,
                               pool_timeout=connect_timeout_s, pool_pre_ping=True,
                               connect_args=connect_args)
    busy_ms = max(0, int(busy_timeout_s * 1000))

    @event.listens_for(engine, "connect")
    def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
        if not in_memory:
            _enable_wal(cur, busy_timeout_s)
            cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()
        if on_sqlite_connect is not None:
            on_sqlite_connect(dbapi_conn)

    return engine


class Database:
    """All database access of steadyserve. Construct once per process; `close()` at shutdown."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        connect_timeout_s: float = 5.0,
        busy_timeout_s: float = 5.0,
        statement_timeout_s: float = 30.0,
        backup_dir: Path | None = None,
    ) -> None:
        """`backup_dir`: where a backup goes before the schema of a database that holds
        data is migrated (store.backup); None: no backup."""
        self._url = _normalise_url(url)
        self._backup_dir = backup_dir
        self.url = self._url.render_as_string(hide_password=True)
        self.dialect = "postgresql" if self._url.drivername.startswith("postgresql") else "sqlite"
        self._closed = False
        self._lock = threading.Lock()  # guards _closed against a concurrent close()
        with self._mapped("open"):
            self._engine = make_engine(self._url, connect_timeout_s=connect_timeout_s,
                                       busy_timeout_s=busy_timeout_s,
                                       statement_timeout_s=statement_timeout_s)
        try:
            with self._mapped("schema setup"):
                self._init_schema()
        except BaseException:
            self._engine.dispose()
            raise

    # -- schema --

    def _init_schema(self) -> None:
        if self._backup_dir is not None:
            self._backup_before_migration(self._backup_dir)
        with self._engine.begin() as conn:
            if self.dialect == "postgresql":
                # CREATE TABLE IF NOT EXISTS still races on PostgreSQL's catalog; serialise it.
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_SCHEMA_LOCK})
            for table in metadata.sorted_tables:
                conn.execute(CreateTable(table, if_not_exists=True))
                for index in sorted(table.indexes, key=lambda ix: str(ix.name)):
                    conn.execute(CreateIndex(index, if_not_exists=True))
            current = conn.execute(
                select(schema_version.c.version).where(schema_version.c.id == 1)
            ).scalar_one_or_none()
            if current is None:
                conn.execute(self._insert_ignore(schema_version, {"id": 1, "version": SCHEMA_VERSION}))
                current = conn.execute(
                    select(schema_version.c.version).where(schema_version.c.id == 1)
                ).scalar_one()
            if current > SCHEMA_VERSION:
                raise ConfigError(
                    f"the database schema is version {current}, newer than this steadyserve "
                    f"understands ({SCHEMA_VERSION}); upgrade steadyserve"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                log.info("migrating database schema", extra={"schema_version": version})
                _MIGRATIONS[version](conn)
                conn.execute(
                    update(schema_version).where(schema_version.c.id == 1).values(version=version)
                )

    def _backup_before_migration(self, directory: Path) -> None:
        """Back the database up before its schema is migrated: read the stamp first (outside
        the schema transaction), and refuse to migrate when the backup fails. Two gateways
        starting at once may both take one; the migration itself runs once."""
        with self._engine.connect() as conn:
            if not inspect(conn).has_table("schema_version"):
                return  # a new database: nothing to keep
            current = conn.execute(
                select(schema_version.c.version).where(schema_version.c.id == 1)
            ).scalar_one_or_none()
        if current is None or current >= SCHEMA_VERSION:
            return
        from .backup import BackupError, backup_before_migration

        try:
            backup_before_migration(self._url.render_as_string(hide_password=False), directory,
                                    int(current), SCHEMA_VERSION)
        except BackupError as exc:
            raise DatabaseUnavailable(
                f"not migrating the database schema from v{current} to v{SCHEMA_VERSION}: the "
                f"backup before it failed ({exc.message})") from exc

    def schema_version(self) -> int:
        """The schema version stamped in the database."""
        with self._connect("schema_version") as conn:
            return int(
                conn.execute(select(schema_version.c.version).where(schema_version.c.id == 1))
                .scalar_one()
            )

    def _insert_ignore(self, table: Table, values: Mapping[str, Any]) -> Any:
        if self.dialect == "postgresql":
            return pg_dialect.insert(table).values(dict(values)).on_conflict_do_nothing()
        return sqlite_dialect.insert(table).values(dict(values)).on_conflict_do_nothing()

    def _upsert(self, table: Table, values: Mapping[str, Any], keys: Sequence[str]) -> Any:
        if self.dialect == "postgresql":
            pg_stmt = pg_dialect.insert(table).values(dict(values))
            return pg_stmt.on_conflict_do_update(
                index_elements=list(keys),
                set_={c: pg_stmt.excluded[c] for c in values if c not in keys},
            )
        lite_stmt = sqlite_dialect.insert(table).values(dict(values))
        return lite_stmt.on_conflict_do_update(
            index_elements=list(keys),
            set_={c: lite_stmt.excluded[c] for c in values if c not in keys},
        )

    def upsert_add(self, table: Table, keys: Mapping[str, Any], added: Mapping[str, int],
                   latest: Mapping[str, float]) -> Any:
        """Insert a row, or add `added` to an existing one's columns and keep the larger of
        its `latest` columns (one statement: concurrent gateways never lose an increment)."""
        values = {**keys, **added, **latest}
        dialect = pg_dialect if self.dialect == "postgresql" else sqlite_dialect
        stmt = dialect.insert(table).values(values)
        bigger = func.greatest if self.dialect == "postgresql" else func.max
        return stmt.on_conflict_do_update(
            index_elements=list(keys),
            set_={**{c: table.c[c] + stmt.excluded[c] for c in added},
                  **{c: bigger(table.c[c], stmt.excluded[c]) for c in latest}})

    # -- error mapping --

    @contextmanager
    def _mapped(self, operation: str) -> Iterator[None]:
        try:
            yield
        except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DatabaseUnavailable(f"database {operation} failed ({self.url}): {detail}") from exc

    def connect(self, operation: str, *, write: bool = False) -> Any:
        """A connection in a transaction for the store's other modules (`store.keys`);
        the same as `_connect`: committed on success, errors mapped to DatabaseUnavailable."""
        return self._connect(operation, write=write)

    def insert_ignore(self, table: Table, values: Mapping[str, Any]) -> Any:
        return self._insert_ignore(table, values)

    def upsert(self, table: Table, values: Mapping[str, Any], keys: Sequence[str]) -> Any:
        return self._upsert(table, values, keys)

    @contextmanager
    def _connect(self, operation: str, *, write: bool = False) -> Iterator[Connection]:
        """A connection in a transaction (committed on success), with errors mapped."""
        with self._lock:
            if self._closed:
                raise DatabaseUnavailable(f"database {operation} failed: the database is closed")
        with self._mapped(operation):
            ctx = self._engine.begin() if write else self._engine.connect()
            with ctx as conn:
                yield conn

    # -- alert transitions --

    def add_transitions(self, transitions: Sequence[Mapping[str, Any]]) -> int:
        """Record alert state changes. Each needs rule, labels (dict), fingerprint, from_state,
        to_state, at (epoch s); value, description and severity are optional. Returns the count."""
        rows = [
            {
                "rule": str(t["rule"]),
                "labels": _dumps(t.get("labels") or {}),
                "fingerprint": str(t["fingerprint"]),
                "from_state": str(t["from_state"]),
                "to_state": str(t["to_state"]),
                "at": float(t["at"]),
                "value": _opt_float(t.get("value")),
                "description": _opt_str(t.get("description")),
                "severity": _opt_str(t.get("severity")),
            }
            for t in transitions
        ]
        if rows:
            with self._connect("add_transitions", write=True) as conn:
                for i in range(0, len(rows), INSERT_CHUNK_ROWS):
                    conn.execute(insert(alert_transitions), rows[i : i + INSERT_CHUNK_ROWS])
        return len(rows)

    def recent_transitions(
        self, limit: int = 100, since: float | None = None, rule: str | None = None
    ) -> list[dict[str, Any]]:
        """Newest first; at most `limit` (≤ MAX_ROWS); `since` is inclusive."""
        t = alert_transitions
        stmt = select(t).order_by(t.c.at.desc(), t.c.id.desc()).limit(_clamp_limit(limit))
        if since is not None:
            stmt = stmt.where(t.c.at >= float(since))
        if rule is not None:
            stmt = stmt.where(t.c.rule == rule)
        with self._connect("recent_transitions") as conn:
            rows = conn.execute(stmt).mappings().all()
        return [{**row, "labels": _loads(row["labels"])} for row in rows]

    # -- automatic actions --

    def add_action(self, action: Mapping[str, Any]) -> int:
        """Record an automatic response. Needs action, at, outcome; deployment, target,
        alert_fingerprint, rule, dry_run (default False) and detail (any JSON) are optional.
        Returns the new row's id."""
        row = {
            "action": str(action["action"]),
            "deployment": _opt_str(action.get("deployment")),
            "target": _opt_str(action.get("target")),
            "alert_fingerprint": _opt_str(action.get("alert_fingerprint")),
            "rule": _opt_str(action.get("rule")),
            "at": float(action["at"]),
            "dry_run": bool(action.get("dry_run", False)),
            "outcome": str(action["outcome"]),
            "detail": None if action.get("detail") is None else _dumps(action["detail"]),
        }
        with self._connect("add_action", write=True) as conn:
            key = conn.execute(insert(alert_actions).values(row)).inserted_primary_key
        assert key is not None  # a single-row INSERT always reports its key
        return int(key[0])

    def recent_actions(self, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first; at most `limit` (≤ MAX_ROWS)."""
        a = alert_actions
        stmt = select(a).order_by(a.c.at.desc(), a.c.id.desc()).limit(_clamp_limit(limit))
        with self._connect("recent_actions") as conn:
            rows = conn.execute(stmt).mappings().all()
        return [{**row, "dry_run": bool(row["dry_run"]), "detail": _loads(row["detail"])} for row in rows]

    # -- silences --

    def put_silence(self, silence: Mapping[str, Any]) -> None:
        """Create or replace a silence: id, matchers (any JSON), starts_at, ends_at,
        created_by and comment (default "")."""
        row = {
            "id": str(silence["id"]),
            "matchers": _dumps(silence["matchers"]),
            "starts_at": float(silence["starts_at"]),
            "ends_at": float(silence["ends_at"]),
            "created_by": str(silence.get("created_by") or ""),
            "comment": str(silence.get("comment") or ""),
        }
        with self._connect("put_silence", write=True) as conn:
            conn.execute(self._upsert(silences, row, ["id"]))

    def expire_silence(self, silence_id: str, now: float) -> bool:
        """End the silence at `now`. False if it does not exist or had already ended."""
        stmt = (
            update(silences)
            .where(silences.c.id == silence_id, silences.c.ends_at > float(now))
            .values(ends_at=float(now))
        )
        with self._connect("expire_silence", write=True) as conn:
            return conn.execute(stmt).rowcount > 0

    def active_silences(self, now: float, limit: int = 1000) -> list[dict[str, Any]]:
        """Silences with starts_at ≤ now < ends_at, soonest to end first."""
        s = silences
        stmt = (
            select(s)
            .where(s.c.starts_at <= float(now), s.c.ends_at > float(now))
            .order_by(s.c.ends_at, s.c.id)
            .limit(_clamp_limit(limit))
        )
        with self._connect("active_silences") as conn:
            rows = conn.execute(stmt).mappings().all()
        return [{**row, "matchers": _loads(row["matchers"])} for row in rows]

    # -- time series --

    def add_series_points(self, points: Sequence[SeriesPoint]) -> int:
        """Append (name, labels, t, value) points. Returns the count."""
        rows = [
            {"name": str(name), "labels": _dumps(labels or {}), "t": float(t), "value": float(value)}
            for name, labels, t, value in points
        ]
        if rows:
            with self._connect("add_series_points", write=True) as conn:
                for i in range(0, len(rows), INSERT_CHUNK_ROWS):
                    conn.execute(insert(series_points_table), rows[i : i + INSERT_CHUNK_ROWS])
        return len(rows)

    def series_points(
        self, name: str, since: float, until: float, limit: int = MAX_ROWS
    ) -> list[tuple[str, dict[str, Any], float, float]]:
        """Points of `name` with since ≤ t < until, oldest first, at most `limit` (≤ MAX_ROWS).
        To page, call again with since = the last t returned (points at that t repeat)."""
        p = series_points_table
        stmt = (
            select(p.c.name, p.c.labels, p.c.t, p.c.value)
            .where(p.c.name == name, p.c.t >= float(since), p.c.t < float(until))
            .order_by(p.c.t, p.c.id)
            .limit(_clamp_limit(limit))
        )
        with self._connect("series_points") as conn:
            rows = conn.execute(stmt).all()
        return [(str(n), _loads(lab), float(t), float(v)) for n, lab, t, v in rows]

    def series_start(self, name: str, since: float, until: float, rows: int) -> float:
        """Where the newest `rows` points of `name` with since ≤ t < until begin: the time
        of the `rows`-th newest, or `since` when there are no more (a bound on what a
        restore reads, on the (name, t) index)."""
        p = series_points_table
        stmt = (select(p.c.t).where(p.c.name == name, p.c.t >= float(since), p.c.t < float(until))
                .order_by(p.c.t.desc()).offset(max(0, int(rows) - 1)).limit(1))
        with self._connect("series_start") as conn:
            found = conn.execute(stmt).scalar_one_or_none()
        return float(since) if found is None else float(found)

    # -- small state (the alert book across restarts) --

    def put_state(self, key: str, obj: Any, fence: Fence | None = None) -> None:
        """Store any JSON-serialisable object under `key`, replacing what was there. With a
        `fence` (lease name, holder, token) the write happens only while that lease still
        carries that token, checked in the same transaction (which locks the lease row, so
        no takeover commits in between); otherwise `Fenced` is raised and nothing changes."""
        value = _dumps(obj)
        with self._connect("put_state", write=True) as conn:
            if fence is not None:
                name, holder, token = fence
                held = conn.execute(
                    update(leases).where(leases.c.name == name, leases.c.holder == holder,
                                         leases.c.token == token)
                    .values(token=leases.c.token)  # a no-op write: the row lock is the point
                ).rowcount
                if held != 1:
                    raise Fenced(f"not written: lease {name!r} no longer carries token {token} "
                                 f"of {holder!r}")
            conn.execute(self._upsert(kv, {"key": str(key), "value": value}, ["key"]))

    def states_with_prefix(self, prefix: str, limit: int = 1000) -> dict[str, Any]:
        """{key: object} of the stored keys that start with `prefix` (at most `limit`)."""
        stmt = (select(kv.c.key, kv.c.value)
                .where(func.substr(kv.c.key, 1, len(prefix)) == prefix)
                .order_by(kv.c.key).limit(_clamp_limit(limit)))
        with self._connect("states_with_prefix") as conn:
            rows = conn.execute(stmt).all()
        return {str(k): _loads(v) for k, v in rows}

    def get_state(self, key: str) -> Any:
        """The object stored under `key`, or None."""
        with self._connect("get_state") as conn:
            raw = conn.execute(select(kv.c.value).where(kv.c.key == key)).scalar_one_or_none()
        return _loads(raw)

    # -- housekeeping --

    def prune(self, older_than_t: float, max_rows: int = 100_000) -> dict[str, int]:
        """Delete series points with t < older_than_t and alert transitions with
        at < older_than_t, in batches, at most `max_rows` per table per call (call again if a
        count equals max_rows). Actions and silences are kept. Returns the counts deleted."""
        cutoff = float(older_than_t)
        deleted: dict[str, int] = {}
        for table, column in ((series_points_table, series_points_table.c.t),
                              (alert_transitions, alert_transitions.c.at)):
            total = 0
            while total < max_rows:
                batch = min(PRUNE_BATCH_ROWS, max_rows - total)
                ids = select(table.c.id).where(column < cutoff).order_by(table.c.id).limit(batch)
                stmt = delete(table).where(table.c.id.in_(ids.scalar_subquery()))
                with self._connect("prune", write=True) as conn:
                    count = conn.execute(stmt).rowcount
                total += count
                if count < batch:
                    break
            deleted[table.name] = total
        return deleted

    def ping(self) -> None:
        """Cheap health check (SELECT 1); raises DatabaseUnavailable when it fails."""
        with self._connect("ping") as conn:
            conn.execute(text("SELECT 1")).scalar_one()

    def close(self) -> None:
        """Release all connections. Later calls raise DatabaseUnavailable. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with self._mapped("close"):
            self._engine.dispose()

    def __repr__(self) -> str:
        return f"Database({self.url!r})"
