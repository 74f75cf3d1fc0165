"""API keys in the database (the `api_keys` table of `store.database`).

Every change also writes a fresh revision token under `kv['api_keys_revision']` in the same
transaction, so a gateway learns of it by reading one row (`revision()`) every
`[auth] key_refresh_s` and reloads the table only when that row changed: a revocation
reaches every gateway sharing the database within about that period, at the cost of one
primary-key read per period per gateway.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from sqlalchemy import func, insert, select, update

from ..auth.keys import ApiKey
from ..errors import Conflict
from .database import Database, api_keys, kv

REVISION_KEY = "api_keys_revision"


class KeyLimitReached(Conflict):
    """The table holds `max_keys` keys already (revoke or let some expire first)."""

    code = "too_many_keys"


def _row(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id, "name": key.name, "kind": key.kind, "digest": key.digest,
        "previous_digest": key.previous_digest, "previous_valid_until": key.previous_valid_until,
        "scopes": orjson.dumps(sorted(key.scopes)).decode(),
        "rate_limit_per_s": key.rate_limit_per_s, "burst": key.burst, "priority": key.priority,
        "deployments": orjson.dumps(list(key.deployments)).decode(),
        "created_at": key.created_at, "created_by": key.created_by,
        "expires_at": key.expires_at, "revoked_at": key.revoked_at,
    }


def _key(row: Mapping[str, Any]) -> ApiKey:
    return ApiKey(
        id=str(row["id"]), name=str(row["name"]), kind=str(row["kind"]), digest=str(row["digest"]),
        scopes=frozenset(orjson.loads(row["scopes"])),
        rate_limit_per_s=float(row["rate_limit_per_s"]), burst=int(row["burst"]),
        priority=str(row["priority"]), deployments=tuple(orjson.loads(row["deployments"])),
        created_at=float(row["created_at"]), created_by=str(row["created_by"]),
        expires_at=None if row["expires_at"] is None else float(row["expires_at"]),
        revoked_at=None if row["revoked_at"] is None else float(row["revoked_at"]),
        previous_digest=None if row["previous_digest"] is None else str(row["previous_digest"]),
        previous_valid_until=None if row["previous_valid_until"] is None
        else float(row["previous_valid_until"]),
    )


class KeyStore:
    """Thread-safe (the Database is); call from worker threads in the gateway."""

    def __init__(self, db: Database, *, max_keys: int = 10_000) -> None:
        self.db = db
        self.max_keys = max_keys

    def _bump(self, conn: Any) -> None:
        conn.execute(self.db.upsert(kv, {"key": REVISION_KEY,
                                         "value": orjson.dumps(uuid.uuid4().hex).decode()},
                                    ["key"]))

    def revision(self) -> str | None:
        with self.db.connect("keys revision") as conn:
            raw = conn.execute(select(kv.c.value).where(kv.c.key == REVISION_KEY)).scalar_one_or_none()
        return None if raw is None else str(orjson.loads(raw))

    def load(self) -> list[ApiKey]:
        """Every key (revoked and expired ones too: the caller decides), at most max_keys + a
        margin: the table is bounded by `add`."""
        with self.db.connect("keys load") as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at)
                                .limit(self.max_keys + 1000)).mappings().all()
        return [_key(r) for r in rows]

    def add(self, key: ApiKey, *, now: float) -> None:
        """Insert a key; KeyLimitReached when `max_keys` are stored. Revoked or expired keys
        older than 30 days make room first (their history is not worth an unbounded table)."""
        with self.db.connect("keys add", write=True) as conn:
            count = conn.execute(select(func.count()).select_from(api_keys)).scalar_one()
            if count >= self.max_keys:
                cutoff = now - 30 * 86_400
                conn.execute(api_keys.delete().where(
                    ((api_keys.c.revoked_at.is_not(None)) & (api_keys.c.revoked_at < cutoff))
                    | ((api_keys.c.expires_at.is_not(None)) & (api_keys.c.expires_at < cutoff))))
                count = conn.execute(select(func.count()).select_from(api_keys)).scalar_one()
                if count >= self.max_keys:
                    raise KeyLimitReached(f"{count} keys are stored, the limit ([auth] max_keys); "
                                          "revoke some first")
            conn.execute(insert(api_keys).values(_row(key)))
            self._bump(conn)

    def ensure(self, key: ApiKey) -> bool:
        """Insert a key unless its id exists (a data directory's local admin key, written by
        whichever gateway started first). True if it was inserted."""
        with self.db.connect("keys ensure", write=True) as conn:
            inserted = conn.execute(self.db.insert_ignore(api_keys, _row(key))).rowcount
            if inserted:
                self._bump(conn)
        return bool(inserted)

    def revoke(self, key_id: str, *, now: float) -> bool:
        with self.db.connect("keys revoke", write=True) as conn:
            changed = conn.execute(update(api_keys).where(
                api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None)).values(
                revoked_at=now)).rowcount
            if changed:
                self._bump(conn)
        return bool(changed)

    def rotate(self, key_id: str, new_digest: str, *, grace_until: float | None) -> bool:
        """Give a key a new token; the old one stays valid until `grace_until` (None: not at all)."""
        with self.db.connect("keys rotate", write=True) as conn:
            old = conn.execute(select(api_keys.c.digest).where(
                api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))).scalar_one_or_none()
            if old is None:
                return False
            conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(
                digest=new_digest, previous_digest=old if grace_until is not None else None,
                previous_valid_until=grace_until))
            self._bump(conn)
        return True
