"""Leases in the database (the `leases` table of `store.database`): which gateway leads.

One row per lease. `acquire` is a single conditional UPDATE in a write transaction: the
holder renews its own lease (the token stays), anyone takes an expired one (the token goes
up by one), and a gateway takes a lease its own earlier incarnation left behind (same
gateway_id, another process: the token goes up) without waiting for it to expire. Expiry is
judged by the database's clock, never a gateway's, so gateways whose clocks disagree still
agree on who leads. The token is the fence: `Database.put_state(..., fence=...)` writes only
while the lease still carries it, so a deposed leader that wakes from a pause cannot
overwrite its successor's decisions.

Why the database and not a PostgreSQL advisory lock or a Redis lease: the lease must hold
for SQLite too (two gateways on one machine), it yields a token that the same database
checks on every fenced write in one transaction, and Redis is optional.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, case, func, or_, select, text, update

from ..policies.lease import Fence, gateway_of
from .database import Database, leases

_NOW = {  # epoch seconds by the database server's clock
    "postgresql": "SELECT extract(epoch from clock_timestamp())::float8",
    "sqlite": "SELECT (julianday('now') - 2440587.5) * 86400.0",
}


@dataclass(frozen=True, slots=True)
class LeaseView:
    """A lease as one call saw it."""

    holder: str  # "" when nobody ever held it
    token: int
    expires_in_s: float  # by the database's clock at the call; <= 0: expired
    url: str
    mine: bool

    @property
    def gateway_id(self) -> str:
        return gateway_of(self.holder)


def acquire(db: Database, name: str, holder: str, ttl_s: float, url: str = "") -> LeaseView:
    """Renew or take the lease for `ttl_s` if it is ours, expired, or our earlier
    incarnation's (`holder` is "<gateway_id>#<incarnation>"); read it either way."""
    own_prefix = gateway_of(holder) + "#"
    with db.connect("lease", write=True) as conn:
        conn.execute(db.insert_ignore(leases, {"name": name, "holder": "", "token": 0,
                                               "expires_at": 0.0, "url": "", "acquired_at": 0.0}))
        now = float(conn.execute(text(_NOW[db.dialect])).scalar_one())
        c = leases.c
        renewing = and_(c.holder == holder, c.expires_at >= now)
        conn.execute(
            update(leases)
            .where(c.name == name, or_(
                c.holder == holder, c.expires_at < now,
                and_(c.holder != "", func.substr(c.holder, 1, len(own_prefix)) == own_prefix)))
            .values(holder=holder, token=case((renewing, c.token), else_=c.token + 1),
                    expires_at=now + ttl_s, url=url,
                    acquired_at=case((renewing, c.acquired_at), else_=now))
        )
        row = conn.execute(select(c.holder, c.token, c.expires_at, c.url)
                           .where(c.name == name)).one()
    return LeaseView(str(row.holder), int(row.token), float(row.expires_at) - now,
                     str(row.url), row.holder == holder)


def release(db: Database, name: str, holder: str) -> bool:
    """Give the lease up now (a gateway stopping): another takes it at its next try instead
    of after the TTL. True if we held it."""
    with db.connect("lease release", write=True) as conn:
        return bool(conn.execute(
            update(leases).where(leases.c.name == name, leases.c.holder == holder)
            .values(expires_at=0.0)
        ).rowcount)


def fence(view: LeaseView, name: str) -> Fence:
    """What a write must carry to count as this holder's (see `Database.put_state`)."""
    return (name, view.holder, view.token)
