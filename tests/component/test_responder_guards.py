"""The responder's guards for actions that take a replica out of service: a failure of the
whole deployment is not a replica's to be restarted, and an ejected replica serves nothing."""

from __future__ import annotations

import pytest

from steadyserve.control.responder import Responder
from steadyserve.policies.actions import ActionGuard
from steadyserve.policies.alert_lifecycle import Alert

from .services import Echo

pytestmark = pytest.mark.asyncio


def replica_errors(replica: str, state: str = "firing") -> Alert:
    return Alert(key=f"ReplicaErrors/{replica}", rule="ReplicaErrors",
                 labels={"deployment": "echo", "replica": replica, "severity": "ticket"},
                 annotations={}, state=state, value=0.9, description="")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("active", "outcome"),
    [
        # all three replicas fail (every one 503s, a dependency is down): no restart
        ({"echo-0": "firing", "echo-1": "firing", "echo-2": "pending"}, "refused"),
        # one replica fails: restarted (no supervisor here, so the restart itself "fails")
        ({"echo-0": "firing"}, "failed"),
        ({"echo-0": "firing", "echo-1": "pending"}, "failed"),
        ({"echo-0": "firing", "echo-1": "resolved", "echo-2": "firing"}, "failed"),
    ],
)
async def test_a_replica_is_restarted_only_when_its_peers_do_not_fail_the_same_way(
        make_gateway, active, outcome):
    gateway, _, _ = await make_gateway({"echo": (Echo, 3)})
    responder = responder_for(gateway)
    alerts = [replica_errors(rid, state) for rid, state in active.items()]
    [record] = await responder.respond(alerts[0], ("restart_replica",), alerts)
    assert record["outcome"] == outcome, record
    if outcome == "refused":
        assert "every replica of echo has ReplicaErrors" in record["detail"]


async def test_an_ejected_replica_does_not_count_as_serving(make_gateway):
    gateway, _, _ = await make_gateway({"echo": (Echo, 3)})
    d = gateway.membership.get("echo")
    assert d is not None
    now = gateway.dispatcher.clock()
    for rid in ("echo-1", "echo-2"):  # ejected by hand (the share limit stops the dispatcher)
        e = next(e for e in d.endpoints if e.replica_id == rid)
        e.health = type(e.health)(ejections=1, ejected_until=now + 30)
    responder = responder_for(gateway)
    [record] = await responder.respond(replica_errors("echo-0"), ("restart_replica",))
    assert record["outcome"] == "refused"
    assert "would leave 0 serving replica(s)" in record["detail"], record


async def test_restarting_an_ejected_replica_takes_nothing_away(make_gateway):
    gateway, _, _ = await make_gateway({"echo": (Echo, 2)})
    d = gateway.membership.get("echo")
    assert d is not None
    e = next(e for e in d.endpoints if e.replica_id == "echo-0")
    e.health = type(e.health)(ejections=1, ejected_until=gateway.dispatcher.clock() + 30)
    responder = responder_for(gateway)
    [record] = await responder.respond(replica_errors("echo-0"), ("restart_replica",))
    assert record["outcome"] == "failed", record  # allowed (no supervisor here to do it)


def responder_for(gateway) -> Responder:
    """Automatic responses on this gateway's data plane, with no supervisor and no limits."""
    return Responder(gateway.controls, gateway.metrics, None,
                     ActionGuard(cooldown_s=0, max_per_hour=100), None)
