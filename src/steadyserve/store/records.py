"""Request records (the `request_records` table of `store.database`): what served each
answer — deployment, handler, model version, replica, cache outcome, status, latency, key,
and the prediction feedback labels are compared with — and the feedback summary that joins
them to the `feedback` table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import delete, func, select

from .database import Database, feedback, request_records

RECORD_FIELDS = ("request_id", "deployment", "handler", "version", "replica", "cache",
                 "status", "latency_ms", "key_id", "prediction", "cache_keys", "created_at",
                 "arm")
PRUNE_ROWS = 5_000  # rows per DELETE while over max_records
ROWS_PER_STATEMENT = 500  # 6,500 parameters: under SQLite's 32,766 and PostgreSQL's 65,535


class RecordStore:
    """Thread-safe (the Database is); call from worker threads in the gateway."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert records; one already stored (the same request id) is left as it is.

        One multi-row INSERT per `ROWS_PER_STATEMENT` rows, sent to the driver as it is: an
        executemany runs one statement per row, and the sqlite3 module takes and drops the
        GIL around each, which made the gateway's event loop wait for it (a convoy) and cost
        15 % of echo throughput; one statement per chunk drops the GIL once per chunk."""
        mark = "%s" if self.db.dialect == "postgresql" else "?"
        row_marks = "(" + ",".join([mark] * len(RECORD_FIELDS)) + ")"
        with self.db.connect("add request records", write=True) as conn:
            for i in range(0, len(rows), ROWS_PER_STATEMENT):
                chunk = rows[i:i + ROWS_PER_STATEMENT]
                sql = (f"INSERT INTO request_records ({', '.join(RECORD_FIELDS)}) VALUES "
                       f"{','.join([row_marks] * len(chunk))} ON CONFLICT DO NOTHING")
                conn.exec_driver_sql(sql, tuple(r[f] for r in chunk for f in RECORD_FIELDS))

    def prune(self, before: float, max_rows: int) -> int:
        """Delete records older than `before`, then the oldest while over `max_rows`."""
        c = request_records.c
        with self.db.connect("prune request records", write=True) as conn:
            gone = conn.execute(delete(request_records).where(c.created_at < before)).rowcount
            over = conn.execute(select(func.count()).select_from(request_records)).scalar_one() \
                - max_rows
            while over > 0:
                oldest = select(c.request_id).order_by(c.created_at).limit(min(over, PRUNE_ROWS))
                n = conn.execute(delete(request_records).where(
                    c.request_id.in_(oldest.scalar_subquery()))).rowcount
                if n <= 0:
                    break
                gone += n
                over -= n
        return int(gone)

    def get(self, request_id: str) -> dict[str, Any] | None:
        with self.db.connect("read a request record") as conn:
            row = conn.execute(select(request_records).where(
                request_records.c.request_id == request_id)).mappings().first()
        return dict(row) if row is not None else None

    def answers(self, since: float) -> dict[tuple[str, str], int]:
        """Recorded answers per (deployment, version) since `since`."""
        c = request_records.c
        with self.db.connect("count request records") as conn:
            rows = conn.execute(select(c.deployment, c.version, func.count())
                                .where(c.created_at >= since)
                                .group_by(c.deployment, c.version)).all()
        return {(str(d), str(v)): int(n) for d, v, n in rows}

    def feedback_joined(self, since: float, limit: int) -> list[dict[str, Any]]:
        """Feedback items since `since` with the record of the answer they are about
        (deployment, version, prediction; None when the answer was not recorded), newest
        first, at most `limit`."""
        f, r = feedback.c, request_records.c
        query = (select(f.request_id, f.key, f.score, f.correction, r.deployment, r.version,
                        r.prediction)
                 .select_from(feedback.outerjoin(request_records,
                                                 f.request_id == r.request_id))
                 .where(f.created_at >= since).order_by(f.created_at.desc()).limit(limit))
        with self.db.connect("read feedback with records") as conn:
            rows = conn.execute(query).mappings().all()
        return [{**row, "correction": None if row["correction"] is None
                 else orjson.loads(row["correction"])} for row in rows]
