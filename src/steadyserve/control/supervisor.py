"""The supervisor: one reconcile loop over desired vs actual replicas.

Each deployment has `replicas` slots. A slot walks
    backoff → starting → ready ⇄ unhealthy → (exit) → backoff → …
A replica process that exits is taken out of rotation the moment its exit is seen (a
watcher task per process) and restarted after an exponential, jittered backoff that resets
once it has stayed ready for a while. It returns to rotation only when its /readyz says so.
Health: /readyz every second and a deep check (the model thread plus each handler's canary,
through the batcher) every few seconds; a replica unhealthy for too long — a wedged event
loop or model — is killed and restarted. Every loop iteration catches and logs its own
errors, and probes run as their own tasks: a slow replica never stalls the loop.

Rollouts are not procedures but a stored target per deployment (`RolloutRecord`: the target
revision and its config, the last good one, the one before): a rollout, a cancel or a
rollback only changes the target, and each tick `policies.rollout.RolloutPolicy` says which
slot to start or retire next (one new replica at a time, an old one retired once a new one is
ready); a new replica that crash-loops or is never ready fails the rollout, which points the
target back at the last good revision, and the same loop converges on it — starting good
replicas again where old ones were already retired. A request that started a rollout can go
away; nothing is left half done.

The record is kept in memory and, when a `state_store` is given, written under
`rollout:<deployment>` after every change. A restarted gateway reads it back: if the
deployment's section of the configuration file is what it was when the record was written,
the gateway serves the stored target (a rollout that was running starts over from the last
good revision's replicas); if the file changed since, the file wins — it is the operator's
newer word — and the stored rollout is dropped, with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from .. import codec
from ..config import Config, DeploymentConfig
from ..errors import ConfigError, Conflict, NotFound, ReplicaUnavailable, SteadyError
from ..gateway.membership import Endpoint, Membership
from ..gateway.transport import Address, Transport
from ..observe.metrics import REPLICA_STATES, GatewayMetrics
from ..policies.backoff import Backoff
from ..policies.lease import Alone, Fence, Lead
from ..policies.rollout import (
    ROLLOUT_STATES,
    RolloutPolicy,
    SlotView,
    Target,
    apply_changes,
    config_from_fields,
    progress,
    rollout_fields,
)
from ..replica.blackbox import read_flight_record
from ..store.database import Fenced
from ..tasks import cancel_and_wait
from .autoscaler import SCALE_KEY, Autoscaler, initial_replicas
from .launcher import (
    LaunchedReplica,
    LocalLauncher,
    max_replicas,
    usable_cores,
    usable_memory_bytes,
)

log = logging.getLogger("steadyserve.supervisor")

STABLE_AFTER_S = 30.0  # ready this long → the next crash restarts with the shortest backoff
STATE_KEY = "rollout:{}"
RECORD_FORMAT = 1
PERSIST_ON_STOP_S = 5.0  # how long stopping waits for the last rollout state to be written


class StateStore(Protocol):
    """Where rollout targets outlive the process (`store.Database` fits)."""

    def get_state(self, key: str) -> Any: ...
    def put_state(self, key: str, obj: Any, fence: Fence | None = None) -> None: ...
    def states_with_prefix(self, prefix: str, limit: int = 1000) -> dict[str, Any]: ...


@dataclass(slots=True)
class RolloutRecord:
    """A deployment's stored target: what the reconcile loop converges on, and the way back."""

    base: str  # the deployment as the configuration file declared it (config_fingerprint)
    configs: dict[int, DeploymentConfig]  # for revision, target, good and previous
    revision: int = 0  # the latest rollout's revision (what its POST answered); 0: the file
    state: str = "done"  # rolling | done | failed | cancelled
    target: int = 0  # what the loop converges on: `revision`, or `good` after a failure
    good: int = 0  # the last revision a rollout finished (or the file's)
    previous: int | None = None  # the good revision before `good`: where a rollback goes
    next_revision: int = 1
    reason: str = ""
    started_at: float | None = None  # wall-clock
    finished_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT, "base": self.base, "revision": self.revision,
            "state": self.state, "target": self.target, "good": self.good,
            "previous": self.previous, "next_revision": self.next_revision,
            "reason": self.reason, "started_at": self.started_at,
            "finished_at": self.finished_at,
            "configs": {str(rev): rollout_fields(c) for rev, c in self.configs.items()},
        }

    @classmethod
    def from_json(cls, raw: Any, file_config: DeploymentConfig) -> RolloutRecord:
        """Rebuild a stored record over the file's config; ValueError when it is not one."""
        try:
            if raw.get("format") != RECORD_FORMAT:
                raise ValueError(f"unknown record format {raw.get('format')!r}")
            configs = {}
            for rev, fields in raw["configs"].items():
                configs[int(rev)] = config_from_fields(file_config, fields)
            record = cls(
                base=str(raw["base"]), configs=configs, revision=int(raw["revision"]),
                state=str(raw["state"]), target=int(raw["target"]), good=int(raw["good"]),
                previous=None if raw["previous"] is None else int(raw["previous"]),
                next_revision=int(raw["next_revision"]), reason=str(raw["reason"]),
                started_at=raw["started_at"], finished_at=raw["finished_at"],
            )
        except (AttributeError, KeyError, TypeError, ConfigError) as exc:
            raise ValueError(f"not a rollout record: {exc!r}") from None
        if record.state not in ROLLOUT_STATES or record.target not in configs \
                or record.good not in configs:
            raise ValueError("not a rollout record: state or revisions out of range")
        return record


def exit_reason(code: int | None, stopped_because: str = "", state: str = "",
                not_ready_because: str = "") -> str:
    """How a replica process ended, for people: what this supervisor did to it when it did
    ("killed: not ready after 180s"), else its signal or exit code, and whether it was still
    starting (with what its /readyz last said)."""
    if stopped_because:
        return stopped_because
    if code is None:
        why = "exited"
    elif code < 0:
        try:
            why = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            why = f"killed by signal {-code}"
    else:
        why = f"exited with code {code}"
    if state == "starting":
        why += f" while starting ({not_ready_because})" if not_ready_because else \
            " while starting"
    return why


def _readiness(body: bytes) -> str:
    """The reason in a not-ready /readyz answer (`{"status": "..."}`), bounded; "" when it
    says nothing of interest (still in setup, or draining on its way out after a failure)."""
    try:
        parsed = json.loads(body) if len(body) <= 4096 else None
    except ValueError:  # not JSON (or not UTF-8): nothing to show
        return ""
    status = parsed.get("status") if isinstance(parsed, dict) else None
    if not isinstance(status, str) or status in ("setup() running", "draining"):
        return ""
    return status[:200]


def config_fingerprint(config: DeploymentConfig) -> str:
    """Every field of a deployment's file config, canonically: equal iff the file is."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


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
    last_exit_reason: str | None = None  # "exited with code 1", "killed: …" (exit_reason)
    last_exit_at: float | None = None  # wall-clock
    stopped_because: str = ""  # why this supervisor signalled the running process, if it did
    not_ready_because: str = ""  # what the starting replica's /readyz last said
    retired: bool = False  # replaced by a rollout: drain, exit, never restart
    revision: int = 0  # the rollout revision whose config this slot runs
    created_at: float = 0.0
    was_ready: bool = False  # in rotation at least once since the slot was created
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
        wall: Callable[[], float] = time.time, state_store: StateStore | None = None,
    ) -> None:
        self.config = config
        self.cfg = config.supervisor
        self.membership = membership
        self.transport = transport
        self.metrics = metrics
        self.launcher = launcher or LocalLauncher(config)
        self.clock = clock
        self.rand = rand
        self.wall = wall
        self.state_store = state_store
        self.backoff = Backoff(base_s=self.cfg.restart_base_s, cap_s=self.cfg.restart_cap_s)
        self.policy = RolloutPolicy(max_restarts=self.cfg.rollout_max_restarts,
                                    ready_timeout_s=self.cfg.ready_timeout_s)
        self.file_configs = {d.name: d for d in config.deployments}
        cores, memory = usable_cores(), usable_memory_bytes()
        self.max_replicas = {d.name: max_replicas(d, cores, memory) for d in config.deployments}
        self.records = {d.name: RolloutRecord(base=config_fingerprint(d), configs={0: d})
                        for d in config.deployments}
        # autoscaled deployments: the count the autoscaler chose (rollouts keep it)
        self.desired = {d.name: initial_replicas(d, self.max_replicas[d.name])
                        for d in config.deployments if d.autoscale is not None}
        for name, n in self.desired.items():
            membership.set_desired(name, n)
        # why a replica of a deployment last failed to start (at, reason): held requests
        # waiting for a first replica are told at once
        self.start_failures: dict[str, tuple[float, str]] = {}
        now = clock()
        self.slots = [
            Slot(d, f"{d.name}-{i}", created_at=now)
            for d in config.deployments for i in range(self.desired.get(d.name, d.replicas))
        ]
        self.crash_listeners: list[Callable[[str, list[str]], None]] = []
        self.stopping = False
        self._task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._writes: set[asyncio.Task[None]] = set()
        self._write_lock = asyncio.Lock()
        # several gateways ([cluster]): rollout verdicts and stored writes are the leader's;
        # a follower converges its own replicas on the records the leader stores
        self.lead: Lead = Alone()
        self._followed: dict[str, Any] = {}  # the stored record last adopted, per deployment
        self._resync = False  # just elected: read the stored records before any verdict
        self._followed_at = -float("inf")
        self.autoscaler = Autoscaler(self, metrics, clock=clock, wall=wall)

    # lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        start_launcher = getattr(self.launcher, "start", None)
        if start_launcher is not None:  # Ray: join the cluster first
            await start_launcher()
        await self._restore()
        await self._restore_scale()
        await self.reconcile_once()  # spawn everything now, not one tick later
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="supervisor")
        self.autoscaler.start()

    async def _loop(self) -> None:
        while not self.stopping:
            try:
                await self._follow_soon()
                await self.reconcile_once()
            except Exception:
                log.exception("reconcile iteration failed; continuing")
            await asyncio.sleep(self.cfg.reconcile_interval_s)

    def elected(self) -> None:
        """This gateway leads now: read the stored records before its first verdict (the
        last leader may have changed them since this gateway last looked)."""
        self._resync = True

    async def _follow_soon(self) -> None:
        if self.state_store is None:
            return
        leading = self.lead.leading()
        now = self.clock()
        if self._resync and leading:
            await self.follow()
            self._resync = False
        elif not leading and now - self._followed_at >= self.follow_interval_s:
            self._followed_at = now
            await self.follow()

    @property
    def follow_interval_s(self) -> float:
        return self.config.cluster.follow_interval_s

    async def follow(self) -> None:
        """Adopt the rollout records the leader stored (a follower, or a gateway just elected)."""
        assert self.state_store is not None
        store = self.state_store
        for name, file_cfg in self.file_configs.items():
            try:
                raw = await asyncio.to_thread(store.get_state, STATE_KEY.format(name))
            except Exception as exc:
                log.error("could not read the leader's rollout record: %s", exc,
                          extra={"deployment": name})
                continue
            if raw is None or raw == self._followed.get(name):
                continue
            self._followed[name] = raw
            try:
                rec = RolloutRecord.from_json(raw, file_cfg)
            except ValueError as exc:
                log.error("ignoring the leader's rollout record: %s", exc,
                          extra={"deployment": name})
                continue
            if rec.base != self.records[name].base:
                log.error("ignoring the leader's rollout record: the leader's configuration of "
                          "this deployment differs from this gateway's file",
                          extra={"deployment": name})
                continue
            before = self.records[name]
            self.records[name] = rec
            self.membership.reconfigure(rec.configs[rec.target])
            if (before.revision, before.state, before.target) != (rec.revision, rec.state,
                                                                   rec.target):
                log.info("following the leader's rollout: revision %d (%s), target %d",
                         rec.revision, rec.state, rec.target, extra={"deployment": name})

    async def stop(self) -> None:
        """Staged: out of rotation, SIGTERM (replicas drain), wait, SIGKILL what is left."""
        self.stopping = True
        await self.autoscaler.stop()
        await cancel_and_wait(self._task)
        await self._terminate([s for s in self.slots if s.replica is not None])
        for s in self.slots:
            for task in (s.watcher, s.probe):
                if task is not None:
                    task.cancel()
        for retiring in list(self._retiring):  # their processes were just terminated above
            retiring.cancel()
        if self._writes:  # the last rollout state should reach the store
            await asyncio.wait(list(self._writes), timeout=PERSIST_ON_STOP_S)
        stop_launcher = getattr(self.launcher, "stop", None)
        if stop_launcher is not None:
            await stop_launcher()
        self._export_states()

    # reconcile -------------------------------------------------------------------------
    async def reconcile_once(self) -> None:
        now = self.clock()
        for name in self.records:
            try:
                self._converge(name, now)
            except Exception:  # one deployment's trouble never stops the others' health
                log.exception("rollout step failed", extra={"deployment": name})
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
            slot.stopped_because = f"killed: {why}"
            self.launcher.signal(slot.replica, signal.SIGKILL)

    async def _spawn(self, slot: Slot, now: float) -> None:
        slot.generation += 1
        slot.state = "starting"
        slot.started_at = now
        slot.health_failures = 0
        slot.endpoint = None
        slot.stopped_because = slot.not_ready_because = ""
        try:
            slot.replica = await self.launcher.launch(slot.deployment, slot.replica_id)
        except SteadyError as exc:
            log.error("cannot start replica: %s", exc, extra={"replica": slot.replica_id})
            self.start_failures[slot.deployment.name] = (now, f"cannot start a replica: "
                                                              f"{exc.message}")
            slot.last_exit_reason = f"could not start: {exc.message}"
            slot.last_exit_at = self.wall()
            slot.restarts += 1  # a failed start counts like a crash (a rollout fails on it)
            self._schedule_restart(slot, now)
            return
        log.info("replica started", extra={"replica": slot.replica_id, "pid": slot.replica.pid,
                                           "port": slot.replica.port})
        # the deployment's own pool size (a rollout may change it); transports without
        # per-replica pools (in-process ones) have nothing to size
        set_max = getattr(self.transport, "set_max_connections", None)
        if set_max is not None and slot.address is not None:
            set_max(slot.address, slot.deployment.max_connections_per_replica)
        slot.watcher = asyncio.get_running_loop().create_task(
            self._watch(slot, slot.replica, slot.generation), name=f"watch-{slot.replica_id}"
        )

    async def _watch(self, slot: Slot, replica: LaunchedReplica, generation: int) -> None:
        code = await replica.process.wait()
        if slot.generation != generation:
            return
        self.transport.forget(Address(replica.host, replica.port))
        slot.last_exit_code = code
        slot.last_exit_reason = exit_reason(code, slot.stopped_because, slot.state,
                                            slot.not_ready_because)
        last_words = getattr(self.launcher, "last_words", None)  # local replicas' log files
        said = last_words(slot.replica_id) if last_words is not None else None
        if said and not slot.stopped_because:
            slot.last_exit_reason += f"; its last error: {said}"
        slot.last_exit_at = self.wall()
        if slot.retired:  # out of rotation since it was retired: its id is not re-checked
            self._drop(slot)
            return
        self.membership.remove(slot.deployment.name, slot.replica_id)
        if self.stopping:
            return
        executing = read_flight_record(replica.flight_recorder)
        if executing:  # it died on its own while running these inputs: blame them
            for listener in self.crash_listeners:
                listener(slot.deployment.name, executing)
        self.metrics.restarts.labels(slot.deployment.name).inc()
        if slot.state == "starting":  # it never got ready: held requests should know
            self.start_failures[slot.deployment.name] = (
                self.clock(), f"replica {slot.replica_id} exited with code {code} while starting")
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
                why = _readiness(got[1]) if got is not None else ""
                if why and slot.generation == generation:
                    slot.not_ready_because = why
                return
            info = await self._get(slot, "/info", timeout)
        except SteadyError:
            return  # still loading (or not listening yet)
        if info is None or slot.generation != generation or slot.state != "starting" \
                or slot.retired:
            return
        slot.info = codec.decode(info[1])
        self._enter_rotation(slot)
        log.info("replica ready in %.1fs", self.clock() - slot.started_at,
                 extra={"replica": slot.replica_id})

    def _enter_rotation(self, slot: Slot) -> None:
        assert slot.address is not None and slot.info is not None
        slot.state = "ready"
        slot.was_ready = True
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
                if getattr(self.launcher, "remote", False):  # its pid is on another node
                    return False
                try:
                    with open(f"/proc/{slot.replica.pid}/stat", "rb") as f:
                        return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
                except (OSError, IndexError):
                    return True
        return False

    def start_failure(self, deployment: str, since: float) -> str | None:
        """Why a replica of the deployment failed to start at or after `since`, or None."""
        failed = self.start_failures.get(deployment)
        return failed[1] if failed is not None and failed[0] >= since else None

    def replica_target(self, deployment: str) -> int:
        """How many replicas the deployment should run now: the autoscaler's count, or its
        target revision's."""
        if deployment in self.desired:
            return self.desired[deployment]
        rec = self.records[deployment]
        return rec.configs[rec.target].replicas

    def scale(self, deployment: str, replicas: int, *, store: bool = True) -> None:
        """The autoscaler's new count; the reconcile loop starts or drains replicas. `store`:
        written for the other gateways and the next start (the leader's decisions)."""
        self.desired[deployment] = replicas
        self.membership.set_desired(deployment, replicas)
        self._export_states()
        if self.state_store is not None and store:
            self._write_soon(self._persist_scale(deployment), f"persist-scale-{deployment}")

    def report_unavailable(self, deployment: str, endpoint: Endpoint) -> None:
        """Passive health: the data plane could not reach a replica; check it on the next tick."""
        for slot in self.slots:
            if slot.replica_id == endpoint.replica_id:
                slot.last_health_at = 0.0

    # rollout: a stored target per deployment, converged on by the loop ------------------------
    def _converge(self, name: str, now: float) -> None:
        """One rollout step: ask the policy, then do what it says (never waits)."""
        rec = self.records[name]
        target_cfg = rec.configs[rec.target]
        target = Target(rec.target, self.replica_target(name), rolling=rec.state == "rolling")
        mine = [s for s in self.slots if s.deployment.name == name]
        plan = self.policy.decide(target, [self._view(s) for s in mine], now)
        if plan.outcome is not None and (self._resync or not self.lead.leading()):
            return  # finished or failed is the leader's verdict, stored for every gateway
        if plan.outcome == "failed":
            self._fall_back(name, "failed", plan.reason)
            return
        if plan.outcome == "done":
            self._finish(name)
            return
        for slot in mine:
            if slot.replica_id in plan.retire:
                self._retire_soon(slot)
        for _ in range(plan.start):
            slot = Slot(target_cfg, self._new_id(name, rec.target), revision=rec.target,
                        created_at=now)
            self.slots.append(slot)
            log.info("rollout: starting a replica of revision %d", rec.target,
                     extra={"deployment": name, "replica": slot.replica_id})

    @staticmethod
    def _view(slot: Slot) -> SlotView:
        # a slot not spawned yet (this very tick, or at boot) is starting, not down
        state = "starting" if slot.state == "backoff" and slot.generation == 0 else slot.state
        return SlotView(slot.replica_id, slot.revision, state, slot.restarts,
                        slot.created_at, slot.was_ready, draining=slot.retired,
                        outstanding=slot.endpoint.outstanding if slot.endpoint else 0)

    def _new_id(self, name: str, revision: int) -> str:
        """The lowest free index: a deployment rolled back keeps its familiar replica ids.
        Ids of replicas still draining stay taken (their exit must not remove a namesake)."""
        prefix = name if revision == 0 else f"{name}-r{revision}"
        taken = {s.replica_id for s in self.slots}
        i = 0
        while f"{prefix}-{i}" in taken:
            i += 1
        return f"{prefix}-{i}"

    def _retire_soon(self, slot: Slot) -> None:
        """Out of rotation and SIGTERM now (no probe can put it back), drained in a task."""
        slot.retired = True
        self.membership.remove(slot.deployment.name, slot.replica_id)
        if slot.replica is not None and slot.replica.process.returncode is None:
            slot.state = "stopping"
            self.launcher.signal(slot.replica, signal.SIGTERM)
        task = asyncio.get_running_loop().create_task(self._retire(slot),
                                                      name=f"retire-{slot.replica_id}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, slot: Slot) -> None:
        """Wait for the SIGTERM'd replica to drain and exit; SIGKILL it after the timeout."""
        replica = slot.replica
        if replica is not None and replica.process.returncode is None:
            try:
                await asyncio.wait_for(replica.process.wait(), self.cfg.drain_timeout_s + 1)
            except TimeoutError:
                log.warning("retired replica did not drain in time; killing",
                            extra={"replica": slot.replica_id})
                self.launcher.signal(replica, signal.SIGKILL)
                try:
                    await asyncio.wait_for(replica.process.wait(), 5)
                except TimeoutError:
                    log.error("retired replica survives SIGKILL", extra={"replica": slot.replica_id})
                    return  # still listed: its watcher drops it if it ever exits
        self._drop(slot)

    def _drop(self, slot: Slot) -> None:
        """A retired replica is gone: forget it everywhere (once)."""
        if slot not in self.slots:
            return
        self.slots.remove(slot)
        forget = getattr(self.metrics, "forget_replica", None)
        if forget is not None:  # its per-replica series would otherwise be exported forever
            forget(slot.deployment.name, slot.replica_id)
        self._export_states()

    def _finish(self, name: str) -> None:
        rec = self.records[name]
        if rec.good != rec.target:
            rec.previous = rec.good
        rec.good = rec.target
        rec.state = "done"
        rec.finished_at = self.wall()
        self._prune(rec)
        log.info("rollout finished: revision %d serves", rec.target,
                 extra={"deployment": name, "revision": rec.target,
                        "duration_s": round(rec.finished_at - (rec.started_at or 0.0), 1)})
        self._persist_soon(name)

    def _fall_back(self, name: str, state: str, reason: str) -> None:
        """Point the target back at the last good revision; the loop converges on it."""
        rec = self.records[name]
        rec.state = state
        rec.reason = reason
        rec.target = rec.good
        rec.finished_at = self.wall()
        self.membership.reconfigure(rec.configs[rec.good])
        log.log(logging.ERROR if state == "failed" else logging.WARNING,
                "rollout %s: %s; going back to revision %d", state, reason, rec.good,
                extra={"deployment": name, "revision": rec.revision})
        self._persist_soon(name)

    def _begin(self, name: str, config: DeploymentConfig) -> None:
        rec = self.records[name]
        rec.revision = rec.target = rec.next_revision
        rec.next_revision += 1
        rec.configs[rec.revision] = config
        rec.state = "rolling"
        rec.reason = ""
        rec.started_at = self.wall()
        rec.finished_at = None
        self._prune(rec)
        # balancer, desired count and admission follow the target at once; new replicas
        # carry the target's service, env and threads (their slot's config)
        self.membership.reconfigure(config)
        fields = rollout_fields(config)
        fields["env"] = sorted(fields["env"])  # names only: values may be credentials
        log.info("rollout started: revision %d", rec.revision,
                 extra={"deployment": name, "revision": rec.revision, "target": fields})

    @staticmethod
    def _prune(rec: RolloutRecord) -> None:
        keep = {rec.revision, rec.target, rec.good, rec.previous}
        rec.configs = {rev: c for rev, c in rec.configs.items() if rev in keep}

    def _record(self, deployment: str) -> RolloutRecord:
        try:
            return self.records[deployment]
        except KeyError:
            raise NotFound(f"no deployment named {deployment!r}", param="deployment") from None

    async def rollout(self, deployment: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Validate every change, then store the new target and return at once; the reconcile
        loop rolls it out (one new replica at a time, an old one retired per new one ready)
        whether or not the caller waits. ClientError (400) leaves everything as it was."""
        rec = self._record(deployment)
        self.lead.require("a rollout")
        if rec.state == "rolling":
            raise Conflict(f"revision {rec.revision} of {deployment!r} is still rolling out; "
                           "wait for it or cancel it first")
        config = apply_changes(self.file_configs[deployment], rec.configs[rec.target], changes,
                               self.max_replicas[deployment])
        self._begin(deployment, config)  # no await between the check above and this
        await self._persist(deployment)
        return self.rollout_status(deployment)

    async def cancel_rollout(self, deployment: str) -> dict[str, Any]:
        """Stop a running rollout: the target goes back to the last good revision."""
        rec = self._record(deployment)
        self.lead.require("cancelling a rollout")
        if rec.state != "rolling":
            raise Conflict(f"no rollout of {deployment!r} is running (last: revision "
                           f"{rec.revision}, {rec.state})")
        self._fall_back(deployment, "cancelled", "cancelled by request")
        await self._persist(deployment)
        return self.rollout_status(deployment)

    def can_roll_back(self, deployment: str) -> bool:
        """A running rollout (cancelled), or a finished one with a revision before it. Not
        after a failed or cancelled one: those are already back on the last good revision."""
        rec = self.records.get(deployment)
        return rec is not None and (
            rec.state == "rolling" or (rec.state == "done" and rec.previous is not None))

    async def rollback(self, deployment: str) -> dict[str, Any]:
        """Undo the last rollout: cancel it while it runs, else roll out the revision that
        served before it (a new revision with that config, through the same loop)."""
        rec = self._record(deployment)
        self.lead.require("a rollback")
        if rec.state == "rolling":
            return await self.cancel_rollout(deployment)
        if not self.can_roll_back(deployment) or rec.previous is None:
            raise Conflict(f"{deployment!r} has no finished rollout to roll back")
        self._begin(deployment, rec.configs[rec.previous])
        await self._persist(deployment)
        return self.rollout_status(deployment)

    def rollout_status(self, deployment: str) -> dict[str, Any]:
        rec = self._record(deployment)
        config = rec.configs[rec.target]
        target = Target(rec.target, self.replica_target(deployment),
                        rolling=rec.state == "rolling")
        views = [self._view(s) for s in self.slots if s.deployment.name == deployment]
        return {
            "deployment": deployment,
            "revision": rec.revision,
            "state": rec.state,
            "reason": rec.reason or None,
            "target": {"revision": rec.target, **rollout_fields(config)},
            "good_revision": rec.good,
            "previous_revision": rec.previous,
            "max_replicas": self.max_replicas[deployment],
            "autoscale": self.autoscaler.status(deployment),
            "progress": progress(target, views),
            "started_at": rec.started_at,
            "finished_at": rec.finished_at,
            "replicas": self.status(deployment),
        }

    # rollout state in the store ----------------------------------------------------------
    def _persist_soon(self, name: str) -> None:
        self._write_soon(self._persist(name), f"persist-rollout-{name}")

    def _write_soon(self, write: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(write, name=name)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _persist_scale(self, name: str) -> None:
        """Store an autoscaled deployment's count (the newest when the write runs)."""
        await self._put(SCALE_KEY.format(name),
                        lambda: {"replicas": self.desired[name], "at": self.wall()},
                        "the autoscaled replica count", name)

    async def _restore_scale(self) -> None:
        """A restarted gateway starts an autoscaled deployment at the count it last had
        (within today's min and max), not at `replicas`: a restart under load would
        otherwise start short and shed until the autoscaler caught up."""
        if self.state_store is None:
            return
        store = self.state_store
        for name in list(self.desired):
            try:
                raw = await asyncio.to_thread(store.get_state, SCALE_KEY.format(name))
                stored = raw.get("replicas") if isinstance(raw, dict) else None
            except Exception as exc:
                log.error("could not read the autoscaled replica count: %s", exc,
                          extra={"deployment": name})
                continue
            if type(stored) is not int:
                continue
            policy = self.autoscaler.policies[name]
            n = max(policy.cfg.min_replicas, min(policy.max_replicas, stored))
            if n != self.desired[name]:
                log.info("starting at the stored autoscaled count: %d replicas", n,
                         extra={"deployment": name})
                self.desired[name] = n
                self.membership.set_desired(name, n)

    async def _persist(self, name: str) -> None:
        """Write the record as it is when the write starts (see `_put`); the target in
        memory drives the loop whether or not the store took it."""
        await self._put(STATE_KEY.format(name), self.records[name].to_json,
                        "the rollout state", name)

    async def _put(self, key: str, value: Callable[[], Any], what: str, name: str) -> None:
        """Writes are serialised and each takes its value when it starts, so the last one
        to run stores the newest state. A store that fails is logged."""
        if self.state_store is None:
            return
        store = self.state_store
        async with self._write_lock:
            snapshot = value()
            try:
                await asyncio.to_thread(store.put_state, key, snapshot, self.lead.fence())
            except Fenced as exc:
                log.warning("%s not stored: this gateway no longer leads (%s)", what, exc,
                            extra={"deployment": name})
            except Exception as exc:
                log.error("could not store %s: %s", what, exc, extra={"deployment": name})

    async def _restore(self) -> None:
        """Take back the stored targets (see the module docstring for what wins)."""
        if self.state_store is None:
            return
        store = self.state_store
        now = self.clock()
        for name, file_cfg in self.file_configs.items():
            try:
                raw = await asyncio.to_thread(store.get_state, STATE_KEY.format(name))
            except Exception as exc:
                log.error("could not read the stored rollout state; serving the "
                          "configuration file: %s", exc, extra={"deployment": name})
                continue
            if raw is None:
                continue
            fresh = self.records[name]
            try:
                rec = RolloutRecord.from_json(raw, file_cfg)
            except ValueError as exc:
                log.error("ignoring the stored rollout state: %s", exc, extra={"deployment": name})
                continue
            too_many = [c.replicas for c in rec.configs.values()
                        if c.replicas > self.max_replicas[name]]
            if rec.base != fresh.base or too_many:
                log.warning("the configuration file changed since revision %d was rolled out; "
                            "serving the file as configured", rec.revision,
                            extra={"deployment": name})
                fresh.next_revision = max(fresh.next_revision, rec.next_revision)
                await self._persist(name)
                continue
            self.records[name] = rec
            # a rollout cut short by the restart starts over from the last good replicas
            serve = rec.good if rec.state == "rolling" else rec.target
            config = rec.configs[serve]
            self.slots = [s for s in self.slots if s.deployment.name != name]
            for _ in range(self.desired.get(name, config.replicas)):
                self.slots.append(Slot(config, self._new_id(name, serve), revision=serve,
                                       created_at=now))
            self.membership.reconfigure(rec.configs[rec.target])
            log.info("restored the stored rollout target: revision %d (%s)", rec.target,
                     rec.state, extra={"deployment": name})

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

    def restart(self, replica_id: str, why: str = "an automatic action") -> bool:
        """Restart one replica (an automatic response): out of rotation, SIGTERM so in-flight
        work drains, and the watcher starts a fresh process."""
        for slot in self.slots:
            if slot.replica_id == replica_id and slot.replica is not None \
                    and slot.replica.process.returncode is None and not slot.retired:
                self.membership.remove(slot.deployment.name, slot.replica_id)
                slot.state = "stopping"
                slot.stopped_because = f"restarted: {why}"
                self.launcher.signal(slot.replica, signal.SIGTERM)
                return True
        return False

    # views -----------------------------------------------------------------------------------
    def status(self, deployment: str) -> list[dict[str, Any]]:
        """Each replica: `last_exit_reason` / `last_exit_at` (wall-clock) say how its last
        process ended, `ejection_reason` why outlier detection holds it out (None when not)."""
        now = self.clock()
        return [
            {
                "id": s.replica_id,
                "revision": s.revision,
                "state": s.state,
                "retiring": s.retired,
                "pid": s.replica.pid if s.replica else None,
                "address": str(s.address) if s.address else None,
                "restarts": s.restarts,
                "last_exit_code": s.last_exit_code,
                "last_exit_reason": s.last_exit_reason,
                "last_exit_at": s.last_exit_at,
                "ready_for_s": round(now - s.ready_at, 1) if s.state == "ready" else 0.0,
                "ejected": bool(s.endpoint and s.endpoint.health.ejected_until > 0),
                "ejection_reason": (s.endpoint.health.reason or "ejected")
                if s.endpoint and s.endpoint.health.ejected_until > 0 else None,
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
            paused = self.replica_target(name) == 0
            for state, n in by_state.items():
                if paused and not any(by_state.values()):
                    # paused on purpose (replicas = 0) with nothing left running: no series,
                    # so DeploymentNotReady (ready < 1) cannot page about an intended state
                    with contextlib.suppress(KeyError):
                        self.metrics.replicas.remove(name, state)
                else:
                    self.metrics.replicas.labels(name, state).set(n)
