"""The supervisor: one reconcile loop over desired vs actual replicas.

Each deployment has `replicas` slots. A slot walks
    backoff → starting → ready ⇄ unhealthy → (exit) → backoff → …
A replica process that exits is taken out of rotation the moment its exit is seen (a
watcher task per process) and restarted after an exponential, jittered backoff that resets
once it has stayed ready for a while. It returns to rotation only when its /readyz says so.
Health: /readyz every second and a deep check (the model thread plus each handler's canary,
through the batcher) every few seconds; a replica unhealthy for too long — a wedged event
loop or model — is killed and restarted. Rollouts replace a deployment's replicas one at a
time: start new, wait ready, shift, drain old. Every loop iteration catches and logs its own
errors, and probes run as their own tasks: a slow replica never stalls the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from .. import codec
from ..config import Config, DeploymentConfig
from ..errors import ClientError, ConfigError, ReplicaUnavailable, SteadyError
from ..gateway.membership import Endpoint, Membership
from ..gateway.transport import Address, Transport
from ..observe.metrics import REPLICA_STATES, GatewayMetrics
from ..policies.backoff import Backoff
from ..replica.blackbox import read_flight_record
from .launcher import LaunchedReplica, LocalLauncher

log = logging.getLogger("steadyserve.supervisor")

STABLE_AFTER_S = 30.0  # ready this long → the next crash restarts with the shortest backoff
ROLLOUT_FIELDS = ("service", "replicas", "balancer", "torch_threads", "env",
                  "max_connections_per_replica")


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
    last_deep_at: float = 0.0
    unhealthy_since: float = 0.0
    info: dict[str, Any] | None = None
    endpoint: Endpoint | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    retired: bool = False  # replaced by a rollout: drain, exit, never restart
    watcher: asyncio.Task[None] | None = None
    probe: asyncio.Task[None] | None = None

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
        self.revisions = {d.name: 0 for d in config.deployments}
        self.previous: dict[str, DeploymentConfig] = {}  # the config before the last rollout
        self.crash_listeners: list[Callable[[str, list[str]], None]] = []
        self.stopping = False
        self._task: asyncio.Task[None] | None = None
        self._rollout_locks: dict[str, asyncio.Lock] = {}

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
        await self._terminate([s for s in self.slots if s.replica is not None])
        for s in self.slots:
            for task in (s.watcher, s.probe):
                if task is not None:
                    task.cancel()
        self._export_states()

    # reconcile -------------------------------------------------------------------------
    async def reconcile_once(self) -> None:
        now = self.clock()
        for slot in list(self.slots):
            if slot.retired:
                continue
            if slot.state == "backoff" and now >= slot.next_start_at:
                await self._spawn(slot, now)
            elif slot.state == "starting":
                if now - slot.started_at > self.cfg.ready_timeout_s:
                    self._kill(slot, f"not ready after {self.cfg.ready_timeout_s:.0f}s")
                else:
                    self._probe(slot, self._probe_starting(slot))
            elif slot.state in ("ready", "unhealthy"):
                if slot.state == "unhealthy" and \
                        now - slot.unhealthy_since >= self.cfg.restart_unhealthy_after_s:
                    self._kill(slot, f"unhealthy for {now - slot.unhealthy_since:.0f}s (wedged?)")
                elif now - slot.last_deep_at >= self.cfg.deep_health_interval_s:
                    slot.last_deep_at = slot.last_health_at = now
                    self._probe(slot, self._check_health(slot, deep=True))
                elif now - slot.last_health_at >= self.cfg.health_interval_s:
                    slot.last_health_at = now
                    self._probe(slot, self._check_health(slot, deep=False))
        self._export_states()

    def _probe(self, slot: Slot, probe: Coroutine[Any, Any, None]) -> None:
        """Run a probe as its own task, one at a time per slot, so the loop never waits on it."""
        if slot.probe is not None and not slot.probe.done():
            probe.close()
            return
        slot.probe = asyncio.get_running_loop().create_task(self._logged(probe))

    @staticmethod
    async def _logged(probe: Coroutine[Any, Any, None]) -> None:
        try:
            await probe
        except Exception:
            log.exception("replica probe failed")

    def _kill(self, slot: Slot, why: str) -> None:
        log.error("killing replica: %s", why, extra={"replica": slot.replica_id})
        if slot.replica:
            self.launcher.signal(slot.replica, signal.SIGKILL)

    async def _spawn(self, slot: Slot, now: float) -> None:
        slot.generation += 1
        slot.state = "starting"
        slot.started_at = now
        slot.health_failures = 0
        slot.endpoint = None
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
        if slot.retired:
            if slot in self.slots:
                self.slots.remove(slot)
            self._export_states()
            return
        executing = read_flight_record(replica.flight_recorder)
        if executing:  # it died on its own while running these inputs: blame them
            for listener in self.crash_listeners:
                listener(slot.deployment.name, executing)
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

    async def _get(self, slot: Slot, path: str, timeout_s: float) -> tuple[int, bytes] | None:
        address = slot.address
        if address is None:
            return None
        reply = await self.transport.request(address, "GET", path, b"", [], timeout_s)
        return reply.status, reply.body

    async def _probe_starting(self, slot: Slot) -> None:
        generation = slot.generation
        timeout = self.cfg.health_timeout_s
        try:
            got = await self._get(slot, "/readyz", timeout)
            if got is None or got[0] != 200:
                return
            info = await self._get(slot, "/info", timeout)
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
        slot.unhealthy_since = 0.0
        if slot.endpoint is None:
            slot.endpoint = Endpoint(slot.replica_id, slot.address)
        self.membership.add(slot.deployment.name, slot.endpoint, slot.info)

    async def _check_health(self, slot: Slot, *, deep: bool) -> None:
        generation = slot.generation
        path, timeout = ("/healthz/deep", self.cfg.deep_health_timeout_s) if deep else \
            ("/readyz", self.cfg.health_timeout_s)
        refused = False
        try:
            got = await self._get(slot, path, timeout)
            healthy = got is not None and got[0] == 200
            reason = "" if healthy or got is None else got[1].decode(errors="replace")[:200]
        except ReplicaUnavailable as exc:  # refused: nothing listens; a reset may be a blip
            healthy, refused, reason = False, exc.refused, exc.message
        except SteadyError as exc:
            healthy, reason = False, exc.message
        if slot.generation != generation or slot.state not in ("ready", "unhealthy") \
                or slot.retired:
            return
        if healthy:
            if slot.state == "unhealthy":
                log.info("replica healthy again; back in rotation",
                         extra={"replica": slot.replica_id})
                self._enter_rotation(slot)
            slot.health_failures = 0
            return
        slot.health_failures += 1
        if slot.state == "ready" and (refused or slot.health_failures >= self.cfg.unhealthy_after):
            log.warning("replica failed %s health checks; out of rotation: %s",
                        "deep" if deep else "readiness", reason,
                        extra={"replica": slot.replica_id, "failures": slot.health_failures})
            slot.state = "unhealthy"
            slot.unhealthy_since = self.clock()
            self.membership.remove(slot.deployment.name, slot.replica_id)
            if slot.address is not None:  # requests stuck on it are retried elsewhere now
                self.transport.forget(slot.address)

    def replica_exited(self, replica_id: str) -> bool:
        """Has this replica's process died (exited, or a zombie not yet reaped)?"""
        for slot in self.slots:
            if slot.replica_id == replica_id and slot.replica is not None:
                if slot.replica.process.returncode is not None:
                    return True
                try:
                    with open(f"/proc/{slot.replica.pid}/stat", "rb") as f:
                        return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
                except (OSError, IndexError):
                    return True
        return False

    def report_unavailable(self, deployment: str, endpoint: Endpoint) -> None:
        """Passive health: the data plane could not reach a replica; check it on the next tick."""
        for slot in self.slots:
            if slot.replica_id == endpoint.replica_id:
                slot.last_health_at = 0.0

    # rollout -----------------------------------------------------------------------------------
    async def rollout(self, deployment: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Replace every replica of a deployment, one at a time, with no gap in service:
        start a new one, wait until ready (it joins rotation), then drain and stop an old one.
        A new replica that fails to become ready aborts the rollout; the old ones keep serving."""
        unknown = sorted(set(changes) - set(ROLLOUT_FIELDS))
        if unknown:
            raise ClientError(f"cannot roll out {unknown[0]!r}; settable: {list(ROLLOUT_FIELDS)}",
                              param=unknown[0])
        lock = self._rollout_locks.setdefault(deployment, asyncio.Lock())
        if lock.locked():
            raise ClientError(f"a rollout of {deployment!r} is already running")
        async with lock:
            old_cfg = self.membership.deployments[deployment].config
            values = dict(changes)
            if "env" in values:
                if not isinstance(values["env"], dict):
                    raise ClientError("'env' must be an object of strings", param="env")
                values["env"] = tuple((str(k), str(v)) for k, v in values["env"].items())
            try:
                new_cfg = dataclasses.replace(old_cfg, **values)
            except (ConfigError, TypeError) as exc:
                raise ClientError(f"invalid rollout: {exc}") from None
            self.revisions[deployment] += 1
            rev = self.revisions[deployment]
            self.previous[deployment] = old_cfg
            old = [s for s in self.slots if s.deployment.name == deployment and not s.retired]
            started = self.clock()
            log.info("rollout started", extra={"deployment": deployment, "revision": rev})
            for i in range(new_cfg.replicas):
                slot = Slot(new_cfg, f"{deployment}-r{rev}-{i}")
                self.slots.append(slot)
                if not await self._wait_ready(slot):
                    await self._retire([s for s in self.slots if s.deployment is new_cfg])
                    log.error("rollout aborted: a new replica did not become ready",
                              extra={"deployment": deployment, "revision": rev})
                    raise ClientError(
                        f"rollout of {deployment!r} aborted: replica {slot.replica_id} did not "
                        f"become ready (last exit code {slot.last_exit_code}); old replicas "
                        "still serve")
                if i == 0:
                    self.membership.reconfigure(new_cfg)
                if old:
                    await self._retire([old.pop(0)])
            await self._retire(old)  # scaled down: the rest go too
            log.info("rollout finished in %.1fs", self.clock() - started,
                     extra={"deployment": deployment, "revision": rev})
            return {"deployment": deployment, "revision": rev, "replicas": self.status(deployment),
                    "duration_s": round(self.clock() - started, 2)}

    async def _wait_ready(self, slot: Slot) -> bool:
        deadline = self.clock() + self.cfg.ready_timeout_s
        while self.clock() < deadline and not self.stopping:
            if slot.state == "ready":
                return True
            if slot.restarts >= 2:
                return False  # crash-looping: the new version is broken
            await asyncio.sleep(0.05)
        return False

    async def _retire(self, slots: list[Slot]) -> None:
        """Replaced by a rollout: drain and stop, never restart."""
        for slot in slots:
            slot.retired = True
        await self._terminate(slots)
        for slot in slots:
            if slot in self.slots:
                self.slots.remove(slot)
        self._export_states()

    async def _terminate(self, slots: list[Slot]) -> None:
        """Staged: out of rotation at once, SIGTERM (in-flight work drains), wait, SIGKILL."""
        live = [s for s in slots if s.replica is not None and s.replica.process.returncode is None]
        for slot in live:
            self.membership.remove(slot.deployment.name, slot.replica_id)
            slot.state = "stopping"
            assert slot.replica is not None
            self.launcher.signal(slot.replica, signal.SIGTERM)
        if not live:
            return
        waits = [asyncio.ensure_future(s.replica.process.wait()) for s in live if s.replica]
        _, pending = await asyncio.wait(waits, timeout=self.cfg.drain_timeout_s + 1)
        if pending:
            log.warning("%d replica(s) did not drain in time; killing", len(pending))
            for slot in live:
                if slot.replica is not None:
                    self.launcher.signal(slot.replica, signal.SIGKILL)
            await asyncio.wait(pending, timeout=5)

    async def rollback(self, deployment: str) -> dict[str, Any]:
        """Roll back to the config before the last rollout."""
        previous = self.previous.get(deployment)
        if previous is None:
            raise ClientError(f"{deployment!r} has had no rollout to roll back")
        changes = {f: getattr(previous, f) for f in ROLLOUT_FIELDS}
        changes["env"] = dict(previous.env)
        return await self.rollout(deployment, changes)

    def restart(self, replica_id: str) -> bool:
        """Restart one replica (an automatic response): out of rotation, SIGTERM so in-flight
        work drains, and the watcher starts a fresh process."""
        for slot in self.slots:
            if slot.replica_id == replica_id and slot.replica is not None \
                    and slot.replica.process.returncode is None and not slot.retired:
                self.membership.remove(slot.deployment.name, slot.replica_id)
                slot.state = "stopping"
                self.launcher.signal(slot.replica, signal.SIGTERM)
                return True
        return False

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
                "ejected": bool(s.endpoint and s.endpoint.health.ejected_until > 0),
            }
            for s in self.slots if s.deployment.name == deployment
        ]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {d: dict.fromkeys(REPLICA_STATES, 0)
                                          for d in self.membership.deployments}
        for s in self.slots:
            out[s.deployment.name][s.state] += 1
        return out

    def _export_states(self) -> None:
        for name, by_state in self.counts().items():
            for state, n in by_state.items():
                self.metrics.replicas.labels(name, state).set(n)
