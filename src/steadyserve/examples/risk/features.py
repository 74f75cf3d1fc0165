"""The risk example's feature store: one row of features per account, in SQLite or PostgreSQL.

One code path (SQLAlchemy Core, sync engine) serves both: a SQLite file by default,
PostgreSQL by URL (`postgresql://…` is rewritten to the psycopg 3 driver, as everywhere in
steadyserve). A `FeatureStore` is thread-safe; the replica calls it from its handler threads.

Table `risk_accounts`: account_id BIGINT primary key, the features of `data.ACCOUNT_COLUMNS`
and `updated_at` (epoch seconds). Table `risk_meta` holds one row per completed one-off job;
its key "seed" marks the generated accounts as loaded.

Seeding (`ensure_seeded`) runs at every replica start and does work only on an empty store.
Several replicas may start at once: the seeder inserts the "seed" meta row first and the
accounts after it, in one transaction. A second seeder's meta insert then waits for the first
transaction (row lock on PostgreSQL, the write lock on SQLite) and, once it commits, finds
the key taken: it rolls back and goes on with the rows the first one wrote. No replica fails
because another one seeded.

`apply_transaction` is one `UPDATE … RETURNING` statement (Welford's running mean and
variance in SQL), so concurrent feeds for one account serialise on its row and none is lost.

Errors: every SQLAlchemy / driver / file-system error leaves this module as
`steadyserve.store.DatabaseUnavailable` (503 with Retry-After) raised `from` the original;
an unknown account is `steadyserve.errors.NotFound`. Connections are checked before use
(pool_pre_ping), so the store recovers by itself when the database comes back, and a
connection attempt gives up after `connect_timeout_s` (2 s by default), so a database that is
down fails a request quickly instead of hanging it.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Double,
    MetaData,
    Table,
    Text,
    cast,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.schema import CreateTable

from ...errors import NotFound
from ...store import DatabaseUnavailable
from ...store.database import _normalise_url, make_engine
from . import data

log = logging.getLogger(__name__)

SEED_CHUNK_ROWS: Final = 5_000  # rows per executemany call while seeding
IN_CHUNK: Final = 1_000  # ids per SELECT … WHERE account_id IN (…)
SEED_WAIT_S: Final = 300.0  # how long a seeder waits for another one's seeding transaction
MAX_ACCOUNT_ID: Final = 2**63 - 1  # BIGINT; larger ids cannot exist
_PG_SCHEMA_LOCK: Final = 0x5249_534B  # "RISK": serialises CREATE TABLE across replicas

metadata = MetaData()

risk_accounts = Table(
    "risk_accounts", metadata,
    Column("account_id", BigInteger, primary_key=True, autoincrement=False),
    Column("tx_count", BigInteger, nullable=False),
    Column("amount_mean", Double, nullable=False),
    Column("amount_std", Double, nullable=False),  # population standard deviation
    Column("chargeback_rate", Double, nullable=False),
    Column("account_age_days", BigInteger, nullable=False),
    Column("country_risk", Double, nullable=False),
    Column("night_share", Double, nullable=False),
    Column("last_amount", Double, nullable=True),
    Column("updated_at", Double, nullable=False),  # epoch seconds
)

risk_meta = Table(
    "risk_meta", metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
)

_INT_COLUMNS: Final = frozenset({"account_id", "tx_count", "account_age_days"})


def _row(mapping: Any) -> dict[str, Any]:
    """A result row as a dict of plain Python numbers."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if value is None:
            out[key] = None
        elif key in _INT_COLUMNS:
            out[key] = int(value)
        else:
            out[key] = float(value)
    return out


class FeatureStore:
    """Account features over SQLAlchemy Core. Construct once per process; `close()` at the end.

    Construction connects to nothing; `ensure_seeded()` creates the tables and loads the
    generated accounts when the store is empty."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 2.0,
        busy_timeout_s: float = 5.0,
        statement_timeout_s: float = 5.0,
        pool_size: int = 5,
    ) -> None:
        self._url = _normalise_url(url)
        self.url = self._url.render_as_string(hide_password=True)
        self.dialect = "postgresql" if self._url.drivername.startswith("postgresql") else "sqlite"
        self._busy_timeout_s = busy_timeout_s
        self._closed = False
        self._lock = threading.Lock()  # guards _closed against a concurrent close()
        with self._mapped("open"):
            self._engine = make_engine(
                self._url, connect_timeout_s=connect_timeout_s, busy_timeout_s=busy_timeout_s,
                statement_timeout_s=statement_timeout_s, pool_size=pool_size,
                on_sqlite_connect=self._on_sqlite_connect)

    @staticmethod
    def _on_sqlite_connect(dbapi_conn: Any) -> None:
        """The Welford update needs sqrt(); some SQLite builds lack the math functions."""
        cur = dbapi_conn.cursor()
        try:
            cur.execute("SELECT sqrt(4.0)")
        except sqlite3.OperationalError:
            dbapi_conn.create_function("sqrt", 1, math.sqrt, deterministic=True)
        finally:
            cur.close()

    # -- error mapping --

    @contextmanager
    def _mapped(self, operation: str) -> Iterator[None]:
        try:
            yield
        except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
            # the client gets the operation and the error's kind; the address and the driver's
            # words (hosts, ports, paths) go to the replica's log only
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("feature store %s failed (%s): %s", operation, self.url, detail)
            raise DatabaseUnavailable(
                f"feature store {operation} failed: {type(exc).__name__}; retry shortly") from exc

    @contextmanager
    def _connect(self, operation: str, *, write: bool = False) -> Iterator[Connection]:
        """A connection (in a transaction committed on success when `write`), errors mapped."""
        with self._lock:
            if self._closed:
                raise DatabaseUnavailable(f"feature store {operation} failed: the store is closed")
        with self._mapped(operation):
            ctx = self._engine.begin() if write else self._engine.connect()
            with ctx as conn:
                yield conn

    # -- schema and seeding --

    def create_tables(self) -> None:
        """Create the tables if missing (safe to run from several processes at once)."""
        with self._connect("create tables", write=True) as conn:
            if self.dialect == "postgresql":
                # CREATE TABLE IF NOT EXISTS still races on PostgreSQL's catalog; serialise it.
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_SCHEMA_LOCK})
            for table in metadata.sorted_tables:
                conn.execute(CreateTable(table, if_not_exists=True))

    def is_seeded(self) -> bool:
        """True once the generated accounts were loaded, or when the table holds rows anyway."""
        with self._connect("seed check") as conn:
            marked = conn.execute(select(risk_meta.c.key).where(risk_meta.c.key == "seed")).first()
            if marked is not None:
                return True
            return conn.execute(select(risk_accounts.c.account_id).limit(1)).first() is not None

    def ensure_seeded(self, accounts: Callable[[], data.Accounts] = data.generate_accounts) -> int:
        """Create the tables, and load `accounts()` if the store is empty; returns the number of
        rows this call inserted (0 when the store was seeded already, by anyone).

        `accounts` is only called when rows are needed. See the module docstring for why a
        concurrent seeder neither fails nor duplicates rows."""
        self.create_tables()
        if self.is_seeded():
            return 0
        generated = accounts()
        started = time.perf_counter()
        try:
            with self._connect("seed", write=True) as conn, self._long_wait(conn):
                # the first statement of the transaction, so SQLite takes its write lock here
                claimed = conn.execute(self._insert_ignore(
                    risk_meta, {"key": "seed", "value": f"{len(generated)} generated accounts"}))
                if claimed.rowcount == 0:  # another seeder committed first
                    conn.rollback()
                    return 0
                now = time.time()
                for start in range(0, len(generated), SEED_CHUNK_ROWS):
                    rows = generated.rows(start, start + SEED_CHUNK_ROWS)
                    for row in rows:
                        row["updated_at"] = now
                    conn.execute(insert(risk_accounts), rows)
        except DatabaseUnavailable as exc:
            if isinstance(exc.__cause__, IntegrityError):  # rows were there under another key
                log.info("risk accounts were seeded by someone else")
                return 0
            raise
        log.info("seeded risk accounts", extra={"rows": len(generated),
                                                "seconds": round(time.perf_counter() - started, 3)})
        return len(generated)

    @contextmanager
    def _long_wait(self, conn: Connection) -> Iterator[None]:
        """Let this transaction wait up to SEED_WAIT_S for a concurrent seeder's transaction;
        requests keep their short limits (statement timeout / busy timeout)."""
        if self.dialect == "postgresql":
            conn.execute(text(f"SET LOCAL statement_timeout = {int(SEED_WAIT_S * 1000)}"))  # ends with it
            yield
            return
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(SEED_WAIT_S * 1000)}")
        try:
            yield
        finally:
            try:
                conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            except (SQLAlchemyError, sqlite3.Error):
                conn.invalidate()  # the pool drops it rather than keep the long timeout

    def _insert_ignore(self, table: Table, values: dict[str, Any]) -> Any:
        if self.dialect == "postgresql":
            return pg_dialect.insert(table).values(values).on_conflict_do_nothing()
        return sqlite_dialect.insert(table).values(values).on_conflict_do_nothing()

    def count(self) -> int:
        """Number of accounts in the store."""
        with self._connect("count") as conn:
            return int(conn.execute(select(func.count()).select_from(risk_accounts)).scalar_one())

    # -- reads --

    def get_many(self, account_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The feature rows of the known ids among `account_ids` (unknown ones are absent).

        One `SELECT … WHERE account_id IN (…)` per IN_CHUNK ids, on one connection."""
        ids = sorted({int(i) for i in account_ids if 0 <= int(i) <= MAX_ACCOUNT_ID})
        out: dict[int, dict[str, Any]] = {}
        if not ids:
            return out
        with self._connect("get_many") as conn:
            for start in range(0, len(ids), IN_CHUNK):
                chunk = ids[start:start + IN_CHUNK]
                result = conn.execute(select(risk_accounts).where(risk_accounts.c.account_id.in_(chunk)))
                for mapping in result.mappings():
                    row = _row(mapping)
                    out[row["account_id"]] = row
        return out

    def get(self, account_id: int) -> dict[str, Any]:
        """One account's features; NotFound when there is no such account."""
        row = self.get_many([account_id]).get(int(account_id))
        if row is None:
            raise NotFound(f"unknown account {account_id}", param="account_id")
        return row

    # -- writes --

    def apply_transaction(
        self, account_id: int, amount: float, chargeback: bool, hour: int
    ) -> dict[str, Any]:
        """Fold one transaction into the account's features, as a transaction feed would, and
        return the new row. NotFound when there is no such account.

        With n transactions so far and δ = amount − mean (Welford):
            mean′ = mean + δ / (n + 1)
            std′  = sqrt((std² · n + δ² · n / (n + 1)) / (n + 1))     (population std)
        and chargeback_rate / night_share become running shares. One UPDATE … RETURNING, so
        the row is read and written atomically (PostgreSQL locks the row, SQLite the file)."""
        if not 0 <= int(account_id) <= MAX_ACCOUNT_ID:
            raise NotFound(f"unknown account {account_id}", param="account_id")
        t = risk_accounts
        n = cast(t.c.tx_count, Double)
        n1 = n + 1.0
        x = float(amount)
        delta = x - t.c.amount_mean
        night = 1.0 if data.NIGHT_START_HOUR <= int(hour) < data.NIGHT_END_HOUR else 0.0
        stmt = (
            update(t)
            .where(t.c.account_id == int(account_id))
            .values(
                tx_count=t.c.tx_count + 1,
                amount_mean=t.c.amount_mean + delta / n1,
                amount_std=func.sqrt(
                    (t.c.amount_std * t.c.amount_std * n + delta * delta * n / n1) / n1
                ),
                chargeback_rate=(t.c.chargeback_rate * n + (1.0 if chargeback else 0.0)) / n1,
                night_share=(t.c.night_share * n + night) / n1,
                last_amount=x,
                updated_at=time.time(),
            )
            .returning(*t.c)
        )
        with self._connect("apply_transaction", write=True) as conn:
            mapping = conn.execute(stmt).mappings().first()
        if mapping is None:
            raise NotFound(f"unknown account {account_id}", param="account_id")
        return _row(mapping)

    # -- lifecycle --

    def close(self) -> None:
        """Release the connection pool; later calls raise DatabaseUnavailable."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._engine.dispose()
