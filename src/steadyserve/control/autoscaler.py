"""The autoscaler: samples each autoscaled deployment's demand, asks `policies.autoscale`,
and sets the supervisor's replica count; every change is an event with its inputs.

The data plane reports demand (`demand(name)`: ongoing requests at the gateway) and asks for
a replica at once when a request arrives at a deployment with none (`activate`). The
supervisor's reconcile loop does the starting and the draining: a scale-down retires starting
replicas first, then the ones with the fewest requests outstanding, and a retired replica
finishes what it holds before it exits (SIGTERM, drain_timeout_s).

The loop catches and logs its own errors, and a deployment's trouble never stops another's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import DeploymentConfig
from ..observe.metrics import GatewayMetrics
from ..policies.autoscale import Autoscale, Decision
from ..tasks import cancel_and_wait

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = logging.getLogger("steadyserve.autoscaler")

EVENTS_KEPT = 100  # per deployment, newest first


def ceiling(d: DeploymentConfig, machine_max: int) -> int:
    """An autoscaled deployment's most replicas: its autoscale max_replicas, within an
    explicit deployment max_replicas; otherwise what the machine holds (control.launcher)."""
    scale = d.autoscale
    assert scale is not None
    if scale.max_replicas is None:
        return machine_max
    if d.max_replicas is not None:
        return min(scale.max_replicas, d.max_replicas)
    return scale.max_replicas


def initial_replicas(d: DeploymentConfig, machine_max: int) -> int:
    """`replicas` clamped into [min_replicas, max]: the count an autoscaled deployment starts at."""
    assert d.autoscale is not None
    return max(d.autoscale.min_replicas, min(ceiling(d, machine_max), d.replicas))


class Autoscaler:
    def __init__(
        self, supervisor: Supervisor, metrics: GatewayMetrics, *,
        demand: Callable[[str], float] | None = None,
        sample: Callable[[str], float] | None = None,
        ready: Callable[[str], int] | None = None,
        expect: Callable[[str, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
    ) -> None:
        self.supervisor = supervisor
        self.metrics = metrics
        # the data plane's reports; unset (a control plane alone) reads as no demand
        self.demand = demand or (lambda name: 0.0)  # ongoing now (activation, status)
        self.sample = sample  # mean ongoing since the last sample; None: `demand` now
        self.ready = ready or (lambda name: 0)
        # tells the data plane that replicas are starting for its demand (wait, don't shed)
        self.expect = expect
        self.clock = clock
        self.wall = wall
        self.policies: dict[str, Autoscale] = {}
        self.events: dict[str, deque[dict[str, Any]]] = {}
        for d in supervisor.file_configs.values():
            if d.autoscale is not None:
                self.policies[d.name] = Autoscale(d.autoscale,
                                                  ceiling(d, supervisor.max_replicas[d.name]))
                self.events[d.name] = deque(maxlen=EVENTS_KEPT)
        self._task: asyncio.Task[None] | None = None

    # lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.policies and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="autoscaler")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _loop(self) -> None:
        interval = min(p.cfg.interval_s for p in self.policies.values())
        while True:
            self.tick()
            await asyncio.sleep(interval)

    def tick(self) -> None:
        now = self.clock()
        for name in self.policies:
            try:
                self._step(name, now, sample=True)
            except Exception:  # one deployment's trouble never stops the others' scaling
                log.exception("autoscaling step failed", extra={"deployment": name})

    def _step(self, name: str, now: float, *, sample: bool) -> Decision | None:
        policy = self.policies[name]
        if sample:
            demand = self.sample(name) if self.sample is not None else self.demand(name)
            policy.observe(now, demand)
        else:
            demand = self.demand(name)
        m = self.metrics
        m.autoscale_demand.labels(name).set(demand)
        current = self.supervisor.replica_target(name)
        # between samples (an activation) it decides on the demand now, adding no sample: a
        # burst of held requests would otherwise weigh in the stable mean once per request
        decision = policy.decide(now, current, self.ready(name),
                                 demand_now=None if sample else demand)
        m.autoscale_panic.labels(name).set(1 if now < policy.panic_until else 0)
        if decision is not None:
            self._apply(name, decision)
        m.autoscale_desired.labels(name).set(self.supervisor.replica_target(name))
        return decision

    # the data plane's and the responder's calls ------------------------------------------------
    def activate(self, name: str) -> None:
        """A request arrived at a deployment with no ready replica: decide now, not a tick
        later (the held requests are in the demand)."""
        policy = self.policies.get(name)
        if policy is None:
            return
        try:
            self._step(name, self.clock(), sample=False)
        except Exception:
            log.exception("activation failed", extra={"deployment": name})

    def boost(self, name: str, why: str) -> tuple[str, str]:
        """The scale_up automatic response: (outcome, detail) for the action record."""
        policy = self.policies.get(name)
        if policy is None:
            return "unavailable", (f"{name!r} has a fixed replica count; scale_up needs "
                                   f"[deployments.{name}.autoscale]")
        current = self.supervisor.replica_target(name)
        floor = policy.boost(self.clock(), current)
        if floor <= current:
            return "skipped", f"{name} already runs {current} replica(s), its maximum"
        self._apply(name, Decision(floor, current, f"scale_up response to {why}",
                                   {"current": current, "floor": floor,
                                    "hold_s": policy.cfg.scale_up_hold_s}))
        return "done", (f"scaled {name} from {current} to {floor} replica(s), kept at least "
                        f"that for {policy.cfg.scale_up_hold_s:g}s")

    def _apply(self, name: str, decision: Decision) -> None:
        self.supervisor.scale(name, decision.desired)
        if decision.direction == "up" and self.expect is not None:
            self.expect(name, self.policies[name].cfg.activation_timeout_s)
        event = {"at": self.wall(), "deployment": name, "from": decision.previous,
                 "to": decision.desired, "direction": decision.direction,
                 "reason": decision.reason, "inputs": decision.inputs}
        self.events[name].appendleft(event)
        self.metrics.autoscale_decisions.labels(name, decision.direction).inc()
        self.metrics.autoscale_desired.labels(name).set(decision.desired)
        log.info("autoscale %s: %d -> %d replicas (%s)", name, decision.previous,
                 decision.desired, decision.reason,
                 extra={"deployment": name, "inputs": decision.inputs})

    # views -------------------------------------------------------------------------------------
    def status(self, name: str) -> dict[str, Any] | None:
        policy = self.policies.get(name)
        if policy is None:
            return None
        now = self.clock()
        cfg = policy.cfg
        return {
            "desired": self.supervisor.replica_target(name),
            "min_replicas": cfg.min_replicas,
            "max_replicas": policy.max_replicas,
            "floor": policy.floor(now),
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "demand": round(self.demand(name), 3),
            "panicking": now < policy.panic_until,
            "delays_s": {"upscale": cfg.upscale_delay_s, "downscale": cfg.downscale_delay_s,
                         "scale_to_zero": cfg.scale_to_zero_delay_s},
            "events": list(self.events[name]),
        }
