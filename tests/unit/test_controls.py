"""gateway/controls.py: what the control plane reads from the data plane and does to it."""

from __future__ import annotations

import pytest

from steadyserve.config import DeploymentConfig, ResilienceConfig
from steadyserve.gateway.controls import DataPlaneControls
from steadyserve.gateway.dispatch import Dispatcher
from steadyserve.gateway.membership import Endpoint, Membership
from steadyserve.gateway.transport import Address
from steadyserve.observe.metrics import GatewayMetrics
from steadyserve.testing import FakeClock

pytestmark = pytest.mark.asyncio


def plane(clock: FakeClock) -> tuple[DataPlaneControls, Dispatcher, Membership]:
    membership = Membership([DeploymentConfig(name="d", service="m:C", replicas=2)])
    dispatcher = Dispatcher(None, GatewayMetrics(),  # type: ignore[arg-type]  # never sends
                            ResilienceConfig(limit_initial=8), clock=clock)
    for i in range(2):
        membership.add("d", Endpoint(f"d-{i}", Address("127.0.0.1", 9000 + i)), {})
    return DataPlaneControls(membership, dispatcher, clock=clock), dispatcher, membership


async def test_sampled_demand_is_the_time_weighted_mean_since_the_last_sample():
    clock = FakeClock()
    controls, dispatcher, membership = plane(clock)
    adm = dispatcher.state(membership.deployments["d"]).admission
    assert controls.sample_demand("d") == 0.0  # the first: the count now
    # one request for 0.1 s out of every 0.5 s: an instant count would read 0 or 1 by phase
    for _ in range(4):
        await adm.acquire("interactive", clock.now + 10)
        clock.advance(0.1)
        adm.release()
        clock.advance(0.4)
    assert controls.sample_demand("d") == pytest.approx(0.2)
    await adm.acquire("interactive", clock.now + 10)
    await adm.acquire("interactive", clock.now + 10)
    clock.advance(1.0)
    assert controls.sample_demand("d") == pytest.approx(2.0)
    assert controls.demand("d") == 2.0  # the instant count, for status and activation


async def test_actions_reach_the_data_plane_and_unknown_deployments_are_refused():
    clock = FakeClock()
    controls, dispatcher, membership = plane(clock)
    assert [(r.replica_id, r.ejected) for r in controls.replicas("d") or []] == [
        ("d-0", False), ("d-1", False)]
    assert controls.replicas("nope") is None
    assert controls.eject("d", "d-1") and not controls.eject("nope", "d-1")
    assert [r.ejected for r in controls.replicas("d") or []] == [False, True]
    assert controls.shed_batch("d", 30) and not controls.shed_batch("nope", 30)
    adm = dispatcher.state(membership.deployments["d"]).admission
    assert adm.shed_batch_until == clock.now + 30
    assert "disabled" in (controls.serve_stale("d", 60) or "")
    assert controls.ready("d") == 2
