"""control/autoscaler.py with the supervisor and gateway/activation.py: scaling up, draining
down (starting and idle replicas first), scale to zero and back with held requests, failed
and slow scale-ups, the scale_up automatic response, and rollouts of autoscaled deployments.

The supervisor harness of test_supervisor (fake launcher, transport and clock); the
autoscaler's loop is not started: each test calls `tick()` between reconcile iterations.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from steadyserve.config import AutoscaleConfig
from steadyserve.control.responder import Responder
from steadyserve.errors import ClientError
from steadyserve.gateway.activation import ActivationFailed, Activator
from steadyserve.policies.actions import ActionGuard
from steadyserve.policies.alert_lifecycle import Alert

from .test_supervisor import TICK_S, FakeLauncher, FakeStore, Harness, data_plane, deployment

pytestmark = pytest.mark.asyncio

SCALE = AutoscaleConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=2,
                        upscale_delay_s=1, downscale_delay_s=2, scale_to_zero_delay_s=2,
                        stable_window_s=1, panic_window_s=0.4, panic_threshold=10,
                        interval_s=0.2, hold_max_requests=3, activation_timeout_s=5,
                        scale_up_hold_s=30)


class Scaled(Harness):
    """The harness with an autoscaled deployment, demand set by the test, and an activator
    wired as the gateway wires it."""

    def __init__(self, launcher: FakeLauncher | None = None, *, store: FakeStore | None = None,
                 **scale: Any) -> None:
        cfg = AutoscaleConfig(**{**_fields(SCALE), **scale})
        super().__init__(launcher, store=store, config=deployment(replicas=1, autoscale=cfg))
        self.load = 0.0
        self.activator = Activator(poke=self.sup.autoscaler.activate,
                                   failure=self.sup.start_failure, clock=self.clock)
        self.membership.on_change = self.activator.changed
        self.sup.autoscaler.demand = lambda name: self.load + self.activator.held(name)
        self.sup.autoscaler.ready = lambda name: len(self.membership.deployments[name].endpoints)
        self.sup.autoscaler.start = lambda: None  # type: ignore[method-assign]  # ticked by hand

    async def scale_ticks(self, n: int) -> None:
        for _ in range(n):
            self.sup.autoscaler.tick()
            await self.tick()

    @property
    def d(self) -> Any:
        return self.membership.deployments["d"]


def _fields(cfg: AutoscaleConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in cfg.__slots__}  # type: ignore[attr-defined]


@pytest.fixture
async def scaled():
    made: list[Scaled] = []

    def make(*args: Any, **kw: Any) -> Scaled:
        h = Scaled(*args, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.sup.stop()


async def test_follows_demand_up_at_once_per_step_and_drains_the_idlest_down(scaled):
    h = scaled()
    await h.start()
    await h.tick(2)
    assert h.ready_ids() == ["d-0"]
    h.load = 7.0  # 3.5 per replica on one: wants 4
    await h.scale_ticks(int(SCALE.upscale_delay_s / TICK_S) + 3)
    assert h.sup.replica_target("d") == 4
    assert h.ready_ids() == ["d-0", "d-1", "d-2", "d-3"]  # started together, not one by one
    [event] = h.sup.autoscaler.events["d"]
    assert (event["from"], event["to"], event["direction"]) == (1, 4, "up")
    assert event["inputs"]["stable_demand"] == 7.0 and event["inputs"]["ready"] == 1
    assert h.metrics.autoscale_desired.labels("d")._value.get() == 4

    # d-2 is busy, the others idle: the drop to 1 keeps d-2 and retires the idle ones
    busy = {e.replica_id: e for e in h.d.endpoints}
    busy["d-2"].outstanding = 3
    h.load = 1.0
    # the 1 s stable mean passes through 3 and 2 wanted on its way down: once the drop has
    # lasted the delay, the count follows the most wanted over the last 2 s, step by step
    await h.scale_ticks(2 * int((SCALE.downscale_delay_s + SCALE.stable_window_s) / TICK_S))
    assert h.sup.replica_target("d") == 1
    assert h.ready_ids() == ["d-2"]
    moves = [(e["from"], e["to"]) for e in reversed(h.sup.autoscaler.events["d"])]
    assert moves == [(1, 4), (4, 3), (3, 2), (2, 1)]
    # the retired ones were drained (SIGTERM), never killed
    for rid in ("d-0", "d-1", "d-3"):
        assert h.launcher.process(rid).signals == [15]


async def test_scale_down_retires_starting_replicas_before_running_ones(scaled):
    # d-2 and d-3 never get ready (loading weights); scale-down must take them, not d-0/d-1
    launcher = FakeLauncher(lambda config, rid: "hang" if rid in ("d-2", "d-3") else "ok")
    h = scaled(launcher)
    await h.start()
    h.load = 7.0
    await h.scale_ticks(int(SCALE.upscale_delay_s / TICK_S) + 3)
    assert h.sup.replica_target("d") == 4
    assert h.ready_ids() == ["d-0", "d-1"]
    h.load = 3.0  # wants 2
    await h.scale_ticks(2 * int((SCALE.downscale_delay_s + SCALE.stable_window_s) / TICK_S))
    assert h.sup.replica_target("d") == 2
    assert h.ids() == h.ready_ids() == ["d-0", "d-1"]


async def test_scale_to_zero_then_a_request_brings_one_back(scaled):
    h = scaled(min_replicas=0)
    await h.start()
    await h.tick(2)
    assert h.ready_ids() == ["d-0"]
    await h.scale_ticks(int((SCALE.stable_window_s + SCALE.scale_to_zero_delay_s) / TICK_S) + 5)
    assert h.sup.replica_target("d") == 0 and h.ids() == []
    assert "no requests" in h.sup.autoscaler.events["d"][0]["reason"]
    ok, _ = h.membership.readiness()
    assert ok  # scaled to zero on purpose: the gateway is still ready (it holds requests)

    held = asyncio.ensure_future(h.activator.hold(h.d, h.clock() + 30))
    await h.settle()
    assert h.sup.replica_target("d") == 1  # asked at once, not a tick later
    assert not held.done() and h.activator.held("d") == 1
    await h.tick(2)  # spawned, then probed ready
    await asyncio.wait_for(held, 1)
    assert h.activator.held("d") == 0
    assert h.sup.autoscaler.events["d"][0]["reason"].startswith("scale from zero")


async def at_zero(scaled, mode: str) -> Scaled:
    """A started deployment at zero replicas whose replicas, once launched, do `mode`."""
    h = scaled(FakeLauncher(lambda config, rid: mode), min_replicas=0)
    h.sup.desired["d"] = 0
    h.sup.slots.clear()
    await h.start()
    return h


async def test_held_requests_get_a_503_with_the_reason_when_the_start_fails(scaled):
    h = await at_zero(scaled, "crash")
    held = asyncio.ensure_future(h.activator.hold(h.d, h.clock() + 30))
    await h.settle()
    await h.tick(2)
    with pytest.raises(ActivationFailed) as exc:
        await asyncio.wait_for(held, 2)
    assert exc.value.status == 503 and exc.value.retry_after_s >= 1
    assert "exited with code 3 while starting" in exc.value.message


async def test_held_requests_get_a_503_when_no_replica_is_ready_in_time(scaled):
    h = await at_zero(scaled, "hang")
    held = asyncio.ensure_future(h.activator.hold(h.d, h.clock() + 30))
    await h.tick(2)
    assert not held.done()
    h.clock.advance(SCALE.activation_timeout_s)
    with pytest.raises(ActivationFailed) as exc:
        await asyncio.wait_for(held, 2)
    assert "within 5.0s" in exc.value.message and exc.value.status == 503


async def test_held_requests_are_bounded(scaled):
    h = await at_zero(scaled, "hang")
    waiting = [asyncio.ensure_future(h.activator.hold(h.d, h.clock() + 30)) for _ in range(3)]
    await h.settle()
    with pytest.raises(ActivationFailed) as exc:
        await h.activator.hold(h.d, h.clock() + 30)
    assert "hold_max_requests = 3" in exc.value.message
    for w in waiting:
        w.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert h.activator.held("d") == 0  # a waiter that went away gave its place back


async def test_scale_up_response_raises_the_floor_for_a_while(scaled):
    h = scaled()
    await h.start()
    await h.tick(2)
    responder = Responder(data_plane(h), h.metrics, h.sup,
                          ActionGuard(cooldown_s=0, max_per_hour=100), None, wall=lambda: 1.7e9)
    alert = Alert(key="k", rule="LatencySLOBurn", labels={"deployment": "d"}, annotations={},
                  state="firing", value=1.0, description="")
    [record] = await responder.respond(alert, ("scale_up",))
    assert record["outcome"] == "done", record
    assert h.sup.replica_target("d") == 2
    assert h.sup.autoscaler.events["d"][0]["reason"] == "scale_up response to alert LatencySLOBurn"
    # no demand, but the floor holds…
    await h.scale_ticks(int((SCALE.downscale_delay_s + SCALE.stable_window_s) / TICK_S) + 3)
    assert h.sup.replica_target("d") == 2
    # …until scale_up_hold_s has passed
    h.clock.advance(SCALE.scale_up_hold_s)
    await h.scale_ticks(int((SCALE.downscale_delay_s + SCALE.stable_window_s) / TICK_S) + 3)
    assert h.sup.replica_target("d") == 1


async def test_scale_up_response_on_a_fixed_deployment_says_why_not():
    h = Harness()
    await h.start()
    responder = Responder(data_plane(h), h.metrics, h.sup,
                          ActionGuard(cooldown_s=0, max_per_hour=100), None, wall=lambda: 1.7e9)
    alert = Alert(key="k", rule="LatencySLOBurn", labels={"deployment": "d"}, annotations={},
                  state="firing", value=1.0, description="")
    try:
        [record] = await responder.respond(alert, ("scale_up",))
    finally:
        await h.sup.stop()
    assert record["outcome"] == "unavailable"
    assert "[deployments.d.autoscale]" in record["detail"]


async def test_a_rollout_keeps_the_autoscaled_count_and_refuses_replicas(scaled):
    h = scaled()
    await h.start()
    h.load = 5.0
    await h.scale_ticks(int(SCALE.upscale_delay_s / TICK_S) + 3)
    assert h.sup.replica_target("d") == 3
    with pytest.raises(ClientError) as exc:
        await h.sup.rollout("d", {"replicas": 2})
    assert "autoscaled" in exc.value.message and exc.value.param == "replicas"
    await h.sup.rollout("d", {"service": "app.model:V2"})
    done = await h.until("done")
    assert done["progress"]["desired"] == 3
    assert h.ready_ids() == ["d-r1-0", "d-r1-1", "d-r1-2"]
    assert done["autoscale"]["desired"] == 3 and done["autoscale"]["events"]



async def test_a_restarted_gateway_starts_at_the_last_autoscaled_count(scaled):
    store = FakeStore()
    h = scaled(store=store)
    await h.start()
    h.load = 5.0
    await h.scale_ticks(int(SCALE.upscale_delay_s / TICK_S) + 3)
    assert h.sup.replica_target("d") == 3
    await h.sup.stop()
    assert store.data["autoscale:d"]["replicas"] == 3
    again = scaled(store=store)  # `replicas = 1` in the file; the stored count wins
    await again.start()
    await again.tick(2)
    assert again.sup.replica_target("d") == 3
    assert again.ready_ids() == ["d-0", "d-1", "d-2"]
    store.data["autoscale:d"] = {"replicas": 99}  # beyond today's max: clamped
    third = scaled(store=store)
    await third.start()
    assert third.sup.replica_target("d") == SCALE.max_replicas


async def test_a_scale_up_tells_the_data_plane_capacity_is_coming(scaled):
    h = scaled()
    told: list[tuple[str, float]] = []
    h.sup.autoscaler.expect = lambda name, seconds: told.append((name, seconds))
    await h.start()
    h.load = 5.0
    await h.scale_ticks(int(SCALE.upscale_delay_s / TICK_S) + 3)
    assert told == [("d", SCALE.activation_timeout_s)]
    h.load = 0.0
    await h.scale_ticks(2 * int((SCALE.downscale_delay_s + SCALE.stable_window_s) / TICK_S))
    assert told == [("d", SCALE.activation_timeout_s)]  # not on the way down
