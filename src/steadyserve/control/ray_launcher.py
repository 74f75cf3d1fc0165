"""Replicas on a Ray cluster: every Ray call steadyserve makes lives in this module.

`[deployments.X] backend = "ray"` is not a thing: the whole gateway picks a backend
(`backend = "ray"`, `--backend ray [--ray-address ADDR]`). Each replica is then one Ray actor,
placed by Ray with the deployment's resource requests (`num_cpus`, `num_gpus`,
`memory_bytes`). A replica that needs several bundles (`placement_bundles`: a model sharded
over GPUs, say) gets a placement group of its own, reserved whole before its actor starts in
the first bundle, named to the replica (`STEADYSERVE_PLACEMENT_GROUP`, for service code that
schedules its own Ray work into it) and removed when the replica ends; a group the cluster
cannot reserve within `ray_call_timeout_s` fails the start with the reason. The actor starts
the same replica server a local replica runs, as its own child process, on a socket it binds
on its node's address, and reports that address; the gateway routes to it over HTTP exactly
as to a local replica, and the supervisor treats it the same way (probes, restarts, drains,
rollouts, autoscaling). The replica process dies with its
actor (PR_SET_PDEATHSIG), and the actor with its replica process.

Death detection without polling lag: each actor has one long-running `wait()` call in flight,
awaited by the supervisor's watcher like a local process's exit. When the actor dies (killed,
its node lost) the call fails with `ActorDiedError` at once: the replica leaves rotation and
the reconcile loop starts a replacement. `ActorUnavailableError` (the actor may come back: a
network blip) is not a death: the watcher asks again after a pause while the HTTP probes take
the replica out of rotation if it stops answering. Every other Ray call has a timeout
(`ray_call_timeout_s`).

`ray` is an optional extra (`pip install steadyserve[ray]`); it is imported only here, and only
when the Ray backend is chosen.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import uuid
from typing import Any

from ..config import Config, DeploymentConfig
from ..errors import ConfigError
from .launcher import LaunchedReplica, replica_argv, replica_env, torch_threads, usable_cores

log = logging.getLogger("steadyserve.ray")

NAMESPACE = "steadyserve"
UNAVAILABLE_RETRY_S = 1.0
DIED_CODE = -int(signal.SIGKILL)  # what a replica whose actor died "exited" with


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("backend = \"ray\" needs Ray: pip install 'steadyserve[ray]'") from None
    return ray


class ReplicaHost:
    """The actor: starts the replica server as its child, reports its address, relays signals
    and waits for it. Threaded (max_concurrency > 1) so `wait` blocks while `signal` runs."""

    def __init__(self, argv: list[str], overrides: dict[str, str], cwd: str) -> None:
        import socket
        import subprocess

        ray = _ray()
        self.host = ray.util.get_node_ip_address()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, 0))
            sock.listen(1024)
            sock.set_inheritable(True)
            self.port = sock.getsockname()[1]
            argv = [sys.executable if a == "{python}" else
                    str(sock.fileno()) if a == "{fd}" else
                    str(os.getpid()) if a == "{parent}" else a for a in argv]
            self.child = subprocess.Popen(
                # the node's own environment (PATH, HOME, its devices), then steadyserve's
                argv, pass_fds=(sock.fileno(),), start_new_session=True,
                env={**os.environ, **overrides},
                cwd=cwd if os.path.isdir(cwd) else None, stdin=subprocess.DEVNULL)
        finally:
            sock.close()

    def address(self) -> tuple[str, int, int]:
        return self.host, self.port, self.child.pid

    def signal(self, sig: int) -> None:
        if self.child.poll() is None:
            try:
                os.kill(self.child.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self) -> int:
        return int(self.child.wait())


class RayProcess:
    """What the supervisor's watcher awaits: quacks like an asyncio subprocess."""

    def __init__(self, actor: Any, pid: int, waiter: Any, group: Any = None) -> None:
        self.actor = actor
        self.pid = pid
        self.returncode: int | None = None
        self._waiter = waiter
        self.group = group  # the replica's placement group, removed when it ends

    async def wait(self) -> int:
        if self.returncode is not None:
            return self.returncode
        ray = _ray()
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        while self.returncode is None:
            try:
                code = int(await self._waiter)
            except ActorUnavailableError as exc:
                log.warning("replica actor unreachable; asking again: %s", exc)
                await asyncio.sleep(UNAVAILABLE_RETRY_S)
                try:
                    self._waiter = self.actor.wait.remote()
                except RayActorError:
                    code = DIED_CODE
                else:
                    continue
            except (ActorDiedError, RayActorError) as exc:
                log.warning("replica actor died: %s", str(exc).splitlines()[0][:300])
                code = DIED_CODE
            except ray.exceptions.RayError as exc:  # any other: treat as gone, it is replaced
                log.error("replica actor failed: %s", exc)
                code = DIED_CODE
            self.returncode = code
        if code != DIED_CODE:  # the replica exited on its own: its actor holds nothing more
            try:
                ray.kill(self.actor, no_restart=True)
            except ray.exceptions.RayError:
                pass
        _remove_group(self.group)
        return self.returncode


class RayLauncher:
    """Starts replicas as Ray actors (see the module docstring)."""

    remote = True  # replica pids are on other nodes: /proc says nothing about them

    def __init__(self, config: Config, address: str | None = None) -> None:
        self.config = config
        self.address = address if address is not None else config.ray_address
        self.cores = usable_cores()
        self.timeout_s = config.supervisor.ray_call_timeout_s
        self._actor_cls: Any = None
        self._started_ray = False

    async def start(self) -> None:
        # Ray stamps every log record of the process with its own fields: keep ours clean
        record_factory = logging.getLogRecordFactory()
        ray = _ray()
        logging.setLogRecordFactory(record_factory)
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False,
                                      "ignore_reinit_error": True}
            if self.address:
                kwargs["address"] = self.address
            else:  # a local cluster of this machine, started and stopped with the gateway
                kwargs.update(include_dashboard=False, num_cpus=max(self.cores, 1))
            # Ray's core installs crash handlers for SIGTERM and SIGINT that log, call the
            # gateway's handler, then re-raise with the default action: the process died in
            # the middle of its staged shutdown. Keep the gateway's handlers.
            handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                await asyncio.wait_for(asyncio.to_thread(ray.init, **kwargs),
                                       max(self.timeout_s, 60.0))
            except TimeoutError:
                raise ConfigError(f"could not join the Ray cluster at {self.address or 'local'} "
                                  "within 60 s") from None
            finally:
                for sig, handler in handlers.items():
                    if handler is not None:
                        signal.signal(sig, handler)
                logging.setLogRecordFactory(record_factory)
            self._started_ray = True
            log.info("joined Ray cluster", extra={"address": self.address or "local",
                                                  "resources": ray.cluster_resources()})
        self._actor_cls = ray.remote(ReplicaHost)

    async def stop(self) -> None:
        if self._started_ray:
            ray = _ray()
            await asyncio.to_thread(ray.shutdown)
            self._started_ray = False

    async def launch(self, deployment: DeploymentConfig, replica_id: str) -> LaunchedReplica:
        if self._actor_cls is None:
            await self.start()
        ray = _ray()
        threads = torch_threads(self.config, deployment, self.cores)
        argv = replica_argv(self.config, deployment, replica_id, threads,
                            fd="{fd}", parent_pid="{parent}", recorder=None)
        argv[0] = "{python}"  # the actor's interpreter, on its node
        # only what steadyserve sets: the gateway's own environment (its PATH, its secrets)
        # does not travel to other nodes
        overrides = replica_env(self.config, deployment, replica_id, base={})
        options: dict[str, Any] = {
            "name": f"{replica_id}-{uuid.uuid4().hex[:8]}", "max_restarts": 0,
            "max_concurrency": 4, "num_cpus": deployment.num_cpus,
            "num_gpus": deployment.num_gpus,
        }
        if deployment.memory_bytes is not None:
            options["memory"] = deployment.memory_bytes
        group = None
        if deployment.placement_bundles:
            group = await self._reserve(deployment, replica_id)
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=0)
            overrides["STEADYSERVE_PLACEMENT_GROUP"] = options["name"]
        try:
            actor = self._actor_cls.options(**options).remote(argv, overrides, os.getcwd())
            host, port, pid = await asyncio.wait_for(
                _as_future(actor.address.remote()), self.timeout_s)
        except TimeoutError:
            _remove_group(group)
            raise ConfigError(f"the Ray cluster placed no replica of {deployment.name} within "
                              f"{self.timeout_s:g} s (resources: num_cpus="
                              f"{deployment.num_cpus:g}, num_gpus={deployment.num_gpus:g})"
                              ) from None
        except ray.exceptions.RayError as exc:
            _remove_group(group)
            raise ConfigError(f"cannot start a replica of {deployment.name} on Ray: "
                              f"{str(exc).splitlines()[0][:300]}") from None
        process = RayProcess(actor, int(pid), actor.wait.remote(), group)
        log.info("replica actor started", extra={"replica": replica_id, "host": host,
                                                 "port": port})
        return LaunchedReplica(process, str(host), int(port), None)  # type: ignore[arg-type]

    async def _reserve(self, deployment: DeploymentConfig, replica_id: str) -> Any:
        """The replica's placement group, reserved whole, or ConfigError saying why not."""
        ray = _ray()
        from ray.util.placement_group import placement_group

        bundles = [dict(b) for b in deployment.placement_bundles]
        group = placement_group(bundles, strategy=deployment.placement_strategy,
                                name=f"{replica_id}-{uuid.uuid4().hex[:8]}")
        try:
            await asyncio.wait_for(_as_future(group.ready()), self.timeout_s)
        except (TimeoutError, ray.exceptions.RayError) as exc:
            _remove_group(group)
            why = "timed out" if isinstance(exc, TimeoutError) else \
                str(exc).splitlines()[0][:300]
            raise ConfigError(f"the Ray cluster could not reserve the placement group of a "
                              f"{deployment.name} replica within {self.timeout_s:g} s "
                              f"({deployment.placement_strategy} {bundles}): {why}") from None
        return group

    def signal(self, replica: LaunchedReplica, sig: signal.Signals) -> None:
        process: RayProcess = replica.process  # type: ignore[assignment]
        if process.returncode is not None:
            return
        ray = _ray()
        try:
            if sig == signal.SIGKILL:
                ray.kill(process.actor, no_restart=True)
            else:
                process.actor.signal.remote(int(sig))  # fire and forget: wait() tells the end
        except ray.exceptions.RayError as exc:
            log.warning("could not signal a replica actor: %s", exc)


def _remove_group(group: Any) -> None:
    """Give a replica's placement group back to the cluster (None: it had none)."""
    if group is None:
        return
    ray = _ray()
    try:
        ray.util.remove_placement_group(group)
    except (ray.exceptions.RayError, ValueError) as exc:
        log.warning("could not remove a placement group: %s", exc)


def _as_future(ref: Any) -> asyncio.Future[Any]:
    return asyncio.wrap_future(ref.future())
