"""The supervisor: one reconcile loop over desired vs actual replicas.

Each deployment has `replicas` slots. A slot walks
    backoff → starting → ready ⇄ unhealthy → (exit) → backoff → …
A replica process that exits is taken out of rotation the moment its exit is seen
(a watcher task per process), and restarted after an exponential, jittered backoff that
resets once it has stayed ready for a while. It returns to rotation only when its /readyz
says so. Every loop iteration catches and logs its own errors: the loop never dies silently.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import codec
from ..config import Config, DeploymentConfig
from ..errors import ReplicaUnavailable, SteadyError
from ..gateway.membership import Endpoint, Membership
from ..gateway.transport import Address, Transport
from ..observe.metrics import REPLICA_STATES, GatewayMetrics
from ..policies.backoff import Backoff
from .launcher import LaunchedReplica, LocalLauncher

log = logging.getLogger("steadyserve.supervisor")

STABLE_AFTER_S = 30.0  # ready this long → the next crash restarts with the shortest backoff


@dataclass(slots=True, eq=False)
class Slot:
    deployment: DeploymentConfig
    replica_id: str
    state: str = "backoff"
    replica: LaunchedReplica | None = None
    generation: int = 0
    attempts: int = 0
    next_start_at: float = 0.0
    started_at: float = 0.0
    ready_at: float = 0.0
    health_failures: int = 0
    last_health_at: float = 0.0
    info: dict[str, Any] | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    watcher: asyncio.Task[None] | None = None

    @property
    def address(self) -> Address | None:
        return Address(self.replica.host, self.replica.port) if self.replica else None


class Supervisor:
    def __init__(
        self, config: Config, membership: Membership, transport: Transport,
        metrics: GatewayMetrics, launcher: LocalLauncher | None = None,
        *, clock: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.cfg = config.supervisor
        self.membership = membership
        self.transport = transport
        self.metrics = metrics
        self.launcher = launcher or LocalLauncher(config)
        self.clock = clock
        self.rand = rand
        self.backoff = Backoff(base_s=self.cfg.restart_base_s, cap_s=self.cfg.restart_cap_s)
        self.slots = [
            Slot(d, f"{d.name}-{i}") for d in config.deployments for i in range(d.replicas)
        ]
        self.stopping = False
        self._task: asyncio.Task[None] | None = None

    # lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await self.reconcile_once()  # spawn everything now, not one tick later
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="supervisor")

    async def _loop(self) -> None:
        while not self.stopping:
            try:
                await self.reconcile_once()
            except Exception:
                log.exception("reconcile iteration failed; continuing")
            await asyncio.sleep(self.cfg.reconcile_interval_s)

    async def stop(self) -> None:
        """Staged: out of rotation, SIGTERM (replicas drain), wait, SIGKILL what is left."""
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        live = [s for s in self.slots if s.replica and s.replica.process.returncode is None]
        for s in live:
            self.membership.remove(s.deployment.name, s.replica_id)
            s.state = "stopping"
            assert s.replica is not None
            self.launcher.signal(s.replica, signal.SIGTERM)
        waits = [s.replica.process.wait() for s in live if s.replica]
        if waits:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(w) for w in waits], timeout=self.cfg.drain_timeout_s + 1
            )
            if pending:
                log.warning("%d replica(s) did not drain in time; killing", len(pending))
                for s in live:
                    if s.replica:
                        self.launcher.signal(s.replica, signal.SIGKILL)
                await asyncio.wait(pending, timeout=5)
        for s in self.slots:
            if s.watcher is not None:
                s.watcher.cancel()
        self._export_states()

    # reconcile -------------------------------------------------------------------------
    async def reconcile_once(self) -> None:
        now = self.clock()
        probes = []
        for slot in self.slots:
            if slot.state == "backoff" and now >= slot.next_start_at:
                await self._spawn(slot, now)
            elif slot.state == "starting":
                if now - slot.started_at > self.cfg.ready_timeout_s:
                    log.error("replica not ready after %.0fs; killing it", self.cfg.ready_timeout_s,
                              extra={"replica": slot.replica_id})
                    if slot.replica:
                        self.launcher.signal(slot.replica, signal.SIGKILL)
                else:
                    probes.append(self._probe_starting(slot))
            elif slot.state in ("ready", "unhealthy"):
                if now - slot.last_health_at >= self.cfg.health_interval_s:
                    slot.last_health_at = now
                    probes.append(self._check_health(slot))
        if probes:
            for result in await asyncio.gather(*probes, return_exceptions=True):
                if isinstance(result, Exception):
                    log.error("replica probe failed", exc_info=result)
        self._export_states()

    async def _spawn(self, slot: Slot, now: float) -> None:
        slot.generation += 1
        slot.state = "starting"
        slot.started_at = now
        slot.health_failures = 0
        try:
            slot.replica = await self.launcher.launch(slot.deployment, slot.replica_id)
        except SteadyError as exc:
            log.error("cannot start replica: %s", exc, extra={"replica": slot.replica_id})
            self._schedule_restart(slot, now)
            return
        log.info("replica started", extra={"replica": slot.replica_id, "pid": slot.replica.pid,
                                           "port": slot.replica.port})
        slot.watcher = asyncio.get_running_loop().create_task(
            self._watch(slot, slot.replica, slot.generation), name=f"watch-{slot.replica_id}"
        )

    async def _watch(self, slot: Slot, replica: LaunchedReplica, generation: int) -> None:
        code = await replica.process.wait()
        if slot.generation != generation:
            return
        self.membership.remove(slot.deployment.name, slot.replica_id)
        self.transport.forget(Address(replica.host, replica.port))
        slot.last_exit_code = code
        if self.stopping:
            return
        self.metrics.restarts.labels(slot.deployment.name).inc()
        slot.restarts += 1
        delay = self._schedule_restart(slot, self.clock())
        log.warning("replica exited with code %s; restarting in %.2fs", code, delay,
                    extra={"replica": slot.replica_id, "pid": replica.pid})
        self._export_states()

    def _schedule_restart(self, slot: Slot, now: float) -> float:
        if slot.ready_at and now - slot.ready_at >= STABLE_AFTER_S:
            slot.attempts = 0
        delay = self.backoff.delay(slot.attempts, self.rand())
        slot.attempts += 1
        slot.ready_at = 0.0
        slot.state = "backoff"
        slot.next_start_at = now + delay
        return delay

    async def _get(self, slot: Slot, path: str) -> tuple[int, bytes] | None:
        address = slot.address
        if address is None:
            return None
        reply = await self.transport.request(address, "GET", path, b"", [], self.cfg.health_timeout_s)
        return reply.status, reply.body

    async def _probe_starting(self, slot: Slot) -> None:
        generation = slot.generation
        try:
            got = await self._get(slot, "/readyz")
            if got is None or got[0] != 200:
                return
            info = await self._get(slot, "/info")
        except SteadyError:
            return  # still loading (or not listening yet)
        if info is None or slot.generation != generation or slot.state != "starting":
            return
        slot.info = codec.decode(info[1])
        self._enter_rotation(slot)
        log.info("replica ready in %.1fs", self.clock() - slot.started_at,
                 extra={"replica": slot.replica_id})

    def _enter_rotation(self, slot: Slot) -> None:
        assert slot.address is not None and slot.info is not None
        slot.state = "ready"
        slot.ready_at = slot.ready_at or self.clock()
        slot.health_failures = 0
        self.membership.add(slot.deployment.name, Endpoint(slot.replica_id, slot.address), slot.info)

    async def _check_health(self, slot: Slot) -> None:
        generation = slot.generation
        try:
            got = await self._get(slot, "/readyz")
            healthy = got is not None and got[0] == 200
            refused = False
        except ReplicaUnavailable:
            healthy, refused = False, True
        except SteadyError:
            healthy, refused = False, False
        if slot.generation != generation or slot.state not in ("ready", "unhealthy"):
            return
        if healthy:
            if slot.state == "unhealthy":
                log.info("replica healthy again; back in rotation", extra={"replica": slot.replica_id})
                self._enter_rotation(slot)
            slot.health_failures = 0
            return
        slot.health_failures += 1
        if slot.state == "ready" and (refused or slot.health_failures >= self.cfg.unhealthy_after):
            log.warning("replica failed health checks; out of rotation",
                        extra={"replica": slot.replica_id, "failures": slot.health_failures})
            slot.state = "unhealthy"
            self.membership.remove(slot.deployment.name, slot.replica_id)

    def report_unavailable(self, deployment: str, endpoint: Endpoint) -> None:
        """Passive health: the data plane could not reach a replica; check it on the next tick."""
        for slot in self.slots:
            if slot.replica_id == endpoint.replica_id:
                slot.last_health_at = 0.0

    # views -----------------------------------------------------------------------------------
    def status(self, deployment: str) -> list[dict[str, Any]]:
        now = self.clock()
        return [
            {
                "id": s.replica_id,
                "state": s.state,
                "pid": s.replica.pid if s.replica else None,
                "address": str(s.address) if s.address else None,
                "restarts": s.restarts,
                "last_exit_code": s.last_exit_code,
                "ready_for_s": round(now - s.ready_at, 1) if s.state == "ready" else 0.0,
            }
            for s in self.slots if s.deployment.name == deployment
        ]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for s in self.slots:
            by_state = out.setdefault(s.deployment.name, dict.fromkeys(REPLICA_STATES, 0))
            by_state[s.state] += 1
        return out

    def pids(self) -> list[int]:
        return [s.replica.pid for s in self.slots if s.replica and s.replica.process.returncode is None]

    def _export_states(self) -> None:
        for name, by_state in self.counts().items():
            for state, n in by_state.items():
                self.metrics.replicas.labels(name, state).set(n)
