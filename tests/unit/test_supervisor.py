"""control/supervisor.py: rollouts as a stored target, converged on by the reconcile loop;
and what `status()` says of each replica's last exit and ejection.

No processes and no sockets: a fake launcher whose "processes" exit when told (or when
signalled), a fake transport that answers /readyz and /info for the replicas the launcher
made ready, and a fake clock moved by hand. Each `tick` is one reconcile iteration followed
by letting the probes, watchers and retirements it started run.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import pytest

from steadyserve import codec
from steadyserve.config import Config, DeploymentConfig, SupervisorConfig
from steadyserve.control.launcher import LaunchedReplica
from steadyserve.control.responder import Responder
from steadyserve.control.supervisor import STATE_KEY, Supervisor, exit_reason
from steadyserve.errors import ClientError, Conflict, ConnectionRefused
from steadyserve.gateway.controls import DataPlaneControls
from steadyserve.gateway.dispatch import Dispatcher
from steadyserve.gateway.membership import Membership
from steadyserve.gateway.transport import Address, Reply
from steadyserve.observe.metrics import GatewayMetrics
from steadyserve.policies.actions import ActionGuard
from steadyserve.policies.alert_lifecycle import Alert
from steadyserve.policies.balancing import PeakEwma, PowerOfTwo
from steadyserve.store import Database
from steadyserve.testing import FakeClock

pytestmark = pytest.mark.asyncio

TICK_S = 0.2
READY_TIMEOUT_S = 5.0


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.signals: list[int] = []
        self._exited = asyncio.Event()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._exited.set()


class FakeLauncher:
    """`mode(config, replica_id)` says what a launched replica does: "ok" (ready at once),
    "hang" (alive, never ready) or "crash" (exits with code 3 at once)."""

    def __init__(self, mode: Callable[[DeploymentConfig, str], str] | None = None) -> None:
        self.mode = mode or (lambda config, replica_id: "ok")
        self.launched: list[tuple[str, DeploymentConfig, FakeProcess]] = []
        self.ready: set[int] = set()  # ports
        self._next_port = 20000

    async def launch(self, deployment: DeploymentConfig, replica_id: str) -> LaunchedReplica:
        self._next_port += 1
        process = FakeProcess(self._next_port)
        mode = self.mode(deployment, replica_id)
        if mode == "ok":
            self.ready.add(self._next_port)
        elif mode == "crash":
            process.exit(3)
        self.launched.append((replica_id, deployment, process))
        return LaunchedReplica(process, "fake", self._next_port)  # type: ignore[arg-type]

    @staticmethod
    def signal(replica: LaunchedReplica, sig: signal.Signals) -> None:
        process: FakeProcess = replica.process  # type: ignore[assignment]
        process.signals.append(sig)
        process.exit(-sig)  # drains at once

    def process(self, replica_id: str) -> FakeProcess:
        return [p for rid, _, p in self.launched if rid == replica_id][-1]


class FakeTransport:
    def __init__(self, launcher: FakeLauncher) -> None:
        self.launcher = launcher
        self.max_connections: dict[Address, int] = {}
        self.forgotten: list[Address] = []

    async def request(self, address: Address, method: str, path: str, body: bytes,
                      headers: list[tuple[bytes, bytes]], timeout_s: float) -> Reply:
        alive = [p for _, _, p in self.launcher.launched
                 if p.pid == address.port and p.returncode is None]
        if not alive or address.port not in self.launcher.ready:
            raise ConnectionRefused(f"nothing ready at {address}")
        if path == "/info":
            return Reply(200, codec.encode({"handlers": [], "service": "x", "version": "1"}))
        return Reply(200, b"ok")

    def forget(self, address: Address) -> None:
        self.forgotten.append(address)

    def set_max_connections(self, address: Address, n: int) -> None:
        self.max_connections[address] = n

    async def close(self) -> None:
        pass


class RecordingMetrics(GatewayMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.forgotten: list[tuple[str, str]] = []

    def forget_replica(self, deployment: str, replica_id: str) -> None:
        self.forgotten.append((deployment, replica_id))


class FakeStore:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get_state(self, key: str) -> Any:
        return self.data.get(key)

    def put_state(self, key: str, obj: Any, fence: Any = None) -> None:
        self.data[key] = obj

    def states_with_prefix(self, prefix: str, limit: int = 1000) -> dict[str, Any]:
        return {k: v for k, v in sorted(self.data.items()) if k.startswith(prefix)}


def deployment(**overrides: Any) -> DeploymentConfig:
    values: dict[str, Any] = dict(name="d", service="app.model:V1", replicas=2,
                                  services=("app.model:V2",), rollout_env=("TAG",),
                                  max_replicas=6)
    values.update(overrides)
    return DeploymentConfig(**values)


class Harness:
    def __init__(self, launcher: FakeLauncher | None = None, *, store: FakeStore | None = None,
                 config: DeploymentConfig | None = None) -> None:
        self.clock = FakeClock()
        self.launcher = launcher or FakeLauncher()
        self.transport = FakeTransport(self.launcher)
        self.metrics = RecordingMetrics()
        config = config or deployment()
        full = Config(deployments=(config,), supervisor=SupervisorConfig(
            ready_timeout_s=READY_TIMEOUT_S, reconcile_interval_s=3600.0,
            rollout_max_restarts=2, restart_base_s=0.5, restart_cap_s=1.0))
        self.membership = Membership(full.deployments)
        self.sup = Supervisor(full, self.membership, self.transport, self.metrics,
                              self.launcher, clock=self.clock, rand=lambda: 0.5,
                              wall=lambda: 1.7e9, state_store=store)
        self.min_ready = 10**6  # fewest replicas in rotation seen since `watch()`

    async def start(self) -> None:
        await self.sup.start()
        await self.settle()

    async def settle(self) -> None:
        for _ in range(30):
            await asyncio.sleep(0)

    async def tick(self, n: int = 1) -> None:
        for _ in range(n):
            await self.sup._follow_soon()  # [cluster]: what the loop does before reconciling
            await self.sup.reconcile_once()
            await self.settle()
            self.min_ready = min(self.min_ready, len(self.membership.deployments["d"].endpoints))
            self.clock.advance(TICK_S)

    async def until(self, state: str, *, converged: bool = True, max_ticks: int = 200) -> dict:
        for _ in range(max_ticks):
            got = self.sup.rollout_status("d")
            if got["state"] == state and (not converged or got["progress"]["converged"]):
                return got
            await self.tick()
        raise AssertionError(f"never {state}: {self.sup.rollout_status('d')}")

    def ids(self) -> list[str]:
        return sorted(s.replica_id for s in self.sup.slots)

    def ready_ids(self) -> list[str]:
        return sorted(e.replica_id for e in self.membership.deployments["d"].endpoints)


def data_plane(h: Harness) -> DataPlaneControls:
    """The data-plane seam over the harness's membership (what a responder acts through)."""
    return DataPlaneControls(h.membership, Dispatcher(h.transport, h.metrics))


@pytest.fixture
async def harnesses():
    made: list[Harness] = []

    def make(*args: Any, **kw: Any) -> Harness:
        h = Harness(*args, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.sup.stop()


async def test_a_rollout_replaces_every_replica_and_each_field_takes_effect(harnesses):
    h = harnesses()
    await h.start()
    await h.tick(2)
    assert h.ready_ids() == ["d-0", "d-1"]
    old = [h.launcher.process("d-0"), h.launcher.process("d-1")]
    h.min_ready = 2

    got = await h.sup.rollout("d", {"service": "app.model:V2", "env": {"TAG": "v2"},
                                    "balancer": "peak_ewma", "max_connections_per_replica": 7,
                                    "torch_threads": 3})
    assert (got["revision"], got["state"]) == (1, "rolling")
    assert isinstance(h.membership.deployments["d"].balancer, PeakEwma)

    done = await h.until("done")
    assert h.ids() == h.ready_ids() == ["d-r1-0", "d-r1-1"]
    assert (done["good_revision"], done["previous_revision"]) == (1, 0)
    assert done["target"]["service"] == "app.model:V2"
    assert h.min_ready == 2  # never below the desired count while rolling
    for rid in ("d-r1-0", "d-r1-1"):
        config = next(c for r, c, _ in h.launcher.launched if r == rid)
        assert (config.service, dict(config.env), config.torch_threads) == \
            ("app.model:V2", {"TAG": "v2"}, 3)
    assert sorted(h.transport.max_connections.values()) == [7, 7, 256, 256]
    assert [p.signals for p in old] == [[signal.SIGTERM], [signal.SIGTERM]]
    assert sorted(h.metrics.forgotten) == [("d", "d-0"), ("d", "d-1")]


async def test_a_new_replica_never_ready_at_step_1_converges_back_to_the_desired_count(harnesses):
    h = harnesses(FakeLauncher(lambda c, rid: "hang" if rid == "d-r1-1" else "ok"))
    await h.start()
    await h.tick(2)
    h.min_ready = 2
    await h.sup.rollout("d", {"env": {"TAG": "broken"}})
    for _ in range(50):  # step 1: d-r1-0 is ready and one old replica is already gone
        await h.tick()
        if "d-r1-1" in h.ids():
            break
    assert "d-r1-0" in h.ready_ids() and len(h.ready_ids()) == 2

    failed = await h.until("failed")
    assert "d-r1-1 not ready after 5s" in failed["reason"]
    assert failed["target"]["revision"] == failed["good_revision"] == 0
    assert h.ids() == h.ready_ids() == ["d-0", "d-1"]  # a good replica started again
    assert all(r["revision"] == 0 and r["state"] == "ready" for r in failed["replicas"])
    assert h.membership.deployments["d"].config.env == ()
    assert h.min_ready == 2
    with pytest.raises(Conflict):  # nothing to cancel any more
        await h.sup.cancel_rollout("d")


async def test_a_crash_looping_new_replica_fails_the_rollout_and_the_old_ones_stay(harnesses):
    h = harnesses(FakeLauncher(lambda c, rid: "crash" if c.service.endswith("V2") else "ok"))
    await h.start()
    await h.tick(2)
    old = {s.replica_id: s.replica.pid for s in h.sup.slots if s.replica}
    await h.sup.rollout("d", {"service": "app.model:V2"})
    failed = await h.until("failed")
    assert failed["reason"] == "new replica d-r1-0 restarted 2 times"
    assert {s.replica_id: s.replica.pid for s in h.sup.slots if s.replica} == old
    assert [rid for rid, _, _ in h.launcher.launched].count("d-r1-0") == 2
    assert not h.sup.can_roll_back("d")  # already back on the last good revision


async def test_cancel_goes_back_and_a_second_rollout_while_rolling_is_refused(harnesses):
    h = harnesses(FakeLauncher(lambda c, rid: "hang" if dict(c.env).get("TAG") else "ok"))
    await h.start()
    await h.tick(2)
    await h.sup.rollout("d", {"env": {"TAG": "slow"}})
    await h.tick(3)
    with pytest.raises(Conflict):
        await h.sup.rollout("d", {"replicas": 1})
    assert h.sup.rollout_status("d")["revision"] == 1
    cancelled = await h.sup.cancel_rollout("d")
    assert (cancelled["state"], cancelled["reason"]) == ("cancelled", "cancelled by request")
    back = await h.until("cancelled")
    assert h.ids() == h.ready_ids() == ["d-0", "d-1"]
    assert back["revision"] == 1 and back["target"]["revision"] == 0
    again = await h.sup.rollout("d", {"replicas": 1})  # the next one gets a new revision
    assert again["revision"] == 2


@pytest.mark.parametrize("changes", [
    {"replicas": True}, {"replicas": 1.5}, {"replicas": 1000}, {"service": "/tmp/x.py:Cls"},
    {"env": {"BROWSER": "sh -c id %s"}}, {"colour": "red"},
    {"replicas": 1, "env": {"PYTHONWARNINGS": "ignore::antigravity.x"}},  # valid field first
])
async def test_a_refused_rollout_changes_nothing(harnesses, changes):
    store = FakeStore()
    h = harnesses(store=store)
    await h.start()
    before = h.sup.records["d"].to_json()
    with pytest.raises(ClientError) as err:
        await h.sup.rollout("d", changes)
    assert err.value.status == 400
    assert h.sup.records["d"].to_json() == before
    assert store.data == {}
    assert h.membership.deployments["d"].config.replicas == 2


async def test_scale_to_zero_and_back(harnesses):
    h = harnesses()
    await h.start()
    await h.tick(2)
    await h.sup.rollout("d", {"replicas": 0})
    await h.until("done")
    assert h.ids() == []
    await h.tick(1)
    # paused on purpose: no replica-state series, so DeploymentNotReady has nothing to read
    families = {s.labels.get("deployment") for m in h.sup.metrics.registry.collect()
                if m.name == "steadyserve_replicas" for s in m.samples}
    assert "d" not in families
    assert h.membership.readiness() == (True, "ready")
    await h.sup.rollout("d", {"replicas": 3})
    await h.until("done")
    assert h.ready_ids() == ["d-r2-0", "d-r2-1", "d-r2-2"]


async def test_rollback_rolls_out_the_previous_config_as_a_new_revision(harnesses):
    h = harnesses()
    await h.start()
    await h.tick(2)
    await h.sup.rollout("d", {"service": "app.model:V2", "balancer": "round_robin"})
    await h.until("done")
    assert h.sup.can_roll_back("d")
    started = await h.sup.rollback("d")
    assert (started["revision"], started["state"]) == (2, "rolling")
    done = await h.until("done")
    assert done["target"]["service"] == "app.model:V1"
    assert isinstance(h.membership.deployments["d"].balancer, PowerOfTwo)
    assert h.ready_ids() == ["d-r2-0", "d-r2-1"]


@pytest.fixture(params=["fake", "sqlite"])
def store(request, tmp_path):
    """The fake, and the gateway's real state database (JSON round trip included)."""
    if request.param == "fake":
        yield FakeStore()
        return
    db = Database(f"sqlite:///{tmp_path}/state.db")
    yield db
    db.close()


async def test_a_restarted_gateway_serves_the_stored_target(harnesses, store):
    first = harnesses(store=store)
    await first.start()
    await first.tick(2)
    await first.sup.rollout("d", {"env": {"TAG": "v2"}, "replicas": 3})
    await first.until("done")
    await first.sup.stop()  # waits for the store writes in flight
    assert store.get_state(STATE_KEY.format("d"))["state"] == "done"

    second = harnesses(store=store)
    await second.start()
    await second.tick(2)
    got = second.sup.rollout_status("d")
    assert (got["revision"], got["state"], got["good_revision"]) == (1, "done", 1)
    assert second.ready_ids() == ["d-r1-0", "d-r1-1", "d-r1-2"]
    assert all(dict(c.env) == {"TAG": "v2"} for _, c, _ in second.launcher.launched)
    assert (await second.sup.rollout("d", {}))["revision"] == 2


async def test_a_rollout_cut_short_by_a_restart_starts_over_from_the_good_replicas(harnesses):
    store = FakeStore()
    first = harnesses(FakeLauncher(lambda c, rid: "hang" if rid.startswith("d-r1") else "ok"),
                      store=store)
    await first.start()
    await first.tick(2)
    await first.sup.rollout("d", {"env": {"TAG": "v2"}})
    await first.tick(3)
    await first.settle()
    assert store.data[STATE_KEY.format("d")]["state"] == "rolling"
    await first.sup.stop()

    second = harnesses(store=store)  # this time the new version starts
    await second.start()
    # the last good revision's replicas come back first, then the rollout resumes
    assert second.ids() == ["d-0", "d-1", "d-r1-0"]
    assert [(rid, c.env) for rid, c, _ in second.launcher.launched] == \
        [("d-0", ()), ("d-1", ()), ("d-r1-0", (("TAG", "v2"),))]
    got = await second.until("done")
    assert (got["revision"], got["good_revision"]) == (1, 1)
    assert second.ready_ids() == ["d-r1-0", "d-r1-1"]


async def test_the_configuration_file_wins_when_it_changed_since_the_rollout(harnesses):
    store = FakeStore()
    first = harnesses(store=store)
    await first.start()
    await first.sup.rollout("d", {"env": {"TAG": "v2"}})
    await first.until("done")
    await first.sup.stop()

    edited = deployment(env=(("TAG", "from-file"),))
    second = harnesses(store=store, config=edited)
    await second.start()
    await second.tick(2)
    got = second.sup.rollout_status("d")
    assert (got["revision"], got["state"], got["target"]["env"]) == (0, "done", {"TAG": "from-file"})
    assert second.ready_ids() == ["d-0", "d-1"]
    assert store.data[STATE_KEY.format("d")]["revision"] == 0  # the stale record is replaced
    assert (await second.sup.rollout("d", {}))["revision"] == 2  # numbers are never reused


async def test_an_unreadable_stored_record_is_ignored(harnesses):
    store = FakeStore()
    store.data[STATE_KEY.format("d")] = {"format": 1, "state": "rolling"}
    h = harnesses(store=store)
    await h.start()
    await h.tick(2)
    assert h.ready_ids() == ["d-0", "d-1"]
    assert h.sup.rollout_status("d")["state"] == "done"


async def test_the_automatic_rollback_goes_through_the_stored_target(harnesses):
    h = harnesses()
    await h.start()
    await h.tick(2)
    responder = Responder(data_plane(h), h.metrics, h.sup,
                          ActionGuard(cooldown_s=0, max_per_hour=100), None, wall=lambda: 1.7e9)
    crash_loop = Alert(key="k", rule="ReplicaCrashLooping", labels={"deployment": "d"},
                       annotations={}, state="firing", value=1.0, description="")

    [record] = await responder.respond(crash_loop, ("rollback",))
    assert (record["outcome"], record["detail"]) == (
        "skipped", "'d' has no rollout to roll back (none yet, or the last one already went "
        "back to the last good revision)")

    await h.sup.rollout("d", {"service": "app.model:V2"})
    await h.until("done")
    [record] = await responder.respond(crash_loop, ("rollback",))
    assert (record["outcome"], record["detail"]) == (
        "started", "rolling d back as revision 2 (the config of revision 0)")
    done = await h.until("done")
    assert (done["revision"], done["target"]["service"]) == (2, "app.model:V1")

    await h.sup.rollout("d", {"env": {"TAG": "x"}})  # a rollout still running is cancelled
    [record] = await responder.respond(crash_loop, ("rollback",))
    assert (record["outcome"], record["detail"]) == (
        "started", "cancelled revision 3 of d; going back to revision 2")
    assert h.sup.rollout_status("d")["state"] == "cancelled"


# why a replica last exited, and why it is ejected -----------------------------------------


class SetupFailing(FakeTransport):
    """/readyz of a live replica that is not ready answers what the replica says: its setup
    failed."""

    async def request(self, address: Address, method: str, path: str, body: bytes,
                      headers: list[tuple[bytes, bytes]], timeout_s: float) -> Reply:
        alive = [p for _, _, p in self.launcher.launched
                 if p.pid == address.port and p.returncode is None]
        if alive and address.port not in self.launcher.ready and path == "/readyz":
            return Reply(503, b'{"status": "RuntimeError: boom <b>"}')
        return await super().request(address, method, path, body, headers, timeout_s)


class Draining(FakeTransport):
    """A replica on its way out answers "draining"."""

    async def request(self, address: Address, method: str, path: str, body: bytes,
                      headers: list[tuple[bytes, bytes]], timeout_s: float) -> Reply:
        if path == "/readyz" and address.port not in self.launcher.ready:
            return Reply(503, b'{"status": "draining"}')
        return await super().request(address, method, path, body, headers, timeout_s)


def replica(h: Harness, replica_id: str) -> dict[str, Any]:
    return next(r for r in h.sup.status("d") if r["id"] == replica_id)


@pytest.mark.parametrize(("args", "reason"), [
    ((1,), "exited with code 1"),
    ((0, "", "ready"), "exited with code 0"),
    ((-signal.SIGKILL,), "killed by SIGKILL"),
    ((-signal.SIGSEGV, "", "ready"), "killed by SIGSEGV"),
    ((-200,), "killed by signal 200"),
    ((None,), "exited"),
    ((3, "", "starting"), "exited with code 3 while starting"),
    ((0, "", "starting", "RuntimeError: boom"), "exited with code 0 while starting "
                                                "(RuntimeError: boom)"),
    ((-signal.SIGKILL, "killed: not ready after 5s", "starting"), "killed: not ready after 5s"),
    ((0, "restarted: an automatic action", "stopping"), "restarted: an automatic action"),
])
async def test_exit_reason(args, reason):  # pure; async for the module's asyncio mark
    assert exit_reason(*args) == reason


async def test_each_replica_says_why_it_last_exited(harnesses):
    h = harnesses(FakeLauncher(lambda c, rid: "hang" if rid == "d-1" else "ok"))
    await h.start()
    await h.tick(2)
    fresh = replica(h, "d-0")
    assert (fresh["restarts"], fresh["last_exit_reason"], fresh["last_exit_at"],
            fresh["ejection_reason"]) == (0, None, None, None)

    h.launcher.process("d-0").exit(-signal.SIGKILL)  # the kernel's OOM killer, say
    await h.settle()
    crashed = replica(h, "d-0")
    assert (crashed["restarts"], crashed["last_exit_code"]) == (1, -signal.SIGKILL)
    assert (crashed["last_exit_reason"], crashed["last_exit_at"]) == ("killed by SIGKILL", 1.7e9)

    await h.tick(int(READY_TIMEOUT_S / TICK_S) + 3)  # d-1 never gets ready: killed
    assert replica(h, "d-1")["last_exit_reason"] == "killed: not ready after 5s"

    await h.tick(5)
    assert "d-0" in h.ready_ids() and h.sup.restart("d-0", "an automatic action on alert X")
    await h.settle()
    assert replica(h, "d-0")["last_exit_reason"] == "restarted: an automatic action on alert X"
    assert replica(h, "d-0")["restarts"] == 2


async def test_a_replica_that_exits_while_starting_says_what_its_readyz_said(harnesses):
    launcher = FakeLauncher(lambda c, rid: "hang" if rid == "d-1" else "ok")
    h = harnesses(launcher)
    h.transport = h.sup.transport = SetupFailing(launcher)
    await h.start()
    await h.tick(2)
    launcher.process("d-1").exit(0)  # the replica stops itself when its setup fails
    await h.settle()
    assert replica(h, "d-1")["last_exit_reason"] == \
        "exited with code 0 while starting (RuntimeError: boom <b>)"


async def test_a_draining_readyz_does_not_replace_what_the_replica_said_before(harnesses):
    launcher = FakeLauncher(lambda c, rid: "hang" if rid == "d-1" else "ok")
    h = harnesses(launcher)
    h.transport = h.sup.transport = SetupFailing(launcher)
    await h.start()
    await h.tick(2)
    h.transport.request = Draining(launcher).request  # type: ignore[method-assign]
    await h.tick(2)
    launcher.process("d-1").exit(-signal.SIGTERM)  # it stopped itself after its setup failed
    await h.settle()
    assert replica(h, "d-1")["last_exit_reason"] == \
        "killed by SIGTERM while starting (RuntimeError: boom <b>)"



async def test_an_ejected_replica_says_why(harnesses):
    h = harnesses()
    await h.start()
    await h.tick(2)
    data = data_plane(h)
    assert data.eject("d", "d-1", "an automatic action on alert ReplicaErrors")
    ejected = replica(h, "d-1")
    assert ejected["ejected"] is True
    assert ejected["ejection_reason"] == "an automatic action on alert ReplicaErrors"
    assert replica(h, "d-0")["ejection_reason"] is None
    assert not data.eject("d", "d-0")  # the share limit: never the last one
