"""Per-key usage rows (the `key_usage` table of `store.database`): one row per key,
deployment and UTC day, added to by every gateway's flush (auth.usage)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sqlalchemy import delete, func, select

from .database import MAX_ROWS, Database, key_usage

DAY_S = 86_400


def day_of(t: float) -> int:
    """Days since the Unix epoch (UTC)."""
    return math.floor(t / DAY_S)


class UsageStore:
    """Thread-safe (the Database is); call from worker threads in the gateway."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, counts: Mapping[tuple[str, str], list[float]], now: float) -> None:
        """Add counts to today's rows (created when missing) in one transaction."""
        day = day_of(now)
        with self.db.connect("add key usage", write=True) as conn:
            for (key_id, deployment), (req, err, rej, seen) in counts.items():
                conn.execute(self.db.upsert_add(
                    key_usage, {"key_id": key_id, "day": day, "deployment": deployment},
                    {"requests": int(req), "errors": int(err), "rejected": int(rej)},
                    {"last_seen": seen}))

    def totals(self, since: float, limit: int) -> list[dict[str, Any]]:
        """Per key and deployment since `since` (whole UTC days), most requests first."""
        c = key_usage.c
        query = (select(c.key_id, c.deployment, func.sum(c.requests).label("requests"),
                        func.sum(c.errors).label("errors"), func.sum(c.rejected).label("rejected"),
                        func.max(c.last_seen).label("last_seen"))
                 .where(c.day >= day_of(since)).group_by(c.key_id, c.deployment)
                 .order_by(func.sum(c.requests).desc(), c.key_id, c.deployment)
                 .limit(min(limit, MAX_ROWS)))
        with self.db.connect("read key usage") as conn:
            return [{"key_id": r.key_id, "deployment": r.deployment, "requests": int(r.requests),
                     "errors": int(r.errors), "rejected": int(r.rejected),
                     "last_seen": float(r.last_seen)} for r in conn.execute(query)]

    def prune(self, before: float) -> None:
        """Delete the rows of days before `before`."""
        with self.db.connect("prune key usage", write=True) as conn:
            conn.execute(delete(key_usage).where(key_usage.c.day < day_of(before)))
