"""The one seam between the control plane and the data plane.

The control plane (supervisor, autoscaler, automatic responses) acts on the data plane only
through `DataPlaneControls`, and reads only what it reports: it never reaches into routing
internals (dispatcher state, admission queues, the cache). The other direction is just as
narrow: the supervisor gives the data plane membership (`Membership.add/remove/set_desired`)
and hears back about unreachable replicas (`report_unavailable`), crashes blamed on inputs
(`crash_listeners`) and held requests asking for a replica (`Activator.poke`).

    control → data plane            data plane → control
    membership, desired counts      demand (ongoing requests) and ready replicas, per deployment
    capacity on its way (scale-up)
    eject a replica                 replicas it could not reach
    shed batch traffic for a while  inputs executing when a replica died
    serve stale answers for a while a request waiting for a first replica

With data-plane workers (gateway.workers) the same object also sends every action to the
workers (`fanout`) and adds their reported demand (`remote_demand`); a worker applies what
arrives through its own `DataPlaneControls` (gateway.worker).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..cache.tiered import ResponseCache
from .dispatch import Dispatcher
from .membership import Membership


@dataclass(frozen=True, slots=True)
class ReplicaView:
    replica_id: str
    ejected: bool


class DataPlaneControls:
    def __init__(self, membership: Membership, dispatcher: Dispatcher,
                 cache: ResponseCache | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._membership = membership
        self._dispatcher = dispatcher
        self._cache = cache
        self._clock = clock
        self._last_sample: dict[str, tuple[float, float]] = {}
        # data-plane workers (gateway.workers): their demand is added to this process's,
        # and every action is sent to them too
        self.remote_demand: Callable[[str], float] = lambda deployment: 0.0
        self.fanout: Callable[[dict[str, Any]], None] = lambda message: None

    # reports ---------------------------------------------------------------------------------
    def replicas(self, deployment: str) -> list[ReplicaView] | None:
        """The replicas in rotation (None: no such deployment)."""
        d = self._membership.get(deployment)
        if d is None:
            return None
        return [ReplicaView(e.replica_id, e.health.ejected_until > 0) for e in d.endpoints]

    def demand(self, deployment: str) -> float:
        """Ongoing requests: in flight, queued for admission, held for a first replica."""
        return self._dispatcher.demand(self._membership.deployments[deployment]) \
            + self.remote_demand(deployment)

    def sample_demand(self, deployment: str) -> float:
        """The mean ongoing requests since the previous sample of this deployment (time-
        weighted: in flight and queued for admission), plus those held now. What the
        autoscaler observes each interval; the first sample is the instant count."""
        d = self._membership.deployments[deployment]
        area = self._dispatcher.ongoing_area(d)
        held = self._dispatcher.held(d)
        now = self._clock()
        last = self._last_sample.get(deployment)
        remote = self.remote_demand(deployment)
        if area is None:
            return self._dispatcher.demand(d) + remote
        self._last_sample[deployment] = (now, area)
        if last is None or now <= last[0]:
            return self._dispatcher.demand(d) + remote
        return (area - last[1]) / (now - last[0]) + held + remote

    def ready(self, deployment: str) -> int:
        return len(self._membership.deployments[deployment].endpoints)

    # actions ---------------------------------------------------------------------------------
    def eject(self, deployment: str, replica_id: str,
              reason: str = "an automatic action") -> bool:
        """Eject a replica as outlier detection would (share limit, probe, slow start)."""
        d = self._membership.get(deployment)
        self.fanout({"t": "eject", "deployment": deployment, "replica": replica_id})
        return d is not None and self._dispatcher.eject(d, replica_id, self._clock(), reason)

    def shed_batch(self, deployment: str, seconds: float) -> bool:
        """Refuse the deployment's batch-priority traffic for `seconds`."""
        d = self._membership.get(deployment)
        if d is None:
            return False
        self._dispatcher.state(d).admission.shed_batch_until = self._clock() + seconds
        self.fanout({"t": "shed_batch", "deployment": deployment, "seconds": seconds})
        return True

    def expect_capacity(self, deployment: str, seconds: float) -> None:
        """Replicas are starting for this deployment's demand: until they are in rotation
        (at most `seconds`), its interactive requests wait for a slot instead of being shed."""
        d = self._membership.get(deployment)
        if d is not None and len(d.endpoints) < d.desired_replicas:
            self._dispatcher.state(d).admission.scaling_up_until = self._clock() + seconds
            self.fanout({"t": "expect_capacity", "deployment": deployment, "seconds": seconds})

    def serve_stale(self, deployment: str, seconds: float) -> str | None:
        """Answer the deployment's cacheable requests from stale entries for `seconds`;
        why not, when it cannot."""
        if self._cache is None:
            return "the response cache is disabled ([cache] enabled = false)"
        self._cache.serve_stale(deployment, seconds)
        self.fanout({"t": "serve_stale", "deployment": deployment, "seconds": seconds})
        return None
