"""Which gateway leads: a lease in the shared database, renewed by a background loop.

Singleton duties ask `leading()` each time they act: alert evaluation and notification
(`alerting()`), autoscaling decisions, and rollouts (the supervisor). A gateway that does
not lead follows: it converges its own replicas on the targets and counts the leader
stores, and refuses rollout changes with 409 `not_leader`, naming the leader. Every write a
duty makes to the shared state carries the lease's fencing token (`fence()`), so a leader
that stalled past its lease cannot overwrite what its successor decided.

`Alone` stands in when [cluster] is off: this gateway leads, and writes are not fenced.
The lease calls run on a thread of their own, each bounded by the renew interval; a call
still hanging counts as a failed one rather than queueing another behind it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..config import ClusterConfig
from ..errors import NotLeader
from ..observe.metrics import GatewayMetrics
from ..policies.lease import Fence, LeaseState, Seen, gateway_of
from ..store import Database, DatabaseUnavailable
from ..store.lease import acquire, release
from ..tasks import cancel_and_wait, consume_outcome

log = logging.getLogger("steadyserve.cluster")

LEASE = "leader"


def default_gateway_id(port: int) -> str:
    return f"{socket.gethostname()}:{port}"


class Leadership:
    clustered = True

    def __init__(self, db: Database, cfg: ClusterConfig, gateway_id: str,
                 metrics: GatewayMetrics, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.cfg = cfg
        self.gateway_id = gateway_id
        # a restart is a new incarnation: it takes over its predecessor's lease at once
        self.holder = f"{gateway_id}#{uuid.uuid4().hex[:8]}"
        self.metrics = metrics
        self.clock = clock
        self.state = LeaseState()
        self.on_elected: list[Callable[[], None]] = []  # run when this gateway starts leading
        self._was_leading = False
        self._calls = ThreadPoolExecutor(1, thread_name_prefix="steadyserve-lease")
        self._pending: asyncio.Future[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        metrics.cluster_leader.set(0)

    # lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.try_once()  # the first answer before the duties start
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="leadership")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self.leading():  # hand over now rather than after the TTL
            try:
                await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                    self._calls, release, self.db, LEASE, self.holder), self.cfg.renew_interval_s)
                log.info("gave up the cluster lease")
            except (DatabaseUnavailable, TimeoutError) as exc:
                log.warning("could not give up the cluster lease (it expires by itself): %s",
                            exc)
        self.state = LeaseState()
        self._changed()
        self._calls.shutdown(wait=False)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.renew_interval_s)
            try:
                await self.try_once()
            except Exception:
                log.exception("lease renewal failed; continuing")

    async def try_once(self) -> None:
        started = self.clock()
        seen: Seen | None = None
        if self._pending is not None and not self._pending.done():
            log.error("the last lease call is still hanging; counted as failed")
        else:
            call = self._pending = asyncio.get_running_loop().run_in_executor(
                self._calls, acquire, self.db, LEASE, self.holder, self.cfg.lease_ttl_s,
                self.cfg.advertise_url)
            call.add_done_callback(consume_outcome)
            try:
                view = await asyncio.wait_for(asyncio.shield(call), self.cfg.renew_interval_s)
                seen = Seen(view.holder, view.token, view.url, view.mine)
            except TimeoutError:
                log.error("lease call did not answer within %.1f s", self.cfg.renew_interval_s)
            except DatabaseUnavailable as exc:
                log.error("lease call failed: %s", exc)
        before = self.state
        self.state = self.state.after(seen, started, self.cfg.lease_ttl_s)
        if seen is not None and not seen.mine and seen.holder != before.holder:
            log.info("the cluster is led by %s", seen.holder or "nobody yet",
                     extra={"leader": seen.holder, "leader_url": seen.url})
        self._changed()

    def _changed(self) -> None:
        leading = self.state.leading(self.clock())
        self.metrics.cluster_leader.set(1 if leading else 0)
        if leading == self._was_leading:
            return
        self._was_leading = leading
        self.metrics.cluster_lease_changes.labels("gained" if leading else "lost").inc()
        if leading:
            log.warning("this gateway leads the cluster now (token %d)", self.state.token,
                        extra={"gateway_id": self.gateway_id, "token": self.state.token})
            for elected in self.on_elected:
                try:
                    elected()
                except Exception:
                    log.exception("a duty failed to take over")
        else:
            log.warning("this gateway no longer leads the cluster",
                        extra={"gateway_id": self.gateway_id})

    # what the duties ask ------------------------------------------------------------------------
    def leading(self) -> bool:
        now = self.clock()
        if self._was_leading and not self.state.leading(now):
            self._changed()  # the lease ran out between calls: say so at once
        return self.state.leading(now)

    def alerting(self) -> bool:
        return self.state.alerting(self.clock())

    def fence(self) -> Fence | None:
        return (LEASE, self.holder, self.state.token)

    def require(self, what: str) -> None:
        """NotLeader (409) unless this gateway leads: `what` is the refused duty."""
        if self.leading():
            return
        leader = gateway_of(self.state.holder) or "nobody (an election is under way)"
        where = f" at {self.state.url}" if self.state.url else ""
        raise NotLeader(f"{what} is done by the leading gateway; this one "
                        f"({self.gateway_id}) follows. Leader: {leader}{where}")

    def status(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "gateway_id": self.gateway_id,
            "leading": self.leading(),
            "leader": gateway_of(self.state.holder) or None,
            "leader_url": self.state.url or None,
            "token": self.state.token if self.leading() else None,
            "store_reachable": not self.state.store_down,
            "lease_ttl_s": self.cfg.lease_ttl_s,
        }
