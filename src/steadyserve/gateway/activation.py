"""Hold requests while an autoscaled deployment has no ready replica (scale from zero).

A request for an autoscaled deployment with nothing in rotation — scaled to zero, or its
replicas still starting — waits here instead of failing: its arrival asks the autoscaler for a
replica at once (`poke`), and it goes on the moment one enters rotation. The wait is bounded
three ways, each answered with a 503, `Retry-After` and the reason, never a hang (Knative's
activator held requests forever when scale-up failed, knative #13211; KServe timed clients
out while scaling from zero, kserve #1805):

    more than hold_max_requests already waiting          503 at once
    a replica of the deployment failed to start or        503 with the failure (the supervisor
      exited before it was ready, after this request        keeps trying; the next request
      arrived                                               waits for that attempt)
    activation_timeout_s passed, or the request's own     503 saying how long it waited
      deadline

The data plane sees the control plane only through the two callables it is given.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import NoReadyReplica
from .membership import Deployment

POLL_S = 0.25  # how often a waiter looks for a failed start (entering rotation wakes it at once)


class ActivationFailed(NoReadyReplica):
    code = "activation_failed"


@dataclass(slots=True)
class _Held:
    count: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Activator:
    def __init__(
        self, *, poke: Callable[[str], None],
        failure: Callable[[str, float], str | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.poke = poke  # ask the autoscaler for a replica now
        self.failure = failure  # why the deployment's last start failed after a time, or None
        self.clock = clock
        self._held: dict[str, _Held] = {}

    def held(self, deployment: str) -> int:
        h = self._held.get(deployment)
        return h.count if h is not None else 0

    def changed(self, d: Deployment) -> None:
        """Membership changed: wake the deployment's waiters if a replica is in rotation."""
        h = self._held.get(d.name)
        if h is not None and d.endpoints:
            h.wake.set()

    async def hold(self, d: Deployment, deadline: float) -> None:
        """Return once `d` has a replica in rotation; ActivationFailed (503) otherwise."""
        cfg = d.config.autoscale
        assert cfg is not None
        h = self._held.setdefault(d.name, _Held())
        if h.count >= cfg.hold_max_requests:
            raise ActivationFailed(
                f"{h.count} requests already wait for deployment {d.name!r} to get a ready "
                f"replica (hold_max_requests = {cfg.hold_max_requests}); retry shortly",
                retry_after_s=1)
        arrived = self.clock()
        until = min(deadline, arrived + cfg.activation_timeout_s)
        h.count += 1
        try:
            self.poke(d.name)
            while not d.endpoints:
                why = self.failure(d.name, arrived)
                if why is not None:
                    raise ActivationFailed(
                        f"deployment {d.name!r} has no ready replica and starting one failed: "
                        f"{why}", retry_after_s=max(1, math.ceil(cfg.activation_timeout_s / 10)))
                left = until - self.clock()
                if left <= 0:
                    raise ActivationFailed(
                        f"no replica of deployment {d.name!r} became ready within "
                        f"{until - arrived:.1f}s of this request (scaling from zero)",
                        retry_after_s=max(1, math.ceil(cfg.activation_timeout_s / 10)))
                h.wake.clear()
                try:
                    await asyncio.wait_for(h.wake.wait(), min(POLL_S, left))
                except TimeoutError:
                    pass
        finally:
            h.count -= 1
