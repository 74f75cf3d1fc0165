"""store.lease and control.leadership on the real databases (a SQLite file, PostgreSQL):
one holder at a time, renewals keep the token and takeovers raise it, fenced writes from a
deposed holder are refused, a restarted gateway takes its own lease back at once, and a
race of many takers has exactly one winner."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from steadyserve.config import ClusterConfig
from steadyserve.control.leadership import LEASE, Leadership
from steadyserve.errors import NotLeader
from steadyserve.observe.metrics import GatewayMetrics
from steadyserve.store import Database, Fenced
from steadyserve.store.lease import acquire, fence, release


def test_one_holder_renewals_keep_the_token_takeovers_raise_it(db: Database) -> None:
    a = acquire(db, "l", "a#1", ttl_s=30, url="http://a")
    assert (a.mine, a.holder, a.token, a.url) == (True, "a#1", 1, "http://a")
    assert 29 < a.expires_in_s <= 30
    b = acquire(db, "l", "b#1", ttl_s=30)
    assert (b.mine, b.holder, b.token, b.gateway_id) == (False, "a#1", 1, "a")
    assert acquire(db, "l", "a#1", ttl_s=30).token == 1  # a renewal
    # expired: the next taker gets it with a new token
    acquire(db, "l", "a#1", ttl_s=0.2)
    time.sleep(0.4)
    b = acquire(db, "l", "b#1", ttl_s=30)
    assert (b.mine, b.token) == (True, 2)
    assert not acquire(db, "l", "a#1", ttl_s=30).mine


def test_fenced_writes_are_refused_once_the_lease_moved(db: Database) -> None:
    a = acquire(db, "l", "a#1", ttl_s=0.2)
    db.put_state("k", {"by": "a"}, fence(a, "l"))
    time.sleep(0.4)
    b = acquire(db, "l", "b#1", ttl_s=30)
    with pytest.raises(Fenced):
        db.put_state("k", {"by": "a, late"}, fence(a, "l"))
    db.put_state("k", {"by": "b"}, fence(b, "l"))
    assert db.get_state("k") == {"by": "b"}
    with pytest.raises(Fenced):  # a lease that never existed fences everything out
        db.put_state("k", {"by": "?"}, ("other", "b#1", 1))


def test_a_restarted_gateway_takes_its_lease_back_at_once_and_release_hands_it_over(
        db: Database) -> None:
    old = acquire(db, "l", "gw:8000#old", ttl_s=60)
    new = acquire(db, "l", "gw:8000#new", ttl_s=60)  # same gateway id, a new process
    assert (new.mine, new.token) == (True, old.token + 1)
    with pytest.raises(Fenced):
        db.put_state("k", 1, fence(old, "l"))
    assert not acquire(db, "l", "other:9000#x", ttl_s=60).mine
    assert release(db, "l", "gw:8000#new")
    taken = acquire(db, "l", "other:9000#x", ttl_s=60)
    assert (taken.mine, taken.token) == (True, new.token + 1)


def test_many_takers_racing_for_a_free_lease_have_one_winner(db: Database) -> None:
    winners: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def take(i: int) -> None:
        start.wait()
        try:
            if acquire(db, "race", f"g{i}#1", ttl_s=30).mine:
                winners.append(f"g{i}")
        except BaseException as exc:  # a lock timeout would be a bug here, not a loss
            errors.append(exc)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(winners) == 1


def test_states_with_prefix(db: Database) -> None:
    for key in ("demand:a:g1", "demand:a:g2", "demand:ab:g1", "demand_a"):
        db.put_state(key, {"k": key})
    assert sorted(db.states_with_prefix("demand:a:")) == ["demand:a:g1", "demand:a:g2"]
    assert db.states_with_prefix("demand:a:", limit=1) == {"demand:a:g1": {"k": "demand:a:g1"}}


async def test_two_gateways_one_leads_and_a_stopping_one_hands_over(db: Database) -> None:
    cfg = ClusterConfig(enabled=True, lease_ttl_s=3.0, renew_interval_s=1.0,
                        advertise_url="http://gw-a:8000")
    a = Leadership(db, cfg, "gw-a", GatewayMetrics())
    b = Leadership(db, ClusterConfig(enabled=True, lease_ttl_s=3.0, renew_interval_s=1.0),
                   "gw-b", GatewayMetrics())
    elected: list[str] = []
    b.on_elected.append(lambda: elected.append("b"))
    await a.start()
    await b.start()
    try:
        assert a.leading() and not b.leading()
        assert b.status()["leader"] == "gw-a" and b.status()["leader_url"] == "http://gw-a:8000"
        with pytest.raises(NotLeader, match="Leader: gw-a at http://gw-a:8000"):
            b.require("a rollout")
        a.require("a rollout")
        assert a.metrics.cluster_leader._value.get() == 1
        assert b.metrics.cluster_leader._value.get() == 0
        await a.stop()  # releases the lease
        assert not a.leading()
        await b.try_once()
        assert b.leading() and elected == ["b"]
        assert b.status()["token"] == 2
        db.put_state("k", 1, b.fence())
        with pytest.raises(Fenced):
            db.put_state("k", 2, (LEASE, a.holder, 1))
    finally:
        await b.stop()
        await asyncio.sleep(0)
