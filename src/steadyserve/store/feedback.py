"""User feedback items (the `feedback` table of `store.database`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from sqlalchemy import func, select

from ..errors import Conflict
from .database import Database, feedback


class TooMuchFeedback(Conflict):
    """The request has `max_items_per_request` feedback items already."""

    code = "too_much_feedback"


class FeedbackStore:
    """Thread-safe (the Database is); call from worker threads in the gateway."""

    def __init__(self, db: Database, max_items_per_request: int) -> None:
        self.db = db
        self.max_items_per_request = max_items_per_request

    def add(self, item: Mapping[str, Any], *, bounded: bool = True) -> bool:
        """Store one item; False when an item with its id is stored already (a retried
        submission), TooMuchFeedback when its request has as many items as allowed. The count
        and the insert share a transaction (on PostgreSQL two concurrent submissions for one
        request may both pass the count: the bound is then exceeded by at most the number of
        gateways, never without limit). `bounded=False` for items accepted already (the
        spool's): those are stored whatever the count."""
        row = {**item, "value": _json(item.get("value")),
               "correction": _json(item.get("correction"))}
        with self.db.connect("add feedback", write=True) as conn:
            if conn.execute(select(feedback.c.id).where(feedback.c.id == row["id"])).first():
                return False
            count = conn.execute(select(func.count()).select_from(feedback)
                                 .where(feedback.c.request_id == row["request_id"])).scalar_one()
            if bounded and count >= self.max_items_per_request:
                raise TooMuchFeedback(f"request {row['request_id']!r} has {count} feedback items "
                                      f"already, the most allowed ([feedback] "
                                      "max_items_per_request)")
            return bool(conn.execute(self.db.insert_ignore(feedback, row)).rowcount)

    def of_request(self, request_id: str) -> list[dict[str, Any]]:
        c = feedback.c
        with self.db.connect("read feedback") as conn:
            rows = conn.execute(select(feedback).where(c.request_id == request_id)
                                .order_by(c.created_at, c.id)
                                .limit(self.max_items_per_request * 2)).mappings().all()
        return [{**r, "value": _unjson(r["value"]), "correction": _unjson(r["correction"])}
                for r in rows]


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _unjson(raw: str | None) -> Any:
    return None if raw is None else orjson.loads(raw)
