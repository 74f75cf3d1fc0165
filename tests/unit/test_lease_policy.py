"""policies.lease: whether a gateway leads, from its lease calls and the time (a table)."""

from __future__ import annotations

import pytest

from steadyserve.errors import NotLeader
from steadyserve.policies.lease import LEAD_SHARE, Alone, LeaseState, Seen

TTL = 10.0
MINE = Seen("gw-a#1", 7, "http://a", mine=True)
THEIRS = Seen("gw-b#2", 8, "http://b", mine=False)


@pytest.mark.parametrize(
    ("calls", "now", "leading", "alerting", "token", "holder"),
    [
        # nothing heard yet
        ([], 0.0, False, False, 0, ""),
        # a successful call at t=0: leads until 0 + TTL × LEAD_SHARE
        ([(MINE, 0.0)], 1.0, True, True, 7, "gw-a#1"),
        ([(MINE, 0.0)], TTL * LEAD_SHARE - 0.01, True, True, 7, "gw-a#1"),
        ([(MINE, 0.0)], TTL * LEAD_SHARE, False, False, 7, "gw-a#1"),
        # the deadline counts from when the call started, not when it answered
        ([(MINE, 5.0)], 5.0 + TTL * LEAD_SHARE + 0.01, False, False, 7, "gw-a#1"),
        # renewed: the deadline moves
        ([(MINE, 0.0), (MINE, 2.0)], 9.0, True, True, 7, "gw-a#1"),
        # another holds it: follow, remember who
        ([(THEIRS, 0.0)], 1.0, False, False, 0, "gw-b#2"),
        # lost it to another: stop at once, even before our own deadline
        ([(MINE, 0.0), (THEIRS, 2.0)], 3.0, False, False, 0, "gw-b#2"),
        # the store failed: lead until the last deadline, and no longer
        ([(MINE, 0.0), (None, 2.0)], 7.0, True, True, 7, "gw-a#1"),
        ([(MINE, 0.0), (None, 2.0), (None, 4.0), (None, 8.5)], 9.0, False, True, 7, "gw-a#1"),
        # ... the alerting duty stays with the last leader while the store is down,
        # and goes when the store answers that another leads
        ([(MINE, 0.0), (None, 9.0), (THEIRS, 20.0)], 21.0, False, False, 0, "gw-b#2"),
        # a follower whose store fails does not start alerting
        ([(THEIRS, 0.0), (None, 2.0)], 30.0, False, False, 0, "gw-b#2"),
        # the store back and ours again
        ([(MINE, 0.0), (None, 9.0), (MINE, 20.0)], 21.0, True, True, 7, "gw-a#1"),
    ],
)
def test_lease_state(calls: list[tuple[Seen | None, float]], now: float, leading: bool,
                     alerting: bool, token: int, holder: str) -> None:
    state = LeaseState()
    for seen, started in calls:
        state = state.after(seen, started, TTL)
    assert state.leading(now) is leading
    assert state.alerting(now) is alerting
    assert state.token == token
    assert state.holder == holder


def test_alone_leads_and_never_refuses() -> None:
    alone = Alone()
    assert alone.leading() and alone.alerting() and not alone.clustered
    assert alone.fence() is None
    alone.require("a rollout")  # no NotLeader


def test_not_leader_is_a_409() -> None:
    assert NotLeader.status == 409 and NotLeader.code == "not_leader"
