"""Several gateways ([cluster]) over one store: the leader's rollouts and autoscaling
decisions, followers converging on what it stored, a new leader finishing a rollout the
dead one started, and fenced writes refusing a deposed leader.

Two supervisor harnesses (fake launcher, transport and clock) share one store that checks
fences the way `store.Database.put_state` does; who leads is set by the test.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from steadyserve.control.supervisor import STATE_KEY
from steadyserve.errors import NotLeader
from steadyserve.store import Fenced

from .test_autoscaler import Scaled
from .test_supervisor import FakeStore, Harness

pytestmark = pytest.mark.asyncio


class FencedStore(FakeStore):
    """The fake store, refusing a fenced write whose token is not the current one."""

    def __init__(self) -> None:
        super().__init__()
        self.token = 1
        self.refused = 0

    def put_state(self, key: str, obj: Any, fence: Any = None) -> None:
        if fence is not None and fence[2] != self.token:
            self.refused += 1
            raise Fenced(f"token {fence[2]} is not {self.token}")
        super().put_state(key, obj)


class FakeLead:
    clustered = True

    def __init__(self, store: FencedStore, leading: bool) -> None:
        self.store = store
        self.is_leading = leading
        self.token = store.token if leading else 0

    def elect(self) -> None:
        self.store.token += 1
        self.token = self.store.token
        self.is_leading = True

    def leading(self) -> bool:
        return self.is_leading

    def alerting(self) -> bool:
        return self.is_leading

    def fence(self) -> tuple[str, str, int]:
        return ("leader", "gw", self.token)

    def require(self, what: str) -> None:
        if not self.is_leading:
            raise NotLeader(f"{what} is done by the leading gateway")

    def status(self) -> dict[str, Any]:
        return {"enabled": True, "leading": self.is_leading}


def pair(make: Any, store: FencedStore, **kw: Any) -> tuple[Any, Any]:
    leader, follower = make(store=store, **kw), make(store=store, **kw)
    leader.sup.lead = FakeLead(store, leading=True)
    follower.sup.lead = FakeLead(store, leading=False)
    return leader, follower


async def written(h: Harness) -> None:
    """Wait for the supervisor's store writes in flight (they run on a worker thread)."""
    while h.sup._writes:
        await asyncio.wait(list(h.sup._writes))


async def started(*hs: Harness) -> None:
    for h in hs:
        await h.start()
        await h.tick(2)


@pytest.fixture
async def harnesses():
    made: list[Harness] = []

    def make(cls: type[Harness] = Harness, **kw: Any) -> Any:
        h = cls(**kw)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.sup.stop()


async def test_a_follower_converges_on_the_leaders_rollout_and_refuses_to_start_one(harnesses):
    store = FencedStore()
    a, b = pair(harnesses, store)
    await started(a, b)
    with pytest.raises(NotLeader, match="a rollout is done by the leading gateway"):
        await b.sup.rollout("d", {"env": {"TAG": "v2"}})
    with pytest.raises(NotLeader):
        await b.sup.cancel_rollout("d")

    await a.sup.rollout("d", {"env": {"TAG": "v2"}})
    assert store.data[STATE_KEY.format("d")]["state"] == "rolling"
    b.clock.advance(b.sup.follow_interval_s)
    await b.tick()  # reads the record and starts converging on revision 1
    assert b.sup.rollout_status("d")["state"] == "rolling"
    for _ in range(60):
        await b.tick()
        if b.ready_ids() == ["d-r1-0", "d-r1-1"] and b.ids() == b.ready_ids():
            break
    assert b.ready_ids() == ["d-r1-0", "d-r1-1"]
    # converged, but "done" is the leader's verdict: the follower still says rolling
    assert b.sup.rollout_status("d")["state"] == "rolling"
    assert store.data[STATE_KEY.format("d")]["state"] == "rolling"

    await a.until("done")
    await written(a)  # the leader's write
    b.clock.advance(b.sup.follow_interval_s)
    await b.tick()
    got = b.sup.rollout_status("d")
    assert (got["state"], got["revision"], got["good_revision"]) == ("done", 1, 1)
    assert store.refused == 0


async def test_a_new_leader_finishes_the_rollout_of_a_dead_one_and_fences_it_out(harnesses):
    store = FencedStore()
    a, b = pair(harnesses, store)
    await started(a, b)
    await a.sup.rollout("d", {"env": {"TAG": "v2"}})  # then the leader stops ticking: dead
    b.clock.advance(b.sup.follow_interval_s)
    await b.tick(3)
    assert b.sup.rollout_status("d")["state"] == "rolling"

    b.sup.lead.elect()  # the lease moves to b (token 2)
    b.sup.elected()
    done = await b.until("done")
    await written(b)
    assert (done["revision"], done["good_revision"]) == (1, 1)
    assert b.ids() == b.ready_ids() == ["d-r1-0", "d-r1-1"]
    assert store.data[STATE_KEY.format("d")]["state"] == "done"

    # the old leader wakes up and writes what it believed: refused, the store keeps b's word
    a.sup.records["d"].state = "cancelled"
    await a.sup._persist("d")
    assert store.refused == 1
    assert store.data[STATE_KEY.format("d")]["state"] == "done"


async def test_a_just_elected_leader_reads_the_store_before_any_verdict(harnesses):
    """The old leader cancelled in its last second; the new one had not read that yet. Its
    first verdict must come after reading the store, not from its stale record."""
    store = FencedStore()
    a, b = pair(harnesses, store)
    await started(a, b)
    await a.sup.rollout("d", {"env": {"TAG": "v2"}})
    b.clock.advance(b.sup.follow_interval_s)
    await b.tick()
    assert b.sup.rollout_status("d")["state"] == "rolling"
    await a.sup.cancel_rollout("d")  # b does not read it before the lease moves
    b.sup.lead.elect()
    b.sup.elected()
    await b.tick(30)
    got = b.sup.rollout_status("d")
    assert (got["state"], got["target"]["revision"]) == ("cancelled", 0)
    assert b.ids() == b.ready_ids() == ["d-0", "d-1"]


async def test_only_the_leader_decides_counts_and_it_weighs_the_busiest_gateway(harnesses):
    store = FencedStore()
    a, b = pair(harnesses, store, cls=Scaled)
    a.sup.autoscaler.gateway_id, b.sup.autoscaler.gateway_id = "a", "b"
    await started(a, b)
    b.load = 6.0  # the follower is busy (target 2 per replica), the leader idle

    async def both() -> None:
        for h in (b, a):  # the follower reports first, then the leader reads and decides
            await h.sup.autoscaler.share()
            h.sup.autoscaler.tick()
            await h.tick()

    for _ in range(30):
        await both()
        if b.sup.replica_target("d") == 3:
            break
    assert a.sup.replica_target("d") == b.sup.replica_target("d") == 3
    assert store.data["demand:d:b"]["demand"] == 6.0
    assert "demand:d:a" not in store.data  # the leader reports nothing
    assert b.sup.autoscaler.events["d"][0]["reason"] == "the leader's count"
    assert not any(e["reason"] != "the leader's count" for e in b.sup.autoscaler.events["d"])
    assert b.sup.autoscaler.status("d")["decided_here"] is False


async def test_a_follower_at_zero_activates_itself_and_keeps_it_until_the_leader_agrees(harnesses):
    store = FencedStore()
    a, b = pair(harnesses, store, cls=Scaled, min_replicas=0)
    a.sup.autoscaler.gateway_id, b.sup.autoscaler.gateway_id = "a", "b"
    store.data["autoscale:d"] = {"replicas": 0, "at": 1.0}  # the leader's last word: zero
    for h in (a, b):
        h.sup.scale("d", 0, store=False)
        await h.start()
        await h.tick(2)
    b.load = 1.0
    b.sup.autoscaler.activate("d")  # a request held at the follower
    assert b.sup.replica_target("d") == 1
    await b.sup.autoscaler.share()  # the stored zero is older than the activation: kept
    assert b.sup.replica_target("d") == 1
    assert store.data["autoscale:d"]["replicas"] == 0  # a follower stores no count
