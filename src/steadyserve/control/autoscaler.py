"""The autoscaler: samples each autoscaled deployment's demand, asks `policies.autoscale`,
and sets the supervisor's replica count; every change is an event with its inputs.

The data plane reports demand (`demand(name)`: ongoing requests at the gateway) and asks for
a replica at once when a request arrives at a deployment with none (`activate`). The
supervisor's reconcile loop does the starting and the draining: a scale-down retires starting
replicas first, then the ones with the fewest requests outstanding, and a retired replica
finishes what it holds before it exits (SIGTERM, drain_timeout_s).

The loop catches and logs its own errors, and a deployment's trouble never stops another's.

Several gateways ([cluster]): each runs its own replicas, and only the leader decides. A
follower stores its demand each tick (`demand:<deployment>:<gateway_id>`) and adopts the
count the leader stores (`autoscale:<deployment>`); the leader decides on the busiest
gateway's demand (its own or a follower's report younger than `REPORT_FRESH_TICKS` ticks),
since each gateway routes only to its own replicas. A follower at zero replicas that gets a
request still scales itself up at once (the held requests must not wait for a leader's
tick); it adopts the leader's count again once the leader has stored one after that.
"""

from __future__ import annotations

import asyncio
import logging
import math
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
SCALE_KEY = "autoscale:{}"  # an autoscaled deployment's last count: a restart starts from it,
# and followers adopt the leader's (written by the supervisor)
DEMAND_KEY = "demand:{}:{}"  # deployment, gateway id: a follower's last demand report
REPORT_FRESH_TICKS = 3  # a report older than this many ticks is a gateway gone


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
        self.gateway_id = ""  # set with [cluster]: names this gateway's demand reports
        self.sampled: dict[str, float] = {}  # this gateway's last demand sample
        self.peer_demand: dict[str, float] = {}  # the busiest follower's (the leader reads)
        self.activated_at: dict[str, float] = {}  # a follower's own activations (wall time)
        self._task: asyncio.Task[None] | None = None

    # lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.policies and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="autoscaler")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    @property
    def interval_s(self) -> float:
        return min(p.cfg.interval_s for p in self.policies.values())

    async def _loop(self) -> None:
        while True:
            try:
                await self.share()
            except Exception:
                log.exception("sharing autoscaling state failed; continuing")
            self.tick()
            await asyncio.sleep(self.interval_s)

    async def share(self) -> None:
        """With [cluster]: the leader reads the followers' demand; a follower reports its
        own and adopts the leader's count."""
        store = self.supervisor.state_store
        lead = self.supervisor.lead
        if store is None or not lead.clustered:
            return
        leading = lead.leading()
        for name in self.policies:
            own = DEMAND_KEY.format(name, self.gateway_id)
            if leading:
                reports = await asyncio.to_thread(store.states_with_prefix, f"demand:{name}:")
                oldest = self.wall() - REPORT_FRESH_TICKS * self.interval_s
                self.peer_demand[name] = max(
                    (float(r["demand"]) for k, r in reports.items()
                     if k != own and isinstance(r, dict)
                     and isinstance(r.get("demand"), int | float) and r["demand"] >= 0
                     and isinstance(r.get("at"), int | float) and r["at"] >= oldest),
                    default=0.0)
                continue
            self.peer_demand[name] = 0.0
            report = {"demand": round(self.sampled.get(name, 0.0), 4), "at": self.wall()}
            await asyncio.to_thread(store.put_state, own, report)
            self._adopt(name, await asyncio.to_thread(store.get_state, SCALE_KEY.format(name)))

    def _adopt(self, name: str, stored: Any) -> None:
        """A follower takes the leader's count, unless it activated itself since."""
        if not isinstance(stored, dict) or type(stored.get("replicas")) is not int \
                or not isinstance(stored.get("at"), int | float):
            return
        if stored["at"] <= self.activated_at.get(name, -math.inf):
            return  # older than this gateway's own activation: wait for the leader's next word
        policy = self.policies[name]
        n = max(policy.cfg.min_replicas, min(policy.max_replicas, stored["replicas"]))
        current = self.supervisor.replica_target(name)
        if n != current:
            self._apply(name, Decision(n, current, "the leader's count",
                                       {"stored_at": stored["at"]}))

    def tick(self) -> None:
        now = self.clock()
        for name in self.policies:
            try:
                self._step(name, now, sample=True)
            except Exception:  # one deployment's trouble never stops the others' scaling
                log.exception("autoscaling step failed", extra={"deployment": name})

    def _step(self, name: str, now: float, *, sample: bool, held: float = 0.0) -> Decision | None:
        policy = self.policies[name]
        m = self.metrics
        leading = self.supervisor.lead.leading()
        if sample:
            demand = self.sample(name) if self.sample is not None else self.demand(name)
            self.sampled[name] = demand
            demand = max(demand, self.peer_demand.get(name, 0.0))
            m.autoscale_demand.labels(name).set(demand)
            if not leading:
                return None  # a follower reports its demand (share) and adopts the count
            policy.observe(now, demand)
        else:
            demand = max(self.demand(name), held)
            m.autoscale_demand.labels(name).set(demand)
        current = self.supervisor.replica_target(name)
        # between samples (an activation) it decides on the demand now, adding no sample: a
        # burst of held requests would otherwise weigh in the stable mean once per request
        decision = policy.decide(now, current, self.ready(name),
                                 demand_now=None if sample else demand)
        m.autoscale_panic.labels(name).set(1 if now < policy.panic_until else 0)
        if decision is not None and (leading or decision.direction == "up"):
            self._apply(name, decision)  # a follower only activates itself (held requests)
        m.autoscale_desired.labels(name).set(self.supervisor.replica_target(name))
        return decision

    # the data plane's and the responder's calls ------------------------------------------------
    def activate(self, name: str, held: float = 0.0) -> None:
        """A request arrived at a deployment with no ready replica: decide now, not a tick
        later (the held requests are in the demand; `held`: those another process of this
        gateway holds, which its last report may not show yet)."""
        policy = self.policies.get(name)
        if policy is None:
            return
        try:
            self._step(name, self.clock(), sample=False, held=held)
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
        leading = self.supervisor.lead.leading()
        if not leading and decision.reason != "the leader's count":
            self.activated_at[name] = self.wall()
        self.supervisor.scale(name, decision.desired, store=leading)
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
            "decided_here": self.supervisor.lead.leading(),
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
