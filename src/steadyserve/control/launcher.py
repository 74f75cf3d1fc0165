"""The one wrapper for replica subprocesses: start one with its socket pre-bound, signal it.

The gateway binds 127.0.0.1:0 itself and hands the listening fd to the child, so it knows the
port with no race and no stdout parsing; it then closes its own copy, so a dead replica's
port refuses connections at once instead of queueing them in a backlog nobody reads.
Children get their own session (Ctrl-C reaches only the gateway, which stages the
shutdown) and die with the gateway (PR_SET_PDEATHSIG in the child).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from dataclasses import dataclass

from ..config import Config, DeploymentConfig
from ..errors import ConfigError


@dataclass(slots=True)
class LaunchedReplica:
    process: asyncio.subprocess.Process
    host: str
    port: int
    flight_recorder: str | None = None  # file naming the inputs it is executing

    @property
    def pid(self) -> int:
        return self.process.pid


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


REPLICA_MEMORY_BYTES = 512 * 1024 * 1024  # a small model's replica, for the default cap
REPLICAS_PER_CORE = 4


def usable_memory_bytes() -> int | None:
    """Physical memory, or the cgroup's limit when lower (a container); None if unknown."""
    try:
        found = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on Linux
        return None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit():
            found = min(found, int(raw))
    return found


def default_max_replicas(replicas: int, cores: int, memory_bytes: int | None) -> int:
    """The most replicas a rollout may ask for when `max_replicas` is not configured:
    min(4 × cores, memory / 512 MiB), never below the configured count nor 1."""
    cap = REPLICAS_PER_CORE * max(1, cores)
    if memory_bytes is not None:
        cap = min(cap, memory_bytes // REPLICA_MEMORY_BYTES)
    return max(1, replicas, cap)


def max_replicas(deployment: DeploymentConfig, cores: int, memory_bytes: int | None) -> int:
    if deployment.max_replicas is not None:
        return deployment.max_replicas
    return default_max_replicas(deployment.replicas, cores, memory_bytes)


def torch_threads(config: Config, deployment: DeploymentConfig, cores: int) -> int:
    """replicas × threads ≤ cores by default, never below one thread."""
    if deployment.torch_threads is not None:
        return deployment.torch_threads
    return max(1, cores // max(1, config.total_replicas))


def _resolved_format(fmt: str) -> str:
    if fmt == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return fmt


def replica_env(config: Config, deployment: DeploymentConfig, replica_id: str,
                base: dict[str, str]) -> dict[str, str]:
    """A replica process's environment: `base`, where services keep their data (the risk
    example's features and model), the deployment's `env`, and who it is."""
    env = dict(base)
    env["STEADYSERVE_DATABASE_URL"] = config.database
    env["STEADYSERVE_DATA_DIR"] = os.path.abspath(config.data_dir)
    env.update(deployment.env)
    env["PYTHONUNBUFFERED"] = "1"
    env["STEADYSERVE_REPLICA_ID"] = replica_id
    env["STEADYSERVE_DEPLOYMENT"] = deployment.name
    return env


def replica_argv(config: Config, deployment: DeploymentConfig, replica_id: str, threads: int,
                 *, fd: str, parent_pid: str, recorder: str | None) -> list[str]:
    """The replica server's command line (`python -m steadyserve.replica`)."""
    argv = [
        sys.executable, "-m", "steadyserve.replica",
        "--service", deployment.service, "--fd", fd,
        "--name", replica_id, "--threads", str(threads),
        "--parent-pid", parent_pid,
        "--drain-timeout-s", str(config.supervisor.drain_timeout_s),
        "--log-level", config.log_level,
        "--log-format", _resolved_format(config.log_format),
        "--nice", str(config.supervisor.replica_nice),
    ]
    if recorder is not None:
        argv += ["--flight-recorder", recorder]
    return argv


class LocalLauncher:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.cores = usable_cores()

    async def launch(self, deployment: DeploymentConfig, replica_id: str) -> LaunchedReplica:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            sock.listen(1024)
            sock.set_inheritable(True)
            port = sock.getsockname()[1]
            threads = torch_threads(self.config, deployment, self.cores)
            recorder = os.path.join(self.config.data_dir, "flight", f"{replica_id}.keys")
            argv = replica_argv(self.config, deployment, replica_id, threads,
                                fd=str(sock.fileno()), parent_pid=str(os.getpid()),
                                recorder=recorder)
            env = replica_env(self.config, deployment, replica_id, base=dict(os.environ))
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv, pass_fds=(sock.fileno(),), start_new_session=True, env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                )
            except OSError as exc:
                raise ConfigError(f"cannot start replica of {deployment.name}: {exc}") from exc
            return LaunchedReplica(process, "127.0.0.1", port, recorder)
        finally:
            sock.close()

    @staticmethod
    def signal(replica: LaunchedReplica, sig: signal.Signals) -> None:
        if replica.process.returncode is None:
            try:
                os.kill(replica.pid, sig)
            except ProcessLookupError:
                pass
